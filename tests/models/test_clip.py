"""jaxadapt's CLIP text encoder against transformers' `CLIPTextModel` (the reference)."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from jaxadapt.models.clip import CLIPTextConfig, CLIPTextEncoder, load_clip_text

TINY = dict(vocab_size=50, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
            num_attention_heads=4, max_position_embeddings=16)


def make_clip(directory, seed=0, **overrides):
  """Builds and saves a tiny random CLIPTextModel; returns the torch model (eval mode)."""
  import transformers as tf
  torch.manual_seed(seed)
  model = tf.CLIPTextModel(tf.CLIPTextConfig(**{**TINY, **overrides})).eval()
  with torch.no_grad():  # norms init to ones, biases to zeros: make them matter
    for name, p in model.named_parameters():
      if "norm" in name or name.endswith(".bias"):
        p.add_(0.1 * torch.randn_like(p))
  model.save_pretrained(directory)
  return model


def _ids(eos, b=3, s=9, seed=0):
  g = torch.Generator().manual_seed(seed)
  ids = torch.randint(3, 40, (b, s), generator=g)
  ids[0, 5] = eos   # end-of-text inside the sequence
  ids[1, -1] = eos
  ids[2, 2] = eos
  return ids


CASES = {
    # SD 1.x style: quick_gelu, legacy eos_token_id=2 (pooled at argmax of ids)
    "quick_gelu_legacy_eos": dict(eos_token_id=2),
    # SD 2.x style (OpenCLIP): gelu, an explicit eos id
    "gelu_eos_id": dict(hidden_act="gelu", eos_token_id=45, layer_norm_eps=1e-6),
}


@pytest.fixture(scope="module", params=sorted(CASES))
def clip(request, tmp_path_factory):
  d = str(tmp_path_factory.mktemp("clip"))
  overrides = CASES[request.param]
  ref = make_clip(d, **overrides)
  return d, ref, overrides["eos_token_id"]


def test_outputs_equal_transformers(clip):
  directory, ref, eos = clip
  ids = _ids(eos)
  with torch.no_grad():
    r = ref(ids, output_hidden_states=True)
  model = load_clip_text(directory)
  out = model(ids.numpy())
  np.testing.assert_allclose(np.asarray(out.last_hidden_state), r.last_hidden_state.numpy(),
                             atol=1e-4, rtol=0)
  np.testing.assert_allclose(np.asarray(out.pooler_output), r.pooler_output.numpy(), atol=1e-4,
                             rtol=0)
  assert len(out.hidden_states) == len(r.hidden_states) == TINY["num_hidden_layers"] + 1
  np.testing.assert_allclose(np.asarray(out.penultimate_hidden_state),
                             r.hidden_states[-2].numpy(), atol=1e-4, rtol=0)
  for mine, theirs in zip(out.hidden_states, r.hidden_states):
    np.testing.assert_allclose(np.asarray(mine), theirs.numpy(), atol=1e-4, rtol=0)
  # clip_skip as diffusers' pipelines apply it: final LayerNorm of hidden_states[-(k+1)].
  with torch.no_grad():
    skip1 = ref.final_layer_norm(r.hidden_states[-2]).numpy()
  np.testing.assert_allclose(np.asarray(model.prompt_embeds(ids.numpy(), clip_skip=1)), skip1,
                             atol=1e-4, rtol=0)
  np.testing.assert_allclose(np.asarray(model.prompt_embeds(ids.numpy())),
                             r.last_hidden_state.numpy(), atol=1e-4, rtol=0)


def test_padding_mask_equals_transformers(clip):
  directory, ref, eos = clip
  ids = _ids(eos, seed=1)
  mask = torch.ones_like(ids)
  mask[0, 6:] = 0  # right padding after the end-of-text token
  mask[2, 3:] = 0
  with torch.no_grad():
    r = ref(ids, attention_mask=mask)
  out = load_clip_text(directory)(ids.numpy(), mask.numpy())
  real = mask.numpy().astype(bool)
  np.testing.assert_allclose(np.asarray(out.last_hidden_state)[real],
                             r.last_hidden_state.numpy()[real], atol=1e-4, rtol=0)
  np.testing.assert_allclose(np.asarray(out.pooler_output), r.pooler_output.numpy(), atol=1e-4,
                             rtol=0)


def test_legacy_text_model_prefix_and_bfloat16(tmp_path):
  """SD's text_encoder/ checkpoints name tensors `text_model.*`: they load the same."""
  from safetensors.numpy import load_file, save_file
  ref = make_clip(str(tmp_path / "new"), seed=3)
  tensors = load_file(str(tmp_path / "new" / "model.safetensors"))
  os.makedirs(tmp_path / "old")
  save_file({f"text_model.{k}": v for k, v in tensors.items()},
            str(tmp_path / "old" / "model.safetensors"))
  with open(tmp_path / "new" / "config.json") as f:
    cfg = json.load(f)
  with open(tmp_path / "old" / "config.json", "w") as f:
    json.dump(cfg, f)
  ids = _ids(2, seed=2)
  with torch.no_grad():
    want = ref(ids).last_hidden_state.numpy()
  old = load_clip_text(str(tmp_path / "old"))
  np.testing.assert_allclose(np.asarray(old(ids.numpy()).last_hidden_state), want, atol=1e-4,
                             rtol=0)
  half = load_clip_text(str(tmp_path / "old"), dtype=jnp.bfloat16)
  got = half(ids.numpy()).last_hidden_state
  assert got.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(got, np.float32), want, atol=0.1, rtol=0.05)


def test_insert_at_attention_output_matches_editing_out_proj_bias(clip):
  """An insert adding a constant vector equals adding it to out_proj's bias.

  (A per-channel vector, not a scalar: LayerNorm would cancel a uniform shift.)
  """
  directory, _, eos = clip
  ids = _ids(eos).numpy()
  model = load_clip_text(directory)
  path = "encoder.layers.1.self_attn"
  seen = {}
  delta = jnp.linspace(-0.5, 0.5, 32)

  def add_const(out, hidden_in, context, inputs):
    seen["shapes"] = (out.shape, hidden_in.shape, context)
    return out + delta

  got = model(ids, inserts={path: add_const}).last_hidden_state
  assert seen["shapes"] == ((3, 9, 32), (3, 9, 32), None)
  edited = jax.tree_util.tree_map(lambda a: a, model.params)
  b = edited["encoder"]["layers"][1]["self_attn"]["out_proj"]["bias"]
  edited["encoder"]["layers"][1]["self_attn"]["out_proj"]["bias"] = b + delta
  want = CLIPTextEncoder(model.config, model.graphdef, edited)(ids).last_hidden_state
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5, rtol=0)
  base = model(ids).last_hidden_state
  assert np.abs(np.asarray(got) - np.asarray(base)).max() > 1e-2


def test_config_refuses_unsupported():
  with pytest.raises(ValueError, match="hidden_act 'relu'"):
    CLIPTextConfig.from_config(dict(model_type="clip_text_model", hidden_act="relu", **TINY))
  with pytest.raises(ValueError, match="CLIPTextModelWithProjection"):
    CLIPTextConfig.from_config(dict(model_type="clip_text_model",
                                    architectures=["CLIPTextModelWithProjection"], **TINY))
  with pytest.raises(ValueError, match="expected 'clip_text_model'"):
    CLIPTextConfig.from_config(dict(model_type="clip_vision_model", **TINY))
