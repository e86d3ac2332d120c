"""A seconds-long digits DiT run (the pipeline only; the tests use it).

Command:
  python -m train.digits --config digits_tiny --out_dir /tmp/digits_tiny

A 2-block, 32-wide DiT (patch 2: 16 tokens), 6 steps of batch 16, no evaluation: the numbers mean
nothing; the checkpoints, metrics.jsonl and the pipeline folder are all produced, in ~10 s.
"""
from train.digits import DigitsDiTConfig


def get_config() -> DigitsDiTConfig:
  return DigitsDiTConfig(
      patch_size=2, num_layers=2, num_attention_heads=2, attention_head_dim=16, steps=6,
      batch_size=16, learning_rate=3e-3, warmup_steps=1, checkpoint_every=3, log_every=1,
      progress=False, eval_per_class=0, out_dir="runs/digits_tiny")
