"""LoRA on embed_tokens and lm_head (untied and tied) against PEFT: forward, merge, mixed batches,
save/load both ways, and the base weights PEFT saves beside them (save_embedding_layers)."""
import copy
import dataclasses

import numpy as np
import pytest
import torch
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file, save_file

import jaxadapt as ja
from jaxadapt.adapters.lora import kernel_at

_IDS = torch.randint(0, 97, (3, 6), generator=torch.Generator().manual_seed(0))


def _logits(model):
  with torch.no_grad():
    return model(_IDS).logits.numpy()


def _peft(base, target_modules, seed=0, adapter_name="default", **options):
  torch.manual_seed(seed)
  cfg = PeftLoraConfig(r=3, lora_alpha=5, init_lora_weights=False, target_modules=target_modules,
                       **options)
  model = get_peft_model(copy.deepcopy(base), cfg, adapter_name=adapter_name).eval()
  with torch.no_grad():  # PEFT starts an embedding's lora_embedding_A at zeros: make it matter
    for name, p in model.named_parameters():
      if "lora_embedding_A" in name:
        p.normal_(0.0, 0.1)
  return model


@pytest.fixture(scope="module")
def tied_dir(tmp_path_factory, hf_model_maker):
  d = tmp_path_factory.mktemp("llama_tied")
  return str(d), hf_model_maker("llama", str(d), seed=3, tie_word_embeddings=True)


@pytest.fixture(scope="module")
def untied(llama_dir, tmp_path_factory):
  directory, base = llama_dir
  peft_model = _peft(base, ["embed_tokens", "lm_head", "q_proj"])
  out = tmp_path_factory.mktemp("emb_head")
  peft_model.save_pretrained(str(out))  # save_embedding_layers="auto": the base weights too
  return ja.load_model(directory), base, peft_model, str(out)


def test_embedding_and_head_lora_equal_peft(untied, tmp_path):
  model, base, peft_model, saved = untied
  keys = load_file(f"{saved}/adapter_model.safetensors")
  assert "base_model.model.model.embed_tokens.base_layer.weight" in keys
  assert "base_model.model.lm_head.base_layer.weight" in keys
  adapter = ja.load_adapter(saved)
  assert adapter.embedding_paths == ("model.embed_tokens",)
  ref = _logits(peft_model)
  out = np.asarray(model(_IDS.numpy(), adapter=adapter))
  np.testing.assert_allclose(out, ref, atol=1e-5, rtol=0)
  assert np.abs(out - np.asarray(model(_IDS.numpy()))).max() > 0.1  # the LoRAs matter
  # Merged: the embedding table and the head kernel equal PEFT's merge_and_unload.
  merged_ref = copy.deepcopy(peft_model).merge_and_unload()
  merged = ja.merge(model, adapter)
  np.testing.assert_allclose(np.asarray(kernel_at(merged.params, "model.embed_tokens")),
                             merged_ref.model.embed_tokens.weight.detach().numpy(), atol=1e-6,
                             rtol=1e-6)
  np.testing.assert_allclose(np.asarray(kernel_at(merged.params, "lm_head")),
                             merged_ref.lm_head.weight.detach().numpy().T, atol=1e-6, rtol=0)
  np.testing.assert_allclose(np.asarray(merged(_IDS.numpy())), _logits(merged_ref), atol=1e-5,
                             rtol=0)
  restored = ja.unmerge(merged)
  np.testing.assert_allclose(np.asarray(kernel_at(restored.params, "model.embed_tokens")),
                             np.asarray(kernel_at(model.params, "model.embed_tokens")),
                             atol=1e-6, rtol=0)
  # Saved by jaxadapt (lora_embedding_A/B keys), PEFT loads it with equal outputs.
  ja.save_adapter(adapter, str(tmp_path))
  reloaded = PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path)).eval()
  np.testing.assert_allclose(_logits(reloaded), ref, atol=1e-5, rtol=0)


def test_embedding_lora_in_mixed_batches(untied, llama_dir):
  model, _, _, saved = untied
  emb = ja.load_adapter(saved)
  import jax
  from jaxadapt.adapters import lora as lora_lib
  other = lora_lib.init_lora(model.params, model.linear_paths,
                             ja.LoraConfig(r=2, target_modules=["embed_tokens", "v_proj"]),
                             jax.random.key(1), extra_paths=model.extra_lora_paths)
  assert other.embedding_paths == ("model.embed_tokens",)
  # PEFT's init (embedding: A = 0; linear: B = 0) is the base: give both sides values.
  other = dataclasses.replace(other, weights={p: {k: v + 0.5 for k, v in w.items()}
                                              for p, w in other.weights.items()})
  which = [1, -1, 0]
  ids = _IDS.numpy()
  mixed = np.asarray(model(ids, adapters=[emb, other], adapter_ids=which))
  for i, a in enumerate(which):
    alone = model(ids[i:i + 1], adapter=None if a < 0 else [emb, other][a])
    np.testing.assert_allclose(mixed[i:i + 1], np.asarray(alone), atol=1e-5, rtol=0)
  # One adapter id per token (the decode layout) gives the same rows.
  from jaxadapt.adapters import stack as stack_lib
  stacks = stack_lib.stack_adapters(model.params, [emb, other])
  per_tok = model(ids, context=stack_lib.mixed_context(stacks, np.repeat(which, ids.shape[1]),
                                                       layout="token"))
  np.testing.assert_allclose(np.asarray(per_tok), mixed, atol=1e-5, rtol=0)


@pytest.mark.parametrize("tying", [False, True])
def test_tied_head_and_embedding_lora_equal_peft(tying, tied_dir, tmp_path):
  """A LoRA on a tied head reads the embedding as its kernel; with PEFT's ensure_weight_tying
  the head's A is the embedding's B (both saved, so both load as they are)."""
  directory, base = tied_dir
  peft_model = _peft(base, ["lm_head", "embed_tokens", "v_proj"], seed=1,
                     ensure_weight_tying=tying)
  peft_model.save_pretrained(str(tmp_path))
  model = ja.load_model(directory)
  adapter = ja.load_adapter(str(tmp_path))
  assert set(adapter.weights) >= {"lm_head", "model.embed_tokens"}
  out = np.asarray(model(_IDS.numpy(), adapter=adapter))
  np.testing.assert_allclose(out, _logits(peft_model), atol=1e-5, rtol=0)
  with pytest.raises(ValueError, match="ties lm_head to model.embed_tokens"):
    ja.merge(model, adapter)


def test_saved_base_weight_that_differs_is_refused(untied, llama_dir, tmp_path):
  model, _, _, saved = untied
  # Equal up to the rounding of the model's dtype: accepted (the file holds float32).
  ja.load_model(llama_dir[0], dtype="bfloat16").check_adapter(ja.load_adapter(saved))
  tensors = load_file(f"{saved}/adapter_model.safetensors")
  key = "base_model.model.model.embed_tokens.base_layer.weight"
  changed = dict(tensors)
  changed[key] = tensors[key].clone()
  changed[key][5] += 0.01  # a new token's row, as trainable tokens would leave it
  (tmp_path / "changed").mkdir()
  save_file(changed, str(tmp_path / "changed" / "adapter_model.safetensors"))
  (tmp_path / "changed" / "adapter_config.json").write_text(
      open(f"{saved}/adapter_config.json").read())
  with pytest.raises(ValueError, match=r"model.embed_tokens .*differs from this model's"):
    model(_IDS.numpy(), adapter=ja.load_adapter(str(tmp_path / "changed")))
  resized = dict(tensors)
  resized[key] = torch.cat([tensors[key], tensors[key][:2]])
  (tmp_path / "resized").mkdir()
  save_file(resized, str(tmp_path / "resized" / "adapter_model.safetensors"))
  (tmp_path / "resized" / "adapter_config.json").write_text(
      open(f"{saved}/adapter_config.json").read())
  with pytest.raises(ValueError, match=r"of shape \[99, 32\], but this model's is \[97, 32\]"):
    ja.merge(model, ja.load_adapter(str(tmp_path / "resized")))


def test_dora_on_embedding_equals_peft(untied, tmp_path):
  """PEFT's DoraEmbeddingLayer: m / ||E + s a b||_c (over the vocabulary) scales each token's
  embedding; forward, merge and a mixed batch with a plain embedding LoRA."""
  model, base, _, lora_dir = untied
  peft_model = _peft(base, ["embed_tokens", "q_proj"], seed=2, use_dora=True)
  with torch.no_grad():
    for name, p in peft_model.named_parameters():
      if "lora_magnitude_vector" in name:
        p.mul_(1 + 0.3 * torch.rand_like(p))
  peft_model.save_pretrained(str(tmp_path))
  dora = ja.load_adapter(str(tmp_path))
  assert "magnitude" in dora.weights["model.embed_tokens"]
  ref = _logits(peft_model)
  np.testing.assert_allclose(np.asarray(model(_IDS.numpy(), adapter=dora)), ref, atol=1e-5,
                             rtol=0)
  ja.save_adapter(dora, str(tmp_path / "ours"))
  reloaded = PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "ours")).eval()
  np.testing.assert_allclose(_logits(reloaded), ref, atol=1e-5, rtol=0)
  merged_ref = copy.deepcopy(peft_model).merge_and_unload()
  merged = ja.merge(model, dora)
  np.testing.assert_allclose(np.asarray(kernel_at(merged.params, "model.embed_tokens")),
                             merged_ref.model.embed_tokens.weight.detach().numpy(), atol=1e-6,
                             rtol=1e-6)
  np.testing.assert_allclose(np.asarray(merged(_IDS.numpy())), _logits(merged_ref), atol=1e-5,
                             rtol=0)
  lora = ja.load_adapter(lora_dir)
  which = [0, 1, -1]
  mixed = np.asarray(model(_IDS.numpy(), adapters=[dora, lora], adapter_ids=which))
  np.testing.assert_allclose(mixed[0], ref[0], atol=1e-5, rtol=0)
  np.testing.assert_allclose(mixed[1:2], np.asarray(model(_IDS.numpy()[1:2], adapter=lora)),
                             atol=1e-5, rtol=0)
  from jaxadapt.adapters import stack as stack_lib
  stacks = stack_lib.stack_adapters(model.params, [dora, lora])
  per_tok = model(_IDS.numpy(), context=stack_lib.mixed_context(
      stacks, np.repeat(which, _IDS.shape[1]), layout="token"))
  np.testing.assert_allclose(np.asarray(per_tok), mixed, atol=1e-5, rtol=0)


def test_embedding_adapters_combined_equal_peft(llama_dir, tmp_path):
  """Several embedding / head LoRAs at once, and PEFT's add_weighted_adapter over them."""
  from jaxadapt.adapters.combine import combine
  directory, base = llama_dir
  peft_model = _peft(base, ["embed_tokens", "lm_head"], seed=4, adapter_name="a0")
  torch.manual_seed(5)
  peft_model.add_adapter("a1", PeftLoraConfig(r=2, lora_alpha=3, init_lora_weights=False,
                                              target_modules=["embed_tokens", "q_proj"]))
  with torch.no_grad():
    peft_model.base_model.model.model.embed_tokens.lora_embedding_A["a1"].normal_(0.0, 0.1)
  peft_model.save_pretrained(str(tmp_path))
  adapters = [ja.load_adapter(str(tmp_path / n)) for n in ("a0", "a1")]
  model = ja.load_model(directory)
  peft_model.base_model.set_adapter(["a0", "a1"])
  want = {"active": _logits(peft_model)}
  for kind, weights in (("cat", [0.6, -1.2]), ("svd", [1.0, 0.5])):
    peft_model.add_weighted_adapter(["a0", "a1"], weights, kind, combination_type=kind)
    peft_model.set_adapter(kind)
    want[kind] = _logits(peft_model)
  for kind, ref in want.items():
    weights = None if kind == "active" else ([0.6, -1.2] if kind == "cat" else [1.0, 0.5])
    mix = combine(adapters, weights, kind=kind)
    assert mix.embedding_paths == ("model.embed_tokens",)
    np.testing.assert_allclose(np.asarray(model(_IDS.numpy(), adapter=mix)), ref, atol=1e-5,
                               rtol=0, err_msg=kind)


def test_generate_with_embedding_and_head_lora_equals_peft(untied):
  """Greedy decoding through the KV cache (each step's token embedded with the LoRA), for one
  adapter and a mixed batch, equals PEFT's generate."""
  model, _, peft_model, saved = untied
  adapter = ja.load_adapter(saved)
  prompts = _IDS.numpy()[:2, :4].tolist()

  def theirs(**kwargs):
    with torch.no_grad():
      out = peft_model.generate(torch.tensor(prompts), attention_mask=torch.ones(2, 4, dtype=int),
                                do_sample=False, max_new_tokens=5, eos_token_id=None,
                                pad_token_id=0, **kwargs)
    return out[:, 4:].tolist()

  ours = model.generate(prompts, max_new_tokens=5, eos_token_id=[], adapter=adapter)
  assert ours.ids == theirs()
  mixed = model.generate(prompts, max_new_tokens=5, eos_token_id=[], adapters=[adapter],
                         adapter_ids=[-1, 0])
  assert mixed.ids == theirs(adapter_names=["__base__", "default"])
  assert mixed.ids[0] != ours.ids[0]  # the adapter changes the tokens


def test_ja_init_lora_targets_embeddings_like_peft(untied):
  """`ja.init_lora` on `embed_tokens` and a linear layer: the same shapes as PEFT's fresh
  adapter (A [vocab, r] zeros on the embedding), and the adapted model equals the base."""
  model, *_ = untied
  adapter = ja.init_lora(model, ja.LoraConfig(r=3, target_modules=["embed_tokens", "q_proj"]))
  assert adapter.embedding_paths == ("model.embed_tokens",)
  emb = adapter.weights["model.embed_tokens"]
  assert emb["a"].shape == (model.config.vocab_size, 3) and not np.asarray(emb["a"]).any()
  assert np.asarray(emb["b"]).std() > 0.5
  ids = _IDS.numpy()[:2]
  np.testing.assert_allclose(np.asarray(model(ids, adapter=adapter)), np.asarray(model(ids)),
                             atol=1e-6)
