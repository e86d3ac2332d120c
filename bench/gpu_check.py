"""One prepared run for a session that is lent a GPU (issue #3): the compiled kernels vs the spec.

  python3 -m bench.gpu_check          # on the device machine, repo root, after `bench.kernels`

For every case of the kernel tests (mixed ranks 1..256, bf16, dense and paged pools, NaN past each
rank) it runs the backend `auto` resolves to on this machine (Pallas Triton on a GPU, Mosaic on a
TPU) against `kernels_pallas.reference`: BGMV shrink/expand, SGMV, top-k and the gradients of
top-k (x, A, B, gates), then out-of-range input under jit (ids >= N, page entries past the pool,
an adapter holding NaN), and prints one line per check and a last line
`RESULT checks=<n> failed=<m> backend=<impl>`. On CPU it runs the XLA path (a dry run of the
script). Tolerances as in tests/kernels_pallas.
"""
from __future__ import annotations

import os
import sys

import jax
import jax.numpy as jnp

import kernels_pallas as kp
from kernels_pallas import reference

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "tests", "kernels_pallas"))
import _kernel_cases as cases


def _err(got, want) -> float:
  return float(jnp.max(jnp.abs(jnp.asarray(got, jnp.float32) - jnp.asarray(want, jnp.float32))))


def main() -> int:
  kp.set_backend(os.environ.get("JAXADAPT_KERNELS", "auto"))
  impl = kp.resolve_backend()
  print(f"jax {jax.__version__}, devices {jax.devices()}, kernels backend -> {impl}", flush=True)
  checks = failed = 0

  def check(label, got, want, dtype):
    nonlocal checks, failed
    tol = 5e-2 if dtype == jnp.bfloat16 else 1e-4
    scale = max(1.0, float(jnp.max(jnp.abs(jnp.asarray(want, jnp.float32)))))
    e = _err(got, want)
    ok = e <= tol * scale and bool(jnp.all(jnp.isfinite(jnp.asarray(got, jnp.float32))))
    checks += 1
    failed += not ok
    print(f"{'ok  ' if ok else 'FAIL'} {label:45s} max|err| {e:.2e} (tol {tol * scale:.1e})",
          flush=True)

  for name, cfg in cases.CONFIGS.items():
    dtype = cfg[5]
    for seed in (0, 1):
      c = cases.make_case(name, seed)
      r = c.ranks
      check(f"{name}/{seed} bgmv shrink", kp.lora_shrink(c.x, c.a, c.ids, ranks=r),
            reference.lora_shrink(c.x, c.a, c.ids, ranks=r), dtype)
      check(f"{name}/{seed} bgmv expand",
            kp.lora_expand(c.y, c.h, c.b, c.ids, c.scales, ranks=r),
            reference.lora_expand(c.y, c.h, c.b, c.ids, c.scales, ranks=r), dtype)
      seg = (c.seg_ids, c.seg_lens)
      check(f"{name}/{seed} sgmv shrink", kp.sgmv_shrink(c.x, c.a, *seg, ranks=r),
            reference.sgmv_shrink(c.x, c.a, *seg, ranks=r), dtype)
      check(f"{name}/{seed} sgmv expand",
            kp.sgmv_expand(c.y, c.h, c.b, *seg, c.scales, ranks=r),
            reference.sgmv_expand(c.y, c.h, c.b, *seg, c.scales, ranks=r), dtype)
      check(f"{name}/{seed} top-k",
            kp.lora_topk(c.y, c.x, c.a, c.b, c.scales, c.topk_ids, c.gates, ranks=r),
            reference.lora_topk(c.y, c.x, c.a, c.b, c.scales, c.topk_ids, c.gates, ranks=r),
            dtype)

  # Gradients of the top-k form (dense, f32, zero padding so reference grads are finite).
  c = cases.make_case("ragged_T_ranks_1_128", 3, garbage=0.0)

  def loss(fn, x, a, b, g):
    out = fn(c.y, x, a, b, c.scales, c.topk_ids, g, ranks=c.ranks)
    return jnp.sum(out.astype(jnp.float32) ** 2)
  got = jax.grad(lambda *t: loss(kp.lora_topk, *t), argnums=(0, 1, 2, 3))(c.x, c.a, c.b, c.gates)
  want = jax.grad(lambda *t: loss(reference.lora_topk, *t), argnums=(0, 1, 2, 3))(
      c.x, c.a, c.b, c.gates)
  for label, g, w in zip(("dx", "dA", "dB", "dgates"), got, want):
    check(f"top-k gradient {label}", g, w, jnp.float32)
  # Out-of-range input under jit, where compiled kernels could read past their buffers
  # (`reference` module docstring): ids >= N mean no adapter; live page entries outside the pool
  # are clamped into it; an adapter holding NaN touches only its own rows.
  op = jax.jit(lambda y, x, a, b, s, ids, r: kp.lora_expand(y, kp.lora_shrink(x, a, ids, ranks=r),
                                                            b, ids, s, ranks=r))
  spec = jax.jit(lambda y, x, a, b, s, ids, r: reference.lora_expand(
      y, reference.lora_shrink(x, a, ids, ranks=r), b, ids, s, ranks=r))
  c = cases.make_case("ragged_T_ranks_1_128", 4, garbage=0.0, ids_kind="random")
  n = c.scales.shape[0]
  far = c.ids.at[::3].set(n + 2)
  check("jit: ids >= N mean no adapter", op(c.y, c.x, c.a, c.b, c.scales, far, c.ranks),
        spec(c.y, c.x, c.a, c.b, c.scales, jnp.where(far >= n, -1, far), c.ranks), jnp.float32)
  p = cases.make_case("paged_f32", 4, garbage=0.0, ids_kind="random")
  pool_pages = p.a.pool.shape[0]
  past = lambda w: kp.PagedWeights(w.pool, w.table.at[0, 0].set(pool_pages + 5))
  clamped = lambda w: kp.PagedWeights(w.pool, w.table.at[0, 0].set(pool_pages - 1))
  check("jit: page entry past the pool is clamped",
        op(p.y, p.x, past(p.a), past(p.b), p.scales, p.ids, p.ranks),
        spec(p.y, p.x, clamped(p.a), clamped(p.b), p.scales, p.ids, p.ranks), jnp.float32)
  bad = int(c.ids[c.ids >= 0][0])
  a_nan, b_nan = c.a.at[bad].set(jnp.nan), c.b.at[bad].set(jnp.nan)
  other = c.ids != bad
  check("jit: a NaN adapter stays in its rows",
        op(c.y, c.x, a_nan, b_nan, c.scales, c.ids, c.ranks)[other],
        spec(c.y, c.x, a_nan, b_nan, c.scales, c.ids, c.ranks)[other], jnp.float32)
  print(f"RESULT checks={checks} failed={failed} backend={impl}")
  return 1 if failed else 0


if __name__ == "__main__":
  sys.exit(main())
