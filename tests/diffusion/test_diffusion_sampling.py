"""Classifier-free guidance and the chunked lax.scan sampling loop.

The loop is checked against diffusers' torch schedulers driven by a Python loop with the same
per-sample guidance (as in diffusers' pipelines), and against a Python loop of jaxadapt steps.
"""
import diffusers
import diffusers.schedulers.scheduling_ddpm as diffusers_ddpm
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from jax.sharding import Mesh

import jaxadapt.diffusion as jd
from _diffusion_helpers import initial_noise, model_jnp, model_torch

SD = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1,
          clip_sample=False, set_alpha_to_one=False)
DIT = dict(clip_sample=False, variance_type="learned_range")  # DiT's DDPM: linear betas
LABELS = np.array([3.0, 7.0], np.float32)  # conditional "class" per sample
NULL = np.zeros(2, np.float32)  # the null class
SCALES = np.array([1.0, 7.5], np.float32)  # per-sample guidance scale
N = 10
C = 4


def denoise_jnp(x, t, cond, learned_sigma=False):
  out = model_jnp(x, t, learned_sigma)
  return out + 0.05 * cond[:, None, None, None]  # conditioning moves every channel


def denoise_torch(x, t, cond, learned_sigma=False):
  return model_torch(x, t, learned_sigma) + 0.05 * cond[:, None, None, None]


def diffusers_cfg_loop(sched, x_init, *, learned_sigma=False, key=None, monkeypatch=None):
  """diffusers' DiTPipeline loop: batch [cond; uncond], CFG on the first C channels only."""
  sched.set_timesteps(N)
  if key is not None:  # hand diffusers' DDPM the noise jaxadapt draws at step i
    draws = np.asarray(jax.jit(jax.vmap(lambda i: jax.random.normal(
        jax.random.fold_in(key, i), x_init.shape)))(jnp.arange(N)))
    queue = [torch.from_numpy(draws[i]) for i, t in enumerate(sched.timesteps) if t > 0]
    monkeypatch.setattr(diffusers_ddpm, "randn_tensor", lambda *a, **k: queue.pop(0))
  x = torch.from_numpy(x_init) * sched.init_noise_sigma
  cond2 = torch.from_numpy(np.concatenate([LABELS, NULL]))
  s = torch.from_numpy(SCALES)[:, None, None, None]
  for t in sched.timesteps:
    x_in = sched.scale_model_input(x, t)
    out = denoise_torch(torch.cat([x_in, x_in]), t, cond2, learned_sigma)
    out_c, out_u = out[:2], out[2:]
    eps = out_u[:, :C] + s * (out_c[:, :C] - out_u[:, :C])
    if learned_sigma and getattr(sched.config, "variance_type", None) == "learned_range":
      model_output = torch.cat([eps, out_c[:, C:]], dim=1)
    else:
      model_output = eps
    x = sched.step(model_output, t, x).prev_sample
  return x.numpy()


def test_cfg_combine_per_sample():
  u, c = initial_noise(1), initial_noise(2)
  got = np.asarray(jd.cfg_combine(u, c, SCALES))
  for b in range(2):
    np.testing.assert_allclose(got[b], u[b] + SCALES[b] * (c[b] - u[b]), rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(np.asarray(jd.cfg_combine(u, c, 1.0)), c, rtol=1e-6, atol=1e-6)
  with pytest.raises(ValueError, match=r"one value per sample, shape \(2,\); got shape \(3,\)"):
    jd.cfg_combine(u, c, np.ones(3))
  with pytest.raises(ValueError, match="same shape"):
    jd.cfg_combine(u, c[:1], SCALES)


def test_guide_model_output_learned_sigma_guides_eps_half_only():
  x = initial_noise(0)
  out_u = np.concatenate([initial_noise(1), initial_noise(2)], axis=1)
  out_c = np.concatenate([initial_noise(3), initial_noise(4)], axis=1)
  got = np.asarray(jd.guide_model_output(out_u, out_c, SCALES, x.shape))
  np.testing.assert_allclose(got[:, :C], np.asarray(jd.cfg_combine(out_u[:, :C], out_c[:, :C],
                                                                   SCALES)), rtol=1e-6)
  np.testing.assert_array_equal(got[:, C:], out_c[:, C:])
  # The channel axis is found from the shapes, so NHWC works the same way.
  got_nhwc = np.asarray(jd.guide_model_output(out_u.transpose(0, 2, 3, 1),
                                              out_c.transpose(0, 2, 3, 1), SCALES,
                                              x.transpose(0, 2, 3, 1).shape))
  np.testing.assert_allclose(got_nhwc, got.transpose(0, 2, 3, 1), rtol=1e-6)


@pytest.mark.parametrize("name,cfg,learned", [
    ("DDIMScheduler", SD, False),
    ("EulerDiscreteScheduler", dict(SD, prediction_type="v_prediction"), False),
    ("DPMSolverMultistepScheduler", SD, False),
    ("DDPMScheduler", DIT, True),  # DiT: CFG on the eps half, learned_range variance from cond
    ("DDIMScheduler", dict(clip_sample=False), True),  # DiT + DDIM: variance half dropped
])
def test_sample_matches_diffusers_cfg_loop(name, cfg, learned, monkeypatch):
  sched = jd.SCHEDULERS[name].from_config(cfg)
  x = initial_noise(0)
  key = jax.random.key(42)
  got = jd.sample(lambda x, t, c: denoise_jnp(x, t, c, learned), sched, x, LABELS, NULL, SCALES,
                  N, key, chunk=5)
  expected = diffusers_cfg_loop(getattr(diffusers, name).from_config(cfg), x,
                                learned_sigma=learned,
                                key=key if name == "DDPMScheduler" else None,
                                monkeypatch=monkeypatch)
  np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-6, atol=1e-4)
  assert np.abs(expected).max() > 0.1


@pytest.mark.parametrize("name,cfg", [("DPMSolverMultistepScheduler", dict(SD, solver_order=3)),
                                      ("DDPMScheduler", DIT)])
def test_sample_equals_python_loop_of_steps(name, cfg):
  sched = jd.SCHEDULERS[name].from_config(cfg)
  learned = sched.uses_learned_variance
  x0 = jnp.asarray(initial_noise(0))
  key = jax.random.key(3)
  got = jd.sample(lambda x, t, c: denoise_jnp(x, t, c, learned), sched, x0, LABELS, NULL, SCALES,
                  N, key, chunk=5)

  @jax.jit
  def guided_output(state, x, i):  # two separate forward passes, then CFG
    t = state.timesteps[i]
    x_in = sched.scale_model_input(state, x, i)
    out_c = denoise_jnp(x_in, jnp.full((2,), t), LABELS, learned)
    out_u = denoise_jnp(x_in, jnp.full((2,), t), NULL, learned)
    return jd.guide_model_output(out_u, out_c, SCALES, x.shape)

  step = jax.jit(sched.step)
  state = sched.init_state(N, x0)
  x = x0 * state.init_noise_sigma
  for i in range(N):
    x, state = step(state, guided_output(state, x, i), i, x, jax.random.fold_in(key, i))
  np.testing.assert_allclose(np.asarray(got), np.asarray(x), rtol=1e-5, atol=1e-5)


def test_sample_is_chunk_invariant_and_takes_partial():
  sched = jd.DDPMScheduler.from_config(DIT)
  x = initial_noise(0)
  key = jax.random.key(0)
  # Partial keeps the array argument as a jit argument (not a compiled-in constant).
  fn = jax.tree_util.Partial(lambda shift, x, t, c: denoise_jnp(x, t, c, True) + shift,
                             jnp.float32(0.0))
  a = jd.sample(fn, sched, x, LABELS, NULL, SCALES, N, key, chunk=N)
  b = jd.sample(fn, sched, x, LABELS, NULL, SCALES, N, key, chunk=5, progress=True)
  np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-6)


def test_sample_without_guidance():
  sched = jd.EulerDiscreteScheduler.from_config(SD)
  x = initial_noise(0)
  got = jd.sample(denoise_jnp, sched, x, LABELS, None, None, N, None)
  # Same as guidance scale 1 (pure conditional model).
  ref = jd.sample(denoise_jnp, sched, x, LABELS, NULL, 1.0, N, None)
  np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=1e-5, atol=1e-5)


def test_sample_keeps_latent_dtype():
  sched = jd.EulerDiscreteScheduler.from_config(SD)
  x = jnp.asarray(initial_noise(0), jnp.bfloat16)
  got = jd.sample(lambda x, t, c: denoise_jnp(x.astype(jnp.float32), t, c), sched, x, LABELS,
                  NULL, SCALES, 4, None)
  ref = jd.sample(denoise_jnp, sched, x.astype(jnp.float32), LABELS, NULL, SCALES, 4, None)
  assert got.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(ref), rtol=0.05, atol=0.2)


@pytest.mark.skipif(jax.device_count() < 2, reason="needs 2 devices (XLA_FLAGS device count)")
def test_sample_sharded_over_data_axis_equals_unsharded():
  mesh = Mesh(np.array(jax.devices()[:2]), ("data",),
              axis_types=(jax.sharding.AxisType.Auto,))
  sched = jd.DPMSolverMultistepScheduler.from_config(SD)
  x = initial_noise(0)
  key = jax.random.key(1)
  got = jd.sample(denoise_jnp, sched, x, LABELS, NULL, SCALES, N, key, chunk=5, mesh=mesh)
  ref = jd.sample(denoise_jnp, sched, x, LABELS, NULL, SCALES, N, key, chunk=5)
  assert got.sharding.spec == jax.sharding.PartitionSpec("data")
  np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=1e-6, atol=1e-6)
  with pytest.raises(ValueError, match="must divide evenly"):
    jd.sample(denoise_jnp, sched, initial_noise(0, (3, 4, 6, 6)), np.zeros(3), np.zeros(3),
              np.ones(3), N, key, mesh=mesh)


def test_sample_rejects_bad_input():
  sched = jd.DDIMScheduler.from_config(SD)
  x = initial_noise(0)
  with pytest.raises(ValueError, match="leading dim"):
    jd.sample(denoise_jnp, sched, x, LABELS[:1], NULL, SCALES, N, None)
  with pytest.raises(ValueError, match="guidance_scale needs uncond"):
    jd.sample(denoise_jnp, sched, x, LABELS, None, SCALES, N, None)
  with pytest.raises(ValueError, match="chunk"):
    jd.sample(denoise_jnp, sched, x, LABELS, NULL, SCALES, N, None, chunk=0)
