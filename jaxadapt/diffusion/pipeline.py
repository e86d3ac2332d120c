"""Text-to-image and class-to-image pipelines over diffusers pipeline folders.

```python
import jaxadapt as ja
pipe = ja.load_pipeline("sd_pipeline_dir")          # model_index.json + unet/ vae/ text_encoder/...
images = pipe.generate(prompt=["a cat", "a dog"], num_steps=30, scheduler="dpm++2m", seed=0)
ja.save_image_grid(images, "samples.png")            # images: uint8 [N, H, W, 3]
dit = ja.load_pipeline("dit_pipeline_dir")           # DiTPipeline: transformer/ vae/ scheduler/
images = dit.generate(class_labels=[207, "umbrella"], guidance_scale=4.0)
```

Each pipeline reproduces its diffusers counterpart step for step, so that the same initial noise
(``latents``, NCHW as diffusers takes it) gives the same image:

- Stable Diffusion (latent diffusion, Rombach et al. 2022, Sec. 3.3): CLIP text states of the
  prompt (``last_hidden_state``, as ``StableDiffusionPipeline`` uses by default, SD 2.x
  included) condition the U-Net; the empty (or negative) prompt is the unconditional branch of
  classifier-free guidance (Ho & Salimans 2022, Eq. 6); the final latents are divided by the
  VAE's ``scaling_factor`` and decoded.
- DiT (Peebles & Xie 2023): class labels condition the transformer, the null class
  ``num_classes`` is the unconditional branch, guidance applies to the noise half of the
  learned-sigma output only, and the VAE decodes ``latents / scaling_factor``.

Pixels are ``round(255 * clip(x / 2 + 0.5, 0, 1))`` as in diffusers (``images.to_uint8``).
A pipeline without a VAE (``"vae": [null, null]``) samples in pixel space. Stable Diffusion's
``generate(image=, mask_image=)`` inpaints as diffusers' ``StableDiffusionInpaintPipeline`` does
with a U-Net without mask channels (the kept region is re-noised and pasted after every step).
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxadapt.diffusion import images as images_lib
from jaxadapt.diffusion import lora_scales
from jaxadapt.diffusion import sampling
from jaxadapt.diffusion.schedulers import SCHEDULERS, scheduler_from_config
from jaxadapt.diffusion.schedules import read_scheduler_config
from jaxadapt.io.files import read_json_object
from jaxadapt.io.hf import read_config
from jaxadapt.models import frozen

logger = logging.getLogger(__name__)

# Sampler names for `generate(scheduler=...)`: (diffusers class, options replacing the config's).
# A swap keeps the pipeline's noise schedule (betas, spacing, prediction type), as diffusers'
# `Scheduler.from_config(pipe.scheduler.config)` does.
SCHEDULER_NAMES: dict[str, tuple[str, dict[str, Any]]] = {
    "ddpm": ("DDPMScheduler", {}),
    "ddim": ("DDIMScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler-karras": ("EulerDiscreteScheduler", {"use_karras_sigmas": True}),
    "dpm++2m": ("DPMSolverMultistepScheduler", {"solver_order": 2}),
    "dpm++2m-karras": ("DPMSolverMultistepScheduler", {"solver_order": 2,
                                                           "use_karras_sigmas": True}),
    "pndm": ("PNDMScheduler", {}),
    "plms": ("PNDMScheduler", {"skip_prk_steps": True}),
    "euler-a": ("EulerAncestralDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
    "lms": ("LMSDiscreteScheduler", {}),
    "lms-karras": ("LMSDiscreteScheduler", {"use_karras_sigmas": True}),
    "unipc": ("UniPCMultistepScheduler", {}),
    "dpm++2m-sde": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}),
    "dpm++2m-sde-karras": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++",
                                                           "use_karras_sigmas": True}),
    "dpm++2s": ("DPMSolverSinglestepScheduler", {}),
    "kdpm2": ("KDPM2DiscreteScheduler", {}),
    "kdpm2-a": ("KDPM2AncestralDiscreteScheduler", {}),
    "deis": ("DEISMultistepScheduler", {}),
}

SD_COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
DIT_COMPONENTS = ("transformer", "vae", "scheduler")


# ----------------------------------------------------------------------------- denoisers

def _unet_denoise(graphdef, params, ctx, x, t, text_states):
  """The U-Net prediction (epsilon or v) at (x_t, t, text states); pure, traced in `sample`."""
  return frozen.apply(graphdef, params, "__call__", x, t, text_states, ctx=ctx)


def _dit_denoise(graphdef, params, ctx, x, t, labels):
  """The DiT output (noise, and the learned variance when the model has it); pure."""
  return frozen.apply(graphdef, params, "__call__", x, t, labels, ctx=ctx)


def _agd_denoise(graphdef, params, ctx, agd_inserts, x, t, cond):
  """The backbone with AGD adapters at guidance scale `cond["w"]` [B] (one pass, no uncond):
  `cond["c"]` is its conditioning (class labels or text states). Pure."""
  from jaxadapt.context import Context
  ctx = (ctx or Context()).with_inserts(agd_inserts).with_insert_inputs(guidance_scale=cond["w"])
  return frozen.apply(graphdef, params, "__call__", x, t, cond["c"], ctx=ctx)


def _fact_denoise(graphdef, params, ctx, fact_inserts, x, t, cond):
  """The U-Net with FACT's face adapter (Yu et al. 2024): `cond["c"]` the text states,
  `cond["face"]` the face tokens [B, M, D] and `cond["s"]` the face scale [B] (the
  unconditional branch of guidance carries the empty prompt and the null face). Pure."""
  from jaxadapt.context import Context
  ctx = (ctx or Context()).with_inserts(fact_inserts).with_insert_inputs(
      face_tokens=cond["face"], face_scale=cond["s"])
  return frozen.apply(graphdef, params, "__call__", x, t, cond["c"], ctx=ctx)


def _face_tokens(fact, face, groups: int, per_group: int):
  """(face tokens [N, M, D], null tokens [N, M, D]) of generate's `face=`: face images (uint8
  [H, W, 3] / [n, H, W, 3], float NCHW [n, 3, H, W] in [-1, 1]) through the adapter's encoder,
  or encoder features [n, N_f, D_enc]; n = 1 (every prompt) or one per prompt."""
  from jaxadapt.fact import FACTAdapter, null_face_tokens
  if not isinstance(fact, FACTAdapter):
    raise TypeError(f"face= needs fact= a FACT adapter (ja.fact.load_fact(dir)); got "
                    f"{type(fact).__name__}.")
  arr = np.asarray(face)
  c = fact.config
  if arr.dtype != np.uint8 and arr.ndim == 3 and arr.shape[1:] == (c.face_tokens, c.face_dim):
    tokens = fact.face_tokens(arr)
  elif arr.dtype != np.uint8 and arr.ndim == 2 and arr.shape == (c.face_tokens, c.face_dim):
    tokens = fact.face_tokens(arr[None])
  elif arr.dtype == np.uint8 or (arr.ndim == 4 and arr.shape[1] == 3):
    tokens = fact.encode(arr)
  else:
    raise ValueError(f"face= must be face images (uint8 [H, W, 3] / [n, H, W, 3] or float NCHW "
                     f"[n, 3, H, W] in [-1, 1]) or face-encoder features [n, {c.face_tokens}, "
                     f"{c.face_dim}]; got shape {arr.shape} dtype {arr.dtype}.")
  if tokens.shape[0] == 1:
    tokens = jnp.repeat(tokens, groups, axis=0)
  if tokens.shape[0] != groups:
    raise ValueError(f"face= has {tokens.shape[0]} faces for {groups} prompts; pass one, or one "
                     "per prompt.")
  tokens = jnp.repeat(tokens, per_group, axis=0)
  return tokens, null_face_tokens(fact.params, tokens.shape[0])


# ----------------------------------------------------------------------------- shared helpers

def _scale_a(adapter, per_path: dict):
  """`adapter` with each path's A multiplied by its scale (the same delta as scaling s)."""
  return dataclasses.replace(adapter, weights={
      p: {**w, "a": w["a"] * jnp.asarray(per_path[p], w["a"].dtype)}
      for p, w in adapter.weights.items()})


def _resolve_scheduler(scheduler, config: dict):
  """A jaxadapt scheduler from a name, a diffusers class name, a scheduler object or None."""
  if scheduler is None:
    try:
      return scheduler_from_config(config)
    except ValueError as e:
      raise ValueError(
          f"{e} The pipeline's own scheduler ({config.get('_class_name')!r}) cannot run; pass"
          f" generate(scheduler=...) with one of {sorted(SCHEDULER_NAMES)}.") from None
  if isinstance(scheduler, tuple(SCHEDULERS.values())):
    return scheduler
  if isinstance(scheduler, str):
    if scheduler.lower() in SCHEDULER_NAMES:
      cls, overrides = SCHEDULER_NAMES[scheduler.lower()]
      return scheduler_from_config(config, class_name=cls, **overrides)
    if scheduler in SCHEDULERS:
      return scheduler_from_config(config, class_name=scheduler)
  name = type(scheduler).__name__
  if name in SCHEDULERS and isinstance(getattr(scheduler, "config", None), Mapping):
    # A diffusers scheduler object (e.g. `DPMSolverMultistepScheduler.from_config(...)`): its
    # own config, as diffusers' pipeline would run it.
    return scheduler_from_config(dict(scheduler.config), class_name=name)
  what = repr(scheduler) if isinstance(scheduler, str) else f"a {name}"
  raise ValueError(
      f"scheduler must be None (the pipeline's own), a name in {sorted(SCHEDULER_NAMES)}, a"
      f" diffusers class name in {sorted(SCHEDULERS)}, a diffusers scheduler object of one of"
      f" those classes or a jaxadapt scheduler object; got {what}.")


def _with_eta(sched, eta):
  """`sched` with DDIM's eta (Song et al. 2021 Eq. 16) set, as diffusers' `eta=` argument."""
  if eta is None:
    return sched
  number = (isinstance(eta, (int, float, np.integer, np.floating))
            and not isinstance(eta, (bool, np.bool_)) and np.isfinite(eta) and eta >= 0)
  if not number:
    raise ValueError(f"eta must be a finite float >= 0 (0 = deterministic DDIM, 1 = DDPM-like);"
                     f" got {eta!r}.")
  if isinstance(sched, SCHEDULERS["DDIMScheduler"]):
    return dataclasses.replace(sched, eta=float(eta))
  if eta != 0:
    raise ValueError(f"eta={eta!r} is DDIM's noise weight, but the scheduler is"
                     f" {type(sched).__name__}; pass scheduler=\"ddim\" or drop eta.")
  return sched


def _images_per_prompt(value) -> int:
  if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) or value < 1:
    raise ValueError(f"num_images_per_prompt must be an int >= 1; got {value!r}.")
  return int(value)


def _seed(seed) -> int:
  """The int seed of a run; None draws a fresh one (diffusers' `generator=None`), logged."""
  if seed is None:
    seed = int(np.random.default_rng().integers(2**31))
    logger.info("generate: seed=None, drew seed %d", seed)
    return seed
  if isinstance(seed, (bool, np.bool_)) or not isinstance(seed, (int, np.integer)):
    raise TypeError(f"seed must be an int (or None for a random one); got"
                    f" {type(seed).__name__} {seed!r}. For diffusers' generator=, pass its"
                    " seed; for a fixed initial noise pass latents=.")
  return int(seed)


GUIDANCE = ("cfg", "agd")


def _check_agd(guidance, agd, backbone, guidance_rescale=0.0):
  """Validates generate's `guidance=` / `agd=` pair; returns True for AGD sampling."""
  if guidance not in GUIDANCE:
    raise ValueError(f"guidance must be one of {GUIDANCE} ('cfg': two network passes per step;"
                     f" 'agd': one pass through AGD adapters, agd=...); got {guidance!r}.")
  if guidance == "cfg":
    if agd is not None:
      raise ValueError("agd= adapters are used with guidance='agd'; pass guidance='agd' (or drop"
                       " agd= for classifier-free guidance).")
    return False
  from jaxadapt.agd import AGDAdapter
  if not isinstance(agd, AGDAdapter):
    raise TypeError(f"guidance='agd' needs agd= an AGD adapter (ja.agd.load_agd(dir)); got"
                    f" {type(agd).__name__}.")
  agd.check_model(backbone)
  if guidance_rescale:
    raise ValueError("guidance_rescale rescales a CFG prediction against its conditional"
                     " half; AGD makes one prediction. Drop guidance_rescale with guidance='agd'.")
  return True


def _guidance_values(guidance_scale, groups: int, per_group: int, *,
                     name: str = "guidance_scale") -> np.ndarray:
  """The guidance scale (or another per-image scale `name`) of every image
  [groups * per_group] (float32), checked."""
  try:
    g = np.asarray(guidance_scale, np.float64)
  except (TypeError, ValueError):
    g = None
  if g is None or not np.isfinite(g).all():
    what = "; <= 1 turns guidance off" if name == "guidance_scale" else ""
    raise ValueError(f"{name} must be a finite float or a list of them (one per"
                     f" prompt/label or per image{what}); got {guidance_scale!r}.")
  g = g.astype(np.float32)
  batch = groups * per_group
  if g.ndim == 0:
    return np.full((batch,), g, np.float32)
  if g.ndim != 1 or g.shape[0] not in (groups, batch):
    raise ValueError(
        f"{name} must be a float or one value per prompt/label ({groups}) or per image"
        f" ({batch}); got shape {g.shape}.")
  return np.repeat(g, per_group) if g.shape[0] != batch else g


def _guidance(guidance_scale, groups: int, per_group: int) -> np.ndarray | None:
  """The per-image guidance scale [B], or None when no image is guided.

  As diffusers, a scale <= 1 turns guidance off (the conditional prediction alone); a per-sample
  value <= 1 is therefore used as 1, which gives exactly the conditional prediction.
  """
  g = _guidance_values(guidance_scale, groups, per_group)
  if (g <= 1).all():
    return None
  return np.maximum(g, 1.0)


def _as_list(value, name: str) -> list:
  if isinstance(value, (str, int, np.integer)):
    return [value]
  if isinstance(value, np.ndarray):
    return value.reshape(-1).tolist()
  if hasattr(value, "tolist") and hasattr(value, "shape"):  # a torch tensor or a jax array
    out = value.tolist()
    return out if isinstance(out, list) else [out]
  if isinstance(value, Sequence):
    return list(value)
  raise TypeError(f"{name} must be one item or a list of them; got {type(value).__name__}.")


def _nearest_resize(x: np.ndarray, size: tuple[int, int]) -> np.ndarray:
  """[N, H, W] resized to `size` by nearest neighbour as torch's `interpolate(mode="nearest")`:
  output pixel i reads input pixel min(floor(i * in / out), in - 1)."""
  if tuple(x.shape[1:]) == tuple(size):
    return x
  rows, cols = (np.minimum(np.floor(np.arange(o, dtype=np.float32) * np.float32(i / o)), i - 1)
                .astype(np.int64) for i, o in zip(x.shape[1:], size))
  return x[:, rows][:, :, cols]


def _tile_batch(x: jax.Array, batch: int, name: str) -> jax.Array:
  """`x` [n, ...] tiled to [batch, ...] (n must divide batch), as diffusers' `repeat`."""
  n = x.shape[0]
  if batch % n:
    raise ValueError(f"{name} has {n} images for a batch of {batch}; pass 1, or a number that"
                     f" divides {batch} (prompts x num_images_per_prompt; tiled as diffusers).")
  return jnp.tile(x, (batch // n,) + (1,) * (x.ndim - 1))


class _Pipeline:
  """What both pipelines share: latent size, initial noise, sampling, decoding."""

  backbone_name = ""  # "unet" or "transformer"

  def __init__(self, directory: str, backbone, vae, scheduler_config: dict, index: dict):
    self.directory = directory
    self.vae = vae
    self.scheduler_config = scheduler_config
    self.model_index = index
    setattr(self, self.backbone_name, backbone)

  @property
  def backbone(self):
    return getattr(self, self.backbone_name)

  @property
  def vae_scale_factor(self) -> int:
    """Pixels per latent cell: 2 ** (number of VAE levels - 1), as diffusers' pipelines; 1 for
    a pixel-space pipeline (no VAE)."""
    if self.vae is None:
      return 1
    return 2 ** (len(self.vae.config.block_out_channels) - 1)

  @property
  def latent_channels(self) -> int:
    return self.backbone.config.in_channels

  @property
  def default_scheduler(self):
    """The scheduler the pipeline dir names (what `generate(scheduler=None)` uses)."""
    return _resolve_scheduler(None, self.scheduler_config)

  @property
  def pixel_multiple(self) -> int:
    """What height and width (pixels) must be multiples of: the VAE factor (times the DiT's
    patch size)."""
    return self.vae_scale_factor * int(getattr(self.backbone.config, "patch_size", 1) or 1)

  def _latent_size(self, height, width, latents) -> tuple[int, int]:
    f, m = self.vae_scale_factor, self.pixel_multiple
    why = (f"the VAE's downsampling factor {f}" if m == f else
           f"{m} (the VAE's downsampling factor {f} x the patch size {m // f})")
    for name, v in (("height", height), ("width", width)):
      if v is None:
        continue
      number = (isinstance(v, (int, float, np.integer, np.floating))
                and not isinstance(v, (bool, np.bool_)) and np.isfinite(v))
      if not number or int(v) != v or v <= 0 or v % m:
        lo = max(m, int(v) // m * m) if number else None
        hint = f" (e.g. use {lo} or {lo + m})" if number else f" ({type(v).__name__})"
        raise ValueError(f"{name} must be a positive multiple of {why}, in pixels; got"
                         f" {v!r}{hint}.")
    if latents is not None and height is None and width is None and np.ndim(latents) == 4:
      return int(np.shape(latents)[2]), int(np.shape(latents)[3])
    s = self.backbone.config.sample_size
    if s is None and (height is None or width is None):
      raise ValueError(f"the {self.backbone_name} config has no sample_size; pass height= and"
                       " width= (pixels) or latents=.")
    s = tuple(s) if isinstance(s, (list, tuple)) else (s, s)
    return (s[0] if height is None else int(height) // f,
            s[1] if width is None else int(width) // f)

  def _initial_noise(self, latents, shape: tuple, key) -> jax.Array:
    if latents is None:
      return jax.random.normal(key, shape, jnp.float32)
    if tuple(np.shape(latents)) != shape:
      raise ValueError(
          f"latents must be the initial noise [batch, channels, height/{self.vae_scale_factor},"
          f" width/{self.vae_scale_factor}] = {shape} (NCHW, as diffusers takes it; batch ="
          f" number of prompts/labels x num_images_per_prompt); got shape {np.shape(latents)}.")
    if hasattr(latents, "detach"):  # a torch tensor
      latents = latents.detach().cpu().float().numpy()
    return jnp.asarray(latents, jnp.float32)

  def _path_scales(self, adapter, lora_scale, model=None) -> dict | None:
    """{path: scale} of a per-block U-Net spec (`lora_scales`), or None for a float."""
    if not isinstance(lora_scale, Mapping):
      return None
    if getattr(self, "unet", None) is None or (model is not None and model is not self.unet):
      raise ValueError(f"per-block LoRA scales ({dict(lora_scale)!r}) apply to a U-Net only;"
                       " pass a float for this component.")
    return lora_scales.path_scales(list(adapter.weights), lora_scale, self.unet.config)

  def _lora(self, adapter, lora_scale=1.0, model=None):
    """The adapter's forward context on `model` (default: the backbone), each LoRA scale
    (alpha / r) times `lora_scale` (a float, or a per-block U-Net spec, `lora_scales`)."""
    per_path = None if adapter is None else self._path_scales(adapter, lora_scale, model)
    number = (isinstance(lora_scale, (int, float, np.integer, np.floating))
              and not isinstance(lora_scale, (bool, np.bool_)) and np.isfinite(lora_scale))
    if not number and per_path is None:
      raise ValueError(f"lora_scale must be a finite float (1 = the adapter as trained, 0 = the"
                       f" base model); got {lora_scale!r}.")
    if adapter is None:
      if lora_scale != 1:
        raise ValueError(f"lora_scale={lora_scale!r} scales adapter=, but no adapter was given;"
                         " pass adapter=ja.load_adapter(...) or drop lora_scale.")
      return None
    ctx = (model or self.backbone).make_context(adapter=adapter)
    if per_path is not None or lora_scale != 1:  # PEFT's set_scale / diffusers' set_adapters
      ctx = dataclasses.replace(ctx, weights={
          path: dataclasses.replace(c, scale=c.scale * jnp.float32(
              lora_scale if per_path is None else per_path[path]))
          for path, c in ctx.weights.items()})
    return ctx

  def _image_pixels(self, image) -> tuple[np.ndarray, bool]:
    """(image as float32 NCHW, whether it is already in the diffusion model's latent space).

    uint8 [H, W, C] / [N, H, W, C] pixels become (u / 255) * 2 - 1 (diffusers' preprocessing);
    a float NCHW array is taken as pixels in [-1, 1], or as latents when it has the latent
    channels and the pipeline has a VAE (as diffusers takes 4-channel `image=`).
    """
    if hasattr(image, "detach"):  # a torch tensor
      image = image.detach().cpu().numpy()
    x = np.asarray(image)
    pixel_channels = self.latent_channels if self.vae is None else self.vae.config.in_channels
    if x.dtype == np.uint8:
      if x.ndim == 3:
        x = x[None]
      if x.ndim != 4 or x.shape[-1] != pixel_channels:
        raise ValueError(f"image: uint8 pixels must be [H, W, {pixel_channels}] or [N, H, W,"
                         f" {pixel_channels}]; got shape {np.shape(image)}.")
      return (x.astype(np.float32) / 255 * 2 - 1).transpose(0, 3, 1, 2), False
    if not np.issubdtype(x.dtype, np.floating) or x.ndim != 4:
      raise ValueError(f"image must be uint8 pixels [H, W, C] / [N, H, W, C] or a float array"
                       f" [N, C, H, W] (NCHW) in [-1, 1]; got {x.dtype} of shape {x.shape}.")
    x = x.astype(np.float32)
    if self.vae is not None and x.shape[1] == self.latent_channels != pixel_channels:
      return x, True
    if x.shape[1] != pixel_channels:
      raise ValueError(f"image: a float image must be [N, {pixel_channels}, H, W] (NCHW pixels in"
                       f" [-1, 1]) or [N, {self.latent_channels}, h, w] latents; got {x.shape}.")
    lo, hi = float(x.min()), float(x.max())
    if not (np.isfinite(x).all() and lo >= -1 and hi <= 1):
      raise ValueError(f"image: float pixels must lie in [-1, 1]; got values in [{lo:g},"
                       f" {hi:g}]. Pass uint8 pixels, or x * 2 - 1 for an image in [0, 1].")
    return x, False

  def _image_pixel_size(self, image) -> tuple[int, int]:
    """The pixel (height, width) that the inpainting `image` implies."""
    x, is_latent = self._image_pixels(image)
    f = self.vae_scale_factor if is_latent else 1
    return x.shape[2] * f, x.shape[3] * f

  def _inpaint_inputs(self, image, mask_image, shape: tuple) -> tuple[jax.Array, jax.Array]:
    """(known latents [B, C, h, w], mask [B, 1, h, w] in {0, 1}) for `sampling.sample`.

    As diffusers' `StableDiffusionInpaintPipeline`: pixels are encoded by the VAE (the
    posterior mean times `scaling_factor`; diffusers samples the posterior, whose std is tiny
    for trained VAEs); the mask is resized to the pixel size, binarized at 0.5 and resized to
    the latent size, both by nearest neighbour (torch's `interpolate`); a batch of 1 (or of a
    divisor of B) is tiled to B, as diffusers repeats it.
    """
    b, _, h, w = shape
    f = self.vae_scale_factor
    x, is_latent = self._image_pixels(image)
    want = (h, w) if is_latent else (h * f, w * f)
    if tuple(x.shape[2:]) != want:
      raise ValueError(f"image is {x.shape[2]}x{x.shape[3]}"
                       f"{' (latents)' if is_latent else ' pixels'}; this run is {h * f}x{w * f}"
                       f" pixels ({h}x{w} latents). Resize the image or pass height=/width=.")
    if not is_latent and self.vae is not None:
      x = self.vae.encode(jnp.asarray(x)).mean * self.vae.config.scaling_factor
    known = _tile_batch(jnp.asarray(x, jnp.float32), b, "image")

    if hasattr(mask_image, "detach"):
      mask_image = mask_image.detach().cpu().numpy()
    m = np.asarray(mask_image)
    if m.ndim == 4 and m.shape[1] == 1:
      m = m[:, 0]
    if m.ndim == 2:
      m = m[None]
    numeric = m.dtype == np.bool_ or np.issubdtype(m.dtype, np.number)
    if not numeric or m.ndim != 3:
      raise ValueError(f"mask_image must be [H, W] or [N, H, W] (1 = repaint, 0 = keep); got"
                       f" {m.dtype} of shape {np.shape(mask_image)}.")
    m = m.astype(np.float32)
    lo, hi = (float(m.min()), float(m.max())) if m.size else (0.0, 0.0)
    if not (np.isfinite(m).all() and lo >= 0 and hi <= 1):
      raise ValueError(f"mask_image values must lie in [0, 1] (1 = repaint; binarized at 0.5);"
                       f" got values in [{lo:g}, {hi:g}]. For a 0..255 mask pass mask / 255.")
    m = _nearest_resize(m, (h * f, w * f))
    m = (m >= 0.5).astype(np.float32)
    m = _nearest_resize(m, (h, w))[:, None]
    return known, _tile_batch(jnp.asarray(m), b, "mask_image")

  def _run(self, denoise, cond, uncond, scale, *, latents, shape, num_steps, seed, scheduler,
           mesh, progress, eta=None, guidance_rescale=0.0, timesteps=None, sigmas=None,
           inpaint=None):
    """Samples the latents and decodes them to uint8 images [B, H, W, C].

    `inpaint` is None or (known latents [B, C, h, w], mask [B, 1, h, w]); the initial noise is
    the noise that forward-noises the known latents (`sampling.sample(inpaint=...)`)."""
    sched = _with_eta(_resolve_scheduler(scheduler, self.scheduler_config), eta)
    if timesteps is not None or sigmas is not None:  # they set the number of steps (diffusers)
      sched, num_steps = sampling.with_custom_schedule(sched, None, timesteps, sigmas)
    if (isinstance(num_steps, (bool, np.bool_)) or not isinstance(num_steps, (int, np.integer))
        or num_steps < 1):
      raise ValueError(f"num_steps must be a positive int; got {num_steps!r}.")
    noise_key, step_key = jax.random.split(jax.random.key(_seed(seed)))
    x = self._initial_noise(latents, shape, noise_key)
    sampling.check_guidance_rescale(guidance_rescale)
    if scale is None:  # no guidance, nothing to rescale (as diffusers)
      uncond, guidance_rescale = None, 0.0
    if inpaint is not None:
      inpaint = (*inpaint, x)
    z = sampling.sample(denoise, sched, x, cond, uncond, scale, int(num_steps), step_key,
                        mesh=mesh, progress=progress, guidance_rescale=guidance_rescale,
                        inpaint=inpaint)
    if self.vae is None:  # pixel space: the backbone's samples are the images, in [-1, 1]
      return images_lib.to_uint8(z)
    # LDM (Rombach et al. 2022): the diffusion model works on latents * scaling_factor.
    return images_lib.to_uint8(self.vae.decode(z / self.vae.config.scaling_factor))


# ----------------------------------------------------------------------------- Stable Diffusion

class StableDiffusionPipeline(_Pipeline):
  """Text-to-image latent diffusion (Rombach et al. 2022) with classifier-free guidance.

  Attributes:
    unet: the frozen `UNet`.
    vae: the frozen `VAE`, or None for a pixel-space pipeline (the U-Net's samples are the
      images).
    text_encoder: the frozen `CLIPTextEncoder`.
    tokenizer: transformers' `CLIPTokenizer` from the dir's `tokenizer/`.
    scheduler_config: the dir's `scheduler/scheduler_config.json`.
  """

  backbone_name = "unet"

  def __init__(self, directory, unet, vae, text_encoder, tokenizer, scheduler_config, index,
               text_encoder_config):
    super().__init__(directory, unet, vae, scheduler_config, index)
    self.text_encoder = text_encoder
    self.tokenizer = tokenizer
    self._use_attention_mask = bool(text_encoder_config.get("use_attention_mask", False))

  def encode_prompt(self, prompts: list[str], context=None) -> jax.Array:
    """CLIP text states [B, model_max_length, D] as diffusers' `encode_prompt` builds them.

    Tokens are padded to the tokenizer's `model_max_length` and truncated; the conditioning is
    the final `last_hidden_state` (attention mask only when the text config asks for it).
    `context` is the text encoder's forward context (its LoRA), or None.
    """
    max_length = self.tokenizer.model_max_length
    tok = self.tokenizer(prompts, padding="max_length", max_length=max_length, truncation=True,
                         return_tensors="np")
    lengths = [len(ids) for ids in self.tokenizer(prompts).input_ids]
    if max(lengths) > max_length:
      logger.warning("prompt(s) of %d tokens cut to the text encoder's %d (CLIP's limit), as"
                     " diffusers does.", max(lengths), max_length)
    mask = tok["attention_mask"] if self._use_attention_mask else None
    return self.text_encoder.prompt_embeds(np.asarray(tok["input_ids"], np.int32), mask,
                                           context=context)

  def _component_adapters(self, adapter) -> dict:
    """{component: LoraAdapter} of one adapter= item (see `lora_contexts`)."""
    from jaxadapt.io.diffusers_lora import SD_LORA_COMPONENTS, load_pipeline_lora
    known = sorted(SD_LORA_COMPONENTS)
    if isinstance(adapter, (str, os.PathLike)):
      return load_pipeline_lora(adapter, dtype=jnp.dtype(self.unet.dtype).name)
    if isinstance(adapter, Mapping):
      adapters = {k: v for k, v in adapter.items() if v is not None}
      if sorted(set(adapters) - set(known)):
        raise ValueError(f"adapter= components must be among {known}; got"
                         f" {sorted(set(adapters) - set(known))}.")
      if "text_encoder" in adapters:
        from jaxadapt.models.clip import adapter_for_clip
        adapters["text_encoder"] = adapter_for_clip(adapters["text_encoder"])
      return adapters
    return {"unet": adapter}

  @staticmethod
  def _component_scales(lora_scale) -> dict:
    """{component: scale} of one lora_scale= item: a float for all, or a dict (default 1)."""
    from jaxadapt.io.diffusers_lora import SD_LORA_COMPONENTS
    known = sorted(SD_LORA_COMPONENTS)
    if isinstance(lora_scale, Mapping):
      if sorted(set(lora_scale) - set(known)):
        raise ValueError(f"lora_scale has components {sorted(set(lora_scale) - set(known))};"
                         f" pass a float or a dict over {known} (diffusers' adapter_weights=).")
      return {c: lora_scale.get(c, 1.0) for c in known}
    return {c: lora_scale for c in known}

  def lora_contexts(self, adapter, lora_scale=1.0):
    """(U-Net context, text-encoder context) of `adapter`, scaled per component.

    Args:
      adapter: None; a `LoraAdapter` on the U-Net; {component: LoraAdapter} over "unet" and
        "text_encoder"; a diffusers LoRA file (or its folder) as `save_lora_weights` writes
        it, every component it holds (`jaxadapt.io.diffusers_lora.load_pipeline_lora`); or a
        list of those, all active at once (diffusers' `set_adapters([...], adapter_weights=
        [...])`): per component, the sum of each adapter's delta times its weight
        (`jaxadapt.adapters.combine`, kind "cat").
      lora_scale: a float for every component, or {component: float} as diffusers'
        `set_adapters(..., adapter_weights={"unet": .., "text_encoder": ..})` (a component
        left out keeps 1); each multiplies that LoRA's alpha / r. The U-Net's may be a
        per-block spec {"down": .., "mid": .., "up": ..} (`jaxadapt.diffusion.lora_scales`).
        With a list of adapters, one such value per adapter (or one for all).

    Returns:
      (U-Net context or None, text-encoder context or None).
    """
    if adapter is None:
      if isinstance(lora_scale, (list, tuple)):
        raise ValueError("lora_scale= is a list (one weight per adapter), but no adapter was"
                         " given; pass adapter=[...] or drop lora_scale.")
      return self._lora(None, 1.0 if isinstance(lora_scale, Mapping) else lora_scale), None
    if isinstance(adapter, (list, tuple)):
      items = [self._component_adapters(a) for a in adapter]
      if isinstance(lora_scale, (list, tuple)):
        if len(lora_scale) != len(items):
          raise ValueError(f"lora_scale has {len(lora_scale)} weights for {len(items)}"
                           " adapters; pass one per adapter (or one for all).")
        scale_items = [self._component_scales(w) for w in lora_scale]
      else:
        scale_items = [self._component_scales(lora_scale)] * len(items)
      adapters, scales = {}, {}
      for comp in ("unet", "text_encoder"):
        present = [(a[comp], w[comp]) for a, w in zip(items, scale_items) if comp in a]
        if len(present) > 1:  # per-block weights: fold them into each adapter's A first
          present = [(_scale_a(a, self._path_scales(a, w, getattr(self, comp))), 1.0)
                     if isinstance(w, Mapping) else (a, w) for a, w in present]
        if len(present) == 1:
          adapters[comp], scales[comp] = present[0]
        elif present:
          from jaxadapt.adapters.combine import combine
          # "cat" folds each w * scale into A; the sum's scale is 1 (alpha = r, no rsLoRA).
          adapters[comp] = combine([a for a, _ in present], [w for _, w in present], kind="cat")
          scales[comp] = 1.0
    else:
      if isinstance(lora_scale, (list, tuple)):
        raise ValueError("lora_scale= is a list (one weight per adapter); pass adapter= as a"
                         " list too, or one float / {component: float}.")
      adapters, scales = self._component_adapters(adapter), self._component_scales(lora_scale)
    # A scale for a component without a LoRA is ignored (diffusers' set_adapters warns).
    scales = {c: (w if c in adapters else 1.0) for c, w in scales.items()}
    try:
      unet_ctx = self._lora(adapters.get("unet"), scales.get("unet", 1.0), self.unet)
    except ValueError as e:
      if "not linear layers" in str(e) and "unet" in adapters and "text_encoder" not in adapters:
        try:
          self.text_encoder.check_adapter(adapters["unet"])
        except (TypeError, ValueError):
          raise e from None
        raise ValueError(f"{e}. It fits the text encoder: pass adapter={{'text_encoder':"
                         " adapter}, or the diffusers LoRA file itself.") from None
      raise
    text_ctx = self._lora(adapters.get("text_encoder"), scales.get("text_encoder", 1.0),
                          self.text_encoder)
    return unet_ctx, text_ctx

  def generate(self, prompt=None, *, class_labels=None, num_steps: int = 50,
               guidance_scale=7.5, seed: int = 0, scheduler=None, latents=None,
               negative_prompt=None, height: int | None = None, width: int | None = None,
               num_images_per_prompt: int = 1, adapter=None, lora_scale: float = 1.0,
               eta: float | None = None, guidance_rescale: float = 0.0, timesteps=None,
               sigmas=None, guidance: str = "cfg", agd=None, image=None, mask_image=None,
               strength: float = 1.0, fact=None, face=None, face_scale=1.0, mesh=None,
               progress: bool = True) -> np.ndarray:
    """Generates images for text prompts; returns uint8 numpy [N, H, W, 3].

    Classifier-free guidance (Ho & Salimans 2022, Eq. 6 with s = 1 + w):
    eps = eps(x, "") + s * (eps(x, prompt) - eps(x, "")), the empty prompt replaced by
    `negative_prompt` when given; guidance is off (one forward pass) when every scale is <= 1,
    as in diffusers' `StableDiffusionPipeline`.

    Args:
      prompt: a prompt or a list of P prompts.
      class_labels: not for this pipeline (raises).
      num_steps: sampling steps.
      guidance_scale: s, a float or one value per prompt [P] or per image [N].
      seed: an int seeding the initial noise (unless `latents`) and stochastic samplers (DDPM,
        DDIM with eta > 0, the ancestral and SDE samplers); None draws a random seed (as
        diffusers' `generator=None`).
      scheduler: None (the dir's scheduler), a name ("ddim", "ddpm", "euler", "dpm++2m",
        "pndm", "plms", "euler-a", "heun", "lms", "unipc", ...), a
        diffusers scheduler class name or a jaxadapt scheduler object. A name keeps the dir's
        noise schedule, as diffusers' `Scheduler.from_config(pipe.scheduler.config)`.
      latents: the initial noise [N, C, H / f, W / f] (NCHW, f the VAE factor) from N(0, I),
        exactly as diffusers' `latents=` (scaled by the scheduler's `init_noise_sigma` here).
      negative_prompt: a prompt or P prompts for the unconditional branch (default "").
      height, width: image size in pixels (multiples of f); default the U-Net's
        `sample_size * f`, or the size of `latents`.
      num_images_per_prompt: images per prompt; image i*n + j is prompt i's j-th.
      adapter: a `LoraAdapter` on the U-Net (e.g. `ja.load_adapter(peft_dir)`),
        {"unet": .., "text_encoder": ..} adapters, a diffusers LoRA file / folder
        (`pytorch_lora_weights.safetensors` with `unet.` and `text_encoder.` keys, as
        `save_lora_weights` writes it), or a list of those at once: see `lora_contexts`.
      lora_scale: multiplies the adapters' scales (alpha / r), as PEFT's `set_scale` and
        diffusers' `set_adapters(..., adapter_weights=)`: a float for every component or
        {"unet": .., "text_encoder": ..} (one per adapter for a list); 0 gives the base.
      eta: DDIM's noise weight (Song et al. 2021 Eq. 16), diffusers' `eta=`; None keeps the
        scheduler's own (0). Other schedulers refuse eta > 0.
      guidance_rescale: phi in [0, 1] of rescaled guidance (Lin et al. 2024 Sec. 3.4, Eq. 16),
        diffusers' `guidance_rescale`; 0 is plain guidance.
      timesteps: custom timesteps [N] (largest first) for schedulers whose diffusers class takes
        them (DDPM, Euler, Heun, DPM-Solver), as diffusers' `timesteps=`; sets num_steps.
      sigmas: custom noise levels [N + 1] (Euler), as diffusers' `sigmas=`; sets num_steps.
      guidance: "cfg" (classifier-free guidance, two network passes per step) or "agd"
        (adapter guidance distillation, Jensen & Sadat 2025: ONE pass per step through the
        `agd=` adapters at `guidance_scale`; the negative prompt is not used).
      agd: a `jaxadapt.agd.AGDAdapter` for guidance="agd".
      image: with `mask_image`, inpaint this image: uint8 pixels [H, W, 3] / [n, H, W, 3], a
        float NCHW image in [-1, 1], or NCHW latents (with a VAE); n = 1 or a divisor of N
        (tiled). Default height/width are its size. As diffusers' `StableDiffusionInpaintPipeline`
        with a U-Net without mask channels: after every step the kept region is replaced by
        the image's latents forward-noised to the next step (`scheduler.add_noise` with the
        initial noise), and by the latents themselves after the last step. Needs a scheduler
        with add_noise (DDIM, DDPM, Euler, Euler ancestral, DPM-Solver multistep).
      mask_image: [H, W] or [n, H, W] in [0, 1]: 1 (white) = repaint, 0 = keep; binarized at
        0.5 and resized to the latents by nearest neighbour, as diffusers.
      strength: only 1.0 (inpainting starts from pure noise; diffusers' partial strengths are
        not supported).
      fact: a `jaxadapt.fact.FACTAdapter` (FaceChain-FACT's face adapter), with `face=`.
      face: the identity to draw: face images (uint8 [H, W, 3] / [P, H, W, 3] or float NCHW in
        [-1, 1], encoded by the adapter's face encoder) or face-encoder features [P, N_f, D];
        one for every prompt or one per prompt. Guidance applies to text and face together:
        the unconditional branch has the negative prompt and the null face. With `image=` and
        `mask_image=` the face mask, only the face is repainted (FACT's inpainting mode).
      face_scale: s of the face adapter, a float or one per prompt [P] / image [N] (0 = the
        base; the paper's demos use about 0.7).
      mesh: a mesh whose "data" axis splits the batch.
      progress: show a tqdm bar over the steps.

    Returns:
      uint8 numpy [N, H, W, C], N = P * num_images_per_prompt; C = 3 after a VAE, the U-Net's
      channels for a pixel-space pipeline (no VAE: its samples are the images, in [-1, 1]).
    """
    use_agd = _check_agd(guidance, agd, self.unet, guidance_rescale)
    if class_labels is not None:
      raise ValueError("This is a text-to-image Stable Diffusion pipeline: pass prompt=..., not"
                       " class_labels= (class labels are for DiT pipelines).")
    if prompt is None:
      raise ValueError("generate needs prompt=... (a string or a list of strings) for a Stable"
                       " Diffusion pipeline.")
    prompts = _as_list(prompt, "prompt")
    if not prompts or not all(isinstance(p, str) for p in prompts):
      raise TypeError(f"prompt must be a string or a non-empty list of strings; got {prompt!r}.")
    n = _images_per_prompt(num_images_per_prompt)
    scale = _guidance(guidance_scale, len(prompts), n)
    if (image is None) != (mask_image is None):
      raise ValueError("inpainting needs both image= and mask_image= (1 = repaint); got only"
                       f" {'image=' if mask_image is None else 'mask_image='}.")
    if strength != 1.0:
      raise ValueError(f"strength={strength!r} is not supported: inpainting starts from pure"
                       " noise (strength=1.0), as diffusers' default.")
    if image is not None and height is None and width is None and latents is None:
      height, width = self._image_pixel_size(image)
    h, w = self._latent_size(height, width, latents)
    shape = (len(prompts) * n, self.latent_channels, h, w)
    inpaint = None if image is None else self._inpaint_inputs(image, mask_image, shape)

    if negative_prompt is None:
      negatives = [""] * len(prompts)
    else:
      negatives = _as_list(negative_prompt, "negative_prompt")
      if not all(isinstance(p, str) for p in negatives):
        raise TypeError(f"negative_prompt must be a string or a list of strings; got"
                        f" {negative_prompt!r}.")
      if len(negatives) == 1:
        negatives = negatives * len(prompts)
      if len(negatives) != len(prompts):
        raise ValueError(f"negative_prompt has {len(negatives)} entries for {len(prompts)}"
                         " prompts; pass one, or one per prompt.")

    unet_ctx, text_ctx = self.lora_contexts(adapter, lora_scale)
    cond = jnp.repeat(self.encode_prompt(prompts, text_ctx), n, axis=0)
    if (fact is None) != (face is None):
      raise ValueError("the face adapter needs both fact= (a FACT adapter) and face= (face "
                       "images or encoder features); got only "
                       f"{'fact=' if face is None else 'face='}.")
    if fact is not None:
      if use_agd:
        raise ValueError("guidance='agd' with a face adapter is not supported (AGD adapters "
                         "were distilled without it); use guidance='cfg'.")
      fact.check_model(self.unet)
      tokens, null = _face_tokens(fact, face, len(prompts), n)
      s = jnp.asarray(_guidance_values(face_scale, len(prompts), n, name="face_scale"))
      denoise = jax.tree_util.Partial(_fact_denoise, self.unet.graphdef, self.unet.params,
                                      unet_ctx, fact.context(tokens).inserts)
      uncond = None
      if scale is not None:
        uncond = {"c": jnp.repeat(self.encode_prompt(negatives, text_ctx), n, axis=0),
                  "face": null, "s": s}
      return self._run(denoise, {"c": cond, "face": tokens, "s": s}, uncond, scale,
                       latents=latents, shape=shape, num_steps=num_steps, seed=seed,
                       scheduler=scheduler, mesh=mesh, progress=progress, eta=eta,
                       guidance_rescale=guidance_rescale, timesteps=timesteps, sigmas=sigmas,
                       inpaint=inpaint)
    if use_agd:
      w = jnp.asarray(_guidance_values(guidance_scale, len(prompts), n))
      denoise = jax.tree_util.Partial(_agd_denoise, self.unet.graphdef, self.unet.params,
                                      unet_ctx, agd.inserts())
      return self._run(denoise, {"c": cond, "w": w}, None, None, latents=latents, shape=shape,
                       num_steps=num_steps, seed=seed, scheduler=scheduler, mesh=mesh,
                       progress=progress, eta=eta, timesteps=timesteps, sigmas=sigmas,
                       inpaint=inpaint)
    uncond = None
    if scale is not None:
      uncond = jnp.repeat(self.encode_prompt(negatives, text_ctx), n, axis=0)
    denoise = jax.tree_util.Partial(_unet_denoise, self.unet.graphdef, self.unet.params,
                                    unet_ctx)
    return self._run(denoise, cond, uncond, scale, latents=latents, shape=shape,
                     num_steps=num_steps, seed=seed, scheduler=scheduler, mesh=mesh,
                     progress=progress, eta=eta, guidance_rescale=guidance_rescale,
                     timesteps=timesteps, sigmas=sigmas, inpaint=inpaint)


# ----------------------------------------------------------------------------- DiT

class DiTPipeline(_Pipeline):
  """Class-conditional latent diffusion with a DiT (Peebles & Xie 2023) and guidance.

  Attributes:
    transformer: the frozen `DiT`.
    vae: the frozen `VAE`.
    labels: {label name: class id} from the dir's `id2label` (empty when it has none).
    scheduler_config: the dir's `scheduler/scheduler_config.json`.
  """

  backbone_name = "transformer"

  def __init__(self, directory, transformer, vae, scheduler_config, index, id2label=None):
    super().__init__(directory, transformer, vae, scheduler_config, index)
    self.id2label = {int(k): v for k, v in (id2label or {}).items()}
    self.labels = {}
    for key, names in self.id2label.items():  # "tench, Tinca tinca" -> two names for one id
      for name in names.split(","):
        self.labels[name.strip()] = key

  @property
  def num_classes(self) -> int:
    """Number of classes; the label `num_classes` is the null class (unconditional)."""
    return self.transformer.config.num_embeds_ada_norm

  def label_ids(self, class_labels) -> np.ndarray:
    """Class ids [P] from ints in [0, num_classes) or label names of the dir's id2label."""
    ids = []
    for label in _as_list(class_labels, "class_labels"):
      if isinstance(label, str):
        if label not in self.labels:
          known = f"e.g. {sorted(self.labels)[:5]}" if self.labels else "this dir has no id2label"
          raise ValueError(f"class label {label!r} is not a label name ({known}); pass class ids"
                           f" in [0, {self.num_classes}) instead.")
        ids.append(self.labels[label])
      elif (isinstance(label, (int, np.integer)) and not isinstance(label, (bool, np.bool_))
            and 0 <= label < self.num_classes):
        ids.append(int(label))
      else:
        raise ValueError(f"class labels must be ints in [0, {self.num_classes}) or label names;"
                         f" got {label!r}.")
    if not ids:
      raise ValueError("class_labels is empty; pass at least one class id.")
    return np.asarray(ids, np.int32)

  def generate(self, prompt=None, *, class_labels=None, num_steps: int = 50,
               guidance_scale=4.0, seed: int = 0, scheduler=None, latents=None,
               negative_prompt=None, height: int | None = None, width: int | None = None,
               num_images_per_prompt: int = 1, adapter=None, lora_scale: float = 1.0,
               eta: float | None = None, guidance: str = "cfg", agd=None, mesh=None,
               progress: bool = True) -> np.ndarray:
    """Generates images of classes; returns uint8 numpy [N, H, W, C] (C = 3 after a VAE).

    Classifier-free guidance (Ho & Salimans 2022, Eq. 6) with the null class `num_classes` as
    the unconditional branch, on the noise channels of the learned-sigma output (the variance
    channels are the conditional ones), as diffusers' `DiTPipeline`; off when every scale is
    <= 1. Differences from diffusers' `DiTPipeline`: the null class is `num_classes` (diffusers
    hard-codes 1000, the same for ImageNet models) and the initial noise is scaled by the
    scheduler's `init_noise_sigma` (diffusers omits it; the same for DDPM/DDIM/DPM-Solver,
    whose sigma is 1, but not for Euler).

    Args:
      prompt: not for this pipeline (raises).
      class_labels: a class id / label name, or a list of P of them.
      num_steps: sampling steps.
      guidance_scale: s, a float or one value per label [P] or per image [N].
      seed: an int seeding the initial noise (unless `latents`) and stochastic samplers (DDPM,
        DDIM with eta > 0); None draws a random seed (as diffusers' `generator=None`).
      scheduler: as `StableDiffusionPipeline.generate`.
      latents: the initial noise [N, C, H / f, W / f] (NCHW) from N(0, I).
      negative_prompt: not for this pipeline (raises).
      height, width: image size in pixels; default `sample_size * f`, or the size of `latents`.
      num_images_per_prompt: images per label; image i*n + j is label i's j-th.
      adapter: a `LoraAdapter` on the DiT.
      lora_scale: multiplies the adapter's scale, as `StableDiffusionPipeline.generate`.
      eta: DDIM's noise weight, as `StableDiffusionPipeline.generate`.
      guidance: "cfg" (two network passes per step) or "agd" (one pass through the `agd=`
        adapters at `guidance_scale`; Jensen & Sadat 2025).
      agd: a `jaxadapt.agd.AGDAdapter` for guidance="agd".
      mesh: a mesh whose "data" axis splits the batch.
      progress: show a tqdm bar over the steps.

    Returns:
      uint8 numpy [N, H, W, C], N = P * num_images_per_prompt; C = 3 after a VAE, the model's
      channels for a pixel-space pipeline (no VAE).
    """
    use_agd = _check_agd(guidance, agd, self.transformer)
    if prompt is not None or negative_prompt is not None:
      raise ValueError("This is a class-conditional DiT pipeline: it takes class_labels=... (ids"
                       f" in [0, {self.num_classes}) or id2label names), not text prompts.")
    if class_labels is None:
      raise ValueError("generate needs class_labels=... (class ids or label names) for a DiT"
                       " pipeline.")
    ids = self.label_ids(class_labels)
    n = _images_per_prompt(num_images_per_prompt)
    scale = _guidance(guidance_scale, len(ids), n)
    h, w = self._latent_size(height, width, latents)
    shape = (len(ids) * n, self.latent_channels, h, w)
    cond = jnp.asarray(np.repeat(ids, n))
    if use_agd:
      w = jnp.asarray(_guidance_values(guidance_scale, len(ids), n))
      denoise = jax.tree_util.Partial(_agd_denoise, self.transformer.graphdef,
                                      self.transformer.params, self._lora(adapter, lora_scale),
                                      agd.inserts())
      return self._run(denoise, {"c": cond, "w": w}, None, None, latents=latents, shape=shape,
                       num_steps=num_steps, seed=seed, scheduler=scheduler, mesh=mesh,
                       progress=progress, eta=eta)
    uncond = jnp.full_like(cond, self.num_classes)
    denoise = jax.tree_util.Partial(_dit_denoise, self.transformer.graphdef,
                                    self.transformer.params, self._lora(adapter, lora_scale))
    return self._run(denoise, cond, uncond, scale, latents=latents, shape=shape,
                     num_steps=num_steps, seed=seed, scheduler=scheduler, mesh=mesh,
                     progress=progress, eta=eta)


# ----------------------------------------------------------------------------- loading

def _describe(directory: str, index: dict | None) -> str:
  entries = sorted(e + ("/" if os.path.isdir(os.path.join(directory, e)) else "")
                   for e in os.listdir(directory))
  name = (index or {}).get("_class_name")
  what = f"model_index.json names {name!r}" if index else "no model_index.json"
  return f"{what}; the folder holds {entries[:12]}{' ...' if len(entries) > 12 else ''}"


def load_pipeline(directory: str | os.PathLike, *, dtype="float32", sharding=None):
  """Loads a diffusers pipeline folder as a jaxadapt pipeline.

  Recognised folders (by `model_index.json` and their sub-folders):
  - Stable Diffusion 1.x / 2.x (`StableDiffusionPipeline`): unet/, vae/, text_encoder/,
    tokenizer/, scheduler/ -> `StableDiffusionPipeline` (LDM, Rombach et al. 2022); no vae/
    when model_index.json says `"vae": [null, null]` (a pixel-space U-Net, as
    `jaxadapt.io.diffusers_save.save_sd_pipeline` writes it).
  - DiT (`DiTPipeline`): transformer/, vae/, scheduler/ and `id2label` when present (no vae/
    when model_index.json says `"vae": [null, null]`: a pixel-space DiT) ->
    `DiTPipeline` (Peebles & Xie 2023).

  Args:
    directory: the pipeline folder (what diffusers' `save_pretrained` writes).
    dtype: parameter dtype of every model ("float32" or "bfloat16").
    sharding: None, a Sharding, a Mesh or callable(path, shape), for every model's params (see
      `jaxadapt.io.hf.load_tree`).

  Returns:
    A `StableDiffusionPipeline` or a `DiTPipeline`; call `.generate(...)`.

  Raises:
    ValueError: the folder is neither kind (the message says what it found).
  """
  from jaxadapt.models.clip import load_clip_text
  from jaxadapt.models.dit import load_dit
  from jaxadapt.models.unet import load_unet
  from jaxadapt.models.vae import load_vae

  directory = os.fspath(directory)
  dtype = jnp.dtype(dtype)
  if not os.path.isdir(directory):
    raise FileNotFoundError(f"load_pipeline: {directory!r} is not a folder (expected a diffusers"
                            " pipeline folder with model_index.json).")
  index_path = os.path.join(directory, "model_index.json")
  index = (read_json_object(index_path, "a diffusers pipeline index (_class_name and its "
                            "components)") if os.path.exists(index_path) else None)
  name = (index or {}).get("_class_name") or ""
  path = functools.partial(os.path.join, directory)
  kw = {"dtype": dtype, "sharding": sharding}

  def require(parts):
    missing = [p for p in parts if not os.path.isdir(path(p))]
    if missing:
      raise ValueError(f"load_pipeline: {directory} is a {name} without {missing}"
                       f" ({_describe(directory, index)}); expected sub-folders {list(parts)}.")

  if index is not None and name == "DiTPipeline":
    # "vae": [null, null]: a pixel-space DiT, its samples are the images (train/digits.py).
    pixel = "vae" in index and index["vae"] in (None, [None, None])
    require([c for c in DIT_COMPONENTS if not (pixel and c == "vae")])
    return DiTPipeline(directory, load_dit(path("transformer"), **kw),
                       None if pixel else load_vae(path("vae"), **kw),
                       read_scheduler_config(path("scheduler")), index,
                       index.get("id2label"))

  if index is not None and name.startswith("StableDiffusion"):
    entry = index.get("text_encoder_2")  # SDXL; [null, null] when absent
    if "XL" in name or (isinstance(entry, list) and entry and entry[0] is not None):
      raise ValueError(f"load_pipeline: {directory} is a {name} (Stable Diffusion XL: two text"
                       " encoders); jaxadapt supports Stable Diffusion 1.x/2.x pipelines"
                       " (StableDiffusionPipeline) and DiTPipeline.")
    # "vae": [null, null]: pixel space, the U-Net's samples are the images (io.diffusers_save).
    pixel = "vae" in index and index["vae"] in (None, [None, None])
    require([c for c in SD_COMPONENTS if not (pixel and c == "vae")])
    from transformers import CLIPTokenizer
    return StableDiffusionPipeline(
        directory, load_unet(path("unet"), **kw), None if pixel else load_vae(path("vae"), **kw),
        load_clip_text(path("text_encoder"), **kw),
        CLIPTokenizer.from_pretrained(path("tokenizer")),
        read_scheduler_config(path("scheduler")), index,
        read_config(path("text_encoder")))

  raise ValueError(
      f"load_pipeline: {directory} is not a pipeline jaxadapt can load:"
      f" {_describe(directory, index)}. Expected a diffusers StableDiffusionPipeline folder"
      f" (model_index.json with {list(SD_COMPONENTS)}) or a DiTPipeline folder (model_index.json"
      f" with {list(DIT_COMPONENTS)}). For a single model folder use load_unet / load_dit /"
      " load_vae.")
