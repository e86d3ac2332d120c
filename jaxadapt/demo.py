"""`make demo`: the main job on the embedded default: S-LoRA serving of its task adapters.

The embedded default (`jaxadapt/default`: a byte-level Llama trained in this repo, and eight task
LoRAs in PEFT format) is served by the S-LoRA engine (`serve/`): every task adapter is
registered, and one stream of requests, each task's prompts under its own adapter plus the same
prompts on the base alone, runs in one continuous-batching loop over the unified pool (adapter
pages and KV pages in one device array). It prints each answer next to what the task defines,
then runs every request alone through `model.generate` and checks that the engine's tokens are
the same. It is ok when they are and every adapter answers right. The last line is
`RESULT ok|MISMATCH correct=<adapter answers right>/<n> base_correct=<base answers right>/<n>
engine_vs_alone=<time of one-at-a-time generate / the engine's, both compiled>`.
"""
from __future__ import annotations

import argparse
import time

import jaxadapt as ja
from jaxadapt import default

# Two inputs per task, in the range the adapters were trained on (docs/default_model.md).
INPUTS = {
    "reverse": ("hello", "planet"),
    "sort": ("banana", "zebra"),
    "upper": ("red fox", "big cup"),
    "rot13": ("hello", "secret"),
    "count": ("hello", "abcdefg"),
    "max": ("38251", "9041"),
    "dedupe": ("cat dog cat", "sun sun red"),
    "swapcase": ("HeLLo", "jAxAdApT"),
}


def main(argv=None) -> None:
  p = argparse.ArgumentParser(prog="jaxadapt demo", description=__doc__.split("\n")[0])
  p.add_argument("--tasks", default=",".join(default.TASKS),
                 help="comma-separated tasks to serve (default: all eight)")
  p.add_argument("--max-tokens", type=int, default=40, help="new tokens per request at most")
  args = p.parse_args(argv)
  tasks = [t for t in args.tasks.split(",") if t]
  unknown = [t for t in tasks if t not in default.TASKS]
  if unknown or not tasks:
    p.error(f"--tasks must name some of {', '.join(default.TASKS)}; got {args.tasks!r}")
  if args.max_tokens < 1:
    p.error(f"--max-tokens must be >= 1, got {args.max_tokens}")

  from serve.engine import Engine, Request
  model = ja.load_model("default")
  n_params = sum(x.size for x in __import__("jax").tree.leaves(model.params))
  print(f"model: the embedded default ({n_params / 1e6:.1f}M parameters, byte-level Llama, "
        f"GQA {model.config.num_attention_heads}/{model.config.num_key_value_heads} heads)")
  adapters = {t: default.adapter_dir(t) for t in tasks}
  rows = [(t, x) for t in tasks for x in INPUTS[t]]
  requests = [Request(prompt=default.prompt(t, x), adapter=t, max_tokens=args.max_tokens)
              for t, x in rows]
  requests += [Request(prompt=default.prompt(t, x), adapter=None, max_tokens=args.max_tokens)
               for t, x in rows]
  start = time.perf_counter()
  Engine(model, adapters=adapters, pool_mb=64).generate(requests)  # compiles the step programs
  t_compile = time.perf_counter() - start
  engine = Engine(model, adapters=adapters, pool_mb=64)  # fresh: adapters on disk, empty pool
  start = time.perf_counter()
  out = engine.generate(requests)
  t_engine = time.perf_counter() - start
  st = engine.stats()
  print(f"engine: {len(requests)} requests ({len(rows)} under {len(tasks)} task adapters, "
        f"{len(rows)} on the base) in {st['steps']} steps, {t_engine:.2f} s (a first run "
        f"compiled {engine.compiled_programs()} step programs in {t_compile:.1f} s); pool of "
        f"{st['pool']['pages']} pages, peak occupancy {st['pool']['peak_occupancy']:.2f}, "
        f"{st['adapter_loads']} adapters read from disk and loaded")

  def expected(task, text):
    return f"[{task}] {default.answer(task, text)}"

  correct = base_correct = 0
  print(f"{'adapter':9s} {'prompt':28s} {'answer':30s} right?   base alone")
  for i, (t, x) in enumerate(rows):
    want = expected(t, x)
    got, base = out[i].text, out[len(rows) + i].text
    correct += got == want
    base_correct += base == want
    print(f"{t:9s} {default.prompt(t, x).strip():28s} {got!r:30s} "
          f"{'yes' if got == want else 'NO (' + repr(want) + ')':8s} {base!r}")

  loaded = {t: ja.load_adapter(default.adapter_dir(t)) for t in tasks}

  def one_at_a_time():
    return [model.generate(r.prompt, max_new_tokens=r.max_tokens,
                           adapter=loaded.get(r.adapter)).ids[0] for r in requests]
  alone = one_at_a_time()  # compiles
  start = time.perf_counter()
  alone = one_at_a_time()
  t_alone = time.perf_counter() - start
  same = sum(a == c.tokens for a, c in zip(alone, out))
  print(f"the same requests one at a time through model.generate: {t_alone:.2f} s (compiled); "
        f"{same}/{len(requests)} token-for-token equal to the engine's")
  ok = same == len(requests) and correct == len(rows)
  print("RESULT", "ok" if ok else "MISMATCH", f"correct={correct}/{len(rows)}",
        f"base_correct={base_correct}/{len(rows)}", f"engine_vs_alone={t_alone / t_engine:.1f}")
  if not ok:
    raise SystemExit(1)


if __name__ == "__main__":
  main()
