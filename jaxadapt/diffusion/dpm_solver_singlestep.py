"""Single-step DPM-Solver(++) (diffusers' ``DPMSolverSinglestepScheduler``).

The N steps are grouped into single-step solver steps of order 1, 2 or 3 (diffusers' order list,
e.g. 1, 2, 1, 2, ..., 1 for order 2): a group of order k starts at an anchor x_s, and its k model
calls land at intermediate noise levels; each call's update goes from the anchor (not from the
previous sample) with the outputs gathered since. Per-step orders and anchors are fixed by N, so
they are host-side tables and ``step`` is scan-friendly.

References:
  Lu et al. 2022a, "DPM-Solver: A Fast ODE Solver for Diffusion Probabilistic Model Sampling in
  Around 10 Steps" (NeurIPS), Alg. 1 (DPM-Solver-2) and Alg. 2 (DPM-Solver-3): single-step
  solvers from an anchor with intermediate points r_1 h, r_2 h; Sec. 3.4 (the order schedule
  for a budget of N calls).
  Lu et al. 2022b, "DPM-Solver++", Alg. 1 (single-step DPM-Solver++(2S)) and its SDE variant.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxadapt.diffusion import base, schedules
from jaxadapt.diffusion.dpm_solver import (DPMSolverMultistepScheduler, _alpha_sigma_lambda,
                                           dpm_coefficients)


class DPMSolverSinglestepState(NamedTuple):
  """Tables and the current group's outputs of a single-step DPM-Solver run."""

  timesteps: jax.Array  # int32 [N] model timesteps, largest first.
  sigmas: jax.Array  # float32 [N + 1] noise levels; the last is 0 or sigma_min.
  orders: jax.Array  # int32 [N] the order of each step's update (1 starts a group).
  init_noise_sigma: jax.Array  # float32 [] (1).
  prev_outputs: tuple[jax.Array, ...]  # converted outputs of steps i-1, i-2 [: order - 1].
  anchor: jax.Array  # the sample the current group started from.


@dataclasses.dataclass(frozen=True, kw_only=True)
class DPMSolverSinglestepScheduler(base.SchedulerBase):
  """Single-step DPM-Solver(++), equal to diffusers' scheduler of the same name.

  As diffusers: the timesteps are always "linspace" spaced (N + 1 points, the last dropped; the
  config's ``timestep_spacing``/``steps_offset`` do not apply), ``lower_order_final=False`` is
  turned on when N is not a multiple of the order or the last sigma is 0, and the last step is
  first order when ``final_sigmas_type="zero"``.
  """

  solver_order: int = 2  # 1, 2 or 3.
  # "dpmsolver++" (data prediction), "dpmsolver" (noise prediction), "sde-dpmsolver++".
  algorithm_type: str = "dpmsolver++"
  solver_type: str = "midpoint"  # "midpoint" or "heun" (second/third-order form).
  lower_order_final: bool = False  # lower orders for the last group (see class docstring).
  use_karras_sigmas: bool = False  # Karras et al. Eq. 5 noise levels.
  use_exponential_sigmas: bool = False  # not supported.
  use_beta_sigmas: bool = False  # not supported.
  use_flow_sigmas: bool = False  # not supported.
  flow_shift: float = 1.0  # only with flow sigmas; ignored.
  final_sigmas_type: str = "zero"  # the sigma after the last step: "zero" or "sigma_min".
  lambda_min_clipped: float = -float("inf")  # last usable lambda (cosine schedules).
  variance_type: str | None = None  # None, "learned" or "learned_range": the half is dropped.
  thresholding: bool = False  # dynamic thresholding of x0 (Imagen).
  dynamic_thresholding_ratio: float = 0.995
  sample_max_value: float = 1.0
  use_dynamic_shifting: bool = False  # not supported.
  time_shift_type: str = "exponential"  # only with dynamic shifting; ignored.

  diffusers_class: ClassVar[str] = "DPMSolverSinglestepScheduler"
  _custom_schedules: ClassVar[tuple[str, ...]] = ("timesteps",)
  _choices: ClassVar[dict[str, tuple[Any, ...]]] = {
      **base.SchedulerBase._choices,
      "solver_order": (1, 2, 3),
      "algorithm_type": ("dpmsolver++", "dpmsolver", "sde-dpmsolver++"),
      "solver_type": ("midpoint", "heun"),
      "final_sigmas_type": ("zero", "sigma_min"),
      "variance_type": (None, "learned", "learned_range"),
  }
  _only_default: ClassVar[dict[str, Any]] = {
      "use_exponential_sigmas": False,
      "use_beta_sigmas": False,
      "use_flow_sigmas": False,
      "use_dynamic_shifting": False,
  }

  def __post_init__(self):
    if self.algorithm_type == "deis":  # diffusers' alias
      object.__setattr__(self, "algorithm_type", "dpmsolver++")
    if self.solver_type in ("logrho", "bh1", "bh2"):  # diffusers' aliases
      object.__setattr__(self, "solver_type", "midpoint")
    super().__post_init__()
    if not self.algorithm_type.endswith("++") and self.final_sigmas_type == "zero":
      raise ValueError(
          f"DPMSolverSinglestepScheduler: algorithm_type={self.algorithm_type!r} (noise"
          " prediction) cannot step to sigma = 0 (diffusers refuses it too). Set"
          " final_sigmas_type='sigma_min' or use 'dpmsolver++'.")

  def _convert(self, model_output, x, alpha_t, sigma_t):
    """The data prediction x0 ("++") or the noise prediction, as the multistep solver's."""
    return DPMSolverMultistepScheduler.convert_output(self, model_output, x, alpha_t, sigma_t)

  def _tables(self, num_steps: int) -> tuple[np.ndarray, np.ndarray]:
    """(timesteps int64 [N], sigmas float32 [N + 1]) as diffusers computes them."""
    ac, train_sigmas = self.sigma_tables()
    T = self.num_train_timesteps
    custom = self.custom_schedule(num_steps)
    if custom is not None:  # diffusers' set_timesteps(timesteps=...), cast to int
      ts = custom[1].astype(np.int64)
      return ts, self.finish_sigmas(np.interp(ts, np.arange(T), train_sigmas), ac)
    schedules.check_num_steps(num_steps, self.num_train_timesteps)
    lambdas = np.log(np.sqrt(ac)) - np.log(np.sqrt(1 - ac))
    clipped = int(np.searchsorted(lambdas[::-1], self.lambda_min_clipped))
    ts = np.linspace(0, T - 1 - clipped, num_steps + 1).round()[::-1][:-1].astype(np.int64)
    if self.use_karras_sigmas:
      sigmas = schedules.karras_sigmas(float(train_sigmas[0]), float(train_sigmas[-1]), num_steps)
      ts = schedules.sigma_to_t(sigmas, np.log(train_sigmas)).round().astype(np.int64)
    else:
      sigmas = np.interp(ts, np.arange(T), train_sigmas)
    return ts, self.finish_sigmas(sigmas, ac)

  def orders(self, num_steps: int) -> list[int]:
    """The update order of each step, as diffusers' ``get_order_list`` (Lu et al. Sec. 3.4)."""
    k, n = self.solver_order, num_steps
    lower = self.lower_order_final or n % k != 0 or self.final_sigmas_type == "zero"
    if lower and k == 3:
      orders = ([1, 2, 3] * (n // 3 - 1) + [1, 2, 1] if n % 3 == 0 else
                [1, 2, 3] * (n // 3) + ([1] if n % 3 == 1 else [1, 2]))
    elif lower and k == 2:
      orders = [1, 2] * (n // 2 - 1) + [1, 1] if n % 2 == 0 else [1, 2] * (n // 2) + [1]
    else:
      orders = list(range(1, k + 1)) * (n // k)
    if self.final_sigmas_type == "zero":
      orders[-1] = 1
    # A step never uses more outputs than exist (diffusers lowers the order at the start).
    return [min(o, i + 1) for i, o in enumerate(orders)]

  def set_timesteps(self, num_steps: int) -> np.ndarray:
    """int64 [N] timesteps, equal to diffusers' ``DPMSolverSinglestepScheduler``'s."""
    return self._tables(num_steps)[0]

  def init_state(self, num_steps: int, sample: jax.Array) -> DPMSolverSinglestepState:
    """The state of a ``num_steps`` run; ``sample`` (or an array of its shape) sizes it."""
    ts, sigmas = self._tables(num_steps)
    zeros = jnp.zeros(sample.shape, jnp.float32)
    return DPMSolverSinglestepState(
        timesteps=jnp.asarray(ts, jnp.int32), sigmas=jnp.asarray(sigmas),
        orders=jnp.asarray(self.orders(num_steps), jnp.int32), init_noise_sigma=jnp.float32(1.0),
        prev_outputs=(zeros,) * (self.solver_order - 1), anchor=zeros)

  def step(
      self,
      state: DPMSolverSinglestepState,
      model_output: jax.Array,
      step_index: jax.Array | int,
      sample: jax.Array,
      key: jax.Array | None = None,
      *,
      noise: jax.Array | None = None,
  ) -> tuple[jax.Array, DPMSolverSinglestepState]:
    """Step i of its group: the order-k update from the group's anchor to sigma_{i+1}.

    With the anchor at s = sigma_{i-k+1}, h = lambda_{i+1} - lambda_s and the group's outputs
    m (oldest = the anchor's): order 1 is the DDIM-like first-order step (Lu et al. 2022b
    Eq. 8); order 2 uses D0 = m_s, D1 = (m_i - m_s) / r0 (Alg. 1, DPM-Solver-2 / ++(2S));
    order 3 Alg. 2 (DPM-Solver-3), with the "midpoint" form's single difference or the
    "heun" form's D1, D2.

    Args:
      state: from ``init_state`` or the previous step.
      model_output: the model's prediction at x_i; 2C channels only with ``variance_type``.
      step_index: i in [0, N), may be traced; steps must come in order.
      sample: x_i.
      key: PRNG key of this step's noise ("sde-dpmsolver++" only).
      noise: standard normal noise to use instead of drawing from ``key``.

    Returns:
      ``(x_{i+1}, state)``.
    """
    who = "DPMSolverSinglestepScheduler.step"
    if self.variance_type is not None:
      model_output, _ = base.split_learned_variance(model_output, sample, who=who)
    base.check_same_shape(model_output, sample, who=who)
    i = step_index
    x = sample.astype(jnp.float32)
    sigmas = state.sigmas
    order = state.orders[i]
    alpha_t, sigma_t, lambda_t = _alpha_sigma_lambda(sigmas[i + 1])
    alpha_0, sigma_0, lambda_0 = _alpha_sigma_lambda(sigmas[i])
    m0 = self._convert(model_output.astype(jnp.float32), x, alpha_0, sigma_0)
    m = (m0,) + state.prev_outputs
    anchor = jnp.where(order == 1, x, state.anchor)
    s = sigmas[jnp.maximum(i - order + 1, 0)]
    alpha_s, sigma_s, lambda_s = _alpha_sigma_lambda(s)
    h = lambda_t - lambda_s
    c = dpm_coefficients(self.algorithm_type, self.solver_type, h, alpha_t, sigma_t, alpha_s,
                         sigma_s)
    _, _, lambda_1 = _alpha_sigma_lambda(sigmas[jnp.maximum(i - 1, 0)])

    def first(_):
      return c["x"] * anchor + c["d0"] * m[0]

    def second(_):  # anchor s = i - 1: D0 = m1, D1 = (m0 - m1) / r0
      r0 = (lambda_0 - lambda_s) / h
      return c["x"] * anchor + c["d0"] * m[1] + c["d1_second"] * (m[0] - m[1]) / r0

    def third(_):  # anchor s = i - 2: D0 = m2
      r0 = (lambda_0 - lambda_s) / h
      r1 = (lambda_1 - lambda_s) / h
      d1_0, d1_1 = (m[1] - m[2]) / r1, (m[0] - m[2]) / r0
      out = c["x"] * anchor + c["d0"] * m[2]
      if self.solver_type == "midpoint":
        return out + c["d1_third"] * d1_1
      d1 = (r0 * d1_0 - r1 * d1_1) / (r0 - r1)
      d2 = 2.0 * (d1_1 - d1_0) / (r0 - r1)
      return out + c["d1_third"] * d1 + c["d2_third"] * d2

    prev_sample = jax.lax.switch(order - 1, [first, second, third][: self.solver_order], None)
    if self.algorithm_type.startswith("sde-"):
      prev_sample = prev_sample + c["z"] * base.gaussian_noise(key, noise, x, who=who)
    new_state = state._replace(prev_outputs=m[: self.solver_order - 1], anchor=anchor)
    return prev_sample.astype(model_output.dtype), new_state
