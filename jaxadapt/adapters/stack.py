"""Many adapters in one batch: stacks for the projection hook's mixed and gated contexts.

S-LoRA (Sheng et al., 2023), Sec. 4: one batch, each request with its own adapter; adapters of
different ranks are zero-padded to the largest rank of the stack (the kernels skip the padding).
"""
from __future__ import annotations

from typing import Mapping, Sequence

import jax.numpy as jnp
import numpy as np

from jaxadapt.adapters.hook import MixedLoRA, dora_weight_norm
from jaxadapt.adapters.lora import LoraAdapter, kernel_at


def stack_adapters(params: Mapping, adapters: Sequence[LoraAdapter], dtype=jnp.float32) -> dict:
  """Per path: `a [N, in, r_max]`, `b [N, r_max, out]`, `scale [N]`, `dora_scale [N, out]|None`.

  An adapter that does not target a path gets zeros there (and scale 0).
  """
  paths = []
  for ad in adapters:
    paths += [p for p in ad.weights if p not in paths]
  out = {}
  for path in paths:
    kernel = kernel_at(params, path)
    din, dout = kernel.shape
    rmax = max(ad.rank(path) for ad in adapters if path in ad.weights)
    a = np.zeros((len(adapters), din, rmax), np.float32)
    b = np.zeros((len(adapters), rmax, dout), np.float32)
    scale = np.zeros((len(adapters),), np.float32)
    dora = None
    if any("magnitude" in ad.weights.get(path, {}) for ad in adapters):
      dora = np.ones((len(adapters), dout), np.float32)
    for n, ad in enumerate(adapters):
      w = ad.weights.get(path)
      if w is None:
        continue
      r = ad.rank(path)
      a[n, :, :r] = np.asarray(w["a"], np.float32)
      b[n, :r, :] = np.asarray(w["b"], np.float32)
      scale[n] = ad.scale(path)
      if "magnitude" in w:
        norm = dora_weight_norm(kernel, w["a"], w["b"], scale[n])
        dora[n] = np.asarray(w["magnitude"], np.float32) / np.asarray(norm)
    out[path] = dict(a=jnp.asarray(a, dtype), b=jnp.asarray(b, dtype), scale=jnp.asarray(scale),
                     dora_scale=None if dora is None else jnp.asarray(dora))
  return out


def mixed_contexts(stacks: Mapping, token_ids) -> dict:
  """`MixedLoRA` per path from `stack_adapters` output and one adapter id per token."""
  ids = jnp.asarray(token_ids, jnp.int32).reshape(-1)
  return {p: MixedLoRA(a=s["a"], b=s["b"], scale=s["scale"], token_ids=ids,
                       dora_scale=s["dora_scale"]) for p, s in stacks.items()}
