"""DPM-Solver-2 in sigma as k-diffusion writes it (diffusers' ``KDPM2DiscreteScheduler`` and
``KDPM2AncestralDiscreteScheduler``).

Each of the N steps takes two model calls: an Euler step to the geometric midpoint
sigma_mid = sqrt(sigma_i sigma_next) (log-linear interpolation), then the step from sigma_i to
sigma_next with the derivative evaluated at the midpoint. The ancestral variant aims at
sigma_down and adds noise of std sigma_up (the ancestral split of the Euler ancestral sampler),
with the midpoint between sigma_i and sigma_down. The last step (to 0) is one Euler call, so a
run makes 2N - 1 calls; ``state.timesteps`` lists them as diffusers' ``scheduler.timesteps``.

Every call is x' = start + dt * (x - D(x; sigma_pred)) / sigma_pred (+ std * z), with the start
(the current sample, or the step's saved one), sigma_pred, dt and std tabulated per call.

References:
  Lu et al. 2022a, "DPM-Solver", Alg. 1 (DPM-Solver-2 with r_1 = 1/2: the midpoint in lambda,
  which for the VE ODE is the geometric mean of the sigmas); Karras et al. 2022, Eq. 4 (the
  ODE in sigma), Eq. 5 (``use_karras_sigmas``), Table 1 (input scaling); Song et al. 2021,
  "DDIM", Eq. 16 (the ancestral noise split, as in ``EulerAncestralDiscreteScheduler``).
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxadapt.diffusion import base, schedules
from jaxadapt.diffusion.euler import denoised, initial_sigma, karras_or_spaced_sigmas


class KDPM2State(NamedTuple):
  """Per-call tables of a KDPM2 run (M = 2N - 1 calls) and the saved sample of a step."""

  timesteps: jax.Array  # float32 [M] the model's timestep at each call.
  input_sigma: jax.Array  # float32 [M] the model sees x / sqrt(sigma^2 + 1) at this sigma.
  pred_sigma: jax.Array  # float32 [M] D(x; sigma) and the derivative use this sigma.
  dt: jax.Array  # float32 [M] the sigma increment of the update.
  noise_std: jax.Array  # float32 [M] std of the added noise (ancestral second calls only).
  first: jax.Array  # bool [M] the call starts a step (from x; saves it) or ends one.
  init_noise_sigma: jax.Array  # float32 [] std of the initial noise.
  saved_sample: jax.Array  # the sample where the current step started.


def _log_midpoint(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  """exp(lerp(log a, log b, 1/2)) in float32, as torch evaluates it (0 where either is 0)."""
  with np.errstate(divide="ignore", invalid="ignore"):
    la, lb = np.log(a.astype(np.float32)), np.log(b.astype(np.float32))
    return np.exp(lb - (lb - la) * np.float32(0.5)).astype(np.float32)


@dataclasses.dataclass(frozen=True, kw_only=True)
class KDPM2DiscreteScheduler(base.SchedulerBase):
  """KDPM2 (DPM-Solver-2 in sigma), equal to diffusers' ``KDPM2DiscreteScheduler``."""

  beta_start: float = 0.00085  # diffusers' KDPM2 defaults (the SD schedule's ends).
  beta_end: float = 0.012
  timestep_spacing: str = "linspace"
  use_karras_sigmas: bool = False  # Karras et al. Eq. 5 noise levels.
  use_exponential_sigmas: bool = False  # not supported.
  use_beta_sigmas: bool = False  # not supported.

  diffusers_class: ClassVar[str] = "KDPM2DiscreteScheduler"
  _choices: ClassVar[dict[str, tuple[Any, ...]]] = {
      **base.SchedulerBase._choices,
      "prediction_type": ("epsilon", "v_prediction", "sample"),
  }
  _only_default: ClassVar[dict[str, Any]] = {
      "use_exponential_sigmas": False,
      "use_beta_sigmas": False,
  }
  ancestral: ClassVar[bool] = False

  def _step_sigmas(self, num_steps: int):
    """(timesteps [N], sigmas float32 [N + 1] ending in 0, log training sigmas)."""
    ts, sigmas = karras_or_spaced_sigmas(self, num_steps, self.use_karras_sigmas)
    if self.use_karras_sigmas:
      ts = ts.round()
    log_sigmas = np.log(self.sigma_tables()[1])
    return ts, np.concatenate([sigmas, [0.0]]).astype(np.float32), log_sigmas

  def _tables(self, num_steps: int) -> dict[str, np.ndarray]:
    """Per-call tables (see ``KDPM2State``), replaying diffusers' interleaved indexing."""
    ts, s, log_sigmas = self._step_sigmas(num_steps)
    n = num_steps
    il = lambda a: np.concatenate([a[:1], np.repeat(a[1:], 2), a[-1:]])  # noqa: E731
    if not self.ancestral:
      mid = _log_midpoint(s, np.roll(s, 1))  # mid[j] between sigma_j and sigma_{j-1}
      ts_mid = schedules.sigma_to_t(mid, log_sigmas)[1:-1]
      S, I = il(s), il(mid)
      up = down = np.zeros_like(S)
    else:
      nxt = np.roll(s, -1)
      nxt[-1] = 0.0
      with np.errstate(divide="ignore", invalid="ignore"):
        up_j = np.sqrt(nxt**2 * (s**2 - nxt**2) / s**2).astype(np.float32)
        down_j = np.sqrt(nxt**2 - up_j**2).astype(np.float32)
      down_j[-1] = 0.0
      mid = _log_midpoint(s, down_j)  # mid[j] between sigma_j and its sigma_down
      mid[-2:] = 0.0
      ts_mid = schedules.sigma_to_t(mid, log_sigmas)[:-2]
      S, I, up, down = il(s), il(mid), il(up_j), il(down_j)
    calls = 2 * n - 1
    rows = {k: np.zeros(calls, np.float32) for k in ("input", "pred", "dt", "std")}
    first = np.zeros(calls, bool)
    for k in range(calls):
      first[k] = k % 2 == 0
      if self.ancestral:
        if first[k]:
          rows["input"][k] = rows["pred"][k] = S[k]
          rows["dt"][k] = I[k] - S[k]
        else:
          rows["input"][k] = rows["pred"][k] = I[k - 1]
          rows["dt"][k] = down[k - 1] - S[k - 1]
          rows["std"][k] = up[k - 1]
      elif first[k]:
        rows["input"][k] = rows["pred"][k] = S[k]
        rows["dt"][k] = I[k + 1] - S[k]
      else:
        rows["input"][k] = rows["pred"][k] = I[k]
        rows["dt"][k] = S[k] - S[k - 1]
    timesteps = np.empty(calls, np.float64)
    timesteps[0] = ts[0]
    timesteps[1::2], timesteps[2::2] = ts_mid, ts[1:]
    return dict(rows, first=first, timesteps=timesteps.astype(np.float32), sigmas=S)

  def set_timesteps(self, num_steps: int) -> np.ndarray:
    """float32 [2N - 1] call timesteps, equal to diffusers' ``set_timesteps``."""
    return self._tables(num_steps)["timesteps"]

  def init_state(self, num_steps: int, sample: jax.Array) -> KDPM2State:
    """The state of a ``num_steps`` run; ``sample`` (or an array of its shape) sizes it."""
    t = self._tables(num_steps)
    return KDPM2State(
        timesteps=jnp.asarray(t["timesteps"]), input_sigma=jnp.asarray(t["input"]),
        pred_sigma=jnp.asarray(t["pred"]), dt=jnp.asarray(t["dt"]),
        noise_std=jnp.asarray(t["std"]), first=jnp.asarray(t["first"]),
        init_noise_sigma=jnp.float32(initial_sigma(self, t["sigmas"])),
        saved_sample=jnp.zeros(sample.shape, jnp.float32))

  def scale_model_input(self, state: KDPM2State, sample: jax.Array, step_index) -> jax.Array:
    """x / sqrt(sigma^2 + 1) at the call's sigma (Karras Table 1)."""
    sigma = state.input_sigma[step_index]
    return (sample / jnp.sqrt(sigma**2 + 1)).astype(sample.dtype)

  def step(
      self,
      state: KDPM2State,
      model_output: jax.Array,
      step_index: jax.Array | int,
      sample: jax.Array,
      key: jax.Array | None = None,
      *,
      noise: jax.Array | None = None,
  ) -> tuple[jax.Array, KDPM2State]:
    """Call k: to the midpoint (k even), or the step with the midpoint's derivative (k odd).

    Args:
      state: from ``init_state`` or the previous call.
      model_output: the model's prediction on ``scale_model_input(state, sample, k)``.
      step_index: call index k in [0, 2N - 1), may be traced; calls must come in order.
      sample: the current (unscaled) sample.
      key: PRNG key of the ancestral noise (ancestral variant; drawn at the odd calls).
      noise: standard normal noise to use instead of drawing from ``key``.

    Returns:
      ``(next sample, state)``.
    """
    who = f"{self.diffusers_class}.step"
    base.check_same_shape(model_output, sample, who=who)
    k = step_index
    x = sample.astype(jnp.float32)
    sigma = state.pred_sigma[k]
    d = (x - denoised(self.prediction_type, model_output.astype(jnp.float32), x, sigma)) / sigma
    first = state.first[k]
    start = jnp.where(first, x, state.saved_sample)
    prev_sample = start + d * state.dt[k]
    if self.ancestral:
      prev_sample = prev_sample + state.noise_std[k] * base.gaussian_noise(key, noise, x, who=who)
    new_state = state._replace(saved_sample=jnp.where(first, x, state.saved_sample))
    return prev_sample.astype(model_output.dtype), new_state


@dataclasses.dataclass(frozen=True, kw_only=True)
class KDPM2AncestralDiscreteScheduler(KDPM2DiscreteScheduler):
  """Ancestral KDPM2, equal to diffusers' ``KDPM2AncestralDiscreteScheduler``: each step aims at
  sigma_down through the midpoint of sigma_i and sigma_down, then adds sigma_up z; a fixed key
  reproduces a run."""

  diffusers_class: ClassVar[str] = "KDPM2AncestralDiscreteScheduler"
  ancestral: ClassVar[bool] = True
