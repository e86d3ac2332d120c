"""The S-LoRA engine's throughput with many adapters, against transformers + PEFT, in one run.

Run:  python -m bench.serving [--requests 64] [--quick]     (~10 min on 2 CPU cores)

Workload (issue #10; S-LoRA Sec. 7's synthetic traces): the 34M-parameter Llama (hidden 512, 8
layers, 8 query / 4 key-value heads, MLP 1376, vocab 8192) made with transformers; rank-8 LoRA
adapters on q/k/v/o. The trace: request i uses adapter `int(power(alpha) * n)` (S-LoRA's
popularity draw, alpha = 1: uniform), input and output lengths uniform in [8, 32]; arrivals
Gamma(1/cv^2) with cv = 1 (their arrival times are printed, but every way runs the whole trace
as one offline batch, so throughput is each system's capacity). 100 distinct adapter files are
written; the n adapter names (up to 2000) are symlinks that cycle over them, so every name is
its own adapter to the engine (its own pages and slot) while the disk holds 100.

Ways, on the same weights and requests, greedy, every request producing exactly its output
length (no eos):
  * engine with base only (no adapter on any request), and with n = 1, 100, 1000, 2000 adapters
    registered (the trace's requests spread over them);
  * transformers + PEFT: one PeftModel holding the adapters the trace uses, static batches of
    `--peft_batch` requests (left-padded, mixed-adapter `generate(adapter_names=...)`), in order;
  * transformers' own continuous batching (`model.generate_batch`), base only.
Each engine run follows a warm-up run of the same trace (compiles); the torch ways run as they
are (no compile step). Printed: tokens/s of each way, the engine's p50/p99 time to first token
and per-token latency, pool occupancy, and the share of admissions that waited for a disk read.
The last line is `RESULT a1000_vs_base=<x> vs_peft=<y> base_vs_hf_cb=<z> registered=<n>`:
a1000_vs_base = engine tokens/s with 1000 adapters / with base only; vs_peft = engine with 1000
adapters / PEFT static batches (with the trace's adapters); base_vs_hf_cb = engine base only /
transformers' continuous batching. Targets (issue #10): >= 0.9, >= 8, >= 3, 2000.
"""
from __future__ import annotations

import argparse
import copy
import os
import tempfile
import time

import numpy as np

CONFIG = dict(vocab_size=8192, hidden_size=512, intermediate_size=1376, num_hidden_layers=8,
              num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=512,
              tie_word_embeddings=True)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


def trace(n_requests: int, n_adapters: int, seed: int = 0, alpha: float = 1.0,
          cv: float = 1.0, rate: float = 8.0, lengths=(8, 32)):
  """S-LoRA's synthetic trace: (arrival, adapter index, input length, output length) per
  request."""
  rng = np.random.default_rng(seed)
  adapters = np.minimum((rng.power(alpha, n_requests) * n_adapters).astype(int), n_adapters - 1)
  shape = 1.0 / (cv * cv)
  gaps = rng.gamma(shape, 1.0 / (shape * rate), n_requests)
  ins = rng.integers(lengths[0], lengths[1] + 1, n_requests)
  outs = rng.integers(lengths[0], lengths[1] + 1, n_requests)
  return np.cumsum(gaps), adapters, ins, outs


def _pct(values, q):
  return float(np.percentile(values, q)) if len(values) else float("nan")


def setup(config: dict, names: int):
  """The benchmark's world in a temp dir: a transformers Llama of `config` (seed 0), jaxadapt's
  load of it, and `names` adapter names (symlinks a0.. in the returned dir) over up to 100
  distinct rank-8 PEFT files on TARGETS. Returns (hf model, jaxadapt model, names dir)."""
  import torch
  import transformers as tf
  from peft import LoraConfig, get_peft_model
  import jaxadapt as ja
  torch.manual_seed(0)
  hf = tf.LlamaForCausalLM(tf.LlamaConfig(**config, initializer_range=0.05)).eval()
  root = tempfile.mkdtemp(prefix="bench_serving_")
  hf.save_pretrained(os.path.join(root, "base"))
  model = ja.load_model(os.path.join(root, "base"))
  distinct = min(100, names)
  for i in range(distinct):
    torch.manual_seed(100 + i)
    peft = get_peft_model(copy.deepcopy(hf), LoraConfig(r=8, lora_alpha=16,
                                                        target_modules=TARGETS,
                                                        init_lora_weights=False))
    peft.save_pretrained(os.path.join(root, "files", f"f{i}"))
  names_dir = os.path.join(root, "names")
  os.makedirs(names_dir)
  for i in range(names):
    os.symlink(os.path.join(root, "files", f"f{i % distinct}"), os.path.join(names_dir, f"a{i}"))
  return hf, model, names_dir


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(prog="python -m bench.serving")
  parser.add_argument("--requests", type=int, default=64)
  parser.add_argument("--peft_batch", type=int, default=16)
  parser.add_argument("--max_seqs", type=int, default=32)
  parser.add_argument("--quick", action="store_true", help="a tiny run (checks the script)")
  args = parser.parse_args(argv)
  import torch
  import transformers as tf
  from peft import PeftModel
  from serve.engine import Engine, Request

  config = dict(CONFIG)
  counts = [1, 100, 1000, 2000]
  if args.quick:
    config.update(hidden_size=64, intermediate_size=128, num_hidden_layers=2, vocab_size=512,
                  num_attention_heads=4, num_key_value_heads=2)
    counts = [1, 10, 20, 40]
    args.requests = min(args.requests, 12)
  torch.set_num_threads(os.cpu_count() or 1)
  hf, model, names_dir = setup(config, max(counts))

  rng = np.random.default_rng(1)
  arrivals, which, ins, outs = trace(args.requests, 1)
  prompts = [[int(t) for t in rng.integers(1, config["vocab_size"], n)] for n in ins]
  total_out = int(outs.sum())
  print(f"Llama {sum(p.numel() for p in hf.parameters()) / 1e6:.1f}M, {args.requests} requests, "
        f"inputs {ins.min()}-{ins.max()}, outputs {outs.min()}-{outs.max()} "
        f"({total_out} tokens), arrivals over {arrivals[-1]:.1f} s (run offline)")

  def run_engine(n):
    _, ids, _, _ = trace(args.requests, max(n, 1), seed=2)
    adapters = None if n == 0 else {f"a{i}": os.path.join(names_dir, f"a{i}") for i in range(n)}
    engine = Engine(model, adapters=adapters, max_seqs=args.max_seqs, max_step_tokens=512,
                    max_adapters=64, max_rank=8, pool_mb=256)
    reqs = [Request(prompt=p, adapter=None if n == 0 else f"a{ids[i]}", max_tokens=int(o),
                    eos_token_id=[]) for i, (p, o) in enumerate(zip(prompts, outs))]
    engine.generate(reqs)  # warm-up: compiles, reads the adapters
    engine = Engine(model, adapters=adapters, max_seqs=args.max_seqs, max_step_tokens=512,
                    max_adapters=64, max_rank=8, pool_mb=256)
    start = time.perf_counter()
    done = engine.generate(reqs)
    wall = time.perf_counter() - start
    st = engine.stats()
    ttft = [c.first_token for c in done]
    tpot = [(c.finished - c.first_token) / max(len(c.tokens) - 1, 1) for c in done]
    return dict(tps=sum(len(c.tokens) for c in done) / wall, wall=wall, ttft=ttft, tpot=tpot,
                occupancy=st["pool"]["peak_occupancy"], waited=st["admission_wait_share"],
                registered=st["store"]["registered"], ids=ids, done=done)

  results = {"base": run_engine(0)}
  for n in counts:
    results[n] = run_engine(n)

  # transformers + PEFT, static batches, the adapters of the 1000-adapter trace.
  ids = results[1000 if 1000 in results else counts[2]]["ids"]
  used = sorted(set(int(i) for i in ids))
  multi = PeftModel.from_pretrained(copy.deepcopy(hf), os.path.join(names_dir, f"a{used[0]}"),
                                    adapter_name=f"a{used[0]}").eval()
  for i in used[1:]:
    multi.load_adapter(os.path.join(names_dir, f"a{i}"), adapter_name=f"a{i}")

  def peft_batches():
    produced, equal = 0, 0
    start = time.perf_counter()
    for lo in range(0, args.requests, args.peft_batch):
      batch = list(range(lo, min(lo + args.peft_batch, args.requests)))
      width = max(len(prompts[i]) for i in batch)
      x = np.zeros((len(batch), width), np.int64)
      mask = np.zeros_like(x)
      for j, i in enumerate(batch):
        x[j, width - len(prompts[i]):], mask[j, width - len(prompts[i]):] = prompts[i], 1
      new = int(max(outs[i] for i in batch))
      with torch.no_grad():
        out = multi.generate(torch.tensor(x), attention_mask=torch.tensor(mask),
                             do_sample=False, max_new_tokens=new, min_new_tokens=new,
                             eos_token_id=None, pad_token_id=0,
                             adapter_names=[f"a{ids[i]}" for i in batch])
      for j, i in enumerate(batch):
        row = out[j, width:width + int(outs[i])].tolist()
        produced += int(outs[i])
        key = 1000 if 1000 in results else counts[2]
        equal += row == results[key]["done"][i].tokens
    return produced / (time.perf_counter() - start), equal

  peft_tps, equal = peft_batches()

  def hf_cb():
    gen_cfg = tf.GenerationConfig(do_sample=False, max_new_tokens=int(outs.max()),
                                  eos_token_id=None, pad_token_id=0)
    start = time.perf_counter()
    with torch.no_grad():
      out = hf.generate_batch(prompts, generation_config=gen_cfg, progress_bar=False)
    wall = time.perf_counter() - start
    return sum(len(o.generated_tokens) for o in out.values()) / wall

  try:
    cb_tps = hf_cb()
  except Exception as e:  # report, do not hide: the ratio is then missing
    print(f"transformers continuous batching failed: {type(e).__name__}: {e}")
    cb_tps = float("nan")

  print(f"{'way':28s} {'tok/s':>8s} {'ttft p50/p99 (s)':>18s} {'tpot p50/p99 (ms)':>19s} "
        f"{'peak occ':>8s} {'waited':>6s}")
  for key, r in results.items():
    label = "engine base only" if key == "base" else f"engine {key} adapters"
    print(f"{label:28s} {r['tps']:8.1f} {_pct(r['ttft'], 50):8.2f}/{_pct(r['ttft'], 99):<8.2f} "
          f"{1e3 * _pct(r['tpot'], 50):9.1f}/{1e3 * _pct(r['tpot'], 99):<8.1f} "
          f"{r['occupancy']:8.2f} {r['waited']:6.2f}")
  print(f"{'transformers+PEFT static':28s} {peft_tps:8.1f}   ({equal}/{args.requests} outputs "
        f"equal to the engine's)")
  print(f"{'transformers cont. batching':28s} {cb_tps:8.1f}")
  key = 1000 if 1000 in results else counts[2]
  print(f"RESULT a1000_vs_base={results[key]['tps'] / results['base']['tps']:.2f} "
        f"vs_peft={results[key]['tps'] / peft_tps:.2f} "
        f"base_vs_hf_cb={results['base']['tps'] / cb_tps:.2f} "
        f"registered={results[counts[-1]]['registered']}")


if __name__ == "__main__":
  main()
