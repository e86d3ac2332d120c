"""Tiny Stable Diffusion and DiT pipelines saved by diffusers, shared by the pipeline tests.

Each fixture is (dir, the diffusers pipeline reloaded from dir, the jaxadapt pipeline). Tests that
run the diffusers pipeline set its scheduler first (`_swap_scheduler`), as they share it.
"""
import json
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

import jaxadapt as ja

SD_UNET = {"sample_size": 8, "in_channels": 4, "out_channels": 4, "block_out_channels": (32, 64),
           "layers_per_block": 2, "norm_num_groups": 8, "cross_attention_dim": 32,
           "attention_head_dim": 2, "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
           "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D")}
VAE = {"in_channels": 3, "out_channels": 3, "block_out_channels": (8, 16), "layers_per_block": 1,
       "down_block_types": ("DownEncoderBlock2D",) * 2,
       "up_block_types": ("UpDecoderBlock2D",) * 2, "latent_channels": 4, "norm_num_groups": 4,
       "sample_size": 16}
SD_SCHEDULER = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
                "clip_sample": False, "set_alpha_to_one": False, "steps_offset": 1}
# num_classes 1000: diffusers' DiTPipeline hard-codes 1000 as the null class.
DIT = {"num_attention_heads": 2, "attention_head_dim": 8, "in_channels": 4, "out_channels": 8,
       "num_layers": 2, "sample_size": 8, "patch_size": 2, "num_embeds_ada_norm": 1000}
ID2LABEL = {"0": "tench, Tinca tinca", "207": "golden retriever"}


def _perturb(model, scale):
  """Random init leaves norms at 1 and biases at 0; perturb them so that they matter."""
  model.eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith(".bias") or "norm" in name:
        p.add_(scale * torch.randn_like(p))
  return model


def make_tokenizer(directory):
  """A CLIP BPE tokenizer over lower-case letters and a few merges, written as CLIP ships it."""
  os.makedirs(directory, exist_ok=True)
  letters = "abcdefghijklmnopqrstuvwxyz"
  vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
  vocab.update({c: len(vocab) + i for i, c in enumerate(letters)})
  vocab.update({c + "</w>": len(vocab) + i for i, c in enumerate(letters)})
  merges = ["a t</w>", "c at</w>", "d o", "do g</w>", "r e", "re d</w>"]
  vocab.update({m.replace(" ", ""): len(vocab) + i for i, m in enumerate(merges)})
  with open(os.path.join(directory, "vocab.json"), "w") as f:
    json.dump(vocab, f)
  with open(os.path.join(directory, "merges.txt"), "w") as f:
    f.write("#version: 0.2\n" + "\n".join(merges) + "\n")
  with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
    json.dump({"model_max_length": 12}, f)
  return transformers.CLIPTokenizer.from_pretrained(directory)


@pytest.fixture(scope="session")
def sd(tmp_path_factory):
  """(dir, diffusers pipeline reloaded from dir, jaxadapt pipeline)."""
  d = str(tmp_path_factory.mktemp("sd_pipe"))
  tok = make_tokenizer(str(tmp_path_factory.mktemp("tok")))
  torch.manual_seed(0)
  unet = _perturb(diffusers.UNet2DConditionModel(**SD_UNET), 0.1)
  vae = _perturb(diffusers.AutoencoderKL(**VAE), 0.1)
  text = _perturb(transformers.CLIPTextModel(transformers.CLIPTextConfig(
      vocab_size=len(tok), hidden_size=32, intermediate_size=37, num_hidden_layers=2,
      num_attention_heads=4, max_position_embeddings=12, bos_token_id=0, eos_token_id=1,
      pad_token_id=1)), 0.1)
  diffusers.StableDiffusionPipeline(
      unet=unet, vae=vae, text_encoder=text, tokenizer=tok,
      scheduler=diffusers.DDIMScheduler(**SD_SCHEDULER), safety_checker=None,
      feature_extractor=None, requires_safety_checker=False).save_pretrained(d)
  ref = diffusers.StableDiffusionPipeline.from_pretrained(d, safety_checker=None)
  ref.set_progress_bar_config(disable=True)
  pipe = ja.load_pipeline(d)
  return d, ref, pipe


@pytest.fixture(scope="session")
def dit(tmp_path_factory):
  d = str(tmp_path_factory.mktemp("dit_pipe"))
  torch.manual_seed(1)
  transformer = diffusers.DiTTransformer2DModel(**DIT).eval()
  with torch.no_grad():  # the adaLN-Zero gates start at zero: perturb everything
    for p in transformer.parameters():
      p.add_(0.05 * torch.randn_like(p))
  vae = _perturb(diffusers.AutoencoderKL(**VAE), 0.1)
  diffusers.DiTPipeline(transformer=transformer, vae=vae,
                        scheduler=diffusers.DDIMScheduler(clip_sample=False)).save_pretrained(d)
  index_path = os.path.join(d, "model_index.json")
  with open(index_path) as f:  # as facebook/DiT-XL-2-256 ships it (save_pretrained drops it)
    index = json.load(f)
  with open(index_path, "w") as f:
    json.dump({**index, "id2label": ID2LABEL}, f)
  ref = diffusers.DiTPipeline.from_pretrained(d)
  ref.set_progress_bar_config(disable=True)
  return d, ref, ja.load_pipeline(d)




# A pixel-space text-conditioned pipeline written by jaxadapt (no torch): 3-channel U-Net,
# random CLIP text encoder over a small word list, no VAE.
PIXEL_UNET = dict(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(32, 64),
                  layers_per_block=(1, 1), norm_num_groups=8, cross_attention_dim=(32, 32),
                  transformer_layers_per_block=(1, 1), attention_head_dim=(2, 2),
                  down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                  up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
PIXEL_WORDS = ["a", "photo", "of", "sks", "person", "face", "at", "cat", "cats", "attic", "tic",
               "3"]


def random_model(wrapper, module_cls, config, seed):
  """`wrapper(config, graphdef, params)` with numpy-drawn params (no per-leaf XLA compiles, which
  make `UNet.random` slow on CPU): norm scales 1 + 0.1 z, biases 0.1 z, kernels and embeddings
  z / sqrt(fan_in), so that every leaf matters and activations stay of order 1."""
  import jax
  from flax import nnx

  from jaxadapt.paths import map_with_paths
  graphdef, state = nnx.split(nnx.eval_shape(lambda: module_cls(config, rngs=nnx.Rngs(0))))
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    z = rng.standard_normal(leaf.shape).astype(np.float32)
    if len(leaf.shape) == 1:
      return jax.numpy.asarray(1 + 0.1 * z if path.endswith("weight") else 0.1 * z)
    return jax.numpy.asarray(z / np.sqrt(np.prod(leaf.shape[:-1])))

  return wrapper(config, graphdef, map_with_paths(draw, nnx.to_pure_dict(state)))


@pytest.fixture(scope="session")
def pixel_words():
  """The words the `pixel_sd` tokenizer keeps whole."""
  return list(PIXEL_WORDS)


@pytest.fixture(scope="session")
def pixel_sd(tmp_path_factory):
  """(dir, jaxadapt UNet, jaxadapt CLIPTextEncoder, loaded jaxadapt pipeline) of a pixel-space
  StableDiffusionPipeline folder written by `jaxadapt.io.diffusers_save.save_sd_pipeline`."""
  from jaxadapt.io import diffusers_save as ds
  from jaxadapt.models.clip import CLIPTextConfig, CLIPTextEncoder, CLIPTextModel
  from jaxadapt.models.unet import UNet, UNet2DConditionModel, UNetConfig
  d = str(tmp_path_factory.mktemp("pixel_sd"))
  unet = random_model(UNet, UNet2DConditionModel, UNetConfig(**PIXEL_UNET), 0)
  text = random_model(CLIPTextEncoder, CLIPTextModel, CLIPTextConfig(
      vocab_size=len(ds.clip_vocab(PIXEL_WORDS)), hidden_size=32, intermediate_size=37,
      num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=12,
      eos_token_id=ds.CLIP_EOS_ID), 1)
  ds.save_sd_pipeline(d, unet=unet, text_encoder=text, tokenizer_words=PIXEL_WORDS,
                      scheduler_config={"_class_name": "DDIMScheduler", **SD_SCHEDULER})
  return d, unet, text, ja.load_pipeline(d)
