"""Each Pallas kernel lowers for TPU (Mosaic) and for GPU (Triton) through jax.export.

Export runs the Pallas lowering (kernel body to Mosaic / Triton IR) on this CPU-only machine; the
final Mosaic and Triton compilation happens on the device and is not covered here.
"""
import jax
import jax.numpy as jnp
import pytest

import kernels_pallas as kp

T, D, O, N, R = 40, 256, 128, 4, 16
TRITON = jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")


def _programs():
  x, y = jnp.zeros((T, D), jnp.bfloat16), jnp.zeros((T, O), jnp.bfloat16)
  a, b = jnp.zeros((N, D, R), jnp.bfloat16), jnp.zeros((N, R, O), jnp.bfloat16)
  ids, scales = jnp.zeros((T,), jnp.int32), jnp.ones((N,), jnp.float32)
  seg_ids, seg_lens = jnp.arange(N, dtype=jnp.int32), jnp.full((N,), 8, jnp.int32)
  pool, table = jnp.zeros((20, 8, D), jnp.bfloat16), jnp.zeros((N, 2), jnp.int32)
  topk, gates = jnp.zeros((T, 2), jnp.int32), jnp.ones((T, 2), jnp.float32)

  def grads(x, a, b, g):
    out = kp.lora_topk(y, x, a, b, scales, topk, g)
    return jnp.sum(out.astype(jnp.float32))

  return {
      "bgmv_shrink": (lambda x, a: kp.lora_shrink(x, a, ids), (x, a)),
      "bgmv_expand": (lambda y, h, b: kp.lora_expand(y, h, b, ids, scales), (y, x[:, :R], b)),
      "sgmv_shrink": (lambda x, a: kp.sgmv_shrink(x, a, seg_ids, seg_lens), (x, a)),
      "sgmv_expand": (lambda y, h, b: kp.sgmv_expand(y, h, b, seg_ids, seg_lens, scales),
                      (y, x[:, :R], b)),
      "paged_shrink": (lambda x, p: kp.lora_shrink(x, kp.PagedWeights(p, table), ids), (x, pool)),
      "paged_expand": (lambda y, h, p: kp.lora_expand(
          y, h, kp.PagedWeights(p[:, :, :O], table), ids, scales), (y, x[:, :R], pool)),
      "topk_grad": (jax.grad(grads, argnums=(0, 1, 2, 3)), (x, a, b, gates)),
      "batched": (lambda y3, x3, a, b: kp.lora_batched(y3, x3, a, b, jnp.arange(N) - 1, scales),
                  (y.reshape(N, T // N, O), x.reshape(N, T // N, D), a, b)),
  }


@pytest.mark.parametrize("platform,backend,marker", [
    ("tpu", "pallas_tpu", "tpu_custom_call"),
    ("cuda", "pallas_triton", "__gpu$xla.gpu.triton"),
])
def test_export(platform, backend, marker):
  before = kp.get_backend()
  kp.set_backend(backend)
  try:
    for name, (fn, args) in _programs().items():
      exported = jax.export.export(jax.jit(fn), platforms=[platform],
                                   disabled_checks=[TRITON] if platform == "cuda" else [])(*args)
      assert marker in exported.mlir_module(), name
      assert exported.platforms == (platform,)
  finally:
    kp.set_backend(before)


def test_dispatch_on_cpu(monkeypatch):
  before = kp.get_backend()
  try:
    kp.set_backend("auto")
    assert kp.resolve_backend() == "xla"
    kp.set_backend("pallas")
    assert kp.resolve_backend() == "tpu_interpret"
    with pytest.raises(ValueError, match="must be one of"):
      kp.set_backend("cuda")
  finally:
    kp.set_backend(before)
  from kernels_pallas import ops
  monkeypatch.setattr(ops, "_backend", "bogus")  # What a bad JAXADAPT_KERNELS leaves.
  with pytest.raises(ValueError, match="JAXADAPT_KERNELS must be one of"):
    kp.get_backend()
