"""The FaceChain-FACT reproduction (issue #15) on synthetic 16x16 faces, every stage on CPU.

Command:
  python -m train.fact --config fact_toy --report docs/fact.md

Stages (each skipped when its output exists in out_dir, so a rerun resumes): the base U-Net
(3 levels of 32/64/64 channels, attention at 8x8 and 4x4, 1.66M parameters, 1000 steps of 32
fresh photos of 48 base identities), the face encoder (a 2-block TransFace-style ViT, 300
steps), the judges (300 steps), five FACT adapters (500 steps of 16 on 24 photos of each of 16
train identities, AdamW at 3e-3): plain, +FAIR, +shuffle, +both, +both with the curriculum;
then the evaluation (4 condition photos per identity, 16 train and 8 held-out identities) and
the page. See docs/fact.md for the measured time and numbers.

Sized by measurement on 2 cores: a base step of 32 costs ~0.5 s and an adapter step of 32 ~0.6 s
(the adapter's gradient runs back through the whole U-Net), so five adapters of 500 steps of 32
would take 25 min alone; 16 per step halves that. Pilots on the same base: 300 steps of 32 at
3e-3 -> identity 14% on train identities (chance 4%); at 1e-2 -> 6%.
"""
from train.fact import FactToyConfig


def get_config() -> FactToyConfig:
  return FactToyConfig(out_dir="runs/fact_toy")
