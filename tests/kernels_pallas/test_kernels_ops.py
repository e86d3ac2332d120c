"""kernels_pallas.ops on every path (XLA loop, interpreted TPU and Triton kernels) vs the reference.

Forward cases put NaN in every weight slot past an adapter's rank (padding, a page's tail, spare
pages): the kernels must ignore them as the specification does.
"""
import functools

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kernels_pallas as kp
from kernels_pallas import reference

import _kernel_cases as cases

SETTINGS = hypothesis.settings(max_examples=4, deadline=None,
                               suppress_health_check=[hypothesis.HealthCheck.too_slow,
                                                      hypothesis.HealthCheck.function_scoped_fixture])


def _check_bgmv(c, dtype):
  h = kp.lora_shrink(c.x, c.a, c.ids, ranks=c.ranks)
  cases.assert_close(h, reference.lora_shrink(c.x, c.a, c.ids, ranks=c.ranks), dtype)
  assert h.dtype == c.x.dtype
  got = kp.lora_expand(c.y, c.h, c.b, c.ids, c.scales, ranks=c.ranks)
  cases.assert_close(got, reference.lora_expand(c.y, c.h, c.b, c.ids, c.scales, ranks=c.ranks),
                     dtype)
  assert got.dtype == c.y.dtype


def _check_sgmv(c, dtype):
  args = (c.seg_ids, c.seg_lens)
  cases.assert_close(kp.sgmv_shrink(c.x, c.a, *args, ranks=c.ranks),
                     reference.sgmv_shrink(c.x, c.a, *args, ranks=c.ranks), dtype)
  cases.assert_close(kp.sgmv_expand(c.y, c.h, c.b, *args, c.scales, ranks=c.ranks),
                     reference.sgmv_expand(c.y, c.h, c.b, *args, c.scales, ranks=c.ranks), dtype)


@SETTINGS
@hypothesis.given(data=st.data())
def test_bgmv_dense(backend, data):
  del backend
  name = data.draw(st.sampled_from(["one_token", "ragged_T_ranks_1_128", "two_rank_blocks",
                                    "bf16"]))
  c = cases.make_case(name, data.draw(st.integers(0, 2**16)))
  _check_bgmv(c, cases.CONFIGS[name][5])


@SETTINGS
@hypothesis.given(data=st.data())
def test_sgmv_dense(backend, data):
  del backend
  name = data.draw(st.sampled_from(["one_token", "ragged_T_ranks_1_128", "bf16"]))
  c = cases.make_case(name, data.draw(st.integers(0, 2**16)))
  _check_sgmv(c, cases.CONFIGS[name][5])


@SETTINGS
@hypothesis.given(data=st.data())
def test_paged(backend, data):
  del backend
  name = data.draw(st.sampled_from(["paged_bf16_unified", "paged_slora_rows"]))
  c = cases.make_case(name, data.draw(st.integers(0, 2**16)))
  _check_bgmv(c, cases.CONFIGS[name][5])
  _check_sgmv(c, cases.CONFIGS[name][5])


@SETTINGS
@hypothesis.given(data=st.data())
def test_topk(backend, data):
  del backend
  name = data.draw(st.sampled_from(["ragged_T_ranks_1_128", "bf16", "paged_f32"]))
  c = cases.make_case(name, data.draw(st.integers(0, 2**16)))
  args = (c.y, c.x, c.a, c.b, c.scales, c.topk_ids, c.gates)
  cases.assert_close(kp.lora_topk(*args, ranks=c.ranks),
                     reference.lora_topk(*args, ranks=c.ranks), cases.CONFIGS[name][5])


def test_edge_layouts(backend):
  """All rows without adapter; every row one adapter; no ranks given; all segments empty."""
  del backend
  for kind in ("none", "same"):
    c = cases.make_case("ragged_T_ranks_1_128", 7, ids_kind=kind)
    _check_bgmv(c, jnp.float32)
  _check_bgmv(cases.make_case("ragged_T_ranks_1_128", 9, with_ranks=False), jnp.float32)
  _check_bgmv(cases.make_case("paged_f32", 9, with_ranks=False), jnp.float32)
  c = cases.make_case("ragged_T_ranks_1_128", 8)
  c.seg_lens = jnp.zeros_like(c.seg_lens)
  _check_sgmv(c, jnp.float32)
  np.testing.assert_array_equal(kp.sgmv_shrink(c.x, c.a, c.seg_ids, c.seg_lens), 0)


def _loss(topk, c, weight):
  """A scalar of MeteoRA's output, differentiable in x, A and B (dense stacks or pools), gates."""
  def loss(x, a, b, gates):
    if isinstance(c.a, kp.PagedWeights):  # The page tables are integers: no gradient.
      a, b = kp.PagedWeights(a, c.a.table), kp.PagedWeights(b, c.b.table)
    out = topk(c.y, x, a, b, c.scales, c.topk_ids, gates, ranks=c.ranks)
    return jnp.sum(jnp.sin(out) * weight)
  return loss


@functools.partial(jax.jit, static_argnames=("ops", "backend"))
def _topk_grads(c, weight, primals, *, ops, backend):
  """d/d(x, A, B, gates) of `_loss` with `ops.lora_topk`, jitted so that every example of a
  case's shapes reuses one compile; `backend` is a cache key only (the path is the one in force
  when this traces)."""
  del backend
  return jax.grad(_loss(ops.lora_topk, c, weight), argnums=(0, 1, 2, 3))(*primals)


@hypothesis.settings(max_examples=2, deadline=None,
                     suppress_health_check=[hypothesis.HealthCheck.function_scoped_fixture])
@hypothesis.given(data=st.data())
def test_gradients_match_reference(backend, data):
  """d/dx, d/dA, d/dB (dense stacks or pools) and d/dgates of MeteoRA's top-k form."""
  name = data.draw(st.sampled_from(["ragged_T_ranks_1_128", "paged_f32"]))
  c = cases.make_case(name, data.draw(st.integers(0, 2**16)), garbage=3.0)
  weight = jnp.asarray(np.random.default_rng(0).standard_normal(c.y.shape), jnp.float32)
  a, b = (c.a.pool, c.b.pool) if isinstance(c.a, kp.PagedWeights) else (c.a, c.b)
  primals = (c.x, a, b, c.gates)
  got = _topk_grads(c, weight, primals, ops=kp, backend=backend)
  want = _topk_grads(c, weight, primals, ops=reference, backend=None)
  for g, w in zip(got, want):
    cases.assert_close(g, w, jnp.float32)


def test_sgmv_gradients_match_reference(backend):
  del backend
  c = cases.make_case("ragged_T_ranks_1_128", 3, garbage=3.0)

  def loss(ops, x, a, b):
    h = ops.sgmv_shrink(x, a, c.seg_ids, c.seg_lens, ranks=c.ranks)
    out = ops.sgmv_expand(c.y, h, b, c.seg_ids, c.seg_lens, c.scales, ranks=c.ranks)
    return jnp.sum(jnp.cos(out))

  got = jax.grad(lambda *p: loss(kp, *p), argnums=(0, 1, 2))(c.x, c.a, c.b)
  want = jax.grad(lambda *p: loss(reference, *p), argnums=(0, 1, 2))(c.x, c.a, c.b)
  for g, w in zip(got, want):
    cases.assert_close(g, w, jnp.float32)


def test_jit_and_validation(backend):
  del backend
  c = cases.make_case("bf16", 1)
  f = jax.jit(lambda x, a, ids: kp.lora_shrink(x, a, ids))
  cases.assert_close(f(c.x, c.a, c.ids), reference.lora_shrink(c.x, c.a, c.ids), jnp.bfloat16)
  with pytest.raises(ValueError, match=r"expected scales of shape \[N\]=\[5\], found \(4,\)"):
    kp.lora_expand(c.y, c.h, c.b, c.ids, c.scales[:4])
  with pytest.raises(ValueError, match=r"h is \[T, R\]=\[.., 8\] but B holds rank 16"):
    kp.lora_expand(c.y, c.h[:, :8], c.b, c.ids, c.scales)


@pytest.mark.parametrize("paged", [False, True])
def test_lora_batched_equals_sgmv_reference(backend, paged):
  """One adapter per batch row (equal segments) == the SGMV spec on the flattened rows."""
  del backend
  rng = np.random.default_rng(5)
  n, d, r, o, bsz, seq = 3, 16, 8, 12, 4, 5
  a = rng.normal(size=(n, d, r)).astype(np.float32)
  b = rng.normal(size=(n, r, o)).astype(np.float32)
  ranks = np.array([8, 3, 5], np.int32)
  for i, k in enumerate(ranks):  # garbage past each rank must be ignored
    a[i, :, k:] = np.nan
    b[i, k:, :] = np.nan
  x = jnp.asarray(rng.normal(size=(bsz, seq, d)), jnp.float32)
  y = jnp.asarray(rng.normal(size=(bsz, seq, o)), jnp.float32)
  ids = jnp.array([2, -1, 0, 2], jnp.int32)
  scales = jnp.array([0.5, 2.0, 1.5], jnp.float32)
  aw, bw = jnp.asarray(a), jnp.asarray(b)
  if paged:  # page_rows=1: rank row k of adapter i lives in page table[i, k] (shuffled)
    perm = rng.permutation(n * r)
    pa = np.zeros((n * r, 1, d), np.float32)
    pb = np.zeros((n * r, 1, o), np.float32)
    pa[perm] = a.transpose(0, 2, 1).reshape(n * r, 1, d)
    pb[perm] = b.reshape(n * r, 1, o)
    table = jnp.asarray(perm.reshape(n, r), jnp.int32)
    aw = kp.PagedWeights(jnp.asarray(pa), table)
    bw = kp.PagedWeights(jnp.asarray(pb), table)
  got = kp.lora_batched(y, x, aw, bw, ids, scales, ranks=jnp.asarray(ranks))
  lens = jnp.full((bsz,), seq, jnp.int32)
  h = reference.sgmv_shrink(x.reshape(-1, d), jnp.asarray(a), ids, lens, ranks=jnp.asarray(ranks))
  want = reference.sgmv_expand(y.reshape(-1, o), h, jnp.asarray(b), ids, lens, scales,
                               ranks=jnp.asarray(ranks)).reshape(bsz, seq, o)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-4, rtol=1e-5)
  assert np.isfinite(np.asarray(got)).all()
