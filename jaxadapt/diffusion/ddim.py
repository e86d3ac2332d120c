"""DDIM sampling (diffusers' ``DDIMScheduler``).

References:
  Song et al. 2021, "Denoising Diffusion Implicit Models": Eq. 12 (the generalized step) and
  Eq. 16 (sigma_t(eta); eta = 0 is deterministic DDIM, eta = 1 the DDPM variance).
  Salimans & Ho 2022, "Progressive Distillation", Sec. 4 (v-prediction).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from jaxadapt.diffusion import base, schedules


# alpha_prod_t_prev[i] is alpha-bar at t_i - T // N (see DDIMScheduler).
DDIMState = base.AlphaBarState


@dataclasses.dataclass(frozen=True, kw_only=True)
class DDIMScheduler(base.SchedulerBase):
  """DDIM sampler, equal to diffusers' ``DDIMScheduler`` (timesteps and each step).

  As in diffusers, the step from t_i targets t_i - T // N whatever the spacing (so with
  "trailing"/"linspace" spacing the target need not be t_{i+1}); a negative target uses
  ``final_alpha_cumprod`` (1 with ``set_alpha_to_one``, else alpha-bar_0).
  """

  clip_sample: bool = True  # clip the predicted x0 to [-clip_sample_range, clip_sample_range].
  clip_sample_range: float = 1.0
  set_alpha_to_one: bool = True  # alpha-bar "before t = 0" is 1 (else alpha-bar_0).
  thresholding: bool = False  # dynamic thresholding of x0 (Imagen); overrides clip_sample.
  dynamic_thresholding_ratio: float = 0.995
  sample_max_value: float = 1.0
  timestep_spacing: str = "leading"
  # Not scheduler_config.json options; diffusers takes them as ``step`` arguments.
  eta: float = 0.0  # Song et al. Eq. 16 weight of the noise; 0 is deterministic DDIM.
  use_clipped_model_output: bool = False  # recompute epsilon from the clipped x0.

  diffusers_class: ClassVar[str] = "DDIMScheduler"

  def __post_init__(self):
    super().__post_init__()
    if not self.eta >= 0:
      raise ValueError(f"DDIMScheduler: eta must be >= 0; got {self.eta!r}.")

  def set_timesteps(self, num_steps: int) -> np.ndarray:
    """int64 [N] timesteps, equal to diffusers' ``DDIMScheduler.set_timesteps(num_steps)``."""
    return schedules.spaced_timesteps(
        self.timestep_spacing, self.num_train_timesteps, num_steps, self.steps_offset)

  def init_state(self, num_steps: int, sample: jax.Array | None = None) -> DDIMState:
    """The state of a ``num_steps`` run. ``sample`` is unused (DDIM keeps no history)."""
    del sample
    ts = self.set_timesteps(num_steps)
    final = 1.0 if self.set_alpha_to_one else self.alphas_cumprod()[0]
    return self.alpha_bar_state(ts, ts - self.num_train_timesteps // num_steps, final)

  def add_noise(self, state, original: jax.Array, noise: jax.Array, step_index) -> jax.Array:
    """``original`` noised to timesteps[step_index] (see ``SchedulerBase.add_noise``)."""
    return base.alpha_bar_add_noise(state, original, noise, step_index)

  def step(
      self,
      state: DDIMState,
      model_output: jax.Array,
      step_index: jax.Array | int,
      sample: jax.Array,
      key: jax.Array | None = None,
      *,
      noise: jax.Array | None = None,
  ) -> tuple[jax.Array, DDIMState]:
    """One DDIM step (Song et al. 2021 Eq. 12).

    x_prev = sqrt(a_prev) x0 + sqrt(1 - a_prev - sigma^2) eps + sigma z, with
    sigma = eta sqrt((1 - a_prev) / (1 - a_t)) sqrt(1 - a_t / a_prev) (Eq. 16).

    Args:
      state: from ``init_state``.
      model_output: the model's prediction, shaped like ``sample``.
      step_index: i in [0, N), may be traced.
      sample: x_{t_i}.
      key: PRNG key for the noise; used only when ``eta > 0``.
      noise: standard normal noise to use instead of drawing from ``key``.

    Returns:
      ``(x_prev, state)``; the state is unchanged.
    """
    who = "DDIMScheduler.step"
    base.check_same_shape(model_output, sample, who=who)
    a_t = state.alpha_prod_t[step_index]
    a_prev = state.alpha_prod_t_prev[step_index]
    b_t = 1 - a_t

    # 1. Predicted x0 and epsilon ("predicted x0" and "direction" of Eq. 12); epsilon comes
    # from the unclipped x0 unless use_clipped_model_output.
    x0 = self.predict_x0(model_output, sample, jnp.sqrt(a_t), jnp.sqrt(b_t))
    if self.prediction_type == "epsilon" and not self.use_clipped_model_output:
      eps = model_output
    elif self.prediction_type == "v_prediction" and not self.use_clipped_model_output:
      eps = jnp.sqrt(a_t) * model_output + jnp.sqrt(b_t) * sample
    else:  # from x0: "sample" prediction (unclipped there) or the clipped x0
      x0_for_eps = model_output if not self.use_clipped_model_output else x0
      eps = (sample - jnp.sqrt(a_t) * x0_for_eps) / jnp.sqrt(b_t)

    # 2. sigma_t(eta) (Eq. 16) and the step (Eq. 12).
    variance = (1 - a_prev) / b_t * (1 - a_t / a_prev)
    std = self.eta * jnp.sqrt(variance)
    prev_sample = jnp.sqrt(a_prev) * x0 + jnp.sqrt(1 - a_prev - std**2) * eps
    if self.eta > 0:
      prev_sample = prev_sample + std * base.gaussian_noise(key, noise, sample, who=who)
    return prev_sample.astype(sample.dtype), state
