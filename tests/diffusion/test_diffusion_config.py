"""Reading diffusers scheduler configs: files, folders, dispatch, and unsupported options."""
import dataclasses
import json
import re

import diffusers
import jax
import numpy as np
import pytest

import jaxadapt.diffusion as jd

SD = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1,
          clip_sample=False, set_alpha_to_one=False)


def test_reads_saved_config_from_file_folder_and_pipeline_folder(tmp_path):
  theirs = diffusers.DDIMScheduler.from_config(dict(SD, timestep_spacing="trailing"))
  theirs.save_config(tmp_path / "pipe" / "scheduler")  # writes scheduler_config.json
  for source in (tmp_path / "pipe", tmp_path / "pipe" / "scheduler",
                 str(tmp_path / "pipe" / "scheduler" / "scheduler_config.json")):
    ours = jd.scheduler_from_config(source)
    assert isinstance(ours, jd.DDIMScheduler)
    assert ours.timestep_spacing == "trailing" and ours.steps_offset == 1
    theirs.set_timesteps(20)
    np.testing.assert_array_equal(ours.set_timesteps(20), theirs.timesteps.numpy())
  with pytest.raises(FileNotFoundError, match="scheduler_config.json"):
    jd.DDIMScheduler.from_config(tmp_path)


def test_swapping_scheduler_class_ignores_other_schedulers_options():
  # A DDIM config (clip_sample, set_alpha_to_one...) builds an Euler scheduler, as in diffusers.
  cfg = dict(diffusers.DDIMScheduler.from_config(SD).config)
  ours = jd.scheduler_from_config(cfg, class_name="EulerDiscreteScheduler")
  theirs = diffusers.EulerDiscreteScheduler.from_config(cfg)
  theirs.set_timesteps(12)
  np.testing.assert_array_equal(ours.set_timesteps(12), theirs.timesteps.numpy())
  assert not hasattr(ours, "clip_sample")


@pytest.mark.parametrize("cls,option,value", [
    (jd.DDPMScheduler, "beta_schedule", "sigmoid"),
    (jd.DDPMScheduler, "variance_type", "fixed_large_log"),
    (jd.DDIMScheduler, "prediction_type", "flow_prediction"),
    (jd.DDIMScheduler, "timestep_spacing", "karras"),
    (jd.EulerDiscreteScheduler, "use_exponential_sigmas", True),
    (jd.EulerDiscreteScheduler, "interpolation_type", "log_linear"),
    (jd.DPMSolverMultistepScheduler, "algorithm_type", "deis"),
    (jd.DPMSolverMultistepScheduler, "solver_order", 4),
    (jd.DPMSolverMultistepScheduler, "use_lu_lambdas", True),
    (jd.DPMSolverMultistepScheduler, "use_flow_sigmas", True),
])
def test_unsupported_option_raises_naming_it(cls, option, value):
  with pytest.raises(ValueError, match=re.escape(f"{option}={value!r}")):
    cls.from_config({"_class_name": cls.diffusers_class, option: value})


def test_unsupported_class_and_bad_arguments():
  with pytest.raises(ValueError, match="'LCMScheduler' is not supported"):
    jd.scheduler_from_config({"_class_name": "LCMScheduler"})
  with pytest.raises(TypeError, match="unknown overrides"):
    jd.DDIMScheduler.from_config({}, etaa=1.0)
  with pytest.raises(ValueError, match="num_steps must be an int in"):
    jd.DDIMScheduler().set_timesteps(0)
  with pytest.raises(ValueError, match="trained_betas must have"):
    jd.DDIMScheduler(trained_betas=(0.1, 0.2)).init_state(4)


def test_config_round_trip_and_hashable():
  ours = jd.DPMSolverMultistepScheduler.from_config(json.loads(json.dumps(SD)))
  again = jd.scheduler_from_config(ours.config())
  assert again == ours and hash(again) == hash(ours)
  assert dataclasses.replace(ours, solver_order=3) != ours
  # Usable as a static jit argument.
  f = jax.jit(lambda s, x: x * s.num_train_timesteps, static_argnums=0)
  assert float(f(ours, 1.0)) == 1000.0
