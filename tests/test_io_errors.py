"""Bad input to `load_model`, `load_adapter`, `save_adapter` and adapter calls: clear errors that
name what was expected and what was found, never silently wrong results."""
import copy
import json
import os
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest

import jaxadapt as ja
from jaxadapt.adapters.lora import LoraAdapter
from jaxadapt.io.safetensors_mmap import SafetensorsFile

IDS = np.array([[1, 5, 9, 3], [4, 4, 2, 7]], np.int32)


@pytest.fixture(scope="module")
def peft_dir(llama_dir, tmp_path_factory):
  """A PEFT LoRA (r=3 on q_proj and v_proj, non-zero B) of the session's tiny Llama."""
  import torch
  from peft import LoraConfig, get_peft_model
  _, base = llama_dir
  torch.manual_seed(0)
  d = str(tmp_path_factory.mktemp("peft"))
  get_peft_model(copy.deepcopy(base), LoraConfig(r=3, target_modules=["q_proj", "v_proj"],
                                                 init_lora_weights=False)).save_pretrained(d)
  return d


@pytest.fixture(scope="module")
def model(llama_dir):
  return ja.load_model(llama_dir[0])


def _copy(src, dst):
  shutil.copytree(src, dst)
  return str(dst)


def _edit_json(path, **changes):
  cfg = json.loads(Path(path).read_text())
  cfg.update(changes)
  Path(path).write_text(json.dumps(cfg))


def _tensors(directory):
  from safetensors.numpy import load_file
  return load_file(os.path.join(directory, "adapter_model.safetensors"))


def _write_tensors(directory, tensors):
  from safetensors.numpy import save_file
  save_file(tensors, os.path.join(directory, "adapter_model.safetensors"))


# ---------------------------------------------------------------------------------- model dirs

def test_model_dir_errors_name_expected_and_found(llama_dir, tmp_path):
  src = llama_dir[0]
  with pytest.raises(FileNotFoundError, match=r"expected a Hugging Face model dir .*found a file"):
    ja.load_model(os.path.join(src, "config.json"))

  bad = _copy(src, tmp_path / "bad_json")
  Path(os.path.join(bad, "config.json")).write_text("{not json")
  with pytest.raises(ValueError, match=r"config.json is not valid JSON"):
    ja.load_model(bad)
  Path(os.path.join(bad, "config.json")).write_text("[1, 2]")
  with pytest.raises(ValueError, match=r"config.json holds a JSON list, expected an object"):
    ja.load_model(bad)

  nokey = _copy(src, tmp_path / "no_vocab")
  cfg = json.loads(Path(nokey, "config.json").read_text())
  del cfg["vocab_size"]
  Path(os.path.join(nokey, "config.json")).write_text(json.dumps(cfg))
  with pytest.raises(ValueError, match=r"lacks \['vocab_size'\], which a llama config needs"):
    ja.load_model(nokey)

  pickled = _copy(src, tmp_path / "bin_only")
  os.remove(os.path.join(pickled, "model.safetensors"))
  Path(os.path.join(pickled, "pytorch_model.bin")).write_bytes(b"PK\x03\x04 not read")
  with pytest.raises(FileNotFoundError, match=r"expected model.safetensors .*found \[.*"
                     r"'pytorch_model.bin'\].*torch pickles are not read.*safe_serialization"):
    ja.load_model(pickled)

  with pytest.raises(ValueError, match=r"dtype must be a floating dtype .*got 'int32'"):
    ja.load_model(src, dtype="int32")
  with pytest.raises(ValueError, match=r"dtype must be a floating dtype .*got 'float77'"):
    ja.load_model(src, dtype="float77")


def test_sharded_index_errors(llama_dir, tmp_path):
  d = _copy(llama_dir[0], tmp_path / "sharded")
  names = list(SafetensorsFile(os.path.join(d, "model.safetensors")))
  os.rename(os.path.join(d, "model.safetensors"),
            os.path.join(d, "model-00001-of-00002.safetensors"))
  index = os.path.join(d, "model.safetensors.index.json")
  weight_map = {n: f"model-0000{1 + i % 2}-of-00002.safetensors" for i, n in enumerate(names)}
  with open(index, "w") as f:
    json.dump({"metadata": {}, "weight_map": weight_map}, f)
  with pytest.raises(FileNotFoundError, match=r"index.json names shard\(s\) "
                     r"\['model-00002-of-00002.safetensors'\] that are not in .*found \["):
    ja.load_model(d)
  with open(index, "w") as f:
    json.dump({"metadata": {}}, f)
  with pytest.raises(ValueError, match=r"index.json: expected a JSON object with a \"weight_map\""):
    ja.load_model(d)


def _rewrite_header(path, edit):
  raw = Path(path).read_bytes()
  (n,) = struct.unpack("<Q", raw[:8])
  header = json.loads(raw[8:8 + n])
  edit(header)
  hb = json.dumps(header).encode()
  hb += b" " * (-len(hb) % 8)
  Path(path).write_bytes(struct.pack("<Q", len(hb)) + hb + raw[8 + n:])


def test_corrupt_safetensors_are_refused_up_front(llama_dir, tmp_path):
  d = _copy(llama_dir[0], tmp_path / "trunc")
  st = os.path.join(d, "model.safetensors")
  size = os.path.getsize(st)
  with open(st, "r+b") as f:
    f.truncate(size - 1000)
  with pytest.raises(ValueError, match=r"model.safetensors: tensor '.*' spans bytes \[\d+, \d+\) "
                     r"of the data, which holds \d+ bytes; the file is truncated"):
    ja.load_model(d)
  with open(st, "r+b") as f:  # a header length larger than the file (was a MemoryError)
    f.truncate(40)
  with pytest.raises(ValueError, match=r"the header claims \d+ bytes but the file has 32"):
    SafetensorsFile(st)
  Path(st).write_bytes(struct.pack("<Q", 6) + b"{oops}")
  with pytest.raises(ValueError, match=r"the header is not valid JSON"):
    SafetensorsFile(st)

  d2 = _copy(llama_dir[0], tmp_path / "offsets")
  st2 = os.path.join(d2, "model.safetensors")
  _rewrite_header(st2, lambda h: h["lm_head.weight"].update(data_offsets=[0, 4]))
  with pytest.raises(ValueError, match=r"'lm_head.weight' \(F32 \[97, 32\]\) needs 12416 bytes, "
                     r"its data_offsets give 4"):
    ja.load_model(d2)


# --------------------------------------------------------------------------------- PEFT dirs

def test_peft_dir_config_errors(peft_dir, tmp_path):
  pickled = _copy(peft_dir, tmp_path / "bin")
  os.remove(os.path.join(pickled, "adapter_model.safetensors"))
  Path(os.path.join(pickled, "adapter_model.bin")).write_bytes(b"PK\x03\x04 not read")
  with pytest.raises(FileNotFoundError, match=r"no adapter_model.safetensors \(found \[.*"
                     r"'adapter_model.bin'.*torch pickle.*safe_serialization=True"):
    ja.load_adapter(pickled)

  with pytest.raises(ValueError, match=r"dtype must be a floating dtype .*got 'int8'"):
    ja.load_adapter(peft_dir, dtype="int8")  # used to cast the LoRA weights to ints

  d = _copy(peft_dir, tmp_path / "cfg")
  cfg_path = os.path.join(d, "adapter_config.json")
  original = Path(cfg_path).read_text()
  Path(cfg_path).write_text("{")
  with pytest.raises(ValueError, match=r"adapter_config.json is not valid JSON"):
    ja.load_adapter(d)
  Path(cfg_path).write_text(original)
  _edit_json(cfg_path, init_lora_weights="lora_ga")  # LoRA-GA subtracts B A from the base
  with pytest.raises(NotImplementedError, match=r"init_lora_weights='lora_ga' changes the base"):
    ja.load_adapter(d)
  _edit_json(cfg_path, init_lora_weights="gaussian", lora_alpha="abc")
  with pytest.raises(ValueError, match=r"adapter_config.json: could not convert .*'abc'"):
    ja.load_adapter(d)
  _edit_json(cfg_path, lora_alpha=8, r=5)  # PEFT refuses it too (size mismatch)
  with pytest.raises(ValueError, match=r"gives model.layers.0.self_attn.q_proj rank 5 \(r / "
                     r"rank_pattern\) but its tensors have rank 3"):
    ja.load_adapter(d)
  _edit_json(cfg_path, r=3, rank_pattern={"v_proj": 2})
  with pytest.raises(ValueError, match=r"v_proj rank 2 .* tensors have rank 3"):
    ja.load_adapter(d)


def test_peft_tensor_errors(peft_dir, tmp_path):
  t = _tensors(peft_dir)
  q = "base_model.model.model.layers.0.self_attn.q_proj"
  d = _copy(peft_dir, tmp_path / "t")

  def refused(tensors, error, match):
    _write_tensors(d, tensors)
    with pytest.raises(error, match=match):
      ja.load_adapter(d)

  refused({}, ValueError, r"holds no LoRA tensors \(expected keys like base_model.model.")
  refused({**t, f"{q}.lora_A.weight": np.zeros((4, 32), np.float32)}, ValueError,
          r"q_proj do not fit together: .* found lora_A \[4, 32\], lora_B \[32, 3\]")
  refused({**t, f"{q}.lora_A.weight": np.zeros((3, 32, 1, 1), np.float32)}, NotImplementedError,
          r"shape \[3, 32, 1, 1\], expected 2 dims .*conv layer is not supported")
  refused({**t, "base_model.model.model.embed_tokens.lora_embedding_A": np.zeros((3, 97))},
          ValueError, r"model.embed_tokens has \['a'\], expected both lora_A and lora_B")
  refused({**t, f"{q}.bias": np.zeros((32,), np.float32)}, NotImplementedError,
          r"q_proj.bias' .* a bias \(PEFT's bias='all'")
  refused({**t, "base_model.model.lm_head.weight": np.zeros((97, 32, 1), np.float32)},
          NotImplementedError, r"lm_head.weight' is a saved base weight that is not a 2-D")
  refused({k.replace("lora_A.weight", "lora_A.default.weight"): v for k, v in t.items()},
          NotImplementedError, r"lora_A.default.weight' .*\(an adapter name in the key")


def test_safetensors_paths(peft_dir, tmp_path):
  """The weights file of a PEFT dir loads as the dir; renamed, it is refused, not misread."""
  whole = ja.load_adapter(peft_dir)
  by_file = ja.load_adapter(os.path.join(peft_dir, "adapter_model.safetensors"))
  assert by_file.config == whole.config and set(by_file.weights) == set(whole.weights)
  renamed = str(tmp_path / "my_lora.safetensors")
  shutil.copy(os.path.join(peft_dir, "adapter_model.safetensors"), renamed)
  with pytest.raises(ValueError, match=r"holds a PEFT adapter's weights .*adapter_config.json"):
    ja.load_adapter(renamed)
  from safetensors.numpy import save_file
  kohya = str(tmp_path / "kohya.safetensors")
  save_file({"lora_unet_mid_block_attentions_0_proj_in.lora_down.weight":
             np.zeros((2, 8), np.float32)}, kohya)
  with pytest.raises(NotImplementedError, match=r"kohya / A1111-style LoRA"):
    ja.load_adapter(kohya)


def test_config_must_target_the_weights(peft_dir, model, tmp_path):
  """PEFT refuses a config that targets nothing and silently drops weights its config does not
  target; jaxadapt refuses both rather than give another result than PEFT."""
  d = _copy(peft_dir, tmp_path / "none")
  _edit_json(os.path.join(d, "adapter_config.json"), target_modules=["nothing"])
  with pytest.raises(ValueError, match=r"target_modules=\('nothing',\).*matches no linear layer"):
    model(IDS, adapter=ja.load_adapter(d))
  extra = _copy(peft_dir, tmp_path / "extra")
  k = "base_model.model.model.layers.0.self_attn.k_proj"
  _write_tensors(extra, {**_tensors(peft_dir), f"{k}.lora_A.weight": np.ones((3, 32), np.float32),
                         f"{k}.lora_B.weight": np.ones((16, 3), np.float32)})
  adapter = ja.load_adapter(extra)
  with pytest.raises(ValueError, match=r"weights at \['model.layers.0.self_attn.k_proj'\], which "
                     r"its config \(target_modules=\('[qv]_proj', '[qv]_proj'\).*does not target"):
    model(IDS, adapter=adapter)
  with pytest.raises(ValueError, match=r"does not target"):
    ja.merge(model, adapter)
  with pytest.raises(ValueError, match=r"does not target"):
    model(IDS, adapters=[adapter], adapter_ids=[0, -1])


# ----------------------------------------------------------------------------- adapter calls

def test_adapter_arguments_are_checked(peft_dir, model):
  a = ja.load_adapter(peft_dir)
  bad_ids = {"float": [0.5, 0], "bool": [True, False], "str": ["0", "1"], "too_big": [1, 0],
             "below_-1": [-2, 0]}
  for ids in bad_ids.values():
    with pytest.raises(ValueError, match=r"adapter_ids must be one int per batch element in "
                       r"\[-1, 0\] .*for 1 adapter"):
      model(IDS, adapters=[a], adapter_ids=ids)
  for ids in (0, [[0], [0]], [0]):
    with pytest.raises(ValueError, match=r"one id per sequence, shape \(2,\); got shape"):
      model(IDS, adapters=[a], adapter_ids=ids)
  with pytest.raises(ValueError, match=r"adapter_ids= needs adapters="):
    model(IDS, adapter_ids=[0, 0])  # used to run the base silently
  with pytest.raises(TypeError, match=r"adapters= takes a list of adapters"):
    model(IDS, adapters=a, adapter_ids=[0, 0])
  with pytest.raises(TypeError, match=r"expected a LoraAdapter .*got list; for several"):
    model(IDS, adapter=[a])
  with pytest.raises(TypeError, match=r"expected a LoraAdapter .*got str"):
    model(IDS, adapter=peft_dir)
  with pytest.raises(ValueError, match=r"in \[-1, -1\] .*for 0 adapter"):
    model(IDS, adapters=[], adapter_ids=[0, -1])
  # -1 everywhere, even with an empty list, is the base model.
  np.testing.assert_array_equal(np.asarray(model(IDS, adapters=[], adapter_ids=[-1, -1])),
                                np.asarray(model(IDS)))


# ------------------------------------------------------------------------------ save_adapter

def test_save_adapter_errors_keep_the_previous_files(peft_dir, tmp_path):
  a = ja.load_adapter(peft_dir)
  afile = tmp_path / "afile"
  afile.write_text("x")
  with pytest.raises(FileExistsError, match=r"afile is a file; save_adapter writes a dir"):
    ja.save_adapter(a, str(afile))
  with pytest.raises(TypeError, match=r"expects a LoraAdapter, got str"):
    ja.save_adapter(peft_dir, str(tmp_path / "x"))
  out = str(tmp_path / "out")
  ja.save_adapter(a, out)
  import dataclasses
  unserialisable = LoraAdapter(weights={}, config=dataclasses.replace(
      a.config, base_model_name_or_path=object()))
  with pytest.raises(TypeError, match="not JSON serializable"):
    ja.save_adapter(unserialisable, out)
  again = ja.load_adapter(out)  # the earlier save is whole
  assert set(again.weights) == set(a.weights)
  for p in a.weights:
    np.testing.assert_array_equal(np.asarray(again.weights[p]["b"]), np.asarray(a.weights[p]["b"]))
  assert sorted(os.listdir(out)) == ["adapter_config.json", "adapter_model.safetensors"]


def test_save_adapter_with_ranks_other_than_its_config(llama_dir, model, tmp_path):
  """An adapter whose tensors have another rank than its config says is saved so that PEFT
  builds it with those ranks, and gives jaxadapt's output (jaxadapt scales by the tensor rank)."""
  import jax
  import torch
  from peft import PeftModel
  cfg = ja.LoraConfig(r=4, lora_alpha=6, target_modules=["q_proj", "v_proj"],
                      rank_pattern={"v_proj": 3})
  base_adapter = ja.init_lora(model, cfg, seed=1)
  weights = {}
  key = jax.random.key(0)
  for i, (path, w) in enumerate(base_adapter.weights.items()):
    key, k1, k2 = jax.random.split(key, 3)
    r = 2 if i % 2 == 0 else w["a"].shape[1]  # every other path: rank 2 against its config
    weights[path] = {"a": jax.random.normal(k1, (w["a"].shape[0], r)) * 0.3,
                     "b": jax.random.normal(k2, (r, w["b"].shape[1])) * 0.3}
  adapter = LoraAdapter(weights=weights, config=cfg)
  out = str(tmp_path / "odd")
  ja.save_adapter(adapter, out)
  reloaded = ja.load_adapter(out)  # jaxadapt's own rank check accepts it
  assert {p: reloaded.rank(p) for p in weights} == {p: adapter.rank(p) for p in weights}
  ours = np.asarray(model(IDS, adapter=adapter))
  np.testing.assert_allclose(np.asarray(model(IDS, adapter=reloaded)), ours, atol=1e-6, rtol=0)
  peft_model = PeftModel.from_pretrained(copy.deepcopy(llama_dir[1]), out).eval()
  with torch.no_grad():
    ref = peft_model(torch.from_numpy(IDS.astype(np.int64))).logits.numpy()
  np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=0)
  assert np.abs(ours - np.asarray(model(IDS))).max() > 1e-2  # the adapter matters


def test_saved_adapter_files_have_the_umask_mode(tmp_path):
  """Both files of a saved adapter get the mode open() gives (safetensors alone makes 0600)."""
  out = tmp_path / "a"
  ja.save_adapter(ja.load_adapter("default:reverse"), str(out))
  umask = os.umask(0)
  os.umask(umask)
  for name in ("adapter_model.safetensors", "adapter_config.json"):
    assert (out / name).stat().st_mode & 0o777 == 0o666 & ~umask, name
