"""Per-block LoRA scales of a U-Net, as diffusers' ``set_adapters(..., {"unet": {...}})`` reads them.

A block spec is ``{"down": s, "mid": s, "up": s}`` where the down/up value is a float for every
block with attention, or ``{"block_i": float or [one per attention of block i]}``; a part left
out keeps ``default``. It expands to a scale per attention module (``down_blocks.i.attentions.j``,
``mid_block``, ``up_blocks.i.attentions.j``), and a LoRA path takes the first such module name
it contains, else (a resnet or a path outside the attention modules) the one of its block's
``attentions.j`` with j its fourth name part, else ``default`` (diffusers' ``set_adapters`` /
``_maybe_expand_lora_scales``, B-LoRA style block weighting).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

Spec = Mapping[str, Any]


def _is_number(v) -> bool:
  return isinstance(v, (int, float)) and not isinstance(v, bool)


def expand_block_scales(spec: Spec, unet_config, default: float = 1.0) -> dict[str, float]:
  """{attention module name: scale} of a block spec for a U-Net config.

  Args:
    spec: {"down": .., "mid": .., "up": ..} (see the module docstring).
    unet_config: the ``UNetConfig`` (block types and resnets per block).
    default: the scale of what the spec leaves out.

  Returns:
    Ordered {module name: scale}: "mid_block" first, then the down and up attentions.

  Raises:
    ValueError: an unknown part or block, a list of the wrong length, or a non-number.
  """
  bad = sorted(set(spec) - {"down", "mid", "up"})
  if bad:
    raise ValueError(f"per-block U-Net scales take the parts 'down', 'mid', 'up'; got {bad}.")
  out: dict[str, float] = {}
  mid = spec.get("mid", default)
  if isinstance(mid, Sequence) and not isinstance(mid, str):
    if len(mid) != 1:
      raise ValueError(f"expected 1 scale for mid, got {len(mid)}.")
    mid = mid[0]
  out["mid_block"] = _number(mid, "mid")
  n = len(unet_config.down_block_types)
  blocks = {
      "down": [i for i, t in enumerate(unet_config.down_block_types)
               if t.startswith("CrossAttn")],
      "up": [i for i, t in enumerate(unet_config.up_block_types) if t.startswith("CrossAttn")],
  }
  for part in ("down", "up"):
    value = spec.get(part, default)
    per_block = value if isinstance(value, Mapping) else {f"block_{i}": value
                                                          for i in blocks[part]}
    for i in blocks[part]:
      # transformers per block: the down block's resnets (+1 for up blocks, mirrored).
      count = unet_config.layers_per_block[i if part == "down" else n - 1 - i]
      count += part == "up"
      v = per_block.get(f"block_{i}", default)
      if isinstance(v, Sequence) and not isinstance(v, str):
        v = list(v) * count if len(v) == 1 else list(v)
        if len(v) != count:
          raise ValueError(f"expected {count} scales for {part}.block_{i}, got {len(v)}.")
      else:
        v = [v] * count
      for j, s in enumerate(v):
        out[f"{part}_blocks.{i}.attentions.{j}"] = _number(s, f"{part}.block_{i}")
    unknown = sorted(set(per_block) - {f"block_{i}" for i in blocks[part]})
    if isinstance(value, Mapping) and unknown:
      raise ValueError(f"can't set LoRA scales for {part} {unknown}: the U-Net's {part} blocks"
                       f" with attention are {[f'block_{i}' for i in blocks[part]]}.")
  return out


def _number(v, where: str) -> float:
  if not _is_number(v):
    raise ValueError(f"LoRA scale for {where} must be a number; got {v!r}.")
  return float(v)


def path_scales(paths: Sequence[str], spec: Spec, unet_config,
                default: float = 1.0) -> dict[str, float]:
  """{LoRA path: scale} of a block spec (see the module docstring for the matching rule)."""
  modules = expand_block_scales(spec, unet_config, default)
  out = {}
  for path in paths:
    hit = next((s for name, s in modules.items() if name in path), None)
    if hit is None:
      parts = path.split(".")
      key = f"{parts[0]}.{parts[1]}.attentions.{parts[3]}" if len(parts) > 3 else None
      hit = modules.get(key, default)
    out[path] = hit
  return out
