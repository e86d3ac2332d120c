"""`merge` / `unmerge`: an adapter folded into a frozen model's kernels, and taken out again.

Pure functions over any jaxadapt model (a `jaxadapt.models.frozen.FrozenModel`: LLMs, UNet, DiT,
...) and a `LoraAdapter`: each returns a new model over new params; the input model and its
params are untouched. The kernel arithmetic is `lora.merge_params` / `lora.unmerge_params`.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Optional

from jaxadapt.adapters import lora as lora_lib

if TYPE_CHECKING:  # adapters never import models at run time
  from jaxadapt.models.frozen import FrozenModel


def merge(model: "FrozenModel", adapter: lora_lib.LoraAdapter, *,
          keep_original: bool = False) -> "FrozenModel":
  """A new model with `adapter` folded into its kernels (the input model is untouched).

  Works for every jaxadapt model (LLMs, UNet, DiT, ...). `unmerge` undoes it arithmetically, as
  PEFT's unmerge does (exact up to rounding). With `keep_original=True` the new model also keeps
  references to the pre-merge kernels of the targeted layers, and `unmerge` restores them
  bitwise; they are the arrays the input model holds (nothing is copied), but they stay alive
  while the merged model does, so `model = ja.merge(model, a, keep_original=True)` holds up to
  two copies of every targeted kernel.

  Raises:
    TypeError / ValueError: `adapter` is not a `LoraAdapter` or does not fit `model`
      (`FrozenModel.check_adapter`).
  """
  model.check_adapter(adapter)
  params, undo = lora_lib.merge_params(model.params, adapter, keep_original=keep_original,
                                       base_kernels=_base_kernels(model, adapter))
  return model.with_params(params, merged=model.merged + ((adapter, undo),))


def _base_kernels(model: "FrozenModel", adapter: lora_lib.LoraAdapter) -> dict:
  """{path: the kernel without the adapters merged before} for `adapter`'s DoRA paths that
  hold merged adapters: DoRA's norm is taken on the unmerged base, as PEFT's merge does (its
  `_unmerged_base_weight`), so `merge(merge(m, a0), a1)` equals PEFT's `merge_and_unload` of
  both, and its forward with both active (`set_adapter([a0, a1])`)."""
  out = {}
  for path, w in adapter.weights.items():
    if "magnitude" not in w or not any(path in a.weights for a, _ in model.merged):
      continue
    kernel = lora_lib.kernel_at(model.params, path)
    for earlier, undo in reversed(model.merged):
      if path in earlier.weights:
        kernel = lora_lib.unmerged_kernel(kernel, earlier, path, undo)
    out[path] = kernel
  return out


def unmerge(model: "FrozenModel",
            adapter: Optional[lora_lib.LoraAdapter] = None) -> "FrozenModel":
  """Removes the most recently merged adapter (or the given one, which must be the newest).

  Raises:
    ValueError: `model` has no merged adapter, or `adapter` is not the newest merged one.
  """
  if not model.merged:
    raise ValueError("this model has no merged adapter to unmerge")
  last, undo = model.merged[-1]
  if adapter is not None and adapter is not last:
    raise ValueError("unmerge removes adapters newest first; the given adapter is not the "
                     "newest merged one")
  params = lora_lib.unmerge_params(model.params, last, undo)
  return model.with_params(params, merged=model.merged[:-1])
