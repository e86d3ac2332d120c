"""PEFT LoRA dirs (`adapter_config.json` + `adapter_model.safetensors`) in and out; diffusers'
LoRA files (`pytorch_lora_weights.safetensors`) in.

PEFT stores torch layout, `lora_A.weight [r, in]`, `lora_B.weight [out, r]`, under keys
`base_model.model.<module path>.lora_A.weight`; jaxadapt keeps `a [in, r]`, `b [r, out]`.
A PEFT option jaxadapt does not implement raises an error naming it: never silently ignored.
"""
from __future__ import annotations

import collections
import dataclasses
import json
import os
import re
from typing import Any, Mapping

import jax.numpy as jnp
import numpy as np
from safetensors.numpy import save_file

from jaxadapt.adapters import targets as targets_lib
from jaxadapt.adapters.embedding import SavedBase
from jaxadapt.adapters.lora import LoraAdapter, LoraConfig
from jaxadapt.io.files import float_dtype, read_json_object
from jaxadapt.io.safetensors_mmap import SafetensorsFile

_PREFIX = "base_model.model."
_KEY = re.compile(r"^(?P<path>.+)\.(?P<kind>lora_A\.weight|lora_B\.weight|"
                  r"lora_embedding_A|lora_embedding_B|lora_magnitude_vector(?:\.weight)?)$")
# A base layer's full weight, saved beside its LoRA (PEFT's save_embedding_layers: the
# `base_layer` of a wrapped embedding / head, or an embedding saved because it was resized).
_BASE_KEY = re.compile(r"^(?P<path>.+?)(?:\.base_layer)?\.weight$")
DIFFUSERS_LORA_FILE = "pytorch_lora_weights.safetensors"

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
    "monteclora_config": (None, {}),
}
# Training-only options whose forward is plain LoRA: accepted, and the tensors they save (none
# of them read by the forward) are skipped. VeLoRA (Miles et al., 2024) compresses the LoRA A
# input activations for the backward pass; in eval PEFT's forward is `x + s * B A x`.
_TRAINING_ONLY = {"velora_config": ("lora_velora_embed",)}
# Initialisations that also rewrite the base weights: the adapter alone does not reproduce them.
_BASE_CHANGING_INITS = ("pissa", "olora", "loftq", "corda", "lora_ga")


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


def _unexpected(key: str) -> str:
  """What a tensor that is not a linear layer's LoRA A/B/magnitude most likely is."""
  if "lora_down" in key or "lora_up" in key or "lora.down" in key or "lora.up" in key:
    return ("a LoRA in the kohya / old diffusers format, which jaxadapt does not read; convert "
            "it to PEFT or diffusers' current format first")
  if re.search(r"\.lora_[AB]\.(?!weight$)", key):
    return ("a LoRA tensor named in an unexpected way (an adapter name in the key, or a LoRA "
            "bias, lora_bias=True); expected keys end in lora_A.weight / lora_B.weight")
  if key.endswith(".bias"):
    return "a bias (PEFT's bias='all' / 'lora_only'), which jaxadapt does not support"
  return "a tensor that is neither a LoRA factor nor a layer's weight"


def _read_weights(tensors, keys, prefix: str, st_path: str, dtype, host: bool = False) -> dict:
  """{path: {"a", "b"[, "magnitude"]}} in JAX layout from LoRA tensors named `prefix<path>...`
  (numpy arrays in host memory with `host=True`, else jax arrays).

  Raises:
    NotImplementedError: a tensor is not a linear layer's LoRA A/B/magnitude (named, with what
      it most likely is).
    ValueError: no LoRA tensors, a path without both A and B, or shapes that do not fit
      together (A [r, in], B [out, r], magnitude [out]).
  """
  weights: dict[str, dict] = {}
  for key in keys:
    m = _KEY.match(key[len(prefix):]) if key.startswith(prefix) else None
    if m is None:
      raise NotImplementedError(f"{st_path}: tensor {key!r} is not the LoRA A/B/magnitude of a "
                                f"linear layer (keys like {prefix}<module path>.lora_A.weight); "
                                f"it looks like {_unexpected(key)}")
    shape = tensors.info(key)[1] if hasattr(tensors, "info") else np.shape(tensors[key])
    ndim = 1 if m["kind"].startswith("lora_magnitude") else 2
    if len(shape) != ndim:
      raise NotImplementedError(
          f"{st_path}: tensor {key!r} has shape {list(shape)}, expected {ndim} dims (a "
          f"{'magnitude [out]' if ndim == 1 else 'linear LoRA factor'}); LoRA on a conv layer "
          f"is not supported")
    arr = np.asarray(tensors[key]).astype(jnp.dtype(dtype))
    put = np.ascontiguousarray if host else jnp.asarray
    slot = weights.setdefault(m["path"], {})
    if m["kind"] in ("lora_A.weight", "lora_embedding_A"):  # [r, in] / [r, vocab]
      slot["a"] = put(arr.T)
    elif m["kind"] in ("lora_B.weight", "lora_embedding_B"):  # [out, r] / [dim, r]
      slot["b"] = put(arr.T)
    else:
      slot["magnitude"] = put(arr)
  if not weights:
    raise ValueError(f"{st_path} holds no LoRA tensors (expected keys like "
                     f"{prefix}<module path>.lora_A.weight / .lora_B.weight)")
  for path, w in weights.items():
    if "a" not in w or "b" not in w:
      raise ValueError(f"{st_path}: {path} has {sorted(w)}, expected both lora_A and lora_B")
    (din, r), (rb, dout) = w["a"].shape, w["b"].shape
    mag = w.get("magnitude")
    if r != rb or (mag is not None and mag.shape != (dout,)):
      raise ValueError(
          f"{st_path}: the LoRA tensors of {path} do not fit together: expected lora_A "
          f"[r, in], lora_B [out, r]{', magnitude [out]' if mag is not None else ''} with one r; "
          f"found lora_A {[r, din]}, lora_B {[dout, rb]}"
          f"{f', magnitude {list(mag.shape)}' if mag is not None else ''}. The file is corrupt or "
          f"was not written by PEFT")
  return weights


def _check_ranks(weights: dict, config: LoraConfig, source: str) -> None:
  """Raises if a tensor's rank is not the one the config gives its path (PEFT refuses too)."""
  for path, w in weights.items():
    want, found = config.rank(path), int(w["a"].shape[1])
    if want != found:
      raise ValueError(f"{source}: the config gives {path} rank {want} (r / rank_pattern) but its "
                       f"tensors have rank {found}; the config and the weights do not belong "
                       f"together (PEFT refuses this adapter too)")


def _check_dora(weights: dict, config: LoraConfig, st_path: str) -> None:
  for path, w in weights.items():
    if ("magnitude" in w) != config.use_dora:
      raise ValueError(f"{st_path}: {path} magnitude vector present={('magnitude' in w)} but "
                       f"use_dora={config.use_dora}")


def load_adapter(path: str, *, dtype="float32", component: str | None = None,
                 host: bool = False) -> LoraAdapter:
  """Loads a LoRA adapter in JAX layout.

  Two formats:
    * a PEFT dir (`adapter_config.json` + `adapter_model.safetensors`);
    * diffusers' LoRA file (`pytorch_lora_weights.safetensors`, or its dir), as
      `save_lora_weights` writes it: keys `<component>.<module path>.lora_A.weight`; the LoRA
      config comes from its `lora_adapter_metadata`, or, without one, as diffusers infers it:
      ranks from the shapes and alpha = rank (scale 1) for every module.

  Args:
    path: the PEFT dir, a diffusers LoRA file or the dir that holds one; or
      `"default:<task>"` / `"default-v2:<task>"`, a task adapter of an embedded model
      (`jaxadapt.default`).
    dtype: floating dtype of the loaded weights.
    component: for diffusers files, which model's LoRA to read ("unet", "transformer",
      "text_encoder", ...); needed only when the file holds several.
    host: keep the weights as numpy arrays in host memory (the serving store), not on a device.
  """
  float_dtype(dtype)
  path = os.fspath(path)
  from jaxadapt import default
  path = default.resolve_adapter(path) or path  # "default:<task>": an embedded model's adapter
  if os.path.isfile(path) and os.path.basename(path) == "adapter_model.safetensors":
    path = os.path.dirname(path) or "."  # a PEFT dir's weights: its config is beside them
    if not os.path.exists(os.path.join(path, "adapter_config.json")):
      raise FileNotFoundError(f"{path}: adapter_model.safetensors without adapter_config.json "
                              f"beside it; a PEFT adapter needs both")
  if os.path.isdir(path) and os.path.exists(os.path.join(path, "adapter_config.json")):
    return _load_peft_dir(path, dtype, host)
  st_path = path if path.endswith(".safetensors") else os.path.join(path, DIFFUSERS_LORA_FILE)
  if not os.path.exists(st_path):
    found = sorted(os.listdir(path)) if os.path.isdir(path) else "no such file or directory"
    raise FileNotFoundError(f"{path}: expected a PEFT adapter dir (adapter_config.json + "
                            f"adapter_model.safetensors) or a diffusers LoRA file "
                            f"({DIFFUSERS_LORA_FILE}); found {found}")
  return _load_diffusers_file(st_path, dtype, component, host)


def read_peft_config(directory: str) -> LoraConfig:
  """The `LoraConfig` of a PEFT adapter dir's `adapter_config.json`.

  Raises:
    ValueError, TypeError: the file is not a JSON object, or holds a config jaxadapt refuses
      (the message names the file and the option).
  """
  return _read_peft_config(directory)[0]


def _read_peft_config(directory: str) -> tuple[LoraConfig, dict]:
  """(the `LoraConfig`, the parsed JSON) of a PEFT dir's `adapter_config.json`."""
  cfg_path = os.path.join(directory, "adapter_config.json")
  cfg = read_json_object(cfg_path, "PEFT's adapter config (r, lora_alpha, target_modules, ...)")
  try:
    return config_from_peft(cfg), cfg
  except (TypeError, ValueError) as e:
    raise type(e)(f"{cfg_path}: {e}") from None


def _load_peft_dir(directory: str, dtype, host: bool = False) -> LoraAdapter:
  config, cfg = _read_peft_config(directory)
  # Tensors of training-only options (read by no forward).
  skip = tuple(f".{suffix}" for name, suffixes in _TRAINING_ONLY.items() if cfg.get(name)
               for suffix in suffixes)
  st_path = os.path.join(directory, "adapter_model.safetensors")
  if not os.path.exists(st_path):
    bins = [f for f in ("adapter_model.bin", "adapter_model.pt")
            if os.path.exists(os.path.join(directory, f))]
    raise FileNotFoundError(
        f"{directory}: no adapter_model.safetensors (found {sorted(os.listdir(directory))}). "
        + (f"{bins[0]} is a torch pickle, which jaxadapt does not read (it never runs torch); "
           if bins else "")
        + "re-save the adapter with PEFT's save_pretrained(..., safe_serialization=True)")
  tensors = SafetensorsFile(st_path)
  keys = [k for k in tensors if not (skip and k.endswith(skip))]
  saved = _saved_base(tensors, keys, st_path)
  keys = [k for k in keys if k not in saved]
  weights = _read_weights(tensors, keys, _PREFIX, st_path, dtype, host)
  embeddings = tuple(sorted({_KEY.match(k[len(_PREFIX):])["path"] for k in keys
                             if ".lora_embedding_" in k}))
  if cfg.get("ensure_weight_tying"):
    config = _with_tied_targets(config, weights)
  _check_dora(weights, config, st_path)
  _check_ranks(weights, config, directory)
  # `tensors[...]` are memory-mapped views: nothing is read until a model checks them.
  base = SavedBase({p: tensors[k] for k, p in saved.items()}, st_path) if saved else None
  return LoraAdapter(weights=weights, config=config, embedding_paths=embeddings,
                     saved_base=base)


def _with_tied_targets(config: LoraConfig, weights: Mapping) -> LoraConfig:
  """The config with the tied layers' paths added to its targets. With `ensure_weight_tying`
  PEFT drops a tied head (lm_head) from the saved `target_modules` and gives it the LoRA of the
  layer it is tied to (embed_tokens; its A is the embedding's B), saved as its own tensors."""
  kwargs = dict(layers_to_transform=config.layers_to_transform,
                layers_pattern=config.layers_pattern, exclude_modules=config.exclude_modules)
  tm = config.target_modules
  tied = [p for p in weights if not targets_lib.is_targeted(
      p, tm if not targets_lib.is_all_linear(tm) else (), **kwargs)]
  if not tied or targets_lib.is_all_linear(tm):
    return config
  if isinstance(tm, str):
    tm = "|".join([f"(?:{tm})"] + [re.escape(p) for p in tied])
  else:
    tm = tuple(tm) + tuple(tied)
  return dataclasses.replace(config, target_modules=tm)


def _saved_base(tensors, keys, st_path: str) -> dict:
  """{key: module path} of the base layers' full weights saved beside their LoRA (PEFT's
  `save_embedding_layers`, on by default for LoRA on embed_tokens / lm_head)."""
  out = {}
  for key in keys:
    rest = key[len(_PREFIX):] if key.startswith(_PREFIX) else None
    m = None if rest is None or _KEY.match(rest) else _BASE_KEY.match(rest)
    if m is None or ".lora_" in rest:
      continue
    if len(tensors.info(key)[1]) != 2:
      raise NotImplementedError(f"{st_path}: tensor {key!r} is a saved base weight that is not a "
                                f"2-D embedding or linear weight; jaxadapt does not read it")
    out[key] = m["path"]
  return out


def _load_diffusers_file(st_path: str, dtype, component, host: bool = False) -> LoraAdapter:
  tensors = SafetensorsFile(st_path)
  kohya = [k for k in tensors if k.startswith(("lora_unet_", "lora_te")) or ".lora_down." in k]
  if kohya:
    raise NotImplementedError(f"{st_path} is a kohya / A1111-style LoRA (e.g. {kohya[0]!r}), "
                              f"which jaxadapt does not read; convert it to diffusers' format "
                              f"first (load it in diffusers and save_lora_weights)")
  if any(k.startswith(_PREFIX) for k in tensors):
    raise ValueError(f"{st_path} holds a PEFT adapter's weights ({_PREFIX}... keys); pass the "
                     f"PEFT dir that holds it with its adapter_config.json instead")
  components = sorted({key.split(".", 1)[0] for key in tensors})
  if not components:
    raise ValueError(f"{st_path} holds no tensors; expected LoRA weights named "
                     f"<component>.<module path>.lora_A.weight")
  if component is None:
    if len(components) != 1:
      raise ValueError(f"{st_path} holds LoRAs for {components}; pass component= one of them")
    component = components[0]
  if component not in components:
    raise ValueError(f"{st_path} has no LoRA for component {component!r}; it has {components}")
  prefix = component + "."
  keys = [k for k in tensors if k.startswith(prefix)]
  weights = _read_weights(tensors, keys, prefix, st_path, dtype, host)
  meta = tensors.metadata.get("lora_adapter_metadata")
  if meta:
    cfg = {k[len(prefix):]: v for k, v in json.loads(meta).items() if k.startswith(prefix)}
    config = config_from_peft(cfg)
    _check_ranks(weights, config, f"{st_path} (lora_adapter_metadata)")
  else:  # diffusers' inference: scale 1 everywhere (alpha = rank per module)
    ranks = {p: int(w["a"].shape[1]) for p, w in weights.items()}
    r = collections.Counter(ranks.values()).most_common(1)[0][0]
    odd = {re.escape(p): k for p, k in ranks.items() if k != r}
    config = LoraConfig(r=r, lora_alpha=float(r), target_modules=tuple(sorted(weights)),
                        rank_pattern=odd, alpha_pattern={p: float(k) for p, k in odd.items()},
                        use_dora=any("magnitude" in w for w in weights.values()))
  _check_dora(weights, config, st_path)
  return LoraAdapter(weights=weights, config=config)


def save_adapter(adapter: LoraAdapter, directory: str) -> None:
  """Writes `adapter` as a PEFT LoRA dir that `PeftModel.from_pretrained` loads.

  An existing dir is updated in place: each file is written beside its target and then renamed
  over it, so a failed save leaves the previous files whole.

  Raises:
    TypeError: `adapter` is not a `LoraAdapter`.
    FileExistsError: `directory` is an existing file.
  """
  if not isinstance(adapter, LoraAdapter):
    raise TypeError(f"save_adapter expects a LoraAdapter, got {type(adapter).__name__}")
  directory = os.fspath(directory)
  if os.path.exists(directory) and not os.path.isdir(directory):
    raise FileExistsError(f"{directory} is a file; save_adapter writes a dir (adapter_config.json "
                          f"+ adapter_model.safetensors). Pass a dir path.")
  tensors = {}
  for path, w in adapter.weights.items():
    def host(x):
      return np.ascontiguousarray(np.asarray(x, dtype=np.float32 if x.dtype == jnp.bfloat16
                                             else x.dtype))
    a_key, b_key = (("lora_embedding_A", "lora_embedding_B") if path in adapter.embedding_paths
                    else ("lora_A.weight", "lora_B.weight"))
    tensors[f"{_PREFIX}{path}.{a_key}"] = host(np.asarray(w["a"]).T)
    tensors[f"{_PREFIX}{path}.{b_key}"] = host(np.asarray(w["b"]).T)
    if "magnitude" in w:
      tensors[f"{_PREFIX}{path}.lora_magnitude_vector"] = host(w["magnitude"])
  config = adapter.config
  # jaxadapt scales by each tensor's own rank; PEFT builds (and scales) every layer with the rank
  # its config gives. Paths whose tensors have another rank get an exact rank_pattern entry, first
  # so that it wins (PEFT takes the first matching key).
  odd = {re.escape(p): adapter.rank(p) for p in adapter.weights
         if adapter.rank(p) != config.rank(p)}
  if odd:
    config = dataclasses.replace(config, rank_pattern=tuple(odd.items()) + config.rank_pattern)
  config_text = json.dumps(config_to_peft(config), indent=2)
  os.makedirs(directory, exist_ok=True)
  st_path = os.path.join(directory, "adapter_model.safetensors")
  cfg_path = os.path.join(directory, "adapter_config.json")
  try:
    save_file(tensors, st_path + ".tmp", metadata={"format": "pt"})
    umask = os.umask(0)
    os.umask(umask)  # safetensors creates the file 0600: give it the mode open() would
    os.chmod(st_path + ".tmp", 0o666 & ~umask)
    with open(cfg_path + ".tmp", "w") as f:
      f.write(config_text)
    os.replace(st_path + ".tmp", st_path)
    os.replace(cfg_path + ".tmp", cfg_path)
  finally:
    for tmp in (st_path + ".tmp", cfg_path + ".tmp"):
      if os.path.exists(tmp):
        os.remove(tmp)
