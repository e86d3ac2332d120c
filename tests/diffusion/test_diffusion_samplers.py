"""The samplers SD users pick (PNDM/PLMS, Euler ancestral, Heun, LMS, UniPC, DPM-Solver SDE and
single-step, KDPM2, DEIS, EDM Euler) against diffusers.

Each trajectory runs jaxadapt's steps inside one jitted ``lax.scan`` and diffusers' in its Python
loop, from the same noise with the same fake model (``_diffusion_helpers``), and compares the
sample after every model call: |ours - diffusers| <= 1e-4 + 1e-5 |diffusers| (measured: at most
~6e-5 on trajectories of magnitude 3-110, float32 rounding). The ancestral and SDE samplers'
noise is handed to diffusers (its ``randn_tensor`` returns the draws jaxadapt uses).
"""
import diffusers
import diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion as diffusers_sd
import diffusers.schedulers.scheduling_ddpm as diffusers_ddpm
import diffusers.schedulers.scheduling_dpmsolver_multistep as diffusers_dpm
import diffusers.schedulers.scheduling_dpmsolver_singlestep as diffusers_dpm_single
import diffusers.schedulers.scheduling_euler_ancestral_discrete as diffusers_euler_a
import diffusers.schedulers.scheduling_k_dpm_2_ancestral_discrete as diffusers_kdpm2_a
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import jaxadapt.diffusion as jd
from _diffusion_helpers import initial_noise, model_jnp, model_torch, run_diffusers, run_jax

SD = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1)
V = dict(prediction_type="v_prediction")
N = 8


def _assert_close(ours, theirs):
  assert ours.shape == theirs.shape
  np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-4)
  assert np.abs(theirs).max() > 0.1  # the trajectory is not trivially zero


def _pair(name, cfg):
  return jd.SCHEDULERS[name].from_config(cfg), getattr(diffusers, name).from_config(cfg)


# Stochastic samplers: the diffusers module whose randn_tensor draws, and which calls draw.
NOISY = {"EulerAncestralDiscreteScheduler": (diffusers_euler_a, slice(None)),
         "KDPM2AncestralDiscreteScheduler": (diffusers_kdpm2_a, slice(1, None, 2)),
         "DPMSolverMultistepScheduler": (diffusers_dpm, slice(None)),
         "DPMSolverSinglestepScheduler": (diffusers_dpm_single, slice(None))}


def _compare(name, cfg, num_steps=N, monkeypatch=None, last=None):
  ours, theirs = _pair(name, cfg)
  x = initial_noise(0)
  noises = None
  if name in NOISY and (monkeypatch is not None):  # hand diffusers the draws ours takes
    module, calls = NOISY[name]
    n_calls = len(ours.set_timesteps(num_steps))
    noises = np.stack([initial_noise(100 + i) for i in range(n_calls)])
    queue = [torch.from_numpy(z) for z in noises[calls]]
    monkeypatch.setattr(module, "randn_tensor", lambda *a, **k: queue.pop(0))
  expected = run_diffusers(theirs, num_steps, x)
  got = run_jax(ours, num_steps, x, noises=noises)
  assert np.isfinite(got).all()
  _assert_close(got[:last], expected[:last])
  return got, expected


@pytest.mark.parametrize("cfg,num_steps", [
    (dict(SD, skip_prk_steps=True), N),  # PLMS, as Stable Diffusion 1.x ships it
    (dict(SD, skip_prk_steps=True), 1),
    (dict(SD, skip_prk_steps=True, timestep_spacing="trailing", **V), N),
    (SD, N),  # 12 pseudo Runge-Kutta calls first
    (dict(V, set_alpha_to_one=True), 4),
])
def test_pndm_matches_diffusers(cfg, num_steps):
  got, _ = _compare("PNDMScheduler", cfg, num_steps)
  plms_calls = num_steps + 1 if num_steps > 1 else 1  # the improved-Euler step needs a 2nd
  assert len(got) == (plms_calls if cfg.get("skip_prk_steps") else num_steps + 9)


@pytest.mark.parametrize("cfg", [SD, dict(SD, **V, timestep_spacing="leading"),
                                 dict(SD, timestep_spacing="trailing")])
def test_euler_ancestral_matches_diffusers(cfg, monkeypatch):
  _compare("EulerAncestralDiscreteScheduler", cfg, monkeypatch=monkeypatch)


@pytest.mark.parametrize("cfg", [SD, dict(SD, **V, timestep_spacing="leading"),
                                 dict(SD, use_karras_sigmas=True),
                                 dict(SD, prediction_type="sample", clip_sample=True), {}])
def test_heun_matches_diffusers(cfg):
  got, _ = _compare("HeunDiscreteScheduler", cfg)
  assert len(got) == 2 * N - 1


@pytest.mark.parametrize("cfg", [SD, dict(SD, **V, timestep_spacing="leading"),
                                 dict(SD, use_karras_sigmas=True)])
def test_lms_matches_diffusers(cfg):
  _compare("LMSDiscreteScheduler", cfg)


@pytest.mark.parametrize("cfg", [
    SD,
    dict(SD, solver_order=3),
    dict(SD, **V, solver_type="bh1", final_sigmas_type="sigma_min"),
    dict(SD, solver_order=3, solver_type="bh1", lower_order_final=False,
         final_sigmas_type="sigma_min"),
    dict(SD, predict_x0=False, solver_order=3, final_sigmas_type="sigma_min"),
    dict(SD, use_karras_sigmas=True, timestep_spacing="trailing"),
    dict(SD, disable_corrector=[0, 3], timestep_spacing="leading"),
    dict(SD, solver_order=1),
])
def test_unipc_matches_diffusers(cfg):
  _compare("UniPCMultistepScheduler", cfg)


@pytest.mark.parametrize("cfg", [
    dict(SD, algorithm_type="sde-dpmsolver++"),  # "DPM++ 2M SDE"
    dict(SD, algorithm_type="sde-dpmsolver++", solver_order=3, use_karras_sigmas=True),
    dict(SD, algorithm_type="sde-dpmsolver", solver_type="heun", final_sigmas_type="sigma_min"),
    dict(SD, **V, algorithm_type="dpmsolver", solver_order=3, final_sigmas_type="sigma_min"),
])
def test_dpm_solver_sde_and_noise_prediction_match_diffusers(cfg, monkeypatch):
  _compare("DPMSolverMultistepScheduler", cfg, monkeypatch=monkeypatch)


@pytest.mark.parametrize("cfg,num_steps", [
    (SD, N),  # orders 1, 2, 1, 2, ..., 1, 1
    (dict(SD, solver_order=3), 9),
    (dict(SD, solver_order=3, solver_type="heun", **V), N),
    (dict(SD, algorithm_type="dpmsolver", final_sigmas_type="sigma_min", solver_order=3), 9),
    (dict(SD, algorithm_type="sde-dpmsolver++", use_karras_sigmas=True), N),
])
def test_dpm_solver_singlestep_matches_diffusers(cfg, num_steps, monkeypatch):
  _compare("DPMSolverSinglestepScheduler", cfg, num_steps, monkeypatch=monkeypatch)


@pytest.mark.parametrize("name", ["KDPM2DiscreteScheduler", "KDPM2AncestralDiscreteScheduler"])
@pytest.mark.parametrize("cfg", [SD, dict(SD, **V, timestep_spacing="leading"),
                                 dict(SD, use_karras_sigmas=True)])
def test_kdpm2_matches_diffusers(name, cfg, monkeypatch):
  got, _ = _compare(name, cfg, monkeypatch=monkeypatch)
  assert len(got) == 2 * N - 1


@pytest.mark.parametrize("cfg", [SD, dict(SD, solver_order=3), dict(SD, solver_order=1),
                                 dict(SD, **V, timestep_spacing="leading"),
                                 dict(SD, use_karras_sigmas=True, solver_order=3),
                                 dict(SD, prediction_type="sample", thresholding=True,
                                      sample_max_value=2.0, timestep_spacing="trailing")])
def test_deis_matches_diffusers(cfg):
  _compare("DEISMultistepScheduler", cfg)


@pytest.mark.parametrize("cfg", [{}, dict(prediction_type="v_prediction", sigma_max=20.0),
                                 dict(sigma_schedule="exponential"),
                                 dict(final_sigmas_type="sigma_min", sigma_data=1.0)])
def test_edm_euler_matches_diffusers(cfg):
  _compare("EDMEulerScheduler", cfg)


TS = [951, 800, 640, 433, 260, 120, 31]  # a custom schedule: uneven, largest first
SIGMAS = [14.0, 8.5, 4.0, 2.2, 0.9, 0.35, 0.1, 0.0]


@pytest.mark.parametrize("name,cfg,schedule", [
    ("EulerDiscreteScheduler", SD, dict(timesteps=TS)),
    ("EulerDiscreteScheduler", dict(SD, **V), dict(sigmas=SIGMAS)),
    ("DDPMScheduler", dict(SD, clip_sample=False), dict(timesteps=TS)),
    ("HeunDiscreteScheduler", SD, dict(timesteps=TS)),
    ("DPMSolverMultistepScheduler", SD, dict(timesteps=TS)),
    ("DPMSolverSinglestepScheduler", SD, dict(timesteps=TS)),
])
def test_custom_timesteps_and_sigmas_match_diffusers(name, cfg, schedule, monkeypatch):
  """diffusers' set_timesteps(timesteps=... / sigmas=...): the same tables and trajectory."""
  key = "custom_" + next(iter(schedule))
  ours = jd.SCHEDULERS[name].from_config(cfg, **{key: next(iter(schedule.values()))})
  theirs = getattr(diffusers, name).from_config(cfg)
  n = ours.custom_num_steps
  x = initial_noise(0)
  noises = np.stack([initial_noise(100 + i) for i in range(2 * n)])
  if name == "DDPMScheduler":  # noise at every step with t > 0: hand diffusers ours
    queue = [torch.from_numpy(z) for z, t in zip(noises, TS) if t > 0]
    monkeypatch.setattr(diffusers_ddpm, "randn_tensor", lambda *a, **k: queue.pop(0))
  expected = run_diffusers(theirs, None, x, schedule=schedule)
  np.testing.assert_allclose(ours.set_timesteps(n), theirs.timesteps.numpy(), rtol=1e-6,
                             atol=1e-4)
  got = run_jax(ours, n, x, noises=noises[: len(expected)])
  _assert_close(got, expected)
  # Through the sampling loop too: sample(..., timesteps=/sigmas=) sets the number of steps.
  plain = jd.SCHEDULERS[name].from_config(cfg)
  ours_loop = jd.sample(lambda x, t, c: model_jnp(x, t), plain, x, None, None, None, None,
                        jax.random.key(0), **schedule)
  if name != "DDPMScheduler":  # (stochastic: its noise comes from the key here)
    np.testing.assert_allclose(np.asarray(ours_loop), expected[-1], rtol=1e-5, atol=1e-4)


def test_custom_schedules_are_refused_where_diffusers_has_none():
  with pytest.raises(ValueError, match="LMSDiscreteScheduler takes no custom schedule"):
    jd.LMSDiscreteScheduler(custom_timesteps=TS)
  with pytest.raises(ValueError, match="HeunDiscreteScheduler takes only timesteps="):
    jd.HeunDiscreteScheduler(custom_sigmas=SIGMAS)
  with pytest.raises(ValueError, match="replaces the Karras sigmas"):
    jd.EulerDiscreteScheduler(use_karras_sigmas=True, custom_timesteps=TS)
  with pytest.raises(ValueError, match="descending"):
    jd.DDPMScheduler(custom_timesteps=[10, 20]).set_timesteps(2)
  with pytest.raises(ValueError, match="disagrees with the custom schedule's 7 steps"):
    jd.sample(lambda x, t, c: model_jnp(x, t), jd.EulerDiscreteScheduler(), initial_noise(0),
              None, None, None, 5, None, timesteps=TS)


def test_unipc_bh1_last_step_is_the_data_prediction():
  """diffusers' bh1 multiplies B(h) = -inf by an empty sum on the step to sigma = 0 (NaN there);
  every other step matches, and ours ends at the x0 prediction, which is bh2's order-1 step."""
  got, expected = _compare("UniPCMultistepScheduler", dict(SD, solver_type="bh1"), last=-1)
  ours = jd.UniPCMultistepScheduler.from_config(dict(SD, solver_type="bh1"))
  state = ours.init_state(N, got[0])
  alpha = 1 / np.sqrt(float(state.sigmas[-2]) ** 2 + 1)  # VP: x_t = alpha x0 + sigma_t eps
  x = got[-2]
  eps = np.asarray(model_jnp(x, state.timesteps[-1]))
  x0 = (x - np.sqrt(1 - alpha**2) * eps) / alpha
  np.testing.assert_allclose(got[-1], x0, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("name,cfg", [
    ("PNDMScheduler", {}),
    ("PNDMScheduler", dict(SD, skip_prk_steps=True)),
    ("EulerAncestralDiscreteScheduler", SD),
    ("HeunDiscreteScheduler", dict(SD, use_karras_sigmas=True)),
    ("LMSDiscreteScheduler", SD),
    ("UniPCMultistepScheduler", dict(SD, use_karras_sigmas=True)),
    ("KDPM2DiscreteScheduler", SD),
    ("KDPM2AncestralDiscreteScheduler", dict(SD, use_karras_sigmas=True)),
    ("DPMSolverSinglestepScheduler", dict(SD, solver_order=3)),
    ("DEISMultistepScheduler", dict(SD, use_karras_sigmas=True)),
    ("EDMEulerScheduler", {}),
])
@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
def test_timesteps_and_sigmas_equal_diffusers(name, cfg, spacing):
  ours, theirs = _pair(name, dict(cfg, timestep_spacing=spacing))
  for n in (1, 7, 25, 50):
    if name == "PNDMScheduler" and not ours.skip_prk_steps and n < 4:
      with pytest.raises(ValueError, match="Runge-Kutta warm-up needs num_steps >= 4"):
        ours.set_timesteps(n)
      continue
    theirs.set_timesteps(n)
    # (Fractional timesteps t(sigma), Heun/KDPM2 with Karras sigmas: equal to float32 rounding.)
    np.testing.assert_allclose(ours.set_timesteps(n), theirs.timesteps.numpy(), rtol=1e-6,
                               atol=1e-4)
    state = ours.init_state(n, np.zeros((1, 1), np.float32))
    np.testing.assert_allclose(float(state.init_noise_sigma), float(theirs.init_noise_sigma),
                               rtol=1e-6)
    if hasattr(state, "sigmas"):
      np.testing.assert_allclose(np.asarray(state.sigmas), theirs.sigmas.numpy(), rtol=1e-6)


def test_unsupported_options_name_themselves():
  with pytest.raises(ValueError, match="prediction_type='sample' is not supported"):
    jd.PNDMScheduler(prediction_type="sample")
  with pytest.raises(ValueError, match="solver_type='bh3' is not supported"):
    jd.UniPCMultistepScheduler(solver_type="bh3")
  with pytest.raises(ValueError, match="use_flow_sigmas=True is not supported"):
    jd.UniPCMultistepScheduler(use_flow_sigmas=True)
  with pytest.raises(ValueError, match="predict_x0=False .* cannot step to sigma = 0"):
    jd.UniPCMultistepScheduler(predict_x0=False)
  with pytest.raises(ValueError, match="singular"):
    jd.UniPCMultistepScheduler(solver_order=3, lower_order_final=False).init_state(
        N, np.zeros((1,), np.float32))
  with pytest.raises(ValueError, match="use_beta_sigmas=True is not supported"):
    jd.HeunDiscreteScheduler(use_beta_sigmas=True)
  with pytest.raises(ValueError, match="'dpmsolver' .* cannot step to sigma = 0"):
    jd.DPMSolverMultistepScheduler(algorithm_type="dpmsolver")
  with pytest.raises(ValueError, match="'sde-dpmsolver' has orders 1 and 2"):
    jd.DPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver", solver_order=3,
                                   final_sigmas_type="sigma_min")
  with pytest.raises(ValueError, match="algorithm_type='sde-dpmsolver' is not supported"):
    jd.DPMSolverSinglestepScheduler(algorithm_type="sde-dpmsolver")
  with pytest.raises(ValueError, match="sigma_schedule='linear' is not supported"):
    jd.EDMEulerScheduler(sigma_schedule="linear")
  sched = jd.EulerAncestralDiscreteScheduler()
  x = initial_noise(0)
  with pytest.raises(ValueError, match="pass a PRNG key"):
    sched.step(sched.init_state(N), x, 0, x)


# ----------------------------------------------------------------------------- the sampling loop

LABELS = np.array([3.0, 7.0], np.float32)
NULL = np.zeros(2, np.float32)
SCALES = np.array([1.5, 7.5], np.float32)


def _denoise_jnp(x, t, cond):
  # Conditioning scales the output, so guidance changes its std (what guidance_rescale undoes).
  return model_jnp(x, t) * (1 + 0.05 * cond[:, None, None, None])


def _diffusers_guided_loop(sched, x_init, num_steps, guidance_rescale=0.0, noises=None):
  """diffusers' StableDiffusionPipeline loop on the fake model: [cond; uncond], CFG, rescale."""
  sched.set_timesteps(num_steps)
  x = torch.from_numpy(x_init) * sched.init_noise_sigma
  cond2 = torch.from_numpy(np.concatenate([LABELS, NULL]))[:, None, None, None]
  s = torch.from_numpy(SCALES)[:, None, None, None]
  for i, t in enumerate(sched.timesteps):
    x_in = sched.scale_model_input(x, t)
    out = model_torch(torch.cat([x_in, x_in]), t) * (1 + 0.05 * cond2)
    out_c, out_u = out[:2], out[2:]
    eps = out_u + s * (out_c - out_u)
    if guidance_rescale > 0:
      eps = diffusers_sd.rescale_noise_cfg(eps, out_c, guidance_rescale=guidance_rescale)
    x = sched.step(eps, t, x).prev_sample
  return x.numpy()


@pytest.mark.parametrize("name,cfg,rescale", [
    ("PNDMScheduler", dict(SD, skip_prk_steps=True), 0.0),
    ("HeunDiscreteScheduler", SD, 0.0),  # 2N - 1 model calls in the scan
    ("UniPCMultistepScheduler", SD, 0.7),
    ("DDIMScheduler", dict(SD, clip_sample=False, set_alpha_to_one=False), 0.7),
])
def test_sample_loop_matches_diffusers_pipeline_loop(name, cfg, rescale):
  """`jd.sample` (chunked scans over every model call, CFG, Lin et al. Eq. 16) equals diffusers'
  StableDiffusionPipeline loop with `guidance_rescale`; the rescale moves the result."""
  ours, theirs = _pair(name, cfg)
  x = initial_noise(0)
  got = np.asarray(jd.sample(_denoise_jnp, ours, x, LABELS, NULL, SCALES, N, None, chunk=3,
                             guidance_rescale=rescale))
  want = _diffusers_guided_loop(theirs, x, N, rescale)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)
  if rescale:
    plain = _diffusers_guided_loop(_pair(name, cfg)[1], x, N)
    assert np.abs(plain - want).max() > 0.1


def test_euler_ancestral_seeded_sample_reproducible_and_equal_to_diffusers(monkeypatch):
  """A fixed key gives the same images twice; diffusers fed the draws of step i
  (normal(fold_in(key, i))) gives the same trajectory."""
  ours, theirs = _pair("EulerAncestralDiscreteScheduler", SD)
  x = initial_noise(0)
  key = jax.random.key(11)
  run = lambda k: np.asarray(jd.sample(_denoise_jnp, ours, x, LABELS, NULL, SCALES, N, k,  # noqa
                                       chunk=4))
  got = run(key)
  np.testing.assert_array_equal(got, run(key))
  assert np.abs(got - run(jax.random.key(12))).max() > 0.1
  draws = [torch.from_numpy(np.asarray(jax.random.normal(jax.random.fold_in(key, i), x.shape)))
           for i in range(N)]
  monkeypatch.setattr(diffusers_euler_a, "randn_tensor", lambda *a, **k: draws.pop(0))
  np.testing.assert_allclose(got, _diffusers_guided_loop(theirs, x, N), rtol=1e-5, atol=1e-4)


def test_rescale_guidance_equals_diffusers_and_checks_input():
  guided, cond = initial_noise(1) * 3, initial_noise(2)
  want = diffusers_sd.rescale_noise_cfg(torch.from_numpy(guided), torch.from_numpy(cond),
                                        guidance_rescale=0.7).numpy()
  got = np.asarray(jd.guidance.rescale_guidance(jnp.asarray(guided), jnp.asarray(cond), 0.7))
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
  with pytest.raises(ValueError, match=r"guidance_rescale must be a float in \[0, 1\]"):
    jd.sample(_denoise_jnp, jd.DDIMScheduler(), initial_noise(0), LABELS, NULL, SCALES, 2, None,
              guidance_rescale=1.5)
  with pytest.raises(ValueError, match="there is no guidance"):
    jd.sample(_denoise_jnp, jd.DDIMScheduler(), initial_noise(0), LABELS, None, None, 2, None,
              guidance_rescale=0.5)
