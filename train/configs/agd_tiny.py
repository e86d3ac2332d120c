"""A seconds-long AGD run on a given tiny pipeline (the suite's; the numbers mean nothing).

Command:
  python -m train.agd --config agd_tiny --pipeline DIR --out_dir /tmp/agd_tiny --report /tmp/a.md

Every stage, file and table is produced: trajectories (train, held-out, forward-noised), one
adapter of each kind and the ablation for a few steps, the evaluation and the page.
"""
from train.agd import AGDTrainConfig


def get_config() -> AGDTrainConfig:
  return AGDTrainConfig(kinds=("offset", "cross_attention", "token"), default_kind="token",
                        hidden=8, heads=2, fourier_features=8, num_steps=3, num_trajectories=8,
                        shard_size=4, collect_batch=4, eval_guidance=(2.0, 8.0),
                        eval_trajectories=2, eval_samples=20, timing_repeats=1, steps=3,
                        batch_size=8, warmup_steps=1, checkpoint_every=2, log_every=1,
                        style_steps=2, out_dir="runs/agd_tiny", progress=False)
