"""Inpainting with a plain U-Net (`generate(image=, mask_image=)`) against diffusers.

diffusers' `StableDiffusionInpaintPipeline` with a 4-channel U-Net replaces the kept region after
every step by the image latents forward-noised to the next timestep. Checked here: each
scheduler's `add_noise` at a step equals diffusers' (as its inpainting loop calls it), the mask
is resized as diffusers' mask processor does, the tiny SD pipeline inpaints as diffusers does
from the same noise (DDIM and Euler), and in pixel space the kept pixels are the input's exactly.
Fixtures (`sd`, `pixel_sd`) are in `conftest.py`.
"""
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from jaxadapt.diffusion.schedulers import scheduler_from_config  # noqa: E402

SCHED = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
         "clip_sample": False, "set_alpha_to_one": False, "steps_offset": 1}
STEPS = 4


def _diff(a, b):
  return int(np.abs(a.astype(np.int32) - b.astype(np.int32)).max())


@pytest.mark.parametrize("name", ["DDIMScheduler", "DDPMScheduler", "EulerDiscreteScheduler",
                                  "EulerAncestralDiscreteScheduler",
                                  "DPMSolverMultistepScheduler"])
def test_add_noise_at_step_matches_diffusers(name):
  rng = np.random.default_rng(0)
  x0, noise = (rng.standard_normal((2, 4, 4, 4)).astype(np.float32) for _ in range(2))
  ref = getattr(diffusers, name).from_config(SCHED)
  ref.set_timesteps(STEPS)
  sigma_based = hasattr(ref, "set_begin_index") and name not in ("DDIMScheduler",
                                                                 "DDPMScheduler")
  if sigma_based:
    ref.set_begin_index(0)  # as the inpainting pipeline's get_timesteps
  sched = scheduler_from_config(SCHED, class_name=name)
  state = sched.init_state(STEPS, jnp.asarray(x0))
  assert sched.supports_add_noise
  for j in range(STEPS):
    if sigma_based:
      ref._step_index = j  # after step j - 1 (diffusers reads it in add_noise)
    want = ref.add_noise(torch.from_numpy(x0), torch.from_numpy(noise),
                         ref.timesteps[j:j + 1]).numpy()
    got = np.asarray(sched.add_noise(state, jnp.asarray(x0), jnp.asarray(noise), j))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5, err_msg=f"{name} step {j}")


def test_mask_is_resized_as_diffusers(sd):
  _, _, pipe = sd
  from diffusers.image_processor import VaeImageProcessor
  mask = np.random.default_rng(1).random((13, 11)).astype(np.float32)  # not the image size
  proc = VaeImageProcessor(vae_scale_factor=2, do_normalize=False, do_binarize=True,
                           do_convert_grayscale=True)
  want = torch.nn.functional.interpolate(proc.preprocess(mask, height=16, width=16),
                                         size=(8, 8)).numpy()
  latents = np.zeros((1, 4, 8, 8), np.float32)
  _, got = pipe._inpaint_inputs(latents, mask, (2, 4, 8, 8))
  assert got.shape == (2, 1, 8, 8)
  np.testing.assert_array_equal(np.asarray(got), np.repeat(want, 2, axis=0))
  assert 0.2 < want.mean() < 0.8


@pytest.mark.parametrize("scheduler,cls", [("ddim", "DDIMScheduler"),
                                           ("euler", "EulerDiscreteScheduler")])
def test_sd_inpaint_matches_diffusers(sd, scheduler, cls):
  """Pixels in, the same image as diffusers' StableDiffusionInpaintPipeline given the VAE's
  posterior mean latents (diffusers samples the posterior; jaxadapt takes its mean)."""
  _, ref, pipe = sd
  rng = np.random.default_rng(2)
  image = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
  mask = np.zeros((16, 16), np.float32)
  mask[4:12, 2:10] = 1.0
  noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))
  pixels = torch.from_numpy(image.astype(np.float32) / 255 * 2 - 1).permute(2, 0, 1)[None]
  with torch.no_grad():
    known = ref.vae.encode(pixels).latent_dist.mean * ref.vae.config.scaling_factor
  components = {**ref.components,
                "scheduler": getattr(diffusers, cls).from_config(ref.scheduler.config)}
  inpaint = diffusers.StableDiffusionInpaintPipeline(**components)
  inpaint.set_progress_bar_config(disable=True)
  want = inpaint(["a cat"], image=known, masked_image_latents=known, mask_image=mask,
                 num_images_per_prompt=2, num_inference_steps=STEPS, guidance_scale=2.0,
                 latents=noise.clone(), output_type="np").images
  want = (np.asarray(want) * 255).round().astype(np.uint8)
  got = pipe.generate(["a cat"], image=image, mask_image=mask, num_images_per_prompt=2,
                      num_steps=STEPS, guidance_scale=2.0, latents=noise.numpy(),
                      scheduler=scheduler, progress=False)
  assert got.shape == (2, 16, 16, 3)
  assert _diff(got, want) <= 2
  if scheduler != "ddim":
    return
  plain = pipe.generate(["a cat"], num_images_per_prompt=2, num_steps=STEPS, guidance_scale=2.0,
                        latents=noise.numpy(), scheduler=scheduler, progress=False)
  assert _diff(plain, got) > 20  # the known region really steers the sample


def test_pixel_inpaint_keeps_the_unmasked_pixels_exactly(pixel_sd):
  _, _, _, pipe = pixel_sd
  rng = np.random.default_rng(4)
  image = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
  mask = np.zeros((8, 8), bool)
  mask[2:6, 3:7] = True
  out = pipe.generate(["a photo of sks face", "cats"], image=image, mask_image=mask,
                      num_images_per_prompt=2, num_steps=STEPS, guidance_scale=2.0, seed=5,
                      progress=False)
  assert out.shape == (4, 8, 8, 3)
  for img in out:
    np.testing.assert_array_equal(img[~mask], image[~mask])  # 48 kept pixels, bit for bit
    assert _diff(img[mask], image[mask]) > 20  # the 16 masked ones repainted


def test_inpaint_refuses_what_it_does_not_do(pixel_sd):
  _, _, _, pipe = pixel_sd
  image = np.zeros((8, 8, 3), np.uint8)
  mask = np.ones((8, 8), np.float32)
  kw = dict(num_steps=2, progress=False)
  with pytest.raises(ValueError, match="PNDMScheduler"):
    pipe.generate("a", image=image, mask_image=mask, scheduler="pndm", **kw)
  with pytest.raises(ValueError, match="strength=0.5 is not supported"):
    pipe.generate("a", image=image, mask_image=mask, strength=0.5, **kw)
  with pytest.raises(ValueError, match="needs both image= and mask_image="):
    pipe.generate("a", image=image, **kw)
  with pytest.raises(ValueError, match="image is 8x8 pixels; this run is 16x16"):
    pipe.generate("a", image=image, mask_image=mask, height=16, width=16, **kw)
  with pytest.raises(ValueError, match=r"mask_image values must lie in \[0, 1\]"):
    pipe.generate("a", image=image, mask_image=mask * 255, **kw)
  with pytest.raises(ValueError, match="image has 3 images for a batch of 2"):
    pipe.generate(["a", "b"], image=np.zeros((3, 8, 8, 3), np.uint8), mask_image=mask, **kw)
