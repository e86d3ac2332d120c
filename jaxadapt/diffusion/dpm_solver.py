"""Multistep DPM-Solver++ (diffusers' ``DPMSolverMultistepScheduler`` with "dpmsolver++").

The solver integrates the diffusion ODE in lambda = log(alpha_t / sigma_t) with the data
prediction x0(x_t, t). The multistep history (the last ``solver_order - 1`` x0 predictions and how
many steps have been taken) lives in the state pytree, so a run is one ``lax.scan``.

References:
  Lu et al. 2022, "DPM-Solver++: Fast Solver for Guided Sampling of Diffusion Probabilistic
  Models": Eq. 8 / Alg. 1 first step (first order, equal to DDIM), Alg. 2 (multistep
  second order, "midpoint"), Appendix B (the "heun"-type second-order and third-order updates).
  Lu et al. 2022, "DPM-Solver", Sec. 3.4 (lambda_min clipping for the cosine schedule).
  Karras et al. 2022 Eq. 5 (``use_karras_sigmas``).
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxadapt.diffusion import base, schedules


class DPMSolverState(NamedTuple):
  """Tables and multistep history of a DPM-Solver++ run."""

  timesteps: jax.Array  # int32 [N] model timesteps, largest first.
  sigmas: jax.Array  # float32 [N + 1] sigma_i = sqrt((1 - a) / a); the last is 0 or sigma_min.
  init_noise_sigma: jax.Array  # float32 [] (1).
  prev_x0: tuple[jax.Array, ...]  # (x0 of step i-1, x0 of step i-2)[: solver_order - 1].
  lower_order_nums: jax.Array  # int32 [] steps taken so far, capped at solver_order.


def _alpha_sigma_lambda(sigma):
  """(alpha_t, sigma_t, lambda_t) of the VP process from the VE noise level sigma."""
  alpha_t = 1 / jnp.sqrt(sigma**2 + 1)
  sigma_t = sigma * alpha_t
  return alpha_t, sigma_t, jnp.log(alpha_t) - jnp.log(sigma_t)


@dataclasses.dataclass(frozen=True, kw_only=True)
class DPMSolverMultistepScheduler(base.SchedulerBase):
  """DPM-Solver++ (multistep, orders 1-3), equal to diffusers' scheduler of the same name.

  Orders as diffusers picks them: step i uses order min(solver_order, i + 1), lowered to 1 on the
  last step when ``final_sigmas_type="zero"``, ``euler_at_final``, or ``lower_order_final`` with
  fewer than 15 steps (and to 2 on the second-to-last step in that last case).

  ``variance_type`` "learned"/"learned_range" only drops the variance half of a 2C-channel output
  (the solver is deterministic). diffusers drops all channels after the third (a 3-channel pixel
  model assumption); jaxadapt drops the second half, which is the same for C = 3.
  """

  timestep_spacing: str = "linspace"
  solver_order: int = 2  # 1, 2 or 3.
  algorithm_type: str = "dpmsolver++"  # only "dpmsolver++" (deterministic, data prediction).
  solver_type: str = "midpoint"  # second-order update: "midpoint" (Alg. 2) or "heun".
  lower_order_final: bool = True  # lower orders at the end for runs under 15 steps.
  euler_at_final: bool = False  # first order on the last step.
  use_karras_sigmas: bool = False  # Karras et al. Eq. 5 noise levels.
  use_exponential_sigmas: bool = False  # not supported.
  use_beta_sigmas: bool = False  # not supported.
  use_lu_lambdas: bool = False  # not supported.
  use_flow_sigmas: bool = False  # not supported.
  flow_shift: float = 1.0  # only with flow sigmas; ignored.
  final_sigmas_type: str = "zero"  # the sigma after the last step: "zero" or "sigma_min".
  lambda_min_clipped: float = -float("inf")  # last usable lambda (cosine schedules).
  variance_type: str | None = None  # None, "learned" or "learned_range" (see class docstring).
  thresholding: bool = False  # dynamic thresholding of x0 (Imagen).
  dynamic_thresholding_ratio: float = 0.995
  sample_max_value: float = 1.0
  use_dynamic_shifting: bool = False  # not supported.
  time_shift_type: str = "exponential"  # only with dynamic shifting; ignored.

  diffusers_class: ClassVar[str] = "DPMSolverMultistepScheduler"
  _choices: ClassVar[dict[str, tuple[Any, ...]]] = {
      **base.SchedulerBase._choices,
      "solver_order": (1, 2, 3),
      "algorithm_type": ("dpmsolver++",),
      "solver_type": ("midpoint", "heun"),
      "final_sigmas_type": ("zero", "sigma_min"),
      "variance_type": (None, "learned", "learned_range"),
  }
  _only_default: ClassVar[dict[str, Any]] = {
      "use_exponential_sigmas": False,
      "use_beta_sigmas": False,
      "use_lu_lambdas": False,
      "use_flow_sigmas": False,
      "use_dynamic_shifting": False,
  }

  def _tables(self, num_steps: int) -> tuple[np.ndarray, np.ndarray]:
    """(timesteps int64 [N], sigmas float32 [N + 1]) as diffusers computes them."""
    schedules.check_num_steps(num_steps, self.num_train_timesteps)
    ac, train_sigmas = self.sigma_tables()  # [T], increasing with t
    T = self.num_train_timesteps
    lambdas = np.log(np.sqrt(ac)) - np.log(np.sqrt(1 - ac))  # float32 [T], decreasing in t
    last_t = T - int(np.searchsorted(lambdas[::-1], self.lambda_min_clipped))
    # diffusers spaces N + 1 points and drops the one at t = 0 for linspace/leading.
    if self.timestep_spacing == "linspace":
      ts = np.linspace(0, last_t - 1, num_steps + 1).round()[::-1][:-1].astype(np.int64)
    elif self.timestep_spacing == "leading":
      ratio = last_t // (num_steps + 1)
      ts = (np.arange(num_steps + 1) * ratio).round()[::-1][:-1].astype(np.int64)
      ts = ts + self.steps_offset
    else:  # "trailing"
      ratio = T / num_steps
      ts = np.arange(last_t, 0, -ratio).round().astype(np.int64) - 1
    log_sigmas = np.log(train_sigmas)
    if self.use_karras_sigmas:
      sigmas = schedules.karras_sigmas(
          float(train_sigmas[0]), float(train_sigmas[-1]), num_steps)
      ts = schedules.sigma_to_t(sigmas, log_sigmas)
      if self.beta_schedule != "squaredcos_cap_v2":
        ts = ts.round()
    else:
      sigmas = np.interp(ts, np.arange(T), train_sigmas)
    return ts.astype(np.int64), self.finish_sigmas(sigmas, ac)

  def set_timesteps(self, num_steps: int) -> np.ndarray:
    """int64 [N] timesteps, equal to diffusers' ``DPMSolverMultistepScheduler.set_timesteps``."""
    return self._tables(num_steps)[0]

  def init_state(self, num_steps: int, sample: jax.Array) -> DPMSolverState:
    """The state of a ``num_steps`` run; ``sample`` (or an array of its shape) sizes the history."""
    ts, sigmas = self._tables(num_steps)
    zeros = jnp.zeros(sample.shape, jnp.float32)
    return DPMSolverState(
        timesteps=jnp.asarray(ts, jnp.int32),
        sigmas=jnp.asarray(sigmas),
        init_noise_sigma=jnp.float32(1.0),
        prev_x0=(zeros,) * (self.solver_order - 1),
        lower_order_nums=jnp.int32(0),
    )

  def _order(self, state: DPMSolverState, step_index) -> jax.Array:
    """The order diffusers uses at ``step_index`` (1, 2 or 3), as a traced int32."""
    n = state.timesteps.shape[0]
    last = step_index == n - 1
    second_last = step_index == n - 2
    lower_last = (self.euler_at_final or (self.lower_order_final and n < 15)
                  or self.final_sigmas_type == "zero")
    lower_second = self.lower_order_final and n < 15
    lon = state.lower_order_nums
    order = jnp.minimum(jnp.int32(self.solver_order), lon + 1)
    order = jnp.where(second_last & lower_second, jnp.minimum(order, 2), order)
    order = jnp.where(last & lower_last, 1, order)
    return order

  def step(
      self,
      state: DPMSolverState,
      model_output: jax.Array,
      step_index: jax.Array | int,
      sample: jax.Array,
      key: jax.Array | None = None,
      *,
      noise: jax.Array | None = None,
  ) -> tuple[jax.Array, DPMSolverState]:
    """One multistep DPM-Solver++ step from sigma_i to sigma_{i+1} (Lu et al. 2022, Alg. 2).

    With h = lambda_{i+1} - lambda_i and D0 = x0_i, the first-order step is
    x' = (sigma_{i+1} / sigma_i) x - alpha_{i+1} (e^{-h} - 1) D0; the second order adds
    -0.5 alpha_{i+1} (e^{-h} - 1) D1 ("midpoint"; D1 = (x0_i - x0_{i-1}) / r,
    r = h_{i-1} / h) or alpha_{i+1} ((e^{-h} - 1) / h + 1) D1 ("heun").

    Args:
      state: from ``init_state`` or the previous step (carries the x0 history).
      model_output: the model's prediction at x_{t_i}; 2C channels only with ``variance_type``.
      step_index: i in [0, N), may be traced; steps must be taken in order from the state's
        history (i = 0 first, as diffusers does).
      sample: x_{t_i}.
      key: unused (the solver is deterministic).
      noise: unused.

    Returns:
      ``(x_{t_{i+1}}, state)`` with the history advanced.
    """
    del key, noise
    who = "DPMSolverMultistepScheduler.step"
    if self.variance_type is not None:
      model_output, _ = base.split_learned_variance(model_output, sample, who=who)
    base.check_same_shape(model_output, sample, who=who)
    x = sample.astype(jnp.float32)
    sigmas = state.sigmas
    s0 = sigmas[step_index]
    alpha_t, sigma_t, lambda_t = _alpha_sigma_lambda(sigmas[step_index + 1])
    alpha_s0, sigma_s0, lambda_s0 = _alpha_sigma_lambda(s0)
    # The data prediction x0(x_t, t) (DPM-Solver++ Sec. 3), thresholded if configured.
    x0 = self.predict_x0(model_output.astype(jnp.float32), x, alpha_s0, sigma_s0)
    m = (x0,) + state.prev_x0  # m[0] current, m[1] previous, m[2] the one before.

    _, _, lambda_s1 = _alpha_sigma_lambda(sigmas[jnp.maximum(step_index - 1, 0)])
    _, _, lambda_s2 = _alpha_sigma_lambda(sigmas[jnp.maximum(step_index - 2, 0)])
    h = lambda_t - lambda_s0
    em1 = jnp.exp(-h) - 1.0  # e^{-h} - 1

    # x' = c_x x + c_d0 D0 + c_01 (m0 - m1) + c_12 (m1 - m2): each order's update (Alg. 2 and
    # App. B) is linear in D0 = m0, D1_0 = (m0 - m1) / r0 and D1_1 = (m1 - m2) / r1.
    def first(_):
      return jnp.float32(0.0), jnp.float32(0.0)

    def second(_):
      r0 = (lambda_s0 - lambda_s1) / h
      if self.solver_type == "midpoint":
        c_d1 = -0.5 * alpha_t * em1
      else:  # "heun"
        c_d1 = alpha_t * (em1 / h + 1.0)
      return c_d1 / r0, jnp.float32(0.0)

    def third(_):
      r0 = (lambda_s0 - lambda_s1) / h
      r1 = (lambda_s1 - lambda_s2) / h
      c_d1 = alpha_t * (em1 / h + 1.0)
      c_d2 = -alpha_t * ((em1 + h) / h**2 - 0.5)
      # D1 = D1_0 + r0 / (r0 + r1) (D1_0 - D1_1); D2 = (D1_0 - D1_1) / (r0 + r1).
      w = (c_d1 * r0 + c_d2) / (r0 + r1)
      return (c_d1 + w) / r0, -w / r1

    order = self._order(state, step_index)
    c_01, c_12 = jax.lax.switch(order - 1, [first, second, third][: self.solver_order], None)
    prev_sample = (sigma_t / sigma_s0) * x - (alpha_t * em1) * m[0]
    if self.solver_order >= 2:
      prev_sample = prev_sample + c_01 * (m[0] - m[1])
    if self.solver_order >= 3:
      prev_sample = prev_sample + c_12 * (m[1] - m[2])

    new_state = state._replace(
        prev_x0=m[: self.solver_order - 1],
        lower_order_nums=jnp.minimum(state.lower_order_nums + 1, self.solver_order),
    )
    return prev_sample.astype(model_output.dtype), new_state
