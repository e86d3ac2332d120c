"""The S-LoRA engine: every request's greedy output equals transformers + PEFT `generate` with
its adapter, with 100 distinct adapters in flight, under preemption, and through bad input."""
import copy

import numpy as np
import pytest
import torch

import jaxadapt as ja
from serve import engine as engine_lib
from serve.engine import Engine, Request

NEW = 6
PAD = 96


def _prompts(seed, n):
  rng = np.random.default_rng(seed)
  return [[int(t) for t in rng.integers(1, 97, int(rng.integers(2, 11)))] for _ in range(n)]


def _peft_generate(model, prompts, names):
  width = max(map(len, prompts))
  ids = np.zeros((len(prompts), width), np.int64)
  mask = np.zeros_like(ids)
  for i, p in enumerate(prompts):
    ids[i, width - len(p):], mask[i, width - len(p):] = p, 1
  kwargs = {} if names is None else {"adapter_names": names}
  with torch.no_grad():
    out = model.generate(torch.tensor(ids), attention_mask=torch.tensor(mask), do_sample=False,
                         max_new_tokens=NEW, min_new_tokens=NEW, pad_token_id=PAD,
                         eos_token_id=None, **kwargs)
  return [list(map(int, r)) for r in out[:, width:].numpy()]


@pytest.fixture(scope="module")
def world(tmp_path_factory, hf_model_maker):
  """A tiny Llama, 100 PEFT adapters of ranks 4-64 (some on the MLP) and one DoRA adapter, and
  a PeftModel holding all of them."""
  from peft import LoraConfig, PeftModel, get_peft_model
  root = tmp_path_factory.mktemp("engine")
  hf = hf_model_maker("llama", str(root / "base"), seed=4, initializer_range=0.2)
  targets = [["q_proj", "v_proj"], ["q_proj", "k_proj", "v_proj", "o_proj"],
             ["gate_proj", "up_proj", "down_proj"], "all-linear"]
  ranks = [4, 8, 16, 32, 64]
  dirs = {}
  for i in range(100):
    torch.manual_seed(1000 + i)
    r = ranks[i % 5]
    cfg = LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets[i % 4],
                     init_lora_weights=False)
    peft = get_peft_model(copy.deepcopy(hf), cfg)
    with torch.no_grad():
      for name, p in peft.named_parameters():
        if "lora_B" in name:
          p.mul_(20.0)
    dirs[f"ad{i}"] = str(root / f"ad{i}")
    peft.save_pretrained(dirs[f"ad{i}"])
  dora = get_peft_model(copy.deepcopy(hf), LoraConfig(r=4, target_modules=["q_proj"],
                                                       use_dora=True, init_lora_weights=False))
  dora.save_pretrained(str(root / "dora"))
  multi = PeftModel.from_pretrained(copy.deepcopy(hf), dirs["ad0"], adapter_name="ad0").eval()
  for name, d in list(dirs.items())[1:]:
    multi.load_adapter(d, adapter_name=name)
  model = ja.load_model(str(root / "base"))
  return model, hf, multi, dirs, str(root / "dora")


def _check(completions, want):
  for c, w in zip(completions, want):
    assert c.finish_reason == "length", (c.request_id, c.error)
    assert c.tokens == w, (c.request_id, c.adapter, c.tokens, w)


def test_100_adapters_in_flight_equal_peft(world):
  model, _, multi, dirs, _ = world
  names = [f"ad{i}" for i in range(100)] + [None] * 4
  prompts = _prompts(0, len(names))
  engine = Engine(model, adapters=dirs, num_pages=12000, max_seqs=128, max_step_tokens=512,
                  max_adapters=128)
  out = engine.generate([Request(prompt=p, adapter=n, max_tokens=NEW, eos_token_id=[])
                         for p, n in zip(prompts, names)])
  want = _peft_generate(multi, prompts, [n or "__base__" for n in names])
  _check(out, want)
  st = engine.stats()
  assert st["pool"]["resident_adapters"] == 100 and st["adapter_loads"] == 100
  assert st["admissions"] == 104 and st["running"] == 0
  assert st["pool"]["kv_pages"] == st["prefix_cached_pages"]  # the rest came back
  # The adapters matter: the base's tokens differ for most prompts.
  base = _peft_generate(multi.get_base_model(), prompts[:100], None)
  assert sum(b != w for b, w in zip(base, want[:100])) > 80


def test_preemption_in_a_small_pool_changes_no_output(world):
  """Long prompts, admission on the prompt alone, and a pool that holds the adapters plus KV
  for about half the requests: requests are preempted and recomputed, and every output still
  equals PEFT's."""
  model, _, multi, dirs, _ = world
  names = ["ad0", "ad1", "ad2", "ad3", None] * 3
  rng = np.random.default_rng(1)
  prompts = [[int(t) for t in rng.integers(1, 97, int(rng.integers(20, 36)))] for _ in names]
  from serve.pool import PagedPool
  block = PagedPool.block_for(model, 16)
  probe = PagedPool(model, num_pages=2, block=block)
  adapter_pages = sum(probe.adapter_pages_needed(ja.load_adapter(dirs[n]))
                      for n in set(names) - {None})
  engine = Engine(model, adapters=dirs, num_pages=1 + adapter_pages + 40, max_seqs=16,
                  max_step_tokens=128, max_adapters=8, reserve="none")
  out = engine.generate([Request(prompt=p, adapter=n, max_tokens=NEW, eos_token_id=[])
                         for p, n in zip(prompts, names)])
  _check(out, _peft_generate(multi, prompts, [n or "__base__" for n in names]))
  st = engine.stats()
  assert st.get("preemptions", 0) > 0
  assert sum(c.preemptions for c in out) == st["preemptions"]
  assert st["pool"]["kv_pages"] == st["prefix_cached_pages"]


def test_streaming_sampling_and_cancellation(world):
  model, _, _, dirs, _ = world
  engine = Engine(model, adapters={"ad5": dirs["ad5"]}, num_pages=2000)
  prompt = _prompts(2, 1)[0]
  handle = engine.submit(Request(prompt=prompt, adapter="ad5", max_tokens=NEW, eos_token_id=[], temperature=0.9,
                                 top_k=20, top_p=0.9, seed=3))
  other = engine.submit(Request(prompt=prompt, max_tokens=50))
  while not handle.done():
    engine.step()
  streamed = [e.token for e in handle]
  done = handle.result()
  assert streamed == done.tokens and len(done.tokens) == NEW
  # Equal to model.generate with the same per-prompt seed: draws do not depend on the batch.
  want = model.generate([prompt], max_new_tokens=NEW, temperature=0.9, top_k=20, top_p=0.9,
                        seed=[3], eos_token_id=[], adapter=ja.load_adapter(dirs["ad5"]))
  assert done.tokens == want.ids[0]
  other.cancel()
  engine.step()
  assert other.result().finish_reason == "cancelled"
  st = engine.stats()
  assert st["pool"]["kv_pages"] == st["prefix_cached_pages"]


def test_bad_requests_are_refused_and_others_finish(world, tmp_path):
  model, _, multi, dirs, dora_dir = world
  corrupt = tmp_path / "corrupt"
  corrupt.mkdir()
  for f in ("adapter_config.json", "adapter_model.safetensors"):
    (corrupt / f).write_bytes((open(f"{dirs['ad1']}/{f}", "rb").read())[:200])
  engine = Engine(model, adapters={"ad1": dirs["ad1"], "dora": dora_dir,
                                   "corrupt": str(corrupt)}, num_pages=150)
  good = _prompts(3, 2)
  for bad, match in ((Request(prompt=good[0], adapter="nope"), "unknown adapter 'nope'"),
                     (Request(prompt=[], adapter="ad1"), "non-empty"),
                     (Request(prompt=good[0], max_tokens=0), "max_tokens"),
                     (Request(prompt=[1] * 3000), "context|pool"),
                     (Request(prompt=good[0], max_tokens=2000), "can never hold"),
                     (Request(prompt=[500]), "vocabulary"),
                     (Request(prompt=good[0], temperature=-1.0), "temperature")):
    with pytest.raises(ValueError, match=match):
      engine.submit(bad)
  handles = [engine.submit(Request(prompt=good[0], adapter="ad1", max_tokens=NEW, eos_token_id=[])),
             engine.submit(Request(prompt=good[1], adapter="dora", max_tokens=NEW, eos_token_id=[])),
             engine.submit(Request(prompt=good[1], adapter="corrupt", max_tokens=NEW, eos_token_id=[])),
             engine.submit(Request(prompt=good[1], max_tokens=NEW, eos_token_id=[]))]
  while not all(h.done() for h in handles):
    engine.step()
  out = [h.result() for h in handles]
  assert out[1].finish_reason == "error" and "DoRA" in out[1].error
  assert out[2].finish_reason == "error" and "'corrupt'" in out[2].error
  want = _peft_generate(multi, [good[0]], ["ad1"]) + _peft_generate(multi, [good[1]],
                                                                     ["__base__"])
  _check([out[0], out[3]], want)


def test_a_step_updates_the_pool_in_place(world, monkeypatch):
  """No step program copies the pool: the forward only reads it and the write is the only op
  on the donated pool (a forward that read and wrote it made XLA copy all of it, several times
  per step). Checked on the compiled programs' HLO."""
  import re
  model, _, _, dirs, _ = world
  engine = Engine(model, adapters={"ad3": dirs["ad3"]}, num_pages=4321, prefetch=False)
  calls = {}
  for name in ("_engine_forward", "_write_kv"):
    fn = getattr(engine_lib, name)
    def spy(*args, _fn=fn, _name=name):
      calls[_name] = args
      return _fn(*args)
    spy.lower = fn.lower
    monkeypatch.setattr(engine_lib, name, spy)
  engine.generate([Request(prompt=[1, 2, 3], adapter="ad3", max_tokens=3, eos_token_id=[]),
                   Request(prompt=[4, 5], max_tokens=3, eos_token_id=[])])
  assert set(calls) == {"_engine_forward", "_write_kv"}
  for name, args in calls.items():
    hlo = getattr(engine_lib, name).lower(*args).compile().as_text()
    copies = re.findall(r"= f32\[4321,[^=]*\bcopy\(", hlo)
    assert not copies, (name, copies[:3])
  hlo = engine_lib._write_kv.lower(*calls["_write_kv"]).compile().as_text()
  assert "input_output_alias={ {}: (0, {}, may-alias) }" in hlo  # the pool buffer is the output


def test_prefix_cache_reuses_a_system_prompt_per_adapter_only(world):
  model, _, multi, dirs, _ = world
  engine = Engine(model, adapters={"ad1": dirs["ad1"], "ad2": dirs["ad2"]}, num_pages=800)
  block = engine.pool.block
  rng = np.random.default_rng(7)
  system = [int(t) for t in rng.integers(1, 97, 3 * block)]
  prompts = [system + [int(t) for t in rng.integers(1, 97, n)] for n in (4, 6, 3, 5, 2)]
  order = ["ad1", "ad1", "ad2", None, None]
  hits = []
  out = []
  for p, a in zip(prompts, order):  # one at a time: each sees what the earlier ones cached
    out += engine.generate([Request(prompt=p, adapter=a, max_tokens=NEW, eos_token_id=[])])
    hits.append(engine.stats().get("prefix_hit_tokens", 0))
  assert hits == [0, 3 * block, 3 * block, 3 * block, 6 * block]  # same adapter only
  _check(out, [_peft_generate(multi, [p], [a or "__base__"])[0]
               for p, a in zip(prompts, order)])
  # A later batch of the same prompts reuses too, and gives the same tokens.
  again = engine.generate([Request(prompt=p, adapter=a, max_tokens=NEW, eos_token_id=[])
                           for p, a in zip(prompts, order)])
  assert [c.tokens for c in again] == [c.tokens for c in out]
  assert engine.stats()["prefix_hit_tokens"] > hits[-1]


def test_an_adapter_larger_than_the_pool_fails_its_request_only(world):
  model, _, multi, dirs, _ = world
  engine = Engine(model, adapters={"big": dirs["ad19"], "ad0": dirs["ad0"]}, num_pages=60)
  prompt = _prompts(4, 1)[0]
  out = engine.generate([Request(prompt=prompt, adapter="big", max_tokens=NEW, eos_token_id=[]),
                         Request(prompt=prompt, adapter="ad0", max_tokens=NEW, eos_token_id=[])])
  assert out[0].finish_reason == "error" and "more than the pool" in out[0].error
  _check(out[1:], _peft_generate(multi, [prompt], ["ad0"]))


def test_a_repeated_workload_compiles_nothing_new(world):
  model, _, _, dirs, _ = world
  reqs = [Request(prompt=p, adapter=a, max_tokens=NEW, eos_token_id=[])
          for p, a in zip(_prompts(9, 6), ["ad3", None, "ad7", "ad3", None, "ad8"])]
  first = Engine(model, adapters=dirs, num_pages=3000, prefix_cache=False).generate(reqs)
  before = Engine.compiled_programs()
  again = Engine(model, adapters=dirs, num_pages=3000, prefix_cache=False).generate(reqs)
  assert Engine.compiled_programs() == before
  assert [c.tokens for c in again] == [c.tokens for c in first]


def test_adapters_load_and_unload_while_requests_run(world, tmp_path):
  """`load_adapter` reads and checks before registering (a bad dir changes nothing);
  `unload_adapter` refuses new requests for the name but lets those in flight finish, then
  frees the name; residency moves disk -> host -> device."""
  model, hf, multi, dirs, dora_dir = world
  engine = Engine(model, adapters={"ad3": dirs["ad3"]}, num_pages=2000, max_queue=2)
  assert engine.adapter_info("ad3")["residency"] == "disk"
  with pytest.raises(ValueError, match="DoRA"):
    engine.load_adapter("dora", dora_dir)
  assert "dora" not in engine.store
  info = engine.load_adapter("ad7", dirs["ad7"])
  assert info["residency"] == "host" and info["rank"] == 16 and info["state"] == "serving"
  with pytest.raises(ValueError, match="already registered"):
    engine.load_adapter("ad7", dirs["ad8"])
  prompts = _prompts(4, 2)
  running = engine.submit(Request(prompt=prompts[0], adapter="ad7", max_tokens=NEW,
                                  eos_token_id=[]))
  engine.step()
  assert engine.adapter_info("ad7")["residency"] == "device"
  assert engine.lora_state() == {"running": ["ad7"], "waiting": [], "max_lora": 64}
  queued = engine.submit(Request(prompt=prompts[1], adapter="ad7", max_tokens=NEW,
                                 eos_token_id=[]))
  engine.unload_adapter("ad7")
  assert engine.adapter_info("ad7")["state"] == "unloading"
  with pytest.raises(ValueError, match="being unloaded"):
    engine.submit(Request(prompt=prompts[1], adapter="ad7"))
  with pytest.raises(ValueError, match="still being unloaded"):
    engine.load_adapter("ad7", dirs["ad7"])
  engine.submit(Request(prompt=prompts[1], max_tokens=1))
  with pytest.raises(engine_lib.Overloaded, match="max_queue"):
    engine.submit(Request(prompt=prompts[1], max_tokens=1))  # 2 waiting
  assert engine.close()
  _check([running.result(), queued.result()], _peft_generate(multi, prompts, ["ad7", "ad7"]))
  assert "ad7" not in engine.store and engine.pool.stats()["resident_adapters"] == 0
  with pytest.raises(engine_lib.Overloaded, match="shutting down"):
    engine.submit(Request(prompt=prompts[1]))


def test_logprobs_are_the_models_log_softmax(world):
  """Each token's logprob and its 5 best alternatives equal transformers' log-softmax of the
  logits at that position (teacher-forced on the generated tokens)."""
  model, hf, _, _, _ = world
  prompt = _prompts(5, 1)[0]
  engine = Engine(model, num_pages=2000)
  handle = engine.submit(Request(prompt=prompt, max_tokens=4, eos_token_id=[]))
  while not handle.done():
    engine.step()
  events, done = list(handle), handle.result()
  with torch.no_grad():
    logits = hf(torch.tensor([prompt + done.tokens])).logits[0].float()
  ref = torch.log_softmax(logits, -1)[len(prompt) - 1:-1].numpy()
  np.testing.assert_allclose(done.logprobs, ref[np.arange(4), done.tokens], atol=1e-4)
  assert [e.logprob for e in events] == done.logprobs
  for row, top in zip(ref, done.top_logprobs):
    want = np.argsort(-row)[:5]
    assert [t for t, _ in top] == list(want)
    np.testing.assert_allclose([lp for _, lp in top], row[want], atol=1e-4)


def test_a_request_whose_adapter_is_on_disk_lets_later_ones_in(world):
  """While others run, a request whose adapter is still on disk is passed over (the prefetch
  thread reads it; here there is none, so it is read once nothing else runs) and the requests
  behind it are admitted; every output still equals PEFT's."""
  model, _, multi, dirs, _ = world
  engine = Engine(model, adapters={"ad9": dirs["ad9"]}, num_pages=2000, prefetch=False)
  prompts = _prompts(6, 3)
  first = engine.submit(Request(prompt=prompts[0], max_tokens=NEW, eos_token_id=[]))
  engine.step()
  on_disk = engine.submit(Request(prompt=prompts[1], adapter="ad9", max_tokens=NEW,
                                  eos_token_id=[]))
  behind = engine.submit(Request(prompt=prompts[2], max_tokens=NEW, eos_token_id=[]))
  engine.step()
  assert [s.handle for s in engine.running] == [first, behind]
  assert [s.handle for s in engine.waiting] == [on_disk]
  while engine.has_work():
    engine.step()
  st = engine.stats()
  assert st["admission_deferrals"] >= 1 and st["admissions_waited"] == 1
  _check([h.result() for h in (first, on_disk, behind)],
         _peft_generate(multi, prompts, ["__base__", "ad9", "__base__"]))
