"""The forward context: routing planned once per forward, a pooled context in O(1) leaves,
MeteoRA routers evaluated in the hook, insertion-point inputs, and the one call surface."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxadapt as ja
from _adapter_helpers import perturbed
import kernels_pallas
from jaxadapt.adapters import stack as stack_lib
from jaxadapt.adapters.lora import kernel_at
from jaxadapt.causal_lm import forward
from jaxadapt.context import Router, SingleLoRA, insert


@pytest.fixture(scope="module")
def setup(llama_dir):
  model = ja.load_model(llama_dir[0])
  configs = [ja.LoraConfig(r=3, target_modules="all-linear"),
             ja.LoraConfig(r=6, target_modules=["q_proj", "down_proj", "k_proj"]),
             ja.LoraConfig(r=2, target_modules="all-linear", use_dora=True)]
  adapters = [perturbed(ja.init_lora(model, c, seed=i), 20 + i) for i, c in enumerate(configs)]
  stacks = stack_lib.stack_adapters(model.params, adapters)
  ids = np.random.default_rng(0).integers(0, 97, (4, 5))
  return model, adapters, stacks, ids


@pytest.fixture
def plan_counter(monkeypatch):
  calls = []
  real = kernels_pallas.plan.make_plan

  def counting(*args, **kwargs):
    calls.append(1)
    return real(*args, **kwargs)
  monkeypatch.setattr(kernels_pallas.plan, "make_plan", counting)
  return calls


@pytest.mark.parametrize("backend,layout,plans", [("xla", "token", 1), ("xla", "sequence", 0),
                                                  ("pallas_interpret", "sequence", 1)])
def test_routing_is_planned_once_per_forward(setup, plan_counter, backend, layout, plans):
  """Tracing a mixed-batch forward builds the kernels' plan once (none on the XLA per-sequence
  path, which gathers per row), not once per projection."""
  model, adapters, stacks, ids = setup
  which = np.array([2, 0, -1, 1])
  ctx = stack_lib.mixed_context(stacks, which if layout == "sequence" else
                                np.repeat(which, ids.shape[1]), layout=layout)
  projections = len(ctx.weights)
  assert projections == 14  # 2 layers x 7 linear layers, each running the mixed op
  before = kernels_pallas.get_backend()
  kernels_pallas.set_backend(backend)
  try:
    fn = jax.jit(lambda p, c: forward(model.graphdef, p, jnp.asarray(ids), None, None, c))
    fn.lower(model.params, ctx)
  finally:
    kernels_pallas.set_backend(before)
  assert len(plan_counter) == plans


def test_topk_routing_is_planned_once_per_slot(setup, plan_counter):
  model, adapters, _, ids = setup
  lora_free = stack_lib.stack_adapters(model.params, adapters[:2])  # no DoRA in a mixture
  rng = np.random.default_rng(1)
  t = ids.size
  topk = np.stack([rng.permutation(2) for _ in range(t)]).astype(np.int32)
  ctx = stack_lib.gated_context(lora_free, topk, rng.uniform(0.1, 1, (t, 2)))
  jax.jit(lambda p, c: forward(model.graphdef, p, jnp.asarray(ids), None, None, c)).lower(
      model.params, ctx)
  assert len(ctx.weights) > 2 and len(plan_counter) == 2  # K slots, whatever the paths


@pytest.mark.parametrize("layout", ["sequence", "token"])
def test_pooled_context_is_o1_leaves_and_equals_dense(setup, layout):
  """Adapters in shuffled pages of one pool leaf (S-LoRA's unified pool), GQA k/v (16 wide),
  MLP (48) and attention (32) layers sharing one page size, DoRA included: equal to the dense
  stacks, and the context is a constant number of jit leaves, not a few per path."""
  model, adapters, stacks, ids = setup
  which = np.array([1, 2, -1, 0])
  route = which if layout == "sequence" else np.repeat(which, ids.shape[1])
  dense_ctx = stack_lib.mixed_context(stacks, route, layout=layout)
  pooled = stack_lib.pool_context(stacks, route, layout=layout, page_size=96 * 2, seed=3)
  dense_leaves = jax.tree_util.tree_leaves(dense_ctx)
  pooled_leaves = jax.tree_util.tree_leaves(pooled)
  assert len(dense_leaves) >= 4 * len(stacks)
  assert len(pooled_leaves) <= 6  # pages, tables, scales, ranks, dora factors, ids
  assert sum(leaf.shape[-1:] == (192,) for leaf in pooled_leaves) == 1  # the one pool leaf
  got = model(ids, context=pooled)
  want = model(ids, context=dense_ctx)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5, rtol=0)
  alone = model(ids[:1], adapter=adapters[1])
  np.testing.assert_allclose(np.asarray(got[:1]), np.asarray(alone), atol=1e-5, rtol=0)
  with pytest.raises(ValueError, match="page_size 100 is not a multiple"):
    stack_lib.pool_context(stacks, route, layout=layout, page_size=100)


def test_router_is_evaluated_from_each_layers_input(setup):
  """MeteoRA's gate in the hook (Eq. 3-4): per token g = x W_g, top-k, softmax(g_topk / T),
  y = x W + sum_j w_j s_j B_j A_j x; checked against the jnp spec on two paths, and the gates
  get gradients through a whole forward."""
  model, adapters, stacks, ids = setup
  lora_adapters = adapters[:2]
  stacks2 = stack_lib.stack_adapters(model.params, lora_adapters)
  rng = np.random.default_rng(5)
  paths = ["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"]
  routers = {p: Router(w_gate=jnp.asarray(rng.normal(size=(kernel_at(model.params, p).shape[0],
                                                              2)), jnp.float32),
                       temperature=jnp.float32(2.0), top_k=k)
             for p, k in zip(paths, (1, 2))}
  ctx = stack_lib.routed_context(stacks2, routers)
  from jaxadapt.adapters.hook import project
  for path in paths:
    kernel = kernel_at(model.params, path)
    x = jnp.asarray(rng.normal(size=(6, kernel.shape[0])), jnp.float32)
    got = project(x, kernel, None, ctx, path)
    g = np.asarray(x @ routers[path].w_gate)
    k = routers[path].top_k
    want = np.array(x @ kernel)
    for i in range(6):
      top = np.argsort(-g[i])[:k]
      w = np.exp(g[i, top] / 2.0)
      w /= w.sum()
      for wj, n in zip(w, top):
        ad = lora_adapters[n]
        if path in ad.weights:
          single = SingleLoRA(a=ad.weights[path]["a"], b=ad.weights[path]["b"],
                              scale=jnp.float32(ad.scale(path)))
          want[i] += wj * np.asarray(project(x[i:i + 1], kernel, None, single)
                                     - x[i:i + 1] @ kernel)[0]
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-5, rtol=0)

  def loss(gate_w):
    c = stack_lib.routed_context(stacks2, {p: Router(w_gate=gate_w[p], temperature=jnp.float32(
        2.0), top_k=2) for p in paths})
    return jnp.sum(forward(model.graphdef, model.params, jnp.asarray(ids), None, None, c) ** 2)
  # Jitted: an eager grad of the whole forward runs (and compiles) op by op.
  grads = jax.jit(jax.grad(loss))({p: routers[p].w_gate for p in paths})
  for p in paths:
    assert np.all(np.isfinite(np.asarray(grads[p]))) and np.abs(np.asarray(grads[p])).max() > 0


def test_insert_inputs_reach_the_insertion_point():
  """An insertion point's function gets the context's inputs (AGD's w, FACT's face tokens),
  traced: a new value reuses the compiled forward."""
  out = jnp.ones((2, 3, 4))

  def fn(o, h, c, inputs):
    return o * inputs["w"] + h

  traces = []

  @jax.jit
  def run(ctx):
    traces.append(1)
    return insert(ctx, "blocks.0.attn1", out, out)
  for w in (2.0, 5.0):
    ctx = ja.Context(insert_inputs={"w": jnp.float32(w)}).with_inserts({"blocks.0.attn1": fn})
    np.testing.assert_allclose(np.asarray(run(ctx)), w + 1.0)
  assert len(traces) == 1
  assert insert(ja.Context(), "blocks.0.attn1", out, out) is out


def test_one_call_surface_refuses_conflicts(setup):
  model, adapters, stacks, ids = setup
  ctx = stack_lib.mixed_context(stacks, [0, 1, 2, -1])
  with pytest.raises(ValueError, match="not both"):
    model(ids, adapter=adapters[0], context=ctx)
  with pytest.raises(TypeError, match="Context"):
    model(ids, context={"model.layers.0.self_attn.q_proj": None})
  with pytest.raises(ValueError, match="token routing has 4 ids"):
    model(ids, context=stack_lib.mixed_context(stacks, [0, 1, 2, -1], layout="token"))


@pytest.mark.parametrize("windows", [(), (3, 0)])
def test_kv_cache_prefill_and_decode_equal_the_full_forward(windows):
  """A left-padded prompt prefilled into a dense KVCache, then three one-token steps, give the
  logits of one forward over the whole sequence (GQA, a sliding window, a mixed batch of
  adapters), with one compile for all decode steps."""
  from jaxadapt.models.llama import LlamaConfig
  model = ja.CausalLM.random(LlamaConfig(
      vocab_size=61, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
      num_attention_heads=4, num_key_value_heads=2, head_dim=8, sliding_windows=windows))
  adapters = [perturbed(ja.init_lora(model, ja.LoraConfig(r=2, target_modules="all-linear"),
                                      seed=s), s) for s in (1, 2)]
  which = [1, -1, 0]
  ids = np.random.default_rng(4).integers(0, 61, (3, 8))
  mask = np.ones_like(ids)
  mask[1, :3] = 0  # left padding
  full = np.asarray(model(ids, attention_mask=mask, adapters=adapters, adapter_ids=which))
  mixed = model.make_context(adapters=adapters, adapter_ids=which)
  cache = model.init_cache(3, 10)
  logits, cache = model(ids[:, :5], attention_mask=mask[:, :5],
                        context=ja.Context(weights=mixed.weights, routing=mixed.routing,
                                           attention=cache))
  from jaxadapt.models import frozen
  steps = [np.asarray(logits)]
  for t in range(5, 8):
    logits, cache = model(ids[:, t:t + 1], context=ja.Context(
        weights=mixed.weights, routing=mixed.routing, attention=cache))
    steps.append(np.asarray(logits))
    if t == 5:
      compiled = frozen._apply_jit._cache_size()  # pylint: disable=protected-access
  assert frozen._apply_jit._cache_size() == compiled  # pylint: disable=protected-access
  got = np.concatenate(steps, axis=1)
  real = mask.astype(bool)
  np.testing.assert_allclose(got[real], full[real], atol=1e-5, rtol=0)
  assert np.asarray(cache.lengths).tolist() == [8, 8, 8]
  assert np.abs(full[0] - np.asarray(model(ids, attention_mask=mask))[0]).max() > 1e-3


@pytest.mark.parametrize("backend", ["xla", "pallas_interpret"])
def test_kernels_take_a_precomputed_grouping(backend):
  """shrink/expand/lora_batched given `make_grouping`'s plan equal the ops planning themselves;
  a grouping for other rows or another backend is refused, naming both."""
  rng = np.random.default_rng(6)
  t, d, o, n, r = 12, 8, 6, 3, 4
  x = jnp.asarray(rng.normal(size=(t, d)), jnp.float32)
  y = jnp.asarray(rng.normal(size=(t, o)), jnp.float32)
  a = jnp.asarray(rng.normal(size=(n, d, r)), jnp.float32)
  b = jnp.asarray(rng.normal(size=(n, r, o)), jnp.float32)
  scales = jnp.asarray([0.5, 1.0, 2.0], jnp.float32)
  ids = jnp.asarray(rng.integers(-1, n, t), jnp.int32)
  before = kernels_pallas.get_backend()
  kernels_pallas.set_backend(backend)
  try:
    g = kernels_pallas.make_grouping(ids, n)
    h = kernels_pallas.lora_shrink(x, a, ids, grouping=g)
    np.testing.assert_allclose(np.asarray(h), np.asarray(kernels_pallas.lora_shrink(x, a, ids)),
                               atol=1e-6)
    got = kernels_pallas.lora_expand(y, h, b, ids, scales, grouping=g)
    want = kernels_pallas.reference.lora_expand(y, h, b, ids, scales)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5)
    seq_ids = jnp.asarray([2, -1, 0], jnp.int32)
    x3, y3 = x.reshape(3, 4, d), y.reshape(3, 4, o)
    gb = kernels_pallas.batched_grouping(seq_ids, 4, n)
    got = kernels_pallas.lora_batched(y3, x3, a, b, seq_ids, scales, grouping=gb)
    want = kernels_pallas.lora_batched(y3, x3, a, b, seq_ids, scales)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5)
    with pytest.raises(ValueError, match=r"built for 6 rows .* this call has 12 rows"):
      kernels_pallas.lora_shrink(x, a, ids, grouping=kernels_pallas.make_grouping(ids[:6], n))
  finally:
    kernels_pallas.set_backend(before)
  other = "pallas_interpret" if backend == "xla" else "xla"
  kernels_pallas.set_backend(other)
  try:
    with pytest.raises(ValueError, match="on 'xla'|on 'tpu_interpret'"):
      kernels_pallas.lora_shrink(x, a, ids, grouping=g)
  finally:
    kernels_pallas.set_backend(before)
