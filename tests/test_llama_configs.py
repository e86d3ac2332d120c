"""Llama-family config options against transformers (numbers), and the options jaxadapt refuses.

Every accepted option is checked against the torch model transformers builds from the same
config.json; every refused one must raise naming the option, what was expected and what was found.
"""
import copy
import dataclasses
import json

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers as tf
from flax import nnx
from peft import LoraConfig as PeftLoraConfig
from peft import get_peft_model

import jaxadapt as ja
from jaxadapt.adapters.lora import kernel_at
from jaxadapt.models.llama import LlamaConfig, LlamaForCausalLM
from tests.conftest import TINY, make_hf_model

ATOL = 1e-4
# Larger weights than HF's 0.02 init so that rope scaling, activations and windows move the
# logits well above ATOL (each case also checks that dropping its option would be caught).
SHARP = {"initializer_range": 0.3}


def _batch(b=3, s=12, seed=0):
  ids = torch.randint(0, TINY["vocab_size"], (b, s), generator=torch.Generator().manual_seed(seed))
  mask = torch.ones(b, s, dtype=torch.long)
  if b > 1:
    mask[0, :3] = 0   # left padding
    mask[1, -2:] = 0  # right padding
  return ids, mask


def _reload_hf(directory):
  return tf.AutoModelForCausalLM.from_pretrained(directory).eval()


def _edit_config(directory, edit):
  path = directory / "config.json"
  cfg = json.loads(path.read_text())
  edit(cfg)
  path.write_text(json.dumps(cfg))


def _compare(ref_model, model, ids, mask, positions=None, atol=ATOL):
  """Max |ours - transformers| over real tokens; asserts it is within atol. Returns ours."""
  with torch.no_grad():
    ref = ref_model(ids, attention_mask=mask, position_ids=positions).logits.float().numpy()
  out = np.asarray(model(ids.numpy(), attention_mask=mask.numpy(),
                         position_ids=None if positions is None else positions.numpy())
                   .astype(jnp.float32))
  real = mask.numpy().astype(bool)
  np.testing.assert_allclose(out[real], ref[real], atol=atol, rtol=0)
  return out


def _with_config(model, **changes):
  """The same params under a changed config (to check an option matters)."""
  config = dataclasses.replace(model.config, **changes)
  graphdef, _ = nnx.split(nnx.eval_shape(
      lambda: LlamaForCausalLM(config, dtype=model.dtype, rngs=nnx.Rngs(0))))
  return ja.CausalLM(config, graphdef, model.params)


YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 8}
LONGROPE = {"rope_type": "longrope", "short_factor": [1.0, 1.5, 2.0, 3.0],
            "long_factor": [2.0, 3.0, 5.0, 8.0], "original_max_position_embeddings": 8}
# name: (family, overrides, option that must matter: LlamaConfig field -> value without it)
CASES = {
    "dynamic_ntk": ("llama", {"rope_parameters": {"rope_type": "dynamic", "factor": 4.0,
                                                   "rope_theta": 100.0},
                                  "max_position_embeddings": 8}, {"rope_scaling": None}),
    "yarn": ("llama", {"rope_parameters": YARN, "max_position_embeddings": 32},
             {"rope_scaling": None}),
    "yarn_mscale": ("qwen2", {"rope_parameters": {**YARN, "mscale": 2.0, "mscale_all_dim": 1.0,
                                                   "beta_fast": 8, "truncate": False},
                                  "max_position_embeddings": 32}, {"rope_scaling": None}),
    "longrope": ("llama", {"rope_parameters": LONGROPE, "max_position_embeddings": 32,
                               "head_dim": 8}, {"rope_scaling": None}),
    "gelu_mqa": ("llama", {"hidden_act": "gelu", "num_key_value_heads": 1},
                 {"hidden_act": "silu"}),
    "gelu_tanh_eps": ("mistral", {"hidden_act": "gelu_pytorch_tanh", "rms_norm_eps": 0.3,
                                      "sliding_window": None}, {"hidden_act": "silu"}),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_option_equals_transformers(case, tmp_path):
  family, overrides, without = CASES[case]
  ref_model = make_hf_model(family, str(tmp_path), **SHARP, **overrides)
  model = ja.load_model(str(tmp_path))
  ids, mask = _batch()
  out = _compare(ref_model, model, ids, mask)
  # The option matters here: the model without it is far from transformers.
  plain = np.asarray(_with_config(model, **without)(ids.numpy(), attention_mask=mask.numpy()))
  real = mask.numpy().astype(bool)
  assert np.abs(plain[real] - out[real]).max() > 100 * ATOL
  if case in ("dynamic_ntk", "longrope"):
    # Positions within the original context pick the unscaled / short frequencies, as
    # transformers does per call; a batch of one token too.
    pos = torch.arange(12).clamp(max=6).expand(3, 12)
    _compare(ref_model, model, ids, mask, positions=pos)
    _compare(ref_model, model, ids[:1, :1], mask[:1, :1])


def test_config_defaults_follow_transformers(tmp_path):
  """Keys a config.json leaves out take the family's transformers defaults."""
  # Mistral: 8 key/value heads and a 4096-token window when the keys are absent.
  d = tmp_path / "mistral"
  make_hf_model("mistral", str(d), hidden_size=64, num_attention_heads=16, num_key_value_heads=8)
  _edit_config(d, lambda c: [c.pop(k) for k in ("num_key_value_heads", "sliding_window")])
  ref_model = _reload_hf(str(d))
  assert ref_model.config.sliding_window == 4096
  model = ja.load_model(str(d))
  assert model.config.num_key_value_heads == ref_model.config.num_key_value_heads == 8
  assert model.config.sliding_windows == (4096, 4096)
  _compare(ref_model, model, *_batch())

  # Qwen2: use_sliding_window without max_window_layers / layer_types: the first 28 layers are
  # full attention (transformers' default), so a 2-layer model has no window at all.
  d = tmp_path / "qwen2"
  make_hf_model("qwen2", str(d), use_sliding_window=True, sliding_window=3, max_window_layers=1,
                **SHARP)
  _edit_config(d, lambda c: [c.pop(k) for k in ("max_window_layers", "layer_types")])
  ref_model = _reload_hf(str(d))
  assert ref_model.config.layer_types == ["full_attention"] * 2
  model = ja.load_model(str(d))
  assert model.config.sliding_windows == (0, 0)
  _compare(ref_model, model, *_batch())


def test_keys_transformers_reads_or_ignores(tmp_path):
  """A legacy rope_scaling wins over rope_parameters (its theta too); Mistral and Qwen2 ignore
  attention_bias / mlp_bias; pretraining_tp does not change the result."""
  d = tmp_path / "llama"
  make_hf_model("llama", str(d), rope_parameters={"rope_type": "default", "rope_theta": 50.0},
                **SHARP)
  _edit_config(d, lambda c: c.update(rope_scaling={"type": "linear", "factor": 3.0},
                                     pretraining_tp=2))
  ref_model = _reload_hf(str(d))
  assert ref_model.config.rope_parameters["rope_type"] == "linear"
  model = ja.load_model(str(d))
  assert model.config.rope_theta == ref_model.config.rope_parameters["rope_theta"] == 10000.0
  _compare(ref_model, model, *_batch())

  for family in ("mistral", "qwen2"):
    d = tmp_path / family
    make_hf_model(family, str(d))
    _edit_config(d, lambda c, f=family: c.update(attention_bias=f == "mistral", mlp_bias=True))
    model = ja.load_model(str(d))
    assert not model.config.mlp_bias
    _compare(_reload_hf(str(d)), model, *_batch())


def test_sliding_window_longer_sequences_padding_and_positions(tmp_path):
  """Mistral's window (3) over 12 tokens, left/right padding, explicit position_ids."""
  ref_model = make_hf_model("mistral", str(tmp_path), sliding_window=3, **SHARP)
  model = ja.load_model(str(tmp_path))
  ids, mask = _batch()
  out = _compare(ref_model, model, ids, mask, positions=(mask.cumsum(-1) - 1).clamp(min=0))
  full = np.asarray(_with_config(model, sliding_windows=(0, 0))(
      ids.numpy(), attention_mask=mask.numpy(),
      position_ids=(mask.cumsum(-1) - 1).clamp(min=0).numpy()))
  real = mask.numpy().astype(bool)
  assert np.abs(full[real] - out[real]).max() > 100 * ATOL


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_equals_transformers_in_the_same_dtype(dtype, tmp_path):
  ref_model = make_hf_model("qwen2", str(tmp_path), tie_word_embeddings=True)
  model = ja.load_model(str(tmp_path), dtype=dtype)
  assert model.dtype == jnp.dtype(dtype)
  ids, mask = _batch()
  with torch.no_grad():
    scale = np.abs(ref_model(ids).logits.numpy()).max()
  # A few units in the last place at the logit scale (bf16: 8 bits, f16: 11 bits of mantissa).
  ulp = scale * (2.0 ** -8 if dtype == "bfloat16" else 2.0 ** -11)
  _compare(ref_model.to(getattr(torch, dtype)), model, ids, mask, atol=4 * ulp)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_merge_equals_peft_and_unmerge_is_bitwise(dtype, llama_dir, tmp_path):
  """DoRA + rsLoRA merged == PEFT's merge_and_unload; the default unmerge is arithmetic (within
  rounding) and keeps no kernel copies; two stacked merges with keep_original undone newest
  first restore every kernel bitwise.

  The reference merge is PEFT's in float32 on the weights rounded to `dtype` (what jaxadapt
  loads), so in bfloat16 each merged kernel element must be that value rounded once (within
  half an ulp); PEFT's own bfloat16 merge rounds several times and is no sharper a reference.
  """
  directory, base = llama_dir
  tdtype = getattr(torch, dtype)
  model = ja.load_model(directory, dtype=dtype)
  adapters, refs = [], []
  for seed, opts in enumerate([{"use_dora": True, "use_rslora": True, "lora_alpha": 24},
                               {"use_rslora": True, "lora_alpha": 64}]):
    torch.manual_seed(seed)
    peft_model = get_peft_model(copy.deepcopy(base), PeftLoraConfig(
        r=4, target_modules="all-linear", init_lora_weights=False, **opts)).eval()
    with torch.no_grad():  # magnitudes away from ||W + BA|| so that they matter
      for name, p in peft_model.named_parameters():
        if "lora_magnitude_vector" in name:
          p.mul_(1 + 0.3 * torch.rand_like(p))
    peft_model.save_pretrained(str(tmp_path / str(seed)))
    adapters.append(ja.load_adapter(str(tmp_path / str(seed)), dtype=dtype))
    refs.append(peft_model.to(tdtype).float().merge_and_unload())
  merged = ja.merge(model, adapters[0])
  for path in adapters[0].weights:
    ref_w = refs[0].get_submodule(path).weight.detach().numpy().T
    ours = np.asarray(kernel_at(merged.params, path).astype(jnp.float32))
    bound = (1e-6 if dtype == "float32" else 2.0 ** -8 * np.abs(ref_w) + 1e-6)
    assert np.all(np.abs(ours - ref_w) <= bound), path
  ids, _ = _batch(s=8)
  if dtype == "float32":  # (a bf16 forward of these weights amplifies rounding-boundary flips)
    with torch.no_grad():
      ref = refs[0](ids).logits.numpy()
    np.testing.assert_allclose(np.asarray(merged(ids.numpy())), ref, atol=ATOL, rtol=0)

  # By default the undo record holds no kernels (no second copy); unmerge is then arithmetic.
  _, undo = merged.merged[-1]
  assert not undo["original"] and not undo["merged"]
  approx = ja.unmerge(merged)
  for path in adapters[0].weights:
    a, b = kernel_at(approx.params, path), kernel_at(model.params, path)
    # Rounding of the merged kernel, carried back: a few ulps at the merged kernel's scale.
    scale = float(jnp.max(jnp.abs(kernel_at(merged.params, path).astype(jnp.float32))))
    tol = 1e-5 if dtype == "float32" else 2.0 ** -6 * scale
    np.testing.assert_allclose(np.asarray(a.astype(jnp.float32)),
                               np.asarray(b.astype(jnp.float32)), atol=tol, rtol=0)
  merged = ja.merge(model, adapters[0], keep_original=True)
  twice = ja.merge(merged, adapters[1], keep_original=True)
  once = ja.unmerge(twice)
  restored = ja.unmerge(once)
  for path in adapters[0].weights:
    for new, old in ((once, merged), (restored, model)):
      a, b = kernel_at(new.params, path), kernel_at(old.params, path)
      assert a.dtype == b.dtype == jnp.dtype(dtype)
      np.testing.assert_array_equal(np.asarray(a.astype(jnp.float32)),
                                    np.asarray(b.astype(jnp.float32)))
  np.testing.assert_array_equal(np.asarray(restored(ids.numpy()).astype(jnp.float32)),
                                np.asarray(model(ids.numpy()).astype(jnp.float32)))


def _hf_config(family="llama", **changes):
  cfg = {"model_type": family, **TINY, **changes}
  return {k: v for k, v in cfg.items() if v is not None}


@pytest.mark.parametrize("changes,option,found", [
    ({"hidden_act": "mish"}, "hidden_act", "'mish'"),
    ({"rope_scaling": {"rope_type": "proportional", "factor": 2.0}}, "rope type",
     "'proportional'"),
    ({"partial_rotary_factor": 0.5}, "partial_rotary_factor", "0.5"),
    ({"quantization_config": {"quant_method": "gptq", "bits": 4}}, "quantization_config",
     "'gptq'"),
    ({"rope_scaling": {"rope_type": "longrope", "short_factor": [1.0],
                        "long_factor": [1.0] * 4, "original_max_position_embeddings": 8}},
     "short_factor", "found 1"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "low_freq_factor",
     "missing ['low_freq_factor', 'high_freq_factor']"),
])
def test_refused_options_are_named(changes, option, found):
  with pytest.raises(ValueError) as e:
    LlamaConfig.from_hf(_hf_config(**changes))
  assert option in str(e.value) and found in str(e.value)


def test_qwen2_unknown_layer_type_is_named():
  cfg = _hf_config("qwen2", use_sliding_window=True, sliding_window=4,
                   layer_types=["full_attention", "chunked_attention"])
  with pytest.raises(ValueError, match=r"layer_types has \['chunked_attention'\]; expected"):
    LlamaConfig.from_hf(cfg)
