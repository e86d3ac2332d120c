"""A jit-compiled sampling loop with classifier-free guidance and a guidance scale per sample.

The steps run as ``lax.scan`` over step indices, ``chunk`` steps per compiled call, so a tqdm bar
advances between chunks. Step i draws its noise from ``jax.random.fold_in(key, i)``, so the
result does not depend on ``chunk``. With a ``mesh`` the batch is split over its data axis.

References:
  Ho & Salimans 2022, "Classifier-Free Diffusion Guidance", Eq. 6 (see ``guidance``).
  Lin et al. 2024, "Common Diffusion Noise Schedules and Sample Steps are Flawed", Eq. 16
  (``guidance_rescale``).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from tqdm.auto import tqdm

from jaxadapt.diffusion import base, guidance
from jaxadapt.sharding import DATA

DenoiseFn = Callable[[jax.Array, jax.Array, Any], jax.Array]


def _split_static(tree) -> tuple[list, tuple]:
  """(array leaves, hashable rest) of a pytree, so arrays become jit arguments, the rest static."""
  leaves, treedef = jax.tree_util.tree_flatten(tree)
  is_array = tuple(isinstance(x, jax.Array) or hasattr(x, "__array__") for x in leaves)
  arrays = [x for x, a in zip(leaves, is_array) if a]
  rest = tuple(None if a else x for x, a in zip(leaves, is_array))
  return arrays, (treedef, is_array, rest)


def _join_static(arrays: list, static: tuple):
  treedef, is_array, rest = static
  it = iter(arrays)
  leaves = [next(it) if a else x for a, x in zip(is_array, rest)]
  return jax.tree_util.tree_unflatten(treedef, leaves)


@functools.partial(jax.jit, static_argnames=("fn_static", "scheduler", "batch_sharding"))
def _run_chunk(fn_arrays, carry, step_indices, cond, uncond, scale, rescale, key, inpaint, *,
               fn_static, scheduler, batch_sharding):
  """Runs the steps ``step_indices`` as one lax.scan; carry = (x, scheduler state)."""
  denoise_fn = _join_static(fn_arrays, fn_static)

  def body(carry, i):
    x, state = carry
    batch = x.shape[0]
    t = state.timesteps[i]
    x_in = scheduler.scale_model_input(state, x, i)
    if uncond is None:
      out = denoise_fn(x_in, jnp.broadcast_to(t, (batch,)), cond)
    else:
      both = jax.tree_util.tree_map(lambda c, u: jnp.concatenate([c, u]), cond, uncond)
      out2 = denoise_fn(jnp.concatenate([x_in, x_in]), jnp.broadcast_to(t, (2 * batch,)), both)
      out = guidance.guide_model_output(out2[batch:], out2[:batch], scale, x.shape, rescale)
    if out.shape != x.shape and not scheduler.uses_learned_variance:
      out, _ = base.split_learned_variance(out, x, who="sample")  # as diffusers' DiTPipeline
    step_key = None if key is None else jax.random.fold_in(key, i)
    x_next, state = scheduler.step(state, out, i, x, step_key)
    x = x_next.astype(x.dtype)  # Euler/DPM return the output's dtype, as diffusers does
    if inpaint is not None:
      x = _keep_known(scheduler, state, x, i, *inpaint)
    if batch_sharding is not None:
      x = jax.lax.with_sharding_constraint(x, batch_sharding)
    return (x, state), None

  carry, _ = jax.lax.scan(body, carry, step_indices)
  return carry


def _keep_known(scheduler, state, x, i, known_x0, mask, noise):
  """x after step i with the known region replaced (RePaint-style blending, as diffusers'
  ``StableDiffusionInpaintPipeline`` for a U-Net without mask channels).

  The known region is ``known_x0`` forward-noised to step i + 1's noise level with the run's own
  initial noise (``scheduler.add_noise``), and ``known_x0`` itself after the last step:
  x = (1 - m) * known + m * x, m = 1 where the image is repainted.
  """
  n = state.timesteps.shape[0]
  j = i + 1
  noised = scheduler.add_noise(state, known_x0, noise, jnp.minimum(j, n - 1))
  known = jnp.where(j < n, noised, known_x0)
  return ((1 - mask) * known + mask * x).astype(x.dtype)


def check_inpaint(scheduler, inpaint, latents: jax.Array):
  """(known x0, mask, noise) as float arrays, checked against the latents; None stays None.

  Raises:
    ValueError: the scheduler has no ``add_noise`` or a shape does not fit (naming both).
  """
  if inpaint is None:
    return None
  if not scheduler.supports_add_noise:
    raise ValueError(
        f"inpainting needs a scheduler with add_noise at a step (one model evaluation per step);"
        f" got {type(scheduler).__name__}. Use one of DDIMScheduler, DDPMScheduler,"
        " EulerDiscreteScheduler, EulerAncestralDiscreteScheduler, DPMSolverMultistepScheduler"
        " (generate(scheduler=\"ddim\" | \"ddpm\" | \"euler\" | \"euler-a\" | \"dpm++2m\")).")
  if not isinstance(inpaint, (tuple, list)) or len(inpaint) != 3:
    raise ValueError("sample: inpaint must be (known_x0, mask, noise); got"
                     f" {type(inpaint).__name__}.")
  known, mask, noise = (jnp.asarray(a, latents.dtype) for a in inpaint)
  b, c, *spatial = latents.shape
  if known.shape != latents.shape or noise.shape != latents.shape:
    raise ValueError(f"sample: inpaint known_x0 and noise must have the latents' shape"
                     f" {latents.shape}; got {known.shape} and {noise.shape}.")
  if mask.shape not in ((b, 1, *spatial), latents.shape):
    raise ValueError(f"sample: the inpaint mask must be [{b}, 1, {', '.join(map(str, spatial))}]"
                     f" (1 = repaint) or the latents' shape; got {mask.shape}.")
  return known, mask, noise


def with_custom_schedule(scheduler, num_steps, timesteps=None, sigmas=None):
  """(scheduler with the custom schedule set, its N); just (scheduler, num_steps) without one.

  As diffusers' ``retrieve_timesteps``: a custom schedule sets the number of steps; a
  ``num_steps`` that disagrees with it raises a ValueError.
  """
  if timesteps is None and sigmas is None:
    if num_steps is None and scheduler.custom_num_steps is not None:
      return scheduler, scheduler.custom_num_steps
    return scheduler, num_steps
  if timesteps is not None and sigmas is not None:
    raise ValueError("pass custom timesteps= or sigmas=, not both (as diffusers).")
  if hasattr(timesteps, "detach") or hasattr(sigmas, "detach"):  # torch tensors
    timesteps, sigmas = [None if v is None else v.detach().cpu().numpy()
                         for v in (timesteps, sigmas)]
  scheduler = dataclasses.replace(
      scheduler, custom_timesteps=None if timesteps is None else tuple(np.ravel(timesteps)),
      custom_sigmas=None if sigmas is None else tuple(np.ravel(sigmas)))
  n = scheduler.custom_num_steps
  if num_steps is not None and num_steps != n:
    raise ValueError(f"num_steps={num_steps!r} disagrees with the custom schedule's {n} steps;"
                     " pass num_steps=None (the schedule sets it).")
  return scheduler, n


def check_guidance_rescale(value) -> jax.Array | None:
  """guidance_rescale as a float32 scalar, or None for 0 (plain guidance); ValueError if bad."""
  number = (isinstance(value, (int, float, np.integer, np.floating))
            and not isinstance(value, (bool, np.bool_)) and np.isfinite(value))
  if not number or not 0 <= value <= 1:
    raise ValueError(f"guidance_rescale must be a float in [0, 1] (Lin et al. 2024 Eq. 16: 0 is"
                     f" plain guidance, 0.7 their choice); got {value!r}.")
  return None if value == 0 else jnp.float32(value)


def _check_batch(name: str, tree, batch: int) -> None:
  for leaf in jax.tree_util.tree_leaves(tree):
    if jnp.ndim(leaf) == 0 or jnp.shape(leaf)[0] != batch:
      raise ValueError(
          f"sample: every leaf of {name} must have the batch size {batch} as its leading dim; got"
          f" shape {jnp.shape(leaf)}."
      )


def sample(
    denoise_fn: DenoiseFn,
    scheduler,
    latents: jax.Array,
    cond: Any,
    uncond: Any,
    guidance_scale: jax.Array | float | None,
    num_steps: int | None,
    key: jax.Array | None,
    *,
    chunk: int = 10,
    mesh: Mesh | None = None,
    data_axis: str = DATA,
    progress: bool = False,
    guidance_rescale: float = 0.0,
    timesteps=None,
    sigmas=None,
    inpaint: tuple[jax.Array, jax.Array, jax.Array] | None = None,
) -> jax.Array:
  """Samples with a scheduler and classifier-free guidance, one guidance scale per sample.

  Each step evaluates ``denoise_fn`` once on the doubled batch ``[x; x]`` with conditioning
  ``[cond; uncond]`` and combines the halves with ``guidance.guide_model_output``
  (uncond + s * (cond - uncond); Ho & Salimans 2022 Eq. 6). For a learned-sigma model (2C output
  channels, DiT) only the first C channels are guided; the conditional variance half goes to
  schedulers that use it (``DDPMScheduler`` with "learned"/"learned_range") and is dropped for the
  others, as diffusers' ``DiTPipeline`` drops it.

  Args:
    denoise_fn: ``denoise_fn(x, t, cond) -> model_output`` with x [2B, ...], t [2B] (the
      scheduler's timestep dtype: int32, float32 for Euler) and cond the concatenated
      conditioning. A closure works; ``jax.tree_util.Partial(apply, params)`` keeps ``params`` as
      jit arguments rather than compiled-in constants. Compiled code is cached on the
      function's identity: reuse one function object across calls to avoid recompiling.
    scheduler: a jaxadapt scheduler (e.g. ``DDIMScheduler.from_config(...)``).
    latents: [B, ...] initial noise from N(0, I); multiplied by the scheduler's
      ``init_noise_sigma`` here, as diffusers' pipelines do.
    cond: pytree of conditioning, each leaf [B, ...] (e.g. class labels, text embeddings).
    uncond: pytree like ``cond`` for the unconditional branch (e.g. the null class 1000), or
      None for no guidance (one forward pass of B; ``guidance_scale`` must then be None).
    guidance_scale: scalar or [B] scale per sample (diffusers' ``guidance_scale``).
    num_steps: number of sampling steps N (None with ``timesteps``/``sigmas``, which set it).
    key: PRNG key; step i uses ``jax.random.fold_in(key, i)``. May be None for deterministic
      schedulers.
    chunk: steps per compiled ``lax.scan`` call (the progress bar advances between calls).
    mesh: optional mesh; the batch is split over ``data_axis`` (B must divide evenly).
    data_axis: the mesh axis for the batch.
    progress: show a tqdm bar.
    guidance_rescale: phi of rescaled guidance (Lin et al. 2024 Eq. 16; diffusers'
      ``guidance_rescale``), in [0, 1]; 0 is plain CFG. Needs ``uncond``.
    timesteps: custom model timesteps [N], largest first, as diffusers' ``timesteps=`` (DDPM,
      Euler, Heun, DPM-Solver); replaces the scheduler's spacing.
    sigmas: custom noise levels [N + 1] (the last one included), as diffusers' ``sigmas=``
      (Euler).
    inpaint: None, or (known_x0 [B, ...], mask [B, 1, ...], noise [B, ...]) for inpainting with
      a model that has no mask channels: after every step the region where mask = 0 is replaced
      by known_x0 forward-noised to the next step's noise level with ``noise`` (the initial
      noise, ``latents``), and by known_x0 after the last step, as diffusers'
      ``StableDiffusionInpaintPipeline`` does for a 4-channel U-Net. Needs a scheduler with
      ``add_noise`` (DDPM, DDIM, Euler, Euler ancestral, DPM-Solver multistep).

  Returns:
    [B, ...] final latents x_0 (not yet divided by a VAE scaling factor).
  """
  latents = jnp.asarray(latents)
  batch = latents.shape[0]
  if not isinstance(chunk, int) or chunk < 1:
    raise ValueError(f"sample: chunk must be a positive int; got {chunk!r}.")
  if uncond is None:
    if guidance_scale is not None:
      raise ValueError("sample: guidance_scale needs uncond; pass uncond or guidance_scale=None.")
    scale = None
  else:
    _check_batch("cond", cond, batch)
    _check_batch("uncond", uncond, batch)
    if jax.tree_util.tree_structure(cond) != jax.tree_util.tree_structure(uncond):
      raise ValueError("sample: cond and uncond must have the same pytree structure.")
    scale = guidance.per_sample_scale(guidance_scale, batch, 1, jnp.float32)
  rescale = check_guidance_rescale(guidance_rescale)
  if rescale is not None and uncond is None:
    raise ValueError(f"sample: guidance_rescale={guidance_rescale!r} rescales guided predictions,"
                     " but there is no guidance (uncond is None); pass uncond or drop it.")

  scheduler, num_steps = with_custom_schedule(scheduler, num_steps, timesteps, sigmas)
  inpaint = check_inpaint(scheduler, inpaint, latents)
  state = scheduler.init_state(num_steps, latents)
  x = (latents * state.init_noise_sigma).astype(latents.dtype)
  batch_sharding = None
  if mesh is not None:
    n = mesh.shape[data_axis]
    if batch % n:
      raise ValueError(
          f"sample: batch {batch} must divide evenly over mesh axis {data_axis!r} of size {n}.")
    batch_sharding = NamedSharding(mesh, P(data_axis))
    put = lambda a: jax.device_put(a, batch_sharding)  # noqa: E731
    x = put(x)
    cond, uncond, scale, inpaint = jax.tree_util.tree_map(put, (cond, uncond, scale, inpaint))
  fn_arrays, fn_static = _split_static(denoise_fn)

  carry = (x, state)
  # Model evaluations: N for most schedulers; Heun/KDPM2 take 2N - 1, PNDM N + 1 (PLMS) or N + 9.
  num_evals = int(state.timesteps.shape[0])
  with tqdm(total=num_evals, disable=not progress, desc="sampling") as bar:
    for start in range(0, num_evals, chunk):
      stop = min(start + chunk, num_evals)
      carry = _run_chunk(fn_arrays, carry, jnp.arange(start, stop, dtype=jnp.int32), cond, uncond,
                         scale, rescale, key, inpaint, fn_static=fn_static, scheduler=scheduler,
                         batch_sharding=batch_sharding)
      if progress:
        jax.block_until_ready(carry[0])
      bar.update(stop - start)
  return carry[0]
