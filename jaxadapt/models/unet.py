"""The Stable Diffusion 1.x / 2.x conditional U-Net (diffusers' `UNet2DConditionModel`) in NNX.

Written for a frozen base: the module tree mirrors diffusers' module names
(`down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q`), so parameter paths, checkpoint
tensor names, PEFT keys and adapter paths are the same strings. Every linear layer is
`jaxadapt.models.layers.Linear` with its diffusers path, so LoRA contexts (`ctx={path: ctx}`)
apply anywhere; every attention module calls the insertion point named by its path
(`...transformer_blocks.0.attn1` self-attention, `...attn2` cross-attention) where AGD's
adapter modules attach, and every transformer block calls `...transformer_blocks.0.fuser`
between the two, where FACT's face adapter attaches.

Activations are NHWC inside (HWIO conv kernels); the public input and output are NCHW like
diffusers: `unet(sample [B, C, H, W], timesteps [B] or [], encoder_hidden_states [B, L, D])`.

Supported: CrossAttnDownBlock2D / DownBlock2D, UNetMidBlock2DCrossAttn (or no mid block),
CrossAttnUpBlock2D / UpBlock2D, Transformer2DModel with conv or linear `proj_in`/`proj_out`,
per-block head counts, GEGLU feed-forward, positional timestep embedding. Anything else a
`config.json` asks for raises an error naming the option.

References:
  Rombach et al. 2022, "High-Resolution Image Synthesis with Latent Diffusion Models" (LDM),
    Sec. 3.3 and Appendix: the conditional U-Net with cross-attention to a text encoder.
  Ronneberger et al. 2015, "U-Net: Convolutional Networks for Biomedical Image Segmentation":
    the encoder/decoder with skip connections.
  Ho et al. 2020, "Denoising Diffusion Probabilistic Models", Appendix B: timestep embedding
    and residual blocks.
"""
from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any, Mapping, Optional

import jax.numpy as jnp
from flax import nnx

from jaxadapt import context as context_lib
from jaxadapt.io.files import read_json_object
from jaxadapt.io.hf import read_config
from jaxadapt.models import diffusion_layers as dl
from jaxadapt.models.diffusion_layers import (Attention, Conv2d, Downsample2D, FeedForward,
                                              GroupNorm, LayerNorm, ResnetBlock2D,
                                              TimestepEmbedding, Upsample2D, activation,
                                              timestep_embedding)
from jaxadapt.models.layers import Linear

DOWN_BLOCK_TYPES = ("CrossAttnDownBlock2D", "DownBlock2D")
UP_BLOCK_TYPES = ("CrossAttnUpBlock2D", "UpBlock2D")
MID_BLOCK_TYPES = ("UNetMidBlock2DCrossAttn", None)
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
ACT_FNS = ("silu", "swish", "mish", "gelu", "relu")  # diffusers' get_activation names

# diffusers options jaxadapt's U-Net does not implement, each with the values that are harmless
# (its defaults). A config.json with any other value is refused with the option's name.
_UNSUPPORTED = {
    "num_attention_heads": (None,),
    "only_cross_attention": (False, None),
    "dual_cross_attention": (False, None),
    "class_embed_type": (None,),
    "num_class_embeds": (None,),
    "class_embeddings_concat": (False, None),
    "projection_class_embeddings_input_dim": (None,),
    "addition_embed_type": (None,),
    "addition_time_embed_dim": (None,),
    "encoder_hid_dim": (None,),
    "encoder_hid_dim_type": (None,),
    "resnet_time_scale_shift": ("default",),
    "resnet_skip_time_act": (False, None),
    "resnet_out_scale_factor": (1, 1.0),
    "time_embedding_type": ("positional",),
    "time_embedding_act_fn": (None,),
    "timestep_post_act": (None,),
    "time_cond_proj_dim": (None,),
    "attention_type": ("default",),
    "cross_attention_norm": (None,),
    "reverse_transformer_layers_per_block": (None,),
}
# Flags diffusers also accepts as one value per down block.
_PER_BLOCK_FLAGS = ("only_cross_attention",)
# Options that have no effect on the supported architecture at inference.
_IGNORED = ("dropout",                       # eval mode: dropout is the identity
            "addition_embed_type_num_heads",  # used only with addition_embed_type
            "mid_block_only_cross_attention")  # not read by UNetMidBlock2DCrossAttn


def _per_block(value, n: int, name: str) -> tuple:
  """An int (or None) broadcast to every block, or a list checked to have one entry per block."""
  if value is None or isinstance(value, (int, float)):
    return (value,) * n
  value = tuple(value)
  if len(value) != n:
    raise ValueError(f"{name} has {len(value)} entries, expected one per down block ({n})")
  return value


@dataclasses.dataclass(frozen=True, kw_only=True)
class UNetConfig:
  """Architecture of a Stable Diffusion U-Net, read from a diffusers `config.json`.

  Per-block fields are tuples with one entry per down block (up blocks read them reversed, as
  diffusers does).
  """
  sample_size: Optional[Any] = None           # latent height/width the model was trained at
  in_channels: int = 4                        # latent channels in
  out_channels: int = 4                       # channels predicted
  center_input_sample: bool = False           # feed 2 * sample - 1
  flip_sin_to_cos: bool = True                # timestep embedding order [cos, sin]
  freq_shift: float = 0.0                     # timestep embedding downscale_freq_shift
  down_block_types: tuple = ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                             "CrossAttnDownBlock2D", "DownBlock2D")
  mid_block_type: Optional[str] = "UNetMidBlock2DCrossAttn"  # or None: no mid block
  up_block_types: tuple = ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D",
                           "CrossAttnUpBlock2D")
  block_out_channels: tuple = (320, 640, 1280, 1280)
  layers_per_block: tuple = (2, 2, 2, 2)      # resnets per down block (up blocks: one more)
  downsample_padding: int = 1                 # padding of the stride-2 downsampling conv
  mid_block_scale_factor: float = 1.0         # mid-block resnet output divisor
  act_fn: str = "silu"                        # resnet / time embedding / output activation
  norm_num_groups: int = 32                   # GroupNorm groups
  norm_eps: float = 1e-5                      # resnet / output GroupNorm epsilon
  cross_attention_dim: tuple = (768,) * 4     # text-encoder width per block
  transformer_layers_per_block: tuple = (1,) * 4  # BasicTransformerBlocks per attention
  attention_head_dim: tuple = (8,) * 4        # diffusers' name; it is the number of HEADS per
                                              # block (head width = channels // heads)
  use_linear_projection: bool = False         # proj_in/proj_out Linear (SD 2.x) or 1x1 conv
  upcast_attention: bool = False              # float32 attention scores (always done here)
  time_embedding_dim: Optional[int] = None    # default 4 * block_out_channels[0]
  conv_in_kernel: int = 3
  conv_out_kernel: int = 3
  prediction_type: str = "epsilon"            # the scheduler's flag: epsilon | v_prediction

  def __post_init__(self):
    n = len(self.down_block_types)
    for name in ("up_block_types", "block_out_channels", "layers_per_block",
                 "cross_attention_dim", "transformer_layers_per_block", "attention_head_dim"):
      if len(getattr(self, name)) != n:
        raise ValueError(f"UNetConfig.{name} has {len(getattr(self, name))} entries, expected "
                         f"one per down block ({n})")
    for t in self.down_block_types:
      if t not in DOWN_BLOCK_TYPES:
        raise ValueError(f"down_block_types entry {t!r} is not supported; jaxadapt's U-Net "
                         f"builds {DOWN_BLOCK_TYPES}")
    for t in self.up_block_types:
      if t not in UP_BLOCK_TYPES:
        raise ValueError(f"up_block_types entry {t!r} is not supported; jaxadapt's U-Net "
                         f"builds {UP_BLOCK_TYPES}")
    if self.mid_block_type not in MID_BLOCK_TYPES:
      raise ValueError(f"mid_block_type {self.mid_block_type!r} is not supported; expected one "
                       f"of {MID_BLOCK_TYPES}")
    if self.act_fn not in ACT_FNS:
      raise ValueError(f"act_fn {self.act_fn!r} is not supported; expected one of {ACT_FNS} "
                       f"(diffusers' get_activation)")
    if not self.norm_num_groups:
      raise ValueError(f"norm_num_groups={self.norm_num_groups!r} is not supported (the output "
                       f"GroupNorm is required)")
    if self.prediction_type not in PREDICTION_TYPES:
      raise ValueError(f"prediction_type {self.prediction_type!r} is not one of "
                       f"{PREDICTION_TYPES}")
    # Blocks with attention split their channels into heads; the up block i mirrors the down
    # block n - 1 - i (its channels and heads), the mid block the last one.
    with_attention = {i for i, t in enumerate(self.down_block_types) if t.startswith("CrossAttn")}
    with_attention |= {n - 1 - i for i, t in enumerate(self.up_block_types)
                       if t.startswith("CrossAttn")}
    if self.mid_block_type is not None:
      with_attention.add(n - 1)
    for i, (ch, heads) in enumerate(zip(self.block_out_channels, self.attention_head_dim)):
      if ch % self.norm_num_groups:
        raise ValueError(f"block_out_channels[{i}]={ch} is not a multiple of norm_num_groups="
                         f"{self.norm_num_groups}")
      if i in with_attention and ch % heads:
        raise ValueError(f"block_out_channels[{i}]={ch} is not a multiple of its number of "
                         f"heads (attention_head_dim[{i}]={heads}); blocks with attention "
                         f"split their channels into that many heads")
    if any(isinstance(t, (tuple, list)) for t in self.transformer_layers_per_block):
      raise ValueError("transformer_layers_per_block with per-layer lists (asymmetric U-Nets) "
                       "is not supported")

  @property
  def time_embed_dim(self) -> int:
    return self.time_embedding_dim or 4 * self.block_out_channels[0]

  @classmethod
  def from_config(cls, cfg: Mapping[str, Any], **overrides) -> "UNetConfig":
    """Builds the config from a parsed diffusers `config.json`; refuses what it cannot build.

    Args:
      cfg: the parsed `config.json` of a `UNet2DConditionModel`.
      **overrides: fields to set directly (e.g. `prediction_type` from the scheduler config).
    """
    name = cfg.get("_class_name", "UNet2DConditionModel")
    if name != "UNet2DConditionModel":
      raise ValueError(f"config.json describes a {name}; load_unet reads UNet2DConditionModel "
                       f"dirs (Stable Diffusion 1.x / 2.x)")
    for opt, ok in _UNSUPPORTED.items():
      value = cfg.get(opt)
      if opt in _PER_BLOCK_FLAGS and isinstance(value, (list, tuple)) and not any(value):
        continue  # one harmless (False) entry per block, as diffusers broadcasts the flag
      if opt in cfg and value not in ok:
        raise NotImplementedError(f"UNet2DConditionModel option {opt}={cfg[opt]!r} is not "
                                  f"supported by jaxadapt (supported: {ok[0]!r})")
    known = {f.name for f in dataclasses.fields(cls)} | set(_UNSUPPORTED) | set(_IGNORED)
    unknown = sorted(k for k in cfg if not k.startswith("_") and k not in known
                     and cfg[k] not in (None, False))
    if unknown:
      raise NotImplementedError(f"UNet2DConditionModel option(s) {unknown} are not known to "
                                f"jaxadapt's U-Net; refusing rather than ignoring them")
    down = tuple(cfg.get("down_block_types", cls.down_block_types))
    n = len(down)
    channels = tuple(cfg.get("block_out_channels", cls.block_out_channels))
    if len(channels) != n:
      raise ValueError(f"block_out_channels has {len(channels)} entries for {n} down blocks")
    heads = _per_block(cfg.get("attention_head_dim", 8), n, "attention_head_dim")
    if any(h is None for h in heads):
      raise NotImplementedError(f"attention_head_dim={cfg.get('attention_head_dim')!r}: a head "
                                f"count is needed for every block (diffusers reads this option "
                                f"as the number of heads)")
    heads = tuple(int(h) for h in heads)
    sample_size = cfg.get("sample_size")
    kwargs = dict(
        sample_size=tuple(sample_size) if isinstance(sample_size, list) else sample_size,
        in_channels=int(cfg.get("in_channels", 4)),
        out_channels=int(cfg.get("out_channels", 4)),
        center_input_sample=bool(cfg.get("center_input_sample", False)),
        flip_sin_to_cos=bool(cfg.get("flip_sin_to_cos", True)),
        freq_shift=float(cfg.get("freq_shift", 0)),
        down_block_types=down,
        mid_block_type=cfg.get("mid_block_type", "UNetMidBlock2DCrossAttn"),
        up_block_types=tuple(cfg.get("up_block_types", cls.up_block_types)),
        block_out_channels=tuple(int(c) for c in channels),
        layers_per_block=tuple(int(x) for x in _per_block(cfg.get("layers_per_block", 2), n,
                                                          "layers_per_block")),
        downsample_padding=int(cfg.get("downsample_padding", 1)),
        mid_block_scale_factor=float(cfg.get("mid_block_scale_factor", 1.0)),
        act_fn=cfg.get("act_fn", "silu"),
        norm_num_groups=cfg.get("norm_num_groups", 32),
        norm_eps=float(cfg.get("norm_eps", 1e-5)),
        cross_attention_dim=tuple(int(x) for x in _per_block(
            cfg.get("cross_attention_dim", 1280), n, "cross_attention_dim")),
        transformer_layers_per_block=_per_block(cfg.get("transformer_layers_per_block", 1), n,
                                                "transformer_layers_per_block"),
        attention_head_dim=heads,
        use_linear_projection=bool(cfg.get("use_linear_projection", False)),
        upcast_attention=bool(cfg.get("upcast_attention", False)),
        time_embedding_dim=cfg.get("time_embedding_dim"),
        conv_in_kernel=int(cfg.get("conv_in_kernel", 3)),
        conv_out_kernel=int(cfg.get("conv_out_kernel", 3)),
        prediction_type=cfg.get("prediction_type", "epsilon"),
    )
    kwargs.update(overrides)
    return cls(**kwargs)


# ----------------------------------------------------------------------------- transformer

class BasicTransformerBlock(nnx.Module):
  """Pre-norm self-attention, cross-attention to the text, GEGLU feed-forward (LDM Sec. 3.3).

  `attn1` (self) and `attn2` (cross) each call the insertion point named by their path with
  `hidden_in` the normalised tokens they attend from and `context` None / the text states.
  Between them, after the self-attention's residual, the block calls the insertion point
  `{path}.fuser` with the residual stream itself (`out` = `hidden_in` = the tokens [B, N, C],
  `context` the text states): where a gated self-attention over extra tokens sits (GLIGEN's
  `fuser`, Li et al. 2023 Sec. 3.2; FaceChain-FACT's face adapter, `jaxadapt.fact`). The
  function returns the new residual stream.
  """

  def __init__(self, dim: int, heads: int, head_dim: int, cross_attention_dim: int, *,
               path: str, dtype, rngs: nnx.Rngs):
    self.fuser_point = f"{path}.fuser"
    self.norm1 = LayerNorm(dim, eps=1e-5, dtype=dtype)
    self.attn1 = Attention(dim, path=f"{path}.attn1", heads=heads, dim_head=head_dim,
                           dtype=dtype, rngs=rngs)
    self.norm2 = LayerNorm(dim, eps=1e-5, dtype=dtype)
    self.attn2 = Attention(dim, path=f"{path}.attn2", heads=heads, dim_head=head_dim,
                           cross_attention_dim=cross_attention_dim, dtype=dtype, rngs=rngs)
    self.norm3 = LayerNorm(dim, eps=1e-5, dtype=dtype)
    self.ff = FeedForward(dim, path=f"{path}.ff", activation_fn="geglu", dtype=dtype, rngs=rngs)

  def __call__(self, x, context, ctx=None):  # x [B, N, C]; context [B, L, D]
    x = x + self.attn1(self.norm1(x), ctx=ctx)
    x = context_lib.insert(ctx, self.fuser_point, x, x, context)
    x = x + self.attn2(self.norm2(x), context, ctx=ctx)
    return x + self.ff(self.norm3(x), ctx)


class Transformer2DModel(nnx.Module):
  """The spatial transformer: GroupNorm, `proj_in`, transformer blocks, `proj_out`, residual.

  `proj_in`/`proj_out` are 1x1 convolutions (SD 1.x) or `Linear` layers on the flattened tokens
  (SD 2.x, `use_linear_projection`); both give the same function, the checkpoints differ.
  """

  def __init__(self, channels: int, heads: int, cross_attention_dim: int, *, num_layers: int,
               norm_num_groups: int, use_linear_projection: bool, path: str, dtype,
               rngs: nnx.Rngs):
    self.use_linear_projection = use_linear_projection
    self.norm = GroupNorm(norm_num_groups, channels, eps=1e-6, dtype=dtype)
    if use_linear_projection:
      self.proj_in = Linear(channels, channels, path=f"{path}.proj_in", use_bias=True,
                            dtype=dtype, rngs=rngs)
      self.proj_out = Linear(channels, channels, path=f"{path}.proj_out", use_bias=True,
                             dtype=dtype, rngs=rngs)
    else:
      self.proj_in = Conv2d(channels, channels, 1, dtype=dtype, rngs=rngs)
      self.proj_out = Conv2d(channels, channels, 1, dtype=dtype, rngs=rngs)
    self.transformer_blocks = nnx.List([
        BasicTransformerBlock(channels, heads, channels // heads, cross_attention_dim,
                              path=f"{path}.transformer_blocks.{i}", dtype=dtype, rngs=rngs)
        for i in range(num_layers)])

  def __call__(self, x, context, ctx=None):  # x [B, H, W, C]
    b, h, w, c = x.shape
    t = self.norm(x)
    if self.use_linear_projection:
      t = self.proj_in(t.reshape(b, h * w, c), ctx)
    else:
      t = self.proj_in(t).reshape(b, h * w, c)
    for block in self.transformer_blocks:
      t = block(t, context, ctx)
    if self.use_linear_projection:
      t = self.proj_out(t, ctx).reshape(b, h, w, c)
    else:
      t = self.proj_out(t.reshape(b, h, w, c))
    return t + x


# ----------------------------------------------------------------------------- U-Net blocks

def _resnet(config: UNetConfig, cin: int, cout: int, path: str, dtype, rngs, scale=1.0):
  return ResnetBlock2D(in_channels=cin, out_channels=cout, path=path,
                       temb_channels=config.time_embed_dim, groups=config.norm_num_groups,
                       eps=config.norm_eps, non_linearity=config.act_fn,
                       output_scale_factor=scale, dtype=dtype, rngs=rngs)


def _transformer(config: UNetConfig, channels: int, block: int, path: str, dtype, rngs):
  return Transformer2DModel(
      channels, config.attention_head_dim[block], config.cross_attention_dim[block],
      num_layers=int(config.transformer_layers_per_block[block]),
      norm_num_groups=config.norm_num_groups,
      use_linear_projection=config.use_linear_projection, path=path, dtype=dtype, rngs=rngs)


class DownBlock(nnx.Module):
  """`CrossAttnDownBlock2D` (resnet + spatial transformer pairs) or `DownBlock2D` (resnets).

  Returns the hidden states and every intermediate output, the U-Net's skip connections
  (Ronneberger et al. 2015, Fig. 1).
  """

  def __init__(self, config: UNetConfig, index: int, cin: int, cout: int, *, dtype,
               rngs: nnx.Rngs):
    path = f"down_blocks.{index}"
    self.has_cross_attention = config.down_block_types[index] == "CrossAttnDownBlock2D"
    n = config.layers_per_block[index]
    self.resnets = nnx.List([
        _resnet(config, cin if i == 0 else cout, cout, f"{path}.resnets.{i}", dtype, rngs)
        for i in range(n)])
    self.attentions = nnx.List([
        _transformer(config, cout, index, f"{path}.attentions.{i}", dtype, rngs)
        for i in range(n)] if self.has_cross_attention else [])
    last = index == len(config.down_block_types) - 1
    self.downsamplers = None if last else nnx.List([
        Downsample2D(cout, use_conv=True, padding=config.downsample_padding, dtype=dtype,
                     rngs=rngs)])

  def __call__(self, x, temb, context, ctx=None):
    skips = []
    for i, resnet in enumerate(self.resnets):
      x = resnet(x, temb, ctx)
      if self.has_cross_attention:
        x = self.attentions[i](x, context, ctx)
      skips.append(x)
    if self.downsamplers is not None:
      x = self.downsamplers[0](x)
      skips.append(x)
    return x, skips


class UNetMidBlock2DCrossAttn(nnx.Module):
  """The bottleneck: resnet, then (spatial transformer, resnet) pairs."""

  def __init__(self, config: UNetConfig, *, dtype, rngs: nnx.Rngs):
    ch = config.block_out_channels[-1]
    scale = config.mid_block_scale_factor
    self.resnets = nnx.List([_resnet(config, ch, ch, f"mid_block.resnets.{i}", dtype, rngs,
                                     scale) for i in range(2)])
    self.attentions = nnx.List([_transformer(config, ch, len(config.block_out_channels) - 1,
                                             "mid_block.attentions.0", dtype, rngs)])

  def __call__(self, x, temb, context, ctx=None):
    x = self.resnets[0](x, temb, ctx)
    for attn, resnet in zip(self.attentions, self.resnets[1:]):
      x = resnet(attn(x, context, ctx), temb, ctx)
    return x


class UpBlock(nnx.Module):
  """`CrossAttnUpBlock2D` or `UpBlock2D`: each resnet takes the next skip concatenated on
  channels, then (cross-attention blocks) a spatial transformer; nearest 2x upsampling + conv."""

  def __init__(self, config: UNetConfig, index: int, *, dtype, rngs: nnx.Rngs):
    path = f"up_blocks.{index}"
    rev = lambda seq: tuple(reversed(seq))
    channels = rev(config.block_out_channels)
    nb = len(channels)
    block = nb - 1 - index  # the down block this one mirrors (per-block options)
    self.has_cross_attention = config.up_block_types[index] == "CrossAttnUpBlock2D"
    cout = channels[index]
    prev = channels[max(index - 1, 0)]
    skip_in = channels[min(index + 1, nb - 1)]
    n = config.layers_per_block[block] + 1
    self.resnets = nnx.List([
        _resnet(config, (prev if i == 0 else cout) + (skip_in if i == n - 1 else cout), cout,
                f"{path}.resnets.{i}", dtype, rngs)
        for i in range(n)])
    self.attentions = nnx.List([
        _transformer(config, cout, block, f"{path}.attentions.{i}", dtype, rngs)
        for i in range(n)] if self.has_cross_attention else [])
    last = index == nb - 1
    self.upsamplers = None if last else nnx.List([
        Upsample2D(cout, use_conv=True, dtype=dtype, rngs=rngs)])

  def __call__(self, x, skips, temb, context, upsample_size=None, ctx=None):
    skips = list(skips)
    for i, resnet in enumerate(self.resnets):
      x = resnet(jnp.concatenate([x, skips.pop()], axis=-1), temb, ctx)
      if self.has_cross_attention:
        x = self.attentions[i](x, context, ctx)
    if self.upsamplers is not None:
      x = self.upsamplers[0](x, upsample_size)
    return x


class UNet2DConditionModel(nnx.Module):
  """The LDM conditional U-Net (Rombach et al. 2022; Ronneberger et al. 2015).

  Call: `(sample, timesteps, encoder_hidden_states, *, ctx=None)`.

  Args of `__call__`:
    sample: [B, C_in, H, W] noisy latents (NCHW, as diffusers).
    timesteps: [B] or a scalar (int or float) diffusion timestep(s).
    encoder_hidden_states: [B, L, cross_attention_dim] text-encoder states.
    ctx: the forward `Context` (`jaxadapt.context`), or None. Its `inserts` map attention
      paths (`...transformer_blocks.0.attn1`/`attn2`) and fuser points
      (`...transformer_blocks.0.fuser`, between the two) to
      `fn(out [B, N, C], hidden_in [B, N, C], context [B, L, D] or None, inputs) -> out`;
      `inputs` holds the context's `insert_inputs` and the time embedding `timestep_emb`
      [B, time_embed_dim].
  Returns:
    [B, C_out, H, W] model output in the parameter dtype (noise, or v for v-prediction).
  """

  def __init__(self, config: UNetConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
    c = config
    self.config = c
    ch0 = c.block_out_channels[0]
    self.conv_in = Conv2d(c.in_channels, ch0, c.conv_in_kernel,
                          padding=(c.conv_in_kernel - 1) // 2, dtype=dtype, rngs=rngs)
    self.time_embedding = TimestepEmbedding(ch0, c.time_embed_dim, path="time_embedding",
                                            act_fn=c.act_fn, dtype=dtype, rngs=rngs)
    blocks, cout = [], ch0
    for i in range(len(c.down_block_types)):
      cin, cout = cout, c.block_out_channels[i]
      blocks.append(DownBlock(c, i, cin, cout, dtype=dtype, rngs=rngs))
    self.down_blocks = nnx.List(blocks)
    self.mid_block = (UNetMidBlock2DCrossAttn(c, dtype=dtype, rngs=rngs)
                      if c.mid_block_type is not None else None)
    self.up_blocks = nnx.List([UpBlock(c, i, dtype=dtype, rngs=rngs)
                               for i in range(len(c.up_block_types))])
    self.conv_norm_out = GroupNorm(c.norm_num_groups, ch0, eps=c.norm_eps, dtype=dtype)
    self.conv_out = Conv2d(ch0, c.out_channels, c.conv_out_kernel,
                           padding=(c.conv_out_kernel - 1) // 2, dtype=dtype, rngs=rngs)

  def attention_paths(self) -> list[str]:
    """Names of every attention module's insertion point (its path), in module order."""
    paths = [m.path for _, m in nnx.iter_graph(self) if isinstance(m, Attention)]
    return sorted(set(paths), key=paths.index)

  def fuser_points(self) -> list[str]:
    """Each transformer block's point between self- and cross-attention, in module order."""
    points = [m.fuser_point for _, m in nnx.iter_graph(self)
              if isinstance(m, BasicTransformerBlock)]
    return sorted(set(points), key=points.index)

  def __call__(self, sample, timesteps, encoder_hidden_states, *, ctx=None):
    c = self.config
    dtype = self.conv_in.kernel.dtype
    if sample.ndim != 4 or sample.shape[1] != c.in_channels:
      raise ValueError(f"sample must be [B, {c.in_channels}, H, W] (NCHW), got {sample.shape}")
    b = sample.shape[0]
    x = jnp.transpose(sample, (0, 2, 3, 1)).astype(dtype)
    if c.center_input_sample:
      x = 2 * x - 1.0
    t = jnp.asarray(timesteps)
    t = jnp.broadcast_to(t.reshape(-1) if t.ndim else t[None], (b,))
    t_emb = timestep_embedding(t, c.block_out_channels[0], flip_sin_to_cos=c.flip_sin_to_cos,
                               downscale_freq_shift=c.freq_shift).astype(dtype)
    emb = self.time_embedding(t_emb, ctx)
    context = encoder_hidden_states.astype(dtype)
    ctx = context_lib.publish(ctx, timestep_emb=emb)  # insertion points see the time embedding

    # 1. Encoder: every intermediate output is a skip connection.
    x = self.conv_in(x)
    skips = [x]
    for block in self.down_blocks:
      x, res = block(x, emb, context, ctx)
      skips += res
    # 2. Bottleneck.
    if self.mid_block is not None:
      x = self.mid_block(x, emb, context, ctx)
    # 3. Decoder: each block consumes as many skips as it has resnets, newest first; it
    #    upsamples to the next skip's size (odd sizes included, as diffusers' upsample_size).
    for i, block in enumerate(self.up_blocks):
      n = len(block.resnets)
      res, skips = skips[-n:], skips[:-n]
      size = None
      if block.upsamplers is not None:
        target = tuple(skips[-1].shape[1:3])
        size = None if target == (2 * x.shape[1], 2 * x.shape[2]) else target
      x = block(x, res, emb, context, size, ctx)
    # 4. Output head.
    x = self.conv_out(activation(c.act_fn)(self.conv_norm_out(x)))
    return jnp.transpose(x, (0, 3, 1, 2))


# ----------------------------------------------------------------------------- frozen model API

def forward(graphdef, params, sample, timesteps, encoder_hidden_states, ctx=None):
  """The pure forward (not jitted): for use inside a user's own jit/grad (training)."""
  return dl.apply(graphdef, params, "__call__", sample, timesteps, encoder_hidden_states,
                  ctx=ctx)


class UNet(dl.FrozenModel):
  """A frozen U-Net: `config`, `graphdef`, `params` (a pure dict, never mutated); jitted calls.

  `unet(sample, timesteps, encoder_hidden_states)` runs the jitted forward; `adapter=` (one
  `LoraAdapter`), `adapters=` + `adapter_ids=` (one id per batch element, -1 = base) or
  `context=` (a forward `Context`) select adapters; `inserts=` attaches modules at attention
  outputs.
  """

  batch_item = "sample"

  @classmethod
  def random(cls, config: UNetConfig, *, seed: int = 0, dtype=jnp.float32) -> "UNet":
    """A randomly initialised U-Net (demos, benchmarks, tests)."""
    module = UNet2DConditionModel(config, dtype=jnp.dtype(dtype), rngs=nnx.Rngs(seed))
    graphdef, state = nnx.split(module)
    return cls(config, graphdef, nnx.to_pure_dict(state))

  @property
  def prediction_type(self) -> str:
    """What the output is: "epsilon" (noise) or "v_prediction" (the scheduler's flag)."""
    return self.config.prediction_type

  @functools.cached_property
  def attention_paths(self) -> list[str]:
    """Names of every insertion point (each attention module's path), in module order."""
    return nnx.merge(self.graphdef, nnx.State(self.params)).attention_paths()

  @functools.cached_property
  def fuser_points(self) -> list[str]:
    """Each transformer block's `...transformer_blocks.{i}.fuser` point (between self- and
    cross-attention: FaceChain-FACT's face adapter, `jaxadapt.fact`), in module order."""
    return nnx.merge(self.graphdef, nnx.State(self.params)).fuser_points()

  @property
  def insertion_points(self) -> list[str]:
    """Every insertion point: the attention modules' outputs, then the blocks' fuser points."""
    return self.attention_paths + self.fuser_points

  def __call__(self, sample, timesteps, encoder_hidden_states, *, adapter=None, adapters=None,
               adapter_ids=None, context=None, inserts=None):
    """The model output `[B, C_out, H, W]` (NCHW) for noisy latents `sample [B, C_in, H, W]`.

    Args:
      sample: [B, C_in, H, W] latents.
      timesteps: [B] or scalar timesteps.
      encoder_hidden_states: [B, L, cross_attention_dim] text states.
      adapter: one `LoraAdapter` for the whole batch.
      adapters: a list of adapters, with `adapter_ids` one id per batch element (-1 = base).
      context: a ready forward `Context` (instead of adapter/adapters).
      inserts: {attention path: fn(out, hidden_in, context, inputs) -> out}; see
        `UNet2DConditionModel`. A `jax.tree_util.Partial(fn, params)` traces `params`.
    """
    sample = jnp.asarray(sample)
    ehs = jnp.asarray(encoder_hidden_states)
    if sample.ndim != 4 or sample.shape[1] != self.config.in_channels:
      raise ValueError(f"sample must be [batch, {self.config.in_channels}, height, width] "
                       f"(NCHW), got shape {sample.shape}")
    if ehs.ndim != 3 or ehs.shape[0] != sample.shape[0]:
      raise ValueError(f"encoder_hidden_states must be [B, L, D] with B={sample.shape[0]}, got "
                       f"{ehs.shape}")
    # Timesteps as float32 [B] before jit: scalar, [1] and [B], int or float, share a compile.
    t = jnp.asarray(timesteps, jnp.float32)
    t = jnp.broadcast_to(t.reshape(-1), (sample.shape[0],))
    return self._call("__call__", (sample, t, ehs), adapter=adapter, adapters=adapters,
                      adapter_ids=adapter_ids, context=context, inserts=inserts,
                      batch=sample.shape[0])


def _scheduler_prediction_type(directory: str) -> Optional[str]:
  """`prediction_type` from a pipeline's `scheduler/scheduler_config.json` next to `unet/`."""
  path = os.path.join(os.path.dirname(os.path.abspath(directory)), "scheduler",
                      "scheduler_config.json")
  if not os.path.exists(path):
    return None
  return read_json_object(path, "a diffusers scheduler config").get("prediction_type")


def load_unet(directory: str, *, dtype="float32", sharding=None,
              prediction_type: Optional[str] = None) -> UNet:
  """Loads a diffusers `UNet2DConditionModel` dir (config.json + safetensors) as a frozen `UNet`.

  Args:
    directory: the model dir (e.g. a pipeline's `unet/` folder).
    dtype: parameter dtype ("float32" or "bfloat16").
    sharding: None, a Sharding, a Mesh or callable(path, shape) (see `io.hf.load_tree`).
    prediction_type: "epsilon" or "v_prediction"; default: the pipeline's
      `../scheduler/scheduler_config.json` when present, else "epsilon".

  Returns:
    A `UNet` whose params are memory-mapped from the checkpoint and placed as they load.
  """
  directory = os.fspath(directory)
  dtype = jnp.dtype(dtype)
  pred = prediction_type or _scheduler_prediction_type(directory)
  config = UNetConfig.from_config(read_config(directory),
                                  **({"prediction_type": pred} if pred else {}))
  graphdef, params = dl.load_params(
      directory, lambda: UNet2DConditionModel(config, dtype=dtype, rngs=nnx.Rngs(0)),
      dtype=dtype, sharding=sharding)
  return UNet(config, graphdef, params)
