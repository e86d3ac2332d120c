"""Meshes and partition rules for frozen base params and adapters.

Tensor parallelism follows Megatron-LM (Shoeybi et al., 2019) as S-LoRA Sec. 6 extends it to
adapters: column-parallel projections (q, k, v, gate, up, lm_head; diffusers' to_q/k/v and the
first feed-forward layer) split their output dim over the `model` axis, row-parallel ones (o,
down; to_out.0 and the second feed-forward layer) their input dim. A LoRA pair follows its base:
column-parallel -> `A` replicated, `B` split on out; row-parallel -> `A` split on in, `B`
replicated. DiT's adaLN-Zero modulation (`norm1.linear`, a third of DiT-XL's weights) is split on
its output as well.

A dim that the `model` axis size does not divide stays replicated: `jax.device_put` needs equal
shards, and a replicated copy computes the same values (it only costs memory on each device). The
base kernel and its adapter leaves see the same dim, so both fall back together. Everything else
(norms, convolutions, embeddings of diffusion models, time-embedding and `proj_in`/`proj_out`
layers, which feed norms or residual paths that need every channel) is replicated.
"""
from __future__ import annotations

from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxadapt import paths

DATA, MODEL = "data", "model"
# Module-path suffixes (Llama/Mistral/Qwen2, CLIP, diffusers' attention and feed-forward, DiT adaLN).
COLUMN_PARALLEL = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "lm_head", "fc1",
                   "to_q", "to_k", "to_v", "ff.net.0.proj", "norm1.linear")
ROW_PARALLEL = ("o_proj", "down_proj", "out_proj", "fc2", "to_out.0", "ff.net.2")


def parallel_kind(module_path: str) -> str | None:
  """"column", "row" or None for the linear layer at `module_path` (matched by suffix)."""
  def has(suffixes):
    return any(module_path == s or module_path.endswith("." + s) for s in suffixes)
  if has(COLUMN_PARALLEL):
    return "column"
  if has(ROW_PARALLEL):
    return "row"
  return None


def make_mesh(data: int = 1, model: int = 1, devices: Sequence | None = None) -> Mesh:
  """A (data, model) mesh with Auto axes over the first `data * model` devices.

  Args:
    data: size of the data-parallel axis (a positive int).
    model: size of the tensor-parallel axis (a positive int).
    devices: the devices to use, in order; default `jax.devices()`. Fewer than all of them may be
      used (e.g. data=3 of 8): the mesh takes the first `data * model`.

  Raises:
    TypeError: `data` or `model` is not an int.
    ValueError: a size below 1, or more devices asked for than there are.
  """
  for name, size in (("data", data), ("model", model)):
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)):
      raise TypeError(f"make_mesh: {name} must be an int (the axis size), got "
                      f"{type(size).__name__} {size!r}")
    if size < 1:
      raise ValueError(f"make_mesh: {name} must be >= 1 (the axis size), got {size}")
  data, model = int(data), int(model)
  devices = list(jax.devices() if devices is None else devices)
  if data * model > len(devices):
    raise ValueError(f"make_mesh: data={data} x model={model} needs {data * model} devices, "
                     f"found {len(devices)}")
  grid = np.array(devices[:data * model]).reshape(data, model)
  return Mesh(grid, (DATA, MODEL), axis_types=(jax.sharding.AxisType.Auto,) * 2)


def _axis(mesh: Mesh, dim: int) -> str | None:
  size = mesh.shape.get(MODEL, 1)
  return MODEL if size > 1 and dim % size == 0 else None


def param_spec(mesh: Mesh, path: str, shape: tuple) -> P:
  """PartitionSpec of a base parameter at dotted `path` (e.g. `...q_proj.kernel`)."""
  module, _, leaf = path.rpartition(".")
  kind = parallel_kind(module)
  if len(shape) == 2 and kind == "column" and leaf == "kernel":
    return P(None, _axis(mesh, shape[1]))
  if len(shape) == 1 and kind == "column" and leaf == "bias":
    return P(_axis(mesh, shape[0]))
  if len(shape) == 2 and kind == "row" and leaf == "kernel":
    return P(_axis(mesh, shape[0]), None)
  if module.endswith("embed_tokens") and len(shape) == 2:
    return P(None, _axis(mesh, shape[1]))
  return P()


def param_sharding(mesh: Mesh, path: str, shape: tuple) -> NamedSharding:
  return NamedSharding(mesh, param_spec(mesh, path, shape))


def adapter_spec(mesh: Mesh, path: str, leaf: str, shape: tuple) -> P:
  """PartitionSpec of an adapter leaf (`a`, `b` or `magnitude`) for the projection at `path`."""
  kind = parallel_kind(path)
  if kind == "column":
    if leaf == "b":
      return P(None, _axis(mesh, shape[1]))
    if leaf == "magnitude":
      return P(_axis(mesh, shape[0]))
  if kind == "row" and leaf == "a":
    return P(_axis(mesh, shape[0]), None)
  return P()


def shard_params(params, mesh: Mesh):
  """Places a pure-dict base tree on `mesh` with `param_spec`."""
  def place(path, x):
    return jax.device_put(x, param_sharding(mesh, path, x.shape))
  return paths.map_with_paths(place, params)


def shard_adapter_weights(weights, mesh: Mesh):
  """Places adapter weights `{path: {leaf: array}}` on `mesh` with `adapter_spec`."""
  return {p: {leaf: jax.device_put(x, NamedSharding(mesh, adapter_spec(mesh, p, leaf, x.shape)))
              for leaf, x in w.items()} for p, w in weights.items()}
