"""AGD: adapter guidance distillation (Jensen & Sadat 2025, "Efficient Distillation of
Classifier-Free Guidance using Adapters").

Classifier-free guidance (Ho & Salimans 2022, Eq. 6) evaluates the network twice per sampling
step, `eps_cfg = eps_u + w (eps_c - eps_u)`. AGD keeps the base frozen and trains small adapters,
conditioned on the guidance scale `w`, so that ONE conditional forward pass predicts `eps_cfg`:
sampling then costs one network evaluation per step instead of two. The adapters train on the
states a CFG sampler actually visits (Algorithm 1: `cfg_trajectory`), with the loss
`|| eps_adapted(x_t, t, c; w) - eps_cfg ||^2` (Algorithm 2: `agd_loss`).

Each adapter attaches at an attention module's insertion point (`jaxadapt.context.insert`) and
adds to that module's output; its last projection is zero-initialised, so an untrained adapter
leaves the base exactly as it is. Three kinds (`KINDS`):

* "offset" (the paper's DiT adapter): fixed random Fourier features of w -> MLP -> LayerNorm,
  plus projections of the block's own timestep and class embeddings (what the DiT publishes
  to its insertion points), mapped to ONE offset per sample broadcast over the tokens.
* "cross_attention" (the paper's U-Net adapter): queries from the block's hidden states,
  keys/values from a small token set [embedding of w, timestep embedding, projected class
  embedding or prompt tokens] with learned positions.
* "token" (ours, not in the paper): the offset adapter's conditioning vector added to
  projections of each token's hidden state and of its attention output, then an MLP per token.
  Unlike the offset it can move each token differently (CFG's correction eps_c - eps_u depends
  on the image); unlike the cross-attention adapter it needs no softmax over a handful of
  image-independent values. `docs/agd.md` reports whether it wins.

`scale_by_guidance=True` (ours, off by default; not in the paper) multiplies every adapter's
output by (w - 1). CFG's correction is exactly (w - 1)(eps_c - eps_u), zero at w = 1; with the
factor the adapted model equals the base at w = 1 for any weights, and an adapter error shrinks
with the gap it corrects instead of staying as large at w = 1.5 as at w = 5.

Use:
```python
agd = ja.agd.init_agd(dit, kind="offset", hidden=32)
out = dit(x, t, labels, context=agd.context(guidance_scale=4.0))   # one pass, CFG-like
agd.save("agd_dir"); agd = ja.agd.load_agd("agd_dir")
images = pipe.generate(class_labels=[3], guidance_scale=4.0, guidance="agd", agd=agd)
```

The adapter depends on the base only through its widths and insertion points, so an adapter
trained on one checkpoint loads onto any checkpoint derived from the same base (a style LoRA
merged in, a fine-tune): `docs/agd.md` measures it.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np

from jaxadapt import context as context_lib
from jaxadapt.adapters.lora import kernel_at
from jaxadapt.io.files import read_module_dir, save_module_dir

KINDS = ("offset", "cross_attention", "token")
CONFIG_FILE = "agd_config.json"
WEIGHTS_FILE = "agd_adapter.safetensors"
FORMAT = "jaxadapt-agd/1"


@dataclasses.dataclass(frozen=True, kw_only=True)
class AGDConfig:
  """What an AGD adapter is: its kind, where it attaches and its sizes.

  Built from a model by `config_for`; saved beside the weights as `agd_config.json`.
  """
  kind: str = "offset"                 # one of KINDS
  points: tuple = ()                   # insertion points (attention module paths), one adapter each
  widths: tuple = ()                   # each point's output width D (= its input token width)
  timestep_dim: int = 0                # width of the base's timestep embedding (published)
  class_dim: int = 0                   # width of the base's class embedding (DiT); 0 = none
  context_dim: int = 0                 # width of prompt tokens at the point (U-Net cross-attn); 0 = none
  context_tokens: int = 0              # prompt tokens L (positions of the cross-attention token set)
  hidden: int = 32                     # adapter width H
  heads: int = 4                       # attention heads of the cross-attention adapter
  fourier_features: int = 64           # random Fourier features of w (half sin, half cos)
  fourier_std: float = 1.0             # std of their frequencies (cycles per unit of w)
  guidance_range: tuple = (1.0, 6.0)   # the w range the adapter is (to be) trained on
  scale_by_guidance: bool = False      # multiply every adapter output by (w - 1) (ours, not the
                                       # paper's): exactly the base at w = 1, as CFG is
  seed: int = 0                        # draws the Fourier frequencies and the initial weights

  def __post_init__(self):
    if self.kind not in KINDS:
      raise ValueError(f"AGD kind must be one of {KINDS}, got {self.kind!r}")
    if not self.points or len(self.points) != len(self.widths):
      raise ValueError(f"AGD config needs one width per insertion point; got {len(self.points)} "
                       f"points and {len(self.widths)} widths")
    for name in ("hidden", "heads", "fourier_features", "timestep_dim"):
      v = getattr(self, name)
      if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ValueError(f"AGD config {name} must be a positive int, got {v!r}")
    if self.fourier_features % 2:
      raise ValueError(f"fourier_features must be even (sin and cos halves), got "
                       f"{self.fourier_features}")
    if self.kind == "cross_attention" and self.hidden % self.heads:
      raise ValueError(f"hidden {self.hidden} must be a multiple of heads {self.heads}")
    if self.context_dim and self.context_tokens < 1:
      raise ValueError("context_dim needs context_tokens (the prompt length) >= 1")
    lo, hi = self.guidance_range
    if not (math.isfinite(lo) and math.isfinite(hi) and 0 <= lo < hi):
      raise ValueError(f"guidance_range must be (lo, hi) with 0 <= lo < hi, got "
                       f"{self.guidance_range!r}")

  @property
  def num_tokens(self) -> int:
    """Size of the cross-attention adapter's token set: w, t, then class or prompt tokens."""
    return 2 + (1 if self.class_dim else 0) + self.context_tokens

  def to_json(self) -> dict:
    return {"format": FORMAT, **{f.name: (list(v) if isinstance(v, tuple) else v)
                                 for f in dataclasses.fields(self)
                                 for v in [getattr(self, f.name)]}}

  @classmethod
  def from_json(cls, data: Mapping[str, Any], source: str = "agd config") -> "AGDConfig":
    if data.get("format") != FORMAT:
      raise ValueError(f"{source}: expected an AGD adapter config (format {FORMAT!r}), found "
                       f"format {data.get('format')!r}")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known - {"format"})
    if unknown:
      raise ValueError(f"{source}: unknown AGD config fields {unknown}")
    kw = {k: (tuple(v) if isinstance(v, list) else v) for k, v in data.items() if k in known}
    return cls(**kw)


def config_for(model, *, kind: Optional[str] = None, points=None, **kw) -> AGDConfig:
  """The AGD config of `kind` for a jaxadapt DiT or U-Net (widths read from its params).

  Defaults, as the paper: a DiT gets the offset adapter on every self-attention block
  (`transformer_blocks.{i}.attn1`); a U-Net the cross-attention adapter on every
  cross-attention module (`...attn2`), offset/token adapters on its self-attention modules.

  Args:
    model: a `jaxadapt.models.dit.DiT` or `jaxadapt.models.unet.UNet`.
    kind: one of KINDS (default: "offset" for a DiT, "cross_attention" for a U-Net).
    points: insertion points (default as above).
    **kw: other `AGDConfig` fields (hidden, heads, fourier_features, seed, guidance_range, ...).
  """
  from jaxadapt.models.dit import DiT
  from jaxadapt.models.unet import UNet
  c = model.config
  if isinstance(model, DiT):
    kind = kind or "offset"
    points = points or tuple(f"transformer_blocks.{i}.attn1" for i in range(c.num_layers))
    dims = dict(timestep_dim=c.inner_dim, class_dim=c.inner_dim)
  elif isinstance(model, UNet):
    kind = kind or "cross_attention"
    suffix = "attn2" if kind == "cross_attention" else "attn1"
    points = points or tuple(p for p in model.attention_paths if p.endswith(suffix))
    cross = {int(kernel_at(model.params, f"{p}.to_k").shape[0]) for p in points
             if p.endswith("attn2")}
    if len(cross) > 1:
      raise ValueError(f"the U-Net's cross-attention modules take prompt tokens of several "
                       f"widths {sorted(cross)}; AGD's prompt projection needs one")
    dims = dict(timestep_dim=c.time_embed_dim)
    if kind == "cross_attention" and cross:
      dims.update(context_dim=cross.pop(), context_tokens=kw.pop("context_tokens", 77))
  else:
    raise TypeError(f"AGD adapters attach to a jaxadapt DiT or UNet, got {type(model).__name__}")
  known = set(model.insertion_points)
  unknown = [p for p in points if p not in known]
  if unknown:
    raise ValueError(f"insertion points {unknown[:3]} are not attention modules of this "
                     f"{type(model).__name__} (e.g. {sorted(known)[:2]})")
  widths = tuple(int(kernel_at(model.params, f"{p}.to_out.0").shape[1]) for p in points)
  return AGDConfig(kind=kind, points=tuple(points), widths=widths, **dims, **kw)


# -- parameters ---------------------------------------------------------------------------------

def _dense(key, fan_in: int, fan_out: int) -> jax.Array:
  return jax.random.normal(key, (fan_in, fan_out), jnp.float32) / np.sqrt(fan_in)


def init_params(config: AGDConfig) -> dict:
  """Fresh adapter params: {"fourier": [F/2] (fixed), "w_mlp": {...}, "points": {point: {...}}}.

  Every point's last projection (`out`, `out_b`) is zero, so the adapted model starts equal to
  the base (AGD Sec. 3: training starts from the base model).
  """
  c, h = config, config.hidden
  key = jax.random.key(c.seed)
  k_four, k_mlp, k_pts = jax.random.split(key, 3)
  k1, k2 = jax.random.split(k_mlp)
  params = {
      "fourier": jax.random.normal(k_four, (c.fourier_features // 2,), jnp.float32)
                 * c.fourier_std,
      "w_mlp": {"l1": _dense(k1, c.fourier_features, h), "b1": jnp.zeros((h,)),
                "l2": _dense(k2, h, h), "b2": jnp.zeros((h,)),
                "ln_scale": jnp.ones((h,)), "ln_bias": jnp.zeros((h,))},
      "points": {},
  }
  for i, (point, d) in enumerate(zip(c.points, c.widths)):
    ks = iter(jax.random.split(jax.random.fold_in(k_pts, i), 8))
    p = {"t": _dense(next(ks), c.timestep_dim, h), "b": jnp.zeros((h,)),
         "out": jnp.zeros((h, d)), "out_b": jnp.zeros((d,))}
    if c.class_dim:
      p["c"] = _dense(next(ks), c.class_dim, h)
    if c.kind == "token":
      p["h"], p["a"] = _dense(next(ks), d, h), _dense(next(ks), d, h)
    if c.kind == "cross_attention":
      p.update(q=_dense(next(ks), d, h), k=_dense(next(ks), h, h), v=_dense(next(ks), h, h),
               pos=0.02 * jax.random.normal(next(ks), (c.num_tokens, h), jnp.float32))
      if c.context_dim:
        p["ctx"] = _dense(next(ks), c.context_dim, h)
    params["points"][point] = p
  return params


def trainable_part(params: Mapping) -> dict:
  """The part of the params that trains (everything but the fixed Fourier frequencies)."""
  return {k: v for k, v in params.items() if k != "fourier"}


def with_trainable(params: Mapping, trainable: Mapping) -> dict:
  """`params` with its trainable part replaced (the inverse of `trainable_part`)."""
  return {"fourier": params["fourier"], **trainable}


# -- the forward at one insertion point ---------------------------------------------------------

def _layer_norm(x, eps: float = 1e-6):
  mean = x.mean(-1, keepdims=True)
  var = ((x - mean) ** 2).mean(-1, keepdims=True)
  return (x - mean) * jax.lax.rsqrt(var + eps)


def guidance_embedding(params: Mapping, w: jax.Array) -> jax.Array:
  """`LN(MLP([sin 2 pi f w, cos 2 pi f w]))` [B, H]: the embedding of the guidance scale w [B]
  through fixed random Fourier features (Tancik et al. 2020) and an MLP (AGD Sec. 3)."""
  m = params["w_mlp"]
  angles = 2 * jnp.pi * w[:, None] * params["fourier"][None]
  feats = jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=-1)
  h = jax.nn.silu(feats @ m["l1"] + m["b1"]) @ m["l2"] + m["b2"]
  return _layer_norm(h) * m["ln_scale"] + m["ln_bias"]


def _inputs(inputs: Mapping, batch: int, config_dims: tuple, point: str):
  """(w [B], timestep_emb [B, Dt], class_emb [B, Dc] or None) from the insert inputs."""
  class_dim, = config_dims
  missing = [k for k in ("guidance_scale", "timestep_emb") if k not in inputs]
  if class_dim and "class_emb" not in inputs:
    missing.append("class_emb")
  if missing:
    raise ValueError(f"AGD adapter at {point}: the forward context lacks insert inputs "
                     f"{missing} (pass context=agd.context(guidance_scale=...) to a model that "
                     f"publishes its embeddings: a jaxadapt DiT or UNet); found {sorted(inputs)}")
  w = jnp.broadcast_to(jnp.asarray(inputs["guidance_scale"], jnp.float32).reshape(-1), (batch,))
  temb = inputs["timestep_emb"].astype(jnp.float32)
  cemb = inputs["class_emb"].astype(jnp.float32) if class_dim else None
  return w, temb, cemb


def _conditioning(p, params, w, temb, cemb):
  """e = LN(MLP(fourier(w))) + P_t silu(t_emb) [+ P_c silu(c_emb)] + b: [B, H] (AGD Sec. 3)."""
  e = guidance_embedding(params, w) + jax.nn.silu(temb) @ p["t"] + p["b"]
  if cemb is not None:
    e = e + jax.nn.silu(cemb) @ p["c"]
  return e


def _add(out, delta, w, gain: bool):
  """`out + delta` [B, N, D] (delta [B, N or 1, D]), times (w - 1) per sample with `gain`."""
  if gain:
    delta = delta * (w - 1.0)[:, None, None]
  return out + delta.astype(out.dtype)


def _offset(point, class_dim, gain, p, params, out, hidden_in, cond, inputs):
  """Offset adapter: one vector per sample, `out + W_o silu(e) + b_o` broadcast over tokens."""
  del hidden_in, cond
  w, temb, cemb = _inputs(inputs, out.shape[0], (class_dim,), point)
  e = _conditioning(p, params, w, temb, cemb)
  delta = jax.nn.silu(e) @ p["out"] + p["out_b"]  # [B, D]
  return _add(out, delta[:, None, :], w, gain)


def _token(point, class_dim, gain, p, params, out, hidden_in, cond, inputs):
  """Token adapter (ours): `out + W_o gelu(LN(h_i) W_h + LN(o_i) W_a + e) + b_o` for every
  token i (h_i its input to the attention module, o_i the attention's output)."""
  del cond
  w, temb, cemb = _inputs(inputs, out.shape[0], (class_dim,), point)
  e = _conditioning(p, params, w, temb, cemb)
  z = (_layer_norm(hidden_in.astype(jnp.float32)) @ p["h"]
       + _layer_norm(out.astype(jnp.float32)) @ p["a"] + e[:, None, :])
  return _add(out, jax.nn.gelu(z) @ p["out"] + p["out_b"], w, gain)


def _cross_attention(point, class_dim, gain, heads, p, params, out, hidden_in, cond, inputs):
  """Cross-attention adapter: queries from the tokens' hidden states, keys/values from the
  token set [w embedding, t embedding, class embedding | prompt tokens] + positions."""
  b = out.shape[0]
  w, temb, cemb = _inputs(inputs, b, (class_dim,), point)
  toks = [guidance_embedding(params, w)[:, None], (jax.nn.silu(temb) @ p["t"] + p["b"])[:, None]]
  if cemb is not None:
    toks.append((jax.nn.silu(cemb) @ p["c"])[:, None])
  if "ctx" in p:
    if cond is None:
      raise ValueError(f"AGD cross-attention adapter at {point} projects prompt tokens, but the "
                       "module has no cross-attention context (attach it to an attn2 point)")
    want = p["pos"].shape[0] - len(toks)
    if cond.shape[1] != want:
      raise ValueError(f"AGD adapter at {point} was built for {want} prompt tokens, the model "
                       f"got {cond.shape[1]}")
    toks.append(cond.astype(jnp.float32) @ p["ctx"])
  kv = jnp.concatenate(toks, axis=1) + p["pos"][None]                 # [B, M, H]
  q = _layer_norm(hidden_in.astype(jnp.float32)) @ p["q"]             # [B, N, H]
  k, v = kv @ p["k"], kv @ p["v"]
  hd = q.shape[-1] // heads
  split = lambda a: a.reshape(a.shape[0], a.shape[1], heads, hd)      # noqa: E731
  scores = jnp.einsum("bnhd,bmhd->bhnm", split(q), split(k)) / np.sqrt(hd)
  att = jnp.einsum("bhnm,bmhd->bnhd", jax.nn.softmax(scores, -1), split(v))
  att = att.reshape(att.shape[0], att.shape[1], -1)
  return _add(out, att @ p["out"] + p["out_b"], w, gain)


@functools.lru_cache(maxsize=None)
def _point_fn(kind: str, point: str, class_dim: int, gain: bool, heads: int):
  """The insert function of one point (one object per distinct value: compiles are reused)."""
  if kind == "cross_attention":
    return functools.partial(_cross_attention, point, class_dim, gain, heads)
  return functools.partial(_offset if kind == "offset" else _token, point, class_dim, gain)


def inserts(config: AGDConfig, params: Mapping) -> dict:
  """{insertion point: `Partial`} for `FrozenModel(..., inserts=)` or `Context.with_inserts`.

  The params are Partial arguments (traced), so new weights reuse the compiled forward.
  """
  shared = {"fourier": params["fourier"], "w_mlp": params["w_mlp"]}
  return {pt: jax.tree_util.Partial(_point_fn(config.kind, pt, config.class_dim,
                                              config.scale_by_guidance, config.heads),
                                    params["points"][pt], shared)
          for pt in config.points}


def context(config: AGDConfig, params: Mapping, guidance_scale,
            base: Optional[context_lib.Context] = None) -> context_lib.Context:
  """The forward context of the adapted model at guidance scale w (scalar or [B]).

  `base` (e.g. a LoRA's context) is kept: AGD composes with adapters on the base's layers.
  """
  ctx = (base or context_lib.Context()).with_inserts(inserts(config, params))
  return ctx.with_insert_inputs(guidance_scale=jnp.asarray(guidance_scale, jnp.float32))


# -- the adapter object -------------------------------------------------------------------------

def num_params(params: Mapping, *, trainable_only: bool = True) -> int:
  tree = trainable_part(params) if trainable_only else params
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))


@dataclasses.dataclass
class AGDAdapter:
  """An AGD adapter: `config` (kind, points, sizes) and `params` (a pytree)."""
  config: AGDConfig
  params: dict

  @property
  def kind(self) -> str:
    return self.config.kind

  @property
  def num_params(self) -> int:
    """Trainable parameters (the fixed Fourier frequencies excluded)."""
    return num_params(self.params)

  def fraction_of(self, model) -> float:
    """The adapter's trainable parameters as a share of the base model's."""
    return self.num_params / sum(int(np.prod(x.shape)) for x in jax.tree.leaves(model.params))

  def inserts(self) -> dict:
    return inserts(self.config, self.params)

  def context(self, guidance_scale, base: Optional[context_lib.Context] = None):
    return context(self.config, self.params, guidance_scale, base)

  def check_model(self, model) -> None:
    """Raises if this adapter does not fit `model` (points and widths): e.g. another base."""
    known = set(model.insertion_points)
    for point, d in zip(self.config.points, self.config.widths):
      if point not in known:
        raise ValueError(f"AGD adapter attaches at {point}, which is no attention module of "
                         f"this {type(model).__name__}: was it trained on another base?")
      got = int(kernel_at(model.params, f"{point}.to_out.0").shape[1])
      if got != d:
        raise ValueError(f"AGD adapter at {point} was built for width {d}, the model's is {got}:"
                         f" was it trained on another base?")

  def save(self, directory: str) -> None:
    save_agd(self, directory)


def init_agd(model, *, kind: Optional[str] = None, **kw) -> AGDAdapter:
  """A fresh (zero-output) AGD adapter for `model`; see `config_for` for the arguments."""
  config = config_for(model, kind=kind, **kw)
  return AGDAdapter(config, init_params(config))


def _flatten(params: Mapping) -> dict:
  out = {}
  for name, value in params.items():
    if name == "points":
      for point, leaves in value.items():
        for leaf, arr in leaves.items():
          out[f"points/{point}/{leaf}"] = arr
    elif isinstance(value, Mapping):
      for leaf, arr in value.items():
        out[f"{name}/{leaf}"] = arr
    else:
      out[name] = value
  return out


def _unflatten(flat: Mapping) -> dict:
  params: dict = {"points": {}}
  for key, arr in flat.items():
    parts = key.split("/")
    if parts[0] == "points" and len(parts) == 3:
      params["points"].setdefault(parts[1], {})[parts[2]] = arr
    elif len(parts) == 2:
      params.setdefault(parts[0], {})[parts[1]] = arr
    else:
      params[key] = arr
  return params


def save_agd(adapter: AGDAdapter, directory: str) -> None:
  """Writes `agd_config.json` + `agd_adapter.safetensors` (float32) into `directory`."""
  save_module_dir(directory, _flatten(jax.device_get(adapter.params)), adapter.config.to_json(),
                  config_file=CONFIG_FILE, weights_file=WEIGHTS_FILE, fmt=FORMAT)


def load_agd(directory: str, model=None) -> AGDAdapter:
  """Reads an adapter `save_agd` wrote; checks it against `model` when given.

  Raises:
    FileNotFoundError: no AGD adapter in `directory`.
    ValueError: a malformed config, weights that do not match it, or a model it does not fit.
  """
  data, flat, cfg_path, w_path = read_module_dir(
      directory, config_file=CONFIG_FILE, weights_file=WEIGHTS_FILE, what="AGD adapter",
      writer="save_agd")
  config = AGDConfig.from_json(data, cfg_path)
  params = jax.tree.map(jnp.asarray, _unflatten(flat))
  want = jax.tree.map(lambda x: x.shape, init_params_shapes(config))
  got = jax.tree.map(lambda x: x.shape, params)
  if want != got:
    raise ValueError(f"{w_path}: the weights do not match {cfg_path} (expected shapes "
                     f"{_flatten(want) if len(str(want)) < 400 else 'of the config'}, found "
                     f"{sorted(set(_flatten(got)) ^ set(_flatten(want)))[:4] or 'other shapes'})")
  adapter = AGDAdapter(config, params)
  if model is not None:
    adapter.check_model(model)
  return adapter


def init_params_shapes(config: AGDConfig):
  """Shapes of `init_params(config)` (no arrays are made)."""
  return jax.eval_shape(lambda: init_params(config))


# -- Algorithm 1 (trajectories) and Algorithm 2 (the loss) ---------------------------------------

def cfg_trajectory(denoise_fn, scheduler, latents, cond, uncond, guidance_scale, num_steps: int,
                   key=None):
  """Runs the CFG sampler and returns every step's training record (AGD Algorithm 1).

  Pure and jittable. At step i the sampler's model input `x_i`, its timestep `t_i`, the
  conditional prediction `eps_c` and the guided one `eps_cfg = eps_u + w (eps_c - eps_u)`
  (Ho & Salimans 2022 Eq. 6) are recorded; the next state comes from the scheduler's step on
  `eps_cfg`, exactly as `jaxadapt.diffusion.sampling.sample` does.

  Args:
    denoise_fn: `denoise_fn(x [2B, ...], t [2B], cond) -> out` (as `sampling.sample`).
    scheduler: a jaxadapt scheduler (deterministic ones need no key).
    latents: [B, ...] initial noise N(0, I) (scaled by the scheduler's init_noise_sigma here).
    cond, uncond: conditioning pytrees, leaves [B, ...] (uncond: the null class / empty prompt).
    guidance_scale: [B] (or scalar) w per trajectory.
    num_steps: sampler steps N.
    key: PRNG key for stochastic schedulers (step i uses fold_in(key, i)).

  Returns:
    dict: "x" [N, B, ...] model inputs, "t" [N] timesteps, "eps_cond" and "eps_cfg" [N, B, ...]
    (the sample's channels only), "sample" [B, ...] the final x_0.
  """
  from jaxadapt.diffusion import base, guidance
  batch = latents.shape[0]
  w = guidance.per_sample_scale(guidance_scale, batch, 1, jnp.float32)
  state = scheduler.init_state(num_steps, latents)
  x0 = (latents * state.init_noise_sigma).astype(latents.dtype)
  n = int(state.timesteps.shape[0])
  if n != num_steps:
    raise ValueError(f"cfg_trajectory needs one model evaluation per step; "
                     f"{type(scheduler).__name__} makes {n} for {num_steps} steps (use DDIM, "
                     f"DDPM, Euler or DPM-Solver)")

  def body(carry, i):
    x, state = carry
    t = state.timesteps[i]
    x_in = scheduler.scale_model_input(state, x, i)
    both = jax.tree.map(lambda c, u: jnp.concatenate([c, u]), cond, uncond)
    out2 = denoise_fn(jnp.concatenate([x_in, x_in]), jnp.broadcast_to(t, (2 * batch,)), both)
    out = guidance.guide_model_output(out2[batch:], out2[:batch], w, x.shape)
    eps_c = out2[:batch]
    if out.shape != x.shape:
      out, _ = base.split_learned_variance(out, x, who="cfg_trajectory")
      eps_c, _ = base.split_learned_variance(eps_c, x, who="cfg_trajectory")
    step_key = None if key is None else jax.random.fold_in(key, i)
    x_next, state = scheduler.step(state, out, i, x, step_key)
    return (x_next.astype(x.dtype), state), (x_in, t, eps_c, out)

  (final, _), (xs, ts, eps_c, eps_cfg) = jax.lax.scan(body, (x0, state),
                                                      jnp.arange(n, dtype=jnp.int32))
  return {"x": xs, "t": ts, "eps_cond": eps_c, "eps_cfg": eps_cfg, "sample": final}


def agd_loss(prediction: jax.Array, eps_cfg: jax.Array) -> jax.Array:
  """`mean || eps_adapted - eps_cfg ||^2` (AGD Algorithm 2), on the sample's channels (a
  learned-sigma output's variance half is not distilled)."""
  if prediction.shape != eps_cfg.shape:
    c = eps_cfg.shape[1]
    if prediction.shape[1] != 2 * c or prediction.shape[2:] != eps_cfg.shape[2:]:
      raise ValueError(f"agd_loss: prediction {prediction.shape} does not match the target "
                       f"{eps_cfg.shape} (nor its learned-sigma double)")
    prediction = prediction[:, :c]
  return jnp.mean(jnp.square(prediction.astype(jnp.float32) - eps_cfg.astype(jnp.float32)))


def gap_recovered(eps_adapted, eps_cond, eps_cfg) -> float:
  """The share of the eps_cond -> eps_cfg gap an adapted prediction closes:
  `1 - sum_i ||eps_adapted_i - eps_cfg_i|| / sum_i ||eps_cond_i - eps_cfg_i||` (L2 norms per
  example, not squared: 1 = CFG exactly, 0 = no better than the unguided prediction)."""
  flat = lambda a: np.asarray(a, np.float64).reshape(np.shape(a)[0], -1)  # noqa: E731
  a, c, g = flat(eps_adapted), flat(eps_cond), flat(eps_cfg)
  gap = np.linalg.norm(c - g, axis=1).sum()
  if gap == 0:
    raise ValueError("gap_recovered: eps_cond equals eps_cfg everywhere (w = 1): no gap")
  return float(1 - np.linalg.norm(a - g, axis=1).sum() / gap)
