"""Noise-schedule tables: betas, cumulative alphas, timestep spacings and sigmas.

Everything here is host-side numpy, computed once per ``(config, num_steps)``. The numbers follow
diffusers' torch schedulers to the bit where that is cheap: betas are float32 like
``torch.linspace`` (a single rounding per element), and the cumulative product is accumulated
in float64 and rounded to float32, as torch's CPU ``cumprod`` does. The per-step arithmetic then
runs in JAX (float32).

References:
  Ho et al. 2020, "Denoising Diffusion Probabilistic Models", Sec. 2 (betas, alpha-bar).
  Nichol & Dhariwal 2021, "Improved DDPM", Eq. 17 (the cosine schedule, ``squaredcos_cap_v2``).
  Lin et al. 2024, "Common Diffusion Noise Schedules and Sample Steps are Flawed", Alg. 1 (zero
  terminal SNR) and Table 2 (timestep spacings ``linspace``/``leading``/``trailing``).
  Karras et al. 2022, "Elucidating the Design Space of Diffusion-Based Generative Models", Eq. 5.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from typing import Any

import numpy as np

from jaxadapt.io.files import read_json_object

SCHEDULER_CONFIG_NAME = "scheduler_config.json"


def read_scheduler_config(config: Mapping[str, Any] | str | os.PathLike) -> dict[str, Any]:
  """Reads a diffusers scheduler config.

  Args:
    config: a dict (e.g. ``pipe.scheduler.config``), a ``scheduler_config.json`` file, a folder
      holding one, or a diffusers pipeline folder holding ``scheduler/scheduler_config.json``.

  Returns:
    A new dict with the config's entries (including ``_class_name`` when present).

  Raises:
    FileNotFoundError: the path holds no scheduler config.
    TypeError: ``config`` is neither a mapping nor a path.
    ValueError: the file is not JSON, or holds something other than an object.
  """
  if isinstance(config, Mapping):
    return dict(config)
  if not isinstance(config, (str, os.PathLike)):
    raise TypeError(
        "Expected a scheduler config as a dict or a path to scheduler_config.json (or its folder);"
        f" got {type(config).__name__}."
    )
  path = os.fspath(config)
  if os.path.isdir(path):
    candidates = [
        os.path.join(path, SCHEDULER_CONFIG_NAME),
        os.path.join(path, "scheduler", SCHEDULER_CONFIG_NAME),
    ]
    found = [c for c in candidates if os.path.isfile(c)]
    if not found:
      raise FileNotFoundError(
          f"Expected {SCHEDULER_CONFIG_NAME} in {path!r} or in its 'scheduler/' folder; found"
          " neither. Pass the scheduler folder of a diffusers pipeline or the JSON file itself."
      )
    path = found[0]
  elif not os.path.isfile(path):
    raise FileNotFoundError(f"Scheduler config {path!r} does not exist.")
  return read_json_object(path, "a diffusers scheduler config (_class_name, beta_schedule, ...)")


def linspace_f32(start: float, stop: float, num: int) -> np.ndarray:
  """``num`` evenly spaced float32 values, rounded once per element like ``torch.linspace``.

  The first half counts up from ``start`` and the second half down from ``stop``, each element
  ``start + step * i`` evaluated exactly and rounded to float32 once.
  """
  start32, stop32 = np.float32(start), np.float32(stop)
  if num == 1:
    return np.array([start32], np.float32)
  step = np.float32((stop32 - start32) / np.float32(num - 1))
  i = np.arange(num)
  up = np.float64(start32) + np.float64(step) * i
  down = np.float64(stop32) - np.float64(step) * (num - 1 - i)
  return np.where(i < num // 2, up, down).astype(np.float32)


def cosine_betas(num_train_timesteps: int, max_beta: float = 0.999) -> np.ndarray:
  """Betas of the cosine schedule, Nichol & Dhariwal 2021 Eq. 17 (``squaredcos_cap_v2``)."""

  def alpha_bar(t: float) -> float:
    return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

  betas = [
      min(1 - alpha_bar((i + 1) / num_train_timesteps) / alpha_bar(i / num_train_timesteps),
          max_beta)
      for i in range(num_train_timesteps)
  ]
  return np.asarray(betas, np.float32)


def rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
  """Shifts and scales sqrt(alpha-bar) so the last step has zero SNR (Lin et al. 2024, Alg. 1)."""
  sqrt_ab = np.sqrt(np.cumprod((1.0 - betas).astype(np.float64)).astype(np.float32))
  first, last = sqrt_ab[0], sqrt_ab[-1]
  sqrt_ab = (sqrt_ab - last) * (first / (first - last))
  alpha_bar = sqrt_ab**2
  alphas = np.concatenate([alpha_bar[:1], alpha_bar[1:] / alpha_bar[:-1]])
  return (1.0 - alphas).astype(np.float32)


def make_betas(
    *,
    num_train_timesteps: int,
    beta_start: float,
    beta_end: float,
    beta_schedule: str,
    trained_betas: tuple[float, ...] | None,
    rescale_betas_zero_snr: bool,
) -> np.ndarray:
  """The training betas [T] as float32 (Ho et al. 2020 Sec. 4 for ``linear``).

  ``scaled_linear`` is linear in sqrt(beta) (the Stable Diffusion/LDM schedule).
  """
  if trained_betas is not None:
    betas = np.asarray(trained_betas, np.float32)
    if betas.shape != (num_train_timesteps,):
      raise ValueError(
          f"trained_betas must have num_train_timesteps={num_train_timesteps} entries; got"
          f" shape {betas.shape}."
      )
  elif beta_schedule == "linear":
    betas = linspace_f32(beta_start, beta_end, num_train_timesteps)
  elif beta_schedule == "scaled_linear":
    betas = linspace_f32(beta_start**0.5, beta_end**0.5, num_train_timesteps) ** 2
  elif beta_schedule == "squaredcos_cap_v2":
    betas = cosine_betas(num_train_timesteps)
  else:
    raise ValueError(
        f"beta_schedule={beta_schedule!r} is not supported; expected one of 'linear',"
        " 'scaled_linear', 'squaredcos_cap_v2'."
    )
  if rescale_betas_zero_snr:
    betas = rescale_zero_terminal_snr(betas)
  return betas


def alphas_cumprod(betas: np.ndarray) -> np.ndarray:
  """alpha-bar_t = prod_{s<=t} (1 - beta_s) (Ho et al. 2020, notation above Eq. 4), float32."""
  return np.cumprod((1.0 - betas).astype(np.float64)).astype(np.float32)


def spaced_timesteps(
    spacing: str, num_train_timesteps: int, num_steps: int, steps_offset: int = 0
) -> np.ndarray:
  """Descending integer timesteps for ``num_steps`` sampling steps (Lin et al. 2024, Table 2).

  Args:
    spacing: ``"linspace"`` (both ends included), ``"leading"`` (multiples of T // N, plus
      ``steps_offset``) or ``"trailing"`` (counting down from T - 1).
    num_train_timesteps: T.
    num_steps: N, at least 1 and at most T.
    steps_offset: added to ``leading`` timesteps only (as diffusers does).

  Returns:
    int64 [N] timesteps, largest first.
  """
  check_num_steps(num_steps, num_train_timesteps)
  if spacing == "linspace":
    ts = np.linspace(0, num_train_timesteps - 1, num_steps).round()[::-1].astype(np.int64)
  elif spacing == "leading":
    ratio = num_train_timesteps // num_steps
    ts = (np.arange(num_steps) * ratio).round()[::-1].astype(np.int64) + steps_offset
  elif spacing == "trailing":
    ratio = num_train_timesteps / num_steps
    ts = np.round(np.arange(num_train_timesteps, 0, -ratio)).astype(np.int64) - 1
  else:
    raise ValueError(
        f"timestep_spacing={spacing!r} is not supported; expected 'linspace', 'leading' or"
        " 'trailing'."
    )
  return ts.copy()


def check_num_steps(num_steps: int, num_train_timesteps: int) -> None:
  """Raises a ValueError unless 1 <= num_steps <= num_train_timesteps."""
  if not isinstance(num_steps, (int, np.integer)) or not 1 <= num_steps <= num_train_timesteps:
    raise ValueError(
        f"num_steps must be an int in [1, num_train_timesteps={num_train_timesteps}]; got"
        f" {num_steps!r}."
    )


def check_timesteps_in_range(timesteps: np.ndarray, num_train_timesteps: int, who: str) -> None:
  """Raises a ValueError if a timestep indexes past the training schedule (e.g. "leading"
  spacing with steps_offset=1 and num_steps=T gives t = T)."""
  if timesteps.size and (timesteps.max() >= num_train_timesteps or timesteps.min() < 0):
    raise ValueError(
        f"{who}: timesteps must lie in [0, {num_train_timesteps - 1}]; this config and num_steps"
        f" give {timesteps.min()}..{timesteps.max()}. Use fewer steps or a different"
        " timestep_spacing/steps_offset."
    )


def karras_sigmas(sigma_min: float, sigma_max: float, num_steps: int,
                  rho: float = 7.0) -> np.ndarray:
  """Noise levels of Karras et al. 2022 Eq. 5 (rho = 7), largest first, float64 [N]."""
  ramp = np.linspace(0, 1, num_steps)
  min_inv, max_inv = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
  return (max_inv + ramp * (min_inv - max_inv)) ** rho


def sigma_to_t(sigmas: np.ndarray, log_sigmas: np.ndarray) -> np.ndarray:
  """Fractional training timesteps whose sigma is ``sigmas``, interpolating linearly in log sigma.

  Args:
    sigmas: [n] noise levels.
    log_sigmas: [T] log of the training sigmas, increasing with t.

  Returns:
    float64 [n] timesteps in [0, T - 1].
  """
  log_sigma = np.log(np.maximum(np.asarray(sigmas, np.float64), 1e-10))
  # Index of the last training sigma not above each sigma (clipped so that low + 1 exists).
  low = np.clip(np.sum(log_sigma[None, :] - log_sigmas[:, None] >= 0, axis=0) - 1, 0,
                log_sigmas.shape[0] - 2)
  lo, hi = log_sigmas[low], log_sigmas[low + 1]
  w = np.clip((lo - log_sigma) / (lo - hi), 0, 1)
  return (1 - w) * low + w * (low + 1)
