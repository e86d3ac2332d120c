"""A bounded load test of `jaxadapt serve` on loopback: many streaming clients over many adapters.

Run:  python -m bench.serve_load [--clients 200] [--adapters 100] [--seconds 60] [--pool-mb 64]
                                 [--reserve worst|none] [--warmup 40]   (~3 min on 2 CPU cores)

The server runs as its own process (`jaxadapt serve` on the embedded default, 127.0.0.1, a free
port) with `--adapters` names registered with `--adapter NAME=DIR`, cycling over the default's 8
task adapters (each name is its own adapter to the engine: its own pages and slot). Each of
`--clients` threads streams completions through the `openai` client, one after another for
`--seconds`: a random adapter, `default.prompt(task, input)` with a random input of the task's
kind, greedy, up to 24 tokens. The same load runs `--warmup` seconds first, unmeasured (the
engine compiles its step programs for the batch shapes it meets). A request is lost when its
stream raises or ends without a finish_reason. Printed: requests, lost, requests/s, tokens/s,
p50/p99 latency and time to first token, the share of answers equal to the task's oracle, and
the server's preemptions and adapter loads (/metrics; counted over both phases).
The last line is `RESULT ok|LOST rps=<x> p50=<s> p99=<s> lost=<n> preemptions=<n>`.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import random
import socket
import subprocess
import sys
import threading
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORDS = ("jaxadapt", "serving", "lora", "adapter", "paged", "kernel", "tensor", "batch")
INPUTS = {"max": ("38251", "9042", "1776", "5083"),  # the tasks whose inputs are not words
          "dedupe": ("cat dog cat", "red blue red green", "a b a", "one two one")}


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _metric(text: str, name: str) -> float:
  from prometheus_client.parser import text_string_to_metric_families
  for family in text_string_to_metric_families(text):
    for sample in family.samples:
      if sample.name == name:
        return sample.value
  return float("nan")


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--clients", type=int, default=200)
  p.add_argument("--adapters", type=int, default=100)
  p.add_argument("--seconds", type=float, default=60)
  p.add_argument("--pool-mb", type=float, default=64)
  p.add_argument("--reserve", default="worst", choices=("worst", "none"))
  p.add_argument("--max-seqs", type=int, default=32)
  p.add_argument("--warmup", type=float, default=40, help="seconds of unmeasured load first")
  args = p.parse_args(argv)
  import httpx
  import openai
  from jaxadapt import default
  names = {f"{default.TASKS[i % 8]}-{i}": default.adapter_dir(default.TASKS[i % 8])
           for i in range(args.adapters)}
  port = _free_port()
  cmd = [sys.executable, "-m", "jaxadapt.cli", "serve", "--port", str(port), "--pool-mb",
         str(args.pool_mb), "--reserve", args.reserve, "--max-seqs", str(args.max_seqs),
         "--log-level", "warning"]
  for name, path in names.items():
    cmd += ["--adapter", f"{name}={path}"]
  server = subprocess.Popen(cmd, env={**os.environ, "PYTHONPATH": REPO})
  url = f"http://127.0.0.1:{port}"
  try:
    deadline = time.monotonic() + 300
    while True:
      with contextlib.suppress(httpx.TransportError):  # not listening yet
        if httpx.get(url + "/health", timeout=5).status_code == 200:
          break
      if server.poll() is not None or time.monotonic() > deadline:
        print("the server did not start", file=sys.stderr)
        return 1
      time.sleep(0.5)
    client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=300,
                           http_client=httpx.Client(limits=httpx.Limits(
                               max_connections=args.clients + 8)))
    results, lost, lock = [], [], threading.Lock()
    stop_at = 0.0

    def run(seed):
      rng = random.Random(seed)
      while time.monotonic() < stop_at:
        name = rng.choice(list(names))
        task = name.rsplit("-", 1)[0]
        word = rng.choice(INPUTS.get(task, WORDS))
        start, first, text, reason, tokens = time.monotonic(), None, "", None, 0
        try:
          for chunk in client.completions.create(model=name, prompt=default.prompt(task, word),
                                                 max_tokens=24, temperature=0, stream=True,
                                                 stream_options={"include_usage": True}):
            if chunk.usage is not None:
              tokens = chunk.usage.completion_tokens
            for c in chunk.choices:
              first = first or time.monotonic()
              text += c.text
              reason = c.finish_reason or reason
        except Exception as e:  # noqa: BLE001 -- counted as lost, with its reason
          with lock:
            lost.append(repr(e)[:200])
          continue
        with lock:
          if reason is None:
            lost.append("no finish_reason")
          else:
            results.append((time.monotonic() - start, (first or start) - start, tokens,
                            text == f"[{task}] {default.answer(task, word)}"))

    for phase, seconds in (("warm-up", args.warmup), ("measured", args.seconds)):
      results.clear()
      lost.clear()
      began = time.monotonic()
      stop_at = began + seconds
      threads = [threading.Thread(target=run, args=(i,)) for i in range(args.clients)]
      for t in threads:
        t.start()
      for t in threads:
        t.join()
      wall = time.monotonic() - began
      print(f"{phase}: {len(results)} requests in {wall:.0f} s", flush=True)
    metrics = httpx.get(url + "/metrics", timeout=60).text
  finally:
    server.terminate()
    code = server.wait(120)
  lat = np.array([r[0] for r in results])
  ttft = np.array([r[1] for r in results])
  tokens = sum(r[2] for r in results)
  pre = _metric(metrics, "vllm:num_preemptions_total")
  loads = _metric(metrics, "jaxadapt_engine_adapter_loads_total")
  print(f"{args.clients} clients, {args.adapters} adapters, {wall:.0f} s, pool {args.pool_mb} MB, "
        f"reserve={args.reserve}")
  print(f"requests {len(results)}  lost {len(lost)}  requests/s {len(results) / wall:.2f}  "
        f"tokens/s {tokens / wall:.1f}")
  print(f"latency p50 {np.percentile(lat, 50):.2f} s  p99 {np.percentile(lat, 99):.2f} s  |  "
        f"first token p50 {np.percentile(ttft, 50):.2f} s  p99 {np.percentile(ttft, 99):.2f} s")
  print(f"answers equal to the oracle {np.mean([r[3] for r in results]):.3f}  |  preemptions "
        f"{pre:.0f}  adapter loads {loads:.0f}  |  server exit code {code}")
  for reason in sorted(set(lost))[:5]:
    print("lost:", reason)
  ok = not lost and code == 0
  print(f"RESULT {'ok' if ok else 'LOST'} rps={len(results) / wall:.2f} "
        f"p50={np.percentile(lat, 50):.2f} p99={np.percentile(lat, 99):.2f} lost={len(lost)} "
        f"preemptions={pre:.0f}")
  return 0 if ok else 1


if __name__ == "__main__":
  sys.exit(main())
