"""`FrozenModel`: what every jaxadapt model wrapper shares.

A frozen model is `config`, `graphdef` and `params` (a pure dict that nothing mutates). It knows
its linear layers (the LoRA targets), builds adapter contexts for one adapter or a mixed batch
(one adapter id per batch element), and runs jitted forwards.
"""
from __future__ import annotations

import copy
import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxadapt.adapters import lora as lora_lib
from jaxadapt.adapters import stack as stack_lib
from jaxadapt.models.layers import Linear


def load_params(directory: str, build: Callable[[], nnx.Module], *, dtype, sharding=None,
                stem: str, name_fn: Callable):
  """(graphdef, params pure dict) of `build()` filled from the safetensors of `directory`.

  The module is built abstractly (`nnx.eval_shape`), so no random weights are materialised; each
  tensor is memory-mapped, converted to jaxadapt's layout by `name_fn` and placed on its sharding.
  """
  from jaxadapt.io.hf import load_tree  # late: io.hf imports jaxadapt.models (cycle)
  graphdef, state = nnx.split(nnx.eval_shape(build))
  params = load_tree(directory, nnx.to_pure_dict(state), name_fn, dtype=dtype,
                     sharding=sharding, stem=stem)
  return graphdef, params


def apply(graphdef, params, method: str, *args, **kwargs):
  """The pure forward `module.<method>(*args, **kwargs)` of graphdef + params (not jitted)."""
  module = nnx.merge(graphdef, nnx.State(params))
  return getattr(module, method)(*args, **kwargs)


@functools.partial(jax.jit, static_argnums=(0, 2, 3))
def _apply_jit(graphdef, params, method, static, args, kwargs):
  return apply(graphdef, params, method, *args, **dict(static), **kwargs)


def as_traced_fns(inserts):
  """Insertion-point fns as `jax.tree_util.Partial`s, so they pass through jit as arguments: the
  function is part of the tree structure (a new function object recompiles) while a Partial's
  bound arguments (e.g. an adapter module's params) are traced, so new values do not."""
  if not inserts:
    return None
  return {name: fn if isinstance(fn, jax.tree_util.Partial) else jax.tree_util.Partial(fn)
          for name, fn in inserts.items()}


def token_inputs(input_ids, attention_mask=None, position_ids=None):
  """`input_ids [B, S]`, an optional mask of the same shape and positions, as jnp int arrays.

  Raises:
    ValueError: naming the shape expected and the shape found.
  """
  input_ids = jnp.asarray(input_ids, jnp.int32)
  if input_ids.ndim != 2:
    raise ValueError(f"input_ids must be [batch, seq], got shape {input_ids.shape}")
  if attention_mask is not None:
    attention_mask = jnp.asarray(attention_mask)
    if attention_mask.shape != input_ids.shape:
      raise ValueError(f"attention_mask shape {attention_mask.shape} != input_ids shape "
                       f"{input_ids.shape}")
  if position_ids is not None:
    position_ids = jnp.asarray(position_ids, jnp.int32)
    if position_ids.shape != input_ids.shape:
      raise ValueError(f"position_ids shape {position_ids.shape} != input_ids shape "
                       f"{input_ids.shape}")
  return input_ids, attention_mask, position_ids


class FrozenModel:
  """A frozen model: `config`, `graphdef`, `params` (a pure dict, never mutated); jitted calls.

  `inserts` (insertion-point functions) reach the jitted forward as `jax.tree_util.Partial`s:
  pass `Partial(fn, adapter_params)` so new adapter params do not recompile. The keyword
  arguments listed in `static` are compile-time constants. Inside your own jit/grad (training)
  use `apply`.
  """

  def __init__(self, config, graphdef, params, *, merged: tuple = ()):
    self.config = config
    self.graphdef = graphdef
    self.params = params
    self.merged = merged  # ((adapter, undo record), ...) folded in by `merge`, newest last

  def with_params(self, params, *, merged: tuple) -> "FrozenModel":
    """The same model (type, config, graphdef) over other params; caches are not carried."""
    new = copy.copy(self)
    new.__dict__.pop("_stack_cache", None)  # stacks hold DoRA norms of the old weights
    new.params, new.merged = params, merged
    return new

  @property
  def dtype(self):
    return jax.tree_util.tree_leaves(self.params)[0].dtype

  @functools.cached_property
  def linear_paths(self) -> list[str]:
    """Paths of every `Linear` (LoRA targets), in module order."""
    module = nnx.merge(self.graphdef, nnx.State(self.params))
    paths = [m.path for _, m in nnx.iter_graph(module) if isinstance(m, Linear)]
    return sorted(set(paths), key=paths.index)

  def check_adapter(self, adapter) -> None:
    """Raises if `adapter` targets a path that is not a linear layer of this model, has weights
    at paths its own config does not target here (PEFT would ignore them), or its weights do not
    fit that layer (an adapter made for another base model)."""
    if not isinstance(adapter, lora_lib.LoraAdapter):
      hint = ("; for several adapters pass adapters= with adapter_ids="
              if isinstance(adapter, (list, tuple)) else "")
      raise TypeError(f"expected a LoraAdapter (e.g. ja.load_adapter(path)), got "
                      f"{type(adapter).__name__}{hint}")
    unknown = [p for p in adapter.weights if p not in self.linear_paths]
    if unknown:
      raise ValueError(f"adapter targets {unknown[:3]}, which are not linear layers of this "
                       f"{type(self).__name__} (e.g. {self.linear_paths[:3]})")
    targets = self._config_targets(adapter.config)
    untargeted = [p for p in adapter.weights if p not in targets]
    if untargeted:
      raise ValueError(
          f"adapter has weights at {untargeted[:3]}, which its config (target_modules="
          f"{adapter.config.target_modules!r}, exclude_modules={adapter.config.exclude_modules!r}"
          f", layers_to_transform={adapter.config.layers_to_transform!r}) does not target in "
          f"this {type(self).__name__}; PEFT would silently ignore them. Fix the config's "
          f"target_modules or drop those weights.")
    for path, w in adapter.weights.items():
      din, dout = lora_lib.kernel_at(self.params, path).shape
      a, b = w["a"].shape, w["b"].shape
      mag = w.get("magnitude")
      if (len(a) != 2 or len(b) != 2 or a[0] != din or b[1] != dout or a[1] != b[0]
          or (mag is not None and mag.shape != (dout,))):
        raise ValueError(
            f"adapter weights at {path} do not fit this model's [{din}, {dout}] kernel: expected "
            f"a [{din}, r], b [r, {dout}]{f', magnitude [{dout}]' if mag is not None else ''}; "
            f"found a {list(a)}, b {list(b)}"
            f"{f', magnitude {list(mag.shape)}' if mag is not None else ''}. Was the adapter "
            f"made for another base model?")

  def _config_targets(self, config) -> frozenset:
    """The linear paths `config` targets in this model (cached per config: configs hash)."""
    cache = self.__dict__.setdefault("_targets_cache", {})
    if config not in cache:
      try:
        cache[config] = frozenset(config.targets(self.linear_paths))
      except ValueError as e:  # matches nothing: PEFT raises too
        raise ValueError(f"adapter config does not fit this {type(self).__name__}: {e}") from None
    return cache[config]

  def _stacks(self, adapters: tuple) -> dict:
    """Stacked weights of `adapters`, cached for the last few distinct adapter lists."""
    cache = self.__dict__.setdefault("_stack_cache", {})
    key = tuple(id(a) for a in adapters)
    hit = cache.get(key)
    if hit is not None and all(x is y for x, y in zip(hit[0], adapters)):
      return hit[1]
    for a in adapters:  # checked once per distinct adapter list, not on every call
      self.check_adapter(a)
    stacks = stack_lib.stack_adapters(self.params, adapters, dtype=self.dtype)
    if len(cache) >= 4:
      cache.pop(next(iter(cache)))
    cache[key] = (adapters, stacks)  # holds the adapters, so their ids stay unique
    return stacks

  def lora_contexts(self, *, adapter=None, adapters=None, adapter_ids=None):
    """Per-path adapter contexts: one adapter for the batch, or a mixed batch.

    Args:
      adapter: one `LoraAdapter` for every batch element.
      adapters: a list of adapters, with `adapter_ids` one id per batch element (-1 = base).

    Returns:
      {path: context} for the projection hook, or None for the plain base.

    Raises:
      TypeError: an adapter that is not a `LoraAdapter`, or `adapters=` given one adapter.
      ValueError: conflicting arguments, `adapter_ids` that are not one int in
        [-1, len(adapters) - 1] per element, or an adapter that does not fit this model.
    """
    if adapter is not None and adapters is not None:
      raise ValueError("pass either adapter= (one for the batch) or adapters= with adapter_ids=, "
                       "not both")
    if adapter_ids is not None and adapters is None:
      raise ValueError("adapter_ids= needs adapters= (the list the ids index); for one adapter "
                       "on the whole batch pass adapter= alone")
    if adapter is not None:
      self.check_adapter(adapter)
      return lora_lib.contexts(adapter)
    if adapters is not None:
      if isinstance(adapters, lora_lib.LoraAdapter):
        raise TypeError("adapters= takes a list of adapters (with adapter_ids=); for one "
                        "adapter on the whole batch pass adapter=")
      adapters = tuple(adapters)
      if adapter_ids is None:
        raise ValueError("adapters= needs adapter_ids= (one id per batch element, -1 = base)")
      ids = np.asarray(adapter_ids)
      if (ids.ndim != 1 or not (ids.size == 0 or np.issubdtype(ids.dtype, np.integer))
          or ((ids < -1) | (ids >= len(adapters))).any()):
        raise ValueError(f"adapter_ids must be one int per batch element in "
                         f"[-1, {len(adapters) - 1}] (-1 = base only) for {len(adapters)} "
                         f"adapter(s); got {adapter_ids!r} (shape {ids.shape}, dtype {ids.dtype})")
      return stack_lib.mixed_contexts(self._stacks(adapters), ids.astype(np.int32))
    return None

  def _call(self, method: str, args: tuple, kwargs: dict, *, inserts=None, static=()):
    lora = kwargs.get("lora")
    if lora:
      unknown = [p for p in lora if p not in self.linear_paths]
      if unknown:
        raise ValueError(f"lora targets {unknown[:3]}, which are not linear layers of this "
                         f"model (e.g. {self.linear_paths[:3]})")
    if inserts:
      kwargs = dict(kwargs, inserts=as_traced_fns(inserts))
    return _apply_jit(self.graphdef, self.params, method, tuple(static), args, kwargs)
