"""Timestep and sigma tables equal diffusers' ``set_timesteps`` for each scheduler and spacing."""
import diffusers
import numpy as np
import pytest

import jaxadapt.diffusion as jd

SD = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
COS = dict(beta_schedule="squaredcos_cap_v2")
CLASSES = ["DDPMScheduler", "DDIMScheduler", "EulerDiscreteScheduler",
           "DPMSolverMultistepScheduler"]


def _pair(name, cfg):
  return jd.SCHEDULERS[name].from_config(cfg), getattr(diffusers, name).from_config(cfg)


@pytest.mark.parametrize("name", CLASSES)
@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("steps_offset", [0, 1])
def test_timesteps_equal_diffusers(name, spacing, steps_offset):
  for betas in ({}, SD):
    cfg = dict(betas, timestep_spacing=spacing, steps_offset=steps_offset)
    ours, theirs = _pair(name, cfg)
    for n in (1, 7, 10, 25, 50, 999, 1000):
      theirs.set_timesteps(n)
      expected = theirs.timesteps.numpy()
      got = ours.set_timesteps(n)
      assert got.shape == expected.shape, (cfg, n)
      np.testing.assert_array_equal(got, expected, err_msg=f"{cfg} n={n}")
      if expected.max() >= 1000 and name in ("DDPMScheduler", "DDIMScheduler"):
        # leading + steps_offset=1 at n=T gives t=T: diffusers' step fails, we refuse up front.
        with pytest.raises(ValueError, match="timesteps must lie in"):
          ours.init_state(n)
        continue
      state = ours.init_state(n, np.zeros((1, 1), np.float32))
      np.testing.assert_array_equal(np.asarray(state.timesteps), expected.astype(np.float32))
      np.testing.assert_allclose(float(state.init_noise_sigma), float(theirs.init_noise_sigma),
                                 rtol=1e-6)
      if hasattr(state, "sigmas"):
        np.testing.assert_allclose(np.asarray(state.sigmas), theirs.sigmas.numpy(), rtol=1e-6)


@pytest.mark.parametrize("name,cfg", [
    ("EulerDiscreteScheduler", dict(SD, use_karras_sigmas=True)),
    ("EulerDiscreteScheduler", dict(SD, use_karras_sigmas=True, sigma_min=0.1, sigma_max=10.0)),
    ("EulerDiscreteScheduler", dict(SD, final_sigmas_type="sigma_min")),
    ("EulerDiscreteScheduler", dict(SD, timestep_type="continuous",
                                    prediction_type="v_prediction")),
    ("EulerDiscreteScheduler", dict(SD, rescale_betas_zero_snr=True, timestep_spacing="trailing")),
    ("DPMSolverMultistepScheduler", dict(SD, use_karras_sigmas=True)),
    ("DPMSolverMultistepScheduler", dict(COS, use_karras_sigmas=True)),
    ("DPMSolverMultistepScheduler", dict(COS, lambda_min_clipped=-5.1)),
    ("DPMSolverMultistepScheduler", dict(SD, final_sigmas_type="sigma_min",
                                         timestep_spacing="leading", steps_offset=1)),
    ("DPMSolverMultistepScheduler", dict(SD, rescale_betas_zero_snr=True,
                                         timestep_spacing="trailing")),
    ("DDIMScheduler", dict(trained_betas=np.linspace(1e-4, 0.03, 1000).tolist())),
    ("DDPMScheduler", dict(beta_schedule="squaredcos_cap_v2", timestep_spacing="trailing")),
])
def test_sigma_tables_equal_diffusers(name, cfg):
  ours, theirs = _pair(name, cfg)
  for n in (4, 10, 30):
    theirs.set_timesteps(n)
    state = ours.init_state(n, np.zeros((1, 1), np.float32))
    np.testing.assert_allclose(ours.set_timesteps(n), theirs.timesteps.numpy(), rtol=1e-6,
                               atol=1e-6, err_msg=f"{cfg} n={n}")
    np.testing.assert_allclose(np.asarray(state.timesteps),
                               theirs.timesteps.numpy().astype(np.float32), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(float(state.init_noise_sigma), float(theirs.init_noise_sigma),
                               rtol=1e-6)
    if hasattr(state, "sigmas"):
      np.testing.assert_allclose(np.asarray(state.sigmas), theirs.sigmas.numpy(), rtol=1e-6)


@pytest.mark.parametrize("beta_schedule", ["linear", "scaled_linear", "squaredcos_cap_v2"])
@pytest.mark.parametrize("zero_snr", [False, True])
def test_alphas_cumprod_equal_diffusers(beta_schedule, zero_snr):
  cfg = dict(SD, beta_schedule=beta_schedule, rescale_betas_zero_snr=zero_snr)
  ours, theirs = _pair("DDIMScheduler", cfg)
  np.testing.assert_allclose(ours.alphas_cumprod(), theirs.alphas_cumprod.numpy(), rtol=1e-6,
                             atol=1e-9)
