"""DEIS: diffusion exponential integrator sampling (diffusers' ``DEISMultistepScheduler``).

The ODE in rho = sigma_t / alpha_t (the VE noise level) is integrated exactly in its linear part
and with a Lagrange polynomial in log(rho) through the last ``order`` noise predictions
("logrho", the variant diffusers implements): x_t = alpha_t (x_s / alpha_s + sum_j c_j eps_j),
c_j = int_{rho_s}^{rho_t} l_j(log rho) d rho. The weights depend on the noise levels only, so
``init_state`` computes them on the host (float64) and ``step`` is one weighted sum.

References:
  Zhang & Chen 2023, "Fast Sampling of Diffusion Models with Exponential Integrator" (ICLR),
  Sec. 3-4: the exponential integrator x_t = alpha_t (x_s / alpha_s + int eps d rho) of the
  semilinear probability-flow ODE, with eps extrapolated by a polynomial through past steps
  (the multistep AB-DEIS family; diffusers' "logrho" variant takes the Lagrange polynomial in
  log rho and integrates it in rho exactly).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxadapt.diffusion import base
from jaxadapt.diffusion.unipc import multistep_tables


class DEISState(NamedTuple):
  """Tables and multistep history of a DEIS run; S = solver_order."""

  timesteps: jax.Array  # int32 [N] model timesteps, largest first.
  sigmas: jax.Array  # float32 [N + 1] noise levels; the last is sigma_min.
  init_noise_sigma: jax.Array  # float32 [] (1).
  weights: jax.Array  # float32 [N, S + 1] weights of (x_i, eps_i, eps_{i-1}, ...).
  prev_eps: tuple[jax.Array, ...]  # noise predictions of steps i-1, i-2 [: S - 1].


def _ind2(t, b, c):
  """int of the order-2 Lagrange basis in log rho (diffusers' ``ind_fn``, 2 nodes)."""
  return t * (-math.log(c) + math.log(t) - 1) / (math.log(b) - math.log(c))


def _ind3(t, b, c, d):
  """int of the order-3 Lagrange basis in log rho (3 nodes)."""
  lt, lc, ld, lb = math.log(t), math.log(c), math.log(d), math.log(b)
  num = t * (lc * (ld - lt + 1) - ld * lt + ld + lt**2 - 2 * lt + 2)
  return num / ((lb - lc) * (lb - ld))


@dataclasses.dataclass(frozen=True, kw_only=True)
class DEISMultistepScheduler(base.SchedulerBase):
  """DEIS (multistep, orders 1-3, "logrho"), equal to diffusers' scheduler of the same name.

  Orders as diffusers picks them: min(solver_order, i + 1), lowered to 1 on the last step and to
  2 on the one before with ``lower_order_final`` and fewer than 15 steps. The step after the last
  ends at the smallest training sigma (diffusers' DEIS has no final sigma 0).
  """

  timestep_spacing: str = "linspace"
  solver_order: int = 2  # 1, 2 or 3.
  algorithm_type: str = "deis"  # ("dpmsolver"/"dpmsolver++" are read as "deis", as diffusers).
  solver_type: str = "logrho"  # ("midpoint", "heun", "bh1", "bh2" are read as "logrho").
  lower_order_final: bool = True
  thresholding: bool = False  # dynamic thresholding of x0 (Imagen).
  dynamic_thresholding_ratio: float = 0.995
  sample_max_value: float = 1.0
  use_karras_sigmas: bool = False  # Karras et al. Eq. 5 noise levels.
  use_exponential_sigmas: bool = False  # not supported.
  use_beta_sigmas: bool = False  # not supported.
  use_flow_sigmas: bool = False  # not supported.
  flow_shift: float = 1.0  # only with flow sigmas; ignored.
  use_dynamic_shifting: bool = False  # not supported.
  time_shift_type: str = "exponential"  # only with dynamic shifting; ignored.

  diffusers_class: ClassVar[str] = "DEISMultistepScheduler"
  _choices: ClassVar[dict[str, tuple[Any, ...]]] = {
      **base.SchedulerBase._choices,
      "solver_order": (1, 2, 3),
      "algorithm_type": ("deis",),
      "solver_type": ("logrho",),
  }
  _only_default: ClassVar[dict[str, Any]] = {
      "use_exponential_sigmas": False,
      "use_beta_sigmas": False,
      "use_flow_sigmas": False,
      "use_dynamic_shifting": False,
  }

  def __post_init__(self):
    if self.algorithm_type in ("dpmsolver", "dpmsolver++"):
      object.__setattr__(self, "algorithm_type", "deis")
    if self.solver_type in ("midpoint", "heun", "bh1", "bh2"):
      object.__setattr__(self, "solver_type", "logrho")
    super().__post_init__()

  def set_timesteps(self, num_steps: int) -> np.ndarray:
    """int64 [N] timesteps, equal to diffusers' ``DEISMultistepScheduler.set_timesteps``."""
    return multistep_tables(self, num_steps, "sigma_min")[0]

  def _weights(self, sigmas: np.ndarray) -> np.ndarray:
    n, s = len(sigmas) - 1, self.solver_order
    out = np.zeros((n, s + 1))
    alpha = lambda sig: 1.0 / math.sqrt(sig * sig + 1.0)  # noqa: E731; rho = sigma (VE)
    for i in range(n):
      low = self.lower_order_final and n < 15
      order = min(s, i + 1)
      if i == n - 1 and low:
        order = 1
      elif i == n - 2 and low:
        order = min(order, 2)
      r_t, r0 = float(sigmas[i + 1]), float(sigmas[i])
      a_t = alpha(r_t)
      out[i, 0] = a_t / alpha(r0)
      if order == 1:  # x_t = (a_t / a_s) x - sigma_t (e^h - 1) eps, e^h = rho_s / rho_t
        out[i, 1] = -a_t * (r0 - r_t)
      elif order == 2:
        r1 = float(sigmas[i - 1])
        out[i, 1] = a_t * (_ind2(r_t, r0, r1) - _ind2(r0, r0, r1))
        out[i, 2] = a_t * (_ind2(r_t, r1, r0) - _ind2(r0, r1, r0))
      else:
        r1, r2 = float(sigmas[i - 1]), float(sigmas[i - 2])
        out[i, 1] = a_t * (_ind3(r_t, r0, r1, r2) - _ind3(r0, r0, r1, r2))
        out[i, 2] = a_t * (_ind3(r_t, r1, r2, r0) - _ind3(r0, r1, r2, r0))
        out[i, 3] = a_t * (_ind3(r_t, r2, r0, r1) - _ind3(r0, r2, r0, r1))
    return out

  def init_state(self, num_steps: int, sample: jax.Array) -> DEISState:
    """The state of a ``num_steps`` run; ``sample`` (or an array of its shape) sizes the history."""
    ts, sigmas = multistep_tables(self, num_steps, "sigma_min")
    zeros = jnp.zeros(sample.shape, jnp.float32)
    return DEISState(
        timesteps=jnp.asarray(ts, jnp.int32), sigmas=jnp.asarray(sigmas),
        init_noise_sigma=jnp.float32(1.0),
        weights=jnp.asarray(self._weights(sigmas), jnp.float32),
        prev_eps=(zeros,) * (self.solver_order - 1))

  def step(
      self,
      state: DEISState,
      model_output: jax.Array,
      step_index: jax.Array | int,
      sample: jax.Array,
      key: jax.Array | None = None,
      *,
      noise: jax.Array | None = None,
  ) -> tuple[jax.Array, DEISState]:
    """x_{i+1} = w_x x_i + sum_j w_j eps_{i-j} (the exponential integrator, tabulated weights).

    Args:
      state: from ``init_state`` or the previous step (carries the noise predictions).
      model_output: the model's prediction at x_i, shaped like ``sample``.
      step_index: i in [0, N), may be traced; steps must come in order.
      sample: x_i.
      key: unused (deterministic).
      noise: unused.

    Returns:
      ``(x_{i+1}, state)`` with the history advanced.
    """
    del key, noise
    base.check_same_shape(model_output, sample, who="DEISMultistepScheduler.step")
    i = step_index
    x = sample.astype(jnp.float32)
    sigma = state.sigmas[i]
    alpha_t = 1 / jnp.sqrt(sigma**2 + 1)
    sigma_t = sigma * alpha_t
    # The noise prediction through x0 (thresholded if configured), as diffusers converts it.
    x0 = self.predict_x0(model_output.astype(jnp.float32), x, alpha_t, sigma_t)
    eps = (x - alpha_t * x0) / sigma_t
    history = (eps,) + state.prev_eps
    w = state.weights[i]
    prev_sample = w[0] * x
    for j, e in enumerate(history):
      prev_sample = prev_sample + w[j + 1] * e
    new_state = state._replace(prev_eps=history[: self.solver_order - 1])
    return prev_sample.astype(model_output.dtype), new_state
