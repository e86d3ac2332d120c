"""10-step trajectories equal diffusers' from the same noise with the same fake model.

jaxadapt's steps run inside one jitted ``lax.scan`` (traced step index, history in the state);
diffusers' run in its usual Python loop. Stochastic steps get the same noise on both sides.
Tolerance: |ours - diffusers| <= 1e-4 + 1e-6 |diffusers| at every step.
"""
import diffusers
import diffusers.schedulers.scheduling_ddpm as diffusers_ddpm
import jax
import numpy as np
import pytest
import torch

import jaxadapt.diffusion as jd
from _diffusion_helpers import SHAPE, initial_noise, run_diffusers, run_jax

SD = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1,
          clip_sample=False, set_alpha_to_one=False)
V = dict(prediction_type="v_prediction")
N = 10


def _assert_close(ours, theirs):
  assert ours.shape == theirs.shape
  np.testing.assert_allclose(ours, theirs, rtol=1e-6, atol=1e-4)
  assert np.abs(theirs).max() > 0.1  # the trajectory is not trivially zero


def _compare(name, cfg, *, learned_sigma=False, num_steps=N, monkeypatch=None, **overrides):
  ours = jd.SCHEDULERS[name].from_config(cfg, **overrides)
  theirs = getattr(diffusers, name).from_config(cfg)
  x = initial_noise(0)
  noises = np.stack([initial_noise(100 + i) for i in range(num_steps)])
  step_kwargs = {}
  if name == "DDPMScheduler":  # diffusers draws with randn_tensor when t > 0: hand it ours.
    ts = theirs.__class__.from_config(cfg)
    ts.set_timesteps(num_steps)
    queue = [torch.from_numpy(noises[i]) for i, t in enumerate(ts.timesteps) if t > 0]
    monkeypatch.setattr(diffusers_ddpm, "randn_tensor", lambda *a, **k: queue.pop(0))
  if name == "DDIMScheduler":
    step_kwargs = dict(eta=overrides.get("eta", 0.0),
                       use_clipped_model_output=overrides.get("use_clipped_model_output", False))
    if step_kwargs["eta"] > 0:
      step_kwargs["variance_noise"] = None  # filled per step by run_diffusers
  expected = run_diffusers(theirs, num_steps, x, learned_sigma=learned_sigma,
                           noises=noises, step_kwargs=step_kwargs)
  got = run_jax(ours, num_steps, x, learned_sigma=learned_sigma, noises=noises)
  _assert_close(got, expected)


@pytest.mark.parametrize("cfg,learned", [
    ({}, False),  # linear betas, epsilon, fixed_small, clip_sample=True
    (SD, False),
    (dict(SD, **V), False),
    (dict(V, timestep_spacing="trailing"), False),
    (dict(beta_schedule="squaredcos_cap_v2", clip_sample=False), False),
    (dict(SD, variance_type="fixed_small_log"), False),
    (dict(SD, variance_type="fixed_large", timestep_spacing="linspace"), False),
    (dict(SD, thresholding=True, sample_max_value=2.0), False),
    # DiT: linear betas, 2C-channel output, log variance interpolated (learned_range).
    (dict(clip_sample=False, variance_type="learned_range"), True),
    (dict(clip_sample=False, variance_type="learned_range", steps_offset=1), True),  # noise at t=1
])
def test_ddpm_matches_diffusers(cfg, learned, monkeypatch):
  _compare("DDPMScheduler", cfg, learned_sigma=learned, monkeypatch=monkeypatch)


@pytest.mark.parametrize("cfg,overrides", [
    ({}, {}),
    (SD, {}),
    (dict(SD, **V), {}),
    (dict(SD, **V, timestep_spacing="trailing", rescale_betas_zero_snr=True), {}),
    (dict(SD, timestep_spacing="linspace"), {}),
    (dict(SD, set_alpha_to_one=True), dict(eta=1.0)),
    (dict(SD, **V), dict(eta=0.5)),
    (dict(clip_sample=True), dict(use_clipped_model_output=True)),
    (dict(SD, thresholding=True, sample_max_value=1.5), {}),
])
def test_ddim_matches_diffusers(cfg, overrides):
  _compare("DDIMScheduler", cfg, **overrides)


@pytest.mark.parametrize("cfg", [
    {},
    SD,
    dict(SD, **V),
    dict(**V, timestep_spacing="leading"),
    dict(SD, timestep_spacing="trailing"),
    dict(SD, use_karras_sigmas=True),
    dict(SD, final_sigmas_type="sigma_min"),
    dict(SD, **V, timestep_type="continuous"),
    # (not squaredcos_cap_v2: its sigma_max ~ 1e4 leaves float32 ~1e-3 absolute precision.)
    dict(SD, prediction_type="sample"),
])
def test_euler_matches_diffusers(cfg):
  _compare("EulerDiscreteScheduler", cfg)


@pytest.mark.parametrize("cfg,num_steps", [
    ({}, N),
    (SD, N),
    (dict(SD, **V), N),
    (dict(SD, solver_type="heun"), N),
    (dict(SD, solver_order=1), N),
    (dict(SD, solver_order=3), N),
    (dict(SD, **V, solver_order=3, lower_order_final=False), N),
    (dict(SD, lower_order_final=False, final_sigmas_type="sigma_min"), N),
    (dict(SD, euler_at_final=True, final_sigmas_type="sigma_min"), 16),
    (dict(SD, final_sigmas_type="sigma_min"), 16),  # >= 15 steps: second order to the end
    (dict(SD, use_karras_sigmas=True), N),
    (dict(SD, timestep_spacing="trailing", **V), N),
    (dict(SD, timestep_spacing="leading"), N),
    (dict(beta_schedule="squaredcos_cap_v2", lambda_min_clipped=-5.1), N),
    (dict(SD, prediction_type="sample", thresholding=True, sample_max_value=2.0), N),
])
def test_dpm_solver_matches_diffusers(cfg, num_steps):
  _compare("DPMSolverMultistepScheduler", cfg, num_steps=num_steps)


def test_dpm_solver_learned_variance_matches_diffusers_for_3_channels():
  """diffusers keeps channels [:3] of a learned-sigma output; for C = 3 that is our first half."""
  cfg = dict(SD, variance_type="learned_range")
  ours = jd.DPMSolverMultistepScheduler.from_config(cfg)
  theirs = diffusers.DPMSolverMultistepScheduler.from_config(cfg)
  theirs.set_timesteps(N)
  x = initial_noise(0, (2, 3, 4, 4))
  state = ours.init_state(N, x)
  step = jax.jit(ours.step)
  xt, xj = torch.from_numpy(x), x
  for i, t in enumerate(theirs.timesteps):
    out = np.concatenate([0.9 * xj + 0.01 * i, np.tanh(xj)], axis=1)
    xj, state = step(state, out, i, xj)
    out_t = torch.cat([0.9 * xt + 0.01 * i, torch.tanh(xt)], dim=1)
    xt = theirs.step(out_t, t, xt).prev_sample
    xj = np.asarray(xj)
    _assert_close(xj, xt.numpy())


def test_ddpm_learned_variance_one_step_matches_diffusers(monkeypatch):
  """variance_type="learned": the second half is the variance itself."""
  cfg = dict(SD, variance_type="learned")
  ours = jd.DDPMScheduler.from_config(cfg)
  theirs = diffusers.DDPMScheduler.from_config(cfg)
  theirs.set_timesteps(N)
  x, eps, z = initial_noise(0), initial_noise(1), initial_noise(2)
  var = 0.05 * np.exp(initial_noise(3))
  monkeypatch.setattr(diffusers_ddpm, "randn_tensor", lambda *a, **k: torch.from_numpy(z))
  out = np.concatenate([eps, var], axis=1)
  expected = theirs.step(torch.from_numpy(out), theirs.timesteps[2], torch.from_numpy(x))
  got, _ = ours.step(ours.init_state(N), out, 2, x, noise=z)
  _assert_close(np.asarray(got), expected.prev_sample.numpy())


def test_dpm_solver_drops_learned_variance():
  """variance_type="learned_range": the step uses the first C channels only."""
  sched = jd.DPMSolverMultistepScheduler.from_config(dict(SD, variance_type="learned_range"))
  plain = jd.DPMSolverMultistepScheduler.from_config(SD)
  x = initial_noise(0)
  eps = initial_noise(1)
  out2 = np.concatenate([eps, initial_noise(2)], axis=1)
  state = sched.init_state(N, x)
  a, sa = sched.step(state, out2, 0, x)
  b, sb = plain.step(plain.init_state(N, x), eps, 0, x)
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  np.testing.assert_array_equal(np.asarray(sa.prev_x0[0]), np.asarray(sb.prev_x0[0]))


def test_ddpm_one_step_with_noise_argument():
  """One stochastic DDPM step with noise=... equals diffusers' step given the same draw."""
  ours = jd.DDPMScheduler.from_config(SD)
  theirs = diffusers.DDPMScheduler.from_config(SD)
  theirs.set_timesteps(N)
  x, eps = initial_noise(0), initial_noise(1)
  gen = torch.Generator().manual_seed(7)
  expected = theirs.step(torch.from_numpy(eps), theirs.timesteps[3], torch.from_numpy(x),
                         generator=gen).prev_sample.numpy()
  z = torch.randn(SHAPE, generator=torch.Generator().manual_seed(7)).numpy()
  got, _ = ours.step(ours.init_state(N), eps, 3, x, noise=z)
  _assert_close(np.asarray(got), expected)


def test_step_rejects_wrong_output_shape():
  sched = jd.DDIMScheduler()
  x = initial_noise(0)
  with pytest.raises(ValueError, match=r"expected a model output of the sample's shape"):
    sched.step(sched.init_state(N), np.zeros((2, 8, 6, 6), np.float32), 0, x)
  ddpm = jd.DDPMScheduler(variance_type="learned_range")
  with pytest.raises(ValueError, match="needs a model output with twice"):
    ddpm.step(ddpm.init_state(N), x, 0, x, noise=x)
  with pytest.raises(ValueError, match="twice its channels"):
    ddpm.step(ddpm.init_state(N), np.zeros((2, 12, 6, 6), np.float32), 0, x, noise=x)
  with pytest.raises(ValueError, match="pass a PRNG key"):
    jd.DDPMScheduler().step(jd.DDPMScheduler().init_state(N), x, 0, x)
