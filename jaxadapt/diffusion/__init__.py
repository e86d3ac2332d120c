"""Noise schedulers, classifier-free guidance and sampling loops, in JAX.

The schedulers read diffusers' ``scheduler_config.json`` and reproduce diffusers' torch schedulers
(timesteps and every step); ``step`` is pure, so a sampling run is one ``lax.scan``.
"""

from jaxadapt.diffusion.ddim import DDIMScheduler, DDIMState
from jaxadapt.diffusion.ddpm import DDPMScheduler, DDPMState
from jaxadapt.diffusion.deis import DEISMultistepScheduler, DEISState
from jaxadapt.diffusion.dpm_solver import DPMSolverMultistepScheduler, DPMSolverState
from jaxadapt.diffusion.dpm_solver_singlestep import (DPMSolverSinglestepScheduler,
                                                      DPMSolverSinglestepState)
from jaxadapt.diffusion.edm import EDMEulerScheduler
from jaxadapt.diffusion.euler import (EulerAncestralDiscreteScheduler, EulerDiscreteScheduler,
                                      EulerState)
from jaxadapt.diffusion.heun import HeunDiscreteScheduler, HeunState
from jaxadapt.diffusion.kdpm2 import (KDPM2AncestralDiscreteScheduler, KDPM2DiscreteScheduler,
                                      KDPM2State)
from jaxadapt.diffusion.lms import LMSDiscreteScheduler, LMSState
from jaxadapt.diffusion.pndm import PNDMScheduler, PNDMState
from jaxadapt.diffusion.unipc import UniPCMultistepScheduler, UniPCState
from jaxadapt.diffusion.guidance import cfg_combine, guide_model_output
from jaxadapt.diffusion.images import save_image_grid, to_uint8
from jaxadapt.diffusion.pipeline import DiTPipeline, StableDiffusionPipeline, load_pipeline
from jaxadapt.diffusion.sampling import sample
from jaxadapt.diffusion.schedulers import SCHEDULERS, Scheduler, scheduler_from_config

__all__ = [
    "DDIMScheduler", "DDIMState", "DDPMScheduler", "DDPMState", "DEISMultistepScheduler",
    "DEISState", "DPMSolverMultistepScheduler", "DPMSolverSinglestepScheduler",
    "DPMSolverSinglestepState", "DPMSolverState", "DiTPipeline", "EDMEulerScheduler",
    "EulerAncestralDiscreteScheduler", "EulerDiscreteScheduler", "EulerState",
    "HeunDiscreteScheduler", "HeunState", "KDPM2AncestralDiscreteScheduler",
    "KDPM2DiscreteScheduler", "KDPM2State", "LMSDiscreteScheduler", "LMSState",
    "PNDMScheduler", "PNDMState", "SCHEDULERS", "Scheduler", "StableDiffusionPipeline",
    "UniPCMultistepScheduler", "UniPCState", "cfg_combine", "guide_model_output",
    "load_pipeline", "sample", "save_image_grid", "scheduler_from_config", "to_uint8",
]
