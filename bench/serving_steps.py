"""Where the S-LoRA engine's time goes, per part of a step, with 0 / 1 / 100 / 1000 adapters.

Run:  python -m bench.serving_steps [--quick]      (~5 min on 2 CPU cores)

The model, adapters and trace of `bench.serving` (64 requests, rank-8 LoRAs on q/k/v/o, 100
distinct adapter files behind up to 1000 names). Each engine runs the trace once to compile and
once measured, like `bench.serving`; during the measured run the scheduler's admission (which
reads adapters the prefetch thread has not read yet and copies them into the pool), the store's
reads (on any thread: the prefetch thread's too), the pool's copies and the step's forward (to
the pool update, blocked on) are timed.
Printed per setting: tokens/s, steps, the share of admissions that waited for a disk read, seconds
in each part, and the batch per step (sequences, tokens, distinct adapter slots). The last line
is `RESULT a1_vs_base=<x> a1000_vs_base=<y> admit_share_a1000=<z>`.
"""
from __future__ import annotations

import argparse
import collections
import functools
import os
import time

import numpy as np


def _timed(cls, name: str, key: str, seconds: dict, calls: collections.Counter):
  """Wraps `cls.name` so that its wall time accumulates in seconds[key]."""
  f = getattr(cls, name)

  @functools.wraps(f)
  def g(self, *args, **kwargs):
    t0 = time.perf_counter()
    try:
      return f(self, *args, **kwargs)
    finally:
      seconds[key] += time.perf_counter() - t0
      calls[key] += 1
  setattr(cls, name, g)


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(prog="python -m bench.serving_steps")
  parser.add_argument("--requests", type=int, default=64)
  parser.add_argument("--quick", action="store_true", help="a tiny run (checks the script)")
  args = parser.parse_args(argv)
  import jax
  from bench.serving import CONFIG, setup, trace
  from serve import engine as engine_lib
  from serve import pool as pool_lib
  from serve import scheduler as scheduler_lib
  from serve import store as store_lib

  config, counts = dict(CONFIG), [0, 1, 100, 1000]
  if args.quick:
    config.update(hidden_size=64, intermediate_size=128, num_hidden_layers=2, vocab_size=512,
                  num_attention_heads=4, num_key_value_heads=2)
    counts, args.requests = [0, 1, 10, 20], min(args.requests, 12)
  _, model, names_dir = setup(config, max(counts))
  rng = np.random.default_rng(1)
  _, _, ins, outs = trace(args.requests, 1)
  prompts = [[int(t) for t in rng.integers(1, config["vocab_size"], n)] for n in ins]

  seconds: dict = collections.defaultdict(float)
  calls: collections.Counter = collections.Counter()
  _timed(scheduler_lib.Scheduler, "admit", "admit", seconds, calls)
  _timed(store_lib.AdapterStore, "get", "store reads", seconds, calls)
  _timed(pool_lib.PagedPool, "load", "pool copies", seconds, calls)
  batches = []
  run = engine_lib.Engine._run

  def measured_run(self, plan):
    batches.append((len(plan), sum(n for _, n in plan), len({s.slot for s, _ in plan})))
    t0 = time.perf_counter()
    out = run(self, plan)
    jax.block_until_ready(self.pool.pages)
    seconds["forward"] += time.perf_counter() - t0
    return out
  engine_lib.Engine._run = measured_run

  def engine_run(n):
    _, ids, _, _ = trace(args.requests, max(n, 1), seed=2)
    adapters = (None if n == 0 else
                {f"a{i}": os.path.join(names_dir, f"a{i}") for i in range(n)})
    requests = [engine_lib.Request(prompt=p, adapter=None if n == 0 else f"a{ids[i]}",
                                   max_tokens=int(o), eos_token_id=[])
                for i, (p, o) in enumerate(zip(prompts, outs))]
    make = lambda: engine_lib.Engine(model, adapters=adapters, max_seqs=32,  # noqa: E731
                                     max_step_tokens=512, max_adapters=64, max_rank=8,
                                     pool_mb=256)
    make().generate(requests)  # compiles; reads the adapters once
    engine = make()
    seconds.clear(), calls.clear(), batches.clear()
    start = time.perf_counter()
    done = engine.generate(requests)
    wall = time.perf_counter() - start
    st = engine.stats()
    b = np.asarray(batches, np.float64)
    return dict(tps=sum(len(c.tokens) for c in done) / wall, wall=wall, steps=st["steps"],
                waited=st["admission_wait_share"], parts=dict(seconds), calls=dict(calls),
                batch=b.mean(axis=0))

  results = {n: engine_run(n) for n in counts}
  print(f"{'adapters':>8s} {'tok/s':>7s} {'wall s':>7s} {'steps':>5s} {'waited':>6s}  "
        f"{'seconds in: forward / admit (store reads, pool copies)':54s} {'seqs/toks/slots':>16s}")
  for n, r in results.items():
    p = r["parts"]
    print(f"{n:8d} {r['tps']:7.1f} {r['wall']:7.2f} {r['steps']:5d} {r['waited']:6.2f}  "
          f"{p.get('forward', 0):6.2f} / {p.get('admit', 0):5.2f} ({p.get('store reads', 0):.2f}, "
          f"{p.get('pool copies', 0):.2f}){'':25s} "
          f"{r['batch'][0]:5.1f}/{r['batch'][1]:5.1f}/{r['batch'][2]:4.1f}")
  big = results[counts[-1]]
  print(f"RESULT a1_vs_base={results[1]['tps'] / results[0]['tps']:.2f} "
        f"a1000_vs_base={big['tps'] / results[0]['tps']:.2f} "
        f"admit_share_a1000={big['parts'].get('admit', 0) / big['wall']:.2f}")


if __name__ == "__main__":
  main()
