"""The embedded default model (`jaxadapt/default/`): the shipped build.

Command (no downloads, no arguments needed):
  python -m train.default_model                  # same as --config default_model

Rewrites every file of jaxadapt/default/model and jaxadapt/default/adapters/<task>, and
docs/default_model.md. Takes about TIME on 2 CPU cores (see docs/default_model.md for the last
measured time and the per-task table).

Expect: each task adapter >= 95% greedy exact match on its held-out set, the base alone <= 20% on
every task; the shipped files ~SIZE MB.
"""
from train.default_model import DefaultModelConfig


def get_config() -> DefaultModelConfig:
  return DefaultModelConfig()
