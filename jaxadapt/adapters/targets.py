"""Which projections an adapter targets, with PEFT's matching rules.

`target_modules` as a list matches a path equal to an entry or ending in `.entry`; an entry equal
to the whole path is taken whatever `layers_to_transform` says (PEFT's rule). As a string it is a
regex that must match the whole path (PEFT refuses `layers_to_transform` / `layers_pattern` with
it; `LoraConfig` does too); `"all-linear"` (any case) means every linear layer but the output head,
by full path. `rank_pattern` and `alpha_pattern` keys are regexes matched against the end of a
path; the first key in the mapping's order that matches wins.
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
  if path in target_modules:  # named in full: PEFT skips the layer filter
    return True
  found = any(path.endswith(f".{t}") for t in target_modules)
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


def is_all_linear(target_modules) -> bool:
  """Whether `target_modules` is PEFT's "all-linear" shorthand (compared case-insensitively)."""
  return isinstance(target_modules, str) and target_modules.lower() == ALL_LINEAR


def expand_all_linear(linear_paths: Iterable[str]) -> tuple[str, ...]:
  """The full paths PEFT's "all-linear" stands for: every linear layer but the output head.

  PEFT expands to full module names, not to their last components, so a linear layer that shares
  its last name with the output head (`mtp.lm_head`) is still targeted.
  """
  return tuple(p for p in linear_paths if p not in OUTPUT_LAYERS)


def resolve_targets(linear_paths: Sequence[str], target_modules, *,
                    extra_paths: Sequence[str] = (), **kwargs) -> list[str]:
  """The paths among `linear_paths` and then `extra_paths` (embeddings, tied heads) an adapter
  config targets, in the given order; "all-linear" stands for linear layers only.

  Raises:
    ValueError: if nothing matches (PEFT raises too), naming the patterns and a few paths.
  """
  if is_all_linear(target_modules):
    target_modules = expand_all_linear(linear_paths)
  out = [p for p in list(linear_paths) + [e for e in extra_paths if e not in linear_paths]
         if is_targeted(p, target_modules, **kwargs)]
  if not out:
    raise ValueError(f"target_modules={target_modules!r} (with {kwargs}) matches no linear layer "
                     f"of this model; its linear layers look like {list(linear_paths)[:4]}")
  return out


def check_only_linear(module_paths: Iterable[str], linear_paths: Sequence[str], target_modules,
                      **kwargs) -> None:
  """Refuses a config that targets a module that is neither a linear layer nor one of the
  embeddings / tied heads the model applies LoRA to.

  PEFT puts LoRA on convolutions too, and raises on other module types; a target jaxadapt would
  otherwise skip silently is an error.

  Args:
    module_paths: the dotted paths of every module of the model that holds parameters.
    linear_paths: the paths LoRA can target (linear layers, embeddings, tied heads).
    target_modules: as in `resolve_targets`; `kwargs` the other target options.

  Raises:
    NotImplementedError: naming `target_modules` and the first non-linear modules it matches.
  """
  if is_all_linear(target_modules):
    return
  linear = set(linear_paths)
  other = [p for p in module_paths if p and p not in linear
           and is_targeted(p, target_modules, **kwargs)]
  if other:
    raise NotImplementedError(
        f"target_modules={target_modules!r} matches {other[:3]}, which are not linear layers "
        f"or embeddings this model applies LoRA to; PEFT puts LoRA on convolutions too (or "
        f"refuses other modules) but jaxadapt has LoRA for linear layers and the Llama family's "
        f"token embedding: narrow target_modules or add exclude_modules")


def pattern_value(patterns: dict, path: str, default):
  """The value of the first pattern key that matches the end of `path` (PEFT's rule)."""
  for key, value in patterns.items():
    if re.match(rf"(.*\.)?({key})$", path):
      return value
  return default
