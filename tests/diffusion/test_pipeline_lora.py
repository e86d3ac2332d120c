"""A Stable Diffusion LoRA file with U-Net and text-encoder LoRAs, as diffusers writes it.

diffusers' `StableDiffusionPipeline.save_lora_weights` writes `pytorch_lora_weights.safetensors`
(keys `unet.*` and `text_encoder.*`: `text_encoder.text_model.*` from transformers 4.x, as SD
LoRA files are published, `text_encoder.encoder.*` from 5.x; both are read) with
`lora_adapter_metadata`, here from PEFT LoRAs injected into the tiny pipeline's U-Net and CLIP
text encoder. `generate(adapter=<that dir>)` must give diffusers' images (uint8, within TOL;
measured 0) from the same latents, with per-component scales as diffusers'
`set_adapters(..., adapter_weights={"unet": .., "text_encoder": ..})` (which sets each PEFT
layer's scale), and two adapters at once as `set_adapters([a, b], adapter_weights=[..])`. The
reference runs the PEFT-injected modules directly: with transformers 5.x, diffusers' own
`load_lora_weights` of a text-encoder LoRA needs peft >= 0.22 (transformers' PEFT integration),
newer than this project's pin.
"""
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
peft = pytest.importorskip("peft")

import safetensors.torch as safetensors_torch  # noqa: E402
from peft.tuners.lora import LoraLayer  # noqa: E402
from safetensors import safe_open  # noqa: E402
from peft.utils import get_peft_model_state_dict  # noqa: E402
from test_pipeline import STEPS, TOL, _diff, _noise, _uint8  # noqa: E402

import jaxadapt as ja  # noqa: E402
from jaxadapt.io.diffusers_lora import load_pipeline_lora  # noqa: E402
from jaxadapt.io.peft import DIFFUSERS_LORA_FILE  # noqa: E402

PROMPTS = ["a cat", "red dog"]


def _activate(module, scales):
  """What diffusers' set_adapters does to a component: {adapter name: scale} active at once."""
  for m in module.modules():
    if isinstance(m, LoraLayer):
      m.set_adapter(list(scales))
      for name, scale in scales.items():
        m.set_scale(name, scale)


def _save(ref, out, name, unet_cfg, text_cfg):
  diffusers.StableDiffusionPipeline.save_lora_weights(
      out, unet_lora_layers=get_peft_model_state_dict(ref.unet, adapter_name=name),
      text_encoder_lora_layers=get_peft_model_state_dict(ref.text_encoder, adapter_name=name),
      unet_lora_adapter_metadata=unet_cfg.to_dict(),
      text_encoder_lora_adapter_metadata=text_cfg.to_dict())


@pytest.fixture(scope="module")
def sd_lora(sd, tmp_path_factory):
  """(dir of LoRA "default", dir of LoRA "b", the diffusers pipeline with both injected)."""
  d, _, _ = sd
  ref = diffusers.StableDiffusionPipeline.from_pretrained(d, safety_checker=None)
  ref.set_progress_bar_config(disable=True)
  torch.manual_seed(7)
  dirs = []
  for name, r, targets in (("default", 2, ["q_proj", "k_proj", "v_proj", "out_proj", "fc1"]),
                           ("b", 3, ["q_proj", "v_proj"])):
    unet_cfg = peft.LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                               target_modules=["to_q", "to_k", "to_v", "to_out.0"])
    text_cfg = peft.LoraConfig(r=r, lora_alpha=6, target_modules=targets,
                               init_lora_weights=False)
    peft.inject_adapter_in_model(unet_cfg, ref.unet, adapter_name=name)
    peft.inject_adapter_in_model(text_cfg, ref.text_encoder, adapter_name=name)
    dirs.append(str(tmp_path_factory.mktemp(f"sd_lora_{name}")))
    _save(ref, dirs[-1], name, unet_cfg, text_cfg)
  return dirs[0], dirs[1], ref


def _diffusers(ref, latents, unet=None, text=None):
  """diffusers' images with {adapter: scale} active per component (default: "default" at 1)."""
  _activate(ref.unet, unet or {"default": 1.0})
  _activate(ref.text_encoder, text or {"default": 1.0})
  with torch.no_grad():
    return _uint8(ref(PROMPTS, num_inference_steps=STEPS, guidance_scale=6.0, latents=latents,
                      output_type="np").images)


def test_load_pipeline_lora_reads_both_components(sd_lora, sd, tmp_path):
  d, _, _ = sd_lora
  _, _, pipe = sd
  adapters = load_pipeline_lora(d)
  assert sorted(adapters) == ["text_encoder", "unet"]
  te = adapters["text_encoder"]
  assert "encoder.layers.0.self_attn.q_proj" in te.weights  # jaxadapt's CLIP names
  assert "encoder.layers.1.mlp.fc1" in te.weights
  assert te.scale("encoder.layers.0.self_attn.q_proj") == 3.0  # alpha 6 / r 2 (metadata)
  pipe.text_encoder.check_adapter(te)
  pipe.unet.check_adapter(adapters["unet"])
  # transformers 4.x names (SD 1.x LoRA files as published): `text_encoder.text_model.<module>`.
  src = safetensors_torch.load_file(os.path.join(d, DIFFUSERS_LORA_FILE))
  with safe_open(os.path.join(d, DIFFUSERS_LORA_FILE), "pt") as f:
    meta = f.metadata()
  old = {k.replace("text_encoder.", "text_encoder.text_model.", 1): v for k, v in src.items()}
  safetensors_torch.save_file(old, str(tmp_path / DIFFUSERS_LORA_FILE), metadata=meta)
  renamed = load_pipeline_lora(tmp_path)["text_encoder"]
  assert sorted(renamed.weights) == sorted(te.weights)
  assert renamed.config == te.config
  for path, w in te.weights.items():
    np.testing.assert_array_equal(np.asarray(renamed.weights[path]["a"]), np.asarray(w["a"]))


@pytest.mark.parametrize("lora_scale,unet_scale,text_scale", [
    (1.0, 1.0, 1.0),
    ({"unet": 0.5, "text_encoder": 0.25}, 0.5, 0.25),  # diffusers' per-component weights
    ({"text_encoder": 0.0}, 1.0, 0.0),  # a component left out keeps 1
])
def test_sd_unet_and_text_encoder_lora_match_diffusers(sd_lora, sd, lora_scale, unet_scale,
                                                      text_scale):
  d, _, ref = sd_lora
  _, _, pipe = sd
  latents = _noise((2, 4, 8, 8), seed=8)
  want = _diffusers(ref, latents, {"default": unet_scale}, {"default": text_scale})
  got = pipe.generate(PROMPTS, num_steps=STEPS, guidance_scale=6.0, latents=latents.numpy(),
                      adapter=d, lora_scale=lora_scale, progress=False)
  assert _diff(got, want) <= TOL
  if text_scale:  # the text encoder's LoRA matters: the U-Net's alone gives another image
    unet_only = pipe.generate(PROMPTS, num_steps=STEPS, guidance_scale=6.0,
                              latents=latents.numpy(), adapter=d,
                              lora_scale={"unet": unet_scale, "text_encoder": 0.0},
                              progress=False)
    assert _diff(unet_only, got) > 10 * TOL


def test_two_adapters_at_once_match_diffusers(sd_lora, sd):
  """diffusers' set_adapters(["default", "b"], adapter_weights=[{"unet": 0.7, "text_encoder":
  1.2}, 0.5]): both LoRAs active, each scaled per component."""
  d, d_b, ref = sd_lora
  _, _, pipe = sd
  latents = _noise((2, 4, 8, 8), seed=10)
  want = _diffusers(ref, latents, {"default": 0.7, "b": 0.5}, {"default": 1.2, "b": 0.5})
  weights = [{"unet": 0.7, "text_encoder": 1.2}, 0.5]
  got = pipe.generate(PROMPTS, num_steps=STEPS, guidance_scale=6.0, latents=latents.numpy(),
                      adapter=[d, d_b], lora_scale=weights, progress=False)
  assert _diff(got, want) <= TOL
  first = pipe.generate(PROMPTS, num_steps=STEPS, guidance_scale=6.0, latents=latents.numpy(),
                        adapter=d, lora_scale=weights[0], progress=False)
  assert _diff(first, got) > 10 * TOL  # the second adapter matters
  with pytest.raises(ValueError, match="lora_scale has 3 weights for 2 adapters"):
    pipe.generate(PROMPTS, adapter=[d, d_b], lora_scale=[1.0, 1.0, 1.0], num_steps=1)


def test_per_block_unet_scales_match_diffusers(sd_lora, sd):
  """diffusers' set_adapters(name, {"unet": {"down": .., "mid": .., "up": {"block_1": [..]}},
  "text_encoder": ..}): the reference expands the spec with diffusers' own functions."""
  from diffusers.loaders.unet_loader_utils import _maybe_expand_lora_scales
  from diffusers.utils.peft_utils import set_weights_and_activate_adapters
  d, _, ref = sd_lora
  _, _, pipe = sd
  spec = {"down": 0.3, "mid": 0.0, "up": {"block_1": [1.5, 0.5, 0.2]}}
  latents = _noise((2, 4, 8, 8), seed=11)
  _activate(ref.text_encoder, {"default": 0.8})
  set_weights_and_activate_adapters(ref.unet, ["default"],
                                    _maybe_expand_lora_scales(ref.unet, [spec]))
  with torch.no_grad():
    want = _uint8(ref(PROMPTS, num_inference_steps=STEPS, guidance_scale=6.0, latents=latents,
                      output_type="np").images)
  got = pipe.generate(PROMPTS, num_steps=STEPS, guidance_scale=6.0, latents=latents.numpy(),
                      adapter=d, lora_scale={"unet": spec, "text_encoder": 0.8}, progress=False)
  assert _diff(got, want) <= TOL
  uniform = pipe.generate(PROMPTS, num_steps=STEPS, guidance_scale=6.0, latents=latents.numpy(),
                          adapter=d, lora_scale={"unet": 1.0, "text_encoder": 0.8},
                          progress=False)
  assert _diff(uniform, got) > 10 * TOL  # the block scales matter
  with pytest.raises(ValueError, match=r"expected 3 scales for up.block_1, got 2"):
    pipe.generate(PROMPTS, adapter=d, lora_scale={"unet": {"up": {"block_1": [1, 2]}}},
                  num_steps=1)
  with pytest.raises(ValueError, match=r"with attention are \['block_1'\]"):
    pipe.generate(PROMPTS, adapter=d, lora_scale={"unet": {"up": {"block_0": 1.0}}},
                  num_steps=1)
  with pytest.raises(ValueError, match="apply to a U-Net only"):
    pipe.generate(PROMPTS, adapter=d, lora_scale={"text_encoder": {"down": 1.0}}, num_steps=1)


def test_several_adapters_sum_their_weighted_deltas(sd):
  """adapter=[a, b], lora_scale=[wa, wb]: each U-Net projection's delta is
  wa s_a A_a B_a + wb s_b A_b B_b, rsLoRA adapters (s = alpha / sqrt(r)) included."""
  import jax
  _, _, pipe = sd
  paths = ("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
           "up_blocks.1.attentions.2.transformer_blocks.0.attn2.to_v")
  made = []
  for seed, (r, rslora) in enumerate([(2, True), (3, False)]):
    cfg = ja.LoraConfig(r=r, lora_alpha=4.0, target_modules=paths, use_rslora=rslora)
    w = ja.init_lora(pipe.unet, cfg).weights
    leaves, tree = jax.tree_util.tree_flatten(w)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    made.append(ja.LoraAdapter(weights=jax.tree_util.tree_unflatten(
        tree, [jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)]), config=cfg))
  weights = [0.7, {"unet": 1.5}]
  ctx, text_ctx = pipe.lora_contexts(made, weights)
  assert text_ctx is None
  for path in paths:
    c = ctx.weights[path]
    got = float(c.scale) * np.asarray(c.a) @ np.asarray(c.b)
    want = sum(w * a.scale(path) * np.asarray(a.weights[path]["a"]) @
               np.asarray(a.weights[path]["b"]) for a, w in zip(made, (0.7, 1.5)))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_adapter_forms_and_refusals(sd_lora, sd, tmp_path):
  d, _, _ = sd_lora
  _, _, pipe = sd
  adapters = load_pipeline_lora(d)
  latents = _noise((2, 4, 8, 8), seed=9).numpy()
  kw = dict(num_steps=2, guidance_scale=6.0, latents=latents, progress=False)
  np.testing.assert_array_equal(pipe.generate(PROMPTS, adapter=adapters, **kw),
                                pipe.generate(PROMPTS, adapter=d, **kw))
  with pytest.raises(ValueError, match=r"lora_scale has components \['vae'\]"):
    pipe.generate(PROMPTS, adapter=adapters, lora_scale={"vae": 0.5}, **kw)
  with pytest.raises(ValueError, match=r"adapter= components must be among \['text_encoder', "
                                       r"'unet'\]; got \['transformer'\]"):
    pipe.generate(PROMPTS, adapter={"transformer": adapters["unet"]}, **kw)
  with pytest.raises(ValueError, match="It fits the text encoder: pass adapter="):
    pipe.generate(PROMPTS, adapter=adapters["text_encoder"], **kw)
  with pytest.raises(ValueError, match="which are not linear layers of this CLIPTextEncoder"):
    pipe.generate(PROMPTS, adapter={"text_encoder": adapters["unet"]}, **kw)
  with pytest.raises(FileNotFoundError, match="expected a diffusers LoRA file"):
    pipe.generate(PROMPTS, adapter=str(tmp_path), **kw)
