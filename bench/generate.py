"""Decode speed of `model.generate` against transformers' `generate`, on the same weights.

Run:  python -m bench.generate          (~3 min on 2 CPU cores)

Workload (issue #9): a 34M-parameter Llama (hidden 512, 8 layers, 8 query / 4 key-value heads,
MLP 1536, vocab 16384, tied embeddings) made with transformers and saved; batch 16 prompts of
32 random tokens; 64 new tokens, greedy, no eos (every row runs to the end). Timed: the whole
generate call (prefill + 63 decode steps), after one warm-up call each, median of 5, the three
ways alternated so that load on the machine hits them alike:
  * hf:   transformers `generate` (torch, float32, as many threads as cores);
  * base: jaxadapt `generate` (float32);
  * lora: jaxadapt `generate` with one unmerged LoRA (rank 8 on q/k/v/o, PEFT's default-style
    attention targets).
The greedy tokens of hf and base are checked equal first. Printed: tokens/s of each way; the
last line is `RESULT vs_hf=<hf time / base time> lora_vs_base=<lora time / base time>`.
Targets on CPU: vs_hf >= 3, lora_vs_base <= 1.15.
"""
from __future__ import annotations

import os
import tempfile
import time

import numpy as np

BATCH, PROMPT, NEW, REPEATS = 16, 32, 64, 5
CONFIG = dict(vocab_size=16384, hidden_size=512, intermediate_size=1536, num_hidden_layers=8,
              num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=512,
              tie_word_embeddings=True)


def main() -> None:
  import torch
  import transformers as tf
  import jaxadapt as ja

  torch.set_num_threads(os.cpu_count() or 1)
  torch.manual_seed(0)
  hf = tf.LlamaForCausalLM(tf.LlamaConfig(**CONFIG, initializer_range=0.05)).eval()
  params = sum(p.numel() for p in hf.parameters())
  directory = tempfile.mkdtemp(prefix="bench_generate_")
  hf.save_pretrained(directory)
  model = ja.load_model(directory)
  adapter = ja.init_lora(model, ja.LoraConfig(r=8, lora_alpha=16,
                                              target_modules=["q_proj", "k_proj", "v_proj",
                                                              "o_proj"]), seed=1)
  rng = np.random.default_rng(0)
  prompts = rng.integers(1, CONFIG["vocab_size"], (BATCH, PROMPT))
  ids = torch.tensor(prompts)

  def run_hf():
    with torch.no_grad():
      out = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                        max_new_tokens=NEW, min_new_tokens=NEW, eos_token_id=None,
                        pad_token_id=0)
    return out[:, PROMPT:].numpy().tolist()

  ways = {"hf": run_hf,
          "base": lambda: model.generate(prompts, max_new_tokens=NEW, eos_token_id=[]).ids,
          "lora": lambda: model.generate(prompts, max_new_tokens=NEW, eos_token_id=[],
                                         adapter=adapter).ids}
  first = {name: fn() for name, fn in ways.items()}  # warm-up (compiles)
  same = sum(a == b for a, b in zip(first["hf"], first["base"]))
  times = {name: [] for name in ways}
  for _ in range(REPEATS):
    for name, fn in ways.items():
      start = time.perf_counter()
      fn()
      times[name].append(time.perf_counter() - start)
  med = {k: float(np.median(v)) for k, v in times.items()}
  print(f"Llama {params / 1e6:.1f}M params, batch {BATCH}, prompt {PROMPT}, {NEW} new tokens; "
        f"greedy rows equal to transformers: {same}/{BATCH}")
  for k, v in med.items():
    print(f"  {k:5s} {v * 1e3:8.1f} ms   {BATCH * NEW / v:8.1f} tokens/s")
  print(f"RESULT vs_hf={med['hf'] / med['base']:.2f} lora_vs_base={med['lora'] / med['base']:.2f}")


if __name__ == "__main__":
  main()
