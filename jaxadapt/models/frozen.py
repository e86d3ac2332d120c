"""`FrozenModel`: what every jaxadapt model wrapper shares.

A frozen model is `config`, `graphdef` and `params` (a pure dict that nothing mutates). It knows
its linear layers (the LoRA targets), builds adapter contexts for one adapter or a mixed batch
(one adapter id per batch element), and runs jitted forwards.
"""
from __future__ import annotations

import copy
import functools
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxadapt import context as context_lib
from jaxadapt.adapters import lora as lora_lib
from jaxadapt.adapters import stack as stack_lib
from jaxadapt.io.hf import load_tree
from jaxadapt.models.layers import Linear


def load_params(directory: str, build: Callable[[], nnx.Module], *, dtype, sharding=None,
                stem: str, name_fn: Callable):
  """(graphdef, params pure dict) of `build()` filled from the safetensors of `directory`.

  The module is built abstractly (`nnx.eval_shape`), so no random weights are materialised; each
  tensor is memory-mapped, converted to jaxadapt's layout by `name_fn` and placed on its sharding.
  """
  graphdef, state = nnx.split(nnx.eval_shape(build))
  params = load_tree(directory, nnx.to_pure_dict(state), name_fn, dtype=dtype,
                     sharding=sharding, stem=stem)
  return graphdef, params


def apply(graphdef, params, method: str, *args, ctx=None, **kwargs):
  """The pure forward `module.<method>(*args, ctx=ctx, **kwargs)` of graphdef + params (not
  jitted; use it inside your own jit/grad). The context's routing plan is built here, once."""
  module = nnx.merge(graphdef, nnx.State(params))
  if ctx is not None:
    kwargs["ctx"] = ctx.prepare()
  return getattr(module, method)(*args, **kwargs)


@functools.partial(jax.jit, static_argnums=(0, 2, 3))
def _apply_jit(graphdef, params, method, static, args, kwargs):
  return apply(graphdef, params, method, *args, **dict(static), **kwargs)


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

  batch_item = "batch element"  # what one row of the batch is ("sequence", "sample")

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

  @functools.cached_property
  def extra_lora_paths(self) -> list[str]:
    """Paths besides the linear layers that take a LoRA: the embeddings (and tied heads) a
    family's modules declare in `lora_paths` (the Llama family's token embedding)."""
    module = nnx.merge(self.graphdef, nnx.State(self.params))
    paths = [p for _, m in nnx.iter_graph(module) for p in getattr(m, "lora_paths", ())]
    return sorted(set(paths) - set(self.linear_paths), key=paths.index)

  def check_adapter(self, adapter) -> None:
    """Raises if `adapter` targets a path that is not a linear layer of this model, has weights
    at paths its own config does not target here (PEFT would ignore them), or its weights do not
    fit that layer (an adapter made for another base model)."""
    if not isinstance(adapter, lora_lib.LoraAdapter):
      hint = ("; for several adapters pass adapters= with adapter_ids="
              if isinstance(adapter, (list, tuple)) else "")
      raise TypeError(f"expected a LoraAdapter (e.g. ja.load_adapter(path)), got "
                      f"{type(adapter).__name__}{hint}")
    known = set(self.linear_paths) | set(self.extra_lora_paths)
    unknown = [p for p in adapter.weights if p not in known]
    if unknown:
      raise ValueError(f"adapter targets {unknown[:3]}, which are not linear layers"
                       f"{' or embeddings' if self.extra_lora_paths else ''} of this "
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
    saved = getattr(adapter, "saved_base", None)  # base weights PEFT saved beside the LoRA
    for path in (saved.tensors if saved is not None else ()):
      if path not in known:
        raise ValueError(f"{saved.source}: the adapter holds a saved base weight of {path}, "
                         f"which is no linear layer or embedding of this {type(self).__name__}")
      saved.check(path, self.params)

  def _config_targets(self, config) -> frozenset:
    """The linear paths `config` targets in this model (cached per config: configs hash)."""
    cache = self.__dict__.setdefault("_targets_cache", {})
    if config not in cache:
      try:
        cache[config] = frozenset(config.targets(self.linear_paths,
                                                 extra_paths=self.extra_lora_paths))
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

  def make_context(self, *, adapter=None, adapters=None, adapter_ids=None, context=None,
                   inserts=None, batch: Optional[int] = None):
    """The forward `Context` for one adapter, a mixed batch, or a given context (+ inserts).

    Args:
      adapter: one `LoraAdapter` for every batch element.
      adapters: a list of adapters, with `adapter_ids` one id per batch element (-1 = base).
      context: a ready `jaxadapt.Context` (instead of adapter/adapters).
      inserts: {insertion point: fn} added to the context (as traced `Partial`s).
      batch: the batch size, to check `adapter_ids` against.

    Returns:
      A `Context`, or None for the plain base.

    Raises:
      TypeError: an adapter that is not a `LoraAdapter`, `adapters=` given one adapter, or a
        context that is not a `Context`.
      ValueError: conflicting arguments, `adapter_ids` that are not one int in
        [-1, len(adapters) - 1] per element, or an adapter or context path that does not fit.
    """
    given = [n for n, v in (("adapter", adapter), ("adapters", adapters), ("context", context))
             if v is not None]
    if len(given) > 1:
      raise ValueError(f"pass one of adapter= (one for the batch), adapters= with adapter_ids=, "
                       f"or context=, not both ({' and '.join(given)})")
    if adapter_ids is not None and adapters is None:
      raise ValueError("adapter_ids= needs adapters= (the list the ids index); for one adapter "
                       "on the whole batch pass adapter= alone")
    ctx = None
    if adapter is not None:
      self.check_adapter(adapter)
      ctx = lora_lib.context(adapter)
    elif adapters is not None:
      if isinstance(adapters, lora_lib.LoraAdapter):
        raise TypeError("adapters= takes a list of adapters (with adapter_ids=); for one "
                        "adapter on the whole batch pass adapter=")
      adapters = tuple(adapters)
      if adapter_ids is None:
        raise ValueError("adapters= needs adapter_ids= (one id per batch element, -1 = base)")
      ids = np.asarray(adapter_ids)
      if batch is not None and ids.shape != (batch,):
        raise ValueError(f"adapter_ids must hold one id per {self.batch_item}, shape "
                         f"({batch},); got shape {ids.shape}")
      if (ids.ndim != 1 or not (ids.size == 0 or np.issubdtype(ids.dtype, np.integer))
          or ((ids < -1) | (ids >= len(adapters))).any()):
        raise ValueError(f"adapter_ids must be one int per batch element in "
                         f"[-1, {len(adapters) - 1}] (-1 = base only) for {len(adapters)} "
                         f"adapter(s); got {adapter_ids!r} (shape {ids.shape}, dtype {ids.dtype})")
      ctx = stack_lib.mixed_context(self._stacks(adapters), ids.astype(np.int32),
                                    layout="sequence")
    elif context is not None:
      if not isinstance(context, context_lib.Context):
        raise TypeError(f"context= takes a jaxadapt Context (e.g. ja.Context(weights=...)), got "
                        f"{type(context).__name__}")
      unknown = [p for p in list(context.weights or ()) + list(context.routers or ())
                 if p not in self.linear_paths and p not in self.extra_lora_paths]
      if unknown:
        raise ValueError(f"the context targets {unknown[:3]}, which are not linear layers of "
                         f"this {type(self).__name__} (e.g. {self.linear_paths[:3]})")
      ctx = context
    if inserts:
      self.check_inserts(inserts)
      ctx = (ctx or context_lib.Context()).with_inserts(inserts)
    return ctx

  def check_inserts(self, inserts) -> None:
    """Raises if `inserts` names a point this model does not have (families with insertion
    points list them in `insertion_points`)."""
    points = getattr(self, "insertion_points", None)
    if points is None:
      return
    unknown = [k for k in inserts if k not in points]
    if unknown:
      raise ValueError(f"inserts names {unknown[:3]}, which are not insertion points of this "
                       f"{type(self).__name__} (e.g. {points[:2]})")

  def _call(self, method: str, args: tuple, kwargs: Optional[dict] = None, *, adapter=None,
            adapters=None, adapter_ids=None, context=None, inserts=None, batch=None,
            static=()):
    """The one jitted forward of every family: `method(*args, ctx=..., **kwargs)`."""
    ctx = self.make_context(adapter=adapter, adapters=adapters, adapter_ids=adapter_ids,
                            context=context, inserts=inserts, batch=batch)
    return _apply_jit(self.graphdef, self.params, method, tuple(static), args,
                      dict(kwargs or {}, ctx=ctx))
