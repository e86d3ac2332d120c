"""DDPM ancestral sampling (diffusers' ``DDPMScheduler``), including DiT's learned variance.

References:
  Ho et al. 2020, "Denoising Diffusion Probabilistic Models": Eq. 15 (x0 from epsilon), Eq. 6-7
  (the posterior q(x_{t-1} | x_t, x0): mean coefficients and beta-tilde), Sec. 3.2 (fixed
  variances sigma_t^2 = beta-tilde_t, "fixed_small", or beta_t, "fixed_large").
  Nichol & Dhariwal 2021, "Improved DDPM", Eq. 15 (learned variance interpolating log beta and
  log beta-tilde: "learned_range", as DiT, Peebles & Xie 2023, uses).
  Salimans & Ho 2022, "Progressive Distillation", Sec. 4 (v-prediction).
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from jaxadapt.diffusion import base, schedules


# alpha_prod_t_prev[i] is alpha-bar at t_{i+1}, and 1 after the last step.
DDPMState = base.AlphaBarState


@dataclasses.dataclass(frozen=True, kw_only=True)
class DDPMScheduler(base.SchedulerBase):
  """Ancestral DDPM sampler, equal to diffusers' ``DDPMScheduler`` (timesteps and each step).

  ``variance_type`` "learned_range" (DiT): the model outputs 2C channels; the second half v in
  [-1, 1] gives log sigma_t^2 = (v + 1) / 2 * log beta_t + (1 - v) / 2 * log beta-tilde_t
  (Improved DDPM Eq. 15), with beta_t taken between the two sampled timesteps.
  """

  variance_type: str = "fixed_small"  # see the class docstring; "fixed_large_log" is rejected.
  clip_sample: bool = True  # clip the predicted x0 to [-clip_sample_range, clip_sample_range].
  clip_sample_range: float = 1.0
  thresholding: bool = False  # dynamic thresholding of x0 (Imagen); overrides clip_sample.
  dynamic_thresholding_ratio: float = 0.995
  sample_max_value: float = 1.0
  timestep_spacing: str = "leading"

  diffusers_class: ClassVar[str] = "DDPMScheduler"
  _custom_schedules: ClassVar[tuple[str, ...]] = ("timesteps",)
  _choices: ClassVar[dict[str, tuple[Any, ...]]] = {
      **base.SchedulerBase._choices,
      # diffusers' "fixed_large_log" takes the square root of log(beta) < 0 and so yields NaN.
      "variance_type": ("fixed_small", "fixed_small_log", "fixed_large", "learned",
                        "learned_range"),
  }

  @property
  def uses_learned_variance(self) -> bool:
    return self.variance_type in ("learned", "learned_range")

  def set_timesteps(self, num_steps: int) -> np.ndarray:
    """int64 [N] timesteps, equal to diffusers' ``DDPMScheduler.set_timesteps(num_steps)``."""
    custom = self.custom_schedule(num_steps)
    if custom is not None:  # diffusers' set_timesteps(timesteps=...): descending, below T
      ts = custom[1].astype(np.int64)
      if (np.diff(ts) >= 0).any() or ts[0] >= self.num_train_timesteps:
        raise ValueError(f"DDPMScheduler: custom timesteps must be descending and below"
                         f" num_train_timesteps={self.num_train_timesteps}; got {ts.tolist()}.")
      return ts
    return schedules.spaced_timesteps(
        self.timestep_spacing, self.num_train_timesteps, num_steps, self.steps_offset)

  def init_state(self, num_steps: int, sample: jax.Array | None = None) -> DDPMState:
    """The state of a ``num_steps`` run. ``sample`` is unused (DDPM keeps no history)."""
    del sample
    ts = self.set_timesteps(num_steps)
    return self.alpha_bar_state(ts, np.concatenate([ts[1:], [-1]]), 1.0)

  def add_noise(self, state, original: jax.Array, noise: jax.Array, step_index) -> jax.Array:
    """``original`` noised to timesteps[step_index] (see ``SchedulerBase.add_noise``)."""
    return base.alpha_bar_add_noise(state, original, noise, step_index)

  def step(
      self,
      state: DDPMState,
      model_output: jax.Array,
      step_index: jax.Array | int,
      sample: jax.Array,
      key: jax.Array | None = None,
      *,
      noise: jax.Array | None = None,
  ) -> tuple[jax.Array, DDPMState]:
    """One ancestral step x_{t_i} -> x_{t_{i+1}} ~ p(x_{t_{i+1}} | x_{t_i}).

    Args:
      state: from ``init_state``.
      model_output: the model's prediction at (sample, timesteps[step_index]); with a learned
        variance it has 2C channels (prediction half first), on any one axis.
      step_index: i in [0, N), may be traced.
      sample: x_{t_i}.
      key: PRNG key for the added noise (not used on the step at t = 0).
      noise: standard normal noise to use instead of drawing from ``key`` (tests, inversion).

    Returns:
      ``(x_{t_{i+1}}, state)``; the state is unchanged.
    """
    who = "DDPMScheduler.step"
    if self.uses_learned_variance:
      model_output, predicted_variance = base.split_learned_variance(model_output, sample, who=who)
      if predicted_variance is None:
        raise ValueError(
            f"{who}: variance_type={self.variance_type!r} needs a model output with twice the"
            f" sample's channels; got the sample's shape {tuple(sample.shape)}."
        )
    else:
      base.check_same_shape(model_output, sample, who=who)
      predicted_variance = None
    t = state.timesteps[step_index]
    a_t = state.alpha_prod_t[step_index]
    a_prev = state.alpha_prod_t_prev[step_index]
    b_t, b_prev = 1 - a_t, 1 - a_prev
    cur_alpha = a_t / a_prev  # alpha between the two sampled timesteps
    cur_beta = 1 - cur_alpha

    # 1. Predicted x0 (Ho et al. Eq. 15 for epsilon), clipped or thresholded per the config.
    x0 = self.predict_x0(model_output, sample, jnp.sqrt(a_t), jnp.sqrt(b_t))

    # 2. Posterior mean mu-tilde(x_t, x0) (Ho et al. Eq. 7).
    mean = (jnp.sqrt(a_prev) * cur_beta / b_t) * x0 + (jnp.sqrt(cur_alpha) * b_prev / b_t) * sample

    # 3. Posterior std: beta-tilde (Eq. 7), beta, or the learned interpolation (IDDPM Eq. 15).
    beta_tilde = jnp.maximum(b_prev / b_t * cur_beta, 1e-20)
    if self.variance_type == "fixed_small":
      std = jnp.sqrt(beta_tilde)
    elif self.variance_type == "fixed_small_log":
      std = jnp.exp(0.5 * jnp.log(beta_tilde))
    elif self.variance_type == "fixed_large":
      std = jnp.sqrt(cur_beta)
    elif self.variance_type == "learned":
      std = jnp.sqrt(predicted_variance)
    else:  # "learned_range"
      frac = (predicted_variance + 1) / 2
      log_var = frac * jnp.log(cur_beta) + (1 - frac) * jnp.log(beta_tilde)
      std = jnp.exp(0.5 * log_var)

    # 4. Ancestral noise, except when stepping from t = 0 (Ho et al. Alg. 2, line 3).
    z = base.gaussian_noise(key, noise, mean, who=who)
    prev_sample = mean + jnp.where(t > 0, std, 0.0) * z
    return prev_sample.astype(sample.dtype), state
