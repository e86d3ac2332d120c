"""The FaceChain-FACT reproduction (issue #15) on synthetic 16x16 faces, every stage on CPU.

Command:
  python -m train.fact --config fact_toy --report docs/fact.md

Stages (each skipped when its output exists in out_dir, so a rerun resumes): the base U-Net
(3 levels of 32/64/64 channels, attention at 8x8 and 4x4, 1.66M parameters, 2000 steps of 32
fresh photos of 48 base identities), the face encoder (a 2-block TransFace-style ViT, 300
steps), the judges (300 steps), five FACT adapters (600 steps of 32 on 24 photos of each of 16
train identities): plain, +FAIR, +shuffle, +both, +both with the curriculum; then the
evaluation (4 condition photos per identity, 16 train and 8 held-out identities) and the page.
See docs/fact.md for the measured time and numbers.
"""
from train.fact import FactToyConfig


def get_config() -> FactToyConfig:
  return FactToyConfig(out_dir="runs/fact_toy")
