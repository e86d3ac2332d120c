"""kernels_pallas.ops on every path (XLA loop, interpreted TPU and Triton kernels) vs the reference.

Forward cases put NaN in every weight slot past an adapter's rank (padding, a page's tail, spare
pages): the kernels must ignore them as the specification does.
"""
import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kernels_pallas as kp
from kernels_pallas import reference

import _kernel_cases as cases

BACKENDS = ["xla", "pallas_interpret", "pallas_triton_interpret"]
SETTINGS = hypothesis.settings(max_examples=4, deadline=None,
                               suppress_health_check=[hypothesis.HealthCheck.too_slow,
                                                      hypothesis.HealthCheck.function_scoped_fixture])


@pytest.fixture(params=BACKENDS)
def backend(request):
  before = kp.get_backend()
  kp.set_backend(request.param)
  yield request.param
  kp.set_backend(before)


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


@hypothesis.settings(max_examples=2, deadline=None,
                     suppress_health_check=[hypothesis.HealthCheck.function_scoped_fixture])
@hypothesis.given(data=st.data())
def test_gradients_match_reference(backend, data):
  """d/dx, d/dA, d/dB (dense stacks or pools) and d/dgates of MeteoRA's top-k form."""
  del backend
  name = data.draw(st.sampled_from(["ragged_T_ranks_1_128", "paged_f32"]))
  c = cases.make_case(name, data.draw(st.integers(0, 2**16)), garbage=3.0)
  weight = jnp.asarray(np.random.default_rng(0).standard_normal(c.y.shape), jnp.float32)
  a, b = (c.a.pool, c.b.pool) if isinstance(c.a, kp.PagedWeights) else (c.a, c.b)
  primals = (c.x, a, b, c.gates)
  got = jax.grad(_loss(kp.lora_topk, c, weight), argnums=(0, 1, 2, 3))(*primals)
  want = jax.grad(_loss(reference.lora_topk, c, weight), argnums=(0, 1, 2, 3))(*primals)
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
