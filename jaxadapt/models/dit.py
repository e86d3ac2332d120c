"""Class-conditional DiT (diffusers' `DiTTransformer2DModel`) in Flax NNX, for a frozen base.

Diffusion Transformers (Peebles & Xie 2023, "Scalable Diffusion Models with Transformers"):
the latent is cut into `p x p` patches, linearly embedded and given fixed 2-D sin-cos position
embeddings (Sec. 3.1); each block conditions on the timestep + class-label embedding through
adaLN-Zero (Sec. 3.2: the modulation regresses shift, scale and a zero-initialised gate for the
attention and MLP branches); a final adaLN layer and a linear decoder predict noise and, with
learned sigma (`out_channels = 2 * in_channels`), the diagonal covariance (Sec. 3.1, following
Nichol & Dhariwal 2021); the tokens are reassembled into an image ("unpatchify").

The module tree mirrors diffusers' names (`transformer_blocks.0.attn1.to_q`,
`transformer_blocks.0.norm1.linear`, `proj_out_2`), so every linear layer is a `Linear` whose
path is the diffusers module name (LoRA targets), and each block's self-attention calls the
insertion point `transformer_blocks.{i}.attn1`. Inputs and outputs are NCHW as in diffusers.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxadapt import context as context_lib
from jaxadapt.io.hf import read_config
from jaxadapt.models import diffusion_layers as dl
from jaxadapt.models.layers import Linear

SUPPORTED_CLASSES = ("DiTTransformer2DModel", "Transformer2DModel")


@dataclasses.dataclass(frozen=True, kw_only=True)
class DiTConfig:
  """Architecture of a class-conditional DiT, read from a diffusers `config.json`."""
  num_attention_heads: int = 16
  attention_head_dim: int = 72
  in_channels: int = 4
  out_channels: Optional[int] = None   # None = in_channels; 2 * in_channels = learned sigma
  num_layers: int = 28
  attention_bias: bool = True
  sample_size: int = 32                # latent height = width the model was trained on
  patch_size: int = 2
  activation_fn: str = "gelu-approximate"
  num_embeds_ada_norm: int = 1000      # number of classes (the label table has one more: null)
  norm_elementwise_affine: bool = False
  norm_eps: float = 1e-5
  interpolation_scale: float = 1.0     # position grid divisor (PatchEmbed's interpolation_scale)

  def __post_init__(self):
    if self.activation_fn not in ("gelu", "gelu-approximate", "geglu"):
      raise ValueError(f"DiT activation_fn must be 'gelu', 'gelu-approximate' or 'geglu', got "
                       f"{self.activation_fn!r}")

  @property
  def inner_dim(self) -> int:
    return self.num_attention_heads * self.attention_head_dim

  @property
  def output_channels(self) -> int:
    return self.out_channels or self.in_channels

  @property
  def learned_sigma(self) -> bool:
    """Whether the output holds [noise, variance interpolation] (DiT Sec. 3.1)."""
    return self.output_channels == 2 * self.in_channels

  @classmethod
  def from_config(cls, cfg: Mapping[str, Any]) -> "DiTConfig":
    """Builds the config from a diffusers `config.json`; refuses what it cannot run."""
    name = cfg.get("_class_name", "DiTTransformer2DModel")
    if name not in SUPPORTED_CLASSES:
      raise ValueError(f"config.json is a {name!r}; expected one of {SUPPORTED_CLASSES} "
                       "(a class-conditional DiT, e.g. facebook/DiT-XL-2-256's transformer/)")
    # upcast_attention needs nothing: attention scores are always computed in float32.
    expected = dict(norm_type="ada_norm_zero", cross_attention_dim=None,
                    use_linear_projection=False, only_cross_attention=False,
                    double_self_attention=False, num_vector_embeds=None)
    for key, want in expected.items():
      got = cfg.get(key, want)
      if got != want:
        raise ValueError(f"config.json has {key}={got!r}; jaxadapt's DiT supports only "
                         f"{key}={want!r} (class-conditional adaLN-Zero DiT)")
    if cfg.get("patch_size") is None:
      raise ValueError("config.json has no patch_size; expected a patched DiT (e.g. 2)")
    if cfg.get("num_embeds_ada_norm") is None:
      raise ValueError("config.json has num_embeds_ada_norm=None; adaLN-Zero needs the number "
                       "of classes")
    if name == "Transformer2DModel":
      # Options of the generic class that only other architectures (GLIGEN, PixArt) read.
      for key, want in (("attention_type", "default"), ("caption_channels", None)):
        got = cfg.get(key, want)
        if got != want:
          raise ValueError(f"config.json has {key}={got!r}; jaxadapt's DiT supports only "
                           f"{key}={want!r} (class-conditional adaLN-Zero DiT)")
    sample = cfg.get("sample_size", 32)
    if isinstance(sample, (list, tuple)):
      raise ValueError(f"sample_size {sample!r}: expected one int (square latents)")
    # DiTTransformer2DModel embeds positions with interpolation_scale 1; the generic
    # Transformer2DModel reads its config's value, defaulting to max(sample_size // 64, 1).
    interp = 1.0
    if name == "Transformer2DModel":
      interp = cfg.get("interpolation_scale")
      interp = float(max(sample // 64, 1) if interp is None else interp)
    return cls(
        num_attention_heads=cfg.get("num_attention_heads", 16),
        attention_head_dim=cfg.get("attention_head_dim", 72),
        in_channels=cfg.get("in_channels", 4),
        out_channels=cfg.get("out_channels"),
        num_layers=cfg.get("num_layers", 28),
        attention_bias=bool(cfg.get("attention_bias", True)),
        sample_size=sample,
        patch_size=cfg["patch_size"],
        activation_fn=cfg.get("activation_fn", "gelu-approximate"),
        num_embeds_ada_norm=cfg["num_embeds_ada_norm"],
        norm_elementwise_affine=bool(cfg.get("norm_elementwise_affine", False)),
        norm_eps=cfg.get("norm_eps", 1e-5),
        interpolation_scale=interp,
    )


def sincos_pos_embed_2d(embed_dim: int, height: int, width: int, *, base_size: int,
                        interpolation_scale: float = 1.0) -> np.ndarray:
  """Fixed 2-D sin-cos position embeddings `[height * width, embed_dim]` (DiT Sec. 3.1).

  Grid coordinates are rescaled to a `base_size` grid (as diffusers' `PatchEmbed`); the first
  half of the channels encodes the column (w) coordinate, the second half the row (h).
  References: Vaswani et al. 2017 Sec. 3.5; He et al. 2022 (MAE) position embeddings.
  """
  if embed_dim % 4:
    raise ValueError(f"embed_dim must be a multiple of 4 for 2-D sin-cos embeddings, got "
                     f"{embed_dim}")
  rows = (np.arange(height, dtype=np.float32) / np.float32(height / base_size)
          / np.float32(interpolation_scale))
  cols = (np.arange(width, dtype=np.float32) / np.float32(width / base_size)
          / np.float32(interpolation_scale))
  col_grid, row_grid = np.meshgrid(cols, rows, indexing="xy")  # both [height, width]

  def embed_1d(pos):
    omega = 1.0 / 10000 ** (np.arange(embed_dim // 4, dtype=np.float64) / (embed_dim / 4.0))
    out = np.outer(pos.reshape(-1).astype(np.float64), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)

  return np.concatenate([embed_1d(col_grid), embed_1d(row_grid)], axis=1).astype(np.float32)


class PatchEmbed(nnx.Module):
  """Patchify: a `p x p`, stride-`p` conv `proj`, then add fixed sin-cos positions."""

  def __init__(self, c: DiTConfig, dtype, rngs):
    self.patch_size = c.patch_size
    self.base_size = c.sample_size // c.patch_size
    self.interpolation_scale = c.interpolation_scale
    self.proj = dl.Conv2d(c.in_channels, c.inner_dim, c.patch_size, stride=c.patch_size,
                          dtype=dtype, rngs=rngs)

  def __call__(self, x):  # [B, H, W, C] -> [B, h*w, D]
    h = self.proj(x)
    b, gh, gw, d = h.shape
    pos = sincos_pos_embed_2d(d, gh, gw, base_size=self.base_size,
                              interpolation_scale=self.interpolation_scale)
    return (h.reshape(b, gh * gw, d).astype(jnp.float32) + pos[None]).astype(h.dtype)


class LabelEmbedding(nnx.Module):
  """Class-label table `[num_classes + 1, D]`; the last row is the null (unconditional) label."""

  def __init__(self, num_classes: int, dim: int, dtype, rngs):
    self.embedding_table = dl.Embedding(num_classes + 1, dim, dtype=dtype, rngs=rngs)

  def __call__(self, labels):
    return self.embedding_table(labels)


class CombinedTimestepLabelEmbeddings(nnx.Module):
  """`c = MLP(sinusoid_256(t)) + table[y]`: DiT's conditioning vector (Sec. 3.2)."""

  def __init__(self, c: DiTConfig, prefix: str, dtype, rngs):
    self.timestep_embedder = dl.TimestepEmbedding(256, c.inner_dim,
                                                  path=f"{prefix}.timestep_embedder",
                                                  dtype=dtype, rngs=rngs)
    self.class_embedder = LabelEmbedding(c.num_embeds_ada_norm, c.inner_dim, dtype, rngs)

  def parts(self, timestep, class_labels, dtype, ctx):
    """(timestep embedding, class embedding), each [B, D]; `c` is their sum."""
    t = dl.timestep_embedding(timestep, 256, flip_sin_to_cos=True, downscale_freq_shift=1)
    return self.timestep_embedder(t.astype(dtype), ctx), self.class_embedder(class_labels)

  def __call__(self, timestep, class_labels, dtype, ctx):
    t_emb, c_emb = self.parts(timestep, class_labels, dtype, ctx)
    return t_emb + c_emb


class AdaLayerNormZero(nnx.Module):
  """adaLN-Zero (DiT Sec. 3.2): `linear(silu(c))` gives shift/scale/gate for attention and MLP."""

  def __init__(self, c: DiTConfig, prefix: str, dtype, rngs):
    d = c.inner_dim
    self.emb = CombinedTimestepLabelEmbeddings(c, f"{prefix}.emb", dtype, rngs)
    self.linear = Linear(d, 6 * d, path=f"{prefix}.linear", use_bias=True, dtype=dtype,
                         rngs=rngs)
    self.norm = dl.LayerNorm(d, eps=1e-6, elementwise_affine=False)

  def __call__(self, x, timestep, class_labels, ctx):
    t_emb, c_emb = self.emb.parts(timestep, class_labels, x.dtype, ctx)
    mods = jnp.split(self.linear(jax.nn.silu(t_emb + c_emb), ctx), 6, axis=-1)
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mods
    x = self.norm(x) * (1 + scale_msa[:, None]) + shift_msa[:, None]
    return x, gate_msa, shift_mlp, scale_mlp, gate_mlp, (t_emb, c_emb)


class DiTBlock(nnx.Module):
  """A DiT block with adaLN-Zero (DiT Fig. 3): gated self-attention and gated MLP residuals."""

  def __init__(self, c: DiTConfig, index: int, dtype, rngs):
    prefix = f"transformer_blocks.{index}"
    d = c.inner_dim
    self.norm1 = AdaLayerNormZero(c, f"{prefix}.norm1", dtype, rngs)
    self.attn1 = dl.Attention(d, path=f"{prefix}.attn1", heads=c.num_attention_heads,
                              dim_head=c.attention_head_dim, bias=c.attention_bias, dtype=dtype,
                              rngs=rngs)
    self.norm3 = dl.LayerNorm(d, eps=c.norm_eps, elementwise_affine=c.norm_elementwise_affine,
                              dtype=dtype)
    self.ff = dl.FeedForward(d, path=f"{prefix}.ff", activation_fn=c.activation_fn, dtype=dtype,
                             rngs=rngs)

  def __call__(self, x, timestep, class_labels, ctx):
    h, gate_msa, shift_mlp, scale_mlp, gate_mlp, (t_emb, c_emb) = self.norm1(
        x, timestep, class_labels, ctx)
    # The insertion point sees this block's own conditioning (AGD's offset adapter reads it).
    attn_ctx = context_lib.publish(ctx, timestep_emb=t_emb, class_emb=c_emb)
    x = x + gate_msa[:, None] * self.attn1(h, ctx=attn_ctx)
    h = self.norm3(x) * (1 + scale_mlp[:, None]) + shift_mlp[:, None]
    return x + gate_mlp[:, None] * self.ff(h, ctx)


class DiTTransformer2DModel(nnx.Module):
  """Class-conditional DiT (Peebles & Xie 2023), as diffusers' `DiTTransformer2DModel`.

  Call: `(sample, timestep, class_labels, *, ctx=None)`.
  Args:
    sample: [B, C_in, H, W] noisy latents (NCHW); H and W multiples of `patch_size`.
    timestep: [B] (or scalar) diffusion timesteps, int or float.
    class_labels: [B] int labels in [0, num_classes]; `num_classes` is the null label (CFG).
    ctx: the forward `Context` (`jaxadapt.context`), or None; its `inserts` are keyed by
      `transformer_blocks.{i}.attn1` and see, besides the context's `insert_inputs`, the
      block's `timestep_emb` and `class_emb` ([B, D] each, their sum conditions adaLN).
  Returns:
    [B, C_out, H, W]; with learned sigma, channels `[:C_in]` are the noise prediction and
    `[C_in:]` the variance interpolation values.
  """

  def __init__(self, config: DiTConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
    c = config
    self.config = config
    self.pos_embed = PatchEmbed(c, dtype, rngs)
    self.transformer_blocks = nnx.List([DiTBlock(c, i, dtype, rngs)
                                        for i in range(c.num_layers)])
    self.norm_out = dl.LayerNorm(c.inner_dim, eps=1e-6, elementwise_affine=False)
    self.proj_out_1 = Linear(c.inner_dim, 2 * c.inner_dim, path="proj_out_1", use_bias=True,
                             dtype=dtype, rngs=rngs)
    self.proj_out_2 = Linear(c.inner_dim, c.patch_size ** 2 * c.output_channels,
                             path="proj_out_2", use_bias=True, dtype=dtype, rngs=rngs)

  def __call__(self, sample, timestep, class_labels, *, ctx=None):
    c = self.config
    p = c.patch_size
    b, _, height, width = sample.shape
    if height % p or width % p:
      raise ValueError(f"sample height/width ({height}, {width}) must be multiples of "
                       f"patch_size {p}")
    dtype = self.proj_out_2.kernel[...].dtype
    timestep = jnp.broadcast_to(jnp.asarray(timestep), (b,))
    class_labels = jnp.broadcast_to(jnp.asarray(class_labels, jnp.int32), (b,))
    x = self.pos_embed(jnp.transpose(sample, (0, 2, 3, 1)).astype(dtype))
    for block in self.transformer_blocks:
      x = block(x, timestep, class_labels, ctx)
    # Final layer (DiT Sec. 3.2): adaLN from block 0's conditioning embedding, as diffusers.
    cond = self.transformer_blocks[0].norm1.emb(timestep, class_labels, x.dtype, ctx)
    shift, scale = jnp.split(self.proj_out_1(jax.nn.silu(cond), ctx), 2, axis=-1)
    x = self.norm_out(x) * (1 + scale[:, None]) + shift[:, None]
    x = self.proj_out_2(x, ctx)  # [B, h*w, p*p*C_out]
    gh, gw = height // p, width // p
    x = x.reshape(b, gh, gw, p, p, c.output_channels)
    return jnp.einsum("nhwpqc->nchpwq", x).reshape(b, c.output_channels, height, width)


class DiT(dl.FrozenModel):
  """A frozen DiT: `config`, `graphdef`, `params` (pure dict); calls are jitted."""

  batch_item = "sample"

  @property
  def insertion_points(self) -> list[str]:
    """Every insertion point: each block's self-attention, `transformer_blocks.{i}.attn1`."""
    return [f"transformer_blocks.{i}.attn1" for i in range(self.config.num_layers)]

  def __call__(self, sample, timestep, class_labels, *, adapter=None, adapters=None,
               adapter_ids=None, context=None, inserts=None):
    """The model output `[B, C_out, H, W]` (see `DiTTransformer2DModel`).

    `adapter=`, `adapters=` + `adapter_ids=` (one id per sample, -1 = base) or `context=` (a
    forward `Context`) select adapters; `inserts=` attaches modules at attention outputs.
    """
    sample = jnp.asarray(sample)
    if sample.ndim != 4 or sample.shape[1] != self.config.in_channels:
      raise ValueError(f"sample must be [batch, {self.config.in_channels}, height, width] "
                       f"(NCHW), got shape {sample.shape}")
    return self._call("__call__", (sample, jnp.asarray(timestep), jnp.asarray(class_labels)),
                      adapter=adapter, adapters=adapters, adapter_ids=adapter_ids,
                      context=context, inserts=inserts, batch=sample.shape[0])


def load_dit(directory: str, *, dtype=jnp.float32, sharding=None) -> DiT:
  """Loads a diffusers DiT dir (config.json + diffusion_pytorch_model.safetensors).

  Args:
    directory: e.g. facebook/DiT-XL-2-256's `transformer/`.
    dtype: parameter dtype (float32 or bfloat16).
    sharding: None, a Sharding, a Mesh or callable(path, shape) (see `jaxadapt.io.hf`).
  """
  config = DiTConfig.from_config(read_config(directory))
  graphdef, params = dl.load_params(
      directory, lambda: DiTTransformer2DModel(config, dtype=dtype, rngs=nnx.Rngs(0)),
      dtype=jnp.dtype(dtype), sharding=sharding)
  return DiT(config, graphdef, params)
