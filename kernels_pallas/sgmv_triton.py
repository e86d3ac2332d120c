"""Segmented-gather LoRA matmul for GPU (Pallas Triton backend): shrink and expand.

Same visit plan and contract as `sgmv_tpu`, shaped for the GPU's model: programs run in parallel
with no revisit order, so each program owns one (visit, output block) and stores only its visit's
rows with a masked store. Visits of one tile cover disjoint rows, so no two programs write one
element; rows that no live visit touches keep the aliased input (zeros for h, y for the expand).
Per-visit scalars and the page table are read from global memory inside the kernel and used as
pointer offsets (Triton has no scalar prefetch). Triton wants power-of-two blocks of at least 16,
so ragged edges (T, features, ranks, a page shorter than 16 rows) are handled with masked loads.

Ranks: shrink programs of rank blocks past the adapter's rank exit at once; the expand's loop over
rank blocks runs `ceil(rank / block)` times, so padding costs at most one block.

References:
  S-LoRA (Sheng et al., 2023), Sec. 5.1 (MBGMM/MBGMV), Sec. 4.1 (weights in the unified pool).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from kernels_pallas.plan import Plan

# Block sizes, one table (Triton: powers of two, >= 16 for tl.dot).
_BLOCK_FEATURE = 64
_BLOCK_RANK_MAX = 64
_NUM_WARPS = 4
_NUM_STAGES = 2


def _pow2(n: int, lo: int = 16) -> int:
  return max(lo, 1 << max(0, (n - 1).bit_length()))


def _rank_blocks(w: jax.Array, table, rank_axis: int) -> tuple[int, int, int]:
  """(step, width, count): rank block k covers slots [k*step, k*step+step), loaded `width` wide."""
  if table is not None:
    page_rows = w.shape[1]
    return page_rows, _pow2(page_rows), table.shape[1]
  r = w.shape[rank_axis]
  width = min(_pow2(r), _BLOCK_RANK_MAX)
  return width, width, -(-r // width)


def _dot(a, b):
  ct = jnp.promote_types(a.dtype, b.dtype)
  precision = lax.Precision.HIGHEST if ct == jnp.float32 else None
  return jnp.dot(a.astype(ct), b.astype(ct), precision=precision,
                 preferred_element_type=jnp.float32)


def _weight_block(w_ref, table_ref, aid, k, f0, *, paged, rank_axis, step, width, bf, max_pages,
                  rank, num_features):
  """W's block of rank block k and features [f0, f0+bf), as [width, bf] (rank-major)."""
  slots = k * step + jnp.arange(width)
  slot_ok = (jnp.arange(width) < step) & (slots < rank)
  feats = f0 + jnp.arange(bf)
  feat_ok = feats < num_features
  if paged:
    page = table_ref[aid * max_pages + k]
    return plgpu.load(w_ref.at[page, pl.ds(0, width), pl.ds(f0, bf)],
                      mask=slot_ok[:, None] & feat_ok[None, :], other=0)
  if rank_axis == 1:
    return plgpu.load(w_ref.at[aid, pl.ds(k * step, width), pl.ds(f0, bf)],
                      mask=slot_ok[:, None] & feat_ok[None, :], other=0)
  return plgpu.load(w_ref.at[aid, pl.ds(f0, bf), pl.ds(k * step, width)],
                    mask=feat_ok[:, None] & slot_ok[None, :], other=0).T


def _shrink_kernel(tile_ref, id_ref, lo_ref, hi_ref, rank_ref, table_ref, x_ref, w_ref, z_ref,
                   o_ref, *, bt, bf, nf, step, width, paged, rank_axis, max_pages, num_features,
                   r_total):
  del z_ref  # Aliased to o_ref: h starts at zero.
  v, k = pl.program_id(0), pl.program_id(1)
  aid, rank = id_ref[v], rank_ref[v]

  @pl.when((aid >= 0) & (k * step < rank))
  def _():
    # 1. This visit's rows of the tile.
    r0 = tile_ref[v] * bt
    rows = r0 + jnp.arange(bt)
    row_ok = (rows >= lo_ref[v]) & (rows < hi_ref[v])

    # 2. acc = x[rows] @ W[:, rank block k], feature block by feature block.
    def body(f, acc):
      f0 = f * bf
      feat_ok = (f0 + jnp.arange(bf)) < num_features
      xb = plgpu.load(x_ref.at[pl.ds(r0, bt), pl.ds(f0, bf)],
                      mask=row_ok[:, None] & feat_ok[None, :], other=0)
      wb = _weight_block(w_ref, table_ref, aid, k, f0, paged=paged, rank_axis=rank_axis,
                         step=step, width=width, bf=bf, max_pages=max_pages, rank=rank,
                         num_features=num_features)
      return acc + _dot(xb, wb.T)

    acc = lax.fori_loop(0, nf, body, jnp.zeros((bt, width), jnp.float32))

    # 3. Store the visit's rows of this rank block.
    cols = k * step + jnp.arange(width)
    col_ok = (jnp.arange(width) < step) & (cols < r_total)
    plgpu.store(o_ref.at[pl.ds(r0, bt), pl.ds(k * step, width)], acc.astype(o_ref.dtype),
                mask=row_ok[:, None] & col_ok[None, :])


def _expand_kernel(tile_ref, id_ref, lo_ref, hi_ref, rank_ref, table_ref, y_ref, h_ref, w_ref,
                   o_ref, *, bt, bf, step, width, paged, rank_axis, max_pages, num_features,
                   r_total):
  v, o = pl.program_id(0), pl.program_id(1)
  aid, rank = id_ref[v], rank_ref[v]

  @pl.when(aid >= 0)
  def _():
    # 1. This visit's rows and this program's output columns.
    r0, f0 = tile_ref[v] * bt, o * bf
    rows = r0 + jnp.arange(bt)
    row_ok = (rows >= lo_ref[v]) & (rows < hi_ref[v])
    feat_ok = (f0 + jnp.arange(bf)) < num_features
    ok = row_ok[:, None] & feat_ok[None, :]

    # 2. acc = h[rows] @ W[:, cols] over the live rank blocks only.
    def body(k, acc):
      slots = k * step + jnp.arange(width)
      slot_ok = (jnp.arange(width) < step) & (slots < rank) & (slots < r_total)
      hb = plgpu.load(h_ref.at[pl.ds(r0, bt), pl.ds(k * step, width)],
                      mask=row_ok[:, None] & slot_ok[None, :], other=0)
      wb = _weight_block(w_ref, table_ref, aid, k, f0, paged=paged, rank_axis=rank_axis,
                         step=step, width=width, bf=bf, max_pages=max_pages, rank=rank,
                         num_features=num_features)
      return acc + _dot(hb, wb)

    acc = lax.fori_loop(0, (rank + step - 1) // step, body, jnp.zeros((bt, bf), jnp.float32))

    # 3. y[rows, cols] += acc on this visit's rows.
    yb = plgpu.load(y_ref.at[pl.ds(r0, bt), pl.ds(f0, bf)], mask=ok, other=0)
    plgpu.store(o_ref.at[pl.ds(r0, bt), pl.ds(f0, bf)],
                (yb.astype(jnp.float32) + acc).astype(o_ref.dtype), mask=ok)


def _scalars(plan: Plan, ranks: jax.Array, table, num_pages: int):
  """Per-visit tile, id, lo, hi, rank, and the page table clamped into the pool [0, num_pages)."""
  live = plan.ids >= 0
  rank = jnp.where(live, ranks[jnp.maximum(plan.ids, 0)], 0)
  pages = (jnp.zeros((1,), jnp.int32) if table is None
           else jnp.clip(table.reshape(-1), 0, num_pages - 1).astype(jnp.int32))
  return plan.tile, plan.ids, plan.lo, plan.hi, rank, pages


def _params():
  return plgpu.CompilerParams(num_warps=_NUM_WARPS, num_stages=_NUM_STAGES)


@functools.partial(jax.jit, static_argnames=("rank_axis", "block_t", "interpret"))
def shrink(x: jax.Array, w: jax.Array, table, ranks: jax.Array, plan: Plan, *, rank_axis: int,
           block_t: int = 16, interpret: bool = False) -> jax.Array:
  """h = x @ W[id] on grouped rows: [T, F] -> [T, R] float32 (contract of `xla.shrink`).

  Args:
    x: [T, F] grouped rows.
    w: dense [N, F, R] (rank_axis=2) or [N, R, F] (rank_axis=1), or pool [P, page_rows, F].
    table: None, or [N, max_pages] page table.
    ranks: [N] int32 live ranks.
    plan: visit plan made with `block_t` (a power of two >= 16).
    rank_axis: rank axis of a dense `w`.
    interpret: run in the Pallas interpreter (CPU tests).

  Returns:
    [T, R] float32.

  References:
    S-LoRA (Sheng et al., 2023), Sec. 5.1: shrink (MBGMM/MBGMV).
  """
  num_rows, feature = x.shape
  step, width, nk = _rank_blocks(w, table, rank_axis)
  r_total = step * nk if table is not None else w.shape[rank_axis]
  bf = min(_BLOCK_FEATURE, _pow2(feature))
  kernel = functools.partial(
      _shrink_kernel, bt=block_t, bf=bf, nf=-(-feature // bf), step=step, width=width,
      paged=table is not None, rank_axis=rank_axis,
      max_pages=1 if table is None else table.shape[1], num_features=feature, r_total=r_total)
  scalars = _scalars(plan, ranks, table, w.shape[0])
  zeros = jnp.zeros((num_rows, r_total), jnp.float32)
  return pl.pallas_call(
      kernel,
      out_shape=jax.ShapeDtypeStruct(zeros.shape, zeros.dtype),
      grid=(plan.lo.shape[0], nk),
      input_output_aliases={len(scalars) + 2: 0},
      compiler_params=_params(),
      interpret=interpret,
      name="lora_sgmv_shrink_triton",
  )(*scalars, x, w, zeros)


@functools.partial(jax.jit, static_argnames=("rank_axis", "block_t", "interpret"))
def expand(y: jax.Array, h: jax.Array, w: jax.Array, table, ranks: jax.Array, plan: Plan, *,
           rank_axis: int, block_t: int = 16, interpret: bool = False) -> jax.Array:
  """y + h @ W[id] on grouped rows: [T, R] -> [T, F] in y's dtype (contract of `xla.expand`).

  Args:
    y: [T, F] grouped base output (aliased to the result).
    h: [T, R] activations, already scaled.
    w: dense [N, R, F] (rank_axis=1) or [N, F, R] (rank_axis=2), or pool [P, page_rows, F].
    table, ranks, plan, rank_axis, block_t, interpret: as in `shrink`.

  Returns:
    [T, F] in y's dtype.

  References:
    S-LoRA (Sheng et al., 2023), Sec. 5.1: expand (MBGMM/MBGMV).
  """
  num_rows, feature = y.shape
  step, width, nk = _rank_blocks(w, table, rank_axis)
  if h.shape[0] != num_rows:
    raise ValueError(f"sgmv_triton.expand: expected h of shape [{num_rows}, R], found {h.shape}")
  bf = min(_BLOCK_FEATURE, _pow2(feature))
  kernel = functools.partial(
      _expand_kernel, bt=block_t, bf=bf, step=step, width=width, paged=table is not None,
      rank_axis=rank_axis, max_pages=1 if table is None else table.shape[1],
      num_features=feature, r_total=h.shape[1])
  scalars = _scalars(plan, ranks, table, w.shape[0])
  del nk
  return pl.pallas_call(
      kernel,
      out_shape=jax.ShapeDtypeStruct(y.shape, y.dtype),
      grid=(plan.lo.shape[0], -(-feature // bf)),
      input_output_aliases={len(scalars): 0},
      compiler_params=_params(),
      interpret=interpret,
      name="lora_sgmv_expand_triton",
  )(*scalars, y, h, w)
