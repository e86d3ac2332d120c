"""A tiny MUSCLE run: the whole pipeline in seconds (tests), not the result.

Command:
  python -m train.muscle --config muscle_tiny --out_dir /tmp/muscle_tiny

Takes about a minute on 2 CPU cores (mostly compiling): two seeds of one task, each stage a few
steps, 16 held-out prompts; the report goes to OUT_DIR/muscle.md.

Expect: every stage's PEFT adapter, results.json and the report; numbers near meaningless.
"""
from train.muscle import MuscleConfig


def get_config() -> MuscleConfig:
  return MuscleConfig(tasks=("sort",), seeds=(0, 1), out_dir="runs/muscle_tiny",
                      report="runs/muscle_tiny/muscle.md", lora_steps=4, lora_warmup=1,
                      compat_steps=3, compat_warmup=1, batch_size=4, eval_examples=16,
                      bootstrap_samples=20, progress=False)
