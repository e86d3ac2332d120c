"""UniPC: the unified predictor-corrector multistep solver (diffusers' ``UniPCMultistepScheduler``).

Step i evaluates the model once at x_i (sigma_i), first corrects x_i with that output (UniC, the
corrector of the previous step's prediction, which costs no extra model call), then predicts
x_{i+1} (UniP) from the last ``order`` outputs. Both updates are linear in the sample and in the
stored outputs, with weights that depend on the noise levels only, so ``init_state`` computes
every step's weights on the host (float64) and ``step`` applies them: one formula, scan-friendly.

With h = lambda_t - lambda_s (lambda = log(alpha / sigma)), hh = -h for data prediction
(``predict_x0``), h for noise prediction, r_k = (lambda_{s_k} - lambda_s) / h and
D_k = (m_k - m_0) / r_k, the update is
  x_t = (sigma_t / sigma_s) x_s - alpha_t (e^{hh} - 1) m_0 - alpha_t B(h) sum_k rho_k D_k
(x0 prediction; alpha and sigma swap roles for noise prediction), B(h) = hh ("bh1") or
e^{hh} - 1 ("bh2"), and rho solves R rho = g with R_{jk} = r_k^{j-1} and
g_j = j! phi_{j+1}(hh) / B(h) (the predictor drops the last row and column; order 2 uses
rho = 1/2, as does the order-1 corrector).

References:
  Zhao et al. 2023, "UniPC: A Unified Predictor-Corrector Framework for Fast Sampling of
  Diffusion Models" (NeurIPS): Alg. 1 (UniP-p), Alg. 2 (UniC-p), Eq. 7-8 (the linear system
  for rho), Sec. 3.3 / App. C (B(h) = h for "bh1", e^h - 1 for "bh2"), Alg. 3/4 (multistep
  UniPC with the x0 / noise prediction models).
  Karras et al. 2022 Eq. 5 (``use_karras_sigmas``).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxadapt.diffusion import base, schedules


class UniPCState(NamedTuple):
  """Tables and multistep history of a UniPC run; S = solver_order."""

  timesteps: jax.Array  # int32 [N] model timesteps, largest first.
  sigmas: jax.Array  # float32 [N + 1] noise levels; the last is 0 or sigma_min.
  init_noise_sigma: jax.Array  # float32 [] (1).
  predictor: jax.Array  # float32 [N, S + 1] weights of (x_i, m_0, m_1 - m_0, ..., m_{S-1} - m_0).
  corrector: jax.Array  # float32 [N, S + 2] weights of (x_last, m'_0, m'_1 - m'_0, ...,
  #                       m'_{S-1} - m'_0, m - m'_0); m' the outputs before this step.
  use_corrector: jax.Array  # bool [N] step i corrects x_i.
  outputs: tuple[jax.Array, ...]  # converted outputs of steps i-1, i-2, ..., i-S.
  last_sample: jax.Array  # x_{i-1} after its correction (where the prediction started).


def _alpha_sigma_lambda(sigma: float) -> tuple[float, float, float]:
  """(alpha, sigma, lambda = log(alpha / sigma)) of the VP process at VE level sigma (float64).

  sigma = 0 (the last step's target) has lambda = inf, as in diffusers' torch arithmetic.
  """
  alpha = 1.0 / math.sqrt(sigma**2 + 1.0)
  sig = sigma * alpha
  return alpha, sig, (math.inf if sig == 0 else math.log(alpha) - math.log(sig))


def multistep_tables(sched: base.SchedulerBase, num_steps: int, final_sigmas_type: str,
                     sigma_min: float | None = None,
                     sigma_max: float | None = None) -> tuple[np.ndarray, np.ndarray]:
  """(timesteps int64 [N], sigmas float32 [N + 1]) of diffusers' UniPC and DEIS schedulers.

  "linspace"/"leading" space N + 1 points and drop the one at t = 0; Karras sigmas (Eq. 5) run
  between ``sigma_min``/``sigma_max`` (default: the training schedule's ends), their timesteps
  rounded; the last sigma is 0 or, for "sigma_min", the smallest (training or Karras) sigma.
  """
  schedules.check_num_steps(num_steps, sched.num_train_timesteps)
  ac, train_sigmas = sched.sigma_tables()
  T = sched.num_train_timesteps
  if sched.timestep_spacing == "linspace":
    ts = np.linspace(0, T - 1, num_steps + 1).round()[::-1][:-1].astype(np.int64)
  elif sched.timestep_spacing == "leading":
    ratio = T // (num_steps + 1)
    ts = (np.arange(num_steps + 1) * ratio).round()[::-1][:-1].astype(np.int64)
    ts = ts + sched.steps_offset
  else:  # "trailing"
    ts = np.arange(T, 0, -T / num_steps).round().astype(np.int64) - 1
  if getattr(sched, "use_karras_sigmas", False):
    lo = sigma_min if sigma_min is not None else float(train_sigmas[0])
    hi = sigma_max if sigma_max is not None else float(train_sigmas[-1])
    sigmas = schedules.karras_sigmas(lo, hi, num_steps)
    ts = schedules.sigma_to_t(sigmas, np.log(train_sigmas)).round().astype(np.int64)
    last = sigmas[-1] if final_sigmas_type == "sigma_min" else 0.0
    return ts, np.concatenate([sigmas, [last]]).astype(np.float32)
  sigmas = np.interp(ts, np.arange(T), train_sigmas)
  last = np.sqrt((1 - ac[0]) / ac[0]) if final_sigmas_type == "sigma_min" else 0.0
  return ts, np.concatenate([sigmas, [last]]).astype(np.float32)


@dataclasses.dataclass(frozen=True, kw_only=True)
class UniPCMultistepScheduler(base.SchedulerBase):
  """UniPC (multistep, "bh1"/"bh2"), equal to diffusers' scheduler of the same name.

  Orders as diffusers picks them: step i predicts with order min(solver_order, i + 1), and with
  ``lower_order_final`` also at most N - i; the corrector at step i uses step i - 1's order and is
  skipped after the steps listed in ``disable_corrector``.

  One difference from diffusers 0.42: with "bh1" and ``final_sigmas_type="zero"`` the last step
  (order 1, to sigma = 0) gives the data prediction x0 here, where diffusers multiplies
  B(h) = -inf by an empty (zero) sum and returns NaN.
  """

  timestep_spacing: str = "linspace"
  solver_order: int = 2  # 1, 2 or 3 (2 for guided sampling, 3 unconditional).
  solver_type: str = "bh2"  # B(h): "bh1" (h) or "bh2" (e^h - 1).
  predict_x0: bool = True  # work with the data prediction (else the noise prediction).
  lower_order_final: bool = True  # lower orders on the last steps.
  disable_corrector: tuple[int, ...] = ()  # step indices after which UniC is skipped.
  solver_p: Any = None  # another scheduler as predictor: not supported.
  use_karras_sigmas: bool = False  # Karras et al. Eq. 5 noise levels.
  use_exponential_sigmas: bool = False  # not supported.
  use_beta_sigmas: bool = False  # not supported.
  use_flow_sigmas: bool = False  # not supported.
  flow_shift: float = 1.0  # only with flow sigmas; ignored.
  final_sigmas_type: str = "zero"  # the sigma after the last step: "zero" or "sigma_min".
  thresholding: bool = False  # dynamic thresholding of x0 (Imagen).
  dynamic_thresholding_ratio: float = 0.995
  sample_max_value: float = 1.0
  sigma_min: float | None = None  # Karras schedule ends; default: the schedule's own.
  sigma_max: float | None = None
  use_dynamic_shifting: bool = False  # not supported.
  time_shift_type: str = "exponential"  # only with dynamic shifting; ignored.
  shift_terminal: float | None = None  # only with flow sigmas: not supported.

  diffusers_class: ClassVar[str] = "UniPCMultistepScheduler"
  _choices: ClassVar[dict[str, tuple[Any, ...]]] = {
      **base.SchedulerBase._choices,
      "solver_order": (1, 2, 3),
      "solver_type": ("bh1", "bh2"),
      "final_sigmas_type": ("zero", "sigma_min"),
  }
  _only_default: ClassVar[dict[str, Any]] = {
      "solver_p": None,
      "use_exponential_sigmas": False,
      "use_beta_sigmas": False,
      "use_flow_sigmas": False,
      "use_dynamic_shifting": False,
      "shift_terminal": None,
  }

  def __post_init__(self):
    if self.solver_type in ("midpoint", "heun", "logrho"):  # diffusers maps these to "bh2"
      object.__setattr__(self, "solver_type", "bh2")
    if not isinstance(self.disable_corrector, tuple):
      object.__setattr__(self, "disable_corrector", tuple(int(i) for i in self.disable_corrector))
    super().__post_init__()
    if not self.predict_x0 and self.final_sigmas_type == "zero":
      raise ValueError(
          "UniPCMultistepScheduler: predict_x0=False (noise prediction) cannot step to sigma = 0:"
          " its last update is 0 * inf (diffusers returns NaN there). Use predict_x0=True or"
          " final_sigmas_type='sigma_min'.")

  def _tables(self, num_steps: int) -> tuple[np.ndarray, np.ndarray]:
    """(timesteps int64 [N], sigmas float32 [N + 1]) as diffusers computes them."""
    return multistep_tables(self, num_steps, self.final_sigmas_type, self.sigma_min,
                            self.sigma_max)

  def set_timesteps(self, num_steps: int) -> np.ndarray:
    """int64 [N] timesteps, equal to diffusers' ``UniPCMultistepScheduler.set_timesteps``."""
    return self._tables(num_steps)[0]

  def _orders(self, n: int) -> list[int]:
    """The predictor's order at each step, as diffusers' ``this_order``."""
    s = self.solver_order
    return [min(min(s, n - i) if self.lower_order_final else s, min(i, s) + 1) for i in range(n)]

  def _weights(self, sigmas: np.ndarray, i: int, order: int, target: int,
               corrector: bool) -> list[float]:
    """Weights of one UniP (``corrector=False``) or UniC update from sigma_i to sigma_target.

    Returns [w_x, w_m0, w_D-terms (order - 1, as weights of m_k - m_0), (w_m - m_0 if UniC)].
    """
    a_t, s_t, l_t = _alpha_sigma_lambda(float(sigmas[target]))
    a_s, s_s, l_s = _alpha_sigma_lambda(float(sigmas[i]))
    h = l_t - l_s
    rks = [(_alpha_sigma_lambda(float(sigmas[i - k]))[2] - l_s) / h for k in range(1, order)]
    rks.append(1.0)
    hh = -h if self.predict_x0 else h
    h_phi_1 = math.expm1(hh)
    b_h = hh if self.solver_type == "bh1" else math.expm1(hh)
    # g_j = j! phi_{j+1}(hh) / B(h) by the recursion phi_{k+1} = (phi_k - 1/k!) / hh.
    R, g, h_phi_k, fact = [], [], h_phi_1 / hh - 1, 1
    for j in range(1, order + 1):
      R.append([r ** (j - 1) for r in rks])
      g.append(h_phi_k * fact / b_h)
      fact *= j + 1
      h_phi_k = h_phi_k / hh - 1 / fact
    R, g = np.asarray(R), np.asarray(g)
    try:
      if corrector:
        rhos = [0.5] if order == 1 else list(np.linalg.solve(R, g))
      elif order == 1:
        rhos = []
      else:
        rhos = [0.5] if order == 2 else list(np.linalg.solve(R[:-1, :-1], g[:-1]))
    except np.linalg.LinAlgError:
      raise ValueError(
          f"UniPCMultistepScheduler: the order-{order} weights of step {i} have a singular"
          " system (a step to sigma = 0 at order > 1); diffusers fails there too. Use"
          " lower_order_final=True or final_sigmas_type='sigma_min'.") from None
    big = a_t if self.predict_x0 else s_t  # the factor in front of the outputs
    w_x = s_t / s_s if self.predict_x0 else a_t / a_s
    out = [w_x, -big * h_phi_1]
    out += [-big * b_h * rhos[k - 1] / rks[k - 1] for k in range(1, order)]
    if corrector:
      out.append(-big * b_h * rhos[-1])
    return out

  def init_state(self, num_steps: int, sample: jax.Array) -> UniPCState:
    """The state of a ``num_steps`` run; ``sample`` (or an array of its shape) sizes the history."""
    ts, sigmas = self._tables(num_steps)
    n, s = len(ts), self.solver_order
    orders = self._orders(n)
    pred = np.zeros((n, s + 1))
    corr = np.zeros((n, s + 2))
    use_corr = np.zeros(n, bool)
    for i in range(n):
      w = self._weights(sigmas, i, orders[i], i + 1, corrector=False)
      pred[i, : len(w)] = w
      if i > 0 and (i - 1) not in self.disable_corrector:
        use_corr[i] = True
        p = orders[i - 1]
        w = self._weights(sigmas, i - 1, p, i, corrector=True)
        corr[i, : p + 1] = w[:-1]
        corr[i, -1] = w[-1]
    zeros = jnp.zeros(sample.shape, jnp.float32)
    return UniPCState(
        timesteps=jnp.asarray(ts, jnp.int32), sigmas=jnp.asarray(sigmas),
        init_noise_sigma=jnp.float32(1.0), predictor=jnp.asarray(pred, jnp.float32),
        corrector=jnp.asarray(corr, jnp.float32), use_corrector=jnp.asarray(use_corr),
        outputs=(zeros,) * s, last_sample=zeros)

  def _convert(self, model_output, x, sigma):
    """The data prediction x0 (``predict_x0``) or the noise prediction from the model output."""
    alpha = 1 / jnp.sqrt(sigma**2 + 1)
    sig = sigma * alpha
    if self.predict_x0:  # (the field shadows SchedulerBase.predict_x0, hence the explicit call)
      return base.SchedulerBase.predict_x0(self, model_output, x, alpha, sig)
    if self.prediction_type == "epsilon":
      return model_output
    if self.prediction_type == "sample":
      return (x - alpha * model_output) / sig
    return alpha * model_output + sig * x  # v_prediction

  def step(
      self,
      state: UniPCState,
      model_output: jax.Array,
      step_index: jax.Array | int,
      sample: jax.Array,
      key: jax.Array | None = None,
      *,
      noise: jax.Array | None = None,
  ) -> tuple[jax.Array, UniPCState]:
    """UniC on x_i (from step i - 1's prediction), then UniP to x_{i+1} (Zhao et al. Alg. 3).

    Args:
      state: from ``init_state`` or the previous step (carries the outputs and x_{i-1}).
      model_output: the model's prediction at x_i, shaped like ``sample``.
      step_index: i in [0, N), may be traced; steps must come in order (i = 0 first).
      sample: x_i.
      key: unused (deterministic).
      noise: unused.

    Returns:
      ``(x_{i+1}, state)`` with the history advanced.
    """
    del key, noise
    base.check_same_shape(model_output, sample, who="UniPCMultistepScheduler.step")
    i = step_index
    x = sample.astype(jnp.float32)
    m = self._convert(model_output.astype(jnp.float32), x, state.sigmas[i])
    prev = state.outputs  # m'_0 = output of step i - 1, m'_1 of step i - 2, ...
    # 1. UniC: x_i corrected with this step's output (no extra model call).
    c = state.corrector[i]
    corrected = c[0] * state.last_sample + c[1] * prev[0] + c[-1] * (m - prev[0])
    for k in range(1, self.solver_order):
      corrected = corrected + c[k + 1] * (prev[k] - prev[0])
    x = jnp.where(state.use_corrector[i], corrected, x)
    # 2. UniP from the corrected x_i and the outputs m, m'_0, ...
    outputs = (m,) + prev[:-1]
    p = state.predictor[i]
    prev_sample = p[0] * x + p[1] * m
    for k in range(1, self.solver_order):
      prev_sample = prev_sample + p[k + 1] * (outputs[k] - m)
    new_state = state._replace(outputs=outputs, last_sample=x)
    return prev_sample.astype(model_output.dtype), new_state
