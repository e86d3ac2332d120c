"""Heun's second-order sampler in sigma (diffusers' ``HeunDiscreteScheduler``).

Each of the N steps takes two model calls: an Euler step from sigma_i to sigma_{i+1}, then the
trapezoidal correction with the derivative at the Euler point (the last step, to sigma = 0, is
Euler only). ``state.timesteps`` lists the 2N - 1 calls' timesteps (t_0, t_1, t_1, t_2, t_2, ...),
as diffusers' ``scheduler.timesteps`` does; call k is an Euler step when k is even, a
correction when k is odd.

References:
  Karras et al. 2022, "Elucidating the Design Space of Diffusion-Based Generative Models",
  Alg. 1 (Heun's 2nd-order method, lines 3-8: d_i = (x_i - D(x_i; sigma_i)) / sigma_i,
  x_{i+1} = x_i + (sigma_{i+1} - sigma_i) (d_i + d'_i) / 2), Eq. 5 (``use_karras_sigmas``),
  Table 1 (the VP model's input scaling).
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxadapt.diffusion import base
from jaxadapt.diffusion.euler import (denoised, initial_sigma, karras_or_spaced_sigmas,
                                      scale_by_sigma)


class HeunState(NamedTuple):
  """Per-call tables and the pending Euler step of a Heun run (2N - 1 calls)."""

  timesteps: jax.Array  # float32 [2N - 1] the model's timestep at each call.
  sigmas: jax.Array  # float32 [2N] sigma_0, sigma_1, sigma_1, ..., sigma_{N-1}, sigma_{N-1}, 0.
  init_noise_sigma: jax.Array  # float32 [] std of the initial noise.
  derivative: jax.Array  # d_i of the pending Euler step (sample-shaped).
  saved_sample: jax.Array  # x_i, where the pending step started.


@dataclasses.dataclass(frozen=True, kw_only=True)
class HeunDiscreteScheduler(base.SchedulerBase):
  """Heun sampler, equal to diffusers' ``HeunDiscreteScheduler`` (s_churn = 0, as diffusers)."""

  beta_start: float = 0.00085  # diffusers' Heun defaults (the SD schedule's ends).
  beta_end: float = 0.012
  timestep_spacing: str = "linspace"
  use_karras_sigmas: bool = False  # Karras et al. Eq. 5 noise levels.
  use_exponential_sigmas: bool = False  # not supported.
  use_beta_sigmas: bool = False  # not supported.
  clip_sample: bool = False  # clip D(x; sigma) to [-clip_sample_range, clip_sample_range].
  clip_sample_range: float = 1.0

  diffusers_class: ClassVar[str] = "HeunDiscreteScheduler"
  _custom_schedules: ClassVar[tuple[str, ...]] = ("timesteps",)
  _only_default: ClassVar[dict[str, Any]] = {
      "use_exponential_sigmas": False,
      "use_beta_sigmas": False,
  }

  def _tables(self, num_steps: int) -> tuple[np.ndarray, np.ndarray]:
    """(call timesteps float32 [2N - 1], call sigmas float32 [2N]) as diffusers builds them."""
    ts, sigmas = karras_or_spaced_sigmas(self, num_steps, self.use_karras_sigmas)
    sigmas = np.concatenate([sigmas, [0.0]]).astype(np.float32)
    sigmas = np.concatenate([sigmas[:1], np.repeat(sigmas[1:-1], 2), sigmas[-1:]])
    ts = np.asarray(ts, np.float32)
    return np.concatenate([ts[:1], np.repeat(ts[1:], 2)]), sigmas

  def set_timesteps(self, num_steps: int) -> np.ndarray:
    """float32 [2N - 1] call timesteps, equal to diffusers' ``HeunDiscreteScheduler``'s."""
    return self._tables(num_steps)[0]

  def init_state(self, num_steps: int, sample: jax.Array) -> HeunState:
    """The state of a ``num_steps`` run; ``sample`` (or an array of its shape) sizes it."""
    ts, sigmas = self._tables(num_steps)
    zeros = jnp.zeros(sample.shape, jnp.float32)
    return HeunState(timesteps=jnp.asarray(ts), sigmas=jnp.asarray(sigmas),
                     init_noise_sigma=jnp.float32(initial_sigma(self, sigmas)),
                     derivative=zeros, saved_sample=zeros)

  def scale_model_input(self, state: HeunState, sample: jax.Array, step_index) -> jax.Array:
    """x / sqrt(sigma^2 + 1) at the call's own sigma (Karras Table 1)."""
    return scale_by_sigma(state, sample, step_index)

  def step(
      self,
      state: HeunState,
      model_output: jax.Array,
      step_index: jax.Array | int,
      sample: jax.Array,
      key: jax.Array | None = None,
      *,
      noise: jax.Array | None = None,
  ) -> tuple[jax.Array, HeunState]:
    """Call k: the Euler step (k even) or Heun's correction of it (k odd), Karras Alg. 1.

    Args:
      state: from ``init_state`` or the previous call.
      model_output: the model's prediction on ``scale_model_input(state, sample, k)``.
      step_index: call index k in [0, 2N - 1), may be traced; calls must come in order.
      sample: the current (unscaled) sample.
      key: unused (deterministic).
      noise: unused.

    Returns:
      ``(next sample, state)``.
    """
    del key, noise
    base.check_same_shape(model_output, sample, who="HeunDiscreteScheduler.step")
    k = step_index
    first = k % 2 == 0
    sigmas = state.sigmas
    # Call k's sigma is sigmas[k]: sigma_i for an Euler call, sigma_{i+1} for a correction.
    sigma_here = sigmas[k]
    x = sample.astype(jnp.float32)
    x0 = denoised(self.prediction_type, model_output.astype(jnp.float32), x, sigma_here)
    if self.clip_sample:
      x0 = jnp.clip(x0, -self.clip_sample_range, self.clip_sample_range)
    d = (x - x0) / sigma_here
    # Euler call: x_i + (sigma_{i+1} - sigma_i) d_i; correction: the trapezoid from x_i.
    sigma_i = jnp.where(first, sigma_here, sigmas[k - 1])
    sigma_next = jnp.where(first, sigmas[k + 1], sigma_here)
    start = jnp.where(first, x, state.saved_sample)
    slope = jnp.where(first, d, (state.derivative + d) / 2)
    prev_sample = start + slope * (sigma_next - sigma_i)
    new_state = state._replace(derivative=jnp.where(first, d, state.derivative),
                               saved_sample=jnp.where(first, x, state.saved_sample))
    return prev_sample.astype(model_output.dtype), new_state
