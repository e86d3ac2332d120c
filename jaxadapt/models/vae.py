"""The KL autoencoder of latent diffusion (diffusers' `AutoencoderKL`) in Flax NNX.

Latent Diffusion (Rombach et al. 2022, "High-Resolution Image Synthesis with Latent Diffusion
Models", Sec. 3.1 and Appendix G): a convolutional encoder maps an image to the mean and
log-variance of a diagonal Gaussian over a downsampled latent (KL-regularised), a decoder maps
latents back to pixels. Diffusion runs on `scaling_factor * (z - shift_factor)`.

The module tree mirrors diffusers' names (`encoder.down_blocks.0.resnets.1.conv1`,
`decoder.mid_block.attentions.0.to_q`): convolutions are NHWC with HWIO kernels internally, the
mid-block attention projections are `Linear`s with their diffusers paths (LoRA targets), and the
mid-block attention calls the insertion points `encoder.mid_block.attentions.0` and
`decoder.mid_block.attentions.0`. Public inputs and outputs are NCHW, as in diffusers.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping, NamedTuple, Optional

import jax
import jax.numpy as jnp
from flax import nnx

from jaxadapt.io.hf import read_config
from jaxadapt.io.safetensors_mmap import CheckpointDir
from jaxadapt.models import diffusion_layers as dl

DOWN_BLOCK = "DownEncoderBlock2D"
UP_BLOCK = "UpDecoderBlock2D"


@dataclasses.dataclass(frozen=True, kw_only=True)
class VAEConfig:
  """Architecture of an `AutoencoderKL`, read from a diffusers `config.json`."""
  in_channels: int = 3
  out_channels: int = 3
  block_out_channels: tuple = (64,)     # channels per resolution level, encoder order
  layers_per_block: int = 1             # resnets per encoder level (decoder: one more)
  act_fn: str = "silu"
  latent_channels: int = 4
  norm_num_groups: int = 32
  scaling_factor: float = 0.18215       # latents for diffusion: scaling_factor * (z - shift)
  shift_factor: Optional[float] = None  # None = 0 (SD 1.x/2.x/XL); set for SD3 / Flux VAEs
  latents_mean: Optional[tuple] = None  # per-channel latent statistics (some SDXL variants)
  latents_std: Optional[tuple] = None
  use_quant_conv: bool = True
  use_post_quant_conv: bool = True
  mid_block_add_attention: bool = True

  def __post_init__(self):
    dl.activation(self.act_fn)  # raises on an unknown activation
    if (self.latents_mean is None) != (self.latents_std is None):
      raise ValueError("latents_mean and latents_std must be given together")
    for ch in self.block_out_channels:
      if ch % self.norm_num_groups:
        raise ValueError(f"block_out_channels {self.block_out_channels} must be multiples of "
                         f"norm_num_groups ({self.norm_num_groups})")

  @property
  def downsample_factor(self) -> int:
    return 2 ** (len(self.block_out_channels) - 1)

  @classmethod
  def from_config(cls, cfg: Mapping[str, Any]) -> "VAEConfig":
    """Builds the config from a diffusers `config.json`; refuses what it cannot run."""
    name = cfg.get("_class_name", "AutoencoderKL")
    if name != "AutoencoderKL":
      raise ValueError(f"config.json is a {name!r}; expected 'AutoencoderKL' (e.g. Stable "
                       "Diffusion's vae/)")
    n = len(cfg.get("block_out_channels", (64,)))
    for key, kind in (("down_block_types", DOWN_BLOCK), ("up_block_types", UP_BLOCK)):
      types = tuple(cfg.get(key, (kind,) * n))
      if types != (kind,) * n:
        raise ValueError(f"config.json has {key}={list(types)}; jaxadapt's VAE supports only "
                         f"{n} x {kind!r}")
    tup = lambda v: None if v is None else tuple(float(x) for x in v)
    return cls(
        in_channels=cfg.get("in_channels", 3),
        out_channels=cfg.get("out_channels", 3),
        block_out_channels=tuple(cfg.get("block_out_channels", (64,))),
        layers_per_block=cfg.get("layers_per_block", 1),
        act_fn=cfg.get("act_fn", "silu"),
        latent_channels=cfg.get("latent_channels", 4),
        norm_num_groups=cfg.get("norm_num_groups", 32),
        scaling_factor=float(cfg.get("scaling_factor", 0.18215)),
        shift_factor=None if cfg.get("shift_factor") is None else float(cfg["shift_factor"]),
        latents_mean=tup(cfg.get("latents_mean")),
        latents_std=tup(cfg.get("latents_std")),
        use_quant_conv=bool(cfg.get("use_quant_conv", True)),
        use_post_quant_conv=bool(cfg.get("use_post_quant_conv", True)),
        mid_block_add_attention=bool(cfg.get("mid_block_add_attention", True)),
    )


class LatentDist(NamedTuple):
  """The encoder's diagonal Gaussian posterior q(z|x) (LDM Sec. 3.1), NCHW."""
  mean: jax.Array    # [B, latent_channels, h, w]
  logvar: jax.Array  # same shape, clamped to [-30, 20] as diffusers

  @property
  def std(self) -> jax.Array:
    return jnp.exp(0.5 * self.logvar)

  def mode(self) -> jax.Array:
    return self.mean

  def sample(self, key: jax.Array) -> jax.Array:
    """`mean + std * eps`, `eps ~ N(0, I)` drawn from `key` (reparameterisation)."""
    eps = jax.random.normal(key, self.mean.shape, jnp.float32).astype(self.mean.dtype)
    return self.mean + self.std * eps

  def kl(self) -> jax.Array:
    """KL(q(z|x) || N(0, I)) per example, summed over latent dims (LDM's KL regulariser)."""
    return 0.5 * jnp.sum(jnp.square(self.mean) + jnp.exp(self.logvar) - 1.0 - self.logvar,
                         axis=(1, 2, 3))


def _resnet(c: VAEConfig, path, cin, cout, dtype, rngs):
  return dl.ResnetBlock2D(in_channels=cin, out_channels=cout, path=path, temb_channels=None,
                          groups=c.norm_num_groups, eps=1e-6, non_linearity=c.act_fn,
                          dtype=dtype, rngs=rngs)


class MidBlock(nnx.Module):
  """diffusers' `UNetMidBlock2D` without time embedding: resnet, attention, resnet."""

  def __init__(self, c: VAEConfig, prefix: str, dtype, rngs):
    ch = c.block_out_channels[-1]
    self.resnets = nnx.List([_resnet(c, f"{prefix}.resnets.{i}", ch, ch, dtype, rngs)
                             for i in range(2)])
    # One head of width `ch` over all positions, GroupNorm first, residual inside.
    self.attentions = (nnx.List([dl.Attention(
        ch, path=f"{prefix}.attentions.0", heads=1, dim_head=ch, bias=True,
        norm_num_groups=c.norm_num_groups, eps=1e-6, residual_connection=True, dtype=dtype,
        rngs=rngs)]) if c.mid_block_add_attention else None)

  def __call__(self, x, ctx):
    x = self.resnets[0](x, None, ctx)
    if self.attentions is not None:
      x = self.attentions[0](x, ctx=ctx)
    return self.resnets[1](x, None, ctx)


class DownEncoderBlock2D(nnx.Module):
  def __init__(self, c: VAEConfig, prefix: str, cin: int, cout: int, last: bool, dtype, rngs):
    self.resnets = nnx.List([
        _resnet(c, f"{prefix}.resnets.{i}", cin if i == 0 else cout, cout, dtype, rngs)
        for i in range(c.layers_per_block)])
    self.downsamplers = (None if last else nnx.List([
        dl.Downsample2D(cout, use_conv=True, padding=0, dtype=dtype, rngs=rngs)]))

  def __call__(self, x, ctx):
    for resnet in self.resnets:
      x = resnet(x, None, ctx)
    return x if self.downsamplers is None else self.downsamplers[0](x)


class UpDecoderBlock2D(nnx.Module):
  def __init__(self, c: VAEConfig, prefix: str, cin: int, cout: int, last: bool, dtype, rngs):
    self.resnets = nnx.List([
        _resnet(c, f"{prefix}.resnets.{i}", cin if i == 0 else cout, cout, dtype, rngs)
        for i in range(c.layers_per_block + 1)])
    self.upsamplers = (None if last else nnx.List([
        dl.Upsample2D(cout, use_conv=True, dtype=dtype, rngs=rngs)]))

  def __call__(self, x, ctx):
    for resnet in self.resnets:
      x = resnet(x, None, ctx)
    return x if self.upsamplers is None else self.upsamplers[0](x)


class Encoder(nnx.Module):
  """Image `[B, H, W, C]` -> Gaussian moments `[B, H/f, W/f, 2 * latent_channels]` (NHWC)."""

  def __init__(self, c: VAEConfig, dtype, rngs):
    chans = c.block_out_channels
    self.conv_in = dl.Conv2d(c.in_channels, chans[0], 3, padding=1, dtype=dtype, rngs=rngs)
    self.down_blocks = nnx.List([
        DownEncoderBlock2D(c, f"encoder.down_blocks.{i}", chans[max(i - 1, 0)], chans[i],
                           i == len(chans) - 1, dtype, rngs) for i in range(len(chans))])
    self.mid_block = MidBlock(c, "encoder.mid_block", dtype, rngs)
    self.conv_norm_out = dl.GroupNorm(c.norm_num_groups, chans[-1], eps=1e-6, dtype=dtype)
    self.conv_out = dl.Conv2d(chans[-1], 2 * c.latent_channels, 3, padding=1, dtype=dtype,
                              rngs=rngs)

  def __call__(self, x, ctx):
    x = self.conv_in(x)
    for block in self.down_blocks:
      x = block(x, ctx)
    x = self.mid_block(x, ctx)
    # diffusers' conv_act is SiLU whatever act_fn is (act_fn sets the resnets only).
    return self.conv_out(jax.nn.silu(self.conv_norm_out(x)))


class Decoder(nnx.Module):
  """Latent `[B, h, w, latent_channels]` -> image `[B, h*f, w*f, out_channels]` (NHWC)."""

  def __init__(self, c: VAEConfig, dtype, rngs):
    chans = tuple(reversed(c.block_out_channels))
    self.conv_in = dl.Conv2d(c.latent_channels, chans[0], 3, padding=1, dtype=dtype, rngs=rngs)
    self.mid_block = MidBlock(c, "decoder.mid_block", dtype, rngs)
    self.up_blocks = nnx.List([
        UpDecoderBlock2D(c, f"decoder.up_blocks.{i}", chans[max(i - 1, 0)], chans[i],
                         i == len(chans) - 1, dtype, rngs) for i in range(len(chans))])
    self.conv_norm_out = dl.GroupNorm(c.norm_num_groups, chans[-1], eps=1e-6, dtype=dtype)
    self.conv_out = dl.Conv2d(chans[-1], c.out_channels, 3, padding=1, dtype=dtype, rngs=rngs)

  def __call__(self, z, ctx):
    x = self.mid_block(self.conv_in(z), ctx)
    for block in self.up_blocks:
      x = block(x, ctx)
    # diffusers' conv_act is SiLU whatever act_fn is (act_fn sets the resnets only).
    return self.conv_out(jax.nn.silu(self.conv_norm_out(x)))


class AutoencoderKL(nnx.Module):
  """The LDM KL autoencoder (Rombach et al. 2022), as diffusers' `AutoencoderKL`.

  `encode(sample)` -> `LatentDist` of the NCHW image `sample` in [-1, 1];
  `decode(z)` -> NCHW image from unscaled latents `z`. Both take `ctx=`, the forward
  `Context` (adapters on the mid-block attention projections; inserts at
  `encoder.mid_block.attentions.0`, `decoder.mid_block.attentions.0`).
  """

  def __init__(self, config: VAEConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
    c = config
    self.config = config
    self.encoder = Encoder(c, dtype, rngs)
    self.decoder = Decoder(c, dtype, rngs)
    lc = c.latent_channels
    self.quant_conv = (dl.Conv2d(2 * lc, 2 * lc, 1, dtype=dtype, rngs=rngs)
                       if c.use_quant_conv else None)
    self.post_quant_conv = (dl.Conv2d(lc, lc, 1, dtype=dtype, rngs=rngs)
                            if c.use_post_quant_conv else None)

  def _dtype(self):
    return self.encoder.conv_in.kernel[...].dtype

  def encode(self, sample, *, ctx=None) -> LatentDist:
    x = jnp.transpose(sample, (0, 2, 3, 1)).astype(self._dtype())
    h = self.encoder(x, ctx)
    if self.quant_conv is not None:
      h = self.quant_conv(h)
    mean, logvar = jnp.split(jnp.transpose(h, (0, 3, 1, 2)), 2, axis=1)
    return LatentDist(mean, jnp.clip(logvar, -30.0, 20.0))

  def decode(self, z, *, ctx=None):
    h = jnp.transpose(z, (0, 2, 3, 1)).astype(self._dtype())
    if self.post_quant_conv is not None:
      h = self.post_quant_conv(h)
    return jnp.transpose(self.decoder(h, ctx), (0, 3, 1, 2))

  def __call__(self, sample, key=None, *, ctx=None):
    """Reconstruction: decode a posterior sample (with `key`) or its mode (without)."""
    dist = self.encode(sample, ctx=ctx)
    z = dist.mode() if key is None else dist.sample(key)
    return self.decode(z, ctx=ctx)


class VAE(dl.FrozenModel):
  """A frozen `AutoencoderKL`: `config`, `graphdef`, `params` (pure dict); jitted calls."""

  def _check(self, x, channels, what):
    x = jnp.asarray(x)
    if x.ndim != 4 or x.shape[1] != channels:
      raise ValueError(f"{what} must be [batch, {channels}, height, width] (NCHW), got shape "
                       f"{x.shape}")
    return x

  def encode(self, sample, *, adapter=None, context=None, inserts=None) -> LatentDist:
    """The posterior `LatentDist(mean, logvar)` of images `sample` [B, C, H, W] in [-1, 1]."""
    f = self.config.downsample_factor
    sample = self._check(sample, self.config.in_channels, "sample")
    if sample.shape[2] % f or sample.shape[3] % f:
      raise ValueError(f"image height/width {sample.shape[2:]} must be multiples of {f}")
    return self._call("encode", (sample,), adapter=adapter, context=context, inserts=inserts)

  def decode(self, z, *, adapter=None, context=None, inserts=None) -> jax.Array:
    """Images [B, out_channels, h*f, w*f] from unscaled latents `z` [B, latent_channels, h, w]."""
    z = self._check(z, self.config.latent_channels, "z")
    return self._call("decode", (z,), adapter=adapter, context=context, inserts=inserts)

  def __call__(self, sample, key=None, *, adapter=None, context=None, inserts=None) -> jax.Array:
    sample = self._check(sample, self.config.in_channels, "sample")
    return self._call("__call__", (sample, key), adapter=adapter, context=context,
                      inserts=inserts)

  def scale_latents(self, z: jax.Array) -> jax.Array:
    """Encoder latents -> the diffusion model's latent space, as diffusers' pipelines do.

    `(z - shift_factor) * scaling_factor`, or `(z - mean) * scaling_factor / std` when the config
    carries per-channel `latents_mean`/`latents_std`.
    """
    c = self.config
    if c.latents_mean is not None:
      mean = jnp.asarray(c.latents_mean, z.dtype).reshape(1, -1, 1, 1)
      std = jnp.asarray(c.latents_std, z.dtype).reshape(1, -1, 1, 1)
      return (z - mean) * c.scaling_factor / std
    return (z - (c.shift_factor or 0.0)) * c.scaling_factor

  def unscale_latents(self, latents: jax.Array) -> jax.Array:
    """The inverse of `scale_latents` (apply before `decode`)."""
    c = self.config
    if c.latents_mean is not None:
      mean = jnp.asarray(c.latents_mean, latents.dtype).reshape(1, -1, 1, 1)
      std = jnp.asarray(c.latents_std, latents.dtype).reshape(1, -1, 1, 1)
      return latents * std / c.scaling_factor + mean
    return latents / c.scaling_factor + (c.shift_factor or 0.0)


_LEGACY_ATTENTION = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}


def _vae_name_fn(names):
  """`torch_name`, falling back to the legacy attention names (`query`, ..., `proj_attn`) and
  accepting 1x1-conv attention weights `[C, C, 1, 1]` of older checkpoints."""

  def name_fn(path: str):
    name, transform = dl.torch_name(path)
    if name not in names and ".attentions." in name:
      for new, old in _LEGACY_ATTENTION.items():
        name = name.replace(f".{new}.", f".{old}.")
    if transform is dl.torch_to_jax_layout and ".attentions." in name:
      return name, lambda a: a.reshape(a.shape[:2]).T
    return name, transform

  return name_fn


def load_vae(directory: str, *, dtype=jnp.float32, sharding=None) -> VAE:
  """Loads a diffusers `AutoencoderKL` dir (config.json + diffusion_pytorch_model.safetensors).

  Args:
    directory: e.g. Stable Diffusion's `vae/`.
    dtype: parameter dtype (float32 or bfloat16).
    sharding: None, a Sharding, a Mesh or callable(path, shape) (see `jaxadapt.io.hf`).
  """
  config = VAEConfig.from_config(read_config(directory))
  names = set(CheckpointDir(directory, "diffusion_pytorch_model"))
  graphdef, params = dl.load_params(
      directory, lambda: AutoencoderKL(config, dtype=dtype, rngs=nnx.Rngs(0)),
      dtype=jnp.dtype(dtype), sharding=sharding, name_fn=_vae_name_fn(names))
  return VAE(config, graphdef, params)
