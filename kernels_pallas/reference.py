"""Plain-jnp specification of the multi-adapter LoRA ops.

Every kernel in this package is tested against these functions. Layout follows JAX:
`A: [N, D, R]`, `B: [N, R, O]`, adapter `n` contributes `scale[n] * (x @ A[n]) @ B[n]`.
An adapter id below zero means "no adapter" for that token.

References:
  S-LoRA (Sheng et al., 2023), Sec. 5.1: shrink/expand of the heterogeneous batch.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def lora_shrink(x: jax.Array, a_stack: jax.Array, ids: jax.Array) -> jax.Array:
  """h[t] = x[t] @ A[ids[t]]; rows with ids < 0 are zero.

  Args:
    x: [T, D] tokens.
    a_stack: [N, D, R] shrink weights of N adapters (ranks padded with zeros to R).
    ids: [T] int adapter id per token, -1 for none.

  Returns:
    [T, R] in x's dtype, accumulated in float32.
  """
  valid = ids >= 0
  a = a_stack[jnp.where(valid, ids, 0)]  # [T, D, R]: the gather-einsum path.
  h = jnp.einsum("td,tdr->tr", x, a, preferred_element_type=jnp.float32)
  return jnp.where(valid[:, None], h, 0).astype(x.dtype)


def lora_expand(y: jax.Array, h: jax.Array, b_stack: jax.Array, ids: jax.Array,
                scales: jax.Array) -> jax.Array:
  """y[t] += scales[ids[t]] * h[t] @ B[ids[t]]; rows with ids < 0 unchanged.

  Args:
    y: [T, O] base output.
    h: [T, R] shrunk activations.
    b_stack: [N, R, O] expand weights.
    ids: [T] int adapter id per token, -1 for none.
    scales: [N] per-adapter scale (alpha / r or alpha / sqrt(r)).

  Returns:
    [T, O] in y's dtype.
  """
  valid = ids >= 0
  safe = jnp.where(valid, ids, 0)
  b = b_stack[safe]  # [T, R, O]
  d = jnp.einsum("tr,tro->to", h, b, preferred_element_type=jnp.float32)
  d = d * jnp.where(valid, scales[safe], 0).astype(jnp.float32)[:, None]
  return (y.astype(jnp.float32) + d).astype(y.dtype)


def lora_topk(y: jax.Array, x: jax.Array, a_stack: jax.Array, b_stack: jax.Array,
              scales: jax.Array, topk_ids: jax.Array, gates: jax.Array) -> jax.Array:
  """MeteoRA's gated mixture: y[t] += sum_j gates[t,j] * scale * (x[t] @ A[id]) @ B[id].

  Args:
    y: [T, O]; x: [T, D]; a_stack: [N, D, R]; b_stack: [N, R, O]; scales: [N].
    topk_ids: [T, K] adapter ids per token (-1 skips that slot).
    gates: [T, K] gate weights.

  References:
    MeteoRA (Xu et al., 2024), Eq. 3-4: top-k gated sum of LoRA outputs.
  """
  out = y.astype(jnp.float32)
  for j in range(topk_ids.shape[1]):
    ids = topk_ids[:, j]
    h = lora_shrink(x, a_stack, ids).astype(jnp.float32)
    h = h * gates[:, j:j + 1].astype(jnp.float32)
    out = lora_expand(out, h, b_stack.astype(jnp.float32), ids, scales)
  return out.astype(y.dtype)
