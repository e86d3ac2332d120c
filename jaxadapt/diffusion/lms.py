"""Linear multistep sampling in sigma (diffusers' ``LMSDiscreteScheduler``).

Step i integrates dx/dsigma = d(x, sigma) from sigma_i to sigma_{i+1} with the Lagrange
polynomial through the last ``order`` derivatives (Adams-Bashforth with non-uniform steps): the
weight of d_{i-j} is the integral over [sigma_i, sigma_{i+1}] of the Lagrange basis polynomial
l_j(tau) = prod_{k != j} (tau - sigma_{i-k}) / (sigma_{i-j} - sigma_{i-k}). The weights depend
on the sigmas only, so ``init_state`` integrates them exactly on the host (diffusers integrates
numerically, to 1e-4 relative) and ``step`` is one weighted sum.

References:
  Karras et al. 2022, "Elucidating the Design Space of Diffusion-Based Generative Models",
  Eq. 4 (the ODE dx/dsigma = (x - D(x; sigma)) / sigma), Eq. 5 (``use_karras_sigmas``) and
  Table 1 (input scaling); the linear multistep method of its k-diffusion code
  (``sample_lms``). Hairer, Norsett & Wanner, "Solving ODEs I", Sec. III.1 (Adams methods).
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


class LMSState(NamedTuple):
  """Tables and derivative history of an LMS run."""

  timesteps: jax.Array  # float32 [N] model timesteps.
  sigmas: jax.Array  # float32 [N + 1] noise levels; the last is 0.
  init_noise_sigma: jax.Array  # float32 [] std of the initial noise.
  coefficients: jax.Array  # float32 [N, order] weight of d_{i-j} at step i (0 past the order).
  derivatives: tuple[jax.Array, ...]  # (d_{i-1}, d_{i-2}, ...)[: order - 1].


def lms_coefficients(sigmas: np.ndarray, order: int) -> np.ndarray:
  """[N, order] Adams weights: int_{sigma_i}^{sigma_{i+1}} l_j(tau) d tau, exactly (float64)."""
  s = np.asarray(sigmas, np.float64)
  n = len(s) - 1
  out = np.zeros((n, order))
  for i in range(n):
    m = min(i + 1, order)
    for j in range(m):
      poly = np.poly1d([1.0])
      for k in range(m):
        if k != j:
          poly *= np.poly1d([1.0, -s[i - k]]) / (s[i - j] - s[i - k])
      integral = poly.integ()
      out[i, j] = integral(s[i + 1]) - integral(s[i])
  return out


@dataclasses.dataclass(frozen=True, kw_only=True)
class LMSDiscreteScheduler(base.SchedulerBase):
  """Linear multistep sampler, equal to diffusers' ``LMSDiscreteScheduler``."""

  timestep_spacing: str = "linspace"
  use_karras_sigmas: bool = False  # Karras et al. Eq. 5 noise levels.
  use_exponential_sigmas: bool = False  # not supported.
  use_beta_sigmas: bool = False  # not supported.
  # Not a scheduler_config.json option; diffusers takes it as a ``step`` argument (default 4).
  order: int = 4

  diffusers_class: ClassVar[str] = "LMSDiscreteScheduler"
  _choices: ClassVar[dict[str, tuple[Any, ...]]] = {
      **base.SchedulerBase._choices,
      "order": (1, 2, 3, 4),
  }
  _only_default: ClassVar[dict[str, Any]] = {
      "use_exponential_sigmas": False,
      "use_beta_sigmas": False,
  }

  def _tables(self, num_steps: int) -> tuple[np.ndarray, np.ndarray]:
    ts, sigmas = karras_or_spaced_sigmas(self, num_steps, self.use_karras_sigmas)
    return ts.astype(np.float32), np.concatenate([sigmas, [0.0]]).astype(np.float32)

  def set_timesteps(self, num_steps: int) -> np.ndarray:
    """float32 [N] timesteps, equal to diffusers' ``LMSDiscreteScheduler.set_timesteps``."""
    return self._tables(num_steps)[0]

  def init_state(self, num_steps: int, sample: jax.Array) -> LMSState:
    """The state of a ``num_steps`` run; ``sample`` (or an array of its shape) sizes the history."""
    ts, sigmas = self._tables(num_steps)
    zeros = jnp.zeros(sample.shape, jnp.float32)
    return LMSState(
        timesteps=jnp.asarray(ts), sigmas=jnp.asarray(sigmas),
        init_noise_sigma=jnp.float32(initial_sigma(self, sigmas)),
        coefficients=jnp.asarray(lms_coefficients(sigmas, self.order), jnp.float32),
        derivatives=(zeros,) * (self.order - 1))

  def scale_model_input(self, state: LMSState, sample: jax.Array, step_index) -> jax.Array:
    """x / sqrt(sigma_i^2 + 1) (Karras Table 1)."""
    return scale_by_sigma(state, sample, step_index)

  def step(
      self,
      state: LMSState,
      model_output: jax.Array,
      step_index: jax.Array | int,
      sample: jax.Array,
      key: jax.Array | None = None,
      *,
      noise: jax.Array | None = None,
  ) -> tuple[jax.Array, LMSState]:
    """x_{i+1} = x_i + sum_j c_{ij} d_{i-j}, d = (x - D(x; sigma)) / sigma (Karras Eq. 4).

    Args:
      state: from ``init_state`` or the previous step (carries the derivatives).
      model_output: the model's prediction on ``scale_model_input(state, sample, i)``.
      step_index: i in [0, N), may be traced; steps must come in order.
      sample: x at sigma_i (unscaled).
      key: unused (deterministic).
      noise: unused.

    Returns:
      ``(x at sigma_{i+1}, state)`` with the history advanced.
    """
    del key, noise
    base.check_same_shape(model_output, sample, who="LMSDiscreteScheduler.step")
    sigma = state.sigmas[step_index]
    x = sample.astype(jnp.float32)
    d = (x - denoised(self.prediction_type, model_output.astype(jnp.float32), x, sigma)) / sigma
    history = (d,) + state.derivatives
    c = state.coefficients[step_index]
    prev_sample = x
    for j, dj in enumerate(history):
      prev_sample = prev_sample + c[j] * dj
    new_state = state._replace(derivatives=history[: self.order - 1])
    return prev_sample.astype(model_output.dtype), new_state
