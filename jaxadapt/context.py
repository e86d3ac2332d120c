"""The forward context: the one pytree every jaxadapt model is called with.

A model forward is `params` (frozen) plus a `Context` that says, for this step:
  * `routing`: which adapter each row uses, built into the kernels' plan once per forward
    (`Context.prepare`), with the layout an explicit field:
      "sequence"  one adapter id per batch row (x [B, ..., in]; the rows are S-LoRA's SGMV
                  segments, Sec. 5.1),
      "token"     one adapter id per token of the flattened batch (BGMV; the engine's layout),
      "topk"      K adapter ids and gate weights per token (MeteoRA Eq. 3-4, given).
  * `weights`: per projection path, a weight view: `SingleLoRA` (one adapter), `Stack` (N
    adapters as a dense stack, or per-path `kernels_pallas.PagedWeights`), or `PoolView` (N
    adapters in pages of the context's one unified `pool` leaf, S-LoRA Sec. 4.1).
  * `routers`: per path, a MeteoRA gate evaluated inside the projection hook from that layer's
    own input (`Router`; MeteoRA Eq. 3-4).
  * `inserts` / `insert_inputs`: modules at named insertion points (AGD, FACT) and their inputs
    (a guidance scale, face tokens and mask), traced, never constants.
  * `attention`: the attention state: a dense `KVCache` (the Llama family reads and returns
    it); paged KV for the serving engine.

The projection hook (`jaxadapt.adapters.hook.project`) is the only reader of `weights`,
`routing` and `routers`. Everything here is a pytree: a context passes through `jit`, `grad` and
`shard_map` as an argument, and static choices (layout, adapter count, pool geometry) are part
of its tree structure. A pooled context is O(1) leaves whatever the number of paths: the pool,
one table array, one scale and one rank array (`AdapterPool`).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np

import kernels_pallas


def _pytree(meta=()):
  def wrap(cls):
    cls = dataclasses.dataclass(frozen=True)(cls)
    fields = [f.name for f in dataclasses.fields(cls)]
    return jax.tree_util.register_dataclass(
        cls, data_fields=[f for f in fields if f not in meta], meta_fields=list(meta))
  return wrap


# -- Per-path weight views --------------------------------------------------------------------

@_pytree(meta=("dropout",))
class SingleLoRA:
  """One LoRA adapter on one projection: `y = x W + b + scale * (drop(x) A) B`.

  DoRA (Liu et al., 2024, Eq. 5) when `magnitude` is set: the adapted weight is
  `m * (W + scale*A B) / ||W + scale*A B||_c`, the column norm held constant in gradients.
  """
  a: jax.Array                      # [in, r]
  b: jax.Array                      # [r, out]
  scale: jax.Array                  # [] alpha / r (or alpha / sqrt(r) with rsLoRA)
  magnitude: Optional[jax.Array] = None  # [out] DoRA magnitude, or None
  dropout_key: Optional[jax.Array] = None  # PRNG key when dropout is active (training)
  dropout: float = 0.0


@_pytree(meta=("rank_bound",))
class Stack:
  """N adapters on one projection, indexed by the context's routing.

  `a` and `b` are dense stacks (ranks zero-padded to the largest) or per-path
  `kernels_pallas.PagedWeights`. `ranks[n]` is adapter n's true rank, so the kernels skip the
  padding. `dora_scale[n]` is DoRA's `m / ||W + s A B||_c` per output column (ones for plain
  LoRA), or None when no adapter in the stack uses DoRA.
  """
  a: Any                            # [N, in, r_max] or PagedWeights
  b: Any                            # [N, r_max, out] or PagedWeights
  scale: jax.Array                  # [N]
  ranks: Optional[jax.Array] = None       # [N] int32, or None (all r_max)
  dora_scale: Optional[jax.Array] = None  # [N, out]
  rank_bound: int = 0                     # static: every live rank <= it (0: unknown)

  @property
  def num_adapters(self) -> int:
    return self.scale.shape[0]


@_pytree(meta=("slot", "din", "dout", "pages_a", "pages_b", "rank"))
class PoolView:
  """A path's adapters in the context's unified pool (`Context.pool`): static geometry only.

  The pool's pages are `page_size` elements each; on this path a page holds
  `page_size // din` rank rows of A^T (or `page_size // dout` rows of B), so any feature size
  that divides the page size shares the one pool (GQA's narrow k/v, the MLP's wide layers).
  Adapter n's A pages are `pool.tables[slot, 0, n, :pages_a]`, its B pages
  `pool.tables[slot, 1, n, :pages_b]`.
  """
  slot: int
  din: int
  dout: int
  pages_a: int
  pages_b: int
  rank: int = 0  # a bound on every live rank on this path (0: unknown)


@_pytree()
class AdapterPool:
  """S-LoRA's unified pool (Sec. 4.1) as the context sees it: one pages leaf, O(1) tables.

  Attributes:
    pages: [P, page_size] the pool; adapter pages and (for the engine) KV pages alike. It is one
      jit argument that the engine donates and updates in place.
    tables: [L, 2, N, max_pages] int32 page indices of adapter n's A (0) and B (1) rank rows on
      path slot l.
    scales: [L, N] each adapter's scale on each path (0 where it does not target the path).
    ranks: [L, N] int32 true ranks (1 where an adapter does not target the path).
    dora_scale: [L, N, max_out] DoRA's per-column factor, or None.
  """
  pages: jax.Array
  tables: jax.Array
  scales: jax.Array
  ranks: jax.Array
  dora_scale: Optional[jax.Array] = None

  def side(self, view: PoolView, which: str) -> kernels_pallas.PagedWeights:
    """One side ("a" or "b") of a path as `PagedWeights` over the shared pages (a reshape)."""
    p, size = self.pages.shape
    feat, pages, k = ((view.din, view.pages_a, 0) if which == "a"
                      else (view.dout, view.pages_b, 1))
    if size % feat:
      raise ValueError(f"pool pages of {size} elements cannot hold rank rows of {feat} "
                       f"features (path slot {view.slot}): the page size must be a multiple "
                       f"of every targeted layer's in and out size")
    return kernels_pallas.PagedWeights(self.pages.reshape(p, size // feat, feat),
                                       self.tables[view.slot, k, :, :pages])

  def stack(self, view: PoolView) -> Stack:
    """The path's `Stack` (paged sides, its row of scales and ranks) for the hook."""
    dora = None if self.dora_scale is None else self.dora_scale[view.slot, :, :view.dout]
    return Stack(a=self.side(view, "a"), b=self.side(view, "b"), scale=self.scales[view.slot],
                 ranks=self.ranks[view.slot], dora_scale=dora, rank_bound=view.rank)


# -- Routing ----------------------------------------------------------------------------------

LAYOUTS = ("sequence", "token", "topk")


@_pytree(meta=("layout", "num_adapters"))
class Routing:
  """Which adapters each row uses, and (after `prepare`) the kernels' plan for it.

  Attributes:
    layout: "sequence" (ids [B]: one per batch row), "token" (ids [T]: one per token of the
      flattened batch) or "topk" (ids and gates [T, K]). Explicit: never guessed from shapes.
    ids: int32 adapter ids; < 0 (and >= num_adapters) mean no adapter.
    num_adapters: N, the size of the stacks the ids index (the same on every path).
    gates: [T, K] gate weights for "topk", else None.
    grouping: the kernels' `Grouping` for `grouping.rows` rows, built once by `prepare` (for
      "topk", a tuple of K, one per slot), or None.
    members: optional, "token" only: [M] the distinct adapter ids the rows use (padded with
      -1), when the caller knows them (the serving engine does, per step). With it, pooled
      adapters are read once per member instead of once per token (`kernels_pallas.lora_members`).
    member_of: [T] each row's index into `members` (-1: no adapter), with `members`.
  """
  layout: str
  ids: jax.Array
  num_adapters: int
  gates: Optional[jax.Array] = None
  grouping: Optional[kernels_pallas.Grouping] = None
  members: Optional[jax.Array] = None
  member_of: Optional[jax.Array] = None

  def prepare(self, rows: Optional[int] = None) -> "Routing":
    """This routing with its plan built, for `rows` rows of the projections' flattened input
    (default: one row per id; a "sequence" routing without `rows` waits for the first
    projection). Call once per forward; every projection then shares it."""
    if self.layout == "topk":
      if self.grouping is not None:
        return self
      return dataclasses.replace(self, grouping=tuple(
          kernels_pallas.make_grouping(self.ids[:, j], self.num_adapters)
          for j in range(self.ids.shape[1])))
    sequence = self.layout == "sequence"
    if sequence and (rows is None or not kernels_pallas.batched_needs_grouping()):
      # The XLA path of lora_batched gathers per row: no plan. Without the row count (B rows
      # of S tokens) the plan is built at the first projection (`grouping_for`).
      return self
    rows = self.ids.shape[0] if rows is None else rows
    if self.grouping is not None and self.grouping.rows == rows:
      return self
    if self.layout == "token":
      grouping = kernels_pallas.make_grouping(self.ids, self.num_adapters)
    else:
      if rows % self.ids.shape[0]:
        raise ValueError(f"sequence routing has {self.ids.shape[0]} ids for {rows} rows")
      grouping = kernels_pallas.batched_grouping(self.ids, rows // self.ids.shape[0],
                                                 self.num_adapters)
    return dataclasses.replace(self, grouping=grouping)

  def grouping_for(self, rows: int):
    """The plan for `rows` rows: the prepared one, or one built here and kept for the rest of
    this trace (a U-Net sees several resolutions, each of its own row count)."""
    if self.grouping is not None and self.grouping.rows == rows:
      return self.grouping
    memo = self.__dict__.setdefault("_memo", {})
    if rows not in memo:
      memo[rows] = self.prepare(rows).grouping
    return memo[rows]

  def as_tokens(self, seq: int) -> "Routing":
    """The "token" routing of a "sequence" routing over rows of `seq` tokens (kept for the
    rest of the trace, with its plan)."""
    memo = self.__dict__.setdefault("_memo", {})
    key = ("tokens", seq)
    if key not in memo:
      memo[key] = Routing(layout="token", ids=jnp.repeat(self.ids, seq),
                          num_adapters=self.num_adapters).prepare()
    return memo[key]


def make_routing(layout: str, ids, num_adapters: int, gates=None, members=None) -> Routing:
  """A checked `Routing` (the constructor itself does not check: jax rebuilds pytrees with
  placeholder leaves). `members` ("token" only): the distinct adapter ids of `ids`, padded with
  -1 to a size the caller buckets (concrete ids: every adapter id in `ids` must be a member)."""
  if layout not in LAYOUTS:
    raise ValueError(f"routing layout must be one of {LAYOUTS}, got {layout!r}")
  member_of = None
  if members is not None:
    if layout != "token":
      raise ValueError(f"members are for 'token' routing, got layout {layout!r}")
    members = np.asarray(members, np.int32)
    host_ids = np.asarray(ids, np.int32)
    if members.ndim != 1 or host_ids.ndim != 1:
      raise ValueError(f"members must be [M] and ids [T], found {members.shape} and "
                       f"{host_ids.shape}")
    used = host_ids[(host_ids >= 0) & (host_ids < num_adapters)]
    missing = np.setdiff1d(used, members)
    if missing.size:
      raise ValueError(f"token routing uses adapter {int(missing[0])}, which is not among its "
                       f"members {members.tolist()}")
    eq = host_ids[:, None] == members[None, :]
    member_of = jnp.asarray(np.where(eq.any(1) & (host_ids >= 0), eq.argmax(1), -1), jnp.int32)
    members = jnp.asarray(members)
  ids = jnp.asarray(ids, jnp.int32)
  want = 2 if layout == "topk" else 1
  if ids.ndim != want:
    raise ValueError(f"{layout!r} routing needs ids of rank {want}, found shape {ids.shape}")
  if layout == "topk":
    gates = jnp.asarray(gates)
    if gates.shape != ids.shape:
      raise ValueError(f"topk routing needs gates of the ids' shape {ids.shape}, found "
                       f"{gates.shape}")
  elif gates is not None:
    raise ValueError(f"{layout!r} routing takes no gates")
  return Routing(layout=layout, ids=ids, num_adapters=int(num_adapters), gates=gates,
                 members=members, member_of=member_of)


class Tape:
  """Collects named arrays during one trace: `(name, value)` in call order.

  Some losses need values that live inside the forward: MeteoRA's gate loss needs every gate's
  logits, FACT's FAIR needs every face adapter's increment. A tape held by the functions that
  compute them (a `Router`, a FACT insert) receives them as they are computed. Build the tape
  and the context inside the traced function that reads it (a loss, a jitted analysis): the
  tape is a static part of the context, so a new tape in a jit argument means a new compile.
  """

  def __init__(self):
    self.entries: list = []

  def record(self, name: str, value: jax.Array) -> None:
    self.entries.append((name, value))


class GateTape(Tape):
  """A `Tape` of every router's gate logits: `(path, g [T, N])` in call order (MeteoRA)."""

  @property
  def logits(self) -> list:
    return self.entries


@_pytree(meta=("top_k", "tape"))
class Router:
  """MeteoRA's gate on one projection (Xu et al., 2025, Eq. 3-4): per token `g = x W_g`, the
  top-k adapters, weights `softmax(g_topk / T)`. Evaluated by the hook from the layer's `x`."""
  w_gate: jax.Array                 # [in, N], no bias
  temperature: jax.Array            # [] T (1 for single tasks, 15-30 for composites)
  top_k: int = 1
  tape: Optional[GateTape] = None   # receives (path, g) when set (training, analysis)
  # Serving (a MeteoRA model beside plain adapters in one batch): the stack's index of gate
  # column n, and the rows the gate routes; the other rows follow the context's routing.
  slots: Optional[jax.Array] = None  # [N] int32
  rows: Optional[jax.Array] = None   # [T] bool


# -- Attention state --------------------------------------------------------------------------

@_pytree()
class KVCache:
  """A preallocated dense KV cache: the `attention` slot for generation.

  A forward with it writes the new tokens' keys and values at slots `lengths + arange(S)` of
  every row and attends over the whole cache (causal by slot, padding slots masked), so a prompt
  prefill and each decode step run the same static-shape computation. Slots past `max_len` are
  dropped under jit: size the cache for prompt + new tokens.

  Attributes:
    keys, values: per layer [B, max_len, kv_heads, head_dim].
    valid: [B, max_len] bool, the slots that hold a real token (left padding is not).
    lengths: [B] int32, slots filled so far (the next token's slot).
  """
  keys: tuple
  values: tuple
  valid: jax.Array
  lengths: jax.Array

  @classmethod
  def empty(cls, layers: int, batch: int, max_len: int, kv_heads: int, head_dim: int,
            dtype=jnp.float32) -> "KVCache":
    zeros = lambda: jnp.zeros((batch, max_len, kv_heads, head_dim), dtype)
    return cls(keys=tuple(zeros() for _ in range(layers)),
               values=tuple(zeros() for _ in range(layers)),
               valid=jnp.zeros((batch, max_len), bool), lengths=jnp.zeros((batch,), jnp.int32))

  @property
  def max_len(self) -> int:
    return self.valid.shape[1]


@_pytree(meta=("block", "max_q", "long_seqs"))
class PagedKV:
  """The serving engine's attention state: KV pages inside the context's unified pool.

  The tokens of a forward are packed (`input_ids [1, T]`, positions given): sequence i owns
  tokens `cu_q_lens[i]:cu_q_lens[i + 1]`, the last of its `kv_lens[i]` cached tokens. The KV
  pages are pages of `Context.pool.pages` (S-LoRA Sec. 4.1: one pool for adapters and KV), each
  `[block, 2 * kv_heads, head_dim]` (keys and values interleaved, as
  `kernels_pallas.attention`). The Llama family attends over the pages and the step's own keys
  in flight, and returns those keys and values for the caller to write (the pool is then
  updated in place by a call of its own); on the TPU kernel path it writes them first and
  returns the updated pool pages.

  Attributes:
    tables: [layers, S, pages_per_seq] int32, the pages of each sequence on each layer.
    kv_lens: [S] int32 tokens cached per sequence after this forward.
    cu_q_lens: [S + 1] int32 offsets of each sequence's tokens in the packed batch.
    num_seqs: [1] int32 sequences in use (the rest pad).
    token_seq: [T] int32 the sequence of each packed token.
    token_valid: [T] bool, real tokens (padding writes to the scratch page 0).
    block: tokens per KV page (static).
    max_q: a static bound on any sequence's token count in this forward.
    long_seqs: static; when set, only the first `long_seqs` sequences have more than one token
      (prefill chunks first, decodes after; see `kernels_pallas.attention.reference`).
  """
  tables: jax.Array
  kv_lens: jax.Array
  cu_q_lens: jax.Array
  num_seqs: jax.Array
  token_seq: jax.Array
  token_valid: jax.Array
  block: int = 16
  max_q: int = 1
  long_seqs: Optional[int] = None


# -- Tensor parallelism -----------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class TensorParallel:
  """A forward running inside `shard_map` over the mesh axis `axis` (S-LoRA Sec. 6): the base
  Megatron-sharded (`column` paths split their output, `row` paths their input), each device
  seeing its local shards. The hook adds the collectives: a row-parallel projection's partial
  output is all-reduced over `axis`; a LoRA on a column path all-gathers its `[T, r]`
  intermediate, one on a row path all-reduces it and joins the base's all-reduce. Pool pages
  hold each device's part of an adapter (`serve.tp`).

  Attributes:
    axis: the mesh axis name.
    size: devices along it.
    column: paths whose kernel is split on its output.
    row: paths whose kernel is split on its input.
  """
  axis: str
  size: int
  column: frozenset = frozenset()
  row: frozenset = frozenset()

  def kind(self, path: Optional[str]) -> Optional[str]:
    return "column" if path in self.column else "row" if path in self.row else None


# -- The context ------------------------------------------------------------------------------

@_pytree(meta=("tp",))
class Context:
  """Everything one forward needs besides the frozen params (module docstring)."""
  weights: Optional[Mapping[str, Any]] = None     # path -> SingleLoRA | Stack | PoolView
  routing: Optional[Routing] = None
  pool: Optional[AdapterPool] = None
  routers: Optional[Mapping[str, Router]] = None  # path -> Router
  inserts: Optional[Mapping[str, Any]] = None     # insertion point -> jax.tree_util.Partial
  insert_inputs: Optional[Mapping[str, Any]] = None
  attention: Any = None                           # KVCache (generation), paged KV (serving)
  tp: Optional[TensorParallel] = None             # inside shard_map: the tensor-parallel plan

  def prepare(self, rows: Optional[int] = None) -> "Context":
    """The context with its routing's plan built (once per forward, inside the trace)."""
    if self.routing is None:
      return self
    return dataclasses.replace(self, routing=self.routing.prepare(rows))

  def view(self, path: str):
    """The weight view of `path` as the hook uses it (a pool view resolved to a Stack)."""
    view = None if not self.weights else self.weights.get(path)
    if isinstance(view, PoolView):
      if self.pool is None:
        raise ValueError(f"path {path} has a PoolView but the context has no pool")
      return self.pool.stack(view)
    return view

  def router(self, path: str) -> Optional[Router]:
    return None if not self.routers else self.routers.get(path)

  def with_pages(self, pages: jax.Array) -> "Context":
    """The context with its pool's pages replaced (the new version after a KV write)."""
    return dataclasses.replace(self, pool=dataclasses.replace(self.pool, pages=pages))

  def with_insert_inputs(self, **inputs) -> "Context":
    """The context with entries added to its `insert_inputs` (a model publishing its own
    conditioning to the insertion points: DiT's timestep and class embeddings, the U-Net's
    time embedding)."""
    return dataclasses.replace(self, insert_inputs={**(self.insert_inputs or {}), **inputs})

  def with_inserts(self, inserts: Optional[Mapping[str, Any]]) -> "Context":
    """The context with insertion-point functions added (as traced `Partial`s)."""
    if not inserts:
      return self
    fns = {name: fn if isinstance(fn, jax.tree_util.Partial) else jax.tree_util.Partial(fn)
           for name, fn in inserts.items()}
    return dataclasses.replace(self, inserts={**(self.inserts or {}), **fns})


def prepare(ctx: Optional[Context], rows: Optional[int] = None) -> Optional[Context]:
  """`ctx.prepare(rows)` for a context, None for None."""
  return None if ctx is None else ctx.prepare(rows)


def publish(ctx: Optional[Context], **inputs) -> Optional[Context]:
  """`ctx` with `inputs` added to its insert inputs when it has insertion-point functions (a
  model's conditioning for them); `ctx` itself otherwise, so a plain forward pays nothing."""
  if ctx is None or not ctx.inserts:
    return ctx
  return ctx.with_insert_inputs(**inputs)


def insert(ctx: Optional[Context], name: str, out: jax.Array, hidden_in: jax.Array,
           cond: Optional[jax.Array] = None) -> jax.Array:
  """Applies the module registered at insertion point `name`, if any.

  The function is called `fn(out, hidden_in, cond, inputs)`: `out` the module's output,
  `hidden_in` its input tokens, `cond` its cross-attention context (or None) and `inputs` the
  context's `insert_inputs` (a dict, empty when there are none): the caller's (AGD's guidance
  scale, FACT's face tokens) and the model's own conditioning (`publish`).
  """
  if ctx is None or not ctx.inserts or name not in ctx.inserts:
    return out
  return ctx.inserts[name](out, hidden_in, cond, dict(ctx.insert_inputs or {}))
