"""`load_pipeline(...).generate(...)` against diffusers' pipelines on tiny random models.

Tiny Stable Diffusion (U-Net + VAE + CLIP text model + a CLIP tokenizer written from a small
vocab) and DiT pipelines are assembled with diffusers, saved with `save_pretrained`, and reloaded
by both libraries; from the same initial noise the uint8 images must agree within 2 levels.
Each comparison also checks that the setting under test (guidance, adapter, negative prompt)
moves the image by far more than that, so a match is not an accident of saturated pixels.

The tiny pipelines (`sd`, `dit`) are session fixtures in `conftest.py`, shared with
`test_pipeline_edges.py`.
"""
import copy
import json
import os

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")
Image = pytest.importorskip("PIL.Image")

import jaxadapt as ja  # noqa: E402
from jaxadapt.diffusion import images as images_lib  # noqa: E402
from jaxadapt.diffusion.pipeline import DiTPipeline, StableDiffusionPipeline  # noqa: E402
from jaxadapt.sharding import make_mesh  # noqa: E402

TOL = 2  # max abs difference of uint8 pixels
STEPS = 8
def _noise(shape, seed):
  return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _uint8(images_01):
  """diffusers' `output_type="np"` images in [0, 1] -> uint8, as its `numpy_to_pil` rounds."""
  return (np.asarray(images_01) * 255).round().astype(np.uint8)


def _diff(a, b):
  return int(np.abs(a.astype(np.int32) - b.astype(np.int32)).max())


def _swap_scheduler(ref, cls):
  ref.scheduler = cls.from_config(ref.scheduler.config)


SWAP = {None: diffusers.DDIMScheduler, "ddim": diffusers.DDIMScheduler,
        "dpm++2m": diffusers.DPMSolverMultistepScheduler,
        "euler": diffusers.EulerDiscreteScheduler, "unipc": diffusers.UniPCMultistepScheduler}


# ----------------------------------------------------------------------------- Stable Diffusion

def test_load_sd_pipeline(sd):
  d, _, pipe = sd
  assert isinstance(pipe, StableDiffusionPipeline)
  assert pipe.vae_scale_factor == 2 and pipe.latent_channels == 4
  assert type(pipe.default_scheduler).__name__ == "DDIMScheduler"
  ids = pipe.tokenizer(["a cat"], padding="max_length", max_length=12).input_ids[0]
  assert len(ids) == 12 and ids[4:] == [1] * 8  # padded with <|endoftext|>
  assert pipe.tokenizer.convert_ids_to_tokens(ids[:4]) == [
      "<|startoftext|>", "a</w>", "cat</w>", "<|endoftext|>"]


@pytest.mark.parametrize("scheduler,kw", [
    (None, {}),                                                      # the dir's DDIM
    ("dpm++2m", dict(negative_prompt=["red", "dog"], size=12)),      # 24 x 24 pixels
    ("euler", {}),                                                   # init_noise_sigma ~ 14.6
    # Lin et al. 2024 Eq. 16 (that it moves the result: test_diffusion_samplers; on this tiny
    # model the text barely changes the std that it rescales, 2 pixel levels).
    ("unipc", dict(guidance_rescale=0.7)),
    ("euler", dict(sigmas=[12.0, 6.0, 2.5, 1.0, 0.3, 0.0])),  # diffusers' custom sigmas=
])
def test_sd_matches_diffusers(sd, scheduler, kw):
  _, ref, pipe = sd
  kw = dict(kw)
  size = kw.pop("size", 8)
  prompts = ["a cat", "red dog"]
  latents = _noise((2, 4, size, size), seed=3)
  _swap_scheduler(ref, SWAP[scheduler])
  hw = {} if size == 8 else dict(height=2 * size, width=2 * size)
  with torch.no_grad():
    want = _uint8(ref(prompts, num_inference_steps=STEPS, guidance_scale=6.0, latents=latents,
                      output_type="np", **hw, **kw).images)
  got = pipe.generate(prompts, num_steps=STEPS, guidance_scale=6.0, latents=latents.numpy(),
                      scheduler=scheduler, progress=False, **hw, **kw)
  assert got.dtype == np.uint8 and got.shape == (2, 2 * size, 2 * size, 3)
  assert _diff(got, want) <= TOL
  if "negative_prompt" in kw:  # it matters: the empty-prompt uncond gives another image
    plain = pipe.generate(prompts, num_steps=STEPS, guidance_scale=6.0, latents=latents.numpy(),
                          scheduler=scheduler, progress=False, **hw)
    assert _diff(plain, got) > 10 * TOL


def test_sd15_dir_with_its_pndm_scheduler_matches_diffusers(sd, tmp_path):
  """A Stable Diffusion 1.x dir as published ships PNDMScheduler (PLMS, skip_prk_steps):
  load_pipeline runs it as the dir's own scheduler, equal to diffusers' pipeline."""
  d, ref, _ = sd
  sd15 = {"_class_name": "PNDMScheduler", "beta_start": 0.00085, "beta_end": 0.012,
          "beta_schedule": "scaled_linear", "num_train_timesteps": 1000,
          "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1,
          "trained_betas": None, "clip_sample": False}
  for name in ("unet", "vae", "text_encoder", "tokenizer"):
    os.symlink(os.path.join(d, name), tmp_path / name)
  (tmp_path / "scheduler").mkdir()
  (tmp_path / "scheduler" / "scheduler_config.json").write_text(json.dumps(sd15))
  with open(os.path.join(d, "model_index.json")) as f:
    index = json.load(f)
  index["scheduler"] = ["diffusers", "PNDMScheduler"]
  (tmp_path / "model_index.json").write_text(json.dumps(index))
  pipe = ja.load_pipeline(tmp_path)
  assert type(pipe.default_scheduler).__name__ == "PNDMScheduler"
  latents = _noise((2, 4, 8, 8), seed=5)
  own = ref.scheduler  # later tests swap from the dir's own config: put it back
  ref.scheduler = diffusers.PNDMScheduler.from_config(sd15)
  try:
    with torch.no_grad():
      want = _uint8(ref(["a cat", "red dog"], num_inference_steps=STEPS, guidance_scale=6.0,
                        latents=latents, output_type="np").images)
  finally:
    ref.scheduler = own
  got = pipe.generate(["a cat", "red dog"], num_steps=STEPS, guidance_scale=6.0,
                      latents=latents.numpy(), progress=False)
  assert _diff(got, want) <= TOL
  ddim = pipe.generate(["a cat", "red dog"], num_steps=STEPS, guidance_scale=6.0,
                       latents=latents.numpy(), scheduler="ddim", progress=False)
  assert _diff(ddim, got) > 0  # the dir's PNDM ran, not a fallback


def test_sd_per_sample_guidance_matches_diffusers_per_sample(sd):
  """One batch with scales [1, 7.5] equals two diffusers runs, one scale each (a scale of 1
  switches diffusers' guidance off, so sample 0 is the conditional model alone)."""
  _, ref, pipe = sd
  prompts, scales = ["a cat", "red dog"], [1.0, 7.5]
  latents = _noise((2, 4, 8, 8), seed=4)
  _swap_scheduler(ref, diffusers.DDIMScheduler)
  got = pipe.generate(prompts, num_steps=STEPS, guidance_scale=np.array(scales),
                      latents=latents.numpy(), progress=False)

  def diffusers_one(i, scale):
    with torch.no_grad():
      return _uint8(ref(prompts[i], num_inference_steps=STEPS, guidance_scale=scale,
                        latents=latents[i:i + 1], output_type="np").images)

  for i, s in enumerate(scales):
    assert _diff(got[i:i + 1], diffusers_one(i, s)) <= TOL, i
  assert _diff(got[1:2], diffusers_one(1, 1.0)) > 10 * TOL  # guidance matters


def test_sd_lora_adapter_matches_peft(sd, tmp_path):
  """A PEFT LoRA on the U-Net's attention, loaded with `ja.load_adapter`, equals diffusers'
  pipeline running the PEFT-wrapped U-Net."""
  peft = pytest.importorskip("peft")
  d, _, pipe = sd
  ref = diffusers.StableDiffusionPipeline.from_pretrained(d, safety_checker=None)
  ref.set_progress_bar_config(disable=True)
  torch.manual_seed(5)
  cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["to_q", "to_k", "to_v", "to_out.0"],
                        init_lora_weights=False)
  lora_unet = peft.get_peft_model(ref.unet, cfg).eval()  # wraps ref.unet's layers in place
  lora_unet.save_pretrained(str(tmp_path / "lora"))
  adapter = ja.load_adapter(str(tmp_path / "lora"))
  latents = _noise((1, 4, 8, 8), seed=6)
  with torch.no_grad():
    want = _uint8(ref("a cat", num_inference_steps=STEPS, guidance_scale=5.0, latents=latents,
                      output_type="np").images)
  got = pipe.generate("a cat", num_steps=STEPS, guidance_scale=5.0, latents=latents.numpy(),
                      adapter=adapter, progress=False)
  assert _diff(got, want) <= TOL
  base = pipe.generate("a cat", num_steps=STEPS, guidance_scale=5.0, latents=latents.numpy(),
                       progress=False)
  assert _diff(base, got) > 10 * TOL


def test_sd_seed_and_num_images_per_prompt(sd):
  _, _, pipe = sd
  a = pipe.generate(["a cat", "dog"], num_steps=2, num_images_per_prompt=2, seed=7,
                    progress=False)
  b = pipe.generate(["a cat", "dog"], num_steps=2, num_images_per_prompt=2, seed=7,
                    progress=False)
  assert a.shape == (4, 16, 16, 3)
  np.testing.assert_array_equal(a, b)  # the seed fixes the noise
  assert _diff(a[0], a[1]) > 0  # each image of a prompt has its own noise
  c = pipe.generate(["a cat", "dog"], num_steps=2, num_images_per_prompt=2, seed=8,
                    progress=False)
  assert _diff(a, c) > 0


# ----------------------------------------------------------------------------- DiT

def test_load_dit_pipeline(dit):
  _, _, pipe = dit
  assert isinstance(pipe, DiTPipeline)
  assert pipe.num_classes == 1000
  assert pipe.labels == {"tench": 0, "Tinca tinca": 0, "golden retriever": 207}
  np.testing.assert_array_equal(pipe.label_ids(["golden retriever", 3, "tench"]), [207, 3, 0])


@pytest.mark.parametrize("scheduler", [None, "dpm++2m"])
def test_dit_matches_diffusers(dit, scheduler):
  """diffusers' DiTPipeline draws its noise with `randn_tensor(shape, generator)`, i.e.
  `torch.randn` from the generator: the same draw is jaxadapt's `latents`."""
  _, ref, pipe = dit
  _swap_scheduler(ref, SWAP[scheduler])
  labels = [207, 3]
  with torch.no_grad():
    want = _uint8(ref(labels, guidance_scale=4.0, num_inference_steps=STEPS,
                      generator=torch.Generator().manual_seed(11), output_type="np").images)
    unguided = _uint8(ref(labels, guidance_scale=1.0, num_inference_steps=STEPS,
                          generator=torch.Generator().manual_seed(11), output_type="np").images)
  latents = _noise((2, 4, 8, 8), seed=11)
  got = pipe.generate(class_labels=["golden retriever", 3], num_steps=STEPS, guidance_scale=4.0,
                      latents=latents.numpy(), scheduler=scheduler, progress=False)
  assert got.dtype == np.uint8 and got.shape == (2, 16, 16, 3)
  assert _diff(got, want) <= TOL
  assert _diff(unguided, want) > 10 * TOL


def test_dit_per_sample_guidance_matches_diffusers_per_sample(dit):
  _, ref, pipe = dit
  _swap_scheduler(ref, diffusers.DDIMScheduler)
  labels, scales, seeds = [207, 0], [2.0, 5.0], [12, 13]
  latents = torch.cat([_noise((1, 4, 8, 8), seed=s) for s in seeds])
  got = pipe.generate(class_labels=labels, num_steps=STEPS, guidance_scale=scales,
                      latents=latents.numpy(), progress=False)
  for i in range(2):  # one diffusers run per sample, its noise drawn from seeds[i]
    with torch.no_grad():
      want = _uint8(ref([labels[i]], guidance_scale=scales[i], num_inference_steps=STEPS,
                        generator=torch.Generator().manual_seed(seeds[i]),
                        output_type="np").images)
    assert _diff(got[i:i + 1], want) <= TOL, i


@pytest.mark.skipif(jax.device_count() < 2, reason="needs 2 devices (XLA_FLAGS device count)")
def test_dit_sharded_batch_equals_unsharded(dit):
  _, _, pipe = dit
  mesh = make_mesh(data=2)
  kw = dict(class_labels=[1, 2, 3, 4], num_steps=3, seed=2, progress=False)
  np.testing.assert_array_equal(pipe.generate(mesh=mesh, **kw), pipe.generate(**kw))


# ----------------------------------------------------------------------------- images

def test_to_uint8_rounds_as_diffusers():
  x = np.array([-1.5, -1.0, -0.3, 0.0, 0.2, 0.999, 1.0, 3.0], np.float32).reshape(1, 1, 2, 4)
  vae = diffusers.image_processor.VaeImageProcessor()
  want = (vae.postprocess(torch.from_numpy(x).repeat(1, 3, 1, 1), output_type="np") * 255)
  got = images_lib.to_uint8(np.repeat(x, 3, axis=1))
  np.testing.assert_array_equal(got, want.round().astype(np.uint8))


def test_save_image_grid_writes_png(tmp_path):
  rng = np.random.default_rng(0)
  imgs = rng.integers(0, 256, (5, 8, 6, 3), dtype=np.uint8)
  path = tmp_path / "sub" / "grid.png"
  grid = ja.save_image_grid(imgs, path, cols=3)
  with Image.open(path) as im:
    assert im.format == "PNG" and im.size == (18, 16) and im.mode == "RGB"
    back = np.asarray(im)
  np.testing.assert_array_equal(back, grid)
  np.testing.assert_array_equal(back[8:16, 6:12], imgs[4])  # row 2, col 2
  np.testing.assert_array_equal(back[0:8, 12:18], imgs[2])
  assert not back[8:16, 12:18].any()  # the empty cell
  # default layout: ceil(sqrt(5)) = 3 columns; the zlib fallback writer makes the same PNG
  for c, shape in ((3, (8, 6, 3)), (1, (8, 6)), (4, (8, 6, 4))):
    one = rng.integers(0, 256, (8, 6, c), dtype=np.uint8)
    p = tmp_path / f"fallback{c}.png"
    p.write_bytes(images_lib.encode_png(one))
    with Image.open(p) as im:
      np.testing.assert_array_equal(np.asarray(im), one.reshape(shape))


# ----------------------------------------------------------------------------- errors

def test_bad_input_is_refused(sd, dit, tmp_path):
  _, _, sdp = sd
  _, _, ditp = dit
  with pytest.raises(ValueError, match="needs prompt="):
    sdp.generate(num_steps=1)
  with pytest.raises(ValueError, match="pass prompt=.*not class_labels"):
    sdp.generate(class_labels=[1], num_steps=1)
  with pytest.raises(ValueError, match="needs class_labels="):
    ditp.generate(num_steps=1)
  with pytest.raises(ValueError, match="class-conditional DiT pipeline.*not text prompts"):
    ditp.generate("a cat", num_steps=1)
  with pytest.raises(ValueError, match=r"latents must be .* = \(2, 4, 8, 8\).*got shape \(1, 4, 8"):
    sdp.generate(["a", "b"], latents=np.zeros((1, 4, 8, 8), np.float32), num_steps=1)
  with pytest.raises(ValueError, match=r"= \(1, 4, 8, 8\).*got shape \(1, 3, 8, 8\)"):
    ditp.generate(class_labels=[1], latents=np.zeros((1, 3, 8, 8), np.float32), num_steps=1)
  with pytest.raises(ValueError, match=r"= \(1, 4, 12, 12\).*got shape \(1, 4, 8, 8\)"):
    sdp.generate("a", height=24, width=24, latents=np.zeros((1, 4, 8, 8)), num_steps=1)
  with pytest.raises(ValueError, match="multiple of the VAE's downsampling factor 2"):
    sdp.generate("a", height=15, num_steps=1)
  with pytest.raises(ValueError, match=r"one value per prompt/label \(2\) or per image \(4\)"):
    sdp.generate(["a", "b"], num_images_per_prompt=2, guidance_scale=[1, 2, 3], num_steps=1)
  with pytest.raises(ValueError, match="not a label name"):
    ditp.generate(class_labels=["zebra"], num_steps=1)
  with pytest.raises(ValueError, match=r"ints in \[0, 1000\)"):
    ditp.generate(class_labels=[1000], num_steps=1)
  with pytest.raises(ValueError, match="scheduler must be None"):
    sdp.generate("a", scheduler="lcm", num_steps=1)
  with pytest.raises(ValueError, match="negative_prompt has 3 entries for 2 prompts"):
    sdp.generate(["a", "b"], negative_prompt=["x", "y", "z"], num_steps=1)
  lcm = copy.copy(sdp)  # a dir whose own scheduler jaxadapt does not implement
  lcm.scheduler_config = {**sdp.scheduler_config, "_class_name": "LCMScheduler"}
  with pytest.raises(ValueError, match=r"'LCMScheduler'.*pass generate\(scheduler=...\)"):
    lcm.generate("a", num_steps=1)
  with pytest.raises(ValueError, match=r"guidance_rescale must be a float in \[0, 1\]"):
    sdp.generate("a", guidance_rescale=-0.1, num_steps=1)


def test_load_pipeline_refuses_other_folders(sd, tmp_path):
  d, _, _ = sd
  with pytest.raises(ValueError, match=r"no model_index.json; the folder holds \['config.json'"):
    ja.load_pipeline(os.path.join(d, "unet"))
  with pytest.raises(ValueError, match="'KandinskyPipeline'"):
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "KandinskyPipeline"}))
    ja.load_pipeline(tmp_path)
  missing = tmp_path / "sd_without_vae"
  missing.mkdir()
  (missing / "model_index.json").write_text(json.dumps(
      {"_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"]}))
  (missing / "unet").mkdir()
  with pytest.raises(ValueError, match=r"without \['vae', 'text_encoder', 'tokenizer', 'sch"):
    ja.load_pipeline(missing)
  with pytest.raises(FileNotFoundError, match="is not a folder"):
    ja.load_pipeline(tmp_path / "nowhere")
