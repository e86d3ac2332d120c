"""TransFace's face-recognition ViT in Flax NNX: the frozen face encoder of FaceChain-FACT.

FACT (Yu et al. 2024, "FaceChain-FACT: Face Adapter with Decoupled Training for
Identity-preserved Personalization", Sec. 3.2) conditions a diffusion model on the per-patch
tokens of a frozen face-recognition transformer, TransFace (Dan et al., ICCV 2023, "TransFace:
Calibrating Transformer Training for Face Recognition from a Data-Centric Perspective"), instead
of a single global identity vector.

The TransFace ViT, on a 112x112 aligned face in [-1, 1]:
1. `patch_embed.proj`: a patch x patch conv with stride patch (9 -> a 12x12 grid of N=144 tokens
   of width D), tokens in row-major grid order; `pos_embed [1, N, D]` is added (no class token).
2. `blocks.{i}`: pre-norm transformer blocks, `x += attn(norm1(x))`, `x += mlp(norm2(x))`; the
   attention projects `qkv` (no bias by default) into [3, heads, head_dim] per token, scores
   scaled by head_dim^-0.5; the MLP is `fc2(relu6(fc1(x)))`.
3. `norm`: the final LayerNorm. Its output [B, N, D] is the "local" representation FACT uses.
4. The global identity head (TransFace Sec. 3.3 and its released model): the flattened tokens go
   through `senet` (Linear(N*D -> N), ReLU, Linear(N -> N), Sigmoid) to one weight per patch,
   each token is scaled by its weight, and `feature` (Linear(N*D -> D), BatchNorm1d,
   Linear(D -> E), BatchNorm1d; eval mode, eps 2e-5) gives the E-dim identity embedding.
   `mask_token` (training-time patch masking) is loaded and kept but unused at inference.

Module attributes mirror the checkpoint names, so the parameter `blocks.3.attn.qkv.kernel` is
the tensor `blocks.3.attn.qkv.weight` (transposed to `[in, out]`; conv kernels HWIO). Images
are NCHW as in torch. Checkpoints: torch `.pt` state dicts (read without torch, see
`jaxadapt.io.torch_pickle`) or safetensors written by `save_face_encoder`.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from typing import Any, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxadapt import paths
from jaxadapt.io.files import float_dtype, read_json_object
from jaxadapt.io.hf import torch_name
from jaxadapt.io.safetensors_mmap import SafetensorsFile
from jaxadapt.io.torch_pickle import load_torch_file
from jaxadapt.models import diffusion_layers as dl
from jaxadapt.models.layers import Linear

__all__ = ["FaceEncoder", "FaceViT", "FaceViTConfig", "check_images", "embed", "forward",
           "load_face_encoder", "save_face_encoder"]

WEIGHTS_NAME = "face_encoder.safetensors"  # the weights file of a saved face-encoder dir
ARCHITECTURE = "TransFaceViT"              # config.json's "architecture"
# Checkpoint tensors that exist but no forward reads: BatchNorm's training-step counter.
_IGNORED = re.compile(r"^feature\.[13]\.num_batches_tracked$")


@dataclasses.dataclass(frozen=True, kw_only=True)
class FaceViTConfig:
  """Architecture of a TransFace ViT (defaults: TransFace-S, 112x112 faces, 144 tokens of 512)."""
  img_size: int = 112          # input height = width (aligned face crop)
  patch_size: int = 9          # conv kernel = stride; (img_size // patch_size)^2 tokens
  in_channels: int = 3         # RGB
  embed_dim: int = 512         # token width D
  depth: int = 12              # transformer blocks
  num_heads: int = 8           # attention heads (not recorded in checkpoints)
  mlp_ratio: float = 4.0       # MLP hidden width / D
  qkv_bias: bool = False       # whether attn.qkv has a bias
  num_features: int = 512      # identity embedding width E of the global head; 0 = no head
  layer_norm_eps: float = 1e-5   # every LayerNorm (torch's default)
  batch_norm_eps: float = 2e-5   # the head's BatchNorm1d layers

  def __post_init__(self):
    for name in ("img_size", "patch_size", "in_channels", "embed_dim", "depth", "num_heads"):
      value = getattr(self, name)
      if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"FaceViTConfig.{name} must be a positive int, got {value!r}")
    # The patch conv floors like torch's: 112 // 9 = 12 patches a side, the last 4 pixel rows
    # and columns are never read (TransFace's own layout), so img_size need not be a multiple.
    if self.img_size < self.patch_size:
      raise ValueError(f"FaceViTConfig: img_size {self.img_size} is smaller than patch_size "
                       f"{self.patch_size}; expected at least one patch (TransFace: 112 and 9 "
                       f"give a 12x12 grid)")
    if self.embed_dim % self.num_heads:
      raise ValueError(f"FaceViTConfig: embed_dim {self.embed_dim} is not divisible by num_heads "
                       f"{self.num_heads}")
    if self.mlp_ratio <= 0 or self.mlp_dim < 1:
      raise ValueError(f"FaceViTConfig.mlp_ratio must give a positive MLP width, got "
                       f"{self.mlp_ratio} (embed_dim {self.embed_dim})")
    if not isinstance(self.num_features, int) or self.num_features < 0:
      raise ValueError(f"FaceViTConfig.num_features must be an int >= 0 (0 = no identity head), "
                       f"got {self.num_features!r}")

  @property
  def grid(self) -> int:
    """Tokens per side: img_size // patch_size (the conv floors; remainder pixels unread)."""
    return self.img_size // self.patch_size

  @property
  def num_patches(self) -> int:
    """Tokens N (144 for 112x112 faces and patch 9)."""
    return self.grid ** 2

  @property
  def head_dim(self) -> int:
    return self.embed_dim // self.num_heads

  @property
  def mlp_dim(self) -> int:
    return int(self.embed_dim * self.mlp_ratio)

  def to_dict(self) -> dict:
    return {"architecture": ARCHITECTURE, **dataclasses.asdict(self)}

  @classmethod
  def from_dict(cls, cfg: Mapping[str, Any]) -> "FaceViTConfig":
    """The config a `config.json` written by `save_face_encoder` holds; unknown keys refused."""
    cfg = dict(cfg)
    arch = cfg.pop("architecture", ARCHITECTURE)
    if arch != ARCHITECTURE:
      raise ValueError(f"config.json describes a {arch!r}, expected {ARCHITECTURE!r}")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(cfg) - known)
    if unknown:
      raise ValueError(f"config.json has keys {unknown} that FaceViTConfig does not know "
                       f"(expected some of {sorted(known)})")
    return cls(**cfg)

  @classmethod
  def from_tensors(cls, shapes: Mapping[str, tuple], *, num_heads: int = 8,
                   **overrides) -> "FaceViTConfig":
    """Infers the architecture from TransFace checkpoint tensor shapes (torch layout).

    D and N from `pos_embed`, the patch and channels from the conv kernel, depth from the block
    count, mlp_ratio from `fc1`, qkv_bias from its presence, num_features from `feature.2`.
    img_size: several sizes give the same grid (108..116 all give TransFace's 12x12 with patch
    9); it is 112 (TransFace's aligned face) where 112 gives the grid, else grid * patch; pass
    `img_size=` (an override) otherwise. num_heads is not recorded in a checkpoint: pass it.

    Raises:
      ValueError: a tensor this needs is missing or has an unexpected rank (naming it).
    """
    def shape(name, ndim):
      if name not in shapes:
        raise ValueError(f"not a TransFace ViT checkpoint: no tensor {name!r} (found e.g. "
                         f"{sorted(shapes)[:6]})")
      s = tuple(shapes[name])
      if len(s) != ndim:
        raise ValueError(f"tensor {name!r} has shape {s}, expected {ndim} dims")
      return s
    _, n, d = shape("pos_embed", 3)
    _, c, p, p2 = shape("patch_embed.proj.weight", 4)
    grid = math.isqrt(n)
    if grid * grid != n or p != p2:
      raise ValueError(f"pos_embed holds {n} tokens and the patch kernel is {p}x{p2}: expected a "
                       f"square grid and a square patch")
    blocks = {int(m.group(1)) for k in shapes if (m := re.match(r"blocks\.(\d+)\.", k))}
    hidden = shape("blocks.0.mlp.fc1.weight", 2)[0]
    found = dict(
        img_size=112 if 112 // p == grid else grid * p, patch_size=p, in_channels=c, embed_dim=d,
        depth=max(blocks) + 1 if blocks else 0, num_heads=num_heads, mlp_ratio=hidden / d,
        qkv_bias="blocks.0.attn.qkv.bias" in shapes,
        num_features=shape("feature.2.weight", 2)[0] if "feature.2.weight" in shapes else 0)
    return cls(**{**found, **overrides})


def check_images(config: FaceViTConfig, images):
  """`images` if they are `[B, C, img_size, img_size]`; else a ValueError naming the shapes."""
  want = (config.in_channels, config.img_size, config.img_size)
  if images.ndim != 4 or tuple(images.shape[1:]) != want:
    raise ValueError(f"images must be [batch, {', '.join(map(str, want))}] (NCHW, aligned "
                     f"faces in [-1, 1]), got shape {tuple(images.shape)}")
  return images


# ----------------------------------------------------------------------------- modules

class BatchNorm1d(nnx.Module):
  """`nn.BatchNorm1d` in eval mode: `(x - running_mean) / sqrt(running_var + eps) * w + b`,
  in float32 (the running statistics are frozen `BatchStat`s)."""

  def __init__(self, dim: int, *, eps: float, dtype=jnp.float32):
    self.eps = eps
    self.weight = nnx.Param(jnp.ones((dim,), dtype))
    self.bias = nnx.Param(jnp.zeros((dim,), dtype))
    self.running_mean = nnx.BatchStat(jnp.zeros((dim,), dtype))
    self.running_var = nnx.BatchStat(jnp.ones((dim,), dtype))

  def __call__(self, x):
    f32 = lambda v: v[...].astype(jnp.float32)  # noqa: E731
    h = (x.astype(jnp.float32) - f32(self.running_mean)) * jax.lax.rsqrt(
        f32(self.running_var) + self.eps)
    return (h * f32(self.weight) + f32(self.bias)).astype(x.dtype)


class PatchEmbed(nnx.Module):
  """`proj`: the patch x patch, stride-patch conv; [B, H, W, C] -> [B, N, D] (row-major grid)."""

  def __init__(self, c: FaceViTConfig, dtype, rngs):
    self.proj = dl.Conv2d(c.in_channels, c.embed_dim, c.patch_size, stride=c.patch_size,
                          dtype=dtype, rngs=rngs)

  def __call__(self, x):
    h = self.proj(x)
    b, gh, gw, d = h.shape
    return h.reshape(b, gh * gw, d)


class FaceAttention(nnx.Module):
  """Multi-head self-attention with one fused `qkv` projection and an output `proj`."""

  def __init__(self, c: FaceViTConfig, prefix: str, dtype, rngs):
    self.num_heads = c.num_heads
    self.scale = c.head_dim ** -0.5
    self.qkv = Linear(c.embed_dim, 3 * c.embed_dim, path=f"{prefix}.qkv", use_bias=c.qkv_bias,
                      dtype=dtype, rngs=rngs)
    self.proj = Linear(c.embed_dim, c.embed_dim, path=f"{prefix}.proj", use_bias=True,
                       dtype=dtype, rngs=rngs)

  def __call__(self, x, ctx=None):  # [B, N, D]
    # qkv's output is [3, heads, head_dim] per token: q, k, v are its three D-wide thirds.
    q, k, v = jnp.split(self.qkv(x, ctx), 3, axis=-1)
    out = dl.dot_product_attention(q, k, v, self.num_heads, self.scale)
    return self.proj(out.astype(x.dtype), ctx)


class FaceMlp(nnx.Module):
  """`fc2(relu6(fc1(x)))`."""

  def __init__(self, c: FaceViTConfig, prefix: str, dtype, rngs):
    self.fc1 = Linear(c.embed_dim, c.mlp_dim, path=f"{prefix}.fc1", use_bias=True, dtype=dtype,
                      rngs=rngs)
    self.fc2 = Linear(c.mlp_dim, c.embed_dim, path=f"{prefix}.fc2", use_bias=True, dtype=dtype,
                      rngs=rngs)

  def __call__(self, x, ctx=None):
    return self.fc2(jax.nn.relu6(self.fc1(x, ctx)), ctx)


class FaceBlock(nnx.Module):
  """A pre-norm transformer block: `x += attn(norm1(x))`, `x += mlp(norm2(x))`."""

  def __init__(self, c: FaceViTConfig, index: int, dtype, rngs):
    prefix = f"blocks.{index}"
    self.norm1 = dl.LayerNorm(c.embed_dim, eps=c.layer_norm_eps, dtype=dtype)
    self.attn = FaceAttention(c, f"{prefix}.attn", dtype, rngs)
    self.norm2 = dl.LayerNorm(c.embed_dim, eps=c.layer_norm_eps, dtype=dtype)
    self.mlp = FaceMlp(c, f"{prefix}.mlp", dtype, rngs)

  def __call__(self, x, ctx=None):
    x = x + self.attn(self.norm1(x), ctx)
    return x + self.mlp(self.norm2(x), ctx)


class FaceViT(nnx.Module):
  """TransFace's ViT (Dan et al. 2023), named as its checkpoints.

  `__call__(images [B, C, H, W] in [-1, 1], *, ctx=None) -> tokens [B, N, D]`: the final `norm`
  output, FACT's local face representation. `embed(images) -> [B, num_features]`: the global
  identity embedding (senet patch weighting, then the `feature` head in eval mode).
  `ctx` is the forward context of jaxadapt's linear layers (None for the frozen encoder).
  """

  def __init__(self, config: FaceViTConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
    c = self.config = config
    n, d = c.num_patches, c.embed_dim
    self.patch_embed = PatchEmbed(c, dtype, rngs)
    self.pos_embed = nnx.Param(jax.random.normal(rngs.params(), (1, n, d), dtype) * 0.02)
    self.mask_token = nnx.Param(jax.random.normal(rngs.params(), (1, 1, d), dtype) * 0.02)
    self.blocks = nnx.List([FaceBlock(c, i, dtype, rngs) for i in range(c.depth)])
    self.norm = dl.LayerNorm(d, eps=c.layer_norm_eps, dtype=dtype)
    if c.num_features:
      linear = lambda i, o, path: Linear(i, o, path=path, dtype=dtype, rngs=rngs)  # noqa: E731
      # Sequential indices kept: 1 and 3 are ReLU / Sigmoid in `senet` (no parameters).
      self.senet = nnx.List([linear(n * d, n, "senet.0"), dl.Identity(),
                             linear(n, n, "senet.2"), dl.Identity()])
      self.feature = nnx.List([
          linear(n * d, d, "feature.0"), BatchNorm1d(d, eps=c.batch_norm_eps, dtype=dtype),
          linear(d, c.num_features, "feature.2"),
          BatchNorm1d(c.num_features, eps=c.batch_norm_eps, dtype=dtype)])
    else:
      self.senet = self.feature = None

  def __call__(self, images, *, ctx=None):
    """Per-patch tokens `[B, N, D]` (TransFace's `norm` output) of `images [B, C, H, W]`."""
    check_images(self.config, images)
    dtype = self.pos_embed[...].dtype
    x = self.patch_embed(jnp.transpose(images, (0, 2, 3, 1)).astype(dtype))
    x = x + self.pos_embed[...]
    for block in self.blocks:
      x = block(x, ctx)
    return self.norm(x)

  def patch_weights(self, tokens, *, ctx=None):
    """`senet`'s weight in (0, 1) per patch, `[B, N]`, from the tokens `[B, N, D]`."""
    if self.senet is None:
      raise ValueError("this FaceViT has no identity head (num_features=0)")
    h = jax.nn.relu(self.senet[0](tokens.reshape(tokens.shape[0], -1), ctx))
    return jax.nn.sigmoid(self.senet[2](h, ctx).astype(jnp.float32)).astype(tokens.dtype)

  def embed(self, images, *, ctx=None):
    """The global identity embedding `[B, num_features]` (TransFace's `feature` head, eval)."""
    if self.feature is None:
      raise ValueError("this FaceViT has no identity head (num_features=0); its tokens are "
                       "its output")
    tokens = self(images, ctx=ctx)
    weighted = tokens * self.patch_weights(tokens, ctx=ctx)[..., None]
    h = self.feature[1](self.feature[0](weighted.reshape(tokens.shape[0], -1), ctx))
    return self.feature[3](self.feature[2](h, ctx))


# ----------------------------------------------------------------------------- frozen wrapper

def forward(graphdef, params, images, ctx=None):
  """The pure token forward `[B, C, H, W] -> [B, N, D]` (not jitted): for use inside a user's own
  jit/grad (FACT training)."""
  return dl.apply(graphdef, params, "__call__", images, ctx=ctx)


def embed(graphdef, params, images, ctx=None):
  """The pure identity-embedding forward `[B, C, H, W] -> [B, num_features]` (not jitted)."""
  return dl.apply(graphdef, params, "embed", images, ctx=ctx)


class FaceEncoder(dl.FrozenModel):
  """A frozen TransFace encoder: `config`, `graphdef`, `params` (a pure dict); jitted calls.

  `encoder(images)` gives the per-patch tokens `[B, N, D]` FACT conditions on;
  `encoder.embed(images)` the global identity embedding `[B, num_features]`. Images are aligned
  faces, NCHW, in [-1, 1]. Inside your own jit/grad use `forward` / `embed` of this module.
  """

  batch_item = "image"

  @classmethod
  def random(cls, config: FaceViTConfig, *, seed: int = 0, dtype=jnp.float32) -> "FaceEncoder":
    """A randomly initialised encoder (demos, tests)."""
    module = FaceViT(config, dtype=float_dtype(dtype), rngs=nnx.Rngs(seed))
    graphdef, state = nnx.split(module)
    return cls(config, graphdef, nnx.to_pure_dict(state))

  def __call__(self, images, *, adapter=None, context=None):
    """Per-patch tokens `[B, N, D]` of `images [B, C, H, W]` (jitted)."""
    images = check_images(self.config, jnp.asarray(images))
    return self._call("__call__", (images,), adapter=adapter, context=context)

  def embed(self, images, *, adapter=None, context=None):
    """The global identity embedding `[B, num_features]` (jitted)."""
    if not self.config.num_features:
      raise ValueError("this FaceEncoder has no identity head (num_features=0)")
    images = check_images(self.config, jnp.asarray(images))
    return self._call("embed", (images,), adapter=adapter, context=context)


# ----------------------------------------------------------------------------- checkpoints

def _checkpoint_name(path: str):
  """(checkpoint name, layout transform or None) of a param path: `torch_name`, plus the
  top-level parameters (`pos_embed`, `mask_token`) that keep their own names."""
  return (path, None) if "." not in path else torch_name(path)


def _expected_names(shapes) -> dict[str, tuple[str, Any, tuple]]:
  """{checkpoint name: (param path, torch->jax layout transform or None, jax shape)}."""
  out = {}

  def visit(path, leaf):
    name, transform = _checkpoint_name(path)
    out[name] = (path, transform, tuple(leaf.shape))
    return leaf
  paths.map_with_paths(visit, shapes)
  return out


def _fill(tensors: Mapping[str, Any], config: FaceViTConfig, dtype, source: str):
  """(graphdef, params) of a `FaceViT(config)` filled from TransFace-named torch-layout tensors.

  Raises:
    ValueError: missing or unexpected tensors, or shape mismatches, each named.
  """
  graphdef, state = nnx.split(nnx.eval_shape(
      lambda: FaceViT(config, dtype=dtype, rngs=nnx.Rngs(0))))
  shapes = nnx.to_pure_dict(state)
  expected = _expected_names(shapes)
  missing = [n for n in expected if n not in tensors]
  unexpected = [n for n in tensors if n not in expected and not _IGNORED.match(n)]
  if missing or unexpected:
    found = [f"{what} tensors {names[:8]}{f' (+{len(names) - 8} more)' if len(names) > 8 else ''}"
             for what, names in (("missing", missing), ("unexpected", unexpected)) if names]
    raise ValueError(
        f"{source}: the checkpoint does not fit a TransFace ViT with {config}: "
        f"{'; '.join(found)}. Strip a wrapper prefix (strip_prefix='module.'), pick the model's "
        f"entry (key=...), or pass the matching config=.")
  bad = []
  for name, (_, transform, want) in expected.items():
    got, torch_shape = tuple(tensors[name].shape), _torch_shape(want, transform)
    if got != torch_shape:
      bad.append(f"{name} has shape {got}, expected {torch_shape}")
  if bad:
    raise ValueError(f"{source}: tensor shapes do not fit a TransFace ViT with {config}: "
                     f"{'; '.join(bad[:8])}")
  by_path = {path: (name, transform) for name, (path, transform, _) in expected.items()}

  def load(path, leaf):
    name, transform = by_path[path]
    arr = np.asarray(tensors[name])
    arr = transform(arr) if transform is not None else arr
    return jnp.asarray(arr.astype(leaf.dtype))
  return graphdef, paths.map_with_paths(load, shapes)


def _torch_shape(shape: tuple, transform) -> tuple:
  """The torch-layout shape of a jaxadapt leaf: kernels `[in, out]` / HWIO back to torch's."""
  if transform is None:
    return shape
  return (shape[1], shape[0]) if len(shape) == 2 else (shape[3], shape[2], shape[0], shape[1])


def _read_tensors(path: str, key: Optional[str], strip_prefix: Optional[str]):
  """(tensors, config.json dict or None) of a .pt/.pth file, a .safetensors file or a saved dir."""
  if not path.endswith((".pt", ".pth", ".bin")) and (key is not None or
                                                       strip_prefix is not None):
    raise ValueError(f"{path}: key= and strip_prefix= apply to torch .pt/.pth files only")
  if os.path.isdir(path):
    weights = os.path.join(path, WEIGHTS_NAME)
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isfile(weights):
      raise FileNotFoundError(f"{path}: expected {WEIGHTS_NAME} (+ config.json) as written by "
                              f"save_face_encoder; found {sorted(os.listdir(path))}")
    cfg = (read_json_object(cfg_path, "a FaceViTConfig (img_size, patch_size, ...)")
           if os.path.isfile(cfg_path) else None)
    return SafetensorsFile(weights), cfg
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path}: no such file or directory (expected a TransFace .pt/.pth "
                            f"checkpoint, a .safetensors file or a save_face_encoder dir)")
  if path.endswith(".safetensors"):
    return SafetensorsFile(path), None
  return load_torch_file(path, key=key, strip_prefix=strip_prefix), None


def load_face_encoder(path: str | os.PathLike, *, num_heads: Optional[int] = None,
                      dtype="float32", config: Optional[FaceViTConfig] = None,
                      key: Optional[str] = None,
                      strip_prefix: Optional[str] = None) -> FaceEncoder:
  """Loads a TransFace ViT checkpoint as a frozen `FaceEncoder`.

  Args:
    path: a torch `.pt`/`.pth` state dict in TransFace's names (read without torch), a
      `.safetensors` file in the same names and torch layout, or a dir written by
      `save_face_encoder` (`face_encoder.safetensors` + `config.json`).
    num_heads: attention heads, which a checkpoint does not record; default: config.json's,
      else 8. It must match the checkpoint's training config: a wrong value loads (the shapes
      do not depend on it) but computes other tokens.
    dtype: parameter dtype ("float32" or "bfloat16").
    config: the architecture, instead of inferring it from the tensor shapes.
    key, strip_prefix: for `.pt` files, as in `jaxadapt.io.torch_pickle.load_torch_file`
      (a nested `{"state_dict": ...}`, a `module.` prefix).

  Returns:
    A `FaceEncoder`. `mask_token` and `senet` are loaded and kept (senet weights the patches of
    the identity embedding); `feature.{1,3}.num_batches_tracked` is read past (a training
    counter). Any other tensor the architecture lacks is an error.

  Raises:
    ValueError: missing or unexpected tensors, shape mismatches (named), a num_heads that
      conflicts with config, or a config.json that does not describe a TransFace ViT.
  """
  path = os.fspath(path)
  dtype = float_dtype(dtype)
  tensors, cfg_json = _read_tensors(path, key, strip_prefix)
  if config is not None:
    if num_heads is not None and num_heads != config.num_heads:
      raise ValueError(f"num_heads={num_heads} conflicts with config.num_heads="
                       f"{config.num_heads}; pass one")
  elif cfg_json is not None:
    config = FaceViTConfig.from_dict(cfg_json)
    if num_heads is not None and num_heads != config.num_heads:
      config = dataclasses.replace(config, num_heads=num_heads)
  else:
    shapes = {n: tuple(tensors[n].shape) for n in tensors}
    config = FaceViTConfig.from_tensors(shapes, num_heads=num_heads or 8)
  graphdef, params = _fill(tensors, config, dtype, path)
  return FaceEncoder(config, graphdef, params)


def _to_torch_layout(a: np.ndarray) -> np.ndarray:
  """jaxadapt's layout back to torch's: `[in, out]` -> `[out, in]`, HWIO -> OIHW."""
  if a.ndim == 2:
    return a.T
  if a.ndim == 4:
    return a.transpose(3, 2, 0, 1)
  raise ValueError(f"expected a 2-D linear or 4-D conv kernel, got shape {a.shape}")


def save_face_encoder(encoder: FaceEncoder, directory: str | os.PathLike) -> None:
  """Writes `face_encoder.safetensors` (TransFace names, torch layout) + `config.json`, which
  `load_face_encoder(directory)` reads back bit for bit."""
  from safetensors.numpy import save_file
  directory = os.fspath(directory)
  os.makedirs(directory, exist_ok=True)
  tensors = {}

  def visit(path, leaf):
    name, transform = _checkpoint_name(path)
    arr = np.asarray(jax.device_get(leaf))
    tensors[name] = np.ascontiguousarray(_to_torch_layout(arr) if transform is not None else arr)
    return leaf
  paths.map_with_paths(visit, encoder.params)
  save_file(tensors, os.path.join(directory, WEIGHTS_NAME), metadata={"format": "pt"})
  with open(os.path.join(directory, "config.json"), "w", encoding="utf-8") as f:
    json.dump(encoder.config.to_dict(), f, indent=2)
