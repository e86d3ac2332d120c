"""S-LoRA tensor parallelism in the engine (Sec. 6) on 8 simulated CPU devices: outputs equal one
device and transformers + PEFT, and the step program holds the collectives the paper's strategy
has, per layer."""
import copy

import jax
import numpy as np
import pytest
import torch

import jaxadapt as ja
from serve import tp as tp_lib
from serve.engine import Engine, Request

NEW = 5
# Whole heads on each of 8 devices: 16 query heads, 8 KV heads (GQA), head_dim 4.
CONFIG = dict(hidden_size=64, intermediate_size=128, num_attention_heads=16,
              num_key_value_heads=8, head_dim=4, initializer_range=0.2)
TARGETS = [["q_proj", "v_proj"], ["o_proj", "down_proj"], "all-linear",
           ["k_proj", "gate_proj", "up_proj"]]
RANKS = [4, 8, 16, 64]


@pytest.fixture(scope="module")
def world(tmp_path_factory, hf_model_maker):
  from peft import LoraConfig, PeftModel, get_peft_model
  root = tmp_path_factory.mktemp("tp")
  hf = hf_model_maker("llama", str(root / "base"), seed=7, **CONFIG)
  dirs = {}
  for i, (r, targets) in enumerate(zip(RANKS, TARGETS)):
    torch.manual_seed(50 + i)
    peft = get_peft_model(copy.deepcopy(hf), LoraConfig(r=r, lora_alpha=2 * r,
                                                        target_modules=targets,
                                                        init_lora_weights=False))
    with torch.no_grad():
      for name, p in peft.named_parameters():
        if "lora_B" in name:
          p.mul_(20.0)
    dirs[f"ad{i}"] = str(root / f"ad{i}")
    peft.save_pretrained(dirs[f"ad{i}"])
  multi = PeftModel.from_pretrained(copy.deepcopy(hf), dirs["ad0"], adapter_name="ad0").eval()
  for name, d in list(dirs.items())[1:]:
    multi.load_adapter(d, adapter_name=name)
  return ja.load_model(str(root / "base")), multi, dirs


def _requests(n, seed=0):
  rng = np.random.default_rng(seed)
  names = [f"ad{i % 4}" if i % 5 != 4 else None for i in range(n)]
  prompts = [[int(t) for t in rng.integers(1, 97, int(rng.integers(3, 20)))] for _ in names]
  return names, prompts


def _peft(multi, prompts, names, new=NEW):
  width = max(map(len, prompts))
  ids = np.zeros((len(prompts), width), np.int64)
  mask = np.zeros_like(ids)
  for i, p in enumerate(prompts):
    ids[i, width - len(p):], mask[i, width - len(p):] = p, 1
  with torch.no_grad():
    out = multi.generate(torch.tensor(ids), attention_mask=torch.tensor(mask), do_sample=False,
                         max_new_tokens=new, min_new_tokens=new, pad_token_id=0,
                         eos_token_id=None, adapter_names=[n or "__base__" for n in names])
  return [list(map(int, r)) for r in out[:, width:].numpy()]


def test_eight_devices_equal_peft(world):
  """Mixed adapters (ranks 4-64, attention and MLP targets) and base rows sharing a system
  prompt, in a pool so small that requests are preempted, with prefix-cache hits, prefill
  chunks and decodes in one step: the same tokens as transformers + PEFT (which one device
  equals too: tests/serve/test_engine.py)."""
  model, multi, dirs = world
  names, prompts = _requests(8)
  system = list(range(40, 58))  # 18 tokens: one full block of 16 per request is shared
  prompts = [system + p[:8] for p in prompts]
  # 10 new tokens take a request past 32 tokens: a third block, after admission.
  requests = [Request(prompt=p, adapter=n, max_tokens=10, eos_token_id=[])
              for p, n in zip(prompts, names)]
  from serve.pool import PagedPool
  probe = Engine(model, adapters=dirs, num_pages=2, tensor_parallel=8, prefetch=False)
  adapter_pages = sum(probe.pool.adapter_pages_needed(ja.load_adapter(d)) for d in dirs.values())
  engine = Engine(model, adapters=dirs, num_pages=1 + adapter_pages + 14, max_seqs=4,
                  max_step_tokens=48, reserve="none", tensor_parallel=8)
  assert isinstance(engine.pool, PagedPool) and engine.pool.block == 16
  assert engine.pool.pages.sharding.spec == jax.sharding.PartitionSpec(None, "model")
  shard = engine.pool.pages.addressable_shards[0].data.shape
  assert shard == (engine.pool.num_pages, engine.pool.page_size // 8)
  q = engine.tp_plan.params["model"]["layers"][0]["self_attn"]["q_proj"]["kernel"]
  assert q.addressable_shards[0].data.shape == (64, 8)  # its 2 heads of 4
  out = engine.generate(requests)
  assert [c.tokens for c in out] == _peft(multi, prompts, names, new=10)
  st = engine.stats()
  assert st.get("preemptions", 0) > 0 and st.get("prefix_hit_tokens", 0) > 0, st


def test_collectives_per_layer_follow_s_lora(world):
  """Base: an all-reduce after o_proj and after down_proj. An adapter on q and v: one
  all-gather of [T, r] each; on o and down: one all-reduce of [T, r] each, the LoRA output
  joining the base's all-reduce."""
  model, _, dirs = world
  layers = model.config.num_hidden_layers
  counts = {}

  class Lowered(Exception):
    """Carries the lowered program's text out of the first step (nothing is compiled)."""

  def spy(*args):
    raise Lowered(real.lower(*args).as_text())
  real = tp_lib.forward
  for name in (None, "ad0", "ad1", "ad2"):
    engine = Engine(model, adapters=dirs, num_pages=200, tensor_parallel=8)
    tp_lib.forward = spy
    try:
      with pytest.raises(Lowered) as e:
        engine.generate([Request(prompt=[5, 6, 7], adapter=name, max_tokens=1)])
    finally:
      tp_lib.forward = real
    counts[name] = tp_lib.collectives(str(e.value))
  assert counts[None] == {"all_reduce": 2 * layers}
  assert counts["ad0"] == {"all_reduce": 2 * layers, "all_gather": 2 * layers}  # q, v
  assert counts["ad1"] == {"all_reduce": 4 * layers}                            # o, down
  assert counts["ad2"] == {"all_reduce": 4 * layers, "all_gather": 5 * layers}  # all linear


def test_a_model_that_does_not_divide_is_refused(world):
  model, _, _ = world
  with pytest.raises(ValueError, match=r"tensor_parallel=3 must divide num_attention_heads \(16\)"):
    Engine(model, num_pages=50, tensor_parallel=3)
