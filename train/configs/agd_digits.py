"""The AGD reproduction on scikit-learn's digits (issue #13): anyone can run it on CPU.

Command (no downloads):
  python -m train.agd --config agd_digits            # writes runs/agd_digits/ and docs/agd.md

Stages: the digits DiT base (`train/configs/digits_dit.py`, pixel space, label dropout 10%);
CFG trajectories with DDIM, w ~ U[1, 6] (Algorithm 1); the three adapter kinds and the
forward-noised ablation of the default one, each trained on the trajectories with the base
frozen (Algorithm 2); the evaluation at w = 1.5, 3, 5 and 8 (outside the range): the held-out
gap recovered, FD and accuracy in the repo's digits classifier, RMSE to CFG, NFE and wall time.
Sizes were chosen to fit the issue's 30 minutes on 2 cores; the measured time and every number
are on docs/agd.md.
"""
from train.agd import AGDTrainConfig


def get_config() -> AGDTrainConfig:
  return AGDTrainConfig(
      pipeline="", base_config="digits_dit", out_dir="runs/agd_digits",
      kinds=("offset", "cross_attention", "token"), default_kind="token", ablation=True,
      hidden=16, heads=4, fourier_features=64, guidance_min=1.0, guidance_max=6.0,
      scheduler="ddim", num_steps=20, num_trajectories=1024, shard_size=128, collect_batch=256,
      eval_guidance=(1.5, 3.0, 5.0, 8.0), eval_trajectories=64, eval_samples=500,
      timing_repeats=3, steps=1500, batch_size=256, learning_rate=3e-3, warmup_steps=100,
      checkpoint_every=500, log_every=50)
