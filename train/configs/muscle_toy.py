"""The MUSCLE reproduction (docs/muscle.md): the embedded default -> its successor.

Command (no downloads):
  python -m train.muscle --config train/configs/muscle_toy.py

v1 = the embedded default (4 layers), v2 = "default-v2" (6 layers, trained longer from another
seed; train/configs/default_model_v2.py). For 3 seeds and the two default tasks with the longest
answers that small adapters do not solve outright (dedupe: 2-4 words; sort: 3-8 letters): task
LoRAs (r=4 on every decoder linear layer) on each base, trained until the loss flattens
(dedupe 400 steps, sort 1000: measured, docs/muscle.md gives the last-window change), then 150
extra steps from LoRA2 of M^C (MUSCLE Eq. 1), KD-to-v1 and CE-continued; greedy answers on
1024 held-out prompts per task. Takes about 25 min on 2 CPU cores (measured: docs/muscle.md).

Expect (the issue's target, reported whether met or not): M^C's NFR below Mv2's and
CE-continued's by more than two standard errors, at accuracy >= Mv2's, and accuracy above
KD-to-v1's.
"""
from train.muscle import MuscleConfig


def get_config() -> MuscleConfig:
  return MuscleConfig(
      old_model="default", new_model="default-v2", tasks=("dedupe", "sort"), seeds=(0, 1, 2),
      out_dir="runs/muscle_toy", report="docs/muscle.md", lora_r=4, lora_alpha=8.0,
      lora_steps=400, lora_task_steps=("sort=1000",), lora_lr=5e-3, lora_warmup=20,
      batch_size=16, seq_len=64, compat_steps=150, compat_lr=2e-3, compat_warmup=10,
      temperature=2.0, ce_weight=0.0, eval_examples=1024)
