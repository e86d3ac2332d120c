"""S-LoRA tensor parallelism (Sheng et al., MLSys 2024, Sec. 6) for the serving engine.

The base is Megatron-sharded over the mesh axis `model` (Shoeybi et al., 2019): q/k/v and the
MLP's gate/up are column-parallel (each device computes its heads / its slice of the
intermediate), o and down are row-parallel (each device's partial sums are all-reduced), norms,
embeddings and the head are replicated. The KV pool is sharded by KV heads: each device's part
of a page holds `block` tokens of its own heads. Adapters follow S-LoRA's strategy, in the pool:

  * column-parallel layer: A split along the rank, B along the output. `x A_s` gives each
    device `[T, r / n]`; one all-gather of that small intermediate gives `[T, r]`, which expands
    into the device's output columns (S-LoRA Fig. 5, first matmul).
  * row-parallel layer: A split along the input like the base kernel, B along the output. `x_s
    A_s` is a partial sum: one all-reduce of `[T, r]`; the device's columns of `h B_s` are added
    into its partial base output before the base's own all-reduce, so the LoRA output needs no
    collective of its own (S-LoRA's fusion of the LoRA all-gather into the base all-reduce).

Per decoder layer that is the base's 2 all-reduces, plus one all-gather per adapted
column-parallel projection and one all-reduce per adapted row-parallel one, each of `[T, r]`
(`collectives` counts them in the lowered program; `tests/serve/test_tp.py` checks the counts).
The forward is the model's own code under `jax.shard_map`, built from a config with the local
head and intermediate counts; the projection hook adds the collectives (`Context.tp`).

```python
engine = serve.Engine(model, adapters=..., tensor_parallel=8)
```
"""
from __future__ import annotations

import collections
import dataclasses
import functools
import re

import jax
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxadapt import paths as paths_lib
from jaxadapt import sharding as sharding_lib
from jaxadapt.context import TensorParallel
from jaxadapt.models.frozen import apply
from kernels_pallas import attention as paged_attention
from serve.engine import sample_and_score

MODEL = sharding_lib.MODEL


@dataclasses.dataclass(frozen=True, eq=False)
class Plan:
  """What the engine needs to run one model tensor-parallel over `mesh`'s `model` axis.

  Attributes:
    mesh: the mesh (its `model` axis has `tp.size` devices).
    tp: the hook's `TensorParallel` (sharded column and row paths).
    graphdef: the model's graph with the local head and intermediate counts (one device's view).
    params: the base params placed on the mesh with `specs`.
    specs: PartitionSpec of every param (a tree like params).
    pool_sharding: the pool's pages, split on the page axis (each device its part of a page).
  """
  mesh: jax.sharding.Mesh
  tp: TensorParallel
  graphdef: nnx.GraphDef
  params: dict
  specs: dict
  pool_sharding: NamedSharding


def _spec(tp: TensorParallel, path: str, shape: tuple) -> P:
  module, _, leaf = path.rpartition(".")
  kind = tp.kind(module)
  if kind == "column" and leaf == "kernel":
    return P(None, MODEL)
  if kind == "column" and leaf == "bias":
    return P(MODEL)
  if kind == "row" and leaf == "kernel":
    return P(MODEL, None)
  return P()  # norms, embeddings, the head, row-parallel biases (added after the all-reduce)


def plan(model, size: int, devices=None) -> Plan:
  """The tensor-parallel `Plan` of `model` over `size` devices.

  Raises:
    ValueError: `size` does not divide the attention heads, the KV heads or the MLP's
      intermediate size (each device must hold whole heads), or there are too few devices.
  """
  if isinstance(size, bool) or not isinstance(size, int) or size < 1:
    raise ValueError(f"tensor_parallel must be an int >= 1, got {size!r}")
  c = model.config
  bad = [(name, v) for name, v in (("num_attention_heads", c.num_attention_heads),
                                   ("num_key_value_heads", c.num_key_value_heads),
                                   ("intermediate_size", c.intermediate_size)) if v % size]
  if bad:
    raise ValueError(f"tensor_parallel={size} must divide {bad[0][0]} ({bad[0][1]}): each "
                     f"device holds whole heads and an equal slice of the MLP")
  mesh = sharding_lib.make_mesh(model=size, devices=devices)
  linear = [p for p in model.linear_paths if p != "lm_head"]
  kinds = {p: sharding_lib.parallel_kind(p) for p in linear}
  tp = TensorParallel(axis=MODEL, size=size,
                      column=frozenset(p for p, k in kinds.items() if k == "column"),
                      row=frozenset(p for p, k in kinds.items() if k == "row"))
  local = dataclasses.replace(c, num_attention_heads=c.num_attention_heads // size,
                              num_key_value_heads=c.num_key_value_heads // size,
                              intermediate_size=c.intermediate_size // size)
  module_cls = type(nnx.merge(model.graphdef, nnx.State(model.params)))
  graphdef, _ = nnx.split(nnx.eval_shape(
      lambda: module_cls(local, dtype=model.dtype, rngs=nnx.Rngs(0))))
  specs = paths_lib.map_with_paths(lambda p, x: _spec(tp, p, x.shape), model.params)
  params = jax.tree.map(lambda x, s: jax.device_put(x, NamedSharding(mesh, s)), model.params,
                        specs)
  return Plan(mesh=mesh, tp=tp, graphdef=graphdef, params=params, specs=specs,
              pool_sharding=NamedSharding(mesh, P(None, MODEL)))


def _replicated(tree):
  return jax.tree.map(lambda _: P(), tree)


def _forward(plan_: Plan, sampling: bool, params, pages, ctx, ids, positions, select, samp):
  """`serve.engine._engine_forward` under shard_map: the packed forward of one step on every
  device (its heads, its KV part of the pages, its adapter parts), then sampling on the
  replicated logits."""
  tp, writes = plan_.tp, paged_attention.writes_in_forward()

  def body(params, pages, ctx, ids, positions, select):
    ctx = dataclasses.replace(ctx.with_pages(pages), tp=tp)
    logits, pages, new_kv = apply(plan_.graphdef, params, "packed_logits", ids, positions,
                                  select, ctx=ctx)
    return logits, (pages if writes else None), new_kv

  kv_spec = P(None, None, MODEL, None)  # [layers, T, kv heads, head_dim]
  out_specs = (P(), P(None, MODEL) if writes else None,
               None if writes else (kv_spec, kv_spec))
  sharded = jax.shard_map(
      body, mesh=plan_.mesh,
      in_specs=(plan_.specs, P(None, MODEL), _replicated(ctx), P(), P(), P()),
      out_specs=out_specs, check_vma=False)
  logits, pages, new_kv = sharded(params, pages, ctx, ids, positions, select)
  tokens, logprobs = sample_and_score(logits, samp, sampling)
  return pages, new_kv, tokens, logprobs


forward = jax.jit(_forward, static_argnums=(0, 1))
forward_donated = jax.jit(_forward, static_argnums=(0, 1), donate_argnums=(3,))


@functools.partial(jax.jit, static_argnums=(0, 1), donate_argnums=(2,))
def write_kv(plan_: Plan, shape, pages, new_kv, tables, seq, pos, valid):
  """The step's keys/values written into each device's part of the pages (in place: the only
  op on the donated pool). `shape` is one device's view of the pages."""
  def body(pages, k, v, tables, seq, pos, valid):
    kv_pages = paged_attention.write_layers(pages.reshape(shape), k, v, tables, seq, pos, valid)
    return kv_pages.reshape(pages.shape)
  kv_spec = P(None, None, MODEL, None)
  return jax.shard_map(body, mesh=plan_.mesh,
                       in_specs=(P(None, MODEL), kv_spec, kv_spec, P(), P(), P(), P()),
                       out_specs=P(None, MODEL), check_vma=False)(
                           pages, new_kv[0], new_kv[1], tables, seq, pos, valid)


def collectives(lowered_text: str) -> collections.Counter:
  """Collective ops in a lowered (StableHLO) program's text, by kind: the program as written,
  before XLA combines any."""
  return collections.Counter(m.group(1) for m in re.finditer(
      r"stablehlo\.(all_gather|all_reduce|reduce_scatter|all_to_all|collective_permute)",
      lowered_text))
