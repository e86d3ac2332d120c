"""`make demo`: the main job on an embedded default (until the serving engine lands).

Builds a small Llama-family model on the spot, makes several LoRA adapters of different ranks,
runs one mixed batch in which every sequence uses its own adapter (or none), checks it against
running each sequence alone, merges one adapter and checks merged == unmerged, and prints timings.
"""
from __future__ import annotations

import argparse
import time

import jax
import numpy as np

import jaxadapt as ja
from jaxadapt.adapters.lora import LoraAdapter
from jaxadapt.models.llama import LlamaConfig

TOLERANCE = 1e-4  # max |difference| of logits (float32) for both checks; measured ~2e-6


def _timed(fn, repeats=7):
  """(result, fastest of `repeats` timed calls in s): the minimum is the least noisy on a
  shared machine."""
  out = jax.block_until_ready(fn())  # compile
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    out = jax.block_until_ready(fn())
    best = min(best, time.perf_counter() - start)
  return out, best


def main(argv=None) -> None:
  p = argparse.ArgumentParser(prog="jaxadapt demo", description=__doc__)
  p.add_argument("--adapters", type=int, default=8, help="number of LoRA adapters (>= 2)")
  p.add_argument("--batch", type=int, default=16, help="sequences in the mixed batch (>= 1)")
  p.add_argument("--seq", type=int, default=64, help="tokens per sequence (>= 1)")
  args = p.parse_args(argv)
  for name, least in (("adapters", 2), ("batch", 1), ("seq", 1)):  # adapter 1 is merged
    if getattr(args, name) < least:
      p.error(f"--{name} must be >= {least}, got {getattr(args, name)}")

  config = LlamaConfig(vocab_size=2048, hidden_size=256, intermediate_size=688,
                       num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4,
                       head_dim=32)
  model = ja.CausalLM.random(config, seed=0)
  print(f"model: Llama-style, 4 layers, d=256, GQA 8/4 heads, "
        f"{sum(x.size for x in jax.tree.leaves(model.params)) / 1e6:.1f}M params (random)")
  adapters = []
  for i in range(args.adapters):
    cfg = ja.LoraConfig(r=[4, 8, 16, 32][i % 4], lora_alpha=16, target_modules="all-linear",
                        use_dora=(i % 5 == 4))
    a = ja.init_lora(model, cfg, seed=i)
    key = jax.random.key(100 + i)
    weights = {}
    for path, w in a.weights.items():  # non-zero B, as after training
      key, sub = jax.random.split(key)
      weights[path] = dict(w, b=0.02 * jax.random.normal(sub, w["b"].shape))
    adapters.append(LoraAdapter(weights=weights, config=cfg))
  print(f"adapters: {len(adapters)} on all linear layers, ranks "
        f"{sorted({a.config.r for a in adapters})}, "
        f"{sum(a.config.use_dora for a in adapters)} with DoRA")

  rng = np.random.default_rng(0)
  ids = rng.integers(0, config.vocab_size, (args.batch, args.seq))
  which = [(i % (len(adapters) + 1)) - 1 for i in range(args.batch)]  # includes -1 = base
  mixed, t_mixed = _timed(lambda: model(ids, adapters=adapters, adapter_ids=which))
  _, t_base = _timed(lambda: model(ids))

  def loop():
    return [model(ids[i:i + 1], adapter=None if a < 0 else adapters[a])
            for i, a in enumerate(which)]
  alone, t_loop = _timed(loop, repeats=2)
  err = max(float(np.abs(np.asarray(mixed[i]) - np.asarray(alone[i][0])).max())
            for i in range(args.batch))
  print(f"mixed batch: {args.batch} sequences x {args.seq} tokens, adapter ids {which}")
  print(f"  base forward            {t_base * 1e3:8.1f} ms")
  print(f"  mixed-adapter forward   {t_mixed * 1e3:8.1f} ms  ({t_mixed / t_base:.2f}x base)")
  print(f"  one sequence at a time  {t_loop * 1e3:8.1f} ms  ({t_loop / t_mixed:.1f}x mixed)")
  print(f"  max |mixed - per-sequence| = {err:.2e}")

  start = time.perf_counter()
  merged = ja.merge(model, adapters[1])
  jax.block_until_ready(merged.params)
  t_merge = time.perf_counter() - start
  m_out, t_merged = _timed(lambda: merged(ids))
  u_out, t_unmerged = _timed(lambda: model(ids, adapter=adapters[1]))
  merge_err = float(np.abs(np.asarray(m_out) - np.asarray(u_out)).max())
  print(f"merge of adapter 1 (r={adapters[1].config.r}): {t_merge * 1e3:.1f} ms; forward merged "
        f"{t_merged * 1e3:.1f} ms vs unmerged {t_unmerged * 1e3:.1f} ms; max |merged - unmerged| "
        f"= {merge_err:.2e}")
  ok = err < TOLERANCE and merge_err < TOLERANCE
  if not ok:
    print(f"mismatch: max |mixed - per-sequence| = {err:.2e}, max |merged - unmerged| = "
          f"{merge_err:.2e}; both must be < {TOLERANCE:g}")
  print("RESULT", "ok" if ok else "MISMATCH", f"mixed_vs_base={t_mixed / t_base:.2f}",
        f"loop_vs_mixed={t_loop / t_mixed:.1f}")
  if not ok:
    raise SystemExit(1)


if __name__ == "__main__":
  main()
