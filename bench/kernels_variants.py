"""Other XLA formulations of the heterogeneous LoRA op on CPU, timed against the default path.

Run:  python -m bench.kernels_variants      (~1 min on 2 CPU cores)

Same workload as `bench.kernels` (T=512, D=O=2048, 64 adapters of rank 16, 8 tokens each, float32;
one op = shrink + expand). It answers two questions about issue #3's CPU target
(mixed <= 1.15x floor):
  1. where the mixed batch's extra time goes: `fetch only` runs the default path's visit loop
     but only reads each visit's adapter weights (no matmul), for the mixed and the shared-adapter
     ids; `stream 16 MiB` is a plain two-core reduction over all 64 adapters' weights;
  2. whether another XLA formulation is faster on the mixed batch: one fused visit loop, the loop
     as an unrolled `lax.scan`, the fused loop fetching the next visit's weights while it
     computes (software pipelining), a batched einsum over per-tile gathered weights, and an
     expert-capacity batched einsum on the stack itself (MoE-style dispatch, no weight gather).
The variants group the sorted rows in tiles of 8 with one adapter per tile, which holds for both
workloads here (every adapter has a multiple of 8 tokens); each prints its max error against the
jnp spec. Lines: `<name> mixed <ms> floor <ms> mixed/floor <x>`; the last line is
`RESULT default_mixed_ms=<x> best_variant=<name> best_mixed_ms=<y>`.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

import kernels_pallas as kp
from bench.kernels import D, N, O, R, T, _inputs, _time, _time_pair
from kernels_pallas import reference

BT = 8  # rows per tile


def _sorted(ids):
  order = jnp.argsort(ids, stable=True).astype(jnp.int32)
  return order, ids[order]


@jax.jit
def default(y, x, a, b, scales, ids):
  return kp.lora_expand(y, kp.lora_shrink(x, a, ids), b, ids, scales)


@jax.jit
def fetch_only(y, x, a, b, scales, ids):
  """The visit loop reading each tile's adapter weights and nothing else."""
  del x, scales
  _, sid = _sorted(ids)

  def body(v, acc):
    aid = sid[v * BT]
    return acc + jnp.sum(a[aid]) + jnp.sum(b[aid])
  return y + lax.fori_loop(0, T // BT, body, jnp.zeros((), jnp.float32))


@jax.jit
def stream(y, x, a, b, scales, ids):
  del x, scales, ids
  return y + (jnp.sum(a) + jnp.sum(b))


def _fused_visit(v, acc, x, a, b, scales, order, sid):
  """Shrink and expand of tile v against its adapter, added into acc (one visit, no h trip)."""
  rows = lax.dynamic_slice_in_dim(order, v * BT, BT)
  aid = sid[v * BT]
  d = scales[aid] * ((x[rows] @ a[aid]) @ b[aid])
  return acc.at[rows].add(d, unique_indices=True)


@jax.jit
def fused_loop(y, x, a, b, scales, ids):
  """One loop of fused visits instead of a shrink loop and an expand loop."""
  order, sid = _sorted(ids)
  return lax.fori_loop(0, T // BT, lambda v, acc: _fused_visit(v, acc, x, a, b, scales, order, sid),
                       y)


@jax.jit
def scan_unrolled(y, x, a, b, scales, ids):
  """The fused visits as a static-length scan, unrolled 8x (fewer loop iterations)."""
  order, sid = _sorted(ids)

  def body(acc, v):
    return _fused_visit(v, acc, x, a, b, scales, order, sid), None
  return lax.scan(body, y, jnp.arange(T // BT), unroll=8)[0]


@jax.jit
def prefetch_loop(y, x, a, b, scales, ids):
  """The fused loop software-pipelined: visit v computes with weights fetched by visit v - 1."""
  order, sid = _sorted(ids)
  last = T // BT - 1

  def body(v, carry):
    acc, wa, wb = carry
    nxt = sid[jnp.minimum(v + 1, last) * BT]
    rows = lax.dynamic_slice_in_dim(order, v * BT, BT)
    d = scales[sid[v * BT]] * ((x[rows] @ wa) @ wb)
    return acc.at[rows].add(d, unique_indices=True), a[nxt], b[nxt]
  return lax.fori_loop(0, last + 1, body, (y, a[sid[0]], b[sid[0]]))[0]


@jax.jit
def tile_gather(y, x, a, b, scales, ids):
  """One batched einsum over tiles, each tile's weights gathered ([V, D, R], [V, R, O])."""
  order, sid = _sorted(ids)
  tiles = order.reshape(-1, BT)
  aid = sid[::BT]
  h = jnp.einsum("vtd,vdr->vtr", x[tiles], a[aid]) * scales[aid][:, None, None]
  d = jnp.einsum("vtr,vro->vto", h, b[aid]).reshape(T, O)
  return y.at[order].add(d)


@jax.jit
def capacity_dense(y, x, a, b, scales, ids):
  """Expert-capacity dispatch: x scattered to [N, C, D] with C = T / N, einsum on the stack."""
  cap = T // N
  order, sid = _sorted(ids)
  counts = jnp.bincount(ids, length=N)
  start = jnp.cumsum(counts) - counts
  slot = sid * cap + (jnp.arange(T) - start[sid])  # tokens past the capacity are dropped
  token = jnp.full((N * cap,), T, jnp.int32).at[slot].set(order, mode="drop")
  xd = jnp.concatenate([x, jnp.zeros((1, D), x.dtype)])[token].reshape(N, cap, D)
  h = jnp.einsum("ncd,ndr->ncr", xd, a) * scales[:, None, None]
  d = jnp.einsum("ncr,nro->nco", h, b).reshape(N * cap, O)
  return jnp.concatenate([y, jnp.zeros((1, O), y.dtype)]).at[token].add(d)[:T]


def main() -> None:
  x, y, a, b, scales, mixed = _inputs()
  same = jnp.zeros_like(mixed)
  args = (y, x, a, b, scales)
  want = {"mixed": reference.lora_expand(y, reference.lora_shrink(x, a, mixed), b, mixed, scales),
          "floor": reference.lora_expand(y, reference.lora_shrink(x, a, same), b, same, scales)}
  print(f"jax {jax.__version__} on {jax.default_backend()}, T={T} D={D} O={O} adapters={N} "
        f"rank={R} float32, median of 30")
  rows = {}
  for name, fn in [("default (visit loops)", default), ("fetch only", fetch_only),
                   ("stream 16 MiB", stream), ("fused loop", fused_loop),
                   ("scan unrolled x8", scan_unrolled),
                   ("prefetch loop", prefetch_loop), ("tile gather einsum", tile_gather),
                   ("capacity dense einsum", capacity_dense)]:
    err = ""
    if name not in ("fetch only", "stream 16 MiB"):
      e = max(float(jnp.max(jnp.abs(fn(*args, ids) - want[k])))
              for k, ids in (("mixed", mixed), ("floor", same))
              if not (name.startswith("capacity") and k == "floor"))
      err = f"  max|err| {e:.1e}"
    if name.startswith("capacity"):
      m = _time(fn, *args, mixed, reps=30)
      # All 512 tokens on one adapter overflow the capacity (C = 8): no floor for this variant.
      print(f"{name:22s} mixed {m:7.3f} ms  floor    n/a (capacity {T // N} < {T}){err}")
    else:
      m, f = _time_pair(fn, (*args, mixed), fn, (*args, same), reps=30)
      print(f"{name:22s} mixed {m:7.3f} ms  floor {f:7.3f} ms  mixed/floor {m / f:5.2f}{err}")
    rows[name] = m
  best = min((k for k in rows if k not in ("fetch only", "stream 16 MiB")), key=rows.get)
  print(f"RESULT default_mixed_ms={rows['default (visit loops)']:.3f} "
        f"best_variant={best.split(' ')[0]} best_mixed_ms={rows[best]:.3f}")


if __name__ == "__main__":
  main()
