"""Edge cases of `generate` and `save_image_grid` a diffusers user meets, on the tiny pipelines.

Numbers are checked against diffusers from the same initial noise (uint8 images within TOL, as
in `test_pipeline.py`); bad input must raise an error naming what was expected and what was found.
Runs use one image and mostly one step with guidance on (`QUICK`), so that they share compiled
sampling loops and the file stays fast.
"""
import dataclasses

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
Image = pytest.importorskip("PIL.Image")

from test_pipeline import SWAP, TOL, _diff, _noise, _swap_scheduler, _uint8

import jaxadapt as ja
from jaxadapt.diffusion import DDIMScheduler

QUICK = {"num_steps": 1, "progress": False, "scheduler": "dpm++2m"}


def _diffusers_sd(ref, prompt, latents, **kw):
  with torch.no_grad():
    return _uint8(ref(prompt, latents=latents, output_type="np", **kw).images)


# ----------------------------------------------------------------------------- numbers

@pytest.mark.parametrize("scheduler,steps,scale", [
    (None, 1, 1.0),       # guidance off at 1: the conditional pass alone, as diffusers
    (None, 1, 0.0),       # and at 0 (diffusers: guidance_scale > 1 turns it on)
    ("dpm++2m", 1, 6.0),  # one step: first order to sigma 0
])
def test_sd_few_steps_and_guidance_off_match_diffusers(sd, scheduler, steps, scale):
  _, ref, pipe = sd
  latents = _noise((1, 4, 8, 8), seed=21)
  _swap_scheduler(ref, SWAP[scheduler])
  want = _diffusers_sd(ref, "a cat", latents, num_inference_steps=steps, guidance_scale=scale)
  got = pipe.generate("a cat", num_steps=steps, guidance_scale=scale, latents=latents.numpy(),
                      scheduler=scheduler, progress=False)
  assert _diff(got, want) <= TOL


def test_diffusers_scheduler_object_runs_as_its_name(sd):
  """`scheduler=DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)`, the diffusers
  idiom, gives what `scheduler="dpm++2m"` gives (which matches diffusers, test_pipeline.py)."""
  _, ref, pipe = sd
  _swap_scheduler(ref, diffusers.DDIMScheduler)
  obj = diffusers.DPMSolverMultistepScheduler.from_config(ref.scheduler.config)
  kw = {"num_steps": 1, "progress": False, "seed": 3}
  np.testing.assert_array_equal(pipe.generate("a cat", scheduler=obj, **kw),
                                pipe.generate("a cat", scheduler="dpm++2m", **kw))
  with pytest.raises(ValueError, match=r"a diffusers scheduler object of one of those classes.*"
                                       r"got a LCMScheduler\.$"):
    pipe.generate("a cat", scheduler=diffusers.LCMScheduler(), num_steps=1)


def test_eta_reaches_ddim(sd):
  """diffusers' `eta=`: DDIM's noise weight (Song et al. Eq. 16), drawn from the seed; refused
  by the other schedulers. From fixed latents only the DDIM noise depends on the seed."""
  _, _, pipe = sd
  trailing = DDIMScheduler.from_config(pipe.scheduler_config, timestep_spacing="trailing")
  kw = {"num_steps": 2, "progress": False, "latents": _noise((1, 4, 8, 8), seed=8).numpy(),
        "scheduler": trailing}
  noisy = pipe.generate("a cat", eta=1.0, seed=1, **kw)
  np.testing.assert_array_equal(noisy, pipe.generate("a cat", eta=1.0, seed=1, **kw))
  assert _diff(noisy, pipe.generate("a cat", eta=1.0, seed=2, **kw)) > 10 * TOL
  kw["scheduler"] = dataclasses.replace(trailing, eta=1.0)  # the same run, eta in the object
  np.testing.assert_array_equal(noisy, pipe.generate("a cat", seed=1, **kw))
  # eta=0 (diffusers' default) is accepted by every scheduler; other values only by DDIM.
  np.testing.assert_array_equal(pipe.generate("a cat", eta=0.0, **QUICK),
                                pipe.generate("a cat", **QUICK))
  with pytest.raises(ValueError, match=r"eta=0\.5 is DDIM's noise weight, but the scheduler is"
                                       r" EulerDiscreteScheduler; pass scheduler=\"ddim\""):
    pipe.generate("a cat", eta=0.5, scheduler="euler", num_steps=1)
  with pytest.raises(ValueError, match=r"eta must be a finite float >= 0.*got -1"):
    pipe.generate("a cat", eta=-1, **QUICK)


def test_lora_scale(sd):
  """`lora_scale` multiplies alpha / r (PEFT's set_scale): 0 is the base model exactly, 0.5 the
  adapter with half its alpha."""
  _, _, pipe = sd
  cfg = ja.LoraConfig(r=2, lora_alpha=4.0, target_modules=("to_q", "to_v", "to_out.0"))
  fresh = ja.init_lora(pipe.unet, cfg)
  leaves, treedef = jax.tree_util.tree_flatten(fresh.weights)
  keys = jax.random.split(jax.random.key(1), len(leaves))
  weights = jax.tree_util.tree_unflatten(
      treedef, [0.3 * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)])
  adapter = ja.LoraAdapter(weights=weights, config=cfg)
  half = ja.LoraAdapter(weights=weights, config=dataclasses.replace(cfg, lora_alpha=2.0))
  kw = {**QUICK, "seed": 4}  # DPM-Solver, one step to sigma 0: the model output decides
  base = pipe.generate("a cat", **kw)
  full = pipe.generate("a cat", adapter=adapter, **kw)
  assert _diff(full, base) > 10 * TOL  # the adapter matters
  np.testing.assert_array_equal(pipe.generate("a cat", adapter=adapter, lora_scale=0.0, **kw),
                                base)
  assert _diff(pipe.generate("a cat", adapter=adapter, lora_scale=0.5, **kw),
               pipe.generate("a cat", adapter=half, **kw)) <= 1
  with pytest.raises(ValueError, match=r"lora_scale=0\.5 scales adapter=, but no adapter"):
    pipe.generate("a cat", lora_scale=0.5, **QUICK)
  with pytest.raises(ValueError, match=r"lora_scale must be a finite float.*got nan"):
    pipe.generate("a cat", adapter=adapter, lora_scale=float("nan"), **QUICK)


def test_seed_none_draws_a_random_seed(sd):
  _, _, pipe = sd
  a = pipe.generate("a cat", seed=None, **QUICK)
  b = pipe.generate("a cat", seed=None, **QUICK)
  assert a.shape == (1, 16, 16, 3) and _diff(a, b) > 0
  with pytest.raises(TypeError, match=r"seed must be an int \(or None.*got Generator"):
    pipe.generate("a cat", seed=torch.Generator().manual_seed(0), **QUICK)


def test_dit_labels_as_tensor_or_array(dit):
  _, _, pipe = dit
  for labels in (torch.tensor([3, 207]), jax.numpy.array([3, 207]), np.array([[3], [207]]),
                 [3, "golden retriever"]):
    np.testing.assert_array_equal(pipe.label_ids(labels), [3, 207])


# ----------------------------------------------------------------------------- bad input

def test_bad_generate_arguments_are_refused(sd, dit):
  _, _, sdp = sd
  _, _, ditp = dit
  # A NaN or None guidance scale used to run and return NaN-cast garbage pixels.
  for bad in (float("nan"), None, [2.0, float("inf")]):
    with pytest.raises(ValueError, match=r"guidance_scale must be a finite float.*got"):
      sdp.generate(["a", "b"], guidance_scale=bad, **QUICK)
  # 1.5 images per prompt used to become 1.
  with pytest.raises(ValueError, match=r"num_images_per_prompt must be an int >= 1; got 1\.5"):
    sdp.generate("a", num_images_per_prompt=1.5, **QUICK)
  with pytest.raises(ValueError, match=r"num_steps must be a positive int; got 0"):
    sdp.generate("a", num_steps=0, progress=False)
  # A non-string negative prompt reached the tokenizer (an error about pretokenized input).
  with pytest.raises(TypeError, match=r"negative_prompt must be a string or a list of strings"):
    sdp.generate(["a", "b"], negative_prompt=3, **QUICK)
  # The length check no longer depends on guidance being on.
  with pytest.raises(ValueError, match="negative_prompt has 3 entries for 2 prompts"):
    sdp.generate(["a", "b"], negative_prompt=["x", "y", "z"], guidance_scale=1.0, **QUICK)
  with pytest.raises(ValueError, match=r"height must be a positive multiple of the VAE's"
                                       r" downsampling factor 2, in pixels; got '16'"):
    sdp.generate("a", height="16", **QUICK)
  with pytest.raises(ValueError, match=r"width .* got 15 \(e\.g\. use 14 or 16\)"):
    sdp.generate("a", width=15, **QUICK)
  # DiT: the latent must also split into patches; the error used to name latent sizes.
  with pytest.raises(ValueError, match=r"height must be a positive multiple of 4 \(the VAE's"
                                       r" downsampling factor 2 x the patch size 2\), in pixels;"
                                       r" got 18 \(e\.g\. use 16 or 20\)"):
    ditp.generate(class_labels=[3], height=18, width=16, **QUICK)
  with pytest.raises(ValueError, match=r"class labels must be ints in \[0, 1000\).*got True"):
    ditp.generate(class_labels=[True], **QUICK)


# ----------------------------------------------------------------------------- image grids

def test_save_image_grid_edge_shapes_and_dtypes(tmp_path):
  rng = np.random.default_rng(0)
  one = rng.integers(0, 256, (8, 6, 3), dtype=np.uint8)
  # One RGB image [H, W, 3] is one cell (it used to be read as 8 grayscale images 6 x 3).
  grid = ja.save_image_grid(one, tmp_path / "one.png")
  np.testing.assert_array_equal(grid, one)
  with Image.open(tmp_path / "one.png") as im:
    np.testing.assert_array_equal(np.asarray(im), one)
  two = rng.integers(0, 256, (2, 8, 6, 3), dtype=np.uint8)
  grid = ja.save_image_grid(two, tmp_path / "two.png", cols=np.int64(1))  # a column of two
  np.testing.assert_array_equal(grid, two.reshape(16, 6, 3))
  gray = rng.integers(0, 256, (3, 8, 6), dtype=np.uint8)  # [N, H, W] is still grayscale
  assert ja.save_image_grid(gray, tmp_path / "gray.png").shape == (16, 12, 1)
  # diffusers' output_type="np" images: floats in [0, 1], rounded as its numpy_to_pil rounds.
  floats = rng.random((3, 8, 6, 3)).astype(np.float32)
  floats[0, 0, 0] = [0.0, 1.0, 0.5 / 255]
  want = np.stack([np.asarray(p) for p in
                   diffusers.image_processor.VaeImageProcessor.numpy_to_pil(floats)])
  grid = ja.save_image_grid(floats, tmp_path / "floats.png", cols=3)
  np.testing.assert_array_equal(grid, np.concatenate(list(want), axis=1))
  with pytest.raises(ValueError, match=r"float images must lie in \[0, 1\].*got values in"
                                       r" \[-1, .*use `to_uint8`"):
    ja.save_image_grid(floats * 2 - 1, tmp_path / "bad.png")
  # cols=0 used to mean the default layout.
  with pytest.raises(ValueError, match=r"cols must be a positive int .*got 0"):
    ja.save_image_grid(two, tmp_path / "bad.png", cols=0)
