"""What planning the routing once per forward saves (the forward context, issue #8).

Run:  python -m bench.context        (~1 min on 2 CPU cores)

Workload: the projections of one mixed-batch forward in the per-token (BGMV) layout the serving
engine uses: T=1024 tokens of 64 adapters (rank 16) in random order, P=28 projections of
D=O=256 (a 4-layer, 7-target model), each one `lora_shrink` + `lora_expand`. Two ways, jitted,
timed alternately (median of 15):
  * once: `kernels_pallas.make_grouping` once, every projection takes it as `grouping=`
    (what `Context.prepare` does);
  * per_projection: every op sorts the rows and builds the plan itself (before the context).
It also prints the base matmuls alone (P x `x @ W`), for scale, and the trace + compile time
of each way. The last line is
`RESULT per_projection_vs_once=<x> compile_per_projection_vs_once=<c> once_vs_base=<y>`.
"""
from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

import kernels_pallas as kp

T, D, N, R, P = 1024, 256, 64, 16, 28


def main() -> None:
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((T, D)), jnp.float32)
  ws = jnp.asarray(rng.standard_normal((P, D, D)) * 0.05, jnp.float32)
  a = jnp.asarray(rng.standard_normal((P, N, D, R)) * 0.05, jnp.float32)
  b = jnp.asarray(rng.standard_normal((P, N, R, D)) * 0.05, jnp.float32)
  scales = jnp.ones((N,), jnp.float32)
  ids = jnp.asarray(rng.integers(-1, N, T), jnp.int32)

  def layers(grouped):
    def run(x, ws, a, b, ids):
      grouping = kp.make_grouping(ids, N) if grouped else None
      h = x
      for p in range(P):  # a chain, as layers are: each projection reads the last one's output
        y = h @ ws[p]
        s = kp.lora_shrink(h, a[p], ids, grouping=grouping)
        h = jnp.tanh(kp.lora_expand(y, s, b[p], ids, scales, grouping=grouping))
      return h
    return jax.jit(run)

  def base(x, ws):
    h = x
    for p in range(P):
      h = jnp.tanh(h @ ws[p])
    return h

  compile_s = {}
  for name, grouped in (("once", True), ("per_projection", False)):
    start = time.perf_counter()
    layers(grouped).lower(x, ws, a, b, ids).compile()
    compile_s[name] = time.perf_counter() - start
  once, per_proj, base_fn = layers(True), layers(False), jax.jit(base)
  np.testing.assert_allclose(np.asarray(once(x, ws, a, b, ids)),
                             np.asarray(per_proj(x, ws, a, b, ids)), atol=1e-5)
  jax.block_until_ready(base_fn(x, ws))
  times = {"once": [], "per_projection": [], "base": []}
  for _ in range(15):
    for name, call in (("once", lambda: once(x, ws, a, b, ids)),
                       ("per_projection", lambda: per_proj(x, ws, a, b, ids)),
                       ("base", lambda: base_fn(x, ws))):
      start = time.perf_counter()
      jax.block_until_ready(call())
      times[name].append(time.perf_counter() - start)
  med = {k: 1e3 * float(np.median(v)) for k, v in times.items()}
  print(f"backend {kp.resolve_backend()}: T={T} tokens, {N} adapters r={R}, {P} projections "
        f"of {D}x{D}")
  for k, v in med.items():
    print(f"  {k:15s} {v:8.2f} ms")
  for k, v in compile_s.items():
    print(f"  trace+compile {k:15s} {v:6.2f} s")
  print(f"RESULT per_projection_vs_once={med['per_projection'] / med['once']:.2f} "
        f"compile_per_projection_vs_once="
        f"{compile_s['per_projection'] / compile_s['once']:.2f} "
        f"once_vs_base={med['once'] / med['base']:.2f}")


if __name__ == "__main__":
  main()
