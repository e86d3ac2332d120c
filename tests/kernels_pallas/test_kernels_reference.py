"""The jnp specification itself, against per-row numpy loops, plus the visit plan's invariants."""
import hypothesis
import hypothesis.strategies as st
import jax.numpy as jnp
import numpy as np
import pytest

from kernels_pallas import PagedWeights, plan, reference

import _kernel_cases as cases


def _loop_lora(x, y, a, b, scales, ids, ranks):
  """y[t] + scale * (x[t] @ A[:, :rank]) @ B[:rank] by a python loop over rows (float64)."""
  out = np.array(y, np.float64)
  for t, i in enumerate(np.asarray(ids)):
    if i < 0:
      continue
    r = int(ranks[i])
    out[t] += scales[i] * (np.asarray(x[t], np.float64) @ a[i][:, :r]) @ b[i][:r]
  return out


@hypothesis.settings(max_examples=8, deadline=None)
@hypothesis.given(name=st.sampled_from(["ragged_T_ranks_1_128", "paged_f32", "paged_slora_rows"]),
                  seed=st.integers(0, 2**16))
def test_reference_matches_row_loop(name, seed):
  c = cases.make_case(name, seed)
  a = np.asarray(reference.dense_a(c.a), np.float64)
  b = np.asarray(reference.dense_b(c.b), np.float64)
  n, _, r = a.shape
  ranks = np.full(n, r) if c.ranks is None else np.asarray(c.ranks)
  h = reference.lora_shrink(c.x, c.a, c.ids, ranks=c.ranks)
  got = reference.lora_expand(c.y, h, c.b, c.ids, c.scales, ranks=c.ranks)
  want = _loop_lora(c.x, c.y, np.nan_to_num(a), np.nan_to_num(b), np.asarray(c.scales), c.ids,
                    ranks)
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-4)
  assert np.all(np.asarray(h)[np.asarray(c.ids) < 0] == 0)


def test_segment_row_ids():
  ids = reference.segment_row_ids(jnp.array([3, -1, 0, 2]), jnp.array([2, 1, 0, 3]), 8)
  np.testing.assert_array_equal(ids, [3, 3, -1, 2, 2, 2, -1, -1])


def test_paged_weights_gather_pages():
  pool = jnp.arange(5 * 2 * 3, dtype=jnp.float32).reshape(5, 2, 3)  # 5 pages of 2 rows, H=3
  pw = PagedWeights(pool, jnp.array([[4, 1], [0, 2]]))
  b = reference.dense_b(pw)
  np.testing.assert_array_equal(b[0], np.concatenate([pool[4], pool[1]]))
  np.testing.assert_array_equal(reference.dense_a(pw)[1], np.concatenate([pool[0], pool[2]]).T)


def test_validation_names_shapes():
  x = jnp.zeros((4, 8))
  with pytest.raises(ValueError, match=r"\[T, D\]=\[.., 8\] but A's feature size is 6"):
    reference.lora_shrink(x, jnp.zeros((2, 6, 4)), jnp.zeros(4, jnp.int32))
  with pytest.raises(ValueError, match=r"ids of shape \[T\]=\[4\], found \(3,\)"):
    reference.lora_shrink(x, jnp.zeros((2, 8, 4)), jnp.zeros(3, jnp.int32))
  with pytest.raises(ValueError, match=r"ranks of shape \[N\]=\[2\], found \(3,\)"):
    reference.lora_shrink(x, jnp.zeros((2, 8, 4)), jnp.zeros(4, jnp.int32), ranks=jnp.ones(3))


@hypothesis.settings(max_examples=30, deadline=None)
@hypothesis.given(ids=st.lists(st.integers(-2, 5), min_size=23, max_size=23),
                  block_t=st.sampled_from([1, 8]))
def test_plan_visits_cover_every_row_once(ids, block_t):
  order, inverse, sorted_ids = plan.group_rows(jnp.array(ids))
  np.testing.assert_array_equal(np.asarray(order)[np.asarray(inverse)], np.arange(len(ids)))
  p = plan.make_plan(sorted_ids, block_t, max_runs=min(len(ids), 7))
  lo, hi, vid, tile = map(np.asarray, (p.lo, p.hi, p.ids, p.tile))
  count = int(p.count)
  assert count <= len(lo) == plan.num_visits(len(ids), block_t, 7)
  covered = np.zeros(len(ids), int)
  for v in range(count):
    assert lo[v] < hi[v] and lo[v] // block_t == tile[v] == (hi[v] - 1) // block_t
    covered[lo[v]:hi[v]] += 1
    assert np.all(np.asarray(sorted_ids)[lo[v]:hi[v]] == vid[v])
  np.testing.assert_array_equal(covered, 1)
  assert np.all(lo[count:] == len(ids)) and np.all(vid[count:] == -1)
