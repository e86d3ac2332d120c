"""Backend dispatch for the LoRA ops.

`set_backend("xla" | "pallas_interpret" | "auto")` or the env var `JAXADAPT_KERNELS` forces a path.
Until the Pallas kernels land, every backend runs the jnp reference (the fastest XLA path on CPU).
"""
from __future__ import annotations

import os

from kernels_pallas import reference

_VALID = ("auto", "xla", "pallas_interpret", "pallas")
_backend = os.environ.get("JAXADAPT_KERNELS", "auto")


def set_backend(name: str) -> None:
  """Forces a kernel path for every later call (tests, benchmarks)."""
  global _backend
  if name not in _VALID:
    raise ValueError(f"kernels backend must be one of {_VALID}, got {name!r}")
  _backend = name


def get_backend() -> str:
  if _backend not in _VALID:
    raise ValueError(f"JAXADAPT_KERNELS must be one of {_VALID}, got {_backend!r}")
  return _backend


def lora_shrink(x, a_stack, ids):
  return reference.lora_shrink(x, a_stack, ids)


def lora_expand(y, h, b_stack, ids, scales):
  return reference.lora_expand(y, h, b_stack, ids, scales)


def lora_topk(y, x, a_stack, b_stack, scales, topk_ids, gates):
  return reference.lora_topk(y, x, a_stack, b_stack, scales, topk_ids, gates)
