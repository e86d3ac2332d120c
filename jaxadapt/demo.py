"""`make demo`: the main job: `jaxadapt serve` on the embedded default with 1000 adapters.

The embedded default (`jaxadapt/default`: a byte-level Llama trained in this repo, and eight task
LoRAs in PEFT format) is served in this process by the OpenAI-compatible server (`serve/api.py`
over the S-LoRA engine, uvicorn on 127.0.0.1). Registered: the eight task adapters plus
generated ones up to `--adapters` in all (a few distinct random LoRAs written to a temp dir, the
names symlinks cycling over them, so each name is its own adapter to the engine: its own reads,
pool pages and slot, as S-LoRA's 1000 adapters). The unchanged `openai` client then sends an
S-LoRA-style trace (bench.serving's: popularity by `power(alpha)`, Gamma arrivals, uniform input
and output lengths; S-LoRA Sec. 7) at its arrival times, and in the middle of it, in the same
batches, live prompts to the task adapters (greedy) whose answers are checked against
`jaxadapt.default.answer`.

Printed: a table (requests/s, tokens/s, p50/p99 latency, adapters served, pool occupancy, the
adapter cache's hit rate, preemptions), every checked answer, and a PNG of throughput and latency
over the trace under `--out` (default `out/`). The last line is
`RESULT ok|MISMATCH rps=<requests/s> adapters=<registered> served=<distinct adapters used>
correct=<right answers>/<checked> tps=<tokens/s> p50=<s> p99=<s>`; the exit status is 1 unless
every checked answer is right. About two minutes on 2 CPU cores.
"""
from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import shutil
import tempfile
import time

import numpy as np

import jaxadapt as ja
from jaxadapt import default

# Two inputs per task, in the range the adapters were trained on (docs/default_model.md): the
# live prompts whose answers are checked.
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

DISTINCT = 8        # distinct generated adapter files (the other names are symlinks to them)
B_STD = 0.02        # the generated adapters' B entries: small, so their answers stay plausible
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")


@dataclasses.dataclass
class Done:
  """One finished request as the client saw it (seconds since the trace began)."""
  sent: float
  finished: float
  tokens: int
  adapter: str
  text: str = ""


def write_adapters(model, root: str, n: int, seed: int = 0) -> dict:
  """{name: dir} of `n` generated adapters for `model`: `DISTINCT` random PEFT LoRAs (rank 4
  or 8 on q/k/v/o, seeded) written under `root/files`, and `n` names under `root/names` that
  are symlinks cycling over them (S-LoRA's many adapters at the disk cost of a few)."""
  rng = np.random.default_rng(seed)
  files = []
  for i in range(min(DISTINCT, n)):
    r = (4, 8)[i % 2]
    config = ja.LoraConfig(r=r, lora_alpha=2.0 * r, target_modules=TARGETS)
    adapter = ja.init_lora(model, config, seed=seed + i)
    weights = {p: {**w, "b": (B_STD * rng.standard_normal(w["b"].shape)).astype(np.float32)}
               for p, w in adapter.weights.items()}
    path = os.path.join(root, "files", f"g{i}")
    ja.save_adapter(dataclasses.replace(adapter, weights=weights), path)
    files.append(path)
  names = os.path.join(root, "names")
  os.makedirs(names, exist_ok=True)
  out = {}
  for i in range(n):
    name = f"gen{i:04d}"
    os.symlink(files[i % len(files)], os.path.join(names, name))
    out[name] = os.path.join(names, name)
  return out


def trace_requests(names: list, n: int, seed: int, rate: float) -> list:
  """(arrival, adapter name, prompt, output length) of an S-LoRA trace over `names`
  (`bench.serving.trace`); each prompt is a task prompt of about the trace's input length."""
  from bench.serving import trace
  arrivals, which, ins, outs = trace(n, len(names), seed=seed, rate=rate)
  rng = np.random.default_rng(seed + 1)
  letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
  out = []
  for t, a, n_in, n_out in zip(arrivals, which, ins, outs):
    name = names[int(a)]
    task = name if name in default.TASKS else default.TASKS[int(a) % len(default.TASKS)]
    width = max(1, int(n_in) - len(task) - 5)  # bos, "[", "] " and the newline
    text = "".join(rng.choice(letters, width))
    out.append((float(t), name, default.prompt(task, text), int(n_out)))
  return out


async def run_trace(client, reqs: list, checked: list, check_at: float, max_tokens: int):
  """Sends `reqs` at their arrival times and the `checked` (adapter, prompt) pairs at
  `check_at`, all concurrently through the async `openai` client; returns the trace's `Done`s
  (in order) and the checked answers' texts."""
  from tqdm import tqdm
  bar = tqdm(total=len(reqs) + len(checked), unit="req", desc="trace", dynamic_ncols=True)
  start = time.perf_counter()

  async def send(at, adapter, prompt, n, greedy):
    await asyncio.sleep(max(0.0, at - (time.perf_counter() - start)))
    sent = time.perf_counter() - start
    extra = {} if greedy else {"extra_body": {"ignore_eos": True}}  # S-LoRA: exact lengths
    r = await client.completions.create(model=adapter, prompt=prompt, max_tokens=n,
                                        temperature=0.0, **extra)
    bar.update(1)
    return Done(sent, time.perf_counter() - start, r.usage.completion_tokens, adapter,
                r.choices[0].text)

  jobs = [send(t, a, p, n, False) for t, a, p, n in reqs]
  jobs += [send(check_at, a, p, max_tokens, True) for a, p in checked]
  done = await asyncio.gather(*jobs)
  bar.close()
  return done[:len(reqs)], [d.text for d in done[len(reqs):]]


def plot(done: list, path: str) -> None:
  """Saves throughput (tokens/s, requests/s finished per window) and latency (each request at
  its send time, and the window's p50) over the trace as a PNG (matplotlib, Agg)."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  end = max(d.finished for d in done)
  edges = np.linspace(0.0, end, max(8, min(40, len(done) // 4)) + 1)
  width = edges[1] - edges[0]
  fin = np.array([d.finished for d in done])
  toks = np.array([d.tokens for d in done])
  sent = np.array([d.sent for d in done])
  lat = fin - sent
  which = np.clip(np.digitize(fin, edges) - 1, 0, len(edges) - 2)
  tps = np.bincount(which, weights=toks, minlength=len(edges) - 1) / width
  rps = np.bincount(which, minlength=len(edges) - 1) / width
  mid = (edges[:-1] + edges[1:]) / 2
  fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
  top.plot(mid, tps, label="tokens/s")
  top.set_ylabel("tokens/s")
  twin = top.twinx()
  twin.plot(mid, rps, color="tab:orange", label="requests/s")
  twin.set_ylabel("requests/s")
  top.set_title(f"jaxadapt serve: {len(done)} requests over {len({d.adapter for d in done})} "
                f"adapters (embedded default)")
  bottom.scatter(sent, lat, s=6, alpha=0.5, label="request latency")
  by_sent = np.clip(np.digitize(sent, edges) - 1, 0, len(edges) - 2)
  p50 = [np.median(lat[by_sent == i]) if np.any(by_sent == i) else np.nan
         for i in range(len(mid))]
  bottom.plot(mid, p50, color="tab:red", label="p50 (by send time)")
  bottom.set_xlabel("seconds since the trace began")
  bottom.set_ylabel("latency (s)")
  bottom.legend(loc="upper left")
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.savefig(path, dpi=100)
  plt.close(fig)


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="jaxadapt demo", description=__doc__.split("\n")[0])
  p.add_argument("--requests", type=int, default=300, help="requests in the trace")
  p.add_argument("--adapters", type=int, default=1000,
                 help="adapters registered in all: the 8 task adapters plus generated ones")
  p.add_argument("--rate", type=float, default=5.0, help="the trace's mean arrivals per second")
  p.add_argument("--tasks", default=",".join(default.TASKS),
                 help="comma-separated task adapters that answer checked live prompts "
                      "(default: all eight)")
  p.add_argument("--max-tokens", type=int, default=40,
                 help="new tokens per checked prompt at most")
  p.add_argument("--out", default="out", help="directory of the PNG plot")
  p.add_argument("--seed", type=int, default=0, help="the trace's and the adapters' seed")
  return p


def main(argv=None) -> None:
  p = _parser()
  args = p.parse_args(argv)
  tasks = [t for t in args.tasks.split(",") if t]
  unknown = [t for t in tasks if t not in default.TASKS]
  if unknown or not tasks:
    p.error(f"--tasks must name some of {', '.join(default.TASKS)}; got {args.tasks!r}")
  if args.max_tokens < 1:
    p.error(f"--max-tokens must be >= 1, got {args.max_tokens}")
  if args.requests < 1:
    p.error(f"--requests must be >= 1, got {args.requests}")
  if args.adapters < len(default.TASKS):
    p.error(f"--adapters must be >= {len(default.TASKS)} (the task adapters), got "
            f"{args.adapters}")
  if not args.rate > 0:
    p.error(f"--rate must be > 0, got {args.rate}")

  import jax
  import openai
  from serve import api
  from serve.engine import Engine, Request

  model = ja.load_model("default")
  n_params = sum(x.size for x in jax.tree.leaves(model.params))
  print(f"model: the embedded default ({n_params / 1e6:.1f}M parameters, byte-level Llama, "
        f"GQA {model.config.num_attention_heads}/{model.config.num_key_value_heads} heads)")
  root = tempfile.mkdtemp(prefix="jaxadapt_demo_")
  try:
    adapters = {t: f"default:{t}" for t in default.TASKS}
    adapters.update(write_adapters(model, root, args.adapters - len(default.TASKS), args.seed))
    names = list(adapters)
    # Steps of at most 8 requests and 16 tokens, requests of at most 64 tokens (4 KV blocks):
    # few shape buckets, so a handful of step programs serve the whole trace.
    options = dict(adapters=adapters, pool_mb=64, max_seqs=8, max_step_tokens=16, max_rank=16,
                   max_adapters=64)
    reqs = trace_requests(names, args.requests, args.seed, args.rate)
    checked = [(t, x) for t in tasks for x in INPUTS[t]]

    # Compiles the step programs on a throwaway engine (they are shared), so the trace measures
    # serving, not XLA: a short trace of the same shape, run offline.
    start = time.perf_counter()
    warm = [Request(prompt=q, adapter=a, max_tokens=n, eos_token_id=[])
            for _, a, q, n in trace_requests(names, 48, args.seed + 7, args.rate)]
    throwaway = Engine(model, **options)
    for k in (1, 2, 3):  # a few requests at once: the steps with 1, 2 or 4 prefill rows
      throwaway.generate(warm[:k])
    throwaway.generate(warm + [Request(prompt=default.prompt(t, x), adapter=t,
                                       max_tokens=args.max_tokens) for t, x in checked])
    print(f"compiled {Engine.compiled_programs()} step programs in "
          f"{time.perf_counter() - start:.1f} s; serving {len(adapters)} adapters "
          f"({len(default.TASKS)} task adapters + {len(adapters) - len(default.TASKS)} generated "
          f"from {min(DISTINCT, len(adapters) - len(default.TASKS))} files)")

    compiled = Engine.compiled_programs()
    engine = Engine(model, **options)  # fresh: every adapter on disk, an empty pool
    server = api.BackgroundServer(api.make_app(engine, model_name="default"))
    try:
      client = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0,
                                  timeout=600)
      listed = len(openai.OpenAI(base_url=server.url + "/v1", api_key="none").models.list().data)
      print(f"server: {server.url}/v1 lists {listed} models (the base + {listed - 1} adapters); "
            f"trace: {len(reqs)} requests over {reqs[-1][0]:.1f} s, {len(checked)} checked "
            f"prompts at {reqs[len(reqs) // 2][0]:.1f} s")
      start = time.perf_counter()
      done, answers = asyncio.run(run_trace(
          client, reqs, [(t, default.prompt(t, x)) for t, x in checked],
          reqs[len(reqs) // 2][0], args.max_tokens))
      wall = time.perf_counter() - start
      st = engine.stats()
      late = Engine.compiled_programs() - compiled
    finally:
      server.stop()
  finally:
    shutil.rmtree(root, ignore_errors=True)

  lat = np.array([d.finished - d.sent for d in done])
  tokens = sum(d.tokens for d in done)
  served = len({d.adapter for d in done})
  hits, loads = st.get("adapter_hits", 0), st.get("adapter_loads", 0)
  store = st["store"]
  host_hits = store["hits"] / max(store["hits"] + store["loads"], 1)
  rows = [
      ("requests", f"{len(done)} (+ {len(checked)} checked)"),
      ("requests/s", f"{len(done) / wall:.2f}"),
      ("tokens/s (generated)", f"{tokens / wall:.1f}"),
      ("latency p50 / p99", f"{np.percentile(lat, 50):.2f} s / {np.percentile(lat, 99):.2f} s"),
      ("adapters served", f"{served} of {store['registered']} registered"),
      ("pool occupancy (peak)", f"{st['pool']['peak_occupancy']:.2f} of {st['pool']['pages']} "
                                f"pages"),
      ("adapter cache hit rate", f"{hits / max(hits + loads, 1):.2f} in the pool ({loads} "
                                 f"loads), {host_hits:.2f} in host memory"),
      ("preemptions", f"{st.get('preemptions', 0)}"),
      ("engine steps", f"{st.get('steps', 0)} ({late} step programs compiled during the "
                       f"trace)"),
  ]
  print(f"\n{'':24s}{'trace of ' + str(len(done)) + ' requests in ' + format(wall, '.1f') + ' s'}")
  for key, value in rows:
    print(f"  {key:24s}{value}")

  correct = 0
  print(f"\n{'adapter':9s} {'prompt':26s} {'answer':28s} right?")
  for (t, x), got in zip(checked, answers):
    want = f"[{t}] {default.answer(t, x)}"
    correct += got == want
    print(f"{t:9s} {default.prompt(t, x).strip():26s} {got!r:28s} "
          f"{'yes' if got == want else 'NO (' + repr(want) + ')'}")

  path = os.path.join(args.out, "demo_serving.png")
  plot(done, path)
  print(f"\nplot: {path}")
  ok = correct == len(checked)
  print("RESULT", "ok" if ok else "MISMATCH", f"rps={len(done) / wall:.2f}",
        f"adapters={store['registered']}", f"served={served}",
        f"correct={correct}/{len(checked)}", f"tps={tokens / wall:.1f}",
        f"p50={np.percentile(lat, 50):.2f}", f"p99={np.percentile(lat, 99):.2f}",
        f"requests={len(done)}")
  if not ok:
    raise SystemExit(1)


if __name__ == "__main__":
  main()
