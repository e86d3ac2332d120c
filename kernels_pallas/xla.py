"""The XLA path: the visit plan run as a loop of small dots (the CPU default).

Each visit slices one tile of rows and one adapter's weights (no [T, D, R] gather), so the work is
that of the single-adapter matmul plus one weight read per visit. On 2 CPU cores, for T=512,
D=O=2048, 64 adapters of rank 16, this measured 15-40x faster than the gather-einsum of
`reference` and 50-100x faster than `lax.ragged_dot` (bench/kernels.py, docs/benchmarks.md). The loop's trip count is the number of real
visits, so it is not reverse-differentiable by itself: `ops` wraps it in a custom_vjp whose
backward pass is built from the same loops (`shrink_wgrad`, `expand_wgrad`).

Weights arrive as `w` plus `table`: a dense stack `[N, *, *]` whose rank axis is `rank_axis`
(2 for A [N, D, R], 1 for B [N, R, O]) with `table=None`, or a pool `[P, page_rows, F]` with a
`[N, max_pages]` page table (rank axis 1).

References:
  S-LoRA (Sheng et al., 2023), Sec. 5.1 (MBGMM/MBGMV), Sec. 4.1 (weights in pages).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from kernels_pallas.plan import Plan


def adapter_matrix(w: jax.Array, table, aid: jax.Array, rank_axis: int):
  """One adapter's weights and the axis of the result that is the rank axis (0 or 1)."""
  if table is None:
    return lax.dynamic_index_in_dim(w, aid, 0, keepdims=False), rank_axis - 1
  pages = jnp.clip(table[aid], 0, w.shape[0] - 1)  # [max_pages]
  rows = jnp.take(w, pages, axis=0, mode="clip")  # [max_pages, page_rows, F]
  return rows.reshape(-1, w.shape[2]), 0


def _tile(num_rows: int, block_t: int, plan: Plan, v, perm):
  """(live rows mask [bt], row indices [bt]) of visit v; rows go through `perm` if given."""
  bt = min(block_t, num_rows)
  start = jnp.minimum(plan.tile[v] * bt, num_rows - bt)
  rows = start + jnp.arange(bt, dtype=jnp.int32)
  live = (rows >= plan.lo[v]) & (rows < plan.hi[v]) & (plan.ids[v] >= 0)
  if perm is not None:
    rows = lax.dynamic_slice_in_dim(perm, start, bt)
  return live, rows


def _rank_live(ranks: jax.Array, aid, r: int) -> jax.Array:
  return jnp.arange(r, dtype=jnp.int32) < ranks[aid]


@functools.partial(jax.jit, static_argnames=("rank_axis", "block_t"))
def shrink(x: jax.Array, w: jax.Array, table, ranks: jax.Array, plan: Plan, *, rank_axis: int,
           block_t: int = 8, perm=None) -> jax.Array:
  """h[t] = x[t] @ W[id]: [T, F] -> [T, R] float32.

  Args:
    x: [T, F] rows (grouped, or grouped through `perm`).
    w, table, rank_axis: the weight source (module docstring).
    ranks: [N] int32 live rank of each adapter.
    plan: the visit plan of the grouped rows.
    block_t: rows per tile (the plan's).
    perm: optional [T] int32: grouped row i is row perm[i] of x (and of the result), which saves
      sorting x and un-sorting h.

  Returns:
    [T, R] float32; rows without adapter and columns past the rank are zero.
  """
  num_rows = x.shape[0]
  r = w.shape[rank_axis] if table is None else table.shape[1] * w.shape[1]

  def visit(v, h):
    live, rows = _tile(num_rows, block_t, plan, v, perm)
    aid = jnp.maximum(plan.ids[v], 0)
    mat, mat_rank = adapter_matrix(w, table, aid, rank_axis)
    ht = lax.dot_general(x[rows], mat, (((1,), (1 - mat_rank,)), ((), ())),
                         preferred_element_type=jnp.float32)
    keep = live[:, None] & _rank_live(ranks, aid, r)[None, :]
    return h.at[rows].set(jnp.where(keep, ht, h[rows]), unique_indices=True)

  return lax.fori_loop(0, plan.count, visit, jnp.zeros((num_rows, r), jnp.float32))


@functools.partial(jax.jit, static_argnames=("rank_axis", "block_t"))
def expand(y: jax.Array, h: jax.Array, w: jax.Array, table, ranks: jax.Array, plan: Plan, *,
           rank_axis: int, block_t: int = 8, perm=None) -> jax.Array:
  """y[t] += h[t] @ W[id]: [T, R] -> [T, F] in y's dtype (sums in float32).

  Args:
    y: [T, F] base output rows.
    h: [T, R] activations, already multiplied by any per-row scale or gate.
    w, table, rank_axis: the weight source (module docstring).
    ranks: [N] int32; rank rows past it are ignored whatever they hold.
    plan: the visit plan.
    block_t: rows per tile.
    perm: optional [T] row permutation, as in `shrink`.

  Returns:
    [T, F] in y's dtype.
  """
  num_rows = y.shape[0]
  r = h.shape[1]

  def visit(v, acc):
    live, rows = _tile(num_rows, block_t, plan, v, perm)
    aid = jnp.maximum(plan.ids[v], 0)
    mat, mat_rank = adapter_matrix(w, table, aid, rank_axis)
    rank_live = _rank_live(ranks, aid, r)
    mat = jnp.where(jnp.expand_dims(rank_live, 1 - mat_rank), mat, 0)
    ht = jnp.where(live[:, None] & rank_live[None, :], h[rows], 0)
    d = lax.dot_general(ht, mat.astype(ht.dtype), (((1,), (mat_rank,)), ((), ())),
                        preferred_element_type=jnp.float32)
    # Rows of the tile outside the visit get exactly zero, even if this adapter's live weights
    # hold inf or NaN (0 * inf would reach another adapter's rows).
    return acc.at[rows].add(jnp.where(live[:, None], d, 0), unique_indices=True)

  acc = lax.fori_loop(0, plan.count, visit, y.astype(jnp.float32))
  return acc.astype(y.dtype)


@functools.partial(jax.jit, static_argnames=("num_adapters", "rank_side", "block_t"))
def outer_sum(u: jax.Array, g: jax.Array, ranks: jax.Array, plan: Plan, num_adapters: int, *,
              rank_side: int, block_t: int = 8, perm=None) -> jax.Array:
  """Per-adapter sums of outer products, the weight gradient of both ops.

  G[n] = sum over rows t with id n of u[t]^T g[t] (the grouped transposed matmul, megablox's
  "tgmm"). Rank slots at or past ranks[n] are zero.

  Args:
    u: [T, P] left factor (x for dA, h for dB).
    g: [T, Q] right factor (dh for dA, dy for dB).
    ranks: [N] int32.
    plan: the visit plan.
    num_adapters: N.
    rank_side: 1 if Q is the rank axis (dA [N, D, R]), 0 if P is (dB [N, R, O]).
    block_t: rows per tile.
    perm: optional [T] row permutation, as in `shrink`.

  Returns:
    [N, P, Q] float32.
  """
  num_rows = u.shape[0]
  r = (g if rank_side == 1 else u).shape[1]

  def visit(v, acc):
    live, rows = _tile(num_rows, block_t, plan, v, perm)
    aid = jnp.maximum(plan.ids[v], 0)
    ut = jnp.where(live[:, None], u[rows], 0).astype(jnp.float32)
    gt = jnp.where(live[:, None], g[rows], 0).astype(jnp.float32)  # Other rows' NaN stay there.
    prod = lax.dot_general(ut, gt, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)
    prod = jnp.where(jnp.expand_dims(_rank_live(ranks, aid, r), 1 - rank_side), prod, 0)
    old = lax.dynamic_index_in_dim(acc, aid, 0, keepdims=False)
    return lax.dynamic_update_index_in_dim(acc, old + prod, aid, 0)

  zeros = jnp.zeros((num_adapters, u.shape[1], g.shape[1]), jnp.float32)
  return lax.fori_loop(0, plan.count, visit, zeros)


def batched_lora(y: jax.Array, x: jax.Array, a: jax.Array, b: jax.Array, ids: jax.Array,
                 scales: jax.Array, ranks) -> jax.Array:
  """One adapter per batch row of x [B, S, D]: gather each row's weights once, then einsum.

  With equal-length segments (a sequence per segment) the weight gather is [B, D, R], small next
  to the activations, so this beats the visit loop when segments are long (measured ~2x on a
  16 x 64-token batch, 8 adapters, d=256). Plain jnp: differentiable as it stands.

  Args:
    y: [B, S, O]; x: [B, S, D]; a: [N, D, R] dense; b: [N, R, O] dense; ids: [B] (-1: none;
    ids >= N also mean none); scales: [N]; ranks: [N] or None (rank slots past ranks[n] are
    ignored).
  """
  valid = (ids >= 0) & (ids < a.shape[0])
  safe = jnp.where(valid, ids, 0)
  live = valid[:, None]
  if ranks is not None:
    live = live & (jnp.arange(a.shape[2])[None, :] < jnp.asarray(ranks)[safe][:, None])
  # Selects, not products, so NaN past a rank or in a row without adapter reaches no value or
  # gradient of another.
  aw = jnp.where(live[:, None, :], a[safe], 0)
  xv = jnp.where(valid[:, None, None], x, 0)
  h = jnp.einsum("bsd,bdr->bsr", xv, aw, preferred_element_type=jnp.float32)
  row_scale = jnp.where(valid, scales[safe], 0).astype(jnp.float32)
  h = jnp.where(live[:, None, :], h, 0) * row_scale[:, None, None]
  bw = jnp.where(live[:, :, None], b[safe].astype(jnp.float32), 0)
  d = jnp.einsum("bsr,bro->bso", h, bw)
  d = jnp.where(valid[:, None, None], d, 0)
  return (y.astype(jnp.float32) + d).astype(y.dtype)


def paged_rows(w, ids: jax.Array, rank: int) -> jax.Array:
  """[T, rank, F]: rank rows 0..rank-1 of each row's adapter, read row by row from its pages
  (`w` a PagedWeights, pool [P, page_rows, F]); not a page more than the rank needs."""
  page_rows = w.pool.shape[1]
  j = jnp.arange(rank, dtype=jnp.int32)
  pages = jnp.clip(w.table[ids][:, j // page_rows], 0, w.pool.shape[0] - 1)   # [T, rank]
  flat = w.pool.reshape(-1, w.pool.shape[2])                                    # a bitcast
  return jnp.take(flat, pages * page_rows + j % page_rows, axis=0, mode="clip")


def rows_lora(y: jax.Array, x: jax.Array, a, b, ids: jax.Array, scales: jax.Array,
              ranks: jax.Array, rank: int) -> jax.Array:
  """`y + scale * (x A) B` per row with each row's adapter read rank row by rank row from pool
  pages (S-LoRA's BGMV for decode: a few tokens, each its own adapter). For T rows it reads
  T x rank x (D + O) weights, where the visit loop reads whole pages per visit; the better of
  the two when T is small and the adapters many (bench in docs/benchmarks.md).

  Args:
    y: [T, O]; x: [T, D]; a, b: PagedWeights of A^T rows [.., D] and B rows [.., O]; ids: [T]
    (< 0 or >= N: no adapter); scales, ranks: [N]; rank: a static bound on every live rank.
  """
  n = scales.shape[0]
  valid = (ids >= 0) & (ids < n)
  safe = jnp.where(valid, ids, 0)
  live = valid[:, None] & (jnp.arange(rank)[None, :] < ranks[safe][:, None])   # [T, rank]
  aw = jnp.where(live[..., None], paged_rows(a, safe, rank), 0)                 # [T, rank, D]
  h = jnp.einsum("td,trd->tr", x, aw.astype(x.dtype), preferred_element_type=jnp.float32)
  h = h * jnp.where(valid, scales[safe], 0).astype(jnp.float32)[:, None]
  bw = jnp.where(live[..., None], paged_rows(b, safe, rank), 0)                 # [T, rank, O]
  d = jnp.einsum("tr,tro->to", h, bw.astype(jnp.float32))
  return (y.astype(jnp.float32) + jnp.where(valid[:, None], d, 0)).astype(y.dtype)


def members_lora(y: jax.Array, x: jax.Array, a, b, members: jax.Array, member_of: jax.Array,
                 scales: jax.Array, ranks: jax.Array, rank: int) -> jax.Array:
  """`y + scale * (x A) B` per row for a batch whose rows use a few distinct adapters, the
  step's `members` (M of them): each member's rank rows are read from its pool pages once
  ([M, rank, D] and [M, rank, O]), every row is multiplied by all of them in one matmul
  (`x @ [A_1 .. A_M]`, [T, M*rank]), and each row keeps its own member's block. Against
  `rows_lora`, which reads T x rank x (D + O) weights, this reads M x rank x (D + O) and does
  M times the (small) flops: the faster form while M is small (bench in docs/benchmarks.md).

  Args:
    y: [T, O]; x: [T, D]; a, b: PagedWeights of A^T rows [.., D] and B rows [.., O];
    members: [M] adapter ids (< 0 or >= N: an unused member slot); member_of: [T] each row's
    index into `members` (< 0 or >= M: no adapter); scales, ranks: [N]; rank: a static bound on
    every live rank.
  """
  n, m = scales.shape[0], members.shape[0]
  valid = (members >= 0) & (members < n)
  safe = jnp.where(valid, members, 0)
  live = valid[:, None] & (jnp.arange(rank)[None, :] < ranks[safe][:, None])     # [M, rank]
  # Selects on the gathered weights (M x rank rows, small): NaN in a row past a rank or in an
  # unused page reaches nothing.
  aw = jnp.where(live[..., None], paged_rows(a, safe, rank), 0).astype(x.dtype)  # [M, rank, D]
  bw = jnp.where(live[..., None], paged_rows(b, safe, rank), 0).astype(jnp.float32)
  h = jnp.dot(x, aw.reshape(m * rank, -1).T, preferred_element_type=jnp.float32)  # [T, M*rank]
  coef = jnp.where(live, scales[safe][:, None], 0).astype(jnp.float32)             # [M, rank]
  mine = member_of[:, None] == jnp.arange(m)[None, :]                               # [T, M]
  keep = (jnp.where(mine[:, :, None], coef[None], 0)).reshape(-1, m * rank)
  d = jnp.dot(h * keep, bw.reshape(m * rank, -1))
  return (y.astype(jnp.float32) + d).astype(y.dtype)


def dense_topk(y: jax.Array, x: jax.Array, a: jax.Array, b: jax.Array, scales: jax.Array,
               topk_ids: jax.Array, gates: jax.Array, ranks=None) -> jax.Array:
  """MeteoRA's top-k mixture as two dense matmuls over every adapter at once: `x @ [A_1 .. A_N]`
  ([T, N*R]), each adapter's block weighted by its gate (zero for adapters outside a token's
  top-k), then `@ [B_1; ..; B_N]`. It computes N/K times the top-k path's flops but reads every
  weight once, with no visit loop: the faster form while N*R stays small (`ops.topk_impl`).
  Plain jnp: differentiable as it stands. Weights are assumed finite (a NaN in one adapter
  reaches every row through the shared matmul, where the visit loop keeps it to that adapter's
  rows).

  Args:
    y: [T, O]; x: [T, D]; a: [N, D, R] dense; b: [N, R, O] dense; scales: [N]; topk_ids: [T, K]
    (< 0 or >= N: the slot is skipped); gates: [T, K]; ranks: optional [N] (rank slots past
    ranks[n] are ignored).

  References:
    MeteoRA (Xu et al., 2024), Sec. 3, Eq. 3-4.
  """
  n, d, r = a.shape
  valid = (topk_ids >= 0) & (topk_ids < n)
  # [T, N] mixing weight of each adapter: the gate where it is among the top-k, else 0.
  w = jnp.einsum("tk,tkn->tn", jnp.where(valid, gates, 0).astype(jnp.float32),
                 jax.nn.one_hot(jnp.where(valid, topk_ids, n), n, dtype=jnp.float32))
  w = w * scales.astype(jnp.float32)[None, :]
  if ranks is not None:
    live = jnp.arange(r)[None, :] < jnp.asarray(ranks)[:, None]                # [N, R]
    a = jnp.where(live[:, None, :], a, 0)
    b = jnp.where(live[:, :, None], b, 0)
  h = jnp.dot(x, a.transpose(1, 0, 2).reshape(d, n * r).astype(x.dtype),
              preferred_element_type=jnp.float32)                               # [T, N*R]
  h = (h.reshape(-1, n, r) * w[:, :, None]).reshape(-1, n * r)
  out = jnp.dot(h, b.reshape(n * r, -1).astype(jnp.float32))
  return (y.astype(jnp.float32) + out).astype(y.dtype)
