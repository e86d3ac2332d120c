"""jaxadapt's Llama family against transformers' torch models (the reference)."""
import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
import torch

import jaxadapt as ja
from tests.conftest import make_hf_model

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 16}

CASES = {
    "llama": ("llama", {}),
    "llama3_rope_tied": ("llama", dict(rope_scaling=LLAMA3_ROPE, max_position_embeddings=64,
                                       tie_word_embeddings=True)),
    "llama_linear_rope_bias_headdim": ("llama", dict(rope_scaling={"rope_type": "linear",
                                                                   "factor": 2.0},
                                                     attention_bias=True, mlp_bias=True,
                                                     head_dim=16)),
    "mistral_sliding": ("mistral", dict(sliding_window=3)),
    "qwen2": ("qwen2", {}),
    "qwen2_sliding_tied": ("qwen2", dict(use_sliding_window=True, sliding_window=4,
                                         max_window_layers=1, tie_word_embeddings=True)),
}


def _batch(seed=0, b=3, s=9, vocab=97, pad=True):
  g = torch.Generator().manual_seed(seed)
  ids = torch.randint(0, vocab, (b, s), generator=g)
  mask = torch.ones(b, s, dtype=torch.long)
  if pad:
    mask[0, :3] = 0   # left padding
    mask[1, -2:] = 0  # right padding
  return ids, mask


@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_equal_transformers(case, tmp_path):
  family, overrides = CASES[case]
  ref_model = make_hf_model(family, str(tmp_path), **overrides)
  ids, mask = _batch()
  with torch.no_grad():
    ref = ref_model(ids, attention_mask=mask).logits.numpy()
  model = ja.load_model(str(tmp_path), dtype="float32")
  out = np.asarray(model(ids.numpy(), attention_mask=mask.numpy()))
  assert out.shape == ref.shape
  real = mask.numpy().astype(bool)
  np.testing.assert_allclose(out[real], ref[real], atol=1e-4, rtol=0)
  # Without a mask as well.
  with torch.no_grad():
    ref2 = ref_model(ids).logits.numpy()
  np.testing.assert_allclose(np.asarray(model(ids)), ref2, atol=1e-4, rtol=0)


def test_bfloat16_close_to_float32(llama_dir):
  directory, _ = llama_dir
  ids, mask = _batch(pad=False)
  f32 = np.asarray(ja.load_model(directory, dtype="float32")(ids.numpy()))
  m16 = ja.load_model(directory, dtype="bfloat16")
  assert m16.params["model"]["layers"][0]["self_attn"]["q_proj"]["kernel"].dtype == jnp.bfloat16
  b16 = np.asarray(m16(ids.numpy()).astype(jnp.float32))
  # bf16 has 8 mantissa bits: agreement to a few percent of the logit scale.
  assert np.abs(b16 - f32).max() < 0.05 * np.abs(f32).max()
  assert (b16.argmax(-1) == f32.argmax(-1)).mean() > 0.9


def test_sharded_index_and_bf16_checkpoint(tmp_path):
  ref_model = make_hf_model("llama", str(tmp_path / "src"))
  ref_model.to(torch.bfloat16).save_pretrained(str(tmp_path / "sharded"), max_shard_size="20KB")
  assert os.path.exists(tmp_path / "sharded" / "model.safetensors.index.json")
  ids, _ = _batch(pad=False)
  with torch.no_grad():  # the reference: the bf16-rounded weights, computed in float32
    ref = ref_model.float()(ids).logits.numpy()
  out = np.asarray(ja.load_model(str(tmp_path / "sharded"), dtype="float32")(ids.numpy()))
  np.testing.assert_allclose(out, ref, atol=1e-4, rtol=0)


def test_refuses_other_architectures_and_rope(tmp_path):
  make_hf_model("llama", str(tmp_path))
  cfg_path = tmp_path / "config.json"
  cfg = json.loads(cfg_path.read_text())
  cfg_path.write_text(json.dumps({**cfg, "model_type": "gpt2"}))
  with pytest.raises(ValueError, match="model_type 'gpt2'"):
    ja.load_model(str(tmp_path))
  cfg_path.write_text(json.dumps({**cfg, "rope_parameters": {"rope_type": "longrope",
                                                             "rope_theta": 1e4}}))
  with pytest.raises(ValueError, match="rope type 'longrope'"):
    ja.load_model(str(tmp_path))


def test_missing_dir_and_tensor_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="config.json"):
    ja.load_model(str(tmp_path))
  make_hf_model("llama", str(tmp_path))
  os.remove(tmp_path / "model.safetensors")
  with pytest.raises(FileNotFoundError, match="model.safetensors"):
    ja.load_model(str(tmp_path))


def test_tokenizer_from_the_model_dir(tmp_path):
  """`model.tokenizer` is the dir's transformers tokenizer; text in, logits as transformers."""
  from tokenizers import Tokenizer, models, pre_tokenizers
  from transformers import PreTrainedTokenizerFast
  ref_model = make_hf_model("llama", str(tmp_path))
  assert ja.load_model(str(tmp_path)).tokenizer is None
  vocab = {"[UNK]": 0, "</s>": 1, "hello": 2, "world": 3, "again": 4}
  tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
  tok.pre_tokenizer = pre_tokenizers.Whitespace()
  PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", unk_token="[UNK]",
                          pad_token="</s>").save_pretrained(str(tmp_path))
  model = ja.load_model(str(tmp_path))
  enc = model.tokenizer(["hello world again", "world"], padding=True, return_tensors="np")
  np.testing.assert_array_equal(enc["input_ids"], [[2, 3, 4], [3, 1, 1]])
  with torch.no_grad():
    ref = ref_model(torch.from_numpy(enc["input_ids"]),
                    attention_mask=torch.from_numpy(enc["attention_mask"])).logits.numpy()
  out = np.asarray(model(enc["input_ids"], attention_mask=enc["attention_mask"]))
  real = enc["attention_mask"].astype(bool)
  np.testing.assert_allclose(out[real], ref[real], atol=1e-4, rtol=0)
