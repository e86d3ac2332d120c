"""Hugging Face model dirs (config.json + safetensors, sharded index too) into NNX params.

Tensors are memory-mapped and each is placed on its sharding as it loads, so a model larger than
host memory can stream onto a mesh. Generic over model families: each family's loader (beside its
model in `jaxadapt.models`) passes its own name map, e.g. HF `...q_proj.weight [out, in]` is the
NNX `...q_proj.kernel [in, out]`. This package never imports `jaxadapt.models`.
"""
from __future__ import annotations

import os
from typing import Callable, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, Sharding

from jaxadapt import paths
from jaxadapt import sharding as sharding_lib
from jaxadapt.io.files import read_json_object
from jaxadapt.io.safetensors_mmap import CheckpointDir

ShardingArg = Union[None, Sharding, Mesh, Callable[[str, tuple], Sharding]]


def read_config(directory: str) -> dict:
  """The parsed `config.json` of a model dir.

  Raises:
    FileNotFoundError: no such dir, or it has no config.json (naming what it has).
    ValueError: config.json is not a JSON object.
  """
  directory = os.fspath(directory)
  if not os.path.isdir(directory):
    what = "a file" if os.path.exists(directory) else "no such directory"
    raise FileNotFoundError(f"{directory}: expected a Hugging Face model dir (config.json + "
                            f"safetensors), found {what}")
  path = os.path.join(directory, "config.json")
  if not os.path.exists(path):
    raise FileNotFoundError(f"{directory}: no config.json (expected a Hugging Face model dir); "
                            f"found {sorted(os.listdir(directory))}")
  cfg = read_json_object(path, "the model's config (model_type, hidden_size, ...)")
  return cfg


def _resolve_sharding(sharding: ShardingArg) -> Callable[[str, tuple], Optional[Sharding]]:
  if sharding is None:
    return lambda path, shape: None
  if isinstance(sharding, Mesh):
    return lambda path, shape: sharding_lib.param_sharding(sharding, path, shape)
  if isinstance(sharding, Sharding):
    return lambda path, shape: sharding
  if callable(sharding):
    return sharding
  raise TypeError(f"sharding must be None, a Sharding, a Mesh or a callable(path, shape); got "
                  f"{type(sharding).__name__}")


def load_tree(directory: str, shapes, name_fn: Callable[[str], tuple[str, Optional[Callable]]],
              *, dtype=jnp.float32, sharding: ShardingArg = None, stem: str = "model"):
  """Fills a pure-dict tree of abstract leaves from the safetensors of a model dir.

  Args:
    directory: dir with `{stem}.safetensors` or `{stem}.safetensors.index.json`.
    shapes: pure dict of leaves with `.shape` (e.g. `nnx.to_pure_dict` of an eval_shape state).
    name_fn: dotted param path -> (checkpoint tensor name, layout transform or None), e.g.
      `lambda a: a.T` for a linear kernel, a transpose to HWIO for a conv kernel.
    dtype: dtype of the loaded params.
    sharding: None, a Sharding, a Mesh (jaxadapt.sharding rules) or callable(path, shape).
    stem: file stem (`model` for transformers, `diffusion_pytorch_model` for diffusers).

  Returns:
    The tree with each tensor read (memory-mapped) and placed on its sharding.
  """
  ckpt = CheckpointDir(directory, stem)
  place = _resolve_sharding(sharding)

  def load(path, leaf):
    name, transform = name_fn(path)
    if name not in ckpt:
      raise KeyError(f"{directory}: checkpoint has no tensor {name!r} (needed for {path}); "
                     f"it has e.g. {sorted(ckpt)[:5]}")
    arr = ckpt[name]
    arr = transform(arr) if transform is not None else arr
    if tuple(arr.shape) != tuple(leaf.shape):
      raise ValueError(f"{directory}: tensor {name!r} has shape {tuple(arr.shape)} after layout "
                       f"conversion, the config implies {tuple(leaf.shape)}")
    host = np.asarray(arr).astype(jnp.dtype(dtype))
    target = place(path, host.shape)
    return jax.device_put(host, target) if target is not None else jnp.asarray(host)

  return paths.map_with_paths(load, shapes)


def torch_to_jax_layout(a):
  """A torch weight in jaxadapt's layout: linear `[out, in]` -> `[in, out]`, conv OIHW -> HWIO."""
  if a.ndim == 2:
    return a.T
  if a.ndim == 4:
    return a.transpose(2, 3, 1, 0)
  raise ValueError(f"expected a 2-D linear or 4-D conv weight, got shape {tuple(a.shape)}")


def torch_name(path: str):
  """Dotted NNX param path -> (torch checkpoint name, layout transform or None).

  `...kernel` (Linear or Conv2d) is torch's `...weight`, transposed to jaxadapt's layout;
  `...embedding` is an `nn.Embedding`'s `...weight`; norms keep torch's `weight`/`bias` names.
  Use as the `name_fn` of `load_tree` (every family: Llama, UNet, DiT, VAE, CLIP).
  """
  stem, leaf = path.rsplit(".", 1)
  if leaf == "kernel":
    return f"{stem}.weight", torch_to_jax_layout
  if leaf == "embedding":
    return f"{stem}.weight", None
  return path, None
