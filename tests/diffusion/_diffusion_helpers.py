"""A fake denoiser written identically in torch and jnp, and loops that run it through schedulers.

The model is linear in x with a timestep-dependent bias, in diffusers' NCHW layout:
  out[b, d] = 0.9 x[b, d] + 0.1 * sum_c W[c, d] x[b, c] + 0.2 * sin(t / 97) * bias[d]
(close to x, as a trained epsilon-model is at high noise, so trajectories stay of order 1-10).
With ``learned_sigma`` it returns 2C channels; the second half is tanh(0.5 * x) in [-1, 1], the
range diffusers' "learned_range" expects.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import torch

SHAPE = (2, 4, 6, 6)  # [B, C, H, W]
_rng = np.random.default_rng(1234)
W = (_rng.standard_normal((SHAPE[1], SHAPE[1])) / 2).astype(np.float32)
BIAS = _rng.standard_normal(SHAPE[1:]).astype(np.float32)


def initial_noise(seed: int = 0, shape=SHAPE) -> np.ndarray:
  return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def model_jnp(x, t, learned_sigma: bool = False):
  t = jnp.asarray(t, jnp.float32)
  t = t.reshape(t.shape + (1,) * (x.ndim - t.ndim))  # [B] or [] -> broadcastable
  out = 0.9 * x + 0.1 * jnp.einsum("bchw,cd->bdhw", x, W) + 0.2 * jnp.sin(t / 97.0) * BIAS
  if learned_sigma:
    out = jnp.concatenate([out, jnp.tanh(0.5 * x)], axis=1)
  return out


def model_torch(x, t, learned_sigma: bool = False):
  t = torch.as_tensor(t, dtype=torch.float32)
  out = 0.9 * x + 0.1 * torch.einsum("bchw,cd->bdhw", x, torch.from_numpy(W)) + 0.2 * torch.sin(
      t / 97.0) * torch.from_numpy(BIAS)
  if learned_sigma:
    out = torch.cat([out, torch.tanh(0.5 * x)], dim=1)
  return out


def run_diffusers(sched, num_steps, x_init, *, learned_sigma=False, noises=None, step_kwargs=None,
                  schedule=None):
  """diffusers' loop: returns the sample after every step, [N, ...] numpy.

  ``schedule``: set_timesteps keywords replacing num_steps (``timesteps=`` or ``sigmas=``).
  """
  if schedule is None:
    sched.set_timesteps(num_steps)
  else:
    sched.set_timesteps(**schedule)
  x = torch.from_numpy(x_init) * sched.init_noise_sigma
  out = []
  for i, t in enumerate(sched.timesteps):
    kwargs = dict(step_kwargs or {})
    if noises is not None and "variance_noise" in kwargs:
      kwargs["variance_noise"] = torch.from_numpy(noises[i])
    y = model_torch(sched.scale_model_input(x, t), t, learned_sigma)
    x = sched.step(y, t, x, **kwargs).prev_sample
    out.append(x.numpy().copy())
  return np.stack(out)


def run_jax(sched, num_steps, x_init, *, learned_sigma=False, noises=None):
  """jaxadapt's steps inside one jitted lax.scan: the sample after every step, [N, ...]."""
  state = sched.init_state(num_steps, jnp.asarray(x_init))
  num_evals = state.timesteps.shape[0]  # model evaluations (2N - 1 for Heun, N + 1 for PLMS)

  @jax.jit
  def run(state, x, noises):
    def body(carry, xs):
      x, state = carry
      i, z = xs
      y = model_jnp(sched.scale_model_input(state, x, i), state.timesteps[i], learned_sigma)
      x, state = sched.step(state, y, i, x, noise=z)
      return (x, state), x
    init = (x * state.init_noise_sigma, state)
    return jax.lax.scan(body, init, (jnp.arange(num_evals), noises))[1]

  if noises is None:
    noises = np.zeros((num_evals,) + x_init.shape, np.float32)
  return np.asarray(run(state, jnp.asarray(x_init), jnp.asarray(noises)))
