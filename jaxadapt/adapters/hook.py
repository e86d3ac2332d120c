"""The one projection hook: every linear layer of every jaxadapt model calls `project`.

The adapter context for a projection is one of
  1. `None`: the plain frozen base;
  2. `SingleLoRA`: one adapter (training, single-tenant inference), PEFT semantics incl. DoRA;
  3. `MixedLoRA`: a stack of adapters and one adapter id per token (mixed batches, S-LoRA);
  4. `GatedLoRA`: a stack and per-token top-k gate weights (MeteoRA).
Contexts 3 and 4 run on `kernels_pallas`; this module is its only caller in jaxadapt.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional

import jax
import jax.numpy as jnp

import kernels_pallas


def _pytree(meta=()):
  def wrap(cls):
    cls = dataclasses.dataclass(frozen=True)(cls)
    fields = [f.name for f in dataclasses.fields(cls)]
    return jax.tree_util.register_dataclass(
        cls, data_fields=[f for f in fields if f not in meta], meta_fields=list(meta))
  return wrap


@_pytree(meta=("dropout",))
class SingleLoRA:
  """One LoRA adapter on one projection: `y = x W + b + scale * (drop(x) A) B`.

  DoRA (Liu et al., 2024, Eq. 5) when `magnitude` is set: the adapted weight is
  `m * (W + scale*A B) / ||W + scale*A B||_c`, the column norm held constant in gradients.
  """
  a: jax.Array                      # [in, r]
  b: jax.Array                      # [r, out]
  scale: jax.Array                  # [] alpha / r (or alpha / sqrt(r) with rsLoRA)
  magnitude: Optional[jax.Array] = None  # [out] DoRA magnitude, or None
  dropout_key: Optional[jax.Array] = None  # PRNG key when dropout is active (training)
  dropout: float = 0.0


@_pytree()
class MixedLoRA:
  """A stack of adapters and one adapter id per token (-1 = base only).

  `a` and `b` are dense stacks or `kernels_pallas.PagedWeights` (pages of S-LoRA's unified
  pool, Sec. 4.1). `ranks[n]` is adapter n's true rank, so the kernels skip the padding.
  `dora_scale[n]` is DoRA's `m / ||W + s A B||_c` per output column (ones for plain LoRA),
  or None when no adapter in the stack uses DoRA.
  """
  a: Any                            # [N, in, r_max] (ranks zero-padded) or PagedWeights
  b: Any                            # [N, r_max, out] or PagedWeights
  scale: jax.Array                  # [N]
  token_ids: jax.Array              # [T] int32 (T = product of x's leading dims), or [B] one
                                    # id per sequence of x [B, ..., in] (tokens already
                                    # segmented); ids outside [0, N) mean base only (eager
                                    # calls with such concrete ids raise ValueError)
  dora_scale: Optional[jax.Array] = None  # [N, out]
  ranks: Optional[jax.Array] = None       # [N] int32 true ranks, or None (all r_max)


@_pytree()
class GatedLoRA:
  """MeteoRA: per-token top-k adapters mixed with gate weights (MeteoRA Eq. 3-4)."""
  a: Any                            # [N, in, r_max] or PagedWeights
  b: Any                            # [N, r_max, out] or PagedWeights
  scale: jax.Array                  # [N]
  topk_ids: jax.Array               # [T, K] adapter ids, -1 skips the slot
  gates: jax.Array                  # [T, K] gate weights
  ranks: Optional[jax.Array] = None       # [N] int32 true ranks, or None


def _cast(w, dtype):
  """A dense stack or a PagedWeights in `dtype`."""
  if isinstance(w, kernels_pallas.PagedWeights):
    return kernels_pallas.PagedWeights(w.pool.astype(dtype), w.table)
  return w.astype(dtype)


def _dropout(x, rate, key):
  if rate == 0.0 or key is None:
    return x
  keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
  return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)


def dora_weight_norm(kernel, a, b, scale):
  """Column norms `||W + scale * A B||` of a [in, out] kernel (DoRA Eq. 5), float32."""
  w = kernel.astype(jnp.float32) + scale * (a.astype(jnp.float32) @ b.astype(jnp.float32))
  return jnp.sqrt(jnp.sum(w * w, axis=0))


def _per_sequence(x, base, ctx: MixedLoRA):
  """Mixed LoRA with one adapter per sequence of x [B, ..., in]: the sequences are the segments
  of S-LoRA's SGMV (Sec. 5.1), so each sequence reads its adapter's weights once, not per token."""
  ids = ctx.token_ids.astype(jnp.int32)
  if ids.shape[0] != x.shape[0]:
    raise ValueError(f"MixedLoRA.token_ids has {ids.shape[0]} ids for x of shape {x.shape}: "
                     f"expected one per token ({base.size // base.shape[-1]}) or per sequence "
                     f"({x.shape[0]})")
  x3 = x.reshape(x.shape[0], -1, x.shape[-1])
  b3 = base.reshape(base.shape[0], -1, base.shape[-1])
  y0 = b3 if ctx.dora_scale is None else jnp.zeros_like(b3)
  out = kernels_pallas.ops.lora_batched(y0, x3, _cast(ctx.a, x.dtype), _cast(ctx.b, x.dtype), ids,
                                        ctx.scale, ranks=ctx.ranks)
  if ctx.dora_scale is not None:
    out = _mixed_dora(b3, out, ctx.dora_scale, ids)
  return out.reshape(base.shape)


def _per_token(x, base, ctx: MixedLoRA):
  """Mixed LoRA with one adapter id per token (S-LoRA's BGMV layout, Sec. 5.1)."""
  x2, y2 = x.reshape(-1, x.shape[-1]), base.reshape(-1, base.shape[-1])
  ids = ctx.token_ids.astype(jnp.int32)
  h = kernels_pallas.ops.lora_shrink(x2, _cast(ctx.a, x.dtype), ids, ranks=ctx.ranks)
  y0 = y2 if ctx.dora_scale is None else jnp.zeros_like(y2)
  out = kernels_pallas.ops.lora_expand(y0, h, _cast(ctx.b, x.dtype), ids, ctx.scale,
                                       ranks=ctx.ranks)
  if ctx.dora_scale is not None:
    out = _mixed_dora(y2, out, ctx.dora_scale, ids)
  return out.reshape(base.shape)


def _mixed_dora(base, delta, dora_scale, ids):
  """DoRA in a mixed batch (Eq. 5): `m/n * (x W + s x A B)` with each row's adapter's `m/n`
  (ones for plain LoRA and for rows without an adapter); the bias is added after.

  base/delta: [rows, ..., out]; ids: [rows]. Ids outside [0, N) have no adapter, as in the
  kernels (`kernels_pallas.reference`)."""
  valid = (ids >= 0) & (ids < dora_scale.shape[0])
  ms = jnp.where(valid[:, None], dora_scale[jnp.where(valid, ids, 0)], 1).astype(jnp.float32)
  ms = ms.reshape(ms.shape[:1] + (1,) * (base.ndim - 2) + ms.shape[1:])
  # In float32, rounded once to base's dtype (as the single-adapter path).
  return (ms * (base.astype(jnp.float32) + delta.astype(jnp.float32))).astype(base.dtype)


def project(x: jax.Array, kernel: jax.Array, bias: Optional[jax.Array] = None,
            ctx: Any = None) -> jax.Array:
  """A linear projection `x @ kernel + bias` with the adapter context for this path.

  Args:
    x: [..., in] activations.
    kernel: [in, out] frozen base weight.
    bias: [out] frozen base bias or None.
    ctx: None, SingleLoRA, MixedLoRA or GatedLoRA (see module docstring).

  Returns:
    [..., out] in x's dtype.
  """
  base = jnp.matmul(x, kernel.astype(x.dtype))
  if ctx is None:
    out = base
  elif isinstance(ctx, SingleLoRA):
    xd = _dropout(x, ctx.dropout, ctx.dropout_key)
    delta = ((xd @ ctx.a.astype(x.dtype)) @ ctx.b.astype(x.dtype)) * ctx.scale.astype(x.dtype)
    if ctx.magnitude is None:
      out = base + delta
    else:
      # Combined in float32 and rounded once (in bfloat16, `base + (m - 1) * base` rounds twice).
      norm = jax.lax.stop_gradient(dora_weight_norm(kernel, ctx.a, ctx.b, ctx.scale))
      mag = ctx.magnitude.astype(jnp.float32) / norm
      f32 = lambda v: v.astype(jnp.float32)
      if xd is x:
        out = (mag * (f32(base) + f32(delta))).astype(x.dtype)
      else:
        base_d = jnp.matmul(xd, kernel.astype(x.dtype))
        out = (f32(base) + (mag - 1) * f32(base_d) + mag * f32(delta)).astype(x.dtype)
  elif isinstance(ctx, MixedLoRA):
    per_token = ctx.token_ids.shape[0] == base.size // base.shape[-1]
    out = _per_token(x, base, ctx) if per_token or x.ndim < 3 else _per_sequence(x, base, ctx)
  elif isinstance(ctx, GatedLoRA):
    out = kernels_pallas.ops.lora_topk(
        base.reshape(-1, base.shape[-1]), x.reshape(-1, x.shape[-1]), _cast(ctx.a, x.dtype),
        _cast(ctx.b, x.dtype), ctx.scale, ctx.topk_ids, ctx.gates,
        ranks=ctx.ranks).reshape(base.shape)
  else:
    raise TypeError(f"adapter context must be None, SingleLoRA, MixedLoRA or GatedLoRA; "
                    f"got {type(ctx).__name__}")
  if bias is not None:
    out = out + bias.astype(out.dtype)
  return out
