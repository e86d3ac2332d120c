"""Segmented-gather LoRA matmul for TPU (Pallas Mosaic): shrink and expand.

Both kernels walk the visit plan (`plan.py`): one visit is a tile of `block_t` grouped rows against
one adapter. Everything data-dependent is scalar-prefetched into SMEM (per-visit tile, adapter,
row bounds, rank and first-of-tile flag, plus the flattened page table), and the BlockSpec index
maps use it to pick the weight tile of the visit's adapter: `(id, d, r)` in a dense stack, or
`(table[id, r], 0, d)` in a paged pool, so the weights are DMA'd straight from where they live.

Ranks: the rank axis is cut into blocks of `br` (the whole R up to 128 lanes, 128 above; one page
of the pool when paged). A visit computes only its adapter's `ceil(rank / br)` blocks; past them
the index maps repeat the last block (no DMA) and the body is skipped, so a rank-8 adapter in a
batch padded to rank 128 costs one block, not R/br.

Grids (axes in order; the last is innermost):
  shrink: (visit, d-block, rank-block), h tile resident across a tile's visits.
  expand: (o-block, visit, rank-block), y tile resident across a tile's visits.

References:
  S-LoRA (Sheng et al., 2023), Sec. 5.1 (MBGMM/MBGMV kernels), Sec. 4.1 (non-contiguous weights in
  the unified pool).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from kernels_pallas.plan import Plan

# Block sizes, one table: lanes are 128 wide; feature blocks are the largest listed that divides.
_FEATURE_BLOCKS = (512, 256, 128)
_RANK_BLOCK = 128


def _feature_block(f: int) -> int:
  for b in _FEATURE_BLOCKS:
    if f % b == 0:
      return b
  return f  # A full-extent block is always legal.


def _rank_block(w: jax.Array, table, rank_axis: int) -> tuple[int, int]:
  """(br, nr): rank block and count of the weight source."""
  if table is not None:
    return w.shape[1], table.shape[1]
  r = w.shape[rank_axis]
  br = _RANK_BLOCK if (r > _RANK_BLOCK and r % _RANK_BLOCK == 0) else r
  return br, r // br


def _validate_args(name: str, rows: jax.Array, w: jax.Array, table, rank_axis: int,
                   feature: int) -> None:
  if w.ndim != 3:
    raise ValueError(f"{name}: expected weights of rank 3, found shape {w.shape}")
  feat_axis = 2 if table is not None else 3 - rank_axis
  if w.shape[feat_axis] != feature:
    raise ValueError(f"{name}: rows are [T, {feature}] but the weights {w.shape} have "
                     f"{w.shape[feat_axis]} features on axis {feat_axis}")
  if table is not None and table.ndim != 2:
    raise ValueError(f"{name}: expected a page table [N, max_pages], found {table.shape}")
  del rows


def _scalars(plan: Plan, ranks: jax.Array, table, num_rows: int, block_t: int, br: int,
             num_pages: int):
  """The scalar-prefetch operands: per-visit tile, id, lo, hi, live rank blocks, rank, first.

  Page indices are clamped into the pool's [0, num_pages), as `reference` clamps them: a DMA
  never leaves the pool.
  """
  real = plan.lo < num_rows
  live = plan.ids >= 0
  aid = jnp.maximum(plan.ids, 0)
  rank = jnp.where(live, ranks[aid], 0)
  nrb = (rank + br - 1) // br
  first = (real & (plan.lo == plan.tile * block_t)).astype(jnp.int32)
  pages = (jnp.zeros((1,), jnp.int32) if table is None
           else jnp.clip(table.reshape(-1), 0, num_pages - 1).astype(jnp.int32))
  return plan.tile, aid, plan.lo, plan.hi, nrb, rank, first, pages


def _live_block(r, nrb):
  """The rank block to fetch: r while it is live, else the last live one (no new DMA)."""
  return jnp.minimum(r, jnp.maximum(nrb - 1, 0))


def _row_mask(tile, lo, hi, shape, bt):
  rows = tile * bt + lax.broadcasted_iota(jnp.int32, shape, 0)
  return (rows >= lo) & (rows < hi)


def _dot(a, b, contract_b: int):
  ct = jnp.promote_types(a.dtype, b.dtype)
  return lax.dot_general(a.astype(ct), b.astype(ct), (((1,), (contract_b,)), ((), ())),
                         preferred_element_type=jnp.float32)


def _shrink_kernel(tile_ref, id_ref, lo_ref, hi_ref, nrb_ref, rank_ref, first_ref, table_ref,
                   x_ref, w_ref, o_ref, acc_ref, *, bt, br, nd, nr, w_rank_dim):
  del id_ref, table_ref
  v, d, r = pl.program_id(0), pl.program_id(1), pl.program_id(2)

  # 1. A tile's first visit starts its accumulator.
  @pl.when((first_ref[v] == 1) & (d == 0) & (r == 0))
  def _():
    acc_ref[...] = jnp.zeros_like(acc_ref)

  # 2. Live rank blocks only: h[rows, r-block] += x[rows, d-block] @ W[d-block, r-block].
  @pl.when(r < nrb_ref[v])
  def _():
    prod = _dot(x_ref[...], w_ref[...], w_rank_dim ^ 1)  # [bt, br]
    keep = _row_mask(tile_ref[v], lo_ref[v], hi_ref[v], prod.shape, bt)
    cols = r * br + lax.broadcasted_iota(jnp.int32, prod.shape, 1)
    keep = keep & (cols < rank_ref[v])
    acc_ref[r] += jnp.where(keep, prod, 0.0)

  # 3. Each visit leaves the tile's h complete so far; the block is written back on tile change.
  @pl.when((d == nd - 1) & (r == nr - 1))
  def _():
    o_ref[...] = acc_ref[...].astype(o_ref.dtype)


def _expand_kernel(tile_ref, id_ref, lo_ref, hi_ref, nrb_ref, rank_ref, first_ref, table_ref,
                   y_ref, h_ref, w_ref, o_ref, acc_ref, *, bt, br, nr, w_rank_dim):
  del id_ref, table_ref
  v, r = pl.program_id(1), pl.program_id(2)

  # 1. A tile's first visit loads y into the accumulator.
  @pl.when((first_ref[v] == 1) & (r == 0))
  def _():
    acc_ref[...] = y_ref[...].astype(jnp.float32)

  # 2. Live rank blocks only: y[rows] += h[rows, r-block] @ W[r-block, o-block]. Rank slots past
  #    the adapter's rank are selected away in both factors (a page's tail may hold anything).
  @pl.when(r < nrb_ref[v])
  def _():
    hb = h_ref[r]  # [bt, br]
    keep = _row_mask(tile_ref[v], lo_ref[v], hi_ref[v], hb.shape, bt)
    cols = r * br + lax.broadcasted_iota(jnp.int32, hb.shape, 1)
    hb = jnp.where(keep & (cols < rank_ref[v]), hb, 0)
    wb = w_ref[...]
    slots = r * br + lax.broadcasted_iota(jnp.int32, wb.shape, w_rank_dim)
    wb = jnp.where(slots < rank_ref[v], wb, 0)
    prod = _dot(hb, wb, w_rank_dim)  # [bt, bo]
    # Rows outside the visit add exactly zero, even when the live weights hold inf or NaN.
    acc_ref[...] += jnp.where(_row_mask(tile_ref[v], lo_ref[v], hi_ref[v], prod.shape, bt),
                              prod, 0.0)

  # 3. Write the tile as it stands after this visit.
  @pl.when(r == nr - 1)
  def _():
    o_ref[...] = acc_ref[...].astype(o_ref.dtype)


@functools.partial(jax.jit, static_argnames=("rank_axis", "block_t", "interpret"))
def shrink(x: jax.Array, w: jax.Array, table, ranks: jax.Array, plan: Plan, *, rank_axis: int,
           block_t: int = 16, interpret: bool = False) -> jax.Array:
  """h = x @ W[id] on grouped rows: [T, F] -> [T, R] float32 (same contract as `xla.shrink`).

  Args:
    x: [T, F] grouped rows.
    w: dense [N, F, R] (rank_axis=2) or [N, R, F] (rank_axis=1), or pool [P, page_rows, F].
    table: None, or [N, max_pages] page table of the pool.
    ranks: [N] int32 live ranks.
    plan: visit plan made with `block_t`.
    rank_axis: rank axis of a dense `w` (1 for a pool).
    block_t: rows per tile (a multiple of 16).
    interpret: run in the Pallas interpreter (CPU tests).

  Returns:
    [T, R] float32.

  References:
    S-LoRA (Sheng et al., 2023), Sec. 5.1: shrink (MBGMM/MBGMV).
  """
  num_rows, feature = x.shape
  _validate_args("sgmv_tpu.shrink", x, w, table, rank_axis, feature)
  bt = min(block_t, num_rows)
  br, nr = _rank_block(w, table, rank_axis)
  bd = _feature_block(feature)
  nd = feature // bd
  scalars = _scalars(plan, ranks, table, num_rows, block_t, br, w.shape[0])
  num_v = plan.lo.shape[0]
  max_pages = 1 if table is None else table.shape[1]

  def x_map(v, d, r, tile, aid, lo, hi, nrb, rank, first, pages):
    del r, aid, lo, hi, nrb, rank, first, pages
    return tile[v], d

  if table is not None:
    w_spec = pl.BlockSpec(
        (None, br, bd),
        lambda v, d, r, tile, aid, lo, hi, nrb, rank, first, pages: (
            pages[aid[v] * max_pages + _live_block(r, nrb[v])], 0, d))
    w_rank_dim = 0
  elif rank_axis == 2:
    w_spec = pl.BlockSpec(
        (None, bd, br),
        lambda v, d, r, tile, aid, lo, hi, nrb, rank, first, pages: (
            aid[v], d, _live_block(r, nrb[v])))
    w_rank_dim = 1
  else:
    w_spec = pl.BlockSpec(
        (None, br, bd),
        lambda v, d, r, tile, aid, lo, hi, nrb, rank, first, pages: (
            aid[v], _live_block(r, nrb[v]), d))
    w_rank_dim = 0

  def o_map(v, d, r, tile, aid, lo, hi, nrb, rank, first, pages):
    del d, r, aid, lo, hi, nrb, rank, first, pages
    return 0, tile[v], 0

  kernel = functools.partial(_shrink_kernel, bt=bt, br=br, nd=nd, nr=nr, w_rank_dim=w_rank_dim)
  h3 = pl.pallas_call(
      kernel,
      out_shape=jax.ShapeDtypeStruct((nr, num_rows, br), jnp.float32),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=len(scalars),
          grid=(num_v, nd, nr),
          in_specs=[pl.BlockSpec((bt, bd), x_map), w_spec],
          out_specs=pl.BlockSpec((nr, bt, br), o_map),
          scratch_shapes=[pltpu.VMEM((nr, bt, br), jnp.float32)]),
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("arbitrary", "arbitrary", "arbitrary")),
      interpret=interpret,
      name="lora_sgmv_shrink",
  )(*scalars, x, w)
  return h3.transpose(1, 0, 2).reshape(num_rows, nr * br)


@functools.partial(jax.jit, static_argnames=("rank_axis", "block_t", "interpret"))
def expand(y: jax.Array, h: jax.Array, w: jax.Array, table, ranks: jax.Array, plan: Plan, *,
           rank_axis: int, block_t: int = 16, interpret: bool = False) -> jax.Array:
  """y + h @ W[id] on grouped rows: [T, R] -> [T, F] in y's dtype (same contract as `xla.expand`).

  Args:
    y: [T, F] grouped rows of the base output (aliased to the result).
    h: [T, R] activations, already scaled.
    w: dense [N, R, F] (rank_axis=1) or [N, F, R] (rank_axis=2), or pool [P, page_rows, F].
    table, ranks, plan, rank_axis, block_t, interpret: as in `shrink`.

  Returns:
    [T, F] in y's dtype.

  References:
    S-LoRA (Sheng et al., 2023), Sec. 5.1: expand (MBGMM/MBGMV).
  """
  num_rows, feature = y.shape
  _validate_args("sgmv_tpu.expand", y, w, table, rank_axis, feature)
  bt = min(block_t, num_rows)
  br, nr = _rank_block(w, table, rank_axis)
  if h.shape != (num_rows, br * nr):
    raise ValueError(f"sgmv_tpu.expand: expected h of shape {(num_rows, br * nr)}, found {h.shape}")
  bo = _feature_block(feature)
  scalars = _scalars(plan, ranks, table, num_rows, block_t, br, w.shape[0])
  num_v = plan.lo.shape[0]
  max_pages = 1 if table is None else table.shape[1]
  h3 = h.reshape(num_rows, nr, br).transpose(1, 0, 2)

  def y_map(o, v, r, tile, aid, lo, hi, nrb, rank, first, pages):
    del r, aid, lo, hi, nrb, rank, first, pages
    return tile[v], o

  def h_map(o, v, r, tile, aid, lo, hi, nrb, rank, first, pages):
    del o, r, aid, lo, hi, nrb, rank, first, pages
    return 0, tile[v], 0

  if table is not None:
    w_spec = pl.BlockSpec(
        (None, br, bo),
        lambda o, v, r, tile, aid, lo, hi, nrb, rank, first, pages: (
            pages[aid[v] * max_pages + _live_block(r, nrb[v])], 0, o))
    w_rank_dim = 0
  elif rank_axis == 1:
    w_spec = pl.BlockSpec(
        (None, br, bo),
        lambda o, v, r, tile, aid, lo, hi, nrb, rank, first, pages: (
            aid[v], _live_block(r, nrb[v]), o))
    w_rank_dim = 0
  else:
    w_spec = pl.BlockSpec(
        (None, bo, br),
        lambda o, v, r, tile, aid, lo, hi, nrb, rank, first, pages: (
            aid[v], o, _live_block(r, nrb[v])))
    w_rank_dim = 1

  kernel = functools.partial(_expand_kernel, bt=bt, br=br, nr=nr, w_rank_dim=w_rank_dim)
  return pl.pallas_call(
      kernel,
      out_shape=jax.ShapeDtypeStruct(y.shape, y.dtype),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=len(scalars),
          grid=(feature // bo, num_v, nr),
          in_specs=[pl.BlockSpec((bt, bo), y_map), pl.BlockSpec((nr, bt, br), h_map), w_spec],
          out_specs=pl.BlockSpec((bt, bo), y_map),
          scratch_shapes=[pltpu.VMEM((bt, bo), jnp.float32)]),
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "arbitrary", "arbitrary")),
      input_output_aliases={len(scalars): 0},
      interpret=interpret,
      name="lora_sgmv_expand",
  )(*scalars, y, h3, w)
