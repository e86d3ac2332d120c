"""Pseudo numerical methods (diffusers' ``PNDMScheduler``): PLMS, with optional Runge-Kutta warm-up.

Every step is the "transfer" of PNDM Eq. 9 from x_t to x_{t - delta} with an epsilon that
combines the model's outputs: linear multistep (PLMS, Eq. 12) over the last four outputs, after a
warm-up that is either three pseudo Runge-Kutta steps (PRK, Eq. 13: four model calls each, 12 in
all) or, with ``skip_prk_steps`` (what Stable Diffusion 1.x ships), one pseudo improved-Euler step
(two model calls) followed by lower-order Adams-Bashforth weights. A run of N steps therefore
calls the model N + 1 (PLMS) or N + 9 (PRK then PLMS) times; ``state.timesteps`` lists each call's
timestep, as diffusers' ``scheduler.timesteps`` does.

Which outputs are combined, from which sample, at which step is fixed by the step count, so
``init_state`` tabulates it (replaying diffusers' counter logic once, on the host) and ``step``
is one formula over those tables: scan-friendly with a traced step index.

References:
  Liu et al. 2022, "Pseudo Numerical Methods for Diffusion Models on Manifolds" (ICLR):
  Eq. 9 (the transfer phi), Eq. 12 (PLMS: (55 e_t - 59 e_{t-d} + 37 e_{t-2d} - 9 e_{t-3d}) / 24),
  Eq. 13 (PRK), Alg. 1-2; the lower-order Adams-Bashforth warm-up weights (1; 3/2, -1/2;
  23/12, -16/12, 5/12) as diffusers applies them.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxadapt.diffusion import base, schedules


class PNDMState(NamedTuple):
  """Per-call tables and the multistep history of a PNDM run; M model calls."""

  timesteps: jax.Array  # int32 [M] the model's timestep at each call.
  alpha_prod_t: jax.Array  # float32 [M] alpha-bar where the transfer starts.
  alpha_prod_t_prev: jax.Array  # float32 [M] alpha-bar where it ends.
  eps_coef: jax.Array  # float32 [M, 5] epsilon = c . (output, h0, h1, h2, running RK sum).
  push: jax.Array  # bool [M] the output joins the history (h0, h1, h2 shift).
  acc_keep: jax.Array  # float32 [M] the running RK sum is kept (1) or reset (0) ...
  acc_add: jax.Array  # float32 [M] ... and this multiple of the output added.
  from_saved: jax.Array  # bool [M] the transfer starts at the saved sample, not the current one.
  save_sample: jax.Array  # bool [M] the current sample is saved.
  init_noise_sigma: jax.Array  # float32 [] (1).
  history: tuple[jax.Array, jax.Array, jax.Array]  # the last three pushed outputs, newest first.
  acc: jax.Array  # the running Runge-Kutta sum of outputs (PRK), sample-shaped.
  saved_sample: jax.Array  # the sample a PRK / improved-Euler step starts from.


@dataclasses.dataclass(frozen=True, kw_only=True)
class PNDMScheduler(base.SchedulerBase):
  """PNDM / PLMS sampler, equal to diffusers' ``PNDMScheduler`` (timesteps and every call)."""

  skip_prk_steps: bool = False  # PLMS only (one improved-Euler warm-up step); SD 1.x sets True.
  set_alpha_to_one: bool = False  # alpha-bar "before t = 0" is 1 (else alpha-bar_0).
  timestep_spacing: str = "leading"

  diffusers_class: ClassVar[str] = "PNDMScheduler"
  _choices: ClassVar[dict[str, tuple[Any, ...]]] = {
      **base.SchedulerBase._choices,
      "prediction_type": ("epsilon", "v_prediction"),
  }

  def _base_timesteps(self, num_steps: int) -> np.ndarray:
    """The N step timesteps, ascending, as diffusers' ``_timesteps``."""
    return schedules.spaced_timesteps(
        self.timestep_spacing, self.num_train_timesteps, num_steps, self.steps_offset)[::-1].copy()

  def _plan(self, num_steps: int):
    """Replays diffusers' counter logic: per call (timestep, from, to, epsilon weights, ...)."""
    ts = self._base_timesteps(num_steps)
    ratio = self.num_train_timesteps // num_steps
    rows = []  # (model t, transfer from t, transfer to t, coef[5], push, keep, add, saved, save)
    if self.skip_prk_steps:
      prk = np.array([], np.int64)
      plms = np.concatenate([ts[:-1], ts[-2:-1], ts[-1:]])[::-1]
    else:
      if num_steps < 4:  # (diffusers fails there with a numpy broadcasting error)
        raise ValueError(f"PNDMScheduler: the Runge-Kutta warm-up needs num_steps >= 4; got"
                         f" {num_steps}. Use more steps or skip_prk_steps=True (PLMS only).")
      prk = np.repeat(ts[-4:], 2) + np.tile([0, ratio // 2], 4)
      prk = np.repeat(prk[:-1], 2)[1:-1][::-1]
      plms = ts[:-3][::-1]
    # 1. Pseudo Runge-Kutta (Eq. 13): four calls per step; weights 1/6, 1/3, 1/3, 1/6.
    for c, t in enumerate(prk):
      r = c % 4
      start = int(prk[c // 4 * 4])
      to = int(t) - (0 if c % 2 else ratio // 2)
      coef = [1, 0, 0, 0, 0] if r < 3 else [1 / 6, 0, 0, 0, 1]
      add = (1 / 6, 1 / 3, 1 / 3, 0)[r]
      rows.append((t, start, to, coef, r == 0, float(r != 3), add, True, r == 0))
    # 2. Linear multistep (Eq. 12), warmed up by lower orders when PRK is skipped.
    pushed = 3 if len(prk) else 0
    for j, t in enumerate(plms):
      c = len(prk) + j
      t, start, to = int(t), int(t), int(t) - ratio
      if c == 1:  # improved Euler: the mean of both outputs, from the saved sample
        rows.append((t, t + ratio, t, [0.5, 0.5, 0, 0, 0], False, 1.0, 0.0, True, False))
        continue
      n = min(pushed + 1, 4)
      coef = {1: [1, 0, 0, 0], 2: [3 / 2, -1 / 2, 0, 0], 3: [23 / 12, -16 / 12, 5 / 12, 0],
              4: [55 / 24, -59 / 24, 37 / 24, -9 / 24]}[n]
      rows.append((t, start, to, coef + [0], True, 1.0, 0.0, False, c == 0))
      pushed += 1
    return rows

  def set_timesteps(self, num_steps: int) -> np.ndarray:
    """int64 [M] timesteps of every model call, equal to diffusers' ``set_timesteps``."""
    schedules.check_num_steps(num_steps, self.num_train_timesteps)
    return np.asarray([r[0] for r in self._plan(num_steps)], np.int64)

  def init_state(self, num_steps: int, sample: jax.Array) -> PNDMState:
    """The state of a ``num_steps`` run; ``sample`` (or an array of its shape) sizes the history."""
    schedules.check_num_steps(num_steps, self.num_train_timesteps)
    rows = self._plan(num_steps)
    col = lambda k, dtype: np.asarray([r[k] for r in rows], dtype)  # noqa: E731
    starts, targets = col(1, np.int64), col(2, np.int64)
    schedules.check_timesteps_in_range(starts, self.num_train_timesteps, "PNDMScheduler")
    ac = self.alphas_cumprod()
    final = np.float32(1.0) if self.set_alpha_to_one else ac[0]
    a_prev = np.where(targets >= 0, ac[np.maximum(targets, 0)], final).astype(np.float32)
    zeros = jnp.zeros(sample.shape, jnp.float32)
    return PNDMState(
        timesteps=jnp.asarray(col(0, np.int64), jnp.int32),
        alpha_prod_t=jnp.asarray(ac[starts]),
        alpha_prod_t_prev=jnp.asarray(a_prev),
        eps_coef=jnp.asarray(col(3, np.float32)),
        push=jnp.asarray(col(4, bool)),
        acc_keep=jnp.asarray(col(5, np.float32)),
        acc_add=jnp.asarray(col(6, np.float32)),
        from_saved=jnp.asarray(col(7, bool)),
        save_sample=jnp.asarray(col(8, bool)),
        init_noise_sigma=jnp.float32(1.0),
        history=(zeros, zeros, zeros),
        acc=zeros,
        saved_sample=zeros,
    )

  def step(
      self,
      state: PNDMState,
      model_output: jax.Array,
      step_index: jax.Array | int,
      sample: jax.Array,
      key: jax.Array | None = None,
      *,
      noise: jax.Array | None = None,
  ) -> tuple[jax.Array, PNDMState]:
    """One model call's update: combine the outputs, then transfer (PNDM Eq. 9).

    phi(x_t, e, t, t') = sqrt(a' / a) x_t - (a' - a) e / (a sqrt(1 - a') + sqrt(a (1 - a) a'))
    with a = alpha-bar_t, a' = alpha-bar_{t'}.

    Args:
      state: from ``init_state`` or the previous call (carries the history).
      model_output: the model's prediction at ``state.timesteps[i]``, shaped like ``sample``.
      step_index: call index i in [0, M), may be traced; calls must come in order.
      sample: the current sample.
      key: unused (deterministic).
      noise: unused.

    Returns:
      ``(next sample, state)`` with the history advanced.
    """
    del key, noise
    base.check_same_shape(model_output, sample, who="PNDMScheduler.step")
    i = step_index
    e = model_output.astype(jnp.float32)
    x = sample.astype(jnp.float32)
    h0, h1, h2 = state.history
    c = state.eps_coef[i]
    # 1. The epsilon this call transfers with (Eq. 12 / 13 weights, tabulated).
    eps = c[0] * e + c[1] * h0 + c[2] * h1 + c[3] * h2 + c[4] * state.acc
    saved = jnp.where(state.save_sample[i], x, state.saved_sample)
    x_from = jnp.where(state.from_saved[i], saved, x)
    a_t, a_prev = state.alpha_prod_t[i], state.alpha_prod_t_prev[i]
    if self.prediction_type == "v_prediction":  # epsilon from v (Salimans & Ho 2022 Sec. 4)
      eps = jnp.sqrt(a_t) * eps + jnp.sqrt(1 - a_t) * x_from
    # 2. The transfer phi (Eq. 9).
    denom = a_t * jnp.sqrt(1 - a_prev) + jnp.sqrt(a_t * (1 - a_t) * a_prev)
    prev_sample = jnp.sqrt(a_prev / a_t) * x_from - (a_prev - a_t) * eps / denom
    push = state.push[i]
    history = tuple(jnp.where(push, new, old) for new, old in zip((e, h0, h1), (h0, h1, h2)))
    new_state = state._replace(
        history=history, acc=state.acc_keep[i] * state.acc + state.acc_add[i] * e,
        saved_sample=saved)
    return prev_sample.astype(sample.dtype), new_state
