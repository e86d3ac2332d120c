"""Layers shared by every jaxadapt model family.

`Linear` is the only linear layer: it carries its module path (the Hugging Face / diffusers
module name, e.g. `model.layers.3.self_attn.q_proj` or `down_blocks.1.attentions.0.proj_in`)
and routes through the projection hook with the adapter context for that path.
`insert` (from `jaxadapt.context`) is the named insertion point diffusion models call at every
attention output, where AGD's and FACT's adapter modules attach without touching the base.
"""
from __future__ import annotations

from typing import Callable, Optional

import jax
import jax.numpy as jnp
from flax import nnx

from jaxadapt.adapters.hook import project

# (attention output, attention input hidden states, context or None) -> new attention output
InsertFn = Callable[[jax.Array, jax.Array, Optional[jax.Array]], jax.Array]


class Linear(nnx.Module):
  """A frozen linear layer that routes through the projection hook with its own path."""

  def __init__(self, din: int, dout: int, *, path: str, use_bias: bool = False,
               dtype=jnp.float32, rngs: nnx.Rngs):
    self.path = path
    self.kernel = nnx.Param(jax.random.normal(rngs.params(), (din, dout), dtype) * 0.02)
    self.bias = nnx.Param(jnp.zeros((dout,), dtype)) if use_bias else None

  def __call__(self, x, ctx=None):
    bias = None if self.bias is None else self.bias[...]
    return project(x, self.kernel[...], bias, ctx, self.path)
