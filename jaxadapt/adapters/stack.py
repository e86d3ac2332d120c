"""Many adapters in one batch: stacks, and the forward contexts (mixed, gated, pooled) over them.

S-LoRA (Sheng et al., 2023), Sec. 4: one batch, each request with its own adapter; adapters of
different ranks are zero-padded to the largest rank of the stack (the kernels skip the padding).
"""
from __future__ import annotations

from typing import Mapping, Optional, Sequence

import jax.numpy as jnp
import numpy as np

from kernels_pallas import PagedWeights

from jaxadapt.adapters.hook import dora_weight_norm
from jaxadapt.adapters.lora import LoraAdapter, kernel_at
from jaxadapt.context import AdapterPool, Context, PoolView, Router, Stack, make_routing


def stack_adapters(params: Mapping, adapters: Sequence[LoraAdapter], dtype=jnp.float32) -> dict:
  """Per path: `a [N, in, r_max]`, `b [N, r_max, out]`, `scale [N]`, `ranks [N]`,
  `dora_scale [N, out]|None`.

  An adapter that does not target a path gets zeros there (scale 0, rank 1).
  """
  paths = []
  for ad in adapters:
    paths += [p for p in ad.weights if p not in paths]
  out = {}
  for path in paths:
    kernel = kernel_at(params, path)
    din, dout = kernel.shape
    rmax = max(ad.rank(path) for ad in adapters if path in ad.weights)
    a = np.zeros((len(adapters), din, rmax), np.float32)
    b = np.zeros((len(adapters), rmax, dout), np.float32)
    scale = np.zeros((len(adapters),), np.float32)
    ranks = np.ones((len(adapters),), np.int32)
    dora = None
    if any("magnitude" in ad.weights.get(path, {}) for ad in adapters):
      dora = np.ones((len(adapters), dout), np.float32)
    for n, ad in enumerate(adapters):
      w = ad.weights.get(path)
      if w is None:
        continue
      r = ad.rank(path)
      a[n, :, :r] = np.asarray(w["a"], np.float32)
      b[n, :r, :] = np.asarray(w["b"], np.float32)
      scale[n] = ad.scale(path)
      ranks[n] = r
      if "magnitude" in w:
        norm = dora_weight_norm(kernel, w["a"], w["b"], scale[n])
        dora[n] = np.asarray(w["magnitude"], np.float32) / np.asarray(norm)
    out[path] = dict(a=jnp.asarray(a, dtype), b=jnp.asarray(b, dtype), scale=jnp.asarray(scale),
                     ranks=jnp.asarray(ranks),
                     dora_scale=None if dora is None else jnp.asarray(dora))
  return out


def _num_adapters(stacks: Mapping) -> int:
  return next(iter(stacks.values()))["scale"].shape[0] if stacks else 0


def _views(stacks: Mapping) -> dict:
  return {p: Stack(a=s["a"], b=s["b"], scale=s["scale"], ranks=s.get("ranks"),
                   dora_scale=s["dora_scale"]) for p, s in stacks.items()}


def mixed_context(stacks: Mapping, ids, *, layout: str = "sequence") -> Context:
  """A mixed-batch `Context` from `stack_adapters` output.

  Args:
    stacks: `stack_adapters` (or `page_stacks`) output.
    ids: adapter id per batch row ([B], layout "sequence") or per token of the flattened
      batch ([B * S], layout "token"); -1 = base only.
    layout: "sequence" or "token" (S-LoRA's SGMV and BGMV layouts, Sec. 5.1).
  """
  if layout not in ("sequence", "token"):
    raise ValueError(f"a mixed batch's layout is 'sequence' or 'token', got {layout!r}")
  ids = jnp.asarray(ids, jnp.int32).reshape(-1)
  return Context(weights=_views(stacks), routing=make_routing(layout, ids, _num_adapters(stacks)))


def gated_context(stacks: Mapping, topk_ids, gates) -> Context:
  """A `Context` in which each token mixes its given top-k adapters with gate weights.

  Args:
    stacks: `stack_adapters` output (DoRA adapters are not supported in a gated mixture).
    topk_ids: [T, K] adapter ids per token (-1 skips a slot), T = batch * seq.
    gates: [T, K] gate weights (MeteoRA Eq. 3: softmax over the top-k router logits).
  """
  if any(s["dora_scale"] is not None for s in stacks.values()):
    raise ValueError("a gated (MeteoRA) mixture of DoRA adapters is not supported; use LoRA")
  ids = jnp.asarray(topk_ids, jnp.int32)
  g = jnp.asarray(gates)
  if ids.ndim != 2 or g.shape != ids.shape:
    raise ValueError(f"topk_ids and gates must both be [T, K], got {ids.shape} and {g.shape}")
  return Context(weights=_views(stacks),
                 routing=make_routing("topk", ids, _num_adapters(stacks), gates=g))


def routed_context(stacks: Mapping, routers: Mapping[str, Router]) -> Context:
  """A MeteoRA `Context`: on each path with a router, the hook evaluates the gate from that
  layer's own input and mixes the top-k adapters (MeteoRA Eq. 3-4)."""
  unknown = [p for p in routers if p not in stacks]
  if unknown:
    raise ValueError(f"routers at {unknown[:3]}, where no adapter of the stack has weights")
  return Context(weights=_views({p: stacks[p] for p in routers}), routers=dict(routers))


def pool_context(stacks: Mapping, ids, *, layout: str = "sequence", page_size: int,
                 num_pages: Optional[int] = None, seed: int = 0) -> Context:
  """The same adapters in pages of one unified pool (S-LoRA Sec. 4.1), in shuffled pages.

  Every path reads the one `pages` leaf [P, page_size]: on a path of in/out sizes (D, O) a page
  holds `page_size // D` rank rows of A^T or `page_size // O` rows of B (so `page_size` must be
  a multiple of every targeted layer's sizes). Adapter n uses only the pages its own rank
  needs on each side. The serving engine's allocator places pages the same way; this builds
  such a pool for tests and offline use.

  Args:
    stacks: `stack_adapters` output.
    ids, layout: the routing, as `mixed_context`.
    page_size: elements per page.
    num_pages: pool size (default: exactly the pages needed, plus one spare).
    seed: the shuffle of the page order.
  """
  n = _num_adapters(stacks)
  paths = list(stacks)
  geo = {}
  need = 0
  for p in paths:
    s = stacks[p]
    din, rmax = s["a"].shape[1], s["a"].shape[2]
    dout = s["b"].shape[2]
    for f in (din, dout):
      if page_size % f:
        raise ValueError(f"page_size {page_size} is not a multiple of {f}, a feature size of "
                         f"{p}; pick a page size every targeted layer's in and out size divides")
    rpp_a, rpp_b = page_size // din, page_size // dout
    ranks = np.asarray(s["ranks"])
    live_a = [-(-int(r) // rpp_a) for r in ranks]
    live_b = [-(-int(r) // rpp_b) for r in ranks]
    geo[p] = (din, dout, -(-rmax // rpp_a), -(-rmax // rpp_b), live_a, live_b)
    need += sum(live_a) + sum(live_b)
  num_pages = need + 1 if num_pages is None else num_pages
  if num_pages < need:
    raise ValueError(f"the adapters need {need} pages of {page_size}; num_pages={num_pages}")
  rng = np.random.default_rng(seed)
  free = list(rng.permutation(num_pages))
  dtype = np.asarray(next(iter(stacks.values()))["a"]).dtype if stacks else np.float32
  pages = np.zeros((num_pages, page_size), dtype)
  maxp = max([max(g[2], g[3]) for g in geo.values()] or [1])
  tables = np.zeros((len(paths), 2, n, maxp), np.int32)
  maxo = max([g[1] for g in geo.values()] or [1])
  has_dora = any(stacks[p]["dora_scale"] is not None for p in paths)
  dora = np.ones((len(paths), n, maxo), np.float32) if has_dora else None
  views = {}
  for slot, p in enumerate(paths):
    s = stacks[p]
    din, dout, pa, pb, live_a, live_b = geo[p]
    a_rows = np.asarray(s["a"]).transpose(0, 2, 1)   # [N, R, D]: rank rows of A
    b_rows = np.asarray(s["b"])                       # [N, R, O]
    for side, (rows, feat, live) in enumerate(((a_rows, din, live_a), (b_rows, dout, live_b))):
      rpp = page_size // feat
      for i in range(n):
        for j in range(live[i]):
          page = int(free.pop())
          chunk = rows[i, j * rpp:(j + 1) * rpp]
          flat = np.zeros((rpp, feat), dtype)
          flat[:chunk.shape[0]] = chunk
          pages[page] = flat.reshape(-1)
          tables[slot, side, i, j] = page
    if s["dora_scale"] is not None:
      dora[slot, :, :dout] = np.asarray(s["dora_scale"])
    views[p] = PoolView(slot=slot, din=din, dout=dout, pages_a=pa, pages_b=pb)
  pool = AdapterPool(
      pages=jnp.asarray(pages), tables=jnp.asarray(tables),
      scales=jnp.stack([jnp.asarray(stacks[p]["scale"]) for p in paths]),
      ranks=jnp.stack([jnp.asarray(stacks[p]["ranks"], jnp.int32) for p in paths]),
      dora_scale=None if dora is None else jnp.asarray(dora))
  ids = jnp.asarray(ids, jnp.int32).reshape(-1)
  return Context(weights=views, pool=pool, routing=make_routing(layout, ids, n))


def page_stacks(stacks: Mapping, page_rows: int, *, seed: int = 0) -> dict:
  """The same stacks stored in pages of a pool (S-LoRA Sec. 4.1), pages in shuffled order.

  Each adapter's rank rows occupy `ceil(rank / page_rows)` pages that need not be contiguous;
  `kernels_pallas.PagedWeights` addresses them through a page table. The serving engine's pool
  allocates pages the same way; this builds one pool per side for tests and offline use.
  """
  rng = np.random.default_rng(seed)
  out = {}
  for path, s in stacks.items():
    a = np.asarray(s["a"]).transpose(0, 2, 1)  # [N, R, in]: rank rows of A
    b = np.asarray(s["b"])                     # [N, R, out]
    n, r = a.shape[:2]
    pages = -(-r // page_rows)
    pad = pages * page_rows - r
    sides = []
    for rows in (a, b):
      rows = np.pad(rows, ((0, 0), (0, pad), (0, 0)))
      order = rng.permutation(n * pages)
      pool = np.zeros((n * pages, page_rows, rows.shape[2]), rows.dtype)
      pool[order] = rows.reshape(n * pages, page_rows, rows.shape[2])
      sides.append(PagedWeights(jnp.asarray(pool), jnp.asarray(order.reshape(n, pages),
                                                                jnp.int32)))
    out[path] = dict(s, a=sides[0], b=sides[1])
  return out
