"""What the four schedulers share: config loading and validation, and small per-step helpers.

A scheduler is a frozen, hashable dataclass of diffusers' config options (so it can be a static
argument of ``jax.jit``); everything that depends on the number of steps lives in a state pytree
built by ``init_state``, and ``step`` is a pure function of that state, usable in ``lax.scan``:

```python
sched = DDIMScheduler.from_config("model_dir/scheduler")
state = sched.init_state(num_steps, latents)
x = latents * state.init_noise_sigma
for i in range(num_steps):                       # or one lax.scan over i
  t = state.timesteps[i]
  out = model(sched.scale_model_input(state, x, i), t)
  x, state = sched.step(state, out, i, x, jax.random.fold_in(key, i))
```
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Mapping
from typing import Any, ClassVar, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxadapt.diffusion import schedules

logger = logging.getLogger(__name__)


class AlphaBarState(NamedTuple):
  """Per-run tables of the alpha-bar samplers (DDPM, DDIM), all [N] over steps unless noted."""

  timesteps: jax.Array  # int32 [N] model timesteps t_i, largest first.
  alpha_prod_t: jax.Array  # float32 [N] alpha-bar at t_i.
  alpha_prod_t_prev: jax.Array  # float32 [N] alpha-bar at the step's target timestep.
  init_noise_sigma: jax.Array  # float32 [] std of the initial noise (1).


@dataclasses.dataclass(frozen=True, kw_only=True)
class SchedulerBase:
  """Config options every scheduler has (diffusers' names and defaults)."""

  num_train_timesteps: int = 1000  # T, the number of training noise levels.
  beta_start: float = 0.0001  # first beta of the linear/scaled_linear schedules.
  beta_end: float = 0.02  # last beta of the linear/scaled_linear schedules.
  beta_schedule: str = "linear"  # "linear", "scaled_linear" or "squaredcos_cap_v2".
  trained_betas: tuple[float, ...] | None = None  # explicit betas [T]; overrides beta_schedule.
  prediction_type: str = "epsilon"  # what the model predicts: "epsilon", "v_prediction", "sample".
  timestep_spacing: str = "leading"  # "linspace", "leading" or "trailing" (Lin et al. 2024 Tab. 2).
  steps_offset: int = 0  # added to "leading" timesteps (1 for Stable Diffusion 1.x).
  rescale_betas_zero_snr: bool = False  # rescale betas to zero terminal SNR (Lin et al. Alg. 1).
  # Not scheduler_config.json options: a custom schedule, as diffusers' set_timesteps takes it
  # (``timesteps=`` / ``sigmas=``), for the schedulers whose diffusers class takes one.
  custom_timesteps: tuple[float, ...] | None = None  # the N model timesteps, largest first.
  custom_sigmas: tuple[float, ...] | None = None  # N + 1 noise levels, the last one included.

  # Name of the diffusers class this mirrors (``_class_name`` in scheduler_config.json).
  diffusers_class: ClassVar[str] = ""
  # Accepted values of options that take one of a few strings or numbers.
  _choices: ClassVar[dict[str, tuple[Any, ...]]] = {
      "beta_schedule": ("linear", "scaled_linear", "squaredcos_cap_v2"),
      "prediction_type": ("epsilon", "v_prediction", "sample"),
      "timestep_spacing": ("linspace", "leading", "trailing"),
  }
  # diffusers options that jaxadapt supports only at the value given here.
  _only_default: ClassVar[dict[str, Any]] = {}
  # Which custom schedules the diffusers class's set_timesteps takes: "timesteps", "sigmas".
  _custom_schedules: ClassVar[tuple[str, ...]] = ()

  def __post_init__(self):
    if self.trained_betas is not None and not isinstance(self.trained_betas, tuple):
      object.__setattr__(self, "trained_betas", tuple(float(b) for b in self.trained_betas))
    for kind in ("timesteps", "sigmas"):
      value = getattr(self, f"custom_{kind}")
      if value is None:
        continue
      arr = np.asarray(value, np.float64)
      if arr.ndim != 1 or arr.size < (2 if kind == "sigmas" else 1) or not np.isfinite(arr).all():
        raise ValueError(f"{type(self).__name__}: custom {kind}= must be a non-empty 1-D list of"
                         f" finite numbers; got shape {arr.shape}.")
      object.__setattr__(self, f"custom_{kind}", tuple(float(v) for v in arr))
      if kind not in self._custom_schedules:
        takes = (f"takes only {' and '.join(k + '=' for k in self._custom_schedules)}"
                 if self._custom_schedules else "takes no custom schedule")
        raise ValueError(
            f"{type(self).__name__} {takes} (as diffusers' set_timesteps); got {kind}=. Pass"
            " num_steps, or use a scheduler that takes it (Euler: timesteps= or sigmas=; DDPM,"
            " Heun, DPM-Solver: timesteps=).")
      if getattr(self, "use_karras_sigmas", False):
        raise ValueError(f"{type(self).__name__}: custom {kind}= replaces the Karras sigmas;"
                         " set use_karras_sigmas=False (diffusers refuses both too).")
    if self.custom_timesteps is not None and self.custom_sigmas is not None:
      raise ValueError(f"{type(self).__name__}: pass custom timesteps= or sigmas=, not both.")
    for name, allowed in self._choices.items():
      value = getattr(self, name)
      if value not in allowed:
        raise ValueError(
            f"{type(self).__name__}: {name}={value!r} is not supported; expected one of"
            f" {', '.join(repr(a) for a in allowed)}."
        )
    for name, default in self._only_default.items():
      value = getattr(self, name)
      if value != default:
        raise ValueError(
            f"{type(self).__name__}: {name}={value!r} is not supported by jaxadapt (only"
            f" {default!r}). Remove the option from the scheduler config or set it to {default!r}."
        )
    if self.num_train_timesteps < 2:
      raise ValueError(f"num_train_timesteps must be at least 2; got {self.num_train_timesteps}.")

  @classmethod
  def from_config(cls, config: Mapping[str, Any] | str | os.PathLike, **overrides):
    """Builds the scheduler from a diffusers scheduler config.

    Options this class does not have (e.g. ``clip_sample`` when an Euler scheduler is built from
    a DDIM config) are ignored, as diffusers' ``from_config`` ignores them, and so are options an
    in-memory diffusers config lists under ``_use_default_values``; an option this class has
    but supports only at one value raises a ValueError naming the option and value.

    Args:
      config: a dict, a ``scheduler_config.json`` path, or a folder holding one (see
        ``schedules.read_scheduler_config``).
      **overrides: options that replace the config's (e.g. ``timestep_spacing="trailing"``, or
        ``eta=1.0`` for DDIM, which diffusers takes at ``step`` time).

    Returns:
      The scheduler.
    """
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(overrides) - names)
    if unknown:
      raise TypeError(
          f"{cls.__name__}.from_config got unknown overrides {unknown}; options are"
          f" {sorted(names)}."
      )
    cfg = schedules.read_scheduler_config(config)
    # diffusers' in-memory configs list the options left at their defaults; like diffusers, let
    # this class's own defaults apply to those (a saved scheduler_config.json has no such list).
    defaulted = set(cfg.get("_use_default_values", ()))
    cfg = {k: v for k, v in cfg.items() if not k.startswith("_") and k not in defaulted}
    cfg.update(overrides)
    ignored = sorted(set(cfg) - names)
    if ignored:
      logger.info("%s ignores config options it does not have: %s", cls.__name__, ignored)
    return cls(**{k: v for k, v in cfg.items() if k in names})

  def custom_schedule(self, num_steps: int) -> tuple[str, np.ndarray] | None:
    """("timesteps" | "sigmas", float64 values) of a custom schedule, or None.

    Raises a ValueError unless ``num_steps`` is its length (N timesteps, N + 1 sigmas).
    """
    for kind, extra in (("timesteps", 0), ("sigmas", 1)):
      value = getattr(self, f"custom_{kind}")
      if value is not None:
        if num_steps != len(value) - extra:
          raise ValueError(f"{type(self).__name__}: num_steps={num_steps!r} but the custom"
                           f" {kind} give {len(value) - extra} steps.")
        return kind, np.asarray(value, np.float64)
    return None

  @property
  def custom_num_steps(self) -> int | None:
    """The number of steps a custom schedule sets (None without one)."""
    if self.custom_timesteps is not None:
      return len(self.custom_timesteps)
    return None if self.custom_sigmas is None else len(self.custom_sigmas) - 1

  def config(self) -> dict[str, Any]:
    """The options as a diffusers-style dict (``_class_name`` included)."""
    cfg = dataclasses.asdict(self)
    if cfg.get("trained_betas") is not None:
      cfg["trained_betas"] = list(cfg["trained_betas"])
    return {"_class_name": self.diffusers_class, **cfg}

  # --- noise schedule -------------------------------------------------------------------------

  def alphas_cumprod(self) -> np.ndarray:
    """alpha-bar_t for t = 0..T-1 as float32 (Ho et al. 2020, notation above Eq. 4)."""
    betas = schedules.make_betas(
        num_train_timesteps=self.num_train_timesteps,
        beta_start=self.beta_start,
        beta_end=self.beta_end,
        beta_schedule=self.beta_schedule,
        trained_betas=self.trained_betas,
        rescale_betas_zero_snr=self.rescale_betas_zero_snr,
    )
    return schedules.alphas_cumprod(betas)

  def alpha_bar_state(self, timesteps: np.ndarray, prev_timesteps: np.ndarray,
                      final_alpha: float) -> AlphaBarState:
    """Tables for steps t_i -> prev_timesteps[i]; a target below 0 has alpha-bar final_alpha."""
    schedules.check_timesteps_in_range(timesteps, self.num_train_timesteps,
                                       f"{type(self).__name__}.init_state")
    ac = self.alphas_cumprod()
    prev = np.where(prev_timesteps >= 0, ac[np.maximum(prev_timesteps, 0)], final_alpha)
    return AlphaBarState(
        timesteps=jnp.asarray(timesteps, jnp.int32),
        alpha_prod_t=jnp.asarray(ac[timesteps]),
        alpha_prod_t_prev=jnp.asarray(prev.astype(np.float32)),
        init_noise_sigma=jnp.float32(1.0),
    )

  def sigma_tables(self) -> tuple[np.ndarray, np.ndarray]:
    """(alpha-bar [T], sigma_t = sqrt((1 - alpha-bar) / alpha-bar) [T]) of the sigma samplers.

    With zero terminal SNR the last alpha-bar is 2^-24 instead of 0, as diffusers keeps it, so
    that the largest sigma stays finite.
    """
    ac = self.alphas_cumprod()
    if self.rescale_betas_zero_snr:
      ac[-1] = 2.0**-24
    return ac, np.sqrt((1 - ac) / ac)

  def finish_sigmas(self, sigmas: np.ndarray, alphas_cumprod: np.ndarray) -> np.ndarray:
    """Appends the sigma after the last step (0, or the smallest training sigma): float32 [N+1]."""
    last = 0.0
    if getattr(self, "final_sigmas_type", "zero") == "sigma_min":
      last = np.sqrt((1 - alphas_cumprod[0]) / alphas_cumprod[0])
    return np.concatenate([sigmas, [last]]).astype(np.float32)

  def predict_x0(self, model_output: jax.Array, sample: jax.Array, alpha_t, sigma_t) -> jax.Array:
    """The predicted x0, clipped or thresholded as the config asks.

    With x_t = alpha_t x0 + sigma_t eps: x0 = (x_t - sigma_t eps) / alpha_t for epsilon (Ho et
    al. 2020 Eq. 15) and x0 = alpha_t x_t - sigma_t v for v = alpha_t eps - sigma_t x0 (Salimans
    & Ho 2022 Sec. 4).
    """
    if self.prediction_type == "epsilon":
      x0 = (sample - sigma_t * model_output) / alpha_t
    elif self.prediction_type == "v_prediction":
      x0 = alpha_t * sample - sigma_t * model_output
    else:  # "sample"
      x0 = model_output
    if getattr(self, "thresholding", False):
      x0 = threshold_sample(x0, self.dynamic_thresholding_ratio, self.sample_max_value)
    elif getattr(self, "clip_sample", False):
      x0 = jnp.clip(x0, -self.clip_sample_range, self.clip_sample_range)
    return x0

  def scale_model_input(self, state, sample: jax.Array, step_index) -> jax.Array:
    """The model's input at step i: x_t itself (Euler overrides this)."""
    del state, step_index
    return sample

  @property
  def uses_learned_variance(self) -> bool:
    """Whether ``step`` reads the variance half of a 2C-channel (learned-sigma) model output."""
    return False

  def add_noise(self, state, original: jax.Array, noise: jax.Array, step_index) -> jax.Array:
    """``original`` forward-noised to the noise level of step ``step_index``'s model input.

    diffusers' ``scheduler.add_noise(original, noise, timesteps[step_index])`` as its inpainting
    pipeline calls it during sampling (the sigma schedulers read their ``step_index`` there).
    Implemented by the schedulers that take one model evaluation per step (DDPM, DDIM, Euler,
    Euler ancestral, DPM-Solver multistep); see ``supports_add_noise``.

    Args:
      state: from ``init_state``.
      original: the clean sample x0.
      noise: standard normal noise shaped like ``original``.
      step_index: j in [0, N), may be traced.

    Returns:
      x_{t_j} in this scheduler's parameterisation of the noisy sample.
    """
    del state, original, noise, step_index
    raise NotImplementedError(
        f"{type(self).__name__} has no add_noise in jaxadapt; schedulers with one:"
        " DDPMScheduler, DDIMScheduler, EulerDiscreteScheduler,"
        " EulerAncestralDiscreteScheduler, DPMSolverMultistepScheduler.")

  @property
  def supports_add_noise(self) -> bool:
    """Whether ``add_noise`` is implemented (what inpainting needs)."""
    return type(self).add_noise is not SchedulerBase.add_noise


# --- helpers shared by the step functions ---------------------------------------------------------


def alpha_bar_add_noise(state: AlphaBarState, original: jax.Array, noise: jax.Array,
                        step_index) -> jax.Array:
  """sqrt(a) x0 + sqrt(1 - a) eps with a = alpha-bar at timesteps[step_index] (Ho et al. 2020
  Eq. 4, q(x_t | x_0)): the ``add_noise`` of the alpha-bar samplers (DDPM, DDIM)."""
  a = state.alpha_prod_t[step_index]
  return (jnp.sqrt(a) * original + jnp.sqrt(1 - a) * noise).astype(original.dtype)


def split_learned_variance(
    model_output: jax.Array, sample: jax.Array, *, who: str
) -> tuple[jax.Array, jax.Array | None]:
  """Splits a learned-sigma output [.., 2C, ..] into (prediction, variance) halves.

  The channel axis is the one axis where ``model_output`` is twice ``sample`` (so NCHW and NHWC
  both work). An output of the sample's own shape has no variance half.

  Args:
    model_output: the model output, shaped like ``sample`` or with twice its channels.
    sample: the current sample x_t.
    who: the caller's name for error messages.

  Returns:
    ``(prediction, variance)``; ``variance`` is None when the output has the sample's shape.
  """
  if model_output.shape == sample.shape:
    return model_output, None
  axis = channel_axis_of(model_output.shape, sample.shape, who=who)
  c = sample.shape[axis]
  return (jax.lax.slice_in_dim(model_output, 0, c, axis=axis),
          jax.lax.slice_in_dim(model_output, c, 2 * c, axis=axis))


def channel_axis_of(output_shape: tuple[int, ...], sample_shape: tuple[int, ...], *,
                    who: str) -> int:
  """The axis where a learned-sigma output has twice the sample's channels; ValueError if none."""
  diff = [a for a, (o, s) in enumerate(zip(output_shape, sample_shape)) if o != s]
  if (len(output_shape) != len(sample_shape) or len(diff) != 1
      or output_shape[diff[0]] != 2 * sample_shape[diff[0]]):
    raise ValueError(
        f"{who}: expected a model output shaped like the sample {tuple(sample_shape)} or, for a"
        f" learned-sigma model, with twice its channels on one axis; got {tuple(output_shape)}."
    )
  return diff[0]


def check_same_shape(model_output: jax.Array, sample: jax.Array, *, who: str) -> None:
  """Raises a ValueError unless the model output has the sample's shape."""
  if model_output.shape != sample.shape:
    raise ValueError(
        f"{who}: expected a model output of the sample's shape {tuple(sample.shape)}; got"
        f" {tuple(model_output.shape)}. For a learned-sigma model (2C channels) drop the variance"
        " half first (jaxadapt.diffusion.sample does this for schedulers that do not use it)."
    )


def threshold_sample(x0: jax.Array, ratio: float, max_value: float) -> jax.Array:
  """Dynamic thresholding of the predicted x0 (Saharia et al. 2022, "Imagen", Sec. 2.3).

  Per sample, s = clip(quantile(|x0|, ratio), 1, max_value); x0 is clipped to [-s, s] and divided
  by s. Computed in float32 over all non-batch elements.
  """
  flat = x0.reshape(x0.shape[0], -1).astype(jnp.float32)
  s = jnp.clip(jnp.quantile(jnp.abs(flat), ratio, axis=1), 1.0, max_value)[:, None]
  return (jnp.clip(flat, -s, s) / s).reshape(x0.shape).astype(x0.dtype)


def gaussian_noise(key: jax.Array | None, noise: jax.Array | None, like: jax.Array, *, who: str):
  """``noise`` if given (checked against ``like``), else a standard normal draw from ``key``."""
  if noise is not None:
    if noise.shape != like.shape:
      raise ValueError(
          f"{who}: noise must have the sample's shape {like.shape}; got {noise.shape}.")
    return noise.astype(like.dtype)
  if key is None:
    raise ValueError(f"{who} is stochastic with this config: pass a PRNG key (or noise=...).")
  return jax.random.normal(key, like.shape, like.dtype)
