"""MeteoRA on the embedded default model and its 8 task LoRAs: the reproduction of docs/meteora.md.

Command (no downloads, no arguments needed):
  python -m train.meteora --config train/configs/meteora_default.py
  python -m train.meteora --eval --out_dir runs/meteora      # re-evaluate the finished run

Takes about 26 min on 2 CPU cores (measured 25 min 35 s at load average 4-5): gate training
(top-2, 8 adapters on all 28 linear layers), the union-LoRA baseline (rank 128), and the
evaluation (single tasks, composite-3/5, routing, speed). Writes runs/meteora/ (meteora/ loads with `jaxadapt.load_meteora`), the shipped gates
jaxadapt/default/meteora/ (`ja.load_meteora("default")`) and docs/meteora.md.

Expect: see docs/meteora.md for the measured table and which targets are met.
"""
from train.meteora import MeteoraConfig


def get_config() -> MeteoraConfig:
  return MeteoraConfig(export_default=True)
