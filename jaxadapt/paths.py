"""Dotted parameter paths (`model.layers.0.self_attn.q_proj`) over pure-dict parameter trees.

Every jaxadapt tree that is keyed by module (base params from `nnx.to_pure_dict`, adapters,
shardings, checkpoint name maps) names a node by the same dotted string, which is also the
Hugging Face / PEFT / diffusers module name. This module is the one place that turns a jax key
path into that string and walks a tree by it; it depends on jax only.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping

import jax


def keypath_str(key_path) -> str:
  """The dotted path of a jax key path: `(DictKey('model'), DictKey(0))` -> `"model.0"`."""
  return jax.tree_util.keystr(key_path, simple=True, separator=".")


def map_with_paths(fn: Callable[[str, Any], Any], tree):
  """`jax.tree_util.tree_map_with_path` with each leaf's dotted path: `fn(path, leaf)`."""
  return jax.tree_util.tree_map_with_path(lambda kp, x: fn(keypath_str(kp), x), tree)


def _key(node: Mapping, part: str):
  """The key of `node` that a path part names (`"0"` is the int key 0 of an `nnx.List`)."""
  return int(part) if part.isdigit() and int(part) in node else part


def path_get(params: Mapping, path: str):
  """The sub-tree of a pure-dict parameter tree at a dotted path (`model.layers.0.mlp`).

  Raises:
    KeyError: no node at `path` (naming the first missing part).
  """
  node = params
  for part in path.split("."):
    if not isinstance(node, Mapping) or _key(node, part) not in node:
      raise KeyError(f"no parameter at {path!r} (missing {part!r})")
    node = node[_key(node, part)]
  return node


def path_set(params: Mapping, path: str, leaf: str, value) -> dict:
  """A new tree equal to `params` but with `path.leaf = value`; all other nodes shared."""
  parts = path.split(".") + [leaf]

  def rec(node, i):
    key = _key(node, parts[i])
    new = dict(node)
    new[key] = value if i == len(parts) - 1 else rec(node[key], i + 1)
    return new
  return rec(params, 0)


def module_paths(params: Mapping, prefix: str = "") -> list[str]:
  """The dotted paths of every sub-tree of a pure-dict parameter tree (its modules), root first
  (the root is `prefix`, `""` by default)."""
  out = [prefix]
  for key, node in params.items():
    if isinstance(node, Mapping):
      out += module_paths(node, f"{prefix}.{key}" if prefix else str(key))
  return out
