"""LoRA as pure functions over a frozen parameter tree.

An adapter is `LoraAdapter(weights, config)`: `weights[path] = {"a": [in, r], "b": [r, out]}`
(plus `"magnitude": [out]` for DoRA), keyed by the dotted path of the projection it targets.
`delta = scale * (x @ a) @ b` with `scale = alpha / r` (or `alpha / sqrt(r)`, rsLoRA).
Nothing here mutates or copies the base tree; `merge` builds a new tree that shares every leaf
it does not change.

References:
  LoRA (Hu et al., 2021), Eq. 3: h = W0 x + (alpha / r) B A x.
  rsLoRA (Kalajdzievski, 2023), Sec. 3: scale = alpha / sqrt(r).
  DoRA (Liu et al., 2024), Eq. 5: W' = m (W0 + B A) / ||W0 + B A||_c.
"""
from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp

from jaxadapt.adapters import targets as targets_lib
from jaxadapt.adapters.hook import SingleLoRA, dora_weight_norm
from jaxadapt.context import Context
from jaxadapt.paths import module_paths, path_get, path_set


def _freeze(value):
  if isinstance(value, Mapping):
    return tuple(sorted((str(k), _freeze(v)) for k, v in value.items()))
  if isinstance(value, (list, tuple, set)):
    return tuple(_freeze(v) for v in value)
  return value


@dataclasses.dataclass(frozen=True, kw_only=True)
class LoraConfig:
  """LoRA options under PEFT's names; hashable so it can be static under jit."""
  r: int = 8                              # default rank
  lora_alpha: float = 8.0                 # default alpha
  target_modules: Any = None              # names (tuple), a full-match regex, or "all-linear"
  exclude_modules: Any = None             # names (tuple) or regex never targeted
  layers_to_transform: Any = None         # int or tuple of layer indices
  layers_pattern: Any = None              # name(s) of the layer list, e.g. "layers"
  rank_pattern: tuple = ()                # ((regex, rank), ...): per-path rank
  alpha_pattern: tuple = ()               # ((regex, alpha), ...): per-path alpha
  use_rslora: bool = False                # scale = alpha / sqrt(r) instead of alpha / r
  use_dora: bool = False                  # weight-decomposed LoRA (magnitude vector per output)
  lora_dropout: float = 0.0               # dropout on the adapter input while training
  base_model_name_or_path: Optional[str] = None  # recorded in PEFT's adapter_config.json

  def __post_init__(self):
    for name in ("target_modules", "exclude_modules", "layers_to_transform", "layers_pattern",
                 "rank_pattern", "alpha_pattern"):
      value = getattr(self, name)
      if isinstance(value, Mapping):
        value = tuple(value.items())
      if isinstance(value, (list, set)):
        value = tuple(value)
      if value is None and name in ("rank_pattern", "alpha_pattern"):
        value = ()
      object.__setattr__(self, name, _freeze(value) if value is not None else None)
    if self.target_modules is None:
      raise ValueError("LoraConfig needs target_modules: a list of module names, a regex, or "
                       "'all-linear'")
    if not isinstance(self.r, int) or self.r < 1:
      raise ValueError(f"r must be a positive int, got {self.r!r}")
    for key, rank in self.rank_pattern:
      if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"rank_pattern[{key!r}] must be a positive int, got {rank!r}")
    # PEFT's LoraConfig refuses these combinations (a regex target names no layer list).
    if isinstance(self.target_modules, str):
      for name in ("layers_to_transform", "layers_pattern"):
        if getattr(self, name) is not None:
          raise ValueError(f"{name} cannot be used when target_modules is a str (a regex or "
                           f"'all-linear'), as in PEFT; list the module names instead")
    for name in ("target_modules", "exclude_modules"):
      value = getattr(self, name)
      if isinstance(value, str) and not targets_lib.is_all_linear(value):
        try:
          re.compile(value)
        except re.error as e:
          raise ValueError(f"{name}={value!r} is neither 'all-linear', a list of module names, "
                           f"nor a valid regex ({e})") from None
    if self.layers_pattern and self.layers_to_transform is None:
      raise ValueError("layers_pattern needs layers_to_transform (PEFT refuses it alone)")
    if not 0.0 <= self.lora_dropout < 1.0:
      raise ValueError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")

  def rank(self, path: str) -> int:
    return int(targets_lib.pattern_value(dict(self.rank_pattern), path, self.r))

  def alpha(self, path: str) -> float:
    return float(targets_lib.pattern_value(dict(self.alpha_pattern), path, self.lora_alpha))

  def scale(self, path: str, rank: Optional[int] = None) -> float:
    r = self.rank(path) if rank is None else rank
    return self.alpha(path) / (math.sqrt(r) if self.use_rslora else r)

  def targets(self, linear_paths: Sequence[str],
              module_paths: Optional[Sequence[str]] = None,
              extra_paths: Sequence[str] = ()) -> list[str]:
    """The paths this config targets (PEFT's rules): linear layers, then extra paths.

    Args:
      linear_paths: the model's linear layers.
      module_paths: optionally, every module path of the model that holds parameters; a
        config that also targets one of them that is neither linear nor an extra path is
        refused (`NotImplementedError`), where PEFT would adapt it (convolutions) or raise.
      extra_paths: embeddings and tied heads the model applies LoRA to; targeted by name
        (never by "all-linear", as in PEFT).
    """
    kwargs = dict(layers_to_transform=self.layers_to_transform,
                  layers_pattern=self.layers_pattern, exclude_modules=self.exclude_modules)
    if module_paths is not None:
      targets_lib.check_only_linear(module_paths, list(linear_paths) + list(extra_paths),
                                    self.target_modules, **kwargs)
    return targets_lib.resolve_targets(linear_paths, self.target_modules,
                                       extra_paths=extra_paths, **kwargs)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LoraAdapter:
  """A LoRA adapter: weights keyed by projection path (a pytree) plus its static config."""
  weights: dict
  config: LoraConfig = dataclasses.field(metadata=dict(static=True))
  # Paths whose LoRA is on an embedding (PEFT's lora_embedding_A/B; `a [vocab, r]`, `b [r, dim]`).
  embedding_paths: tuple = dataclasses.field(default=(), metadata=dict(static=True))
  # Base weights saved with the adapter (PEFT's save_embedding_layers), checked against the model
  # that runs it: an `embedding.SavedBase`, or None.
  saved_base: Any = dataclasses.field(default=None, metadata=dict(static=True))

  @property
  def paths(self) -> list[str]:
    return list(self.weights)

  def rank(self, path: str) -> int:
    return int(self.weights[path]["a"].shape[1])

  def scale(self, path: str) -> float:
    return self.config.scale(path, self.rank(path))


def kernel_at(params: Mapping, path: str) -> jax.Array:
  """The [in, out] kernel of the projection at `path`: a linear layer's kernel, an embedding's
  [vocab, dim] table (the kernel of its one-hot input), a tied lm_head's embedding transposed."""
  if path == "lm_head" and "lm_head" not in params:
    return path_get(params, "model.embed_tokens")["embedding"].T
  node = path_get(params, path)
  return node["embedding"] if "embedding" in node and "kernel" not in node else node["kernel"]


def is_tied_head(params: Mapping, path: str) -> bool:
  """Whether `path` is an lm_head tied to the embedding (no weight of its own)."""
  return path == "lm_head" and "lm_head" not in params


def is_embedding(params: Mapping, path: str) -> bool:
  """Whether the module at `path` is an embedding table."""
  if is_tied_head(params, path):
    return False
  node = path_get(params, path)
  return "embedding" in node and "kernel" not in node


def init_lora(params: Mapping, linear_paths: Sequence[str], config: LoraConfig,
              key: jax.Array, *, dtype=jnp.float32,
              extra_paths: Sequence[str] = ()) -> LoraAdapter:
  """A fresh adapter, equal to the base: as PEFT, on a linear layer `a` Kaiming-uniform (bound
  1/sqrt(in)) and `b` zeros; on an embedding `a` zeros and `b` standard normal.

  DoRA magnitudes start at the base kernel's column norms, so the adapted model equals the base.

  Args:
    extra_paths: the embeddings and tied heads the model applies LoRA to besides its linear
      layers (`FrozenModel.extra_lora_paths`).
  """
  weights, embeddings = {}, []
  for path in config.targets(linear_paths, module_paths(params), extra_paths=extra_paths):
    kernel = kernel_at(params, path)
    din, dout = kernel.shape
    r = config.rank(path)
    key, sub = jax.random.split(key)
    if is_embedding(params, path):
      w = {"a": jnp.zeros((din, r), dtype), "b": jax.random.normal(sub, (r, dout), dtype)}
      embeddings.append(path)
    else:
      bound = 1.0 / math.sqrt(din)
      w = {"a": jax.random.uniform(sub, (din, r), dtype, -bound, bound),
           "b": jnp.zeros((r, dout), dtype)}
    if config.use_dora:
      w["magnitude"] = dora_weight_norm(kernel, w["a"], w["b"], 0.0).astype(dtype)
    weights[path] = w
  return LoraAdapter(weights=weights, config=config, embedding_paths=tuple(embeddings))


def context(adapter: LoraAdapter, *, dropout_key: Optional[jax.Array] = None) -> Context:
  """The forward `Context` of one adapter: a `SingleLoRA` view on each path it targets.

  Args:
    adapter: the adapter.
    dropout_key: a PRNG key to apply `lora_dropout` (training); None disables dropout.
  """
  out = {}
  rate = adapter.config.lora_dropout if dropout_key is not None else 0.0
  keys = (jax.random.split(dropout_key, len(adapter.weights)) if rate > 0 else
          [None] * len(adapter.weights))
  for (path, w), k in zip(adapter.weights.items(), keys):
    out[path] = SingleLoRA(a=w["a"], b=w["b"], scale=jnp.asarray(adapter.scale(path), jnp.float32),
                           magnitude=w.get("magnitude"), dropout_key=k, dropout=rate)
  return Context(weights=out)



def delta_weight(adapter: LoraAdapter, path: str) -> jax.Array:
  """`scale * A @ B` for one path, float32 [in, out]."""
  w = adapter.weights[path]
  return adapter.scale(path) * (w["a"].astype(jnp.float32) @ w["b"].astype(jnp.float32))


def merge_params(params: Mapping, adapter: LoraAdapter, *, keep_original: bool = False,
                 base_kernels: Optional[Mapping[str, jax.Array]] = None) -> tuple[dict, dict]:
  """Folds the adapter into the kernels it targets (computed in float32, rounded once).

  Args:
    params: the base tree (not modified).
    adapter: the adapter to fold in.
    keep_original: also record the pre-merge kernels (references, not copies) so that
      `unmerge_params` restores them bitwise. They then stay alive as long as the undo record
      does, even if the input tree is dropped: up to a second copy of every targeted kernel.
    base_kernels: {path: kernel} the unmerged base kernels of paths that already hold merged
      adapters. DoRA's column norm `||W0 + dW||_c` is taken on the unmerged base, as its forward
      and PEFT's merge take it; a path not given uses its kernel in `params`.

  Returns:
    (new params, `undo`: what `unmerge_params` needs: the DoRA column norms per path and, with
    `keep_original`, the pre-merge kernels and the merged ones (to recognise them)).
  """
  undo = {"original": {}, "merged": {}, "dora_norms": {}}
  base_kernels = base_kernels or {}
  for path, w in adapter.weights.items():
    kernel = kernel_at(params, path)
    delta = delta_weight(adapter, path)
    new = kernel.astype(jnp.float32) + delta
    if "magnitude" in w:
      base = base_kernels.get(path)
      unmerged = new if base is None else base.astype(jnp.float32) + delta
      norm = jnp.sqrt(jnp.sum(unmerged * unmerged, axis=0))
      undo["dora_norms"][path] = norm
      new = new * (w["magnitude"].astype(jnp.float32) / norm)
    new = new.astype(kernel.dtype)
    if keep_original:
      undo["original"][path], undo["merged"][path] = kernel, new
    params = _set_kernel(params, path, new)
  return params, undo


def unmerged_kernel(kernel: jax.Array, adapter: LoraAdapter, path: str,
                    undo: Mapping) -> jax.Array:
  """The kernel at `path` with `adapter` (merged by `merge_params`, which gave `undo`) taken out.

  With an undo record made with `keep_original`, a kernel that is still the one `merge_params`
  produced gives back the pre-merge kernel itself (bitwise). Otherwise the adapter is taken out
  arithmetically, as PEFT does: `W = W' * ||W0 + dW||_c / m - dW` (DoRA) or `W' - dW`, exact up
  to rounding (in bfloat16 a small weight next to a large update can lose its low bits).
  """
  if path in undo.get("original", {}) and kernel is undo.get("merged", {}).get(path):
    return undo["original"][path]
  w = adapter.weights[path]
  new = kernel.astype(jnp.float32)
  if "magnitude" in w:
    new = new * (undo["dora_norms"][path] / w["magnitude"].astype(jnp.float32))
  return (new - delta_weight(adapter, path)).astype(kernel.dtype)


def unmerge_params(params: Mapping, adapter: LoraAdapter, undo: Mapping) -> dict:
  """The inverse of `merge_params`, given the `undo` it returned (`unmerged_kernel` per path)."""
  for path in adapter.weights:
    params = _set_kernel(params, path, unmerged_kernel(kernel_at(params, path), adapter, path,
                                                       undo))
  return params


def _set_kernel(params, path, value):
  tied = "lm_head" not in params and "model" in params and "embed_tokens" in params["model"]
  if is_tied_head(params, path) or (tied and path == "model.embed_tokens"):
    raise ValueError(
        f"cannot merge a LoRA on {path}: this model ties lm_head to model.embed_tokens "
        f"(tie_word_embeddings), so merging into one would change the other too (PEFT's merge "
        f"does, and its merged model then differs from its adapter's forward). Run the adapter "
        f"unmerged (model(..., adapter=a))")
  return path_set(params, path, "embedding" if is_embedding(params, path) else "kernel", value)
