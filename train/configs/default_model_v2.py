"""The embedded default's successor (`jaxadapt/default/v2/`, loaded as "default-v2"): the build.

Command (no downloads):
  python -m train.default_model --config default_model_v2

The same recipe as the default (train/configs/default_model.py) with the changes a model update
makes: 6 decoder layers instead of 4, 1500 pre-training steps instead of 1200, another seed (init
and data order). The same corpus, tokenizer, tasks and adapter recipe, so that the task
adapters of the two versions compare example by example (MUSCLE, docs/muscle.md). Writes
jaxadapt/default/v2/{model,adapters/<task>} and docs/default_model_v2.md. Takes about 40 min on
2 CPU cores (measured: docs/default_model_v2.md).

Expect: each task adapter >= 95% greedy exact match on its held-out set (as the default's).
"""
import os

from train.default_model import PACKAGE_DIR, REPO_DOCS, DefaultModelConfig


def get_config() -> DefaultModelConfig:
  return DefaultModelConfig(
      name="default-v2", out=os.path.join(PACKAGE_DIR, "v2"),
      report=os.path.join(os.path.dirname(REPO_DOCS), "default_model_v2.md"),
      num_hidden_layers=6, base_steps=1500, seed=1)
