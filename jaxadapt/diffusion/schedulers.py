"""Scheduler lookup by diffusers class name, and the interface every scheduler shares.

Every scheduler (``DDPMScheduler``, ``DDIMScheduler``, ``PNDMScheduler``,
``EulerDiscreteScheduler``, ``EulerAncestralDiscreteScheduler``, ``HeunDiscreteScheduler``,
``LMSDiscreteScheduler``, ``KDPM2DiscreteScheduler``, ``KDPM2AncestralDiscreteScheduler``,
``DPMSolverMultistepScheduler``, ``DPMSolverSinglestepScheduler``, ``UniPCMultistepScheduler``,
``DEISMultistepScheduler``, ``EDMEulerScheduler``) is a frozen dataclass of config options
with:

- ``from_config(config, **overrides)``: from a diffusers ``scheduler_config.json`` (dict or path).
- ``set_timesteps(num_steps) -> np.ndarray``: the timesteps diffusers would use.
- ``init_state(num_steps, sample) -> state``: a pytree with ``timesteps`` [M] (one per model
  call: M = N for most, 2N - 1 for Heun and KDPM2, N + 1 or N + 9 for PNDM),
  ``init_noise_sigma`` [] and whatever the step needs (tables, multistep history).
- ``scale_model_input(state, sample, step_index)``: the model's input at step i.
- ``step(state, model_output, step_index, sample, key=None, *, noise=None)
  -> (prev_sample, state)``: pure and jit/scan-friendly; ``step_index`` may be traced.
- ``uses_learned_variance``: whether ``step`` wants the variance half of a 2C-channel output.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any, Union

from jaxadapt.diffusion import schedules
from jaxadapt.diffusion.ddim import DDIMScheduler
from jaxadapt.diffusion.ddpm import DDPMScheduler
from jaxadapt.diffusion.deis import DEISMultistepScheduler
from jaxadapt.diffusion.dpm_solver import DPMSolverMultistepScheduler
from jaxadapt.diffusion.dpm_solver_singlestep import DPMSolverSinglestepScheduler
from jaxadapt.diffusion.edm import EDMEulerScheduler
from jaxadapt.diffusion.euler import EulerAncestralDiscreteScheduler, EulerDiscreteScheduler
from jaxadapt.diffusion.heun import HeunDiscreteScheduler
from jaxadapt.diffusion.kdpm2 import KDPM2AncestralDiscreteScheduler, KDPM2DiscreteScheduler
from jaxadapt.diffusion.lms import LMSDiscreteScheduler
from jaxadapt.diffusion.pndm import PNDMScheduler
from jaxadapt.diffusion.unipc import UniPCMultistepScheduler

_ALL = (DDPMScheduler, DDIMScheduler, PNDMScheduler, EulerDiscreteScheduler,
        EulerAncestralDiscreteScheduler, HeunDiscreteScheduler, LMSDiscreteScheduler,
        KDPM2DiscreteScheduler, KDPM2AncestralDiscreteScheduler, DPMSolverMultistepScheduler,
        DPMSolverSinglestepScheduler, UniPCMultistepScheduler, DEISMultistepScheduler,
        EDMEulerScheduler)
Scheduler = Union[_ALL]

SCHEDULERS: dict[str, type] = {cls.diffusers_class: cls for cls in _ALL}


def scheduler_from_config(
    config: Mapping[str, Any] | str | os.PathLike, *, class_name: str | None = None, **overrides
) -> Scheduler:
  """Builds the scheduler a diffusers config names.

  Args:
    config: a dict, a ``scheduler_config.json`` path or a folder holding one.
    class_name: a diffusers class name to use instead of the config's ``_class_name`` (e.g.
      "DPMSolverMultistepScheduler" to swap the sampler, as ``Scheduler.from_config`` does in
      diffusers).
    **overrides: options replacing the config's.

  Returns:
    The scheduler.
  """
  cfg = schedules.read_scheduler_config(config)
  name = class_name or cfg.get("_class_name")
  if name not in SCHEDULERS:
    raise ValueError(
        f"Scheduler class {name!r} is not supported; jaxadapt has {sorted(SCHEDULERS)}. Pass"
        " class_name=... to build one of them from this config."
    )
  return SCHEDULERS[name].from_config(cfg, **overrides)
