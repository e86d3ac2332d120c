"""Multistep DPM-Solver and DPM-Solver++, ODE and SDE (diffusers' ``DPMSolverMultistepScheduler``).

The solver integrates the diffusion ODE (or the reverse SDE, "sde-" variants) in
lambda = log(alpha_t / sigma_t) with the data prediction x0(x_t, t) ("dpmsolver++") or the noise
prediction ("dpmsolver"). The multistep history (the last ``solver_order - 1`` converted outputs
and how many steps have been taken) lives in the state pytree, so a run is one ``lax.scan``.

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
  # (output of step i-1, of step i-2)[: solver_order - 1]: x0 ("++") or epsilon predictions.
  prev_x0: tuple[jax.Array, ...]
  lower_order_nums: jax.Array  # int32 [] steps taken so far, capped at solver_order.


def _alpha_sigma_lambda(sigma):
  """(alpha_t, sigma_t, lambda_t) of the VP process from the VE noise level sigma."""
  alpha_t = 1 / jnp.sqrt(sigma**2 + 1)
  sigma_t = sigma * alpha_t
  return alpha_t, sigma_t, jnp.log(alpha_t) - jnp.log(sigma_t)


def dpm_coefficients(algorithm_type: str, solver_type: str, h, alpha_t, sigma_t, alpha_s,
                     sigma_s) -> dict[str, jax.Array]:
  """Weights of the DPM-Solver updates from s to t, h = lambda_t - lambda_s.

  x_t = x * w["x"] + D0 * w["d0"] (first order) + D1 * w["d1_second"] (second order, D1 =
  (m0 - m1) / r0) or D1 * w["d1_third"] + D2 * w["d2_third"] (third order), + z * w["z"] for the
  SDE solvers. Data prediction ("dpmsolver++", Lu et al. 2022b Eq. 8 / Alg. 2 / App. B) uses
  e^{-h} - 1; noise prediction ("dpmsolver", Lu et al. 2022a Eq. 3.7 and its multistep form)
  e^h - 1. The SDE solvers of DPM-Solver++ (Lu et al. 2022b, the SDE-DPM-Solver++ family)
  discretise the reverse SDE exactly in its linear part: first order
  x_t = (sigma_t / sigma_s) e^{-h} x_s + alpha_t (1 - e^{-2h}) x0 + sigma_t sqrt(1 - e^{-2h}) z
  ("sde-dpmsolver++"), or x_t = (alpha_t / alpha_s) x_s - 2 sigma_t (e^h - 1) eps
  + sigma_t sqrt(e^{2h} - 1) z ("sde-dpmsolver").
  """
  if algorithm_type == "dpmsolver++":
    em = jnp.exp(-h) - 1.0
    w = dict(x=sigma_t / sigma_s, d0=-alpha_t * em, d1_third=alpha_t * (em / h + 1.0),
             d2_third=-alpha_t * ((em + h) / h**2 - 0.5), z=0.0)
    w["d1_second"] = -0.5 * alpha_t * em if solver_type == "midpoint" else w["d1_third"]
  elif algorithm_type == "dpmsolver":
    ep = jnp.exp(h) - 1.0
    w = dict(x=alpha_t / alpha_s, d0=-sigma_t * ep, d1_third=-sigma_t * (ep / h - 1.0),
             d2_third=-sigma_t * ((ep - h) / h**2 - 0.5), z=0.0)
    w["d1_second"] = -0.5 * sigma_t * ep if solver_type == "midpoint" else w["d1_third"]
  elif algorithm_type == "sde-dpmsolver++":
    e2 = 1.0 - jnp.exp(-2.0 * h)
    w = dict(x=sigma_t / sigma_s * jnp.exp(-h), d0=alpha_t * e2,
             d1_third=alpha_t * (e2 / (-2.0 * h) + 1.0),
             d2_third=alpha_t * ((e2 - 2.0 * h) / (2.0 * h) ** 2 - 0.5),
             z=sigma_t * jnp.sqrt(e2))
    w["d1_second"] = 0.5 * alpha_t * e2 if solver_type == "midpoint" else w["d1_third"]
  else:  # "sde-dpmsolver" (orders 1-2)
    ep = jnp.exp(h) - 1.0
    w = dict(x=alpha_t / alpha_s, d0=-2.0 * sigma_t * ep, d1_third=0.0, d2_third=0.0,
             z=sigma_t * jnp.sqrt(jnp.exp(2.0 * h) - 1.0))
    w["d1_second"] = (-sigma_t * ep if solver_type == "midpoint"
                      else -2.0 * sigma_t * (ep / h - 1.0))
  return w


@dataclasses.dataclass(frozen=True, kw_only=True)
class DPMSolverMultistepScheduler(base.SchedulerBase):
  """DPM-Solver(++) (multistep, orders 1-3, ODE or SDE), equal to diffusers' scheduler.

  Orders as diffusers picks them: step i uses order min(solver_order, i + 1), lowered to 1 on the
  last step when ``final_sigmas_type="zero"``, ``euler_at_final``, or ``lower_order_final`` with
  fewer than 15 steps (and to 2 on the second-to-last step in that last case).

  ``variance_type`` "learned"/"learned_range" only drops the variance half of a 2C-channel output
  (the solver is deterministic). diffusers drops all channels after the third (a 3-channel pixel
  model assumption); jaxadapt drops the second half, which is the same for C = 3.
  """

  timestep_spacing: str = "linspace"
  solver_order: int = 2  # 1, 2 or 3.
  # "dpmsolver++" (data prediction), "dpmsolver" (noise prediction), or their stochastic
  # variants "sde-dpmsolver++" / "sde-dpmsolver" (orders 1-2), which draw noise every step.
  algorithm_type: str = "dpmsolver++"
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
  _custom_schedules: ClassVar[tuple[str, ...]] = ("timesteps",)
  _choices: ClassVar[dict[str, tuple[Any, ...]]] = {
      **base.SchedulerBase._choices,
      "solver_order": (1, 2, 3),
      "algorithm_type": ("dpmsolver++", "dpmsolver", "sde-dpmsolver++", "sde-dpmsolver"),
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

  def __post_init__(self):
    super().__post_init__()
    if not self.algorithm_type.endswith("++") and self.final_sigmas_type == "zero":
      raise ValueError(
          f"DPMSolverMultistepScheduler: algorithm_type={self.algorithm_type!r} (noise prediction)"
          " cannot step to sigma = 0 (its last update is 0 * inf; diffusers refuses it too). Set"
          " final_sigmas_type='sigma_min' or use the '++' (data prediction) variant.")
    if self.algorithm_type == "sde-dpmsolver" and self.solver_order == 3:
      raise ValueError("DPMSolverMultistepScheduler: algorithm_type='sde-dpmsolver' has orders 1"
                       " and 2 (diffusers has no third-order update for it); got solver_order=3.")

  def convert_output(self, model_output, x, alpha_t, sigma_t):
    """The data prediction x0 ("++") or the noise prediction, thresholded if configured."""
    if self.algorithm_type.endswith("++"):
      return self.predict_x0(model_output, x, alpha_t, sigma_t)
    if self.prediction_type == "epsilon":
      eps = model_output
    elif self.prediction_type == "sample":
      eps = (x - alpha_t * model_output) / sigma_t
    else:  # v_prediction
      eps = alpha_t * model_output + sigma_t * x
    if self.thresholding:  # threshold x0, then back to epsilon
      x0 = base.threshold_sample((x - sigma_t * eps) / alpha_t, self.dynamic_thresholding_ratio,
                                 self.sample_max_value)
      eps = (x - alpha_t * x0) / sigma_t
    return eps

  def _tables(self, num_steps: int) -> tuple[np.ndarray, np.ndarray]:
    """(timesteps int64 [N], sigmas float32 [N + 1]) as diffusers computes them."""
    ac, train_sigmas = self.sigma_tables()  # [T], increasing with t
    T = self.num_train_timesteps
    custom = self.custom_schedule(num_steps)
    if custom is not None:  # diffusers' set_timesteps(timesteps=...), cast to int
      ts = custom[1].astype(np.int64)
      return ts, self.finish_sigmas(np.interp(ts, np.arange(T), train_sigmas), ac)
    schedules.check_num_steps(num_steps, self.num_train_timesteps)
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

  def add_noise(self, state: DPMSolverState, original: jax.Array, noise: jax.Array,
                step_index) -> jax.Array:
    """alpha_j x0 + sigma_j eps at the VP noise level of sigmas[step_index] (see
    ``SchedulerBase.add_noise``)."""
    alpha_t, sigma_t, _ = _alpha_sigma_lambda(state.sigmas[step_index])
    return (alpha_t * original + sigma_t * noise).astype(original.dtype)

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
    """One multistep DPM-Solver(++) step from sigma_i to sigma_{i+1} (Lu et al. 2022, Alg. 2).

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
      key: PRNG key of this step's noise (SDE variants only; every step draws, as diffusers).
      noise: standard normal noise to use instead of drawing from ``key`` (SDE variants).

    Returns:
      ``(x_{t_{i+1}}, state)`` with the history advanced.
    """
    who = "DPMSolverMultistepScheduler.step"
    if self.variance_type is not None:
      model_output, _ = base.split_learned_variance(model_output, sample, who=who)
    base.check_same_shape(model_output, sample, who=who)
    x = sample.astype(jnp.float32)
    sigmas = state.sigmas
    alpha_t, sigma_t, lambda_t = _alpha_sigma_lambda(sigmas[step_index + 1])
    alpha_s0, sigma_s0, lambda_s0 = _alpha_sigma_lambda(sigmas[step_index])
    # The data prediction x0 (DPM-Solver++ Sec. 3) or the noise prediction (DPM-Solver).
    m = (self.convert_output(model_output.astype(jnp.float32), x, alpha_s0, sigma_s0),)
    m = m + state.prev_x0  # m[0] current, m[1] previous, m[2] the one before.

    _, _, lambda_s1 = _alpha_sigma_lambda(sigmas[jnp.maximum(step_index - 1, 0)])
    _, _, lambda_s2 = _alpha_sigma_lambda(sigmas[jnp.maximum(step_index - 2, 0)])
    h = lambda_t - lambda_s0
    c = dpm_coefficients(self.algorithm_type, self.solver_type, h, alpha_t, sigma_t, alpha_s0,
                         sigma_s0)

    # x' = c_x x + c_d0 D0 + c_01 (m0 - m1) + c_12 (m1 - m2) (+ c_z z): each order's update
    # (Alg. 2 and App. B) is linear in D0 = m0, D1_0 = (m0 - m1) / r0 and D1_1 = (m1 - m2) / r1.
    def first(_):
      return jnp.float32(0.0), jnp.float32(0.0)

    def second(_):
      r0 = (lambda_s0 - lambda_s1) / h
      return c["d1_second"] / r0, jnp.float32(0.0)

    def third(_):
      r0 = (lambda_s0 - lambda_s1) / h
      r1 = (lambda_s1 - lambda_s2) / h
      # D1 = D1_0 + r0 / (r0 + r1) (D1_0 - D1_1); D2 = (D1_0 - D1_1) / (r0 + r1).
      w = (c["d1_third"] * r0 + c["d2_third"]) / (r0 + r1)
      return (c["d1_third"] + w) / r0, -w / r1

    order = self._order(state, step_index)
    c_01, c_12 = jax.lax.switch(order - 1, [first, second, third][: self.solver_order], None)
    prev_sample = c["x"] * x + c["d0"] * m[0]
    if self.solver_order >= 2:
      prev_sample = prev_sample + c_01 * (m[0] - m[1])
    if self.solver_order >= 3:
      prev_sample = prev_sample + c_12 * (m[1] - m[2])
    if self.algorithm_type.startswith("sde-"):
      z = base.gaussian_noise(key, noise, x, who=who)
      prev_sample = prev_sample + c["z"] * z

    new_state = state._replace(
        prev_x0=m[: self.solver_order - 1],
        lower_order_nums=jnp.minimum(state.lower_order_nums + 1, self.solver_order),
    )
    return prev_sample.astype(model_output.dtype), new_state
