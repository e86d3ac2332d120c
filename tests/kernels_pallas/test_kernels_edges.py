"""Edges of the kernels_pallas ops on every path, numbers checked against `reference`.

Empty batches, ids outside [0, N) (a clear error when concrete, "no adapter" under jit), page
tables past the pool, ranks of 0 and above R, non-finite values in whatever a row does not use,
their gradients, jit without retracing, vmap, and the projection hook's mixed and gated contexts.
Shapes are tiny and shared so the interpreted kernels compile few times.
"""
import collections
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kernels_pallas as kp
from kernels_pallas import reference

N, D, R, O, T = 3, 16, 8, 12, 7
PAGE_ROWS, POOL = 4, 7


def _close(got, want, tol=2e-5):
  """Equal NaN/inf patterns and close finite values (tolerance relative to the largest |want|)."""
  got = np.asarray(jnp.asarray(got, jnp.float32))
  want = np.asarray(jnp.asarray(want, jnp.float32))
  assert got.shape == want.shape, (got.shape, want.shape)
  np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
  np.testing.assert_array_equal(np.isfinite(got), np.isfinite(want))
  finite = np.isfinite(want)
  scale = max(1.0, float(np.abs(want[finite]).max())) if finite.any() else 1.0
  np.testing.assert_allclose(got[finite], want[finite], rtol=tol, atol=tol * scale)


def _data(seed=0):
  rng = np.random.default_rng(seed)
  f = lambda *s: jnp.asarray(rng.standard_normal(s), jnp.float32)
  return {"x": f(T, D), "y": f(T, O), "h": f(T, R), "a": f(N, D, R) / 4, "b": f(N, R, O) / 3,
          "scales": jnp.array([0.5, 1.0, 2.0], jnp.float32),
          "ids": jnp.array([0, 2, 1, -1, 2, 0, 1], jnp.int32),
          "gates": jnp.asarray(rng.uniform(0.1, 1.0, (T, 2)), jnp.float32)}


TRACES = collections.Counter()  # (impl, paged) -> traces of `_run`


def _ops(impl):
  return reference if impl == "reference" else kp


def _lora(ops, x, y, a, b, ids, scales, ranks=None):
  """y + scale * (x A) B through shrink and expand (BGMV layout)."""
  h = ops.lora_shrink(x, a, ids, ranks=ranks)
  return ops.lora_expand(y, h, b, ids, scales, ranks=ranks)


@functools.partial(jax.jit, static_argnames=("impl",))
def _run(impl, x, y, a, b, ids, scales, ranks, table=None):
  """(out, d/dx, d/dA, d/dB, d/dscales) of `_lora` and a scalar of it; A and B are pools when
  `table` is given. `impl`: "reference" or the kernels backend in force (a cache key)."""
  TRACES[impl, table is not None] += 1
  ops = _ops(impl)

  def loss(x, a, b, scales):
    if table is not None:
      a, b = kp.PagedWeights(a, table), kp.PagedWeights(b, table)
    out = _lora(ops, x, y, a, b, ids, scales, ranks)
    weight = jnp.cos(jnp.arange(out.size, dtype=jnp.float32)).reshape(out.shape)
    return jnp.sum(jnp.sin(out) * weight), out

  (_, out), g = jax.value_and_grad(loss, argnums=(0, 1, 2, 3), has_aux=True)(x, a, b, scales)
  return (out,) + g


def _grads(impl, d, ids, a=None, b=None, ranks=None, table=None, x=None):
  """`_run` on the data of `_data` with some of it replaced; ranks default to R."""
  ranks = jnp.full((N,), R, jnp.int32) if ranks is None else jnp.asarray(ranks, jnp.int32)
  return _run(impl, d["x"] if x is None else x, d["y"], d["a"] if a is None else a,
              d["b"] if b is None else b, jnp.asarray(ids, jnp.int32), d["scales"], ranks, table)


@functools.partial(jax.jit, static_argnames=("impl",))
def _layouts(impl, d, ids, topk, seg_ids, seg_lens, batch_ids, h, ranks):
  """The other layouts on the same data: expand alone, top-k, SGMV expand, lora_batched (the
  spec's SGMV on the flattened rows for "reference")."""
  ops = _ops(impl)
  y, x, a, b, scales = d["y"], d["x"], d["a"], d["b"], d["scales"]
  expand = ops.lora_expand(y, h, b, ids, scales, ranks=ranks)
  topk = ops.lora_topk(y, x, a, b, scales, topk, d["gates"], ranks=ranks)
  sgmv = ops.sgmv_expand(y, h, b, seg_ids, seg_lens, scales, ranks=ranks)
  xb, yb = x[:6].reshape(2, 3, D), y[:6].reshape(2, 3, O)
  if impl == "reference":
    lens = jnp.full((2,), 3, jnp.int32)
    hb = reference.sgmv_shrink(x[:6], a, batch_ids, lens, ranks=ranks)
    batched = reference.sgmv_expand(y[:6], hb, b, batch_ids, lens, scales, ranks=ranks)
  else:
    batched = kp.lora_batched(yb, xb, a, b, batch_ids, scales, ranks=ranks)
  return expand, topk, sgmv, batched.reshape(2, 3, O)


# 1. Empty batches. -------------------------------------------------------------------------------

def test_empty_batch(backend):
  """T = 0 rows (and B = 0 or S = 0 in lora_batched): empty results, zero weight gradients."""
  d = _data()
  x, y, h = d["x"][:0], d["y"][:0], d["h"][:0]
  ids = d["ids"][:0]
  _close(kp.lora_shrink(x, d["a"], ids), reference.lora_shrink(x, d["a"], ids))
  assert kp.lora_shrink(x, d["a"], ids).shape == (0, R)
  _close(kp.lora_expand(y, h, d["b"], ids, d["scales"]),
         reference.lora_expand(y, h, d["b"], ids, d["scales"]))
  seg = (jnp.array([1, -1]), jnp.array([0, 3]))
  _close(kp.sgmv_shrink(x, d["a"], *seg), reference.sgmv_shrink(x, d["a"], *seg))
  _close(kp.sgmv_expand(y, h, d["b"], *seg, d["scales"]),
         reference.sgmv_expand(y, h, d["b"], *seg, d["scales"]))
  topk = (d["scales"], jnp.zeros((0, 2), jnp.int32), d["gates"][:0])
  _close(kp.lora_topk(y, x, d["a"], d["b"], *topk),
         reference.lora_topk(y, x, d["a"], d["b"], *topk))
  for bsz, seq in ((0, 4), (2, 0)):
    xb, yb = jnp.ones((bsz, seq, D)), jnp.ones((bsz, seq, O))
    got = kp.lora_batched(yb, xb, d["a"], d["b"], jnp.zeros((bsz,), jnp.int32), d["scales"])
    assert got.shape == (bsz, seq, O)
  grads = _run(backend, x, y, d["a"], d["b"], ids, d["scales"], jnp.full((N,), R))
  assert grads[1].shape == (0, D)
  for g in grads[2:]:
    np.testing.assert_array_equal(g, 0)


# 2. Adapter ids outside [0, N). -----------------------------------------------------------------

BAD_IDS = np.array([0, 3, 1, 7, -1, 2, 100], np.int32)  # 3, 7, 100 >= N
MASKED = np.where(BAD_IDS >= N, -1, BAD_IDS)


def test_out_of_range_ids_raise_when_concrete():
  d = _data()
  ids = jnp.asarray(BAD_IDS)
  msg = r"adapter ids must be < N=3 \(or < 0 for no adapter\), found 3 at index \(1,\)"
  for ops in (kp, reference):
    with pytest.raises(ValueError, match="lora_shrink: " + msg):
      ops.lora_shrink(d["x"], d["a"], ids)
    with pytest.raises(ValueError, match="lora_expand: " + msg):
      ops.lora_expand(d["y"], d["h"], d["b"], BAD_IDS, d["scales"])  # numpy ids too
    with pytest.raises(ValueError, match=r"lora_topk: adapter ids must be < N=3.*found 3"):
      ops.lora_topk(d["y"], d["x"], d["a"], d["b"], d["scales"], jnp.stack([ids, ids], 1),
                    d["gates"])
    with pytest.raises(ValueError, match=r"adapter ids must be < N=3.*found 5 at index \(3,\)"):
      ops.sgmv_shrink(d["x"], d["a"], jnp.array([0, 5]), jnp.array([3, 4]))
  with pytest.raises(ValueError, match=r"lora_batched: adapter ids must be < N=3.*found 4"):
    kp.lora_batched(d["y"][None], d["x"][None], d["a"], d["b"], jnp.array([4]), d["scales"])


def _layout_args(d, ids, seg_ids, batch_ids, h=None, ranks=None):
  topk = jnp.stack([jnp.asarray(ids), jnp.roll(jnp.asarray(ids), 2)], 1)
  ranks = jnp.full((N,), R, jnp.int32) if ranks is None else jnp.asarray(ranks, jnp.int32)
  return (d, jnp.asarray(ids), topk, jnp.asarray(seg_ids), jnp.array([2, 3, 2]),
          jnp.asarray(batch_ids), d["h"] if h is None else h, ranks)


def test_out_of_range_ids_under_jit_mean_no_adapter(backend):
  """Traced ids >= N act as -1 on every path and in the spec: values and gradients, in every
  layout (BGMV, SGMV, top-k, lora_batched)."""
  d = _data()
  want = _grads("reference", d, MASKED)
  for impl in (backend, "reference"):
    for g, w in zip(_grads(impl, d, BAD_IDS), want):
      _close(g, w, 1e-4)
  want = _layouts("reference", *_layout_args(d, MASKED, [1, -1, 0], [-1, 1]))
  for impl in (backend, "reference"):
    for g, w in zip(_layouts(impl, *_layout_args(d, BAD_IDS, [1, 5, 0], [4, 1])), want):
      _close(g, w, 1e-4)


def test_jit_does_not_retrace_for_new_ids(backend):
  d = _data()
  _grads(backend, d, d["ids"])
  before = TRACES[backend, False]
  for ids in (np.full((T,), -1), BAD_IDS, np.zeros((T,), np.int32), np.arange(T) % N):
    _close(_grads(backend, d, ids)[0],
           _lora(reference, d["x"], d["y"], d["a"], d["b"], np.where(ids >= N, -1, ids),
                 d["scales"]))
  assert TRACES[backend, False] == before


# 3. Paged tables. --------------------------------------------------------------------------------

def _pools(seed=1):
  rng = np.random.default_rng(seed)
  pa = jnp.asarray(rng.standard_normal((POOL, PAGE_ROWS, D)) / 4, jnp.float32)
  pb = jnp.asarray(rng.standard_normal((POOL, PAGE_ROWS, O)) / 3, jnp.float32)
  return pa, pb


def test_page_table_past_the_pool_raises_when_concrete():
  d = _data()
  pa, pb = _pools()
  table = jnp.array([[0, 1], [2, 9], [3, 4]], jnp.int32)
  with pytest.raises(ValueError, match=r"lora_shrink: page table entry \[1, 1\] = 9 is outside "
                                       r"the pool of P=7 pages \(adapter 1 reads its first 2"):
    kp.lora_shrink(d["x"], kp.PagedWeights(pa, table), d["ids"])
  bad = table.at[2, 0].set(-1).at[1, 1].set(5)
  with pytest.raises(ValueError, match=r"lora_expand: page table entry \[2, 0\] = -1"):
    reference.lora_expand(d["y"], d["h"], kp.PagedWeights(pb, bad), d["ids"], d["scales"])
  # Entries past an adapter's live pages may hold anything: rank 4 reads one page of 4 rows.
  ranks = jnp.array([8, 4, 8])
  _close(kp.lora_shrink(d["x"], kp.PagedWeights(pa, table), d["ids"], ranks=ranks),
         reference.lora_shrink(d["x"], kp.PagedWeights(pa, jnp.clip(table, 0, POOL - 1)),
                               d["ids"], ranks=ranks))


def test_page_table_past_the_pool_is_clamped_under_jit(backend):
  """Traced entries outside [0, P) read the clamped page on every path (never past the pool);
  NaN in pages no row reads (a spare page, the tail past a rank) reaches nothing."""
  d = _data()
  pa, pb = _pools()
  pa, pb = pa.at[6].set(jnp.nan), pb.at[6].set(jnp.nan)  # page 6: spare
  pa, pb = pa.at[5, 2:].set(jnp.inf), pb.at[5, 2:].set(jnp.nan)  # adapter 2's tail
  table = jnp.array([[0, 1], [2, 9], [-3, 5]], jnp.int32)  # 9 -> 6 (NaN), -3 -> 0
  ranks = [8, 3, 6]  # adapter 1 reads only page 2: page 6 stays unread
  want = _grads("reference", d, d["ids"], pa, pb, ranks, jnp.clip(table, 0, POOL - 1))
  for impl in (backend, "reference"):
    for g, w in zip(_grads(impl, d, d["ids"], pa, pb, ranks, table), want):
      assert np.isfinite(np.asarray(w)).all()
      _close(g, w, 1e-4)


# 4. Ranks and non-finite values a row does not use. --------------------------------------------

def _poisoned(d, ranks, value):
  """A and B with `value` in every slot past each adapter's rank."""
  a, b = np.array(d["a"]), np.array(d["b"])
  for n, r in enumerate(np.clip(ranks, 0, R)):
    a[n, :, r:] = value
    b[n, r:, :] = value
  return jnp.asarray(a), jnp.asarray(b)


@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_unused_slots_reach_no_value_or_gradient(backend, value):
  """Ranks 0 and > R; NaN/inf past each rank and in x and h of rows without adapter: every
  output and gradient equals the run with zeros there, on every path and in the spec."""
  d = _data()
  ranks = [0, R + 5, 3]
  a0, b0 = _poisoned(d, ranks, 0.0)
  clean = _grads("reference", d, d["ids"], a0, b0, ranks)
  clean_layouts = _layouts("reference", *_layout_args({**d, "a": a0, "b": b0}, d["ids"],
                                                      [1, -1, 0], [0, -1], ranks=ranks))
  a, b = _poisoned(d, ranks, value)
  x = d["x"].at[3].set(value)  # row 3 has no adapter
  h = d["h"].at[3].set(value)
  for impl in (backend, "reference"):
    got = _grads(impl, d, d["ids"], a, b, ranks, x=x)
    np.testing.assert_array_equal(np.asarray(got[1])[3], 0)  # d/dx of the row without adapter
    for g, w in zip(got, clean):
      _close(g, w, 1e-4)
    layouts = _layouts(impl, *_layout_args({**d, "a": a, "b": b}, d["ids"], [1, -1, 0], [0, -1],
                                           h=h, ranks=ranks))
    for g, w in zip(layouts, clean_layouts):
      _close(g, w, 1e-4)
  rows0 = np.asarray(d["ids"]) == 0  # rank 0 leaves its rows alone; rank > R is rank R
  np.testing.assert_array_equal(np.asarray(clean[0])[rows0], np.asarray(d["y"])[rows0])


def test_a_broken_adapter_stays_in_its_rows(backend):
  """Adapter 1 holds NaN in its live weights: only its rows (and its own gradients) see NaN, as
  in the spec; rows of other adapters that share a tile with them stay exact."""
  d = _data()
  a, b = d["a"].at[1].set(jnp.nan), d["b"].at[1].set(jnp.nan)
  want = _grads("reference", d, d["ids"], a, b)
  got = _grads(backend, d, d["ids"], a, b)
  for g, w in zip(got, want):
    _close(g, w, 1e-4)
  rows = np.asarray(d["ids"]) != 1
  assert np.isfinite(np.asarray(got[0])[rows]).all() and np.isnan(np.asarray(got[0])[~rows]).all()
  assert np.isfinite(np.asarray(got[2])[[0, 2]]).all()  # d/dA of adapters 0 and 2


# 5. Shapes that must be refused; vmap. ---------------------------------------------------------

def test_scales_and_y_shapes_are_checked():
  d = _data()
  for ops in (kp, reference):
    with pytest.raises(ValueError, match=r"lora_expand: expected scales of shape \[N\]=\[3\], "
                                         r"found \(4,\)"):
      ops.lora_expand(d["y"], d["h"], d["b"], d["ids"], jnp.ones(4))
    with pytest.raises(ValueError, match=r"expected scales of shape \[N\]=\[3\], found \(\)"):
      ops.lora_topk(d["y"], d["x"], d["a"], d["b"], jnp.float32(1), d["gates"].astype(jnp.int32),
                    d["gates"])
    with pytest.raises(ValueError, match=r"lora_expand: expected y of shape \[T, O\]=\[7, 12\] "
                                         r"\(O from B\), found \(7, 1\)"):
      ops.lora_expand(d["y"][:, :1], d["h"], d["b"], d["ids"], d["scales"])
  with pytest.raises(ValueError, match=r"lora_batched: h is \[T, R\]=\[.., 8\] but B holds "
                                       r"rank 5"):
    kp.lora_batched(d["y"][None], d["x"][None], d["a"], d["b"][:, :5], d["ids"][:1], d["scales"])


def test_vmap(backend):
  """vmap over independent batches (x, weights and ids batched) equals the spec's vmap."""
  del backend
  d = _data()
  xs, ids = jnp.stack([d["x"], -d["x"]]), jnp.stack([d["ids"], jnp.roll(d["ids"], 3)])
  a2 = jnp.stack([d["a"], 2 * d["a"]])
  shrink = lambda o: jax.jit(jax.vmap(lambda x, a, i: o.lora_shrink(x, a, i)))
  _close(shrink(kp)(xs, a2, ids), shrink(reference)(xs, a2, ids))


# 6. The projection hook's mixed and gated contexts. ---------------------------------------------

@pytest.mark.parametrize("name", ["xla", "pallas_interpret"])
def test_hook_mixed_and_gated_equal_per_sequence_loop(name):
  """MixedLoRA with per-sequence ids (x of rank 4) and per-token ids, DoRA, ids >= N under jit
  (base only), and GatedLoRA: equal to running each sequence alone with its own SingleLoRA.
  (The kernels' paths are compared above; here the hook's layouts.)"""
  before = kp.get_backend()
  kp.set_backend(name)
  try:
    _check_hook()
  finally:
    kp.set_backend(before)


def _check_hook():
  from jaxadapt.adapters.hook import SingleLoRA, project
  from jaxadapt.context import Context, Stack, make_routing
  d = _data()
  ranks = np.array([8, 3, 5])
  a, b = _poisoned(d, ranks, np.nan)
  rng = np.random.default_rng(7)
  kernel = jnp.asarray(rng.standard_normal((D, O)), jnp.float32)
  bias = jnp.asarray(rng.standard_normal(O), jnp.float32)
  dora = jnp.asarray(rng.uniform(0.5, 1.5, (N, O)), jnp.float32)
  x = jnp.asarray(rng.standard_normal((4, 2, 1, D)), jnp.float32)  # [B, ..., in]

  def alone(i, xi, use_dora):
    if not 0 <= i < N:
      return project(xi, kernel, bias)
    r = ranks[i]
    out = project(xi, kernel, None, SingleLoRA(a=a[i, :, :r], b=b[i, :r], scale=d["scales"][i]))
    return (out * dora[i] if use_dora else out) + bias

  which = np.array([1, 5, -1, 0])  # 5 >= N: base only under jit
  run = jax.jit(lambda *args: project(*args), static_argnums=(4,))  # traced on this backend
  want = jnp.stack([alone(int(i), x[j], True) for j, i in enumerate(which)])
  stack = Stack(a=a, b=b, scale=d["scales"], dora_scale=dora, ranks=jnp.asarray(ranks))
  for ids, layout in ((which, "sequence"), (np.repeat(which, 2), "token")):
    ctx = Context(weights={"p": stack}, routing=make_routing(layout, ids, N))
    _close(run(x, kernel, bias, ctx, "p"), want)
    with pytest.raises(ValueError, match=r"adapter ids must be < N=3.*found 5"):
      project(x, kernel, bias, ctx, "p")  # concrete ids: refused
  topk = np.array([[0, 2], [1, -1], [4, 0], [2, 1], [-1, -1], [1, 1], [0, 3], [2, 0]])
  gates = jnp.asarray(rng.uniform(0.1, 1.0, topk.shape), jnp.float32)
  ctx = Context(weights={"p": Stack(a=a, b=b, scale=d["scales"], ranks=jnp.asarray(ranks))},
                routing=make_routing("topk", topk, N, gates=gates))
  x2 = x.reshape(8, D)
  base = x2 @ kernel + bias
  want = base
  for t, j in np.ndindex(*topk.shape):
    if 0 <= topk[t, j] < N:
      delta = alone(int(topk[t, j]), x2[t:t + 1], False)[0] - base[t]
      want = want.at[t].add(gates[t, j] * delta)
  _close(run(x2, kernel, bias, ctx, "p"), want)


def _nan_past_rank_pool(rng):
  """Five adapters (ranks 2, 5, 6, 1, 4) in pool pages of 3 rank rows, in random page order,
  with NaN in every pool row past a rank; and x [12, 16], y [12, 24]. Returns
  (a, b, ranks, x, y) with a, b PagedWeights."""
  t, d, o, rows, n, p = 12, 16, 24, 3, 5, 40
  ranks = np.array([2, 5, 6, 1, 4], np.int32)
  table = rng.permutation(np.arange(1, p))[:n * 2].reshape(n, 2).astype(np.int32)
  pool_a = np.full((p, rows, d), np.nan, np.float32)
  pool_b = np.full((p, rows, o), np.nan, np.float32)
  for i, r in enumerate(ranks):
    for j in range(r):
      pool_a[table[i, j // rows], j % rows] = rng.normal(size=d)
      pool_b[table[i, j // rows], j % rows] = rng.normal(size=o)
  a = kp.PagedWeights(jnp.asarray(pool_a), jnp.asarray(table))
  b = kp.PagedWeights(jnp.asarray(pool_b), jnp.asarray(table))
  x = jnp.asarray(rng.normal(size=(t, d)), jnp.float32)
  y = jnp.asarray(rng.normal(size=(t, o)), jnp.float32)
  return a, b, ranks, x, y


def test_lora_rows_equals_shrink_then_expand_and_ignores_rows_past_the_rank():
  """`lora_rows` (the decode BGMV reading rank rows, not pages) equals the reference
  shrink-then-expand over pool pages in random order; ranks below the bound, rows without an
  adapter, and NaN in every pool row past a rank change nothing."""
  from kernels_pallas import reference as ref
  rng = np.random.default_rng(3)
  a, b, ranks, x, y = _nan_past_rank_pool(rng)
  n = ranks.size
  ids = jnp.asarray([0, 1, 2, 3, 4, -1, 2, 2, 0, 7, 1, 4], jnp.int32)
  scales = jnp.asarray(rng.uniform(0.5, 2, n), jnp.float32)
  got = jax.jit(lambda y, x, ids: kp.lora_rows(y, x, a, b, ids, scales,
                                               ranks=jnp.asarray(ranks), rank=6))(y, x, ids)
  safe = jnp.where(ids < n, ids, -1)  # under jit an id >= N means no adapter
  want = ref.lora_expand(y, ref.lora_shrink(x, a, safe, ranks=jnp.asarray(ranks)), b, safe,
                         scales, ranks=jnp.asarray(ranks))
  assert np.isfinite(np.asarray(got)).all()
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5)
  np.testing.assert_array_equal(np.asarray(got)[[5, 9]], np.asarray(y)[[5, 9]])  # no adapter
  with pytest.raises(ValueError, match="rank must be in"):
    kp.lora_rows(y, x, a, b, safe, scales, ranks=jnp.asarray(ranks), rank=7)
  with pytest.raises(ValueError, match="ids must be < N=5"):
    kp.lora_rows(y, x, a, b, ids, scales, ranks=jnp.asarray(ranks), rank=6)


def test_lora_members_equals_shrink_then_expand_and_ignores_rows_past_the_rank():
  """`lora_members` (each of the step's distinct adapters read once, one matmul over them all)
  equals the reference shrink-then-expand with ids = members[member_of]; unused member slots,
  rows without an adapter and NaN in every pool row past a rank change nothing."""
  from kernels_pallas import reference as ref
  from jaxadapt.context import make_routing
  rng = np.random.default_rng(4)
  a, b, ranks, x, y = _nan_past_rank_pool(rng)
  n = ranks.size
  ids = np.array([0, 1, 2, 2, 4, -1, 2, 2, 0, -1, 1, 4], np.int32)
  routing = make_routing("token", ids, n, members=[4, 0, 2, 1, -1, -1])
  np.testing.assert_array_equal(routing.member_of, [1, 3, 2, 2, 0, -1, 2, 2, 1, -1, 3, 0])
  scales = jnp.asarray(rng.uniform(0.5, 2, n), jnp.float32)
  got = jax.jit(lambda y, x, m, of: kp.lora_members(y, x, a, b, m, of, scales,
                                                    ranks=jnp.asarray(ranks), rank=6))(
      y, x, routing.members, routing.member_of)
  want = ref.lora_expand(y, ref.lora_shrink(x, a, jnp.asarray(ids), ranks=jnp.asarray(ranks)), b,
                         jnp.asarray(ids), scales, ranks=jnp.asarray(ranks))
  assert np.isfinite(np.asarray(got)).all()
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5)
  np.testing.assert_array_equal(np.asarray(got)[[5, 9]], np.asarray(y)[[5, 9]])  # no adapter
  with pytest.raises(ValueError, match="rank must be in"):
    kp.lora_members(y, x, a, b, routing.members, routing.member_of, scales,
                    ranks=jnp.asarray(ranks), rank=7)
  with pytest.raises(ValueError, match="ids must be < N=5"):
    kp.lora_members(y, x, a, b, jnp.asarray([0, 7]), routing.member_of, scales,
                    ranks=jnp.asarray(ranks), rank=6)
  with pytest.raises(ValueError, match="uses adapter 3, which is not among its members"):
    make_routing("token", [0, 3], n, members=[0, -1])
