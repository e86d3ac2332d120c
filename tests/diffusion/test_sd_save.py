"""`jaxadapt.io.diffusers_save`: models written without torch load in diffusers / transformers.

A tiny random U-Net and CLIP text encoder (every leaf perturbed, so norms and biases matter) are
written by jaxadapt; diffusers' `UNet2DConditionModel`, transformers' `CLIPTextModel` and
`CLIPTokenizer` read them back with outputs equal to jaxadapt's; the pixel-space
`StableDiffusionPipeline` folder loads in jaxadapt and in diffusers and both sample the same
images from the same noise. The pipeline is the `pixel_sd` fixture of `conftest.py`.
"""
import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

from jaxadapt.diffusion import images as images_lib  # noqa: E402
from jaxadapt.diffusion.pipeline import StableDiffusionPipeline  # noqa: E402
from jaxadapt.io import diffusers_save as ds  # noqa: E402
from jaxadapt.models.clip import CLIPTextEncoder, load_clip_text  # noqa: E402
from jaxadapt.models.unet import UNetConfig, load_unet  # noqa: E402


def _max_abs(a, b):
  return float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max())


def test_unet_dir_loads_in_diffusers_and_jaxadapt(pixel_sd):
  d, unet, _, _ = pixel_sd
  with open(os.path.join(d, "unet", "config.json")) as f:
    cfg = json.load(f)
  assert UNetConfig.from_config(cfg) == unet.config  # the config round-trips exactly
  back = load_unet(os.path.join(d, "unet"))
  jax.tree.map(np.testing.assert_array_equal, back.params, unet.params)  # exact weights

  ref = diffusers.UNet2DConditionModel.from_pretrained(os.path.join(d, "unet")).eval()
  rng = np.random.default_rng(0)
  x = rng.standard_normal((2, 3, 8, 8)).astype(np.float32)
  t = np.array([10, 700])
  text = rng.standard_normal((2, 5, 32)).astype(np.float32)
  with torch.no_grad():
    want = ref(torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(text)).sample.numpy()
  got = np.asarray(unet(x, t, text))
  assert np.abs(want).max() > 0.5  # a real output, not a zero map
  assert _max_abs(got, want) < 2e-5


def test_clip_text_dir_loads_in_transformers_and_jaxadapt(pixel_sd):
  d, _, text, pipe = pixel_sd
  back = load_clip_text(os.path.join(d, "text_encoder"))
  assert back.config == text.config
  jax.tree.map(np.testing.assert_array_equal, back.params, text.params)

  ref = transformers.CLIPTextModel.from_pretrained(os.path.join(d, "text_encoder")).eval()
  ids = pipe.tokenizer(["a photo of sks person", "cats at 3 attic"], padding="max_length",
                       max_length=12, return_tensors="np").input_ids
  with torch.no_grad():
    want = ref(torch.from_numpy(ids))
  got = text(ids)
  assert _max_abs(got.last_hidden_state, want.last_hidden_state.numpy()) < 2e-5
  assert _max_abs(got.pooler_output, want.pooler_output.numpy()) < 2e-5


def test_random_clip_text_encoder_has_the_loaders_tree(pixel_sd):
  _, _, text, _ = pixel_sd
  config = dataclasses.replace(text.config, num_hidden_layers=1)
  r = CLIPTextEncoder.random(config, seed=0)
  want = jax.tree.map(lambda a: a.shape, text.params)
  want["encoder"]["layers"] = {0: want["encoder"]["layers"][0]}
  assert jax.tree.map(lambda a: a.shape, r.params) == want
  assert r(np.array([[0, 5, 1]])).last_hidden_state.shape == (1, 3, 32)


def test_tokenizer_keeps_each_word_whole_and_round_trips(pixel_sd, pixel_words, tmp_path):
  d, _, _, pipe = pixel_sd
  tok = transformers.CLIPTokenizer.from_pretrained(os.path.join(d, "tokenizer"))
  vocab = ds.clip_vocab(pixel_words)
  assert len(tok) == len(vocab) and tok.model_max_length == 12
  for word in pixel_words:  # "at" / "cat" / "cats" / "attic" / "tic" share pieces
    assert tok(word).input_ids == [ds.CLIP_BOS_ID, vocab[word + "</w>"], ds.CLIP_EOS_ID], word
    assert tok(word.upper()).input_ids[1:-1] == [vocab[word + "</w>"]]  # CLIP lower-cases
  sentence = "a photo of sks person at 3"
  ids = tok(sentence).input_ids
  assert ids == [0] + [vocab[w + "</w>"] for w in sentence.split()] + [1]
  assert tok.decode(ids, skip_special_tokens=True) == sentence
  # A word outside the list still tokenizes, into smaller known pieces (no unknown token).
  other = tok("dog").input_ids[1:-1]
  assert len(other) > 1 and ds.CLIP_EOS_ID not in other
  assert tok.decode(other) == "dog"
  with pytest.raises(ValueError, match="lower-case letters"):
    ds.write_clip_tokenizer(["Face"], str(tmp_path / "bad"))


def test_pixel_pipeline_matches_diffusers(pixel_sd):
  """jaxadapt's generate on the folder equals diffusers' StableDiffusionPipeline (U-Net, CLIP and
  DDIM loop in torch; no VAE, so its output_type="latent" samples are the images)."""
  d, _, _, pipe = pixel_sd
  assert isinstance(pipe, StableDiffusionPipeline) and pipe.vae is None
  assert pipe.vae_scale_factor == 1 and pipe.latent_channels == 3
  with open(os.path.join(d, "model_index.json")) as f:
    assert json.load(f)["vae"] == [None, None]
  prompts = ["a photo of sks person", "cats at attic"]
  noise = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
  ref = diffusers.StableDiffusionPipeline.from_pretrained(
      d, vae=None, safety_checker=None, feature_extractor=None, image_encoder=None)
  ref.set_progress_bar_config(disable=True)
  assert ref.vae is None
  want = ref(prompts, num_inference_steps=4, guidance_scale=1.5, latents=noise.clone(),
             output_type="latent").images.numpy()
  got = pipe.generate(prompts, num_steps=4, guidance_scale=1.5, latents=noise.numpy(),
                      progress=False)
  assert got.shape == (2, 8, 8, 3) and got.dtype == np.uint8
  want8 = images_lib.to_uint8(want)
  assert int(np.abs(got.astype(int) - want8).max()) <= 1
  unsaturated = (want8 > 0) & (want8 < 255)
  assert unsaturated.mean() > 0.15  # not only a match of clipped pixels
  # The text matters: another prompt moves the images far more than the tolerance.
  other = pipe.generate(["face", "tic"], num_steps=4, guidance_scale=1.5, latents=noise.numpy(),
                        progress=False)
  assert int(np.abs(other.astype(int) - got).max()) > 20


def test_save_sd_pipeline_checks_its_parts(pixel_sd, pixel_words, tmp_path):
  _, unet, text, _ = pixel_sd
  sched = {"_class_name": "DDIMScheduler"}
  with pytest.raises(ValueError, match="vocab_size >= "):
    ds.save_sd_pipeline(str(tmp_path / "a"), unet=unet, text_encoder=text,
                        tokenizer_words=pixel_words + ["many", "more", "words"],
                        scheduler_config=sched)
  with pytest.raises(ValueError, match="_class_name"):
    ds.save_sd_pipeline(str(tmp_path / "b"), unet=unet, text_encoder=text,
                        tokenizer_words=pixel_words, scheduler_config={})
  with pytest.raises(ValueError, match="exceeds the text encoder's max_position_embeddings"):
    ds.save_sd_pipeline(str(tmp_path / "c"), unet=unet, text_encoder=text,
                        tokenizer_words=pixel_words, scheduler_config=sched,
                        tokenizer_max_length=77)


def test_save_model_dir_refuses_a_layout_it_cannot_invert(tmp_path):
  params = {"attn": {"kernel": jnp.ones((2, 3))}}
  with pytest.raises(ValueError, match="only torch_to_jax_layout"):
    ds.save_model_dir(params, str(tmp_path), {}, name_fn=lambda p: (p, lambda a: a.T))
  assert ds.jax_to_torch_layout(np.zeros((3, 3, 4, 5))).shape == (5, 4, 3, 3)  # HWIO -> OIHW
