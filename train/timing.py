"""Timing that a shared, noisy machine cannot bias: interleaved repeats, medians."""
from __future__ import annotations

import time

import jax
import numpy as np


def median_ms(fns: dict, repeats: int) -> dict:
  """{name: median milliseconds of `fn()`} (each blocked until ready), the functions run once
  to compile and then interleaved `repeats` times, so a noisy machine hits them alike."""
  times = {k: [] for k in fns}
  for f in fns.values():
    jax.block_until_ready(f())
  for _ in range(repeats):
    for k, f in fns.items():
      t = time.perf_counter()
      jax.block_until_ready(f())
      times[k].append(1e3 * (time.perf_counter() - t))
  return {k: float(np.median(v)) for k, v in times.items()}
