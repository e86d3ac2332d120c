"""Non-default config options of the diffusion models against diffusers / transformers.

Each case is an option a real `config.json` can carry whose value changes the reference model's
output: jaxadapt must give the reference's numbers (float32, within 1e-4 as the other model
tests) or refuse the option with an error naming it.
"""
import json
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

from jaxadapt.models import unet as unet_lib
from jaxadapt.models.clip import CLIPTextConfig, load_clip_text
from jaxadapt.models.dit import DiTConfig, load_dit
from jaxadapt.models.vae import load_vae


def _perturb(model, scale=0.1, seed=1):
  """Zero-init gates, unit norms and zero biases would hide mistakes: move every parameter."""
  torch.manual_seed(seed)
  with torch.no_grad():
    for p in model.parameters():
      p.add_(scale * torch.randn_like(p))
  return model.eval()


# ----------------------------------------------------------------------------- U-Net

UNET = {"sample_size": 8, "in_channels": 4, "out_channels": 4, "block_out_channels": (16, 32),
        "layers_per_block": 1, "norm_num_groups": 8, "cross_attention_dim": 24,
        "attention_head_dim": 2, "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
        "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D")}


def test_unet_act_fn_and_per_block_flags_equal_diffusers(tmp_path):
  """`act_fn="mish"` (resnets, time embedding, output head) and `only_cross_attention` given as
  one False per block (diffusers' list form) are honoured."""
  torch.manual_seed(0)
  model = _perturb(diffusers.UNet2DConditionModel(
      **UNET, act_fn="mish", only_cross_attention=[False, False]))
  model.save_pretrained(tmp_path)
  rng = np.random.default_rng(0)
  sample = rng.standard_normal((2, 4, 8, 8)).astype(np.float32)
  ehs = rng.standard_normal((2, 5, 24)).astype(np.float32)
  t = np.array([10, 700])
  with torch.no_grad():
    want = model(torch.from_numpy(sample), torch.from_numpy(t),
                 torch.from_numpy(ehs)).sample.numpy()
  unet = unet_lib.load_unet(str(tmp_path))
  assert unet.config.act_fn == "mish"
  np.testing.assert_allclose(np.asarray(unet(sample, t, ehs)), want, atol=1e-4, rtol=1e-4)


def test_unet_refuses_options_it_cannot_honour():
  with pytest.raises(NotImplementedError,
                     match=r"only_cross_attention=\[True, False\] is not supported"):
    unet_lib.UNetConfig.from_config({**UNET, "only_cross_attention": [True, False]})
  with pytest.raises(ValueError, match="act_fn 'gelu_tanh' is not supported; expected one of"):
    unet_lib.UNetConfig.from_config({**UNET, "act_fn": "gelu_tanh"})


# ----------------------------------------------------------------------------- DiT

DIT = {"num_attention_heads": 2, "attention_head_dim": 8, "in_channels": 4, "out_channels": 8,
       "num_layers": 1, "sample_size": 8, "patch_size": 2, "num_embeds_ada_norm": 10,
       "norm_type": "ada_norm_zero"}


@pytest.mark.parametrize("overrides", [{"interpolation_scale": 2.0}, {"sample_size": 128}],
                         ids=["interpolation_scale", "sample_size_128"])
def test_legacy_dit_position_interpolation_equals_diffusers(tmp_path, overrides):
  """The generic `Transformer2DModel` (facebook/DiT-XL-2-* configs) divides the position grid by
  `interpolation_scale`, by default `max(sample_size // 64, 1)` (2 for a 128 latent)."""
  torch.manual_seed(0)
  model = _perturb(diffusers.Transformer2DModel(**{**DIT, **overrides}))
  model.save_pretrained(tmp_path)
  g = torch.Generator().manual_seed(0)
  x = torch.randn(2, 4, 8, 8, generator=g)
  t, y = torch.tensor([3, 600]), torch.tensor([1, 10])
  with torch.no_grad():
    want = model(x, timestep=t, class_labels=y).sample.numpy()
  dit = load_dit(str(tmp_path))
  assert dit.config.interpolation_scale == 2.0
  np.testing.assert_allclose(np.asarray(dit(x.numpy(), t.numpy(), y.numpy())), want, atol=1e-4,
                             rtol=0)


def test_dit_class_ignores_interpolation_scale_key():
  """`DiTTransformer2DModel` has no interpolation_scale option (diffusers drops the key)."""
  cfg = {**DIT, "_class_name": "DiTTransformer2DModel", "sample_size": 128,
         "interpolation_scale": 3.0}
  assert DiTConfig.from_config(cfg).interpolation_scale == 1.0


@pytest.mark.parametrize("key,value", [("attention_type", "gated"), ("caption_channels", 16)])
def test_legacy_dit_refuses_other_architectures_options(key, value):
  cfg = {**DIT, "_class_name": "Transformer2DModel", key: value}
  with pytest.raises(ValueError, match=f"{key}={value!r}; jaxadapt's DiT supports only {key}="):
    DiTConfig.from_config(cfg)


# ----------------------------------------------------------------------------- VAE

def test_vae_act_fn_sets_resnets_only(tmp_path):
  """diffusers' encoder/decoder output activation is SiLU whatever `act_fn` says."""
  torch.manual_seed(0)
  model = _perturb(diffusers.AutoencoderKL(
      block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
      up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=4, sample_size=16,
      act_fn="gelu"), scale=0.05)
  model.save_pretrained(tmp_path)
  g = torch.Generator().manual_seed(0)
  x = torch.rand(2, 3, 16, 16, generator=g) * 2 - 1
  with torch.no_grad():
    mean = model.encode(x).latent_dist.mean.numpy()
    recon = model.decode(torch.from_numpy(mean)).sample.numpy()
  vae = load_vae(str(tmp_path))
  np.testing.assert_allclose(np.asarray(vae.encode(x.numpy()).mean), mean, atol=1e-4, rtol=0)
  np.testing.assert_allclose(np.asarray(vae.decode(mean)), recon, atol=1e-4, rtol=0)


# ----------------------------------------------------------------------------- CLIP

def test_clip_config_without_eos_token_id_pools_like_transformers(tmp_path):
  """A config.json without `eos_token_id` gets transformers' default 49407 (pool at the first
  49407), not the legacy argmax-of-ids rule: with added tokens (ids > 49407) they differ."""
  cfg = transformers.CLIPTextConfig(vocab_size=49410, hidden_size=16, intermediate_size=24,
                                    num_hidden_layers=1, num_attention_heads=2,
                                    max_position_embeddings=8)
  torch.manual_seed(0)
  model = _perturb(transformers.CLIPTextModel(cfg))
  model.save_pretrained(tmp_path)
  path = os.path.join(tmp_path, "config.json")
  with open(path) as f:
    saved = json.load(f)
  del saved["eos_token_id"]
  with open(path, "w") as f:
    json.dump(saved, f)
  ids = torch.tensor([[49406, 7, 49409, 49407, 5, 6], [49406, 49407, 3, 49409, 9, 49408]])
  with torch.no_grad():
    want = model(ids).pooler_output.numpy()
  clip = load_clip_text(str(tmp_path))
  assert clip.config.eos_token_id == transformers.CLIPTextConfig().eos_token_id == 49407
  np.testing.assert_allclose(np.asarray(clip(ids.numpy()).pooler_output), want, atol=1e-4,
                             rtol=0)


def test_clip_refuses_eos_token_id_list():
  with pytest.raises(ValueError, match=r"eos_token_id=\[2, 49407\] is not supported"):
    CLIPTextConfig.from_config({"model_type": "clip_text_model", "eos_token_id": [2, 49407]})
