"""Which projections an adapter targets, with PEFT's matching rules.

`target_modules` as a list matches a path equal to an entry or ending in `.entry`; as a string it
is a regex that must match the whole path (and then `layers_to_transform` does not apply, as in
PEFT); `"all-linear"` means every linear layer but the output head. `rank_pattern` and
`alpha_pattern` keys are regexes matched against the end of a path.
"""
from __future__ import annotations

import re
from typing import Iterable, Optional, Sequence

ALL_LINEAR = "all-linear"
OUTPUT_LAYERS = ("lm_head",)


def _layer_index(path: str, layers_pattern) -> Optional[int]:
  if not layers_pattern:
    m = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", path)
  else:
    pats = [layers_pattern] if isinstance(layers_pattern, str) else list(layers_pattern)
    m = None
    for pat in pats:
      m = re.match(rf"(?:^|.*?\.){pat}\.(?P<idx>\d+)\.", path)
      if m is not None:
        break
  return None if m is None else int(m.group("idx"))


def _excluded(path: str, exclude_modules) -> bool:
  if not exclude_modules:
    return False
  if isinstance(exclude_modules, str):
    return re.fullmatch(exclude_modules, path) is not None
  return any(path == e or path.endswith(f".{e}") for e in exclude_modules)


def is_targeted(path: str, target_modules, *, layers_to_transform=None, layers_pattern=None,
                exclude_modules=None) -> bool:
  """PEFT's rule for whether the module at `path` gets an adapter."""
  if target_modules is None or _excluded(path, exclude_modules):
    return False
  if isinstance(target_modules, str):
    return re.fullmatch(target_modules, path) is not None
  found = path in target_modules or any(path.endswith(f".{t}") for t in target_modules)
  use_layers = layers_to_transform is not None and (
      not isinstance(layers_to_transform, (list, tuple)) or len(layers_to_transform) > 0)
  if found and use_layers:
    idx = _layer_index(path, layers_pattern)
    if idx is None:
      return False
    if isinstance(layers_to_transform, int):
      return idx == layers_to_transform
    return idx in layers_to_transform
  return found


def expand_all_linear(linear_paths: Iterable[str]) -> tuple[str, ...]:
  """The module names PEFT's "all-linear" stands for: every linear layer but the output head."""
  names = {p.rsplit(".", 1)[-1] for p in linear_paths if p not in OUTPUT_LAYERS}
  return tuple(sorted(names))


def resolve_targets(linear_paths: Sequence[str], target_modules, **kwargs) -> list[str]:
  """The paths among `linear_paths` an adapter config targets, in the given order.

  Raises:
    ValueError: if nothing matches (PEFT raises too), naming the patterns and a few paths.
  """
  if target_modules == ALL_LINEAR:
    target_modules = expand_all_linear(linear_paths)
  out = [p for p in linear_paths if is_targeted(p, target_modules, **kwargs)]
  if not out:
    raise ValueError(f"target_modules={target_modules!r} (with {kwargs}) matches no linear layer "
                     f"of this model; its linear layers look like {list(linear_paths)[:4]}")
  return out


def pattern_value(patterns: dict, path: str, default):
  """The value of the first pattern key that matches the end of `path` (PEFT's rule)."""
  for key, value in patterns.items():
    if re.match(rf"(.*\.)?({key})$", path):
      return value
  return default
