"""Random LoRA-kernel cases for the kernels_pallas tests (numbers checked against `reference`).

Shapes come from a short fixed table so that hypothesis varies the data (ids, ranks, segments,
values) without recompiling the interpreted kernels for every example.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from kernels_pallas import PagedWeights

# (name, T, D, O, N, R, dtype, page_rows or None)
CONFIGS = {
    "one_token": (1, 32, 48, 3, 8, jnp.float32, None),
    "ragged_T_ranks_1_128": (37, 32, 48, 4, 128, jnp.float32, None),
    "two_rank_blocks": (21, 64, 32, 3, 256, jnp.float32, None),
    "bf16": (40, 32, 48, 5, 16, jnp.bfloat16, None),
    "paged_f32": (19, 32, 48, 4, 32, jnp.float32, 8),
    "paged_bf16_unified": (24, 32, 32, 3, 12, jnp.bfloat16, 4),
    "paged_slora_rows": (9, 16, 16, 3, 3, jnp.float32, 1),
}


@jax.tree_util.register_dataclass  # a pytree: a case passes into jit as traced arguments
@dataclasses.dataclass
class Case:
  x: jnp.ndarray
  y: jnp.ndarray
  a: object  # [N, D, R] or PagedWeights
  b: object  # [N, R, O] or PagedWeights
  h: jnp.ndarray  # [T, R] an input for expand alone
  scales: jnp.ndarray
  ids: jnp.ndarray
  ranks: jnp.ndarray | None
  seg_ids: jnp.ndarray
  seg_lens: jnp.ndarray
  topk_ids: jnp.ndarray
  gates: jnp.ndarray


def make_case(name: str, seed: int, *, garbage: float = np.nan, with_ranks: bool = True,
              ids_kind: str | None = None) -> Case:
  """A random case; weight slots past an adapter's rank hold `garbage` (NaN: must be ignored).

  Without `with_ranks`, `ranks` is None and every adapter has rank R (dense padding is zero).
  """
  t, d, o, n, r, dtype, page_rows = CONFIGS[name]
  rng = np.random.default_rng(seed)
  ranks = rng.integers(1, r + 1, n) if with_ranks else np.full(n, r)
  if with_ranks and r >= 128:  # Mixed ranks that span 1..R in one batch.
    ranks[:2] = (1, r)
  live = np.arange(r)[None, :] < ranks[:, None]  # [N, R]

  def fill(w, mask):
    if garbage is not None and np.isnan(garbage):
      return np.where(mask, w, np.nan)
    return np.where(mask, w, rng.standard_normal(w.shape) * (garbage or 0.0))

  a = fill(rng.standard_normal((n, d, r)) / np.sqrt(d), live[:, None, :])
  b = fill(rng.standard_normal((n, r, o)) / np.sqrt(r), live[:, :, None])
  if page_rows is not None:
    pad = np.nan if garbage is None or np.isnan(garbage) else garbage
    a = _paginate(rng, a.transpose(0, 2, 1), page_rows, pad)
    b = _paginate(rng, b, page_rows, pad)
  else:
    a, b = jnp.asarray(a, dtype), jnp.asarray(b, dtype)
    if not with_ranks:  # The documented dense layout: rank padding is zero.
      a, b = jnp.nan_to_num(a), jnp.nan_to_num(b)
  if page_rows is not None:
    a = PagedWeights(jnp.asarray(a.pool, dtype), a.table)
    b = PagedWeights(jnp.asarray(b.pool, dtype), b.table)

  ids_kind = ids_kind or rng.choice(["random", "random", "none", "same"])
  ids = {"random": rng.integers(-1, n, t), "none": np.full(t, -1),
         "same": np.full(t, rng.integers(0, n))}[ids_kind]
  num_seg = 5
  cuts = np.sort(rng.integers(0, t + 1, num_seg))  # Empty segments happen; a tail may remain.
  seg_lens = np.diff(np.concatenate([[0], cuts]))
  seg_ids = rng.integers(-1, n, num_seg)
  k = 2
  topk_ids = np.stack([rng.integers(-1, n, t) for _ in range(k)], 1)
  return Case(
      x=jnp.asarray(rng.standard_normal((t, d)), dtype),
      y=jnp.asarray(rng.standard_normal((t, o)), dtype),
      a=a, b=b,
      h=jnp.asarray(rng.standard_normal((t, r if page_rows is None else b.max_rank)), dtype),
      scales=jnp.asarray(rng.uniform(0.2, 2.0, n), jnp.float32),
      ids=jnp.asarray(ids, jnp.int32),
      ranks=jnp.asarray(ranks, jnp.int32) if with_ranks else None,
      seg_ids=jnp.asarray(seg_ids, jnp.int32), seg_lens=jnp.asarray(seg_lens, jnp.int32),
      topk_ids=jnp.asarray(topk_ids, jnp.int32),
      gates=jnp.asarray(rng.uniform(0, 1, (t, k)), jnp.float32))


def _paginate(rng, rows: np.ndarray, page_rows: int, pad: float) -> PagedWeights:
  """[N, R, H] rank-major rows -> a shuffled pool of pages (spare pages hold garbage) + table."""
  n, r, hdim = rows.shape
  pages = -(-r // page_rows)
  def junk(shape):
    return np.full(shape, np.nan) if np.isnan(pad) else rng.standard_normal(shape) * pad

  padded = junk((n, pages * page_rows, hdim))
  padded[:, :r] = rows
  num_pool = n * pages + 3
  perm = rng.permutation(num_pool)
  pool = junk((num_pool, page_rows, hdim))
  table = perm[:n * pages].reshape(n, pages)
  pool[table.reshape(-1)] = padded.reshape(n * pages, page_rows, hdim)
  return PagedWeights(pool, jnp.asarray(table, jnp.int32))


def assert_close(got, want, dtype) -> None:
  got = np.asarray(jnp.asarray(got, jnp.float32))
  want = np.asarray(jnp.asarray(want, jnp.float32))
  assert got.shape == want.shape, (got.shape, want.shape)
  scale = max(1.0, float(np.max(np.abs(want))) if want.size else 1.0)
  tol = 2e-2 if dtype == jnp.bfloat16 else 2e-5
  np.testing.assert_allclose(got, want, rtol=tol, atol=tol * scale)
