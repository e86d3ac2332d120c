"""The visit plan shared by every segmented-gather implementation.

Rows arrive grouped: runs of consecutive rows share one adapter id (the SGMV layout; a per-row
BGMV batch is sorted into it). Rows are cut into tiles of `block_t`. A *visit* is one run inside one
tile: the unit of work of every kernel (one tile of x against one adapter's weights, rows outside
[lo, hi) masked). Visits of one tile are consecutive and cover disjoint rows, so a kernel can keep
the tile's output resident across them. There are at most `ceil(T / block_t) + runs - 1` visits;
the plan is padded to that static length with empty visits on the last tile.

References:
  S-LoRA (Sheng et al., 2023), Sec. 5.1: the heterogeneous batch as segments of one adapter each.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp


class Plan(NamedTuple):
  """Visits of a grouped batch; all fields are int32 arrays of shape [V] except `count`.

  Attributes:
    lo: first row of the visit (T for padding visits).
    hi: one past its last row.
    ids: adapter id (-1: no adapter or padding).
    tile: tile index (`lo // block_t`; the last tile for padding).
    count: [] number of real visits.
  """
  lo: jax.Array
  hi: jax.Array
  ids: jax.Array
  tile: jax.Array
  count: jax.Array


def num_visits(num_rows: int, block_t: int, max_runs: int) -> int:
  """Static upper bound on the visits of `num_rows` rows holding at most `max_runs` runs."""
  num_tiles = -(-num_rows // block_t)
  return num_tiles + max(1, min(max_runs, num_rows)) - 1


def make_plan(row_ids: jax.Array, block_t: int, max_runs: int) -> Plan:
  """Builds the visit plan of grouped rows.

  Args:
    row_ids: [T] int adapter id per row, grouped (equal ids adjacent within a run); < 0: none.
    block_t: rows per tile.
    max_runs: static bound on the number of runs of equal ids (too small drops visits).

  Returns:
    The Plan, padded to `num_visits(T, block_t, max_runs)` visits.
  """
  num_rows = row_ids.shape[0]
  v = num_visits(num_rows, block_t, max_runs)
  row_ids = jnp.where(row_ids < 0, -1, row_ids).astype(jnp.int32)
  i = jnp.arange(num_rows, dtype=jnp.int32)
  starts = (i % block_t == 0) | (row_ids != jnp.roll(row_ids, 1))
  lo = jnp.nonzero(starts, size=v, fill_value=num_rows)[0].astype(jnp.int32)
  real = lo < num_rows
  hi = jnp.concatenate([lo[1:], jnp.full((1,), num_rows, jnp.int32)])
  hi = jnp.where(real, hi, num_rows)
  last_tile = (num_rows - 1) // block_t
  tile = jnp.where(real, lo // block_t, last_tile).astype(jnp.int32)
  ids = jnp.where(real, row_ids[jnp.minimum(lo, num_rows - 1)], -1)
  return Plan(lo=lo, hi=hi, ids=ids, tile=tile, count=jnp.sum(starts, dtype=jnp.int32))


def group_rows(ids: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Sorts a per-row (BGMV) batch into runs.

  Args:
    ids: [T] adapter id per row (< 0: none).

  Returns:
    (order, inverse, sorted_ids): `x[order]` is grouped, `h_sorted[inverse]` undoes it.
  """
  ids = jnp.where(ids < 0, -1, ids).astype(jnp.int32)
  order = jnp.argsort(ids, stable=True)
  inverse = jnp.zeros_like(order).at[order].set(jnp.arange(ids.shape[0], dtype=order.dtype))
  return order, inverse, ids[order]


@functools.partial(jax.tree_util.register_dataclass, data_fields=["plan", "perm", "order",
                                                                   "inverse"],
                   meta_fields=["impl", "rows"])
@dataclasses.dataclass(frozen=True)
class Grouping:
  """A batch's routing turned into what the kernels run on, built once per forward.

  Every shrink and expand of one forward that sees the same rows with the same adapter ids can
  share it (as megablox's `gmm` takes precomputed group metadata), instead of sorting the rows
  and building the plan again in every projection. `ops.make_grouping` builds it.

  Attributes:
    plan: the visit plan of the grouped rows.
    perm: [T] int32 permutation the XLA path reads rows through, or None.
    order, inverse: [T] sort and unsort of the rows for the Pallas paths, or None (rows already
      grouped, or the XLA path).
    impl: the implementation it was built for (`ops.resolve_backend`'s answer); its tile size
      and row handling differ per implementation.
    rows: T, the number of rows it routes.
  """
  plan: Plan
  perm: Optional[jax.Array]
  order: Optional[jax.Array]
  inverse: Optional[jax.Array]
  impl: str
  rows: int
