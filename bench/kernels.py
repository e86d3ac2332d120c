"""Cost of a heterogeneous LoRA batch (S-LoRA Sec. 5.1) on every kernel path of this machine.

Run:  python -m bench.kernels            (~1-2 min on 2 CPU cores; add --interpret for the
                                           interpreted Pallas paths, several minutes more)

Workload: T=512 tokens, D=O=2048, 64 distinct adapters of rank 16, 8 tokens each in random order
(the per-row BGMV layout), float32; one op = lora_shrink then lora_expand (y += s * x A B).
For each path it prints the median time of
  * mixed: the 64-adapter batch;
  * floor: the same op with all 512 tokens sharing one adapter (Punica's "identical" workload);
  * loop: a per-adapter loop, y += where(ids == n, s_n * x A_n B_n) for n = 1..64, jitted;
and the ratios mixed/floor and loop/mixed (mixed and floor timed alternately). Context lines:
the plain single-adapter matmul y + s * (x @ A) @ B (no multi-tenancy at all), the gather-einsum
of `reference` and `lax.ragged_dot`. The last line is
`RESULT mixed_vs_floor=<x> loop_vs_mixed=<y>` for the machine's default path
(`kernels_pallas.resolve_backend("auto")`).
Target on CPU: mixed_vs_floor <= 1.15 and loop_vs_mixed >= 6.
"""
from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

import kernels_pallas as kp
from kernels_pallas import reference

T, D, O, N, R = 512, 2048, 2048, 64, 16


def _time(fn, *args, reps: int) -> float:
  """Median wall time of a jitted call in milliseconds (after one warm-up call)."""
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(reps):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return 1e3 * float(np.median(times))


def _time_pair(fn_a, args_a, fn_b, args_b, *, reps: int) -> tuple[float, float]:
  """Median wall times (ms) of two jitted calls timed alternately, so that load drifting on a
  shared machine hits both alike (their ratio is what the benchmark reports)."""
  jax.block_until_ready(fn_a(*args_a))
  jax.block_until_ready(fn_b(*args_b))
  times = ([], [])
  for _ in range(reps):
    for fn, args, out in ((fn_a, args_a, times[0]), (fn_b, args_b, times[1])):
      start = time.perf_counter()
      jax.block_until_ready(fn(*args))
      out.append(time.perf_counter() - start)
  return 1e3 * float(np.median(times[0])), 1e3 * float(np.median(times[1]))


def _inputs():
  k = jax.random.split(jax.random.key(0), 5)
  x = jax.random.normal(k[0], (T, D), jnp.float32)
  y = jax.random.normal(k[1], (T, O), jnp.float32)
  a = jax.random.normal(k[2], (N, D, R), jnp.float32) / np.sqrt(D)
  b = jax.random.normal(k[3], (N, R, O), jnp.float32) / np.sqrt(R)
  scales = jnp.full((N,), 2.0, jnp.float32)
  mixed = jax.random.permutation(k[4], jnp.arange(T) % N).astype(jnp.int32)
  return x, y, a, b, scales, mixed


def _lora(backend: str):
  kp.set_backend(backend)  # Read when the jitted function is traced (on the warm-up call).

  @jax.jit
  def fn(y, x, a, b, scales, ids):
    return kp.lora_expand(y, kp.lora_shrink(x, a, ids), b, ids, scales)

  return fn


@jax.jit
def _loop(y, x, a, b, scales, ids):
  out = y
  for n in range(N):
    delta = scales[n] * ((x @ a[n]) @ b[n])
    out = out + jnp.where((ids == n)[:, None], delta, 0)
  return out


@jax.jit
def _single(y, x, a, b, scales, ids):
  del ids
  return y + scales[0] * ((x @ a[0]) @ b[0])


@jax.jit
def _gather_einsum(y, x, a, b, scales, ids):
  return reference.lora_expand(y, reference.lora_shrink(x, a, ids), b, ids, scales)


@jax.jit
def _ragged_dot(y, x, a, b, scales, ids):
  order = jnp.argsort(ids)
  sizes = jnp.bincount(ids, length=N)
  h = jax.lax.ragged_dot(x[order], a, sizes)
  d = jax.lax.ragged_dot(h, b, sizes) * scales[ids[order]][:, None]
  return y.at[order].add(d)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--reps", type=int, default=20)
  parser.add_argument("--interpret", action="store_true",
                      help="also time the interpreted Pallas kernels (slow, for completeness)")
  args = parser.parse_args()
  x, y, a, b, scales, mixed = _inputs()
  same = jnp.zeros_like(mixed)
  inputs = (y, x, a, b, scales)
  print(f"jax {jax.__version__} on {jax.default_backend()} ({jax.devices()[0].device_kind}), "
        f"T={T} D={D} O={O} adapters={N} rank={R} float32, median of {args.reps}")

  want = _gather_einsum(*inputs, mixed)
  loop_ms = _time(_loop, *inputs, mixed, reps=args.reps)
  print(f"context: single-adapter matmul {_time(_single, *inputs, mixed, reps=args.reps):8.2f} ms")
  print(f"context: gather-einsum (ref.)  {_time(_gather_einsum, *inputs, mixed, reps=args.reps):8.2f} ms")
  print(f"context: lax.ragged_dot        {_time(_ragged_dot, *inputs, mixed, reps=args.reps):8.2f} ms")
  print(f"context: per-adapter loop      {loop_ms:8.2f} ms")

  default = kp.resolve_backend("auto")
  paths = ["auto", "xla"]
  if args.interpret:
    paths += ["pallas_interpret", "pallas_triton_interpret"]
  ratios = {}
  for path in paths:
    impl = kp.resolve_backend(path)
    if impl in ratios:
      continue
    fn = _lora(path)
    err = float(jnp.max(jnp.abs(fn(*inputs, mixed) - want)))
    reps = args.reps if "interpret" not in impl else 2
    mixed_ms, floor_ms = _time_pair(fn, (*inputs, mixed), _lora(path), (*inputs, same), reps=reps)
    ratios[impl] = (mixed_ms / floor_ms, loop_ms / mixed_ms)
    print(f"path {impl:17s} mixed {mixed_ms:8.2f} ms  floor {floor_ms:8.2f} ms  "
          f"mixed/floor {ratios[impl][0]:5.2f}  loop/mixed {ratios[impl][1]:6.1f}  "
          f"max|err| {err:.1e}")
  # Context: the op inside the projection it serves (y = x @ W + LoRA), where W dominates.
  w = jax.random.normal(jax.random.key(9), (D, O), jnp.float32) / np.sqrt(D)
  kp.set_backend(default)

  @jax.jit
  def layer(x, a, b, scales, ids):
    return kp.lora_expand(x @ w, kp.lora_shrink(x, a, ids), b, ids, scales)
  layer_mixed, layer_floor = _time_pair(layer, (x, a, b, scales, mixed), layer,
                                        (x, a, b, scales, same), reps=args.reps)
  print(f"context: in a {D}x{O} projection (x @ W + LoRA), mixed {layer_mixed:.2f} ms, "
        f"floor {layer_floor:.2f} ms, mixed/floor {layer_mixed / layer_floor:.2f}; adapter "
        f"weights read: mixed {N * (D + O) * R * 4 / 2**20:.1f} MiB, floor "
        f"{(D + O) * R * 4 / 2**20:.2f} MiB")
  kp.set_backend("auto")
  mixed_vs_floor, loop_vs_mixed = ratios[default]
  print(f"RESULT mixed_vs_floor={mixed_vs_floor:.2f} loop_vs_mixed={loop_vs_mixed:.1f}")


if __name__ == "__main__":
  main()
