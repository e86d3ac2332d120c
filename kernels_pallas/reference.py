"""Plain-jnp specification of the multi-adapter LoRA ops.

Every kernel in this package is tested against these functions. Layout follows JAX:
`A: [N, D, R]`, `B: [N, R, O]`, adapter `n` contributes `scale[n] * (x @ A[n]) @ B[n]`.
An adapter id below zero means "no adapter" for that token.

Out-of-range values, one rule for every path:
  * Adapter ids `>= N`: when the ids are concrete (not traced), every op raises ValueError naming
    N and the offending id. Under `jit` they cannot be checked, and such a row has no adapter
    (as id -1): it never reads another adapter's weights or memory past the stack.
  * Page-table entries outside `[0, P)` in an adapter's live pages (those holding rank rows
    below its rank): ValueError when the table (and ranks) are concrete; under `jit` they are
    clamped into `[0, P)`, as are all entries past the live pages.
  * Ranks are clamped to `[0, R]`.
  * Whatever a row does not use (weights past its adapter's rank, other adapters' weights, pages
    it does not read, x or h in rows without an adapter) never reaches its output or the
    gradients of what it does use, even when it holds NaN or inf.

Three axes of variation, each with one spelling:

* Ranks: `ranks[N]` (keyword, optional) gives adapter n's true rank; rank rows/columns at or beyond
  it are ignored, whatever they hold. Without it every adapter uses all `R` (zero-padded) columns.
* Token layout: one adapter id per row (`ids[T]`, decode: BGMV) or segments of consecutive rows
  (`seg_ids[S]`, `seg_lens[S]`, prefill: SGMV). `segment_row_ids` turns the second into the first.
* Weight source: a dense stack (`jax.Array`) or pages of a unified pool (`PagedWeights`), in the
  same argument slot.

References:
  S-LoRA (Sheng et al., 2023), Sec. 4.1 (unified paging) and Sec. 5.1 (shrink/expand of the
  heterogeneous batch, MBGMM/MBGMV); MeteoRA (Xu et al., 2024), Sec. 3, Eq. 3-4 (top-k gates).
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np


class PagedWeights(NamedTuple):
  """One side (A or B) of N adapters stored in pages of a unified pool.

  S-LoRA Sec. 4.1 keeps KV cache and adapter weights in one pool of pages whose width is the
  hidden size, so an adapter of rank r occupies r rows that need not be contiguous. Here a page
  holds `page_rows` such rows (page_rows=1 is S-LoRA exactly; 8 or 16 matches a hardware tile).

  Row i of page `table[n, j]` holds rank row `j * page_rows + i` of adapter n:
    * shrink side: column `j * page_rows + i` of `A[n]` (a row of `A[n].T`, length D);
    * expand side: row `j * page_rows + i` of `B[n]` (length O).
  Entries of `table[n]` at or beyond `ceil(ranks[n] / page_rows)` are never read for data
  (they are clamped into range); rows of the last page beyond the rank may hold anything.
  Live entries outside `[0, P)` are an error when the table is concrete and clamped under jit
  (module docstring).

  Attributes:
    pool: [P, page_rows, H] the pool (H = D for A, O for B; one pool serves both when D == O).
    table: [N, max_pages] int32 page index of each adapter's j-th page.
  """
  pool: jax.Array
  table: jax.Array

  @property
  def max_rank(self) -> int:
    return self.table.shape[1] * self.pool.shape[1]


def _validate(name: str, x_or_h: jax.Array, w, ids: jax.Array, ranks, *, side: str,
              y=None) -> None:
  """Shape checks of one side of an op (x or h against A or B, y against B's outputs)."""
  if x_or_h.ndim != 2:
    raise ValueError(f"{name}: expected a [T, features] activation, found shape {x_or_h.shape}")
  if ids.ndim != 1 or ids.shape[0] != x_or_h.shape[0]:
    raise ValueError(f"{name}: expected ids of shape [T]=[{x_or_h.shape[0]}], found {ids.shape}")
  if isinstance(w, PagedWeights):
    if w.pool.ndim != 3 or w.table.ndim != 2:
      raise ValueError(f"{name}: expected pool [P, page_rows, H] and table [N, max_pages], found "
                       f"{w.pool.shape} and {w.table.shape}")
    n = w.table.shape[0]
    feat = w.pool.shape[2]
    rank = w.max_rank
  else:
    if w.ndim != 3:
      raise ValueError(f"{name}: expected a weight stack of rank 3, found shape {w.shape}")
    n = w.shape[0]
    feat, rank = (w.shape[1], w.shape[2]) if side == "a" else (w.shape[2], w.shape[1])
  want = x_or_h.shape[1]
  if side == "a" and feat != want:
    raise ValueError(f"{name}: x is [T, D]=[.., {want}] but A's feature size is {feat} "
                     f"(dense A must be [N, D, R], paged A pool [P, page_rows, D])")
  if side == "b" and rank != want:
    raise ValueError(f"{name}: h is [T, R]=[.., {want}] but B holds rank {rank} "
                     f"(dense B must be [N, R, O], paged B must have max_pages*page_rows == R)")
  if y is not None and tuple(y.shape) != (x_or_h.shape[0], feat):
    raise ValueError(f"{name}: expected y of shape [T, O]=[{x_or_h.shape[0]}, {feat}] (O from B), "
                     f"found {tuple(y.shape)}")
  if ranks is not None and jnp.shape(ranks) != (n,):
    raise ValueError(f"{name}: expected ranks of shape [N]=[{n}], found {jnp.shape(ranks)}")
  check_ids(name, ids, n)
  if isinstance(w, PagedWeights):
    check_table(name, w, ranks)


def concrete(v) -> np.ndarray | None:
  """v's values as numpy when they are known now (not traced, all on this host), else None."""
  if v is None or isinstance(v, (jax.core.Tracer, jax.ShapeDtypeStruct)):
    return None
  if isinstance(v, jax.Array) and not v.is_fully_addressable:
    return None
  return np.asarray(v)


def check_ids(name: str, ids, n: int) -> None:
  """Raises ValueError if concrete `ids` hold an adapter id >= n (see the module docstring)."""
  c = concrete(ids)
  if c is None or c.size == 0 or c.max() < n:
    return
  where = np.argwhere(c >= n)[0]
  raise ValueError(f"{name}: adapter ids must be < N={n} (or < 0 for no adapter), found "
                   f"{c[tuple(where)]} at index {tuple(int(i) for i in where)}")


def check_table(name: str, w: PagedWeights, ranks) -> None:
  """Raises ValueError if a concrete page table sends a live page outside the pool."""
  table = concrete(w.table)
  if table is None or table.size == 0:
    return
  n, max_pages = table.shape
  if ranks is None:
    live_pages = np.full((n,), max_pages)
  else:
    r = concrete(ranks)
    if r is None:
      return
    live_pages = -(-np.clip(r, 0, w.max_rank) // w.pool.shape[1])
  num_pool = w.pool.shape[0]
  bad = ((table < 0) | (table >= num_pool)) & (np.arange(max_pages)[None, :] < live_pages[:, None])
  if bad.any():
    i, j = (int(k) for k in np.argwhere(bad)[0])
    raise ValueError(f"{name}: page table entry [{i}, {j}] = {table[i, j]} is outside the pool "
                     f"of P={num_pool} pages (adapter {i} reads its first {live_pages[i]} pages)")


def check_scales(name: str, scales, n: int) -> None:
  if jnp.shape(scales) != (n,):
    raise ValueError(f"{name}: expected scales of shape [N]=[{n}], found {jnp.shape(scales)}")


def max_rank(w) -> int:
  """R of a weight source: the width of h (dense A [N, D, R] or a PagedWeights)."""
  return w.max_rank if isinstance(w, PagedWeights) else w.shape[2]


def dense_a(a) -> jax.Array:
  """A as a dense [N, D, R] stack (gathers the pages of a PagedWeights)."""
  if not isinstance(a, PagedWeights):
    return a
  n, pages = a.table.shape
  rows = a.pool[jnp.clip(a.table, 0, a.pool.shape[0] - 1)]  # [N, max_pages, page_rows, D]
  return rows.reshape(n, pages * a.pool.shape[1], a.pool.shape[2]).transpose(0, 2, 1)


def dense_b(b) -> jax.Array:
  """B as a dense [N, R, O] stack (gathers the pages of a PagedWeights)."""
  if not isinstance(b, PagedWeights):
    return b
  n, pages = b.table.shape
  rows = b.pool[jnp.clip(b.table, 0, b.pool.shape[0] - 1)]  # [N, max_pages, page_rows, O]
  return rows.reshape(n, pages * b.pool.shape[1], b.pool.shape[2])


def _valid_ids(ids: jax.Array, n: int) -> tuple[jax.Array, jax.Array]:
  """(valid [T] bool, safe [T] ids in [0, N)): ids outside [0, N) mean no adapter."""
  valid = (ids >= 0) & (ids < n)
  return valid, jnp.where(valid, ids, 0)


def _rank_mask(ranks, n: int, r: int) -> jax.Array | None:
  """[N, R] bool: rank slot k of adapter n is live (k < ranks[n])."""
  if ranks is None:
    return None
  return jnp.arange(r)[None, :] < jnp.asarray(ranks)[:, None]


def segment_row_ids(seg_ids: jax.Array, seg_lens: jax.Array, num_rows: int) -> jax.Array:
  """Per-row adapter ids of a segmented batch (SGMV layout to BGMV layout).

  Args:
    seg_ids: [S] adapter id of each segment (-1: no adapter).
    seg_lens: [S] rows in each segment (>= 0); segments are consecutive from row 0.
    num_rows: T. Rows past sum(seg_lens) have no adapter.

  Returns:
    [T] int32 ids.
  """
  if seg_ids.shape != seg_lens.shape or seg_ids.ndim != 1:
    raise ValueError(f"expected seg_ids and seg_lens of one shape [S], found {seg_ids.shape} and "
                     f"{seg_lens.shape}")
  ends = jnp.cumsum(seg_lens.astype(jnp.int32))
  seg = jnp.searchsorted(ends, jnp.arange(num_rows, dtype=jnp.int32), side="right")
  ids = jnp.concatenate([seg_ids.astype(jnp.int32), jnp.full((1,), -1, jnp.int32)])
  return ids[seg]


def lora_shrink(x: jax.Array, a_stack, ids: jax.Array, *, ranks=None) -> jax.Array:
  """h[t] = x[t] @ A[ids[t]]; rows with ids < 0 are zero, columns >= ranks[ids[t]] are zero.

  Args:
    x: [T, D] tokens.
    a_stack: [N, D, R] shrink weights of N adapters (ranks padded to R), or PagedWeights.
    ids: [T] int adapter id per token, -1 for none (>= N: see the module docstring).
    ranks: optional [N] int true rank of each adapter.

  Returns:
    [T, R] in x's dtype, accumulated in float32.

  References:
    S-LoRA (Sheng et al., 2023), Sec. 5.1: the shrink half of x A B on a heterogeneous batch.
  """
  _validate("lora_shrink", x, a_stack, ids, ranks, side="a")
  a_stack = dense_a(a_stack)
  valid, safe = _valid_ids(ids, a_stack.shape[0])
  mask = _rank_mask(ranks, a_stack.shape[0], a_stack.shape[2])
  if mask is not None:  # Select (not multiply) so NaN past a rank reaches no value or gradient.
    a_stack = jnp.where(mask[:, None, :], a_stack, 0)
  a = a_stack[safe]  # [T, D, R]: the gather-einsum.
  h = jnp.einsum("td,tdr->tr", jnp.where(valid[:, None], x, 0), a,
                 preferred_element_type=jnp.float32)
  live = valid[:, None]
  if mask is not None:
    live = live & mask[safe]
  return jnp.where(live, h, 0).astype(x.dtype)


def lora_expand(y: jax.Array, h: jax.Array, b_stack, ids: jax.Array, scales: jax.Array, *,
                ranks=None) -> jax.Array:
  """y[t] += scales[ids[t]] * h[t] @ B[ids[t]]; rows with ids < 0 unchanged.

  Args:
    y: [T, O] base output.
    h: [T, R] shrunk activations.
    b_stack: [N, R, O] expand weights, or PagedWeights.
    ids: [T] int adapter id per token, -1 for none (>= N: see the module docstring).
    scales: [N] per-adapter scale (alpha / r or alpha / sqrt(r)).
    ranks: optional [N] int true rank; rows of B (and columns of h) at or beyond it are ignored.

  Returns:
    [T, O] in y's dtype.

  References:
    S-LoRA (Sheng et al., 2023), Sec. 5.1: the expand half of x A B on a heterogeneous batch.
  """
  _validate("lora_expand", h, b_stack, ids, ranks, side="b", y=y)
  b_stack = dense_b(b_stack)
  check_scales("lora_expand", scales, b_stack.shape[0])
  valid, safe = _valid_ids(ids, b_stack.shape[0])
  mask = _rank_mask(ranks, b_stack.shape[0], b_stack.shape[1])
  live = valid[:, None]
  if mask is not None:  # Ignored rows may hold anything (a paged pool's tail): select, not scale.
    b_stack = jnp.where(mask[:, :, None], b_stack, 0)
    live = live & mask[safe]
  h = jnp.where(live, h, 0)
  b = b_stack[safe]  # [T, R, O]
  d = jnp.einsum("tr,tro->to", h, b, preferred_element_type=jnp.float32)
  d = jnp.where(valid[:, None], d * scales[safe].astype(jnp.float32)[:, None], 0)
  return (y.astype(jnp.float32) + d).astype(y.dtype)


def sgmv_shrink(x: jax.Array, a_stack, seg_ids: jax.Array, seg_lens: jax.Array, *,
                ranks=None) -> jax.Array:
  """`lora_shrink` on a segmented batch (rows grouped by adapter: S-LoRA's prefill layout).

  Args:
    x: [T, D]; a_stack: [N, D, R] or PagedWeights.
    seg_ids: [S] adapter id per segment (-1: none); seg_lens: [S] rows per segment.
    ranks: optional [N].

  References:
    S-LoRA (Sheng et al., 2023), Sec. 5.1 (MBGMM on the prefill batch).
  """
  return lora_shrink(x, a_stack, segment_row_ids(seg_ids, seg_lens, x.shape[0]), ranks=ranks)


def sgmv_expand(y: jax.Array, h: jax.Array, b_stack, seg_ids: jax.Array, seg_lens: jax.Array,
                scales: jax.Array, *, ranks=None) -> jax.Array:
  """`lora_expand` on a segmented batch (S-LoRA Sec. 5.1, prefill layout)."""
  ids = segment_row_ids(seg_ids, seg_lens, y.shape[0])
  return lora_expand(y, h, b_stack, ids, scales, ranks=ranks)


def lora_topk(y: jax.Array, x: jax.Array, a_stack, b_stack, scales: jax.Array,
              topk_ids: jax.Array, gates: jax.Array, *, ranks=None) -> jax.Array:
  """MeteoRA's gated mixture: y[t] += sum_j gates[t,j] * scale * (x[t] @ A[id]) @ B[id].

  Args:
    y: [T, O]; x: [T, D]; a_stack: [N, D, R] or PagedWeights; b_stack: [N, R, O] or PagedWeights;
    scales: [N].
    topk_ids: [T, K] adapter ids per token (-1 skips that slot).
    gates: [T, K] gate weights.
    ranks: optional [N].

  Returns:
    [T, O] in y's dtype; the sum over slots is carried in float32.

  References:
    MeteoRA (Xu et al., 2024), Sec. 3, Eq. 3-4: top-k gated sum of LoRA outputs.
  """
  if topk_ids.ndim != 2 or gates.shape != topk_ids.shape or topk_ids.shape[0] != x.shape[0]:
    raise ValueError(f"lora_topk: expected topk_ids and gates of shape [T, K] with T={x.shape[0]}, "
                     f"found {topk_ids.shape} and {gates.shape}")
  check_ids("lora_topk", topk_ids, dense_b(b_stack).shape[0])
  out = y.astype(jnp.float32)
  b32 = dense_b(b_stack).astype(jnp.float32)
  for j in range(topk_ids.shape[1]):
    ids = topk_ids[:, j]
    h = lora_shrink(x, a_stack, ids, ranks=ranks).astype(jnp.float32)
    h = h * gates[:, j:j + 1].astype(jnp.float32)
    out = lora_expand(out, h, b32, ids, scales, ranks=ranks)
  return out.astype(y.dtype)
