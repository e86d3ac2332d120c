"""Euler sampling in sigma: diffusers' ``EulerDiscreteScheduler`` and
``EulerAncestralDiscreteScheduler``, and the sigma tables the k-diffusion style samplers share.

References:
  Karras et al. 2022, "Elucidating the Design Space of Diffusion-Based Generative Models":
  Alg. 1 / Eq. 4 (Euler steps of dx/dsigma = (x - D(x; sigma)) / sigma), Eq. 5 (the rho = 7
  noise levels, ``use_karras_sigmas``), Table 1 (VP preconditioning: the model sees
  x / sqrt(sigma^2 + 1) at timestep t(sigma)).
  Song et al. 2021, "Denoising Diffusion Implicit Models", Eq. 16 (the ancestral noise).
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxadapt.diffusion import base, schedules


class EulerState(NamedTuple):
  """Per-run tables of an Euler sampling run."""

  timesteps: jax.Array  # float32 [N] model timesteps (fractional with Karras sigmas).
  sigmas: jax.Array  # float32 [N + 1] sigma_i = sqrt((1 - a) / a); the last is 0 or sigma_min.
  init_noise_sigma: jax.Array  # float32 [] std of the initial noise.


def karras_or_spaced_sigmas(sched: base.SchedulerBase, num_steps: int, use_karras: bool,
                            sigma_min: float | None = None,
                            sigma_max: float | None = None) -> tuple[np.ndarray, np.ndarray]:
  """(timesteps [N], sigmas [N]) of the k-diffusion style samplers (Euler, Heun, LMS, KDPM2).

  The timesteps follow ``timestep_spacing`` (as floats; "linspace" is not rounded) and sigma(t)
  interpolates the training sigmas linearly in t; with Karras sigmas (Eq. 5, ends from
  ``sigma_min``/``sigma_max`` or the spaced sigmas' own) the timesteps are t(sigma)
  interpolated in log sigma. A custom schedule replaces the spacing: timesteps (sigma(t) as
  above) or sigmas (then N + 1 of them are returned, and t(sigma) for the first N).
  """
  _, train_sigmas = sched.sigma_tables()  # [T], increasing with t
  T = sched.num_train_timesteps
  custom = sched.custom_schedule(num_steps)
  if custom is not None and custom[0] == "sigmas":  # the N + 1 given (the caller keeps the last)
    sigmas = custom[1].astype(np.float32)
    return schedules.sigma_to_t(sigmas[:-1], np.log(train_sigmas)), sigmas
  if custom is not None:  # diffusers' set_timesteps(timesteps=...)
    ts = custom[1].astype(np.float32)
    return ts, np.interp(ts, np.arange(T), train_sigmas)
  schedules.check_num_steps(num_steps, sched.num_train_timesteps)
  if sched.timestep_spacing == "linspace":
    ts = np.linspace(0, T - 1, num_steps, dtype=np.float32)[::-1].copy()
  else:  # integer spacings, as floats
    ts = schedules.spaced_timesteps(
        sched.timestep_spacing, T, num_steps, sched.steps_offset).astype(np.float32)
  sigmas = np.interp(ts, np.arange(T), train_sigmas)
  if use_karras:
    lo = sigma_min if sigma_min is not None else float(sigmas[-1])
    hi = sigma_max if sigma_max is not None else float(sigmas[0])
    sigmas = schedules.karras_sigmas(lo, hi, num_steps)
    ts = schedules.sigma_to_t(sigmas, np.log(train_sigmas))
  return ts, sigmas


def initial_sigma(sched: base.SchedulerBase, sigmas: np.ndarray) -> np.float32:
  """The std of the initial noise: sigma_max ("linspace"/"trailing") or sqrt(sigma_max^2 + 1)."""
  max_sigma = np.float32(sigmas.max())
  if sched.timestep_spacing in ("linspace", "trailing"):
    return max_sigma
  return np.sqrt(max_sigma**2 + np.float32(1))


def denoised(prediction_type: str, model_output: jax.Array, x: jax.Array, sigma) -> jax.Array:
  """D(x; sigma) from a VP model's output at x / sqrt(sigma^2 + 1) (Karras et al. Table 1)."""
  if prediction_type == "epsilon":
    return x - sigma * model_output
  if prediction_type == "v_prediction":
    return model_output * (-sigma / jnp.sqrt(sigma**2 + 1)) + x / (sigma**2 + 1)
  return model_output  # "sample" / "original_sample"


def scale_by_sigma(state, sample: jax.Array, step_index) -> jax.Array:
  """x / sqrt(sigma_i^2 + 1): the VP model's input at noise level sigma_i (Karras Table 1)."""
  sigma = state.sigmas[step_index]
  return (sample / jnp.sqrt(sigma**2 + 1)).astype(sample.dtype)


class _SigmaTableScheduler(base.SchedulerBase):
  """A sampler over a table of noise levels (`_tables(N) -> (timesteps [N], sigmas [N + 1])`)
  whose model input is x / sqrt(sigma^2 + 1): the Euler samplers' shared state and scaling.
  Subclasses define `_tables`."""

  def set_timesteps(self, num_steps: int) -> np.ndarray:
    """float32 [N] timesteps, equal to the diffusers class's ``set_timesteps``."""
    return self._tables(num_steps)[0]

  def init_state(self, num_steps: int, sample: jax.Array | None = None) -> EulerState:
    """The state of a ``num_steps`` run. ``sample`` is unused (no history)."""
    del sample
    ts, sigmas = self._tables(num_steps)
    return EulerState(timesteps=jnp.asarray(ts), sigmas=jnp.asarray(sigmas),
                      init_noise_sigma=jnp.float32(initial_sigma(self, sigmas)))

  def scale_model_input(self, state: EulerState, sample: jax.Array, step_index) -> jax.Array:
    """x / sqrt(sigma_i^2 + 1): the VP model's input at noise level sigma_i (Karras Table 1)."""
    return scale_by_sigma(state, sample, step_index)

  def add_noise(self, state: EulerState, original: jax.Array, noise: jax.Array,
                step_index) -> jax.Array:
    """x0 + sigma_j eps, the sample at noise level sigma_j (see ``SchedulerBase.add_noise``)."""
    return (original + state.sigmas[step_index] * noise).astype(original.dtype)


@dataclasses.dataclass(frozen=True, kw_only=True)
class EulerDiscreteScheduler(_SigmaTableScheduler):
  """Euler sampler, equal to diffusers' ``EulerDiscreteScheduler`` with s_churn = 0.

  The stochastic "churn" of Karras Alg. 2 (diffusers' step arguments s_churn, s_tmin, s_tmax,
  s_noise) is not implemented; diffusers' pipelines leave it off.
  """

  timestep_spacing: str = "linspace"
  interpolation_type: str = "linear"  # sigma(t) linear in t; "log_linear" is not supported.
  use_karras_sigmas: bool = False  # Karras et al. Eq. 5 noise levels.
  use_exponential_sigmas: bool = False  # not supported.
  use_beta_sigmas: bool = False  # not supported.
  sigma_min: float | None = None  # Karras schedule ends; default: the schedule's own.
  sigma_max: float | None = None
  timestep_type: str = "discrete"  # "continuous": t = log(sigma) / 4 (v-prediction models only).
  final_sigmas_type: str = "zero"  # the sigma after the last step: "zero" or "sigma_min".

  diffusers_class: ClassVar[str] = "EulerDiscreteScheduler"
  _custom_schedules: ClassVar[tuple[str, ...]] = ("timesteps", "sigmas")
  _choices: ClassVar[dict[str, tuple[Any, ...]]] = {
      **base.SchedulerBase._choices,
      "prediction_type": ("epsilon", "v_prediction", "sample", "original_sample"),
      "interpolation_type": ("linear",),
      "timestep_type": ("discrete", "continuous"),
      "final_sigmas_type": ("zero", "sigma_min"),
  }
  _only_default: ClassVar[dict[str, Any]] = {
      "use_exponential_sigmas": False,
      "use_beta_sigmas": False,
  }

  def _tables(self, num_steps: int) -> tuple[np.ndarray, np.ndarray]:
    """(timesteps float32 [N], sigmas float32 [N + 1]) as diffusers computes them."""
    ts, sigmas = karras_or_spaced_sigmas(self, num_steps, self.use_karras_sigmas,
                                         self.sigma_min, self.sigma_max)
    if self.custom_sigmas is None:
      sigmas = self.finish_sigmas(sigmas, self.sigma_tables()[0])
    if self.timestep_type == "continuous" and self.prediction_type == "v_prediction":
      ts = 0.25 * np.log(sigmas[:-1])
    return ts.astype(np.float32), sigmas

  def step(
      self,
      state: EulerState,
      model_output: jax.Array,
      step_index: jax.Array | int,
      sample: jax.Array,
      key: jax.Array | None = None,
      *,
      noise: jax.Array | None = None,
  ) -> tuple[jax.Array, EulerState]:
    """One Euler step from sigma_i to sigma_{i+1} (Karras et al. 2022 Alg. 1, lines 4-5).

    Args:
      state: from ``init_state``.
      model_output: the model's prediction on ``scale_model_input(state, sample, i)``.
      step_index: i in [0, N), may be traced.
      sample: x at sigma_i (unscaled).
      key: unused (the step is deterministic).
      noise: unused.

    Returns:
      ``(x at sigma_{i+1}, state)``; the state is unchanged.
    """
    del key, noise
    base.check_same_shape(model_output, sample, who="EulerDiscreteScheduler.step")
    sigma = state.sigmas[step_index]
    sigma_next = state.sigmas[step_index + 1]
    x = sample.astype(jnp.float32)
    # 1. Denoised D(x; sigma) from the VP model's output; 2. dx/dsigma = (x - D) / sigma (Eq. 4).
    derivative = (x - denoised(self.prediction_type, model_output, x, sigma)) / sigma
    prev_sample = x + derivative * (sigma_next - sigma)
    return prev_sample.astype(model_output.dtype), state


@dataclasses.dataclass(frozen=True, kw_only=True)
class EulerAncestralDiscreteScheduler(_SigmaTableScheduler):
  """Euler ancestral sampler, equal to diffusers' ``EulerAncestralDiscreteScheduler``.

  Each step goes down by Euler to sigma_down, then adds fresh noise of std sigma_up, where
  sigma_up^2 = sigma_next^2 (sigma^2 - sigma_next^2) / sigma^2 and
  sigma_down^2 = sigma_next^2 - sigma_up^2: sigma_up is DDIM's sigma_t at eta = 1 (Song et al.
  2021, "DDIM", Eq. 16, i.e. DDPM's ancestral posterior std, Ho et al. 2020 Eq. 7) written for
  x / alpha. Step i draws its noise from ``key`` (or takes ``noise=``), so a fixed seed
  reproduces a run.
  """

  timestep_spacing: str = "linspace"

  diffusers_class: ClassVar[str] = "EulerAncestralDiscreteScheduler"
  _choices: ClassVar[dict[str, tuple[Any, ...]]] = {
      **base.SchedulerBase._choices,
      "prediction_type": ("epsilon", "v_prediction"),
  }

  def _tables(self, num_steps: int) -> tuple[np.ndarray, np.ndarray]:
    ts, sigmas = karras_or_spaced_sigmas(self, num_steps, False)
    return ts.astype(np.float32), np.concatenate([sigmas, [0.0]]).astype(np.float32)

  def step(
      self,
      state: EulerState,
      model_output: jax.Array,
      step_index: jax.Array | int,
      sample: jax.Array,
      key: jax.Array | None = None,
      *,
      noise: jax.Array | None = None,
  ) -> tuple[jax.Array, EulerState]:
    """One ancestral Euler step from sigma_i: Euler to sigma_down, plus sigma_up z.

    Args:
      state: from ``init_state``.
      model_output: the model's prediction on ``scale_model_input(state, sample, i)``.
      step_index: i in [0, N), may be traced.
      sample: x at sigma_i (unscaled).
      key: PRNG key of this step's noise z (every step draws, the last one too, as diffusers).
      noise: standard normal z to use instead of drawing from ``key``.

    Returns:
      ``(x at sigma_{i+1}, state)``; the state is unchanged.
    """
    who = "EulerAncestralDiscreteScheduler.step"
    base.check_same_shape(model_output, sample, who=who)
    sigma = state.sigmas[step_index]
    sigma_next = state.sigmas[step_index + 1]
    x = sample.astype(jnp.float32)
    sigma_up = jnp.sqrt(sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2)
    sigma_down = jnp.sqrt(sigma_next**2 - sigma_up**2)
    derivative = (x - denoised(self.prediction_type, model_output, x, sigma)) / sigma
    prev_sample = x + derivative * (sigma_down - sigma)
    z = base.gaussian_noise(key, noise, model_output, who=who)
    prev_sample = prev_sample + z * sigma_up
    return prev_sample.astype(model_output.dtype), state
