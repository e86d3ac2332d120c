"""FaceChain-FACT: a face adapter with decoupled training (Yu et al. 2024, "FaceChain-FACT: Face
Adapter with Decoupled Training for Identity-preserved Personalization", arXiv 2410.12312).

A frozen text-to-image U-Net learns to draw a given person's face without losing what it could
do before. FACT's two halves, as the paper names them:

* The identity merging module (paper Sec. 3, "Identity Merging Module"):
  - face tokens: a frozen face-recognition ViT's per-patch features (TransFace, 112x112 ->
    144 tokens of width 512; `jaxadapt.models.face_vit`), which carry identity more than the
    global embedding of other adapters does, through a projector (`project`): a linear map over
    the token axis (144 -> `num_tokens`), a linear map to the U-Net's cross-attention width and
    a LayerNorm;
  - a gated self-attention adapter in every transformer block of the U-Net, between its
    self-attention and its cross-attention (the `...transformer_blocks.{i}.fuser` insertion
    point, where GLIGEN puts its gated self-attention, Li et al. 2023 Eq. 5-6):
        h <- h + s * tanh(alpha_a) * SA(LN([h ; W_in f]))[:N]
        h <- h + s * tanh(alpha_f) * FF(LN(h))
    with `s` the face scale chosen at inference and the gates `alpha` zero-initialised, so an
    untrained adapter leaves the base exactly as it is (`context`).
* Decoupled training (paper Sec. 3, "Decoupled Training"), which `train/fact.py` runs:
  - FAIR, face adapting increment regularisation (`fair_loss`): the increment each adapter adds
    to its block's residual stream is penalised outside the face mask, so the adapter learns
    identity where the face is and leaves the rest of the image (background, the text's
    content) to the base;
  - face-condition drop (`condition_drop`): with probability p the face features are zeroed
    (the projector then gives the null face tokens that classifier-free guidance on the face
    also uses: `null_face_tokens`);
  - face-condition shuffle (`shuffled_condition`): the conditioning face comes from ANOTHER
    photo of the same identity, so pose, expression and the crop's surroundings cannot be
    copied from the condition, only identity;
  - a curriculum (`Curriculum`): what changes when over training is a config.

Where the paper leaves a detail open, we chose (each also said where it is implemented):
  - FAIR's norm: the mean squared increment over tokens outside the face and channels, averaged
    over the adapted blocks; the mask is max-pooled to each block's token grid, so a token that
    touches the face counts as face (`fair_loss`).
  - The increment is each adapter's own addition at its block (h_after - h_before at the fuser
    point), not the change of the block's output through the rest of the network: the direct
    effect is what the adapter controls, and it costs nothing extra to record (`Tape`).
  - The face drop replaces the encoder features by zeros (the inference code's negative face
    embedding is the projector applied to zeros).
  - The curriculum's default (`Curriculum.default`): the shuffle probability ramps up from 0
    over the first half of training (easy, same-photo conditioning first; then the harder,
    decoupling task), drop and FAIR constant.
The released FACT inference code (v1) uses a resampler and decoupled cross-attention instead of
the gated self-attention the paper's Sec. 3 describes; jaxadapt follows the paper.

Use:
```python
fact = ja.fact.init_fact(unet, face_tokens=144, face_dim=512)        # zero gates: = base
tokens = fact.face_tokens(encoder(faces))                              # [B, M, D_ctx]
out = unet(x, t, text, context=fact.context(tokens, face_scale=0.7))
fact.save("fact_dir"); fact = ja.fact.load_fact("fact_dir")
```
"""
from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np

from jaxadapt import context as context_lib
from jaxadapt.adapters.lora import kernel_at
from jaxadapt.io.files import read_module_dir, save_module_dir

CONFIG_FILE = "fact_config.json"
WEIGHTS_FILE = "fact_adapter.safetensors"
ENCODER_DIR = "face_encoder"
FORMAT = "jaxadapt-fact/1"
FUSER = ".fuser"


@dataclasses.dataclass(frozen=True, kw_only=True)
class FACTConfig:
  """What a FACT adapter is: where it attaches and its sizes (saved as `fact_config.json`)."""
  points: tuple = ()          # fuser insertion points (one gated self-attention each)
  widths: tuple = ()          # each point's residual-stream width C
  face_tokens: int = 144      # N_f: encoder tokens in (TransFace: 144)
  face_dim: int = 512         # D_enc: encoder token width (TransFace: 512)
  num_tokens: int = 16        # M: face tokens after the projector's token-axis linear map
  context_dim: int = 768      # D_ctx: projector output width (the U-Net's cross-attention width)
  heads: tuple = ()           # attention heads of each point's gated self-attention (default:
                              # its block's own heads, as GLIGEN's fuser)
  ff_mult: int = 4            # the GEGLU feed-forward's hidden width is ff_mult * C
  seed: int = 0               # draws the initial weights

  def __post_init__(self):
    if not self.points or len(self.points) != len(self.widths):
      raise ValueError(f"FACT config needs one width per insertion point; got "
                       f"{len(self.points)} points and {len(self.widths)} widths")
    for name in ("face_tokens", "face_dim", "num_tokens", "context_dim", "ff_mult"):
      v = getattr(self, name)
      if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ValueError(f"FACT config {name} must be a positive int, got {v!r}")
    if len(self.heads) != len(self.points):
      raise ValueError(f"FACT config needs one head count per point; got {len(self.heads)} for "
                       f"{len(self.points)} points")
    bad = [(p, c, h) for p, c, h in zip(self.points, self.widths, self.heads)
           if isinstance(h, bool) or not isinstance(h, int) or h < 1 or c % h]
    if bad:
      raise ValueError(f"FACT heads must be positive ints dividing their point's width; "
                       f"{bad[0][0]} has width {bad[0][1]} and heads {bad[0][2]!r}")

  def to_json(self) -> dict:
    return {"format": FORMAT, **{f.name: (list(v) if isinstance(v, tuple) else v)
                                 for f in dataclasses.fields(self)
                                 for v in [getattr(self, f.name)]}}

  @classmethod
  def from_json(cls, data: Mapping[str, Any], source: str = "fact config") -> "FACTConfig":
    if not isinstance(data, Mapping) or data.get("format") != FORMAT:
      found = data.get("format") if isinstance(data, Mapping) else type(data).__name__
      raise ValueError(f"{source}: expected a FACT adapter config (format {FORMAT!r}), found "
                       f"{found!r}")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known - {"format"})
    if unknown:
      raise ValueError(f"{source}: unknown FACT config fields {unknown}")
    return cls(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in data.items()
                  if k in known})


def _block_of(point: str) -> str:
  return point[:-len(FUSER)]


def _block_heads(unet, point: str) -> int:
  """The attention heads of the U-Net block that holds `point` (diffusers' per-block
  `attention_head_dim`, which counts heads)."""
  c = unet.config
  n = len(c.block_out_channels)
  part, index = point.split(".")[:2]
  block = (n - 1 if part == "mid_block" else
           int(index) if part == "down_blocks" else n - 1 - int(index))
  return int(c.attention_head_dim[block])


def config_for(unet, *, face_tokens: int = 144, face_dim: int = 512, points=None,
               context_dim: Optional[int] = None, heads=None, **kw) -> FACTConfig:
  """The FACT config for a jaxadapt `UNet` (widths read from its params).

  Args:
    unet: a `jaxadapt.models.unet.UNet`.
    face_tokens, face_dim: the face encoder's token count and width (TransFace: 144, 512;
      `FaceEncoder.config.num_patches` / `.embed_dim`).
    points: fuser points to adapt (default every transformer block's, as the paper).
    context_dim: the projector's output width (default the U-Net's cross-attention width).
    heads: attention heads of every adapter (an int), or None for each block's own heads.
    **kw: other `FACTConfig` fields (num_tokens, ff_mult, seed).
  """
  from jaxadapt.models.unet import UNet
  if not isinstance(unet, UNet):
    raise TypeError(f"FACT's face adapter attaches to a jaxadapt UNet (its transformer blocks' "
                    f"fuser points), got {type(unet).__name__}")
  points = tuple(points or unet.fuser_points)
  known = set(unet.fuser_points)
  unknown = [p for p in points if p not in known]
  if unknown:
    raise ValueError(f"points {unknown[:3]} are not fuser points of this U-Net (e.g. "
                     f"{sorted(known)[:2]})")
  if context_dim is None:
    cross = {int(kernel_at(unet.params, f"{_block_of(p)}.attn2.to_k").shape[0]) for p in points}
    if len(cross) != 1:
      raise ValueError(f"the U-Net's blocks take text states of several widths {sorted(cross)};"
                       f" pass context_dim=")
    context_dim = cross.pop()
  widths = tuple(int(kernel_at(unet.params, f"{_block_of(p)}.attn1.to_out.0").shape[1])
                 for p in points)
  heads = (tuple(_block_heads(unet, p) for p in points) if heads is None
           else (heads,) * len(points))
  return FACTConfig(points=points, widths=widths, face_tokens=face_tokens, face_dim=face_dim,
                    context_dim=context_dim, heads=heads, **kw)


# -- parameters ---------------------------------------------------------------------------------

def _dense(key, fan_in: int, fan_out: int) -> jax.Array:
  return jax.random.normal(key, (fan_in, fan_out), jnp.float32) / np.sqrt(fan_in)


def init_params(config: FACTConfig) -> dict:
  """Fresh adapter params: {"projector": {...}, "points": {point: {...}}}.

  Every point's gates `alpha_attn` and `alpha_ff` are zero, so the adapted U-Net starts equal
  to the base (FACT Sec. 3; GLIGEN Eq. 5-6: tanh(0) = 0).
  """
  c = config
  k_proj, k_pts = jax.random.split(jax.random.key(c.seed))
  k1, k2 = jax.random.split(k_proj)
  params = {
      "projector": {"tokens": _dense(k1, c.face_tokens, c.num_tokens),
                    "tokens_b": jnp.zeros((c.num_tokens,)),
                    "proj": _dense(k2, c.face_dim, c.context_dim),
                    "proj_b": jnp.zeros((c.context_dim,)),
                    "ln_scale": jnp.ones((c.context_dim,)),
                    "ln_bias": jnp.zeros((c.context_dim,))},
      "points": {},
  }
  for i, (point, d) in enumerate(zip(c.points, c.widths)):
    ks = iter(jax.random.split(jax.random.fold_in(k_pts, i), 7))
    hidden = c.ff_mult * d
    params["points"][point] = {
        "in": _dense(next(ks), c.context_dim, d), "in_b": jnp.zeros((d,)),
        "ln1_scale": jnp.ones((d,)), "ln1_bias": jnp.zeros((d,)),
        "q": _dense(next(ks), d, d), "k": _dense(next(ks), d, d), "v": _dense(next(ks), d, d),
        "o": _dense(next(ks), d, d), "o_b": jnp.zeros((d,)),
        "ln2_scale": jnp.ones((d,)), "ln2_bias": jnp.zeros((d,)),
        "ff1": _dense(next(ks), d, 2 * hidden), "ff1_b": jnp.zeros((2 * hidden,)),
        "ff2": _dense(next(ks), hidden, d), "ff2_b": jnp.zeros((d,)),
        "alpha_attn": jnp.zeros(()), "alpha_ff": jnp.zeros(()),
    }
  return params


def init_params_shapes(config: FACTConfig):
  """Shapes of `init_params(config)` (no arrays are made)."""
  return jax.eval_shape(lambda: init_params(config))


def _layer_norm(x, scale, bias, eps: float = 1e-5):
  x = x.astype(jnp.float32)
  mean = x.mean(-1, keepdims=True)
  var = ((x - mean) ** 2).mean(-1, keepdims=True)
  return (x - mean) * jax.lax.rsqrt(var + eps) * scale + bias


# -- the identity merging module ------------------------------------------------------------------

def project(params: Mapping, features: jax.Array) -> jax.Array:
  """Face tokens [B, M, D_ctx] from encoder features [B, N_f, D_enc] (FACT Sec. 3, the
  projector): a linear map over the token axis, a linear map to the cross-attention width, then
  LayerNorm."""
  p = params["projector"]
  want = p["tokens"].shape[0], p["proj"].shape[0]
  if features.ndim != 3 or tuple(features.shape[1:]) != want:
    raise ValueError(f"FACT projector takes face-encoder features [B, {want[0]}, {want[1]}] "
                     f"(tokens, width), got shape {tuple(features.shape)}")
  f = features.astype(jnp.float32)
  t = jnp.einsum("bnd,nm->bmd", f, p["tokens"]) + p["tokens_b"][None, :, None]
  return _layer_norm(t @ p["proj"] + p["proj_b"], p["ln_scale"], p["ln_bias"])


def null_face_tokens(params: Mapping, batch: int) -> jax.Array:
  """The "no face" tokens [B, M, D_ctx]: the projector applied to zero features (what a dropped
  condition trains, and the unconditional branch of guidance on the face)."""
  p = params["projector"]
  return project(params, jnp.zeros((batch,) + tuple(p["tokens"].shape[:1])
                                    + tuple(p["proj"].shape[:1]), jnp.float32))


def _attention(z, p, heads: int):
  """Multi-head self-attention over z [B, T, C] (float32)."""
  b, t, c = z.shape
  hd = c // heads
  split = lambda a: a.reshape(b, t, heads, hd)  # noqa: E731
  q, k, v = split(z @ p["q"]), split(z @ p["k"]), split(z @ p["v"])
  scores = jnp.einsum("bnhd,bmhd->bhnm", q, k) / np.sqrt(hd)
  out = jnp.einsum("bhnm,bmhd->bnhd", jax.nn.softmax(scores, -1), v).reshape(b, t, c)
  return out @ p["o"] + p["o_b"]


def gated_self_attention(p: Mapping, h: jax.Array, face: jax.Array, scale: jax.Array,
                         heads: int) -> jax.Array:
  """One block's face adapter (FACT Sec. 3; GLIGEN Eq. 5-6), h [B, N, C] -> [B, N, C]:
  `h + s tanh(alpha_a) SA(LN([h; W_in f]))[:N]`, then `+ s tanh(alpha_f) FF(LN(h))`, FF a
  GEGLU feed-forward (Shazeer 2020) as GLIGEN's; at s = 1 this is diffusers'
  `GatedSelfAttentionDense`.

  Args:
    p: the point's params.
    h: the residual stream after the block's self-attention.
    face: face tokens [B, M, D_ctx] (`project`).
    scale: s, [B] or scalar.
    heads: attention heads.
  """
  n = h.shape[1]
  s = jnp.broadcast_to(jnp.asarray(scale, jnp.float32).reshape(-1), (h.shape[0],))[:, None, None]
  x = h.astype(jnp.float32)
  f = face.astype(jnp.float32) @ p["in"] + p["in_b"]                       # [B, M, C]
  z = _layer_norm(jnp.concatenate([x, f], axis=1), p["ln1_scale"], p["ln1_bias"])
  x = x + s * jnp.tanh(p["alpha_attn"]) * _attention(z, p, heads)[:, :n]
  y, gate = jnp.split(_layer_norm(x, p["ln2_scale"], p["ln2_bias"]) @ p["ff1"] + p["ff1_b"],
                      2, axis=-1)
  ff = y * jax.nn.gelu(gate, approximate=False)
  x = x + s * jnp.tanh(p["alpha_ff"]) * (ff @ p["ff2"] + p["ff2_b"])
  return x.astype(h.dtype)


def _fuser(point: str, heads: int, tape, p, out, hidden_in, cond, inputs):
  """The insert function at a fuser point: the gated self-attention on the residual stream
  `out`, its increment recorded on `tape` (FAIR) when one is given."""
  del hidden_in, cond
  missing = [k for k in ("face_tokens", "face_scale") if k not in inputs]
  if missing:
    raise ValueError(f"FACT adapter at {point}: the forward context lacks insert inputs "
                     f"{missing} (use fact.context(face_tokens, face_scale)); found "
                     f"{sorted(inputs)}")
  new = gated_self_attention(p, out, inputs["face_tokens"], inputs["face_scale"], heads)
  if tape is not None:
    tape.record(point, new.astype(jnp.float32) - out.astype(jnp.float32))
  return new


@functools.lru_cache(maxsize=None)
def _point_fn(point: str, heads: int):
  """The insert function of one point without a tape (one object per value: compiles reuse)."""
  return functools.partial(_fuser, point, heads, None)


def inserts(config: FACTConfig, params: Mapping,
            tape: Optional[context_lib.Tape] = None) -> dict:
  """{fuser point: `Partial`} for `Context.with_inserts`; the params are traced arguments.

  Args:
    tape: a `jaxadapt.context.Tape` that receives `(point, increment [B, N, C])` for every
      adapter (`fair_loss`); build it inside the traced function that reads it.
  """
  fn = ((lambda pt, h: _point_fn(pt, h)) if tape is None else
        (lambda pt, h: functools.partial(_fuser, pt, h, tape)))
  return {pt: jax.tree_util.Partial(fn(pt, h), params["points"][pt])
          for pt, h in zip(config.points, config.heads)}


def context(config: FACTConfig, params: Mapping, face_tokens: jax.Array, face_scale=1.0,
            base: Optional[context_lib.Context] = None,
            tape: Optional[context_lib.Tape] = None) -> context_lib.Context:
  """The forward context of the U-Net with the face adapter.

  Args:
    face_tokens: [B, M, D_ctx] from `project` (or `null_face_tokens`).
    face_scale: s, a scalar or [B]: 0 gives the base, 1 the adapter as trained.
    base: a context to extend (e.g. a style LoRA's): FACT composes with adapters on the base.
    tape: receives every adapter's increment (`fair_loss`).
  """
  ctx = (base or context_lib.Context()).with_inserts(inserts(config, params, tape))
  return ctx.with_insert_inputs(face_tokens=face_tokens,
                                face_scale=jnp.asarray(face_scale, jnp.float32))


# -- decoupled training -----------------------------------------------------------------------------

def pool_mask(mask: jax.Array, tokens: int) -> jax.Array:
  """The face mask [B, H, W] max-pooled to a token grid of `tokens` = (H/f)(W/f) cells: [B, N]
  (a token touching the face counts as face). Raises if no integer factor f fits."""
  b, hh, ww = mask.shape
  f = int(round(np.sqrt(hh * ww / tokens)))
  if f < 1 or hh % f or ww % f or (hh // f) * (ww // f) != tokens:
    raise ValueError(f"a face mask of {hh}x{ww} does not pool to a block of {tokens} tokens "
                     f"(expected the mask at the U-Net input's resolution, or a multiple of it)")
  m = mask.astype(jnp.float32).reshape(b, hh // f, f, ww // f, f).max(axis=(2, 4))
  return m.reshape(b, tokens)


def fair_loss(increments, face_mask: jax.Array) -> jax.Array:
  """FAIR, face adapting increment regularisation (FACT Sec. 3, "Decoupled Training").

  `mean_blocks mean_{tokens, channels} ((1 - M_b) * delta_b)^2`: each adapter's increment
  `delta_b` [B, N_b, C_b] to its block's residual stream, outside the face mask `M_b` (the mask
  max-pooled to the block's token grid). Zero when the adapter changes only the face region.

  Args:
    increments: `[(point, delta [B, N, C]), ...]`, e.g. a `Tape`'s entries after a forward.
    face_mask: [B, H, W], 1 on the face (at the U-Net input's resolution or a multiple).
  Returns:
    A scalar.
  """
  increments = list(increments)
  if not increments:
    raise ValueError("fair_loss needs the adapters' increments (a Tape's entries after a "
                     "forward with fact.context(..., tape=tape)); got none")
  mask = jnp.asarray(face_mask)
  if mask.ndim != 3:
    raise ValueError(f"face_mask must be [B, H, W], got shape {mask.shape}")
  terms = []
  for point, delta in increments:
    if delta.shape[0] != mask.shape[0]:
      raise ValueError(f"increment at {point} has batch {delta.shape[0]}, the mask "
                       f"{mask.shape[0]}")
    outside = 1.0 - pool_mask(mask, delta.shape[1])
    terms.append(jnp.mean(jnp.square(outside[..., None] * delta.astype(jnp.float32))))
  return jnp.mean(jnp.stack(terms))


def condition_drop(features: jax.Array, key: jax.Array, p) -> jax.Array:
  """Face-condition drop (FACT Sec. 3): each example's features zeroed with probability p
  (the projector then yields the null face tokens). `p` may be traced (a curriculum)."""
  keep = jax.random.uniform(key, (features.shape[0],)) >= p
  return features * keep.astype(features.dtype).reshape((-1,) + (1,) * (features.ndim - 1))


def shuffled_condition(identity, p: float, rng: np.random.Generator) -> np.ndarray:
  """Face-condition shuffle (FACT Sec. 3): for each example i the index of the photo that
  conditions it: with probability p another photo of the same identity (uniformly, when the
  identity has one), else i itself.

  Args:
    identity: [N] identity labels of the examples.
    p: shuffle probability in [0, 1].
    rng: a numpy Generator.
  Returns:
    int64 [N] indices into the same examples.
  """
  identity = np.asarray(identity)
  if not 0 <= p <= 1:
    raise ValueError(f"shuffle probability must be in [0, 1], got {p}")
  out = np.arange(len(identity))
  if p == 0:
    return out
  for ident in np.unique(identity):
    members = np.flatnonzero(identity == ident)
    if len(members) < 2:
      continue
    for i in members:
      if rng.random() < p:
        others = members[members != i]
        out[i] = others[rng.integers(len(others))]
  return out


@dataclasses.dataclass(frozen=True, kw_only=True)
class Curriculum:
  """What changes when over training (FACT Sec. 3, curriculum learning; the schedule is ours).

  Each knob is a piecewise-linear function of the training fraction u in [0, 1], given as
  `((u_0, v_0), (u_1, v_1), ...)` with u increasing: v_0 before u_0, v_last after the last u,
  linear in between. Knobs: `shuffle` (shuffle probability), `drop` (drop probability),
  `fair` (FAIR weight lambda).
  """
  shuffle: tuple = ((0.0, 0.0),)
  drop: tuple = ((0.0, 0.0),)
  fair: tuple = ((0.0, 0.0),)

  def __post_init__(self):
    for name in ("shuffle", "drop", "fair"):
      pts = getattr(self, name)
      if not pts or any(len(q) != 2 for q in pts):
        raise ValueError(f"Curriculum.{name} must be ((fraction, value), ...), got {pts!r}")
      us = [float(u) for u, _ in pts]
      if us != sorted(us) or us[0] < 0 or us[-1] > 1:
        raise ValueError(f"Curriculum.{name}: fractions must increase within [0, 1], got {us}")
      if name != "fair" and any(not 0 <= v <= 1 for _, v in pts):
        raise ValueError(f"Curriculum.{name}: probabilities must be in [0, 1], got {pts!r}")
      if name == "fair" and any(v < 0 for _, v in pts):
        raise ValueError(f"Curriculum.fair: weights must be >= 0, got {pts!r}")

  @classmethod
  def constant(cls, *, shuffle: float = 0.0, drop: float = 0.0, fair: float = 0.0):
    """No curriculum: every knob fixed for the whole run."""
    return cls(shuffle=((0.0, shuffle),), drop=((0.0, drop),), fair=((0.0, fair),))

  @classmethod
  def default(cls, *, shuffle: float = 0.5, drop: float = 0.1, fair: float = 1.0,
              ramp: float = 0.5):
    """Ours: same-photo conditioning first, the shuffle probability rising linearly to
    `shuffle` over the first `ramp` of training; drop and FAIR constant."""
    return cls(shuffle=((0.0, 0.0), (ramp, shuffle)), drop=((0.0, drop),),
               fair=((0.0, fair),))

  def at(self, fraction: float) -> dict:
    """{"shuffle": p, "drop": p, "fair": lambda} at training fraction u."""
    return {name: float(np.interp(fraction, [u for u, _ in getattr(self, name)],
                                  [v for _, v in getattr(self, name)]))
            for name in ("shuffle", "drop", "fair")}


# -- the adapter object -----------------------------------------------------------------------------

def num_params(params: Mapping) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(params)))


@dataclasses.dataclass
class FACTAdapter:
  """A FACT face adapter: `config`, `params` (projector + one gated self-attention per block)
  and, optionally, the frozen face `encoder` it was trained with (a `FaceEncoder`)."""
  config: FACTConfig
  params: dict
  encoder: Any = None

  @property
  def num_params(self) -> int:
    return num_params(self.params)

  def fraction_of(self, model) -> float:
    """The adapter's parameters as a share of the base model's."""
    return self.num_params / sum(int(np.prod(x.shape)) for x in jax.tree.leaves(model.params))

  def face_tokens(self, features) -> jax.Array:
    """Face tokens [B, M, D_ctx] from encoder features [B, N_f, D_enc]."""
    return project(self.params, jnp.asarray(features))

  def encode(self, faces) -> jax.Array:
    """Face tokens from face images (uint8 [H, W, 3] / [B, H, W, 3] or float NCHW in [-1, 1])
    through the adapter's encoder (resized to its input size)."""
    if self.encoder is None:
      raise ValueError("this FACT adapter has no face encoder; pass encoder features (e.g. "
                       "load_face_encoder(path)(faces)) or load_fact(dir, encoder=...)")
    return self.face_tokens(self.encoder(prepare_faces(faces, self.encoder.config.img_size)))

  def context(self, face_tokens, face_scale=1.0, base=None, tape=None):
    return context(self.config, self.params, face_tokens, face_scale, base, tape)

  def check_model(self, unet) -> None:
    """Raises if this adapter does not fit `unet` (points and widths): e.g. another base."""
    known = set(getattr(unet, "fuser_points", ()))
    for point, d in zip(self.config.points, self.config.widths):
      if point not in known:
        raise ValueError(f"FACT adapter attaches at {point}, which is no fuser point of this "
                         f"{type(unet).__name__}: was it trained on another base?")
      got = int(kernel_at(unet.params, f"{_block_of(point)}.attn1.to_out.0").shape[1])
      if got != d:
        raise ValueError(f"FACT adapter at {point} was built for width {d}, the U-Net's is "
                         f"{got}: was it trained on another base?")

  def save(self, directory: str) -> None:
    save_fact(self, directory)


def init_fact(unet, *, encoder=None, **kw) -> FACTAdapter:
  """A fresh (zero-gate) FACT adapter for `unet`; the face sizes come from `encoder` (a
  `FaceEncoder`) when given, else from `face_tokens=` / `face_dim=` (see `config_for`)."""
  if encoder is not None:
    kw.setdefault("face_tokens", encoder.config.num_patches)
    kw.setdefault("face_dim", encoder.config.embed_dim)
  config = config_for(unet, **kw)
  return FACTAdapter(config, init_params(config), encoder)


def prepare_faces(faces, size: int) -> jax.Array:
  """Face images as the encoder takes them: float32 NCHW [B, 3, size, size] in [-1, 1].

  Accepts uint8 [H, W, 3] / [B, H, W, 3] (0..255) or float NCHW [B, 3, H, W] in [-1, 1];
  resized bilinearly (antialiased) when H, W differ from `size`.
  """
  x = np.asarray(faces)
  if x.dtype == np.uint8:
    if x.ndim == 3:
      x = x[None]
    if x.ndim != 4 or x.shape[-1] != 3:
      raise ValueError(f"uint8 faces must be [H, W, 3] or [B, H, W, 3], got {x.shape}")
    x = x.astype(np.float32).transpose(0, 3, 1, 2) / 127.5 - 1.0
  elif x.ndim != 4 or x.shape[1] != 3:
    raise ValueError(f"float faces must be NCHW [B, 3, H, W] in [-1, 1], got shape {x.shape}")
  x = jnp.asarray(x, jnp.float32)
  if x.shape[2:] != (size, size):
    x = jax.image.resize(x, x.shape[:2] + (size, size), "linear", antialias=True)
  return x


def _flatten(params: Mapping) -> dict:
  out = {f"projector/{k}": v for k, v in params["projector"].items()}
  for point, leaves in params["points"].items():
    out.update({f"points/{point}/{k}": v for k, v in leaves.items()})
  return out


def _unflatten(flat: Mapping) -> dict:
  params: dict = {"projector": {}, "points": {}}
  for key, arr in flat.items():
    parts = key.split("/")
    if parts[0] == "projector" and len(parts) == 2:
      params["projector"][parts[1]] = arr
    elif parts[0] == "points" and len(parts) == 3:
      params["points"].setdefault(parts[1], {})[parts[2]] = arr
    else:
      raise ValueError(f"unexpected tensor {key!r} in a FACT adapter file")
  return params


def save_fact(adapter: FACTAdapter, directory: str) -> None:
  """Writes `fact_config.json` + `fact_adapter.safetensors` (float32) into `directory`, and the
  encoder (when the adapter has one) into `directory/face_encoder/`."""
  save_module_dir(directory, _flatten(jax.device_get(adapter.params)), adapter.config.to_json(),
                  config_file=CONFIG_FILE, weights_file=WEIGHTS_FILE, fmt=FORMAT)
  if adapter.encoder is not None:
    from jaxadapt.models.face_vit import save_face_encoder
    save_face_encoder(adapter.encoder, os.path.join(directory, ENCODER_DIR))


def load_fact(directory: str, unet=None, *, encoder=None) -> FACTAdapter:
  """Reads an adapter `save_fact` wrote; checks it against `unet` when given.

  Args:
    directory: the adapter dir.
    unet: a `UNet` to check the adapter against (points, widths).
    encoder: the face encoder to use (default: the dir's `face_encoder/` when present).
  Raises:
    FileNotFoundError: no FACT adapter in `directory`.
    ValueError: a malformed config, weights that do not match it, or a U-Net it does not fit.
  """
  data, flat, cfg_path, w_path = read_module_dir(
      directory, config_file=CONFIG_FILE, weights_file=WEIGHTS_FILE, what="FACT adapter",
      writer="save_fact")
  config = FACTConfig.from_json(data, cfg_path)
  params = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), _unflatten(flat))
  want = {k: v.shape for k, v in _flatten(init_params_shapes(config)).items()}
  got = {k: v.shape for k, v in _flatten(params).items()}
  if want != got:
    diff = sorted(k for k in set(want) | set(got) if want.get(k) != got.get(k))
    raise ValueError(f"{w_path}: the weights do not match {cfg_path}: {diff[:4]} (expected "
                     f"{[want.get(k) for k in diff[:4]]}, found {[got.get(k) for k in diff[:4]]})")
  if encoder is None and os.path.isdir(os.path.join(directory, ENCODER_DIR)):
    from jaxadapt.models.face_vit import load_face_encoder
    encoder = load_face_encoder(os.path.join(directory, ENCODER_DIR))
  if encoder is not None and (encoder.config.num_patches, encoder.config.embed_dim) != (
      config.face_tokens, config.face_dim):
    raise ValueError(f"the face encoder gives {encoder.config.num_patches} tokens of width "
                     f"{encoder.config.embed_dim}; the adapter was built for "
                     f"{config.face_tokens} x {config.face_dim}")
  adapter = FACTAdapter(config, params, encoder)
  if unet is not None:
    adapter.check_model(unet)
  return adapter
