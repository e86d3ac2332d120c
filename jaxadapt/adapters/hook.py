"""The one projection hook: every linear layer of every jaxadapt model calls `project`.

`project(x, kernel, bias, ctx, path)` reads the forward context (`jaxadapt.context.Context`)
for its path and runs one of
  1. nothing: the plain frozen base;
  2. `SingleLoRA`: one adapter (training, single-tenant inference), PEFT semantics incl. DoRA;
  3. a `Stack` or `PoolView` with "sequence" or "token" routing: a mixed batch (S-LoRA);
  4. a `Stack` or `PoolView` with a `Router` for the path (MeteoRA: the gate evaluated here from
     this layer's x) or "topk" routing (given ids and gates).
Cases 3 and 4 run on `kernels_pallas` with the plan the context's routing built once per
forward; this module is the only caller of `kernels_pallas` in jaxadapt.
"""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

import kernels_pallas
from jaxadapt.context import Context, Router, Routing, SingleLoRA, Stack

__all__ = ["SingleLoRA", "dora_weight_norm", "project"]


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


def _per_sequence(x, base, view: Stack, routing: Routing):
  """Mixed LoRA with one adapter per sequence of x [B, ..., in]: the sequences are the segments
  of S-LoRA's SGMV (Sec. 5.1), so each sequence reads its adapter's weights once, not per token."""
  ids = routing.ids
  if x.ndim < 2 or ids.shape[0] != x.shape[0]:
    raise ValueError(f"sequence routing has {ids.shape[0]} ids for x of shape {x.shape}: "
                     f"expected one per batch row ({x.shape[0] if x.ndim else 0})")
  x3 = x.reshape(x.shape[0], -1, x.shape[-1])
  b3 = base.reshape(base.shape[0], -1, base.shape[-1])
  if _rank_slots(view.a, "a") != _rank_slots(view.b, "b"):  # pool pages of the two sides hold different rank slots: the per-token form
    return _per_token(x, base, view, routing.as_tokens(x3.shape[1]))
  grouping = (routing.grouping_for(x3.shape[0] * x3.shape[1])
              if kernels_pallas.batched_needs_grouping() else None)
  y0 = b3 if view.dora_scale is None else jnp.zeros_like(b3)
  out = kernels_pallas.lora_batched(y0, x3, _cast(view.a, x.dtype), _cast(view.b, x.dtype), ids,
                                    view.scale, ranks=view.ranks, grouping=grouping)
  if view.dora_scale is not None:
    out = _mixed_dora(b3, out, view.dora_scale, ids)
  return out.reshape(base.shape)


# Up to this many tokens, pooled adapters are read rank row by rank row per token
# (`kernels_pallas.lora_rows`); past it, by the visit loop over grouped tokens. Measured on
# bench.serving's shapes (32 decode tokens, 32 adapters of rank 8, D=O=512): 0.10 ms against
# 0.73 ms for the loop, and 0.07 against 0.09 with one adapter.
ROWS_MAX_TOKENS = 64


def _per_token(x, base, view: Stack, routing: Routing):
  """Mixed LoRA with one adapter id per token (S-LoRA's BGMV layout, Sec. 5.1)."""
  x2, y2 = x.reshape(-1, x.shape[-1]), base.reshape(-1, base.shape[-1])
  ids = routing.ids
  if ids.shape[0] != x2.shape[0]:
    raise ValueError(f"token routing has {ids.shape[0]} ids for x of shape {x.shape}: expected "
                     f"one per token ({x2.shape[0]})")
  paged = (view.rank_bound and view.dora_scale is None
           and isinstance(view.a, kernels_pallas.PagedWeights)
           and isinstance(view.b, kernels_pallas.PagedWeights))
  if paged and routing.members is not None:
    out = kernels_pallas.lora_members(y2, x2, _cast(view.a, x.dtype), _cast(view.b, x.dtype),
                                      routing.members, routing.member_of, view.scale,
                                      ranks=view.ranks, rank=view.rank_bound)
    return out.reshape(base.shape)
  if paged and x2.shape[0] <= ROWS_MAX_TOKENS:
    out = kernels_pallas.lora_rows(y2, x2, _cast(view.a, x.dtype), _cast(view.b, x.dtype), ids,
                                   view.scale, ranks=view.ranks, rank=view.rank_bound)
    return out.reshape(base.shape)
  grouping = routing.grouping_for(x2.shape[0])
  a, b = _cast(view.a, x.dtype), _cast(view.b, x.dtype)
  h = kernels_pallas.lora_shrink(x2, a, ids, ranks=view.ranks, grouping=grouping)
  h = _fit_rank(h, _rank_slots(b, "b"))
  y0 = y2 if view.dora_scale is None else jnp.zeros_like(y2)
  out = kernels_pallas.lora_expand(y0, h, b, ids, view.scale, ranks=view.ranks,
                                   grouping=grouping)
  if view.dora_scale is not None:
    out = _mixed_dora(y2, out, view.dora_scale, ids)
  return out.reshape(base.shape)


def _tp_column(x, base, view: Stack, routing: Routing, tp):
  """A mixed-batch LoRA on a column-parallel projection inside shard_map (S-LoRA Sec. 6): each
  device holds its part of the adapters' A split along the rank (`serve.tp`: row i of pool page
  j on device s is rank row `j * size * rows + s * rows + i`) and B split on the output like the
  base. The local shrink gives `[T, r / size]`; one all-gather gives every device the whole
  `[T, r]`, which expands into this device's output columns."""
  x2, y2 = x.reshape(-1, x.shape[-1]), base.reshape(-1, base.shape[-1])
  ids = routing.ids
  grouping = routing.grouping_for(x2.shape[0])
  a, b = _cast(view.a, x.dtype), _cast(view.b, x.dtype)
  rows, pages = a.pool.shape[1], a.table.shape[1]
  per_page = tp.size * rows  # rank rows one page holds over all devices
  local_ranks = -(-view.ranks // per_page) * rows  # this device's rows of the pages in use
  h = kernels_pallas.lora_shrink(x2, a, ids, ranks=local_ranks, grouping=grouping)
  h = jax.lax.all_gather(h, tp.axis, axis=1, tiled=True)  # [T, size * pages * rows]
  h = h.reshape(-1, tp.size, pages, rows).transpose(0, 2, 1, 3).reshape(h.shape[0], -1)
  h = _fit_rank(h, _rank_slots(b, "b"))
  out = kernels_pallas.lora_expand(y2, h, b, ids, view.scale, ranks=view.ranks,
                                   grouping=grouping)
  return out.reshape(base.shape)


def _tp_row(x, base, view: Optional[Stack], routing: Optional[Routing], tp):
  """A row-parallel projection inside shard_map (S-LoRA Sec. 6): x, the base kernel and the
  adapters' A are split on the input, so `x A` is a partial sum: one all-reduce of the small
  `[T, r]`, then B (split on the output) gives this device's columns of the LoRA output, which
  join the base's partial output in the base's own all-reduce (one collective for both)."""
  if view is None:
    return jax.lax.psum(base, tp.axis)
  x2, y2 = x.reshape(-1, x.shape[-1]), base.reshape(-1, base.shape[-1])
  ids = routing.ids
  grouping = routing.grouping_for(x2.shape[0])
  a, b = _cast(view.a, x.dtype), _cast(view.b, x.dtype)
  h = kernels_pallas.lora_shrink(x2, a, ids, ranks=view.ranks, grouping=grouping)
  h = _fit_rank(jax.lax.psum(h, tp.axis), _rank_slots(b, "b"))
  width = b.pool.shape[2]  # this device's output columns
  lo = kernels_pallas.lora_expand(jnp.zeros((y2.shape[0], width), y2.dtype), h, b, ids,
                                  view.scale, ranks=view.ranks, grouping=grouping)
  at = jax.lax.axis_index(tp.axis) * width
  y2 = y2 + jax.lax.dynamic_update_slice(jnp.zeros_like(y2), lo, (0, at))
  return jax.lax.psum(y2, tp.axis).reshape(base.shape)


def _rank_slots(w, side: str) -> int:
  """R of one side: a dense A [N, D, R] or B [N, R, O], or PagedWeights' pages x rows."""
  if isinstance(w, kernels_pallas.PagedWeights):
    return w.max_rank
  return w.shape[2] if side == "a" else w.shape[1]


def _fit_rank(h, r_b: int):
  """h [T, R_a] cut or zero-padded to B's rank slots R_b: in a pool the two sides' pages hold
  different numbers of rank rows, and every slot past an adapter's rank is zero anyway."""
  r_a = h.shape[1]
  if r_a == r_b:
    return h
  if r_a > r_b:
    return h[:, :r_b]
  return jnp.pad(h, ((0, 0), (0, r_b - r_a)))


def _route(x, router: Router, n: int, path: Optional[str] = None):
  """MeteoRA's gate (Eq. 3-4) from this layer's input: top-k ids and softmax(g_topk / T)."""
  g = jnp.matmul(x.reshape(-1, x.shape[-1]).astype(jnp.float32),
                 router.w_gate.astype(jnp.float32))
  if g.shape[-1] != n:
    raise ValueError(f"router has {g.shape[-1]} gate outputs for a stack of {n} adapters")
  if router.tape is not None:
    router.tape.record(path, g)
  top, ids = jax.lax.top_k(g, router.top_k)
  gates = jax.nn.softmax(top / router.temperature.astype(jnp.float32), axis=-1)
  return ids.astype(jnp.int32), gates


def _routed_rows(x, base, view: Stack, router: Router, routing: Routing, path):
  """A batch where the gate routes some rows (a MeteoRA model served beside plain adapters,
  S-LoRA's engine) and the context's per-token routing the others: the gated rows take the
  top-k of `g = x W_g` (MeteoRA Eq. 3-4), mapped to stack slots by `router.slots`; a plain row
  takes its one adapter with gate 1 (and no adapter in the other slots)."""
  ids_k, gates_k = _route(x, router, router.w_gate.shape[1], path)
  t, k = ids_k.shape
  rows = router.rows[:, None]
  plain = jnp.concatenate([routing.ids[:, None], jnp.full((t, k - 1), -1, jnp.int32)], axis=1)
  ids = jnp.where(rows, router.slots[ids_k], plain)
  gates = jnp.where(rows, gates_k, (jnp.arange(k) == 0).astype(jnp.float32)[None, :])
  return _gated(x, base, view, ids, gates)


def _gated(x, base, view: Stack, ids, gates, groupings=None):
  if view.dora_scale is not None:
    raise ValueError("a gated (MeteoRA) mixture of DoRA adapters is not supported; use LoRA")
  a, b = _cast(view.a, x.dtype), _cast(view.b, x.dtype)
  return kernels_pallas.lora_topk(
      base.reshape(-1, base.shape[-1]), x.reshape(-1, x.shape[-1]), a, b, view.scale, ids, gates,
      ranks=view.ranks, groupings=groupings, impl="auto").reshape(base.shape)


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


def _single(x, kernel, base, ctx: SingleLoRA):
  xd = _dropout(x, ctx.dropout, ctx.dropout_key)
  delta = ((xd @ ctx.a.astype(x.dtype)) @ ctx.b.astype(x.dtype)) * ctx.scale.astype(x.dtype)
  if ctx.magnitude is None:
    return base + delta
  # Combined in float32 and rounded once (in bfloat16, `base + (m - 1) * base` rounds twice).
  norm = jax.lax.stop_gradient(dora_weight_norm(kernel, ctx.a, ctx.b, ctx.scale))
  mag = ctx.magnitude.astype(jnp.float32) / norm
  f32 = lambda v: v.astype(jnp.float32)
  if xd is x:
    return (mag * (f32(base) + f32(delta))).astype(x.dtype)
  base_d = jnp.matmul(xd, kernel.astype(x.dtype))
  return (f32(base) + (mag - 1) * f32(base_d) + mag * f32(delta)).astype(x.dtype)


def project(x: jax.Array, kernel: jax.Array, bias: Optional[jax.Array] = None,
            ctx: Optional[Context] = None, path: Optional[str] = None) -> jax.Array:
  """A linear projection `x @ kernel + bias` with what the forward context holds for `path`.

  Args:
    x: [..., in] activations.
    kernel: [in, out] frozen base weight.
    bias: [out] frozen base bias or None.
    ctx: the forward context (`jaxadapt.context.Context`) or None; a bare `SingleLoRA` is
      accepted too (one adapter on this projection).
    path: this projection's module path (the key of `ctx.weights` and `ctx.routers`).

  Returns:
    [..., out] in x's dtype.
  """
  base = jnp.matmul(x, kernel.astype(x.dtype))
  if isinstance(ctx, Context):
    if path is None and (ctx.weights or ctx.routers):
      raise ValueError("project() needs the projection's path to read a Context that holds "
                       "adapters (the key of ctx.weights / ctx.routers)")
    view, router = ctx.view(path), ctx.router(path)
    routing = ctx.routing
  elif ctx is None or isinstance(ctx, SingleLoRA):
    view, router, routing = ctx, None, None
  else:
    raise TypeError(f"the projection context must be a jaxadapt Context, a SingleLoRA or None; "
                    f"got {type(ctx).__name__}")
  tp = ctx.tp if isinstance(ctx, Context) else None
  kind = None if tp is None else tp.kind(path)
  if kind is not None and view is not None and not (
      isinstance(view, Stack) and router is None and routing is not None
      and routing.layout == "token" and isinstance(view.a, kernels_pallas.PagedWeights)
      and view.dora_scale is None):
    raise ValueError(f"under tensor parallelism ({path}, {kind}-parallel) the hook serves "
                     f"pooled LoRA adapters with per-token routing (the S-LoRA engine); got "
                     f"{type(view).__name__}" + (f" with {routing.layout} routing"
                                                 if routing is not None else ""))
  if kind == "row":
    out = _tp_row(x, base, view, routing, tp)
  elif kind == "column" and view is not None:
    out = _tp_column(x, base, view, routing, tp)
  elif view is None:
    out = base
  elif isinstance(view, SingleLoRA):
    out = _single(x, kernel, base, view)
  elif isinstance(view, Stack):
    if router is not None and router.rows is not None:
      out = _routed_rows(x, base, view, router, routing, path)
    elif router is not None:
      ids, gates = _route(x, router, view.num_adapters, path)
      out = _gated(x, base, view, ids, gates)
    elif routing is None:
      raise ValueError(f"path {path} has a stack of adapters but the context has no routing "
                       f"(which adapter each row uses) and no router")
    elif routing.layout == "topk":
      out = _gated(x, base, view, routing.ids, routing.gates, routing.grouping)
    elif routing.layout == "token":
      out = _per_token(x, base, view, routing)
    else:
      out = _per_sequence(x, base, view, routing)
  else:
    raise TypeError(f"the weight view of {path} must be SingleLoRA, Stack or PoolView; got "
                    f"{type(view).__name__}")
  if bias is not None:
    out = out + bias.astype(out.dtype)
  return out
