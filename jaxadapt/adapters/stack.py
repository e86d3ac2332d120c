"""Many adapters in one batch: stacks for the projection hook's mixed and gated contexts.

S-LoRA (Sheng et al., 2023), Sec. 4: one batch, each request with its own adapter; adapters of
different ranks are zero-padded to the largest rank of the stack (the kernels skip the padding).
"""
from __future__ import annotations

from typing import Mapping, Sequence

import jax.numpy as jnp
import numpy as np

from kernels_pallas import PagedWeights

from jaxadapt.adapters.hook import GatedLoRA, MixedLoRA, dora_weight_norm
from jaxadapt.adapters.lora import LoraAdapter, kernel_at


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


def mixed_contexts(stacks: Mapping, token_ids) -> dict:
  """`MixedLoRA` per path from `stack_adapters` output and one adapter id per token."""
  ids = jnp.asarray(token_ids, jnp.int32).reshape(-1)
  return {p: MixedLoRA(a=s["a"], b=s["b"], scale=s["scale"], token_ids=ids,
                       dora_scale=s["dora_scale"], ranks=s.get("ranks"))
          for p, s in stacks.items()}


def gated_contexts(stacks: Mapping, topk_ids, gates) -> dict:
  """`GatedLoRA` per path: each token mixes its top-k adapters with gate weights.

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
  return {p: GatedLoRA(a=s["a"], b=s["b"], scale=s["scale"], topk_ids=ids, gates=g,
                       ranks=s.get("ranks")) for p, s in stacks.items()}


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
