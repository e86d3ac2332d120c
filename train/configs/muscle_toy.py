"""The MUSCLE reproduction (docs/muscle.md): the embedded default -> its successor.

Command (no downloads):
  python -m train.muscle --config train/configs/muscle_toy.py

v1 = the embedded default (4 layers), v2 = "default-v2" (6 layers, trained longer from another
seed; train/configs/default_model_v2.py). For 5 seeds: dedupe task LoRAs (r=4 on every decoder
linear layer; answers of 2-4 words, 12-20 tokens) on each base, trained to their plateau (400
steps: 150 more steps of plain cross-entropy, the CE-continued control, move accuracy by less
than a point), then 150 extra steps from LoRA2 of M^C (MUSCLE Eq. 1), KD-to-v1 and
CE-continued; greedy answers on 2048 held-out prompts. Measured: 16.2 min on 2 CPU cores
(docs/muscle.md).

Why dedupe alone: of the default's tasks it is the only one whose r=4 adapters stop short of
solving it (about 90%). Measured on seed 0 with 1024 prompts: sort needs 1000 steps to its
plateau and is then 98.7% (v1) / 99.1% (v2) right, 0.7% negative flips, and its 1000-step LoRAs
cost 3.5x dedupe's; reverse, rot13, count reach 98-100% in 300 steps (run
`--tasks dedupe,sort --lora_task_steps sort=1000` to include sort).

Expect (the issue's target, reported whether met or not): M^C's NFR below Mv2's and
CE-continued's by more than two standard errors, at accuracy >= Mv2's, and accuracy above
KD-to-v1's. Measured: NFR 2.39% against Mv2's 2.82% (-0.43 +- 0.15 points paired, met) and
CE-continued's 2.62% (-0.22 +- 0.16, not met), accuracy 90.21% vs Mv2 89.70% (met) and KD-to-v1
89.92% (+0.28 +- 0.26: in the mean only).
"""
from train.muscle import MuscleConfig


def get_config() -> MuscleConfig:
  return MuscleConfig(
      old_model="default", new_model="default-v2", tasks=("dedupe",), seeds=(0, 1, 2, 3, 4),
      out_dir="runs/muscle_toy", report="docs/muscle.md", lora_r=4, lora_alpha=8.0,
      lora_steps=400, lora_lr=5e-3, lora_warmup=20, batch_size=16, seq_len=64,
      compat_steps=150, compat_lr=2e-3, compat_warmup=10, temperature=2.0, ce_weight=0.0,
      eval_examples=2048,
      notes=(
          "One task, dedupe: of the default's tasks the only one whose r=4 adapters stop short "
          "of solving it at their plateau (about 90%). Measured on seed 0 (1024 held-out "
          "prompts, `--tasks dedupe,sort --lora_task_steps sort=1000 --seeds 0`): sort reaches "
          "its plateau at 1000 steps, 98.7% (Mv1) and 99.1% (Mv2) right with 0.7% negative "
          "flips, and every compatibility variant lost accuracy on it (M^C 98.4%, KD-to-v1 "
          "97.4%, CE-continued 97.6%); its LoRAs cost 3.5x dedupe's. reverse, rot13 and count "
          "reach 98-100% in 300 steps.",
          "v2 is not the better task model on single prompts: its shipped r=16 adapters match "
          "or trail the default's there (dedupe 94.9% vs 98.0%, reverse 98.4% vs 99.6%, sort "
          "97.3% vs 96.9%); it is better at composing tasks in 2-task prompts (6 of 8 tasks, "
          "e.g. upper 97.7% vs 63.3%; docs/default_model*.md), which this single-task "
          "reproduction does not use.",
          "Settings measured on the same task LoRAs (`--lora_dir runs/muscle_toy`, 5 seeds): "
          "compat_lr 5e-3 instead of 2e-3 makes every variant worse (M^C NFR 3.12 +- 0.28%, "
          "CE-continued 3.52 +- 0.22%, accuracy 89.36% / 89.19%: the second warmup + cosine "
          "cycle at a high rate undoes the plateau); T = 1 instead of 2 removes M^C's gain "
          "(NFR 2.80 +- 0.15%, Mv2's 2.82%): the softened v1 and v2 distributions carry it."))
