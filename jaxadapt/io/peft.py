"""PEFT LoRA dirs (`adapter_config.json` + `adapter_model.safetensors`) in and out.

PEFT stores torch layout, `lora_A.weight [r, in]`, `lora_B.weight [out, r]`, under keys
`base_model.model.<module path>.lora_A.weight`; jaxadapt keeps `a [in, r]`, `b [r, out]`.
A PEFT option jaxadapt does not implement raises an error naming it: never silently ignored.
"""
from __future__ import annotations

import json
import os
import re
from typing import Any, Mapping

import jax.numpy as jnp
import numpy as np
from safetensors.numpy import save_file

from jaxadapt.adapters.lora import LoraAdapter, LoraConfig
from jaxadapt.io.safetensors_mmap import SafetensorsFile

_PREFIX = "base_model.model."
_KEY = re.compile(r"^base_model\.model\.(?P<path>.+)\.(?P<kind>lora_A\.weight|lora_B\.weight|"
                  r"lora_magnitude_vector(?:\.weight)?)$")

# Options PEFT has that jaxadapt does not implement, each with the values that are harmless.
_UNSUPPORTED = {
    "fan_in_fan_out": (False, None),
    "bias": ("none", None),
    "modules_to_save": (None, [], ()),
    "layer_replication": (None, [], ()),
    "use_qalora": (False, None),
    "lora_bias": (False, None),
    "target_parameters": (None, [], ()),
    "trainable_token_indices": (None, [], {}, ()),
    "alora_invocation_tokens": (None, [], ()),
    "megatron_config": (None, {}),
    "use_bdlora": (None, False, {}),
    "arrow_config": (None, {}),
    "kasa_config": (None, {}),
    "velora_config": (None, {}),
    "monteclora_config": (None, {}),
}
# Initialisations that also rewrite the base weights: the adapter alone does not reproduce them.
_BASE_CHANGING_INITS = ("pissa", "olora", "loftq", "corda")


def _check_supported(cfg: Mapping[str, Any]) -> None:
  peft_type = cfg.get("peft_type", "LORA")
  if peft_type != "LORA":
    raise ValueError(f"adapter_config.json has peft_type={peft_type!r}; jaxadapt loads LORA only")
  for name, ok in _UNSUPPORTED.items():
    if name in cfg and cfg[name] not in ok:
      raise NotImplementedError(f"PEFT option {name}={cfg[name]!r} is not supported by jaxadapt "
                                f"(supported: {ok[0]!r})")
  init = cfg.get("init_lora_weights", True)
  if isinstance(init, str) and init.lower().startswith(_BASE_CHANGING_INITS):
    raise NotImplementedError(f"PEFT option init_lora_weights={init!r} changes the base weights; "
                              f"jaxadapt cannot apply it to a frozen base. Convert the adapter "
                              f"to plain LoRA in PEFT first (path_initial_model_for_weight_"
                              f"conversion).")
  if cfg.get("loftq_config"):
    raise NotImplementedError(f"PEFT option loftq_config={cfg['loftq_config']!r} is not supported")


def config_from_peft(cfg: Mapping[str, Any]) -> LoraConfig:
  _check_supported(cfg)
  return LoraConfig(
      r=int(cfg.get("r", 8)), lora_alpha=float(cfg.get("lora_alpha", 8)),
      target_modules=cfg.get("target_modules"), exclude_modules=cfg.get("exclude_modules"),
      layers_to_transform=cfg.get("layers_to_transform"), layers_pattern=cfg.get("layers_pattern"),
      rank_pattern=cfg.get("rank_pattern") or {}, alpha_pattern=cfg.get("alpha_pattern") or {},
      use_rslora=bool(cfg.get("use_rslora", False)), use_dora=bool(cfg.get("use_dora", False)),
      lora_dropout=float(cfg.get("lora_dropout", 0.0)),
      base_model_name_or_path=cfg.get("base_model_name_or_path"))


def config_to_peft(config: LoraConfig) -> dict:
  def thaw(v):
    return [thaw(x) for x in v] if isinstance(v, tuple) else v
  target = config.target_modules
  return {
      "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": config.r,
      "lora_alpha": config.lora_alpha,
      "target_modules": target if isinstance(target, str) else thaw(target),
      "exclude_modules": (config.exclude_modules if isinstance(config.exclude_modules, str)
                          else thaw(config.exclude_modules)),
      "layers_to_transform": thaw(config.layers_to_transform),
      "layers_pattern": thaw(config.layers_pattern),
      "rank_pattern": dict(config.rank_pattern), "alpha_pattern": dict(config.alpha_pattern),
      "use_rslora": config.use_rslora, "use_dora": config.use_dora,
      "lora_dropout": config.lora_dropout, "bias": "none", "fan_in_fan_out": False,
      "modules_to_save": None, "init_lora_weights": True, "inference_mode": True,
      "base_model_name_or_path": config.base_model_name_or_path,
  }


def load_adapter(directory: str, *, dtype="float32") -> LoraAdapter:
  """Loads a PEFT LoRA dir as a `LoraAdapter` (JAX layout)."""
  directory = os.fspath(directory)
  cfg_path = os.path.join(directory, "adapter_config.json")
  if not os.path.exists(cfg_path):
    raise FileNotFoundError(f"{directory}: no adapter_config.json (expected a PEFT adapter dir)")
  with open(cfg_path) as f:
    config = config_from_peft(json.load(f))
  st_path = os.path.join(directory, "adapter_model.safetensors")
  if not os.path.exists(st_path):
    raise FileNotFoundError(f"{directory}: no adapter_model.safetensors (pickled .bin adapters "
                            f"are not read; re-save with safe_serialization=True)")
  tensors = SafetensorsFile(st_path)
  weights: dict[str, dict] = {}
  for key in tensors:
    m = _KEY.match(key)
    if m is None:
      raise NotImplementedError(f"{st_path}: tensor {key!r} is not a LoRA A/B/magnitude of a "
                                f"linear layer (embedding or conv LoRA is not supported)")
    arr = np.asarray(tensors[key]).astype(jnp.dtype(dtype))
    kind = m["kind"]
    slot = weights.setdefault(m["path"], {})
    if kind == "lora_A.weight":
      slot["a"] = jnp.asarray(arr.T)
    elif kind == "lora_B.weight":
      slot["b"] = jnp.asarray(arr.T)
    else:
      slot["magnitude"] = jnp.asarray(arr)
  for path, w in weights.items():
    if "a" not in w or "b" not in w:
      raise ValueError(f"{st_path}: {path} has {sorted(w)}, expected both lora_A and lora_B")
    if ("magnitude" in w) != config.use_dora:
      raise ValueError(f"{st_path}: {path} magnitude vector present={('magnitude' in w)} but "
                       f"use_dora={config.use_dora}")
  return LoraAdapter(weights=weights, config=config)


def save_adapter(adapter: LoraAdapter, directory: str) -> None:
  """Writes `adapter` as a PEFT LoRA dir that `PeftModel.from_pretrained` loads."""
  directory = os.fspath(directory)
  os.makedirs(directory, exist_ok=True)
  tensors = {}
  for path, w in adapter.weights.items():
    def host(x):
      return np.ascontiguousarray(np.asarray(x, dtype=np.float32 if x.dtype == jnp.bfloat16
                                             else x.dtype))
    tensors[f"{_PREFIX}{path}.lora_A.weight"] = host(np.asarray(w["a"]).T)
    tensors[f"{_PREFIX}{path}.lora_B.weight"] = host(np.asarray(w["b"]).T)
    if "magnitude" in w:
      tensors[f"{_PREFIX}{path}.lora_magnitude_vector"] = host(w["magnitude"])
  save_file(tensors, os.path.join(directory, "adapter_model.safetensors"),
            metadata={"format": "pt"})
  with open(os.path.join(directory, "adapter_config.json"), "w") as f:
    json.dump(config_to_peft(adapter.config), f, indent=2)
