"""The embedded default model (`jaxadapt/default/`): the shipped build.

Command (no downloads, no arguments needed):
  python -m train.default_model                  # same as --config default_model

Rewrites every file of jaxadapt/default/model and jaxadapt/default/adapters/<task>, and
docs/default_model.md. Takes about 29 min on 2 CPU cores shared with other work (measured 28 min
53 s: 8.5 min base pre-training, 20 min for the 8 adapters, 0.5 min export and greedy evaluation;
docs/default_model.md has the per-task table).

Expect: each task adapter >= 95% greedy exact match on its held-out set, the base alone <= 20% on
every task (measured: adapters 96.9-100%, base 0%); the shipped files 8.3 MB (float32).
"""
from train.default_model import DefaultModelConfig


def get_config() -> DefaultModelConfig:
  return DefaultModelConfig()
