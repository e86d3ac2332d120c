"""Classifier-free guidance with a guidance scale per sample.

References:
  Ho & Salimans 2022, "Classifier-Free Diffusion Guidance", Eq. 6:
  eps~ = (1 + w) eps(z, c) - w eps(z). diffusers (and jaxadapt) write it with s = 1 + w as
  eps~ = eps(z) + s (eps(z, c) - eps(z)), so s = 1 is the plain conditional model.
  Lin et al. 2024, "Common Diffusion Noise Schedules and Sample Steps are Flawed", Sec. 3.4,
  Eq. 15-16 (rescaled guidance, diffusers' ``guidance_rescale``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxadapt.diffusion import base


def per_sample_scale(scale: jax.Array | float, batch: int, ndim: int, dtype) -> jax.Array:
  """Guidance scale(s) as a [B, 1, ..., 1] array that broadcasts over a [B, ...] batch.

  Args:
    scale: a scalar (same for every sample) or a [B] array.
    batch: B.
    ndim: rank of the arrays it multiplies.
    dtype: result dtype.

  Returns:
    [B] + [1] * (ndim - 1) array.
  """
  scale = jnp.asarray(scale, dtype)
  if scale.ndim == 0:
    scale = jnp.broadcast_to(scale, (batch,))
  if scale.shape != (batch,):
    raise ValueError(
        f"guidance scale must be a scalar or one value per sample, shape ({batch},); got shape"
        f" {scale.shape}."
    )
  return scale.reshape((batch,) + (1,) * (ndim - 1))


def cfg_combine(eps_uncond: jax.Array, eps_cond: jax.Array, scale: jax.Array | float) -> jax.Array:
  """Classifier-free guidance: eps_uncond + scale * (eps_cond - eps_uncond), per sample.

  Ho & Salimans 2022 Eq. 6 with scale = 1 + w (diffusers' ``guidance_scale``).

  Args:
    eps_uncond: [B, ...] unconditional prediction.
    eps_cond: [B, ...] conditional prediction.
    scale: scalar or [B] guidance scale per sample.

  Returns:
    [B, ...] guided prediction in the predictions' dtype.
  """
  if eps_uncond.shape != eps_cond.shape:
    raise ValueError(
        f"cfg_combine: eps_uncond and eps_cond must have the same shape; got {eps_uncond.shape}"
        f" and {eps_cond.shape}."
    )
  s = per_sample_scale(scale, eps_cond.shape[0], eps_cond.ndim, eps_cond.dtype)
  return eps_uncond + s * (eps_cond - eps_uncond)


def rescale_guidance(guided: jax.Array, cond: jax.Array, phi: jax.Array | float) -> jax.Array:
  """Rescaled classifier-free guidance (Lin et al. 2024, Sec. 3.4, Eq. 15-16).

  x_rescaled = x_cfg * std(x_pos) / std(x_cfg) (Eq. 15), then
  x_final = phi x_rescaled + (1 - phi) x_cfg (Eq. 16): the guided prediction keeps the
  conditional prediction's std, which stops over-exposure with zero-terminal-SNR schedules.
  Stds are per sample over all other axes, with Bessel's correction (as diffusers'
  ``rescale_noise_cfg``, torch's ``std``).

  Args:
    guided: [B, ...] the CFG prediction x_cfg.
    cond: [B, ...] the conditional prediction x_pos.
    phi: the rescale factor in [0, 1] (diffusers' ``guidance_rescale``; 0 leaves x_cfg).

  Returns:
    [B, ...] in ``guided``'s dtype.
  """
  if guided.shape != cond.shape:
    raise ValueError(f"rescale_guidance: guided and cond must have the same shape; got"
                     f" {guided.shape} and {cond.shape}.")
  axes = tuple(range(1, guided.ndim))
  g = guided.astype(jnp.float32)
  std_cond = jnp.std(cond.astype(jnp.float32), axis=axes, keepdims=True, ddof=1)
  std_cfg = jnp.std(g, axis=axes, keepdims=True, ddof=1)
  out = phi * (g * (std_cond / std_cfg)) + (1 - phi) * g
  return out.astype(guided.dtype)


def guide_model_output(
    out_uncond: jax.Array, out_cond: jax.Array, scale: jax.Array | float, sample_shape,
    rescale: jax.Array | float | None = None,
) -> jax.Array:
  """CFG on a model output that may carry a learned variance (2C channels, DiT).

  Outputs shaped like the sample are combined with ``cfg_combine``. A learned-sigma output with
  twice the sample's channels on one axis is guided on its first C channels (the epsilon or v
  prediction) only; the variance half is taken from the conditional output.

  This is what diffusers' ``DiTPipeline`` does: it applies the formula to
  ``noise_pred[:, :latent_channels]`` only and keeps each half of the batch's own variance
  channels, so the conditional sample it returns carries the conditional variance (the original
  DiT code does the same but guides only the first 3 of the 4 latent channels, a known quirk
  diffusers does not copy). The pipeline then drops the variance channels before
  ``scheduler.step``, so in diffusers the learned variance never reaches the scheduler (and
  ``DiTPipeline`` with ``DDPMScheduler(variance_type="learned_range")`` fails with a TypeError,
  checked with diffusers 0.42.1). jaxadapt's ``sample`` passes it on to schedulers that use it
  (DDPM "learned_range", as the DiT paper's 250-step sampler does) and drops it for the others,
  like the pipeline.

  Args:
    out_uncond: [B, ...] unconditional model output.
    out_cond: [B, ...] conditional model output.
    scale: scalar or [B] guidance scale.
    sample_shape: shape of the sample x_t, to find the channel axis of a 2C output.
    rescale: None, or the ``rescale_guidance`` factor phi applied to the guided prediction
      (diffusers' ``guidance_rescale``).

  Returns:
    The guided output, shaped like the model outputs.
  """
  def combine(u, c):
    guided = cfg_combine(u, c, scale)
    return guided if rescale is None else rescale_guidance(guided, c, rescale)

  if tuple(out_cond.shape) == tuple(sample_shape):
    return combine(out_uncond, out_cond)
  axis = base.channel_axis_of(out_cond.shape, tuple(sample_shape), who="guide_model_output")
  c = sample_shape[axis]
  eps_u = jax.lax.slice_in_dim(out_uncond, 0, c, axis=axis)
  eps_c = jax.lax.slice_in_dim(out_cond, 0, c, axis=axis)
  var_c = jax.lax.slice_in_dim(out_cond, c, 2 * c, axis=axis)
  return jnp.concatenate([combine(eps_u, eps_c), var_c], axis=axis)
