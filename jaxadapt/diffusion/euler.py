"""Euler sampling of the probability-flow ODE in sigma (diffusers' ``EulerDiscreteScheduler``).

References:
  Karras et al. 2022, "Elucidating the Design Space of Diffusion-Based Generative Models":
  Alg. 1 / Eq. 4 (Euler steps of dx/dsigma = (x - D(x; sigma)) / sigma), Eq. 5 (the rho = 7
  noise levels, ``use_karras_sigmas``), Table 1 (VP preconditioning: the model sees
  x / sqrt(sigma^2 + 1) at timestep t(sigma)).
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


@dataclasses.dataclass(frozen=True, kw_only=True)
class EulerDiscreteScheduler(base.SchedulerBase):
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
    schedules.check_num_steps(num_steps, self.num_train_timesteps)
    ac, train_sigmas = self.sigma_tables()  # [T], increasing with t
    T = self.num_train_timesteps
    if self.timestep_spacing == "linspace":
      ts = np.linspace(0, T - 1, num_steps, dtype=np.float32)[::-1].copy()
    else:  # integer spacings, as floats
      ts = schedules.spaced_timesteps(
          self.timestep_spacing, T, num_steps, self.steps_offset).astype(np.float32)
    log_sigmas = np.log(train_sigmas)
    sigmas = np.interp(ts, np.arange(T), train_sigmas)
    if self.use_karras_sigmas:
      lo = self.sigma_min if self.sigma_min is not None else float(sigmas[-1])
      hi = self.sigma_max if self.sigma_max is not None else float(sigmas[0])
      sigmas = schedules.karras_sigmas(lo, hi, num_steps)
      ts = schedules.sigma_to_t(sigmas, log_sigmas)
    sigmas = self.finish_sigmas(sigmas, ac)
    if self.timestep_type == "continuous" and self.prediction_type == "v_prediction":
      ts = 0.25 * np.log(sigmas[:-1])
    return ts.astype(np.float32), sigmas

  def set_timesteps(self, num_steps: int) -> np.ndarray:
    """float32 [N] timesteps, equal to diffusers' ``EulerDiscreteScheduler.set_timesteps``."""
    return self._tables(num_steps)[0]

  def init_state(self, num_steps: int, sample: jax.Array | None = None) -> EulerState:
    """The state of a ``num_steps`` run. ``sample`` is unused (Euler keeps no history)."""
    del sample
    ts, sigmas = self._tables(num_steps)
    max_sigma = sigmas.max()
    if self.timestep_spacing in ("linspace", "trailing"):
      init_sigma = max_sigma
    else:
      init_sigma = np.sqrt(max_sigma**2 + np.float32(1))
    return EulerState(
        timesteps=jnp.asarray(ts),
        sigmas=jnp.asarray(sigmas),
        init_noise_sigma=jnp.float32(init_sigma),
    )

  def scale_model_input(self, state: EulerState, sample: jax.Array, step_index) -> jax.Array:
    """x / sqrt(sigma_i^2 + 1): the VP model's input at noise level sigma_i (Karras Table 1)."""
    sigma = state.sigmas[step_index]
    return (sample / jnp.sqrt(sigma**2 + 1)).astype(sample.dtype)

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
    # 1. Denoised D(x; sigma) from the VP model's output.
    if self.prediction_type == "epsilon":
      x0 = x - sigma * model_output
    elif self.prediction_type == "v_prediction":
      x0 = model_output * (-sigma / jnp.sqrt(sigma**2 + 1)) + x / (sigma**2 + 1)
    else:  # "sample" / "original_sample"
      x0 = model_output
    # 2. dx/dsigma = (x - D) / sigma (Eq. 4), one Euler step.
    derivative = (x - x0) / sigma
    prev_sample = x + derivative * (sigma_next - sigma)
    return prev_sample.astype(model_output.dtype), state
