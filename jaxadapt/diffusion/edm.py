"""Euler sampling with EDM preconditioning (diffusers' ``EDMEulerScheduler``).

For models trained in the EDM parametrisation (Playground v2.5, some SDXL finetunes): the model
sees c_in(sigma) x at c_noise(sigma) = log(sigma) / 4 and the denoiser is
D(x; sigma) = c_skip(sigma) x + c_out(sigma) F(c_in x, c_noise), with
c_skip = sigma_data^2 / (sigma^2 + sigma_data^2), c_out = +-sigma sigma_data / sqrt(sigma^2 +
sigma_data^2) (minus for v-prediction) and c_in = 1 / sqrt(sigma^2 + sigma_data^2). The noise
levels are Karras et al.'s rho-schedule between sigma_max and sigma_min (or log-uniform,
"exponential"), and each step is Euler in sigma. Unlike the other schedulers, no beta schedule
is involved (the ``beta_*`` options are unused).

References:
  Karras et al. 2022, "Elucidating the Design Space of Diffusion-Based Generative Models":
  Table 1 (the EDM preconditioning c_skip, c_out, c_in, c_noise), Eq. 5 (the noise levels,
  rho = 7), Alg. 1 (Euler steps of dx/dsigma = (x - D) / sigma, s_churn = 0).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from jaxadapt.diffusion import base, schedules
from jaxadapt.diffusion.euler import EulerState


@dataclasses.dataclass(frozen=True, kw_only=True)
class EDMEulerScheduler(base.SchedulerBase):
  """EDM Euler sampler, equal to diffusers' ``EDMEulerScheduler`` with s_churn = 0."""

  sigma_min: float = 0.002  # the smallest noise level.
  sigma_max: float = 80.0  # the largest noise level.
  sigma_data: float = 0.5  # the data's std (EDM preconditioning).
  sigma_schedule: str = "karras"  # "karras" (Eq. 5) or "exponential" (log-uniform).
  rho: float = 7.0  # Karras et al.'s rho.
  final_sigmas_type: str = "zero"  # the sigma after the last step: "zero" or "sigma_min".

  diffusers_class: ClassVar[str] = "EDMEulerScheduler"
  _choices: ClassVar[dict[str, tuple[Any, ...]]] = {
      **base.SchedulerBase._choices,
      "prediction_type": ("epsilon", "v_prediction"),
      "sigma_schedule": ("karras", "exponential"),
      "final_sigmas_type": ("zero", "sigma_min"),
  }

  def _sigmas(self, num_steps: int) -> np.ndarray:
    """float32 [N + 1] noise levels, largest first, then 0 or sigma_min."""
    schedules.check_num_steps(num_steps, self.num_train_timesteps)
    if self.sigma_schedule == "karras":
      ramp = np.linspace(0, 1, num_steps)
      lo, hi = self.sigma_min ** (1 / self.rho), self.sigma_max ** (1 / self.rho)
      sigmas = (hi + ramp * (lo - hi)) ** self.rho
    else:  # log-uniform, as torch.linspace in float32
      sigmas = np.exp(schedules.linspace_f32(math.log(self.sigma_min), math.log(self.sigma_max),
                                             num_steps))[::-1]
    sigmas = np.asarray(sigmas, np.float32)
    last = sigmas[-1] if self.final_sigmas_type == "sigma_min" else 0.0
    return np.concatenate([sigmas, [last]]).astype(np.float32)

  def set_timesteps(self, num_steps: int) -> np.ndarray:
    """float32 [N] timesteps c_noise = log(sigma) / 4, equal to diffusers' ``set_timesteps``."""
    return (0.25 * np.log(self._sigmas(num_steps)[:-1])).astype(np.float32)

  def init_state(self, num_steps: int, sample: jax.Array | None = None) -> EulerState:
    """The state of a ``num_steps`` run. ``sample`` is unused (no history)."""
    del sample
    sigmas = self._sigmas(num_steps)
    return EulerState(
        timesteps=jnp.asarray(0.25 * np.log(sigmas[:-1]), jnp.float32),
        sigmas=jnp.asarray(sigmas),
        init_noise_sigma=jnp.float32(math.sqrt(self.sigma_max**2 + 1)))  # as diffusers

  def scale_model_input(self, state: EulerState, sample: jax.Array, step_index) -> jax.Array:
    """c_in(sigma) x = x / sqrt(sigma^2 + sigma_data^2) (Karras et al. Table 1)."""
    sigma = state.sigmas[step_index]
    return (sample / jnp.sqrt(sigma**2 + self.sigma_data**2)).astype(sample.dtype)

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
    """One Euler step with the preconditioned denoiser D = c_skip x + c_out F (Table 1, Alg. 1).

    Args:
      state: from ``init_state``.
      model_output: F, the model's output on ``scale_model_input(state, sample, i)``.
      step_index: i in [0, N), may be traced.
      sample: x at sigma_i (unscaled).
      key: unused (deterministic).
      noise: unused.

    Returns:
      ``(x at sigma_{i+1}, state)``; the state is unchanged.
    """
    del key, noise
    base.check_same_shape(model_output, sample, who="EDMEulerScheduler.step")
    sigma, sigma_next = state.sigmas[step_index], state.sigmas[step_index + 1]
    x = sample.astype(jnp.float32)
    sd2 = self.sigma_data**2
    c_skip = sd2 / (sigma**2 + sd2)
    c_out = sigma * self.sigma_data / jnp.sqrt(sigma**2 + sd2)
    if self.prediction_type == "v_prediction":
      c_out = -c_out
    x0 = c_skip * x + c_out * model_output.astype(jnp.float32)
    prev_sample = x + (x - x0) / sigma * (sigma_next - sigma)
    return prev_sample.astype(model_output.dtype), state
