"""The digits DiT base of the AGD reproduction (issue #13): pixel-space, class-conditional, CFG.

Command (no downloads; scikit-learn ships the data):
  python -m train.digits --config digits_dit            # writes runs/digits_dit/
  python -m train.digits --config digits_dit --out_dir /tmp/d --config.steps=500

Trains a 6-block, 64-wide DiT (patch 2: 16 tokens of 2x2 pixels; 0.6M parameters, every one
trained) on the 1442 training digits with DDPM's epsilon loss and 10% label dropout, then
trains the digits classifier (seconds) and samples 20 digits per class with 25 DDIM steps at
guidance w = 1, 3, 5.

Sizing is provisional (being measured); see the numbers below once final.
"""
from train.digits import DigitsDiTConfig


def get_config() -> DigitsDiTConfig:
  return DigitsDiTConfig(
      patch_size=2, num_layers=6, num_attention_heads=4, attention_head_dim=16, steps=2000,
      batch_size=128, learning_rate=1e-3, warmup_steps=100, label_dropout=0.1,
      checkpoint_every=500, log_every=50, out_dir="runs/digits_dit", eval_per_class=20,
      eval_steps=25, eval_guidance=(1.0, 3.0, 5.0))
