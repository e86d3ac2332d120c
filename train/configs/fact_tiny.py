"""A seconds-long FACT run (the suite's; the numbers mean nothing).

Command:
  python -m train.fact --config fact_tiny --out_dir /tmp/fact_tiny --report /tmp/fact.md

Every stage, file and table is produced: the base U-Net, the face encoder, the judge, every
variant's adapter, the evaluation, the grid and the page.
"""
from train.fact import FactToyConfig


def get_config() -> FactToyConfig:
  return FactToyConfig(base_identities=8, per_identity=2, channels=(8, 16), heads=(2, 2),
                       text_dim=16, base_steps=3, base_batch=8, encoder_dim=16,
                       encoder_depth=1, encoder_heads=2, encoder_steps=2, num_tokens=2,
                       fact_steps=3, fact_batch=8, judge_steps=2, eval_per_identity=1,
                       eval_steps=2, checkpoint_every=2, log_every=1, progress=False,
                       out_dir="runs/fact_tiny")
