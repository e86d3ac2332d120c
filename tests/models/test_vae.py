"""jaxadapt's KL autoencoder against diffusers' `AutoencoderKL` (the reference)."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import jaxadapt as ja
from jaxadapt.adapters.hook import SingleLoRA
from jaxadapt.models import diffusion_layers as dl
from jaxadapt.models.vae import VAE, VAEConfig, load_vae

TINY = dict(in_channels=3, out_channels=3, block_out_channels=(8, 16), layers_per_block=1,
            down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
            latent_channels=4, norm_num_groups=4, sample_size=16, scaling_factor=0.3,
            shift_factor=0.1)


def make_vae(directory, seed=0, **overrides):
  """Builds and saves a tiny random AutoencoderKL; returns the torch model (eval mode)."""
  from diffusers import AutoencoderKL
  torch.manual_seed(seed)
  model = AutoencoderKL(**{**TINY, **overrides}).eval()
  with torch.no_grad():  # unit norms / zero biases would hide mistakes: perturb everything
    for p in model.parameters():
      p.add_(0.05 * torch.randn_like(p))
  model.save_pretrained(directory)
  return model


@pytest.fixture(scope="module")
def vae(tmp_path_factory):
  d = str(tmp_path_factory.mktemp("vae"))
  return d, make_vae(d), load_vae(d)


def _image(seed=0, b=2, size=16):
  g = torch.Generator().manual_seed(seed)
  return torch.rand(b, 3, size, size, generator=g) * 2 - 1


def test_encode_mean_logvar_equal_diffusers(vae):
  _, ref, model = vae
  x = _image()
  with torch.no_grad():
    dist = ref.encode(x).latent_dist
  got = model.encode(x.numpy())
  assert got.mean.shape == (2, 4, 8, 8)
  np.testing.assert_allclose(np.asarray(got.mean), dist.mean.numpy(), atol=1e-4, rtol=0)
  np.testing.assert_allclose(np.asarray(got.logvar), dist.logvar.numpy(), atol=1e-4, rtol=0)
  np.testing.assert_allclose(np.asarray(got.std), dist.std.numpy(), atol=1e-4, rtol=0)
  np.testing.assert_allclose(np.asarray(got.kl()), dist.kl().numpy(), rtol=1e-4)
  # sample(key) = mean + std * eps with eps ~ N(0, I) from the key
  key = jax.random.key(3)
  eps = jax.random.normal(key, got.mean.shape)
  np.testing.assert_allclose(np.asarray(got.sample(key)),
                             dist.mean.numpy() + dist.std.numpy() * np.asarray(eps), atol=1e-4,
                             rtol=0)


def test_decode_equals_diffusers(vae):
  _, ref, model = vae
  z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
  with torch.no_grad():
    want = ref.decode(z).sample.numpy()
  got = np.asarray(model.decode(z.numpy()))
  assert got.shape == (2, 3, 16, 16)
  np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
  # Non-square latents too.
  z2 = torch.randn(1, 4, 4, 6, generator=torch.Generator().manual_seed(2))
  with torch.no_grad():
    want2 = ref.decode(z2).sample.numpy()
  np.testing.assert_allclose(np.asarray(model.decode(z2.numpy())), want2, atol=1e-4, rtol=0)
  # Reconstruction through the posterior mode, as diffusers' forward.
  x = _image(seed=4)
  with torch.no_grad():
    want3 = ref(x).sample.numpy()
  np.testing.assert_allclose(np.asarray(model(x.numpy())), want3, atol=1e-4, rtol=0)


def test_latent_scaling_from_config(vae):
  _, _, model = vae
  assert model.config.scaling_factor == 0.3 and model.config.shift_factor == 0.1
  z = jnp.linspace(-2, 2, 4 * 4).reshape(1, 4, 2, 2)
  np.testing.assert_allclose(np.asarray(model.scale_latents(z)), (np.asarray(z) - 0.1) * 0.3,
                             rtol=1e-6)
  np.testing.assert_allclose(np.asarray(model.unscale_latents(model.scale_latents(z))),
                             np.asarray(z), atol=1e-6)


def test_insert_at_mid_block_attention(vae):
  """The insert sees diffusers' attention tokens; adding a vector equals editing to_out bias."""
  directory, ref, model = vae
  name = "decoder.mid_block.attentions.0"
  captured = {}
  handle = ref.decoder.mid_block.attentions[0].register_forward_hook(
      lambda mod, args, out: captured.update(inp=args[0], out=out))
  z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(5))
  try:
    with torch.no_grad():
      ref.decode(z)
  finally:
    handle.remove()
  seen = {}

  def spy(out, hidden_in, context, inputs):
    seen.update(out=out, inp=hidden_in, context=context)
    return out

  dl.apply(model.graphdef, model.params, "decode", jnp.asarray(z.numpy()),
           ctx=ja.Context().with_inserts({name: spy}))
  assert seen["context"] is None
  tokens = lambda a: np.asarray(a).reshape(2, 64, 16)  # NHWC [B, 8, 8, C] -> [B, 64 tokens, C]
  inp = captured["inp"].numpy().transpose(0, 2, 3, 1)
  np.testing.assert_allclose(np.asarray(seen["inp"]), tokens(inp), atol=1e-4, rtol=0)
  # diffusers' module output = attention output + residual (the insert sees it without).
  out = captured["out"].numpy().transpose(0, 2, 3, 1) - inp
  np.testing.assert_allclose(np.asarray(seen["out"]), tokens(out), atol=1e-4, rtol=0)

  delta = jnp.linspace(-0.5, 0.5, 16)
  got = model.decode(z.numpy(), inserts={name: lambda o, h, c, i: o + delta})
  params = jax.tree_util.tree_map(lambda v: v, model.params)
  o = params["decoder"]["mid_block"]["attentions"][0]["to_out"][0]
  o["bias"] = o["bias"] + delta
  want = VAE(model.config, model.graphdef, params).decode(z.numpy())
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5, rtol=0)
  assert np.abs(np.asarray(got) - np.asarray(model.decode(z.numpy()))).max() > 1e-3


def test_lora_on_mid_block_attention_equals_merged_kernel(vae):
  _, _, model = vae
  path = "encoder.mid_block.attentions.0.to_v"
  assert path in model.linear_paths
  k = jax.random.split(jax.random.key(1), 2)
  a, b = jax.random.normal(k[0], (16, 2)), jax.random.normal(k[1], (2, 16))
  x = _image(seed=6).numpy()
  got = model.encode(x, context=ja.Context(weights={path: SingleLoRA(a=a, b=b, scale=jnp.asarray(0.5))}))
  params = jax.tree_util.tree_map(lambda v: v, model.params)
  v = params["encoder"]["mid_block"]["attentions"][0]["to_v"]
  v["kernel"] = v["kernel"] + 0.5 * (a @ b)
  want = VAE(model.config, model.graphdef, params).encode(x)
  np.testing.assert_allclose(np.asarray(got.mean), np.asarray(want.mean), atol=1e-5, rtol=0)


def test_legacy_attention_names_without_quant_conv_and_bfloat16(tmp_path):
  """Older checkpoints name the attention `query/key/value/proj_attn`: they load the same."""
  from safetensors.numpy import load_file, save_file
  ref = make_vae(str(tmp_path / "new"), seed=7, use_quant_conv=False)
  tensors = load_file(str(tmp_path / "new" / "diffusion_pytorch_model.safetensors"))
  renamed = {}
  for k, v in tensors.items():
    for new, old in (("to_q", "query"), ("to_k", "key"), ("to_v", "value"),
                     ("to_out.0", "proj_attn")):
      k = k.replace(f".attentions.0.{new}.", f".attentions.0.{old}.")
    renamed[k] = v
  (tmp_path / "old").mkdir()
  save_file(renamed, str(tmp_path / "old" / "diffusion_pytorch_model.safetensors"))
  (tmp_path / "old" / "config.json").write_text(
      (tmp_path / "new" / "config.json").read_text())
  x = _image(seed=8)
  with torch.no_grad():
    want = ref.encode(x).latent_dist.mean.numpy()
  old = load_vae(str(tmp_path / "old"))
  np.testing.assert_allclose(np.asarray(old.encode(x.numpy()).mean), want, atol=1e-4, rtol=0)
  half = load_vae(str(tmp_path / "old"), dtype=jnp.bfloat16)
  got = half.encode(x.numpy()).mean
  assert got.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(got, np.float32), want, atol=0.1, rtol=0.05)


def test_config_refuses_unsupported():
  base = dict(_class_name="AutoencoderKL", block_out_channels=[8, 16], norm_num_groups=4)
  with pytest.raises(ValueError, match="supports only 2 x 'DownEncoderBlock2D'"):
    VAEConfig.from_config({**base, "down_block_types": ["DownEncoderBlock2D",
                                                        "AttnDownEncoderBlock2D"]})
  with pytest.raises(ValueError, match="expected 'AutoencoderKL'"):
    VAEConfig.from_config({**base, "_class_name": "AutoencoderTiny"})
  with pytest.raises(ValueError, match="activation 'gelu_new'"):
    VAEConfig.from_config({**base, "act_fn": "gelu_new"})
