"""The public LoRA ops: backend dispatch, token layouts and custom_vjp.

Backends (`set_backend(name)` or the env var `JAXADAPT_KERNELS`, read at import):
  * "auto": Pallas TPU (Mosaic) on TPU, Pallas GPU (Triton) on GPU, the XLA loop on CPU.
  * "xla": the XLA loop (`kernels_pallas.xla`) everywhere.
  * "pallas": the platform's Pallas kernel (interpreted on CPU).
  * "pallas_interpret": the TPU kernel body run by the Pallas interpreter (any platform).
  * "pallas_triton_interpret": the Triton kernel body run by the Pallas interpreter.
  * "pallas_tpu", "pallas_triton": that compiled kernel whatever the platform (for jax.export).
The choice is made when a function is traced: a function already jitted keeps its path.

Out-of-range values follow `reference`'s rules: adapter ids >= N raise ValueError when concrete
and mean "no adapter" under jit; live page-table entries outside the pool raise when concrete and
are clamped under jit; nothing a row does not use reaches its output or gradients.

Every op runs on grouped rows (the SGMV layout). The per-row (BGMV) ops sort rows by adapter id
first (`plan.group_rows`); the XLA path reads through the permutation instead of copying.
Gradients (custom_vjp): dx and dh come from the same kernels run transposed (shrink's backward is
an expand against A^T, expand's is a shrink against B^T); dA and dB from the XLA grouped outer
product `xla.outer_sum` on every backend; scales and gates get theirs from JAX, since the kernels
take h already multiplied by scale (and gate).

References:
  S-LoRA (Sheng et al., 2023), Sec. 5.1 (MBGMM prefill / MBGMV decode), Sec. 4.1 (unified paging);
  MeteoRA (Xu et al., 2024), Sec. 3, Eq. 3-4 (top-k gated mixture of LoRAs).
"""
from __future__ import annotations

import functools
import os
from typing import NamedTuple

import jax
import jax.numpy as jnp

from kernels_pallas import plan as plan_lib
from kernels_pallas import reference
from kernels_pallas import xla
from kernels_pallas.reference import PagedWeights

_VALID = ("auto", "xla", "pallas", "pallas_interpret", "pallas_triton_interpret", "pallas_tpu",
          "pallas_triton")
_backend = os.environ.get("JAXADAPT_KERNELS", "auto")


def set_backend(name: str) -> None:
  """Forces a kernel path for every later trace (tests, benchmarks); see the module docstring."""
  global _backend
  if name not in _VALID:
    raise ValueError(f"kernels backend must be one of {_VALID}, got {name!r}")
  _backend = name


def get_backend() -> str:
  """The backend name set by `set_backend` or JAXADAPT_KERNELS."""
  if _backend not in _VALID:
    raise ValueError(f"JAXADAPT_KERNELS must be one of {_VALID}, got {_backend!r}")
  return _backend


def resolve_backend(name: str | None = None) -> str:
  """The implementation a backend name runs on this machine.

  Returns:
    One of "xla", "tpu", "triton", "tpu_interpret", "triton_interpret".
  """
  name = get_backend() if name is None else name
  platform = jax.default_backend()
  if name == "xla":
    return "xla"
  if name == "pallas_interpret":
    return "tpu_interpret"
  if name == "pallas_triton_interpret":
    return "triton_interpret"
  if name in ("pallas_tpu", "pallas_triton"):
    return name[len("pallas_"):]
  if platform == "tpu":
    return "tpu"
  if platform in ("gpu", "cuda", "rocm"):
    return "triton"
  return "tpu_interpret" if name == "pallas" else "xla"


class _Cfg(NamedTuple):
  """Static configuration of one core call (hashable: a custom_vjp nondiff argument)."""
  impl: str        # resolve_backend's answer
  rank_axis: int   # the weight source's rank axis (1 or 2)
  block_t: int     # rows per tile of the plan
  permuted: bool   # rows reach the kernel through a permutation (XLA only)


_BLOCK_T = {"xla": 8, "tpu": 16, "tpu_interpret": 16, "triton": 16, "triton_interpret": 16}


class _Bound:
  """A Pallas kernel module with its `interpret` flag bound, shaped like the `xla` module."""

  def __init__(self, module, interpret: bool):
    self.shrink = functools.partial(module.shrink, interpret=interpret)
    self.expand = functools.partial(module.expand, interpret=interpret)


def _eng(cfg: _Cfg):
  """The module (or bound kernel module) that implements cfg.impl."""
  if cfg.impl == "xla":
    return xla
  interpret = cfg.impl.endswith("_interpret")
  if cfg.impl.startswith("tpu"):
    from kernels_pallas import sgmv_tpu  # pylint: disable=g-import-not-at-top
    return _Bound(sgmv_tpu, interpret)
  from kernels_pallas import sgmv_triton  # pylint: disable=g-import-not-at-top
  return _Bound(sgmv_triton, interpret)


def _kw(cfg: _Cfg, perm):
  kw = dict(rank_axis=cfg.rank_axis, block_t=cfg.block_t)
  if cfg.permuted:
    kw["perm"] = perm
  return kw


# 1. The differentiable cores, on grouped rows. -------------------------------------------------

@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _shrink_core(cfg, x, w, table, ranks, plan, perm):
  return _eng(cfg).shrink(x, w, table, ranks, plan, **_kw(cfg, perm))


def _shrink_fwd(cfg, x, w, table, ranks, plan, perm):
  return _shrink_core(cfg, x, w, table, ranks, plan, perm), (x, w, table, ranks, plan, perm)


def _shrink_bwd(cfg, res, dh):
  x, w, table, ranks, plan, perm = res
  zeros = jnp.zeros(x.shape, jnp.float32)
  dx = _eng(cfg).expand(zeros, dh, w, table, ranks, plan, **_kw(cfg, perm))  # dh @ A^T
  g = xla.outer_sum(x, dh, ranks, plan, ranks.shape[0], rank_side=1,
                    block_t=cfg.block_t, perm=perm if cfg.permuted else None)  # [N, D, R]
  dw = _grad_to_source(jnp.swapaxes(g, 1, 2), w, table, cfg.rank_axis)
  return dx.astype(x.dtype), dw, None, None, None, None


_shrink_core.defvjp(_shrink_fwd, _shrink_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _expand_core(cfg, y, h, w, table, ranks, plan, perm):
  return _eng(cfg).expand(y, h, w, table, ranks, plan, **_kw(cfg, perm))


def _expand_fwd(cfg, y, h, w, table, ranks, plan, perm):
  out = _expand_core(cfg, y, h, w, table, ranks, plan, perm)
  return out, (h, w, table, ranks, plan, perm)


def _expand_bwd(cfg, res, dy):
  h, w, table, ranks, plan, perm = res
  dh = _eng(cfg).shrink(dy, w, table, ranks, plan, **_kw(cfg, perm))  # dy @ B^T
  g = xla.outer_sum(h, dy, ranks, plan, ranks.shape[0], rank_side=0,
                    block_t=cfg.block_t, perm=perm if cfg.permuted else None)  # [N, R, O]
  dw = _grad_to_source(g, w, table, cfg.rank_axis)
  # The output has y's dtype, so dy has too.
  return dy, dh.astype(h.dtype), dw, None, None, None, None


_expand_core.defvjp(_expand_fwd, _expand_bwd)


def _grad_to_source(g_rank_major: jax.Array, w: jax.Array, table, rank_axis: int) -> jax.Array:
  """[N, R, F] weight gradient laid out like the source it came from (dense stack or pool)."""
  if table is None:
    g = g_rank_major if rank_axis == 1 else jnp.swapaxes(g_rank_major, 1, 2)
    return g.astype(w.dtype)
  n, pages = table.shape
  g = g_rank_major.reshape(n * pages, w.shape[1], w.shape[2])
  # Pages past an adapter's rank carry zero gradient, so clamped table entries add nothing.
  pool = jnp.zeros(w.shape, jnp.float32).at[jnp.clip(table.reshape(-1), 0, w.shape[0] - 1)].add(g)
  return pool.astype(w.dtype)


# 2. Layouts and sources. ------------------------------------------------------------------------

def _source(weights, side: str):
  """(array, table or None, rank_axis, N, R) of a dense stack or PagedWeights."""
  if isinstance(weights, PagedWeights):
    return (weights.pool, weights.table.astype(jnp.int32), 1, weights.table.shape[0],
            weights.max_rank)
  rank_axis = 2 if side == "a" else 1
  return weights, None, rank_axis, weights.shape[0], weights.shape[rank_axis]


def _ranks(ranks, n: int, r: int) -> jax.Array:
  if ranks is None:
    return jnp.full((n,), r, jnp.int32)
  return jnp.clip(jnp.asarray(ranks, jnp.int32), 0, r)


def _in_range(row_ids: jax.Array, n: int) -> jax.Array:
  """Row ids with every id outside [0, N) set to -1 (no adapter: see `reference`)."""
  row_ids = row_ids.astype(jnp.int32)
  return jnp.where((row_ids >= 0) & (row_ids < n), row_ids, -1)


def _grouping(impl: str, row_ids: jax.Array, grouped: bool, max_runs: int, block_t: int):
  """(plan, perm or None, order or None, inverse or None) for a batch of rows."""
  if grouped:
    return plan_lib.make_plan(row_ids, block_t, max_runs), None, None, None
  order, inverse, sorted_ids = plan_lib.group_rows(row_ids)
  plan = plan_lib.make_plan(sorted_ids, block_t, max_runs)
  if impl == "xla":
    return plan, order.astype(jnp.int32), None, None
  return plan, None, order, inverse


def _max_runs(rows: int, groups: int) -> int:
  """Static bound on the runs of equal ids among `rows` rows holding `groups` kinds of id."""
  return max(1, min(rows, groups))


def make_grouping(ids: jax.Array, num_adapters: int, *, segments: int | None = None):
  """The routing of a batch of rows, for every op of one forward to share (`plan.Grouping`).

  Args:
    ids: [T] adapter id per row (< 0 or >= num_adapters: no adapter).
    num_adapters: N, the size of the weight stack the ids index.
    segments: None for a per-row (BGMV) batch, which is sorted into runs; else the rows are
      already grouped (SGMV) into at most this many segments.

  Returns:
    A `plan.Grouping` (None for zero rows) for the implementation the current backend
    resolves to; pass it as
    `grouping=` to `lora_shrink`/`lora_expand` (per-row) or `sgmv_*`/`lora_batched` (segments).

  References:
    S-LoRA (Sheng et al., 2023), Sec. 5.1: the heterogeneous batch as segments of one adapter.
  """
  impl = resolve_backend()
  ids = _in_range(jnp.asarray(ids), num_adapters)
  rows = ids.shape[0]
  if rows == 0:
    return None  # the ops return at once on zero rows
  grouped = segments is not None
  runs = _max_runs(rows, (segments if grouped else num_adapters) + 1)
  plan, perm, order, inverse = _grouping(impl, ids, grouped, runs, _BLOCK_T[impl])
  return plan_lib.Grouping(plan=plan, perm=perm, order=order, inverse=inverse, impl=impl,
                           rows=rows)


def _check_grouping(name: str, grouping, impl: str, rows: int, grouped: bool) -> None:
  if grouping is None:
    return
  if not isinstance(grouping, plan_lib.Grouping):
    raise TypeError(f"{name}: grouping must be a kernels_pallas Grouping (make_grouping), got "
                    f"{type(grouping).__name__}")
  if grouping.impl != impl or grouping.rows != rows:
    raise ValueError(f"{name}: the grouping was built for {grouping.rows} rows on {grouping.impl!r}"
                     f"; this call has {rows} rows on {impl!r}. Build it with make_grouping "
                     f"under the same backend, for these rows.")
  if grouped != (grouping.order is None and grouping.perm is None):
    raise ValueError(f"{name}: expected a grouping built "
                     f"{'with' if grouped else 'without'} segments=, found the other kind")


def _use(grouping, impl, row_ids, grouped, max_runs, block_t):
  if grouping is None:
    return _grouping(impl, row_ids, grouped, max_runs, block_t)
  return grouping.plan, grouping.perm, grouping.order, grouping.inverse


@functools.partial(jax.jit, static_argnames=("impl", "grouped", "max_runs"))
def _shrink(x, a_stack, row_ids, ranks, grouping, *, impl, grouped, max_runs):
  w, table, rank_axis, n, r = _source(a_stack, "a")
  if x.shape[0] == 0:
    return jnp.zeros((0, r), x.dtype)
  block_t = _BLOCK_T[impl]
  row_ids = _in_range(row_ids, n)
  plan, perm, order, inverse = _use(grouping, impl, row_ids, grouped, max_runs, block_t)
  cfg = _Cfg(impl, rank_axis, block_t, perm is not None)
  xs = x if order is None else x[order]
  h = _shrink_core(cfg, xs, w, table, _ranks(ranks, n, r), plan, perm)
  h = h if inverse is None else h[inverse]
  return h.astype(x.dtype)


@functools.partial(jax.jit, static_argnames=("impl", "grouped", "max_runs"))
def _expand(y, h, b_stack, row_ids, scales, ranks, grouping, *, impl, grouped, max_runs):
  w, table, rank_axis, n, r = _source(b_stack, "b")
  if y.shape[0] == 0:
    return y
  block_t = _BLOCK_T[impl]
  row_ids = _in_range(row_ids, n)
  valid = row_ids >= 0
  row_scale = jnp.where(valid, scales[jnp.where(valid, row_ids, 0)], 0).astype(jnp.float32)
  hs = h.astype(jnp.float32) * row_scale[:, None]
  plan, perm, order, inverse = _use(grouping, impl, row_ids, grouped, max_runs, block_t)
  cfg = _Cfg(impl, rank_axis, block_t, perm is not None)
  if order is not None:
    y, hs = y[order], hs[order]
  out = _expand_core(cfg, y, hs, w, table, _ranks(ranks, n, r), plan, perm)
  return out if inverse is None else out[inverse]


# 3. Public ops. --------------------------------------------------------------------------------

def lora_shrink(x: jax.Array, a_stack, ids: jax.Array, *, ranks=None,
                grouping=None) -> jax.Array:
  """h[t] = x[t] @ A[ids[t]] on a per-row batch (BGMV); spec: `reference.lora_shrink`.

  Args:
    x: [T, D] tokens.
    a_stack: [N, D, R] stack, or PagedWeights (pool [P, page_rows, D], table [N, max_pages]).
    ids: [T] adapter id per row; < 0 means no adapter (the row of h is zero); >= N raises
      ValueError when concrete and means no adapter under jit.
    ranks: optional [N] true ranks (1..R); columns past an adapter's rank are zero and cost no
      compute beyond the hardware block that holds the rank's end.
    grouping: optional `make_grouping(ids, N)` shared by every op of a forward; without it the
      rows are sorted and planned here.

  Returns:
    [T, R] in x's dtype.

  References:
    S-LoRA (Sheng et al., 2023), Sec. 5.1: shrink of the heterogeneous batch (MBGMV).
  """
  reference._validate("lora_shrink", x, a_stack, ids, ranks, side="a")  # pylint: disable=protected-access
  n = _source(a_stack, "a")[3]
  impl = resolve_backend()
  _check_grouping("lora_shrink", grouping, impl, x.shape[0], grouped=False)
  return _shrink(x, a_stack, ids, ranks, grouping, impl=impl, grouped=False,
                 max_runs=_max_runs(x.shape[0], n + 1))


def lora_expand(y: jax.Array, h: jax.Array, b_stack, ids: jax.Array, scales: jax.Array, *,
                ranks=None, grouping=None) -> jax.Array:
  """y[t] += scales[ids[t]] * h[t] @ B[ids[t]] per row (BGMV); spec: `reference.lora_expand`.

  Args:
    y: [T, O] base output.
    h: [T, R] shrunk activations.
    b_stack: [N, R, O] stack, or PagedWeights (pool [P, page_rows, O]).
    ids: [T] adapter id per row; < 0 leaves the row unchanged; >= N as in `lora_shrink`.
    scales: [N] per-adapter scale.
    ranks: optional [N] true ranks; rank rows past them are ignored whatever they hold.
    grouping: optional `make_grouping(ids, N)`, as in `lora_shrink`.

  Returns:
    [T, O] in y's dtype.

  References:
    S-LoRA (Sheng et al., 2023), Sec. 5.1: expand of the heterogeneous batch (MBGMV).
  """
  reference._validate("lora_expand", h, b_stack, ids, ranks, side="b", y=y)  # pylint: disable=protected-access
  n = _source(b_stack, "b")[3]
  reference.check_scales("lora_expand", scales, n)
  impl = resolve_backend()
  _check_grouping("lora_expand", grouping, impl, y.shape[0], grouped=False)
  return _expand(y, h, b_stack, ids, scales, ranks, grouping, impl=impl, grouped=False,
                 max_runs=_max_runs(y.shape[0], n + 1))


def sgmv_shrink(x: jax.Array, a_stack, seg_ids: jax.Array, seg_lens: jax.Array, *,
                ranks=None, grouping=None) -> jax.Array:
  """`lora_shrink` on a segmented batch (SGMV); spec: `reference.sgmv_shrink`.

  Args:
    x: [T, D] rows grouped by adapter.
    a_stack: [N, D, R] or PagedWeights.
    seg_ids: [S] adapter id of each segment (< 0: none); seg_lens: [S] rows per segment (>= 0,
      empty segments allowed). Rows past sum(seg_lens) have no adapter.
    ranks: optional [N].
    grouping: optional `make_grouping(row ids, N, segments=S)` shared across ops.

  References:
    S-LoRA (Sheng et al., 2023), Sec. 5.1: MBGMM on the prefill batch.
  """
  row_ids = reference.segment_row_ids(seg_ids, seg_lens, x.shape[0])
  reference._validate("sgmv_shrink", x, a_stack, row_ids, ranks, side="a")  # pylint: disable=protected-access
  impl = resolve_backend()
  _check_grouping("sgmv_shrink", grouping, impl, x.shape[0], grouped=True)
  return _shrink(x, a_stack, row_ids, ranks, grouping, impl=impl, grouped=True,
                 max_runs=_max_runs(x.shape[0], seg_ids.shape[0] + 1))


def sgmv_expand(y: jax.Array, h: jax.Array, b_stack, seg_ids: jax.Array, seg_lens: jax.Array,
                scales: jax.Array, *, ranks=None, grouping=None) -> jax.Array:
  """`lora_expand` on a segmented batch (SGMV); spec: `reference.sgmv_expand`.

  References:
    S-LoRA (Sheng et al., 2023), Sec. 5.1: MBGMM on the prefill batch.
  """
  row_ids = reference.segment_row_ids(seg_ids, seg_lens, y.shape[0])
  reference._validate("sgmv_expand", h, b_stack, row_ids, ranks, side="b", y=y)  # pylint: disable=protected-access
  reference.check_scales("sgmv_expand", scales, _source(b_stack, "b")[3])
  impl = resolve_backend()
  _check_grouping("sgmv_expand", grouping, impl, y.shape[0], grouped=True)
  return _expand(y, h, b_stack, row_ids, scales, ranks, grouping, impl=impl, grouped=True,
                 max_runs=_max_runs(y.shape[0], seg_ids.shape[0] + 1))


def lora_batched(y: jax.Array, x: jax.Array, a_stack, b_stack, ids: jax.Array,
                 scales: jax.Array, *, ranks=None, grouping=None) -> jax.Array:
  """y[b] += scales[ids[b]] * x[b] @ A[ids[b]] @ B[ids[b]]: one adapter per batch row.

  The SGMV layout with B equal segments of S rows (a mixed batch of sequences, each with its own
  adapter). On the XLA path each row gathers its adapter's weights once
  (`xla.batched_lora`); on Pallas paths it is `sgmv_shrink` + `sgmv_expand` with
  `seg_lens = S`. Spec: `reference.sgmv_shrink/expand` on the flattened rows.

  Args:
    y: [B, S, O]; x: [B, S, D]; a_stack: [N, D, R] or PagedWeights; b_stack: [N, R, O] or
    PagedWeights; ids: [B] adapter id per row (< 0: none); scales: [N]; ranks: optional [N];
    grouping: optional, for the Pallas paths: `batched_grouping(ids, S, N)` (the XLA path needs
    none).

  Returns:
    [B, S, O] in y's dtype.

  References:
    S-LoRA (Sheng et al., 2023), Sec. 5.1 (MBGMM on the prefill batch).
  """
  if x.ndim != 3 or y.ndim != 3 or x.shape[:2] != y.shape[:2] or ids.shape != (x.shape[0],):
    raise ValueError(f"lora_batched: expected x [B, S, D], y [B, S, O] and ids [B], found "
                     f"{x.shape}, {y.shape} and {ids.shape}")
  bsz, seq = x.shape[:2]
  n = _source(b_stack, "b")[3]
  rows = jax.ShapeDtypeStruct((bsz * seq,), jnp.int32)  # Shapes only; the ids are checked next.
  shape = lambda *s: jax.ShapeDtypeStruct(s, x.dtype)
  validate = reference._validate  # pylint: disable=protected-access
  validate("lora_batched", shape(bsz * seq, x.shape[2]), a_stack, rows, ranks, side="a")
  validate("lora_batched", shape(bsz * seq, reference.max_rank(a_stack)), b_stack, rows, ranks,
           side="b", y=shape(bsz * seq, y.shape[2]))
  reference.check_ids("lora_batched", ids, n)
  reference.check_scales("lora_batched", scales, n)
  if resolve_backend() == "xla":
    return xla.batched_lora(y, x, reference.dense_a(a_stack), reference.dense_b(b_stack),
                            ids.astype(jnp.int32), scales, ranks)  # ids >= N: no adapter
  lens = jnp.full((bsz,), seq, jnp.int32)
  if grouping is None:
    grouping = batched_grouping(ids, seq, n)
  h = sgmv_shrink(x.reshape(bsz * seq, x.shape[2]), a_stack, ids, lens, ranks=ranks,
                  grouping=grouping)
  out = sgmv_expand(y.reshape(bsz * seq, y.shape[2]), h, b_stack, ids, lens, scales, ranks=ranks,
                    grouping=grouping)
  return out.reshape(y.shape)


def batched_needs_grouping() -> bool:
  """Whether `lora_batched` runs on a plan on this backend (the XLA path gathers per row)."""
  return resolve_backend() != "xla"


def batched_grouping(ids: jax.Array, seq: int, num_adapters: int):
  """The grouping `lora_batched` uses for B rows of `seq` tokens each (one adapter per row)."""
  ids = jnp.asarray(ids, jnp.int32)
  rows = reference.segment_row_ids(ids, jnp.full(ids.shape, seq, jnp.int32), ids.shape[0] * seq)
  return make_grouping(rows, num_adapters, segments=ids.shape[0])


# The dense form of the top-k mixture (every adapter's matmul, gated) does (N - K) R (D + O)
# more multiply-adds per row than the top-k path but has no visit loop, whose fixed cost per
# visit dominates small layers. Measured in one run on 2 CPU cores (bench/meteora.py, whole
# forwards; docs/benchmarks.md has the spread over three runs): the
# default model (D, O = 128-384, N = 8, R = 16) dense 1.25x / 1.35x one LoRA at top-1 / top-2
# against gather 2.0x / 3.6x; hidden 512 (D + O ~ 1500), N = 8: gather 1.04x / 1.19x against
# dense 1.21x / 1.26x; N = 32: gather 0.86x / 1.33x against dense 1.59x / 1.88x. Dense runs
# while (N - K) R (D + O) <= DENSE_TOPK_WORK. Other backends are unmeasured (no accelerator
# here) and use the same rule.
DENSE_TOPK_WORK = 65536


def topk_impl(num_adapters: int, k: int, rank: int, din: int, dout: int,
              a_stack=None) -> str:
  """"dense" or "gather": the cheaper form of `lora_topk` for N adapters of rank R on a [D, O]
  projection with K slots (see DENSE_TOPK_WORK; pool pages are always read by the gather
  path)."""
  if isinstance(a_stack, PagedWeights):
    return "gather"
  extra = max(num_adapters - k, 0) * rank * (din + dout)
  return "dense" if extra <= DENSE_TOPK_WORK else "gather"


def lora_topk(y: jax.Array, x: jax.Array, a_stack, b_stack, scales: jax.Array,
              topk_ids: jax.Array, gates: jax.Array, *, ranks=None,
              groupings=None, impl: str = "gather") -> jax.Array:
  """MeteoRA's top-k gated mixture; spec: `reference.lora_topk`.

  "gather" (the kernels): each of the K slots is one shrink and one expand on the per-row
  layout; the gate multiplies h between them, so gradients reach the gates (and x, A, B) through
  the ops' custom_vjp. "dense": `xla.dense_topk`, every adapter at once with the gates as
  mixing weights (plain jnp, dense stacks only). "auto": the cheaper by `topk_impl`.

  Args:
    y: [T, O]; x: [T, D]; a_stack: [N, D, R] or PagedWeights; b_stack: [N, R, O] or PagedWeights;
    scales: [N]; topk_ids: [T, K] (< 0 skips the slot); gates: [T, K]; ranks: optional [N];
    groupings: optional K groupings (`make_grouping(topk_ids[:, j], N)`), shared by every
    projection that routes the same ids; default: built here, one per slot.
    impl: "gather", "dense" or "auto".

  Returns:
    [T, O] in y's dtype.

  References:
    MeteoRA (Xu et al., 2024), Sec. 3, Eq. 3-4.
  """
  if topk_ids.ndim != 2 or gates.shape != topk_ids.shape or topk_ids.shape[0] != x.shape[0]:
    raise ValueError(f"lora_topk: expected topk_ids and gates of shape [T, K] with T={x.shape[0]}, "
                     f"found {topk_ids.shape} and {gates.shape}")
  n = _source(b_stack, "b")[3]
  reference.check_ids("lora_topk", topk_ids, n)
  reference.check_scales("lora_topk", scales, n)
  if impl not in ("gather", "dense", "auto"):
    raise ValueError(f"lora_topk: impl must be 'gather', 'dense' or 'auto', got {impl!r}")
  if impl == "auto":
    impl = topk_impl(n, topk_ids.shape[1], _source(a_stack, "a")[4], x.shape[1], y.shape[1],
                     a_stack)
  if impl == "dense":
    if isinstance(a_stack, PagedWeights) or isinstance(b_stack, PagedWeights):
      raise ValueError("lora_topk: the dense form needs dense stacks, not pool pages")
    return xla.dense_topk(y, x, a_stack, b_stack, scales, topk_ids, gates, ranks)
  out = y.astype(jnp.float32)
  r_b = _source(b_stack, "b")[4]
  for j in range(topk_ids.shape[1]):
    ids = topk_ids[:, j]
    if groupings is not None:
      grouping = groupings[j]
    else:  # one per slot, shared by its shrink and expand
      grouping = make_grouping(ids, n) if x.shape[0] else None
    h = lora_shrink(x, a_stack, ids, ranks=ranks, grouping=grouping).astype(jnp.float32)
    # Pool pages may hold different numbers of rank rows on the A and B sides: h [T, R_a] cut
    # or zero-padded to B's R_b (every slot past an adapter's rank is zero anyway).
    h = h[:, :r_b] if h.shape[1] >= r_b else jnp.pad(h, ((0, 0), (0, r_b - h.shape[1])))
    out = lora_expand(out, h * gates[:, j:j + 1].astype(jnp.float32), b_stack, ids, scales,
                      ranks=ranks, grouping=grouping)
  return out.astype(y.dtype)



def lora_rows(y: jax.Array, x: jax.Array, a: PagedWeights, b: PagedWeights, ids: jax.Array,
              scales: jax.Array, *, ranks: jax.Array, rank: int) -> jax.Array:
  """`lora_expand(y, lora_shrink(x, a, ids, ranks), b, ids, scales, ranks)` for rows whose
  adapters' ranks are all <= `rank` (static), reading only those rank rows of each row's pool
  pages (`xla.rows_lora`; every backend, it is plain jnp and differentiable).

  References:
    S-LoRA (Sheng et al., 2023), Sec. 5.1 (MBGMV: the decode batch, one adapter per token).
  """
  if not (isinstance(a, PagedWeights) and isinstance(b, PagedWeights)):
    raise TypeError("lora_rows reads adapters from pool pages: a and b must be PagedWeights")
  if rank < 1 or rank > min(a.max_rank, b.max_rank):
    raise ValueError(f"lora_rows: rank must be in [1, {min(a.max_rank, b.max_rank)}] (the "
                     f"pages' rank slots), got {rank}")
  reference._validate("lora_rows", x, a, ids, ranks, side="a")  # pylint: disable=protected-access
  return xla.rows_lora(y, x, a, b, ids, scales, jnp.asarray(ranks, jnp.int32), rank)


def lora_members(y: jax.Array, x: jax.Array, a: PagedWeights, b: PagedWeights,
                 members: jax.Array, member_of: jax.Array, scales: jax.Array, *,
                 ranks: jax.Array, rank: int) -> jax.Array:
  """`lora_expand(y, lora_shrink(x, a, ids, ranks), b, ids, scales, ranks)` with
  `ids = members[member_of]` (no adapter where member_of is outside [0, M)), for a batch whose
  rows use the M adapters of `members`: each member's rank rows are read once and every row
  multiplied by all of them in one matmul (`xla.members_lora`; every backend, plain jnp).
  The faster decode form when a step's tokens share few adapters (`lora_rows` when many).

  References:
    S-LoRA (Sheng et al., 2023), Sec. 5.1 (the decode batch's heterogeneous LoRA matmul).
  """
  if not (isinstance(a, PagedWeights) and isinstance(b, PagedWeights)):
    raise TypeError("lora_members reads adapters from pool pages: a and b must be PagedWeights")
  if rank < 1 or rank > min(a.max_rank, b.max_rank):
    raise ValueError(f"lora_members: rank must be in [1, {min(a.max_rank, b.max_rank)}] (the "
                     f"pages' rank slots), got {rank}")
  if members.ndim != 1 or member_of.ndim != 1 or member_of.shape[0] != x.shape[0]:
    raise ValueError(f"lora_members: expected members [M] and member_of [T]=[{x.shape[0]}], "
                     f"found {members.shape} and {member_of.shape}")
  reference._validate("lora_members", x, a, member_of, ranks, side="a")  # pylint: disable=protected-access
  if tuple(y.shape) != (x.shape[0], b.pool.shape[2]):
    raise ValueError(f"lora_members: expected y of shape [T, O]=[{x.shape[0]}, "
                     f"{b.pool.shape[2]}] (O from B's pool), found {tuple(y.shape)}")
  reference.check_ids("lora_members", members, scales.shape[0])
  return xla.members_lora(y, x, a, b, members, member_of, scales, jnp.asarray(ranks, jnp.int32),
                          rank)
