"""The adapter store: lazy registration, host LRU cache, content identity, checks, errors."""
import os
import shutil
import threading

import jax
import numpy as np
import pytest

import jaxadapt as ja
from _adapter_helpers import perturbed
from serve import AdapterError, AdapterStore


@pytest.fixture(scope="module")
def base(llama_dir):
  return ja.load_model(llama_dir[0])


@pytest.fixture(scope="module")
def adapter_dirs(base, tmp_path_factory):
  root = tmp_path_factory.mktemp("adapters")
  dirs = []
  for i, (r, targets) in enumerate(((2, ["q_proj"]), (4, "all-linear"), (3, ["down_proj"]))):
    a = perturbed(ja.init_lora(base, ja.LoraConfig(r=r, target_modules=targets), seed=i), i)
    d = root / f"a{i}"
    ja.save_adapter(a, str(d))
    dirs.append(str(d))
  return dirs


def _device_bytes():
  return sum(x.nbytes for x in jax.live_arrays())


def test_registering_2000_adapters_reads_nothing_and_costs_no_device_memory(base, adapter_dirs,
                                                                            tmp_path):
  links = tmp_path / "tree"
  for i in range(2000):
    os.makedirs(links / f"group{i % 10}", exist_ok=True)
    os.symlink(adapter_dirs[i % 3], links / f"group{i % 10}" / f"ad{i}")
  store = AdapterStore(base)
  before = _device_bytes()
  names = store.register_tree(str(links))
  assert len(names) == len(store) == 2000 and "group3/ad13" in names
  assert store.stats()["loads"] == 0 and store.stats()["cached"] == 0
  assert store.info("group3/ad13")["residency"] == "disk"
  stored = store.get("group3/ad13")
  assert _device_bytes() == before  # host numpy weights only
  assert all(isinstance(v, np.ndarray) for w in stored.adapter.weights.values()
             for v in w.values())
  with pytest.raises(AdapterError, match="already registered"):
    store.register_tree(str(links))
  assert len(store) == 2000


def test_get_reads_once_caches_by_lru_and_equals_load_adapter(base, adapter_dirs):
  store = AdapterStore(base)
  for i, d in enumerate(adapter_dirs):
    store.register(f"a{i}", d)
  ref = ja.load_adapter(adapter_dirs[1])
  got = store.get("a1")
  for path, w in ref.weights.items():
    for k, v in w.items():
      np.testing.assert_array_equal(got.adapter.weights[path][k], np.asarray(v))
  assert store.get("a1") is got
  assert store.stats()["hits"] == 1 and store.stats()["loads"] == 1
  info = store.info("a1")
  assert info["residency"] == "host" and info["rank"] == 4 and "gate_proj" in info["targets"]
  assert info["nbytes"] == got.nbytes > 0
  # A budget that holds the two smaller adapters: reading a third evicts the least recent.
  sizes = [store.get(f"a{i}").nbytes for i in range(3)]
  small = AdapterStore(base, host_budget_bytes=sizes[0] + sizes[2])
  for i, d in enumerate(adapter_dirs):
    small.register(f"a{i}", d)
  small.get("a0")
  small.get("a2")
  small.get("a0")  # a0 is now the most recent
  big = small.get("a1")  # larger than the budget: returned, not kept
  assert big.nbytes == sizes[1] and not small.cached("a1")
  assert small.cached("a0") and small.cached("a2")
  small.register("b", adapter_dirs[0])
  small.get("b")  # evicts a2, the least recently used
  assert small.cached("a0") and small.cached("b") and not small.cached("a2")
  assert small.stats()["evictions"] == 1
  assert small.stats()["cached_bytes"] <= small.host_budget_bytes


def test_a_rewritten_dir_gets_a_new_identity(base, adapter_dirs, tmp_path):
  d = str(tmp_path / "x")
  shutil.copytree(adapter_dirs[0], d)
  store = AdapterStore(base)
  store.register("x", d)
  first = store.get("x")
  new = perturbed(ja.init_lora(base, ja.LoraConfig(r=2, target_modules=["q_proj"]), seed=9), 9)
  ja.save_adapter(new, d)
  second = store.get("x")
  assert second.digest != first.digest and second.key != first.key
  path = next(iter(new.weights))
  np.testing.assert_array_equal(second.adapter.weights[path]["b"],
                                np.asarray(new.weights[path]["b"]))
  assert store.stats()["loads"] == 2


def test_concurrent_gets_share_one_read(base, adapter_dirs):
  store = AdapterStore(base)
  store.register("a1", adapter_dirs[1])
  out = []
  threads = [threading.Thread(target=lambda: out.append(store.get("a1"))) for _ in range(6)]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  assert len(out) == 6 and all(o is out[0] for o in out)
  assert store.stats()["loads"] == 1


def test_bad_adapters_are_refused_by_name_and_change_nothing(base, adapter_dirs, tmp_path,
                                                             hf_model_maker):
  store = AdapterStore(base)
  store.register("good", adapter_dirs[0])
  good = store.get("good")
  with pytest.raises(AdapterError, match="unknown adapter 'nope'.*good"):
    store.get("nope")
  with pytest.raises(AdapterError, match="not a PEFT adapter dir"):
    store.register("empty", str(tmp_path))
  with pytest.raises(AdapterError, match="whitespace"):
    store.register("a b", adapter_dirs[0])
  with pytest.raises(AdapterError, match="already registered"):
    store.register("good", adapter_dirs[1])
  corrupt = tmp_path / "corrupt"
  shutil.copytree(adapter_dirs[1], corrupt)
  st = corrupt / "adapter_model.safetensors"
  st.write_bytes(st.read_bytes()[:100])
  store.register("corrupt", str(corrupt))
  with pytest.raises(AdapterError, match="'corrupt'"):
    store.get("corrupt")
  other_dir = tmp_path / "other_base"
  hf_model_maker("llama", str(other_dir), hidden_size=48)
  other = ja.init_lora(ja.load_model(str(other_dir)), ja.LoraConfig(target_modules=["q_proj"]))
  ja.save_adapter(other, str(tmp_path / "foreign"))
  store.register("foreign", str(tmp_path / "foreign"))
  with pytest.raises(AdapterError, match="'foreign'.*does not fit the base"):
    store.get("foreign")
  assert store.get("good") is good and store.names() == ["corrupt", "foreign", "good"]
  assert not store.cached("corrupt") and not store.cached("foreign")
  store.unregister("foreign")
  with pytest.raises(AdapterError, match="unknown adapter"):
    store.unregister("foreign")


def test_register_tree_survives_a_symlink_loop(base, adapter_dirs, tmp_path):
  root = tmp_path / "root"
  os.makedirs(root / "sub")
  os.symlink(adapter_dirs[0], root / "sub" / "x")
  os.symlink(root, root / "sub" / "loop")
  assert AdapterStore(base).register_tree(str(root)) == ["sub/x"]
