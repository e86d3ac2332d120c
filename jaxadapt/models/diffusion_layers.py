"""Building blocks shared by jaxadapt's diffusion models (VAE, DiT, UNet).

Each module mirrors the diffusers module of the same name, attribute for attribute, so that a
parameter path such as `mid_block.resnets.0.conv1.kernel` is the checkpoint tensor
`mid_block.resnets.0.conv1.weight`. Layout conventions:

* Images are NHWC inside jaxadapt (convolutions are `lax.conv_general_dilated` with HWIO
  kernels); the public model entry points take and return NCHW as diffusers does.
* Conv kernels are stored HWIO, linear kernels `[in, out]`; `torch_name` converts torch's OIHW /
  `[out, in]` tensors at load time only.
* Every linear layer is `jaxadapt.models.layers.Linear` with `path=` the torch module name, so the
  forward context's view for that path applies to it; `Attention` calls the insertion point
  `insert(ctx, path, out, hidden_in, context)` with its own module path.

References:
  Ho et al. 2020, "Denoising Diffusion Probabilistic Models" (timestep embedding, ResNet blocks).
  Rombach et al. 2022, "High-Resolution Image Synthesis with Latent Diffusion Models".
  Vaswani et al. 2017, "Attention Is All You Need" (multi-head attention).
"""
from __future__ import annotations

import math
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxadapt.context import insert
from jaxadapt.io.hf import torch_name, torch_to_jax_layout  # noqa: F401  (the families' name map)
from jaxadapt.models import frozen
from jaxadapt.models.frozen import FrozenModel, apply  # noqa: F401  (re-exported)
from jaxadapt.models.layers import Linear

__all__ = [
    "Attention", "Conv2d", "Downsample2D", "Embedding", "FeedForward", "FrozenModel", "GELUProj", "GroupNorm",
    "Identity", "LayerNorm", "ResnetBlock2D", "TimestepEmbedding", "Upsample2D", "activation",
    "apply", "dot_product_attention", "load_params", "timestep_embedding", "torch_name",
    "torch_to_jax_layout", "upsample_nearest",
]


# ----------------------------------------------------------------------------- checkpoint names

# ----------------------------------------------------------------------------- activations

_ACTIVATIONS: dict[str, Callable] = {
    "swish": jax.nn.silu,
    "silu": jax.nn.silu,
    "mish": lambda x: x * jnp.tanh(jax.nn.softplus(x)),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
}


def activation(name: str) -> Callable:
  """The activation function diffusers/transformers call `name` (e.g. `silu`, `gelu`)."""
  if name not in _ACTIVATIONS:
    raise ValueError(f"activation {name!r} is not supported; expected one of "
                     f"{sorted(_ACTIVATIONS)}")
  return _ACTIVATIONS[name]


# ----------------------------------------------------------------------------- basic layers

class Identity(nnx.Module):
  """A parameter-free placeholder keeping torch's list indices (e.g. `nn.Dropout` at eval)."""

  def __call__(self, x, *args, **kwargs):
    return x


class Embedding(nnx.Module):
  """`nn.Embedding`: a `[num, dim]` table named `embedding` here (torch's `weight`)."""

  def __init__(self, num: int, dim: int, *, dtype=jnp.float32, rngs: nnx.Rngs):
    self.embedding = nnx.Param(jax.random.normal(rngs.params(), (num, dim), dtype) * 0.02)

  def __call__(self, ids):
    return jnp.take(self.embedding[...], ids, axis=0)


class Conv2d(nnx.Module):
  """`nn.Conv2d` on NHWC activations with an HWIO `kernel` (torch `weight`, OIHW, at load)."""

  def __init__(self, in_channels: int, out_channels: int, kernel_size: int | Sequence[int], *,
               stride: int = 1, padding: int = 0, use_bias: bool = True, dtype=jnp.float32,
               rngs: nnx.Rngs):
    kh, kw = (kernel_size, kernel_size) if isinstance(kernel_size, int) else tuple(kernel_size)
    fan_in = in_channels * kh * kw
    self.kernel = nnx.Param(jax.random.normal(rngs.params(), (kh, kw, in_channels, out_channels),
                                              dtype) / math.sqrt(fan_in))
    self.bias = nnx.Param(jnp.zeros((out_channels,), dtype)) if use_bias else None
    self.stride = stride
    self.padding = padding

  def __call__(self, x):  # [B, H, W, Cin] -> [B, H', W', Cout]
    p = self.padding
    y = jax.lax.conv_general_dilated(
        x, self.kernel[...].astype(x.dtype), window_strides=(self.stride, self.stride),
        padding=((p, p), (p, p)), dimension_numbers=("NHWC", "HWIO", "NHWC"))
    if self.bias is not None:
      y = y + self.bias[...].astype(y.dtype)
    return y


class GroupNorm(nnx.Module):
  """`nn.GroupNorm` over the last (channel) axis of `[B, ..., C]`, statistics in float32.

  References: Wu & He 2018, "Group Normalization".
  """

  def __init__(self, num_groups: int, num_channels: int, *, eps: float = 1e-5,
               affine: bool = True, dtype=jnp.float32):
    if num_channels % num_groups:
      raise ValueError(f"GroupNorm: num_channels ({num_channels}) must be a multiple of "
                       f"num_groups ({num_groups})")
    self.num_groups = num_groups
    self.eps = eps
    self.weight = nnx.Param(jnp.ones((num_channels,), dtype)) if affine else None
    self.bias = nnx.Param(jnp.zeros((num_channels,), dtype)) if affine else None

  def __call__(self, x):
    b, c = x.shape[0], x.shape[-1]
    h = x.astype(jnp.float32).reshape(b, -1, self.num_groups, c // self.num_groups)
    mean = jnp.mean(h, axis=(1, 3), keepdims=True)
    var = jnp.mean(jnp.square(h - mean), axis=(1, 3), keepdims=True)
    h = ((h - mean) * jax.lax.rsqrt(var + self.eps)).reshape(x.shape)
    if self.weight is not None:
      h = h * self.weight[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
    return h.astype(x.dtype)


class LayerNorm(nnx.Module):
  """`nn.LayerNorm` over the last axis, statistics in float32 (affine params optional)."""

  def __init__(self, dim: int, *, eps: float = 1e-5, elementwise_affine: bool = True,
               use_bias: bool = True, dtype=jnp.float32):
    self.eps = eps
    self.weight = nnx.Param(jnp.ones((dim,), dtype)) if elementwise_affine else None
    self.bias = (nnx.Param(jnp.zeros((dim,), dtype)) if elementwise_affine and use_bias
                 else None)

  def __call__(self, x):
    h = x.astype(jnp.float32)
    mean = jnp.mean(h, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(h - mean), axis=-1, keepdims=True)
    h = (h - mean) * jax.lax.rsqrt(var + self.eps)
    if self.weight is not None:
      h = h * self.weight[...].astype(jnp.float32)
    if self.bias is not None:
      h = h + self.bias[...].astype(jnp.float32)
    return h.astype(x.dtype)


# ----------------------------------------------------------------------------- timesteps

def timestep_embedding(timesteps: jax.Array, embedding_dim: int, *,
                       flip_sin_to_cos: bool = False, downscale_freq_shift: float = 1.0,
                       scale: float = 1.0, max_period: float = 10000.0) -> jax.Array:
  """Sinusoidal timestep embedding `[N] -> [N, embedding_dim]` (float32), as diffusers' `Timesteps`.

  Frequencies `exp(-log(max_period) * i / (half - downscale_freq_shift))`, `[sin, cos]` (or
  `[cos, sin]` with `flip_sin_to_cos`), zero-padded to an odd `embedding_dim`.

  References: Vaswani et al. 2017 Sec. 3.5; Ho et al. 2020 (DDPM) Appendix B.
  """
  t = jnp.asarray(timesteps)
  if t.ndim != 1:
    raise ValueError(f"timesteps must be 1-D [batch], got shape {t.shape}")
  half = embedding_dim // 2
  exponent = -math.log(max_period) * jnp.arange(half, dtype=jnp.float32)
  freqs = jnp.exp(exponent / (half - downscale_freq_shift))
  args = scale * (t.astype(jnp.float32)[:, None] * freqs[None, :])
  sin, cos = jnp.sin(args), jnp.cos(args)
  emb = jnp.concatenate([cos, sin] if flip_sin_to_cos else [sin, cos], axis=-1)
  if embedding_dim % 2:
    emb = jnp.pad(emb, ((0, 0), (0, 1)))
  return emb


class TimestepEmbedding(nnx.Module):
  """diffusers' `TimestepEmbedding`: `linear_2(act(linear_1(x)))` (optional post activation)."""

  def __init__(self, in_channels: int, time_embed_dim: int, *, path: str,
               act_fn: str = "silu", out_dim: Optional[int] = None,
               post_act_fn: Optional[str] = None, sample_proj_bias: bool = True,
               dtype=jnp.float32, rngs: nnx.Rngs):
    self.act_fn = act_fn
    self.post_act_fn = post_act_fn
    self.linear_1 = Linear(in_channels, time_embed_dim, path=f"{path}.linear_1",
                           use_bias=sample_proj_bias, dtype=dtype, rngs=rngs)
    self.linear_2 = Linear(time_embed_dim, out_dim or time_embed_dim, path=f"{path}.linear_2",
                           use_bias=sample_proj_bias, dtype=dtype, rngs=rngs)

  def __call__(self, x, ctx=None):
    h = activation(self.act_fn)(self.linear_1(x, ctx))
    h = self.linear_2(h, ctx)
    return activation(self.post_act_fn)(h) if self.post_act_fn else h


# ----------------------------------------------------------------------------- resnets, samplers

class ResnetBlock2D(nnx.Module):
  """diffusers' `ResnetBlock2D` on NHWC: GroupNorm-act-conv twice, timestep added in between.

  `time_embedding_norm="default"` adds `time_emb_proj(act(temb))` before `norm2`;
  `"scale_shift"` applies `norm2(h) * (1 + scale) + shift`. The residual goes through a 1x1
  `conv_shortcut` when the channel count changes. Output is divided by `output_scale_factor`.

  References: He et al. 2016 (ResNet); Ho et al. 2020 (DDPM) Appendix B.
  """

  def __init__(self, *, in_channels: int, out_channels: Optional[int] = None, path: str,
               temb_channels: Optional[int] = 512, groups: int = 32,
               groups_out: Optional[int] = None, eps: float = 1e-6,
               non_linearity: str = "swish", time_embedding_norm: str = "default",
               skip_time_act: bool = False, output_scale_factor: float = 1.0,
               use_in_shortcut: Optional[bool] = None, conv_shortcut_bias: bool = True,
               conv_2d_out_channels: Optional[int] = None, dtype=jnp.float32,
               rngs: nnx.Rngs):
    if time_embedding_norm not in ("default", "scale_shift"):
      raise ValueError(f"ResnetBlock2D: time_embedding_norm {time_embedding_norm!r} is not "
                       "supported (expected 'default' or 'scale_shift')")
    out_channels = out_channels or in_channels
    conv_out = conv_2d_out_channels or out_channels
    self.non_linearity = non_linearity
    self.time_embedding_norm = time_embedding_norm
    self.skip_time_act = skip_time_act
    self.output_scale_factor = output_scale_factor
    self.norm1 = GroupNorm(groups, in_channels, eps=eps, dtype=dtype)
    self.conv1 = Conv2d(in_channels, out_channels, 3, padding=1, dtype=dtype, rngs=rngs)
    if temb_channels is not None:
      mult = 2 if time_embedding_norm == "scale_shift" else 1
      self.time_emb_proj = Linear(temb_channels, mult * out_channels,
                                  path=f"{path}.time_emb_proj", use_bias=True, dtype=dtype,
                                  rngs=rngs)
    else:
      self.time_emb_proj = None
    self.norm2 = GroupNorm(groups_out or groups, out_channels, eps=eps, dtype=dtype)
    self.conv2 = Conv2d(out_channels, conv_out, 3, padding=1, dtype=dtype, rngs=rngs)
    shortcut = in_channels != conv_out if use_in_shortcut is None else use_in_shortcut
    self.conv_shortcut = (Conv2d(in_channels, conv_out, 1, use_bias=conv_shortcut_bias,
                                 dtype=dtype, rngs=rngs) if shortcut else None)

  def __call__(self, x, temb=None, ctx=None):  # x [B, H, W, C]; temb [B, temb_channels]
    act = activation(self.non_linearity)
    h = self.conv1(act(self.norm1(x)))
    t = None
    if self.time_emb_proj is not None and temb is not None:
      t = temb if self.skip_time_act else act(temb)
      t = self.time_emb_proj(t.astype(h.dtype), ctx)[:, None, None, :]
    if self.time_embedding_norm == "default":
      h = self.norm2(h if t is None else h + t)
    else:
      if t is None:
        raise ValueError("ResnetBlock2D with time_embedding_norm='scale_shift' needs temb")
      scale, shift = jnp.split(t, 2, axis=-1)
      h = self.norm2(h) * (1 + scale) + shift
    h = self.conv2(act(h))
    residual = x if self.conv_shortcut is None else self.conv_shortcut(x)
    return (residual + h) / self.output_scale_factor


class Downsample2D(nnx.Module):
  """diffusers' `Downsample2D` (NHWC): stride-2 3x3 `conv`, or 2x2 average pooling.

  `padding=0` pads right/bottom by one first (the LDM VAE encoder's asymmetric padding).
  """

  def __init__(self, channels: int, *, use_conv: bool = False,
               out_channels: Optional[int] = None, padding: int = 1, kernel_size: int = 3,
               dtype=jnp.float32, rngs: nnx.Rngs):
    out_channels = out_channels or channels
    self.use_conv = use_conv
    self.padding = padding
    if use_conv:
      self.conv = Conv2d(channels, out_channels, kernel_size, stride=2, padding=padding,
                         dtype=dtype, rngs=rngs)
    elif out_channels != channels:
      raise ValueError(f"Downsample2D without conv keeps channels ({channels}), got "
                       f"out_channels={out_channels}")

  def __call__(self, x):
    if not self.use_conv:
      b, h, w, c = x.shape
      return x.reshape(b, h // 2, 2, w // 2, 2, c).mean(axis=(2, 4))
    if self.padding == 0:
      x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
    return self.conv(x)


def upsample_nearest(x, size: Optional[tuple[int, int]] = None):
  """Nearest-neighbour upsampling of NHWC `x` by 2 (or to `size`), as torch `F.interpolate`."""
  b, h, w, c = x.shape
  if size is None:
    return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
  oh, ow = size
  rows = np.floor(np.arange(oh) * (h / oh)).astype(np.int32)
  cols = np.floor(np.arange(ow) * (w / ow)).astype(np.int32)
  return x[:, rows][:, :, cols]


class Upsample2D(nnx.Module):
  """diffusers' `Upsample2D` (NHWC): nearest 2x upsampling, then an optional 3x3 `conv`."""

  def __init__(self, channels: int, *, use_conv: bool = False,
               out_channels: Optional[int] = None, kernel_size: int = 3, padding: int = 1,
               dtype=jnp.float32, rngs: nnx.Rngs):
    out_channels = out_channels or channels
    self.conv = (Conv2d(channels, out_channels, kernel_size, padding=padding, dtype=dtype,
                        rngs=rngs) if use_conv else None)

  def __call__(self, x, output_size: Optional[tuple[int, int]] = None):
    x = upsample_nearest(x, output_size)
    return x if self.conv is None else self.conv(x)


# ----------------------------------------------------------------------------- attention

QUERY_BLOCK = 1024  # queries per step of the chunked attention (bounds the score memory)


def _attend(q, k, v, scale, mask):
  """q [B, Nq, H, d], k/v [B, Nk, H, d] -> [B, Nq, H, d]; scores and softmax in float32."""
  scores = jnp.einsum("bqhd,bkhd->bhqk", q.astype(jnp.float32), k.astype(jnp.float32)) * scale
  if mask is not None:
    scores = jnp.where(mask, scores, -1e30)
  probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
  return jnp.einsum("bhqk,bkhd->bqhd", probs, v)


def dot_product_attention(q, k, v, heads: int, scale: float, mask=None, *,
                          query_block: Optional[int] = None):
  """Multi-head softmax attention; q `[B, Nq, H*d]`, k/v `[B, Nk, H*d]` -> `[B, Nq, H*d]`.

  Scores and softmax in float32. `mask`: boolean, broadcastable to `[B, H, Nq, Nk]`. Without a
  mask and with more than `query_block` queries (default: the module's QUERY_BLOCK, read at
  trace time), the queries run in blocks (`lax.map`), so the
  scores held at once are `[B, H, query_block, Nk]` instead of `[B, H, Nq, Nk]` (1 GiB for a
  64x64 latent at B=2, 8 heads); each row's softmax is unchanged, so the result is the same.

  References: Vaswani et al. 2017, Sec. 3.2.1 (scaled dot-product attention).
  """
  query_block = QUERY_BLOCK if query_block is None else query_block
  b, nq, _ = q.shape
  nk = k.shape[1]
  q = q.reshape(b, nq, heads, -1)
  k = k.reshape(b, nk, heads, -1)
  v = v.reshape(b, nk, heads, -1)
  if mask is not None or nq <= query_block:
    return _attend(q, k, v, scale, mask).reshape(b, nq, -1)
  pad = (-nq) % query_block
  blocks = jnp.pad(q, ((0, 0), (0, pad), (0, 0), (0, 0)))
  blocks = blocks.reshape(b, -1, query_block, heads, q.shape[-1]).swapaxes(0, 1)
  out = jax.lax.map(lambda qb: _attend(qb, k, v, scale, None), blocks)  # [C, B, blk, H, dv]
  return out.swapaxes(0, 1).reshape(b, nq + pad, -1)[:, :nq]


class Attention(nnx.Module):
  """diffusers' `Attention` (default processor): optional GroupNorm, q/k/v, heads, `to_out.0`.

  Self-attention when `context` is None, cross-attention over `context` otherwise. After
  `to_out` it calls the insertion point named by its module path,
  `insert(ctx, path, out, hidden_in, context)` with `out` the attention output `[B, N, C]`
  (before any residual) and `hidden_in` the tokens given to this module `[B, N, C]`; then adds
  the residual (`residual_connection`) and divides by `rescale_output_factor`.

  References: Vaswani et al. 2017 Sec. 3.2.
  """

  def __init__(self, query_dim: int, *, path: str, heads: int = 8, dim_head: int = 64,
               cross_attention_dim: Optional[int] = None, bias: bool = False,
               out_bias: bool = True, out_dim: Optional[int] = None,
               norm_num_groups: Optional[int] = None, eps: float = 1e-5,
               residual_connection: bool = False, rescale_output_factor: float = 1.0,
               scale_qk: bool = True, dtype=jnp.float32, rngs: nnx.Rngs):
    self.path = path
    self.heads = heads
    self.scale = dim_head ** -0.5 if scale_qk else 1.0
    self.residual_connection = residual_connection
    self.rescale_output_factor = rescale_output_factor
    inner = heads * dim_head
    kv_dim = cross_attention_dim or query_dim
    self.group_norm = (GroupNorm(norm_num_groups, query_dim, eps=eps, dtype=dtype)
                       if norm_num_groups else None)
    mk = lambda name, i, o, b: Linear(i, o, path=f"{path}.{name}", use_bias=b, dtype=dtype,
                                      rngs=rngs)
    self.to_q = mk("to_q", query_dim, inner, bias)
    self.to_k = mk("to_k", kv_dim, inner, bias)
    self.to_v = mk("to_v", kv_dim, inner, bias)
    self.to_out = nnx.List([mk("to_out.0", inner, out_dim or query_dim, out_bias)])

  def __call__(self, x, context=None, *, mask=None, ctx=None):
    """x: `[B, N, C]` tokens or an NHWC map `[B, H, W, C]` (returned in the same shape)."""
    shape = x.shape
    tokens = x.reshape(shape[0], -1, shape[-1]) if x.ndim == 4 else x
    h = tokens if self.group_norm is None else self.group_norm(tokens)
    kv = h if context is None else context
    q, k, v = self.to_q(h, ctx), self.to_k(kv, ctx), self.to_v(kv, ctx)
    out = self.to_out[0](dot_product_attention(q, k, v, self.heads, self.scale, mask), ctx)
    out = insert(ctx, self.path, out, tokens, context)
    if self.residual_connection:
      out = out + tokens
    out = out / self.rescale_output_factor if self.rescale_output_factor != 1.0 else out
    return out.reshape(shape[:-1] + out.shape[-1:]) if x.ndim == 4 else out


# ----------------------------------------------------------------------------- feed-forward

class GELUProj(nnx.Module):
  """diffusers' `GELU`/`GEGLU` activation module: `proj` then GELU (or GELU-gated halves)."""

  def __init__(self, dim_in: int, dim_out: int, *, path: str, kind: str, bias: bool = True,
               dtype=jnp.float32, rngs: nnx.Rngs):
    self.kind = kind
    mult = 2 if kind == "geglu" else 1
    self.proj = Linear(dim_in, mult * dim_out, path=f"{path}.proj", use_bias=bias, dtype=dtype,
                       rngs=rngs)

  def __call__(self, x, ctx=None):
    h = self.proj(x, ctx)
    if self.kind == "geglu":
      h, gate = jnp.split(h, 2, axis=-1)
      return h * jax.nn.gelu(gate, approximate=False)
    return jax.nn.gelu(h, approximate=self.kind == "gelu-approximate")


class FeedForward(nnx.Module):
  """diffusers' `FeedForward`: `net.0` (GELU/GEGLU projection), `net.1` dropout, `net.2` linear.

  `activation_fn` is one of "gelu", "gelu-approximate" (tanh) or "geglu" (Shazeer 2020).
  """

  def __init__(self, dim: int, *, path: str, dim_out: Optional[int] = None, mult: int = 4,
               activation_fn: str = "geglu", inner_dim: Optional[int] = None,
               bias: bool = True, dtype=jnp.float32, rngs: nnx.Rngs):
    if activation_fn not in ("gelu", "gelu-approximate", "geglu"):
      raise ValueError(f"FeedForward: activation_fn {activation_fn!r} is not supported "
                       "(expected 'gelu', 'gelu-approximate' or 'geglu')")
    inner = inner_dim or int(dim * mult)
    self.net = nnx.List([
        GELUProj(dim, inner, path=f"{path}.net.0", kind=activation_fn, bias=bias, dtype=dtype,
                 rngs=rngs),
        Identity(),
        Linear(inner, dim_out or dim, path=f"{path}.net.2", use_bias=bias, dtype=dtype,
               rngs=rngs),
    ])

  def __call__(self, x, ctx=None):
    return self.net[2](self.net[0](x, ctx), ctx)




def load_params(directory: str, build, *, dtype=jnp.float32, sharding=None,
                stem: str = "diffusion_pytorch_model", name_fn: Callable = torch_name):
  """`frozen.load_params` with diffusers' defaults (file stem, torch layout names)."""
  return frozen.load_params(directory, build, dtype=dtype, sharding=sharding, stem=stem,
                            name_fn=name_fn)
