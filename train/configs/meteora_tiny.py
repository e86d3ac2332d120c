"""A seconds-long MeteoRA run on the embedded default (the pipeline only; the suite runs it).

Command:
  python -m train.meteora --config meteora_tiny --out_dir /tmp/meteora_tiny --report /tmp/m.md

Three tasks, a few gate and union-LoRA steps, 8 held-out prompts per task and 4 two-task
composites: the numbers mean nothing; every stage, file and table is produced.
"""
from train.meteora import MeteoraConfig


def get_config() -> MeteoraConfig:
  return MeteoraConfig(tasks=("reverse", "upper", "count"), steps=4, batch_size=4, seq_len=96,
                       union_steps=2, union_rank=8, eval_examples=8, composite_examples=4,
                       composite_sizes=(2,), speed_batch=2, checkpoint_every=2, log_every=2, out_dir="runs/meteora_tiny",
                       progress=False)
