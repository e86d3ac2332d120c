"""MeteoRA (Xu et al., ICLR 2025, Eq. 3-4): the top-k gated forward against a per-expert jnp
reference on both kernel paths (dense and gather), gate gradients against `jax.grad` of that
reference, k = N with T -> inf against the uniform average of the adapters (merged weights),
generation through the KV cache, the gate loss, and save/load."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxadapt as ja
import kernels_pallas
from _adapter_helpers import perturbed
from jaxadapt import meteora
from jaxadapt.adapters import lora as lora_lib
from jaxadapt.adapters.hook import project
from jaxadapt.causal_lm import CausalLM, forward
from jaxadapt.models.llama import LlamaConfig
from kernels_pallas import reference

CONFIG = LlamaConfig(model_type="llama", vocab_size=61, hidden_size=32, intermediate_size=48,
                     num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                     head_dim=8, max_position_embeddings=64, rms_norm_eps=1e-6)
N = 4


@pytest.fixture(scope="module")
def setup():
  model = CausalLM.random(CONFIG, seed=0)
  configs = [ja.LoraConfig(r=4, target_modules="all-linear"),
             ja.LoraConfig(r=2, target_modules="all-linear", lora_alpha=4.0),
             ja.LoraConfig(r=6, target_modules=["q_proj", "v_proj", "down_proj"]),
             ja.LoraConfig(r=4, target_modules="all-linear", lora_alpha=2.0)]
  adapters = [perturbed(ja.init_lora(model, c, seed=i), 40 + i) for i, c in enumerate(configs)]
  m = meteora.build_meteora(model, adapters, names=["a", "b", "c", "d"], top_k=2, seed=3)
  # Gates large enough that the top-k differ between tokens and paths.
  m = m.with_gates({p: 4 * w for p, w in m.gates.items()})
  ids = np.random.default_rng(0).integers(0, CONFIG.vocab_size, (3, 7)).astype(np.int32)
  return model, adapters, m, ids


def _expert_reference(x, kernel, adapters, path, w_gate, temperature, k):
  """Eq. 3-4 written out, one expert at a time: y = x W + sum_j w_j s_j (x A_j) B_j."""
  g = x @ w_gate
  top_g, top = jax.lax.top_k(g, k)
  w = jax.nn.softmax(top_g / temperature, axis=-1)
  y = x @ kernel
  for n, ad in enumerate(adapters):
    if path not in ad.weights:
      continue
    delta = ad.scale(path) * (x @ ad.weights[path]["a"]) @ ad.weights[path]["b"]
    weight = jnp.sum(jnp.where(top == n, w, 0), axis=-1, keepdims=True)
    y = y + weight * delta
  return y


@pytest.fixture(params=["dense", "gather"])
def impl(request, monkeypatch):
  """Forces the top-k op's form (the hook asks for "auto")."""
  monkeypatch.setattr(kernels_pallas.ops, "topk_impl", lambda *a, **k: request.param)
  return request.param


@pytest.mark.parametrize("k", [1, 2])
def test_topk_projection_equals_per_expert_reference(setup, impl, k):
  model, adapters, m, _ = setup
  rng = np.random.default_rng(1)
  ctx = m.context(top_k=k, temperature=1.7)
  for path in ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj",
               "model.layers.1.self_attn.k_proj"):
    kernel = lora_lib.kernel_at(model.params, path)
    x = jnp.asarray(rng.normal(size=(2, 5, kernel.shape[0])), jnp.float32)
    got = project(x, kernel, None, ctx, path)
    want = _expert_reference(x.reshape(-1, x.shape[-1]), kernel, adapters, path, m.gates[path],
                             1.7, k).reshape(got.shape)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-5, rtol=1e-5)


def test_gate_gradients_equal_jax_grad_of_the_reference(setup, impl):
  """d(loss)/d(W_g, x) through the hook equals `jax.grad` of the per-expert reference (k = 2:
  the softmax over two logits carries the gradient)."""
  model, adapters, m, _ = setup
  path = "model.layers.0.mlp.up_proj"
  kernel = lora_lib.kernel_at(model.params, path)
  x = jnp.asarray(np.random.default_rng(2).normal(size=(9, kernel.shape[0])), jnp.float32)
  weight = jnp.cos(jnp.arange(9 * kernel.shape[1], dtype=jnp.float32)).reshape(9, -1)

  def ours(w_gate, x):
    ctx = meteora.routed(m.stacks, {**m.gates, path: w_gate}, temperature=1.3, top_k=2)
    return jnp.sum(jnp.sin(project(x, kernel, None, ctx, path)) * weight)

  def ref(w_gate, x):
    y = _expert_reference(x, kernel, adapters, path, w_gate, 1.3, 2)
    return jnp.sum(jnp.sin(y) * weight)

  got = jax.jit(jax.grad(ours, argnums=(0, 1)))(m.gates[path], x)
  want = jax.grad(ref, argnums=(0, 1))(m.gates[path], x)
  for g, w in zip(got, want):
    assert np.abs(np.asarray(w)).max() > 1e-3
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=2e-5, rtol=1e-4)


def test_dense_topk_op_equals_the_spec():
  """`lora_topk(impl="dense")` against `reference.lora_topk`: ranks below the stack's, skipped
  and out-of-range slots, and gradients with respect to x, A, B and the gates."""
  rng = np.random.default_rng(3)
  t, d, o, n, r = 11, 6, 5, 3, 4
  x = jnp.asarray(rng.normal(size=(t, d)), jnp.float32)
  y = jnp.asarray(rng.normal(size=(t, o)), jnp.float32)
  a = jnp.asarray(rng.normal(size=(n, d, r)), jnp.float32)
  b = jnp.asarray(rng.normal(size=(n, r, o)), jnp.float32)
  scales = jnp.asarray([0.5, 2.0, 1.0], jnp.float32)
  ranks = jnp.asarray([4, 2, 3], jnp.int32)
  ids = jnp.asarray(rng.integers(-1, n, (t, 2)), jnp.int32)
  gates = jnp.asarray(rng.uniform(0.1, 1, (t, 2)), jnp.float32)

  def loss(fn, *args):
    return jnp.sum(jnp.sin(fn(y, *args[:3], scales, ids, args[3], ranks=ranks)))

  dense = lambda *z, **kw: kernels_pallas.lora_topk(*z, impl="dense", **kw)
  np.testing.assert_allclose(
      np.asarray(dense(y, x, a, b, scales, ids, gates, ranks=ranks)),
      np.asarray(reference.lora_topk(y, x, a, b, scales, ids, gates, ranks=ranks)), atol=1e-5)
  got = jax.grad(lambda *z: loss(dense, *z), argnums=(0, 1, 2, 3))(x, a, b, gates)
  want = jax.grad(lambda *z: loss(reference.lora_topk, *z), argnums=(0, 1, 2, 3))(x, a, b, gates)
  for g, w in zip(got, want):
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=1e-5, rtol=1e-5)
  with pytest.raises(ValueError, match="impl must be 'gather', 'dense' or 'auto', got 'x'"):
    kernels_pallas.lora_topk(y, x, a, b, scales, ids, gates, impl="x")
  assert kernels_pallas.topk_impl(8, 1, 16, 128, 384) == "dense"
  assert kernels_pallas.topk_impl(8, 1, 16, 512, 1536) == "gather"
  assert kernels_pallas.topk_impl(32, 2, 16, 128, 128) == "gather"


def test_whole_forward_paths_agree_and_k_equal_n_at_high_temperature_is_the_average(setup):
  """Dense and gather forms give the same logits; k = N with T -> inf is the uniform average
  of the adapters, checked against the base with every kernel replaced by
  W + (1/N) sum_n delta_n (the adapters' merged weights)."""
  model, adapters, m, ids = setup
  out = {}
  for form in ("dense", "gather"):
    real = kernels_pallas.ops.topk_impl
    kernels_pallas.ops.topk_impl = lambda *a, form=form, **k: form
    try:
      out[form] = np.asarray(m(ids, top_k=2, temperature=0.8))
      uniform = np.asarray(m(ids, top_k=N, temperature=1e9))
    finally:
      kernels_pallas.ops.topk_impl = real
    params = jax.tree.map(lambda v: v, model.params)
    for path in m.paths:
      kernel = lora_lib.kernel_at(params, path)
      delta = sum(lora_lib.delta_weight(ad, path) for ad in adapters if path in ad.weights)
      params = lora_lib._set_kernel(params, path, kernel + delta / N)  # pylint: disable=protected-access
    want = np.asarray(forward(model.graphdef, params, jnp.asarray(ids)))
    np.testing.assert_allclose(uniform, want, atol=2e-4, rtol=1e-4)
  np.testing.assert_allclose(out["dense"], out["gather"], atol=2e-5, rtol=1e-5)
  assert np.abs(out["dense"] - np.asarray(model(ids))).max() > 1e-2  # the adapters matter


def test_generate_routes_every_step_like_the_full_forward(setup):
  """Greedy `generate` (prefill + KV-cache decode, gates evaluated at every step) equals the
  argmax of full forwards re-run on the growing sequence."""
  model, _, m, ids = setup
  prompt = [int(t) for t in ids[0]]
  got = m.generate([prompt], max_new_tokens=6, eos_token_id=[], temperature=1.5).ids[0]
  seq = list(prompt)
  for _ in range(6):
    logits = m(np.asarray([seq], np.int32), temperature=1.5)
    seq.append(int(np.argmax(np.asarray(logits)[0, -1])))
  assert got == seq[len(prompt):]


def test_gate_logits_and_gate_loss(setup):
  """The tape holds every gated path's g = x W_g; the gate loss is the mean over gates of the
  token-mean cross-entropy, labels < 0 left out."""
  model, _, m, ids = setup
  logits, tape = meteora.forward_with_gate_logits(model.graphdef, model.params, m.stacks,
                                                  m.gates, jnp.asarray(ids), top_k=2)
  assert sorted(tape) == sorted(m.paths) and len(tape) == 14
  np.testing.assert_allclose(np.asarray(logits), np.asarray(m(ids)), atol=1e-5)
  # The first layer's q_proj input is the normed embedding: g equals it times W_g.
  path = "model.layers.0.self_attn.q_proj"
  emb = model.params["model"]["embed_tokens"]["embedding"][ids.reshape(-1)]
  norm_w = model.params["model"]["layers"][0]["input_layernorm"]["weight"]
  x = emb / np.sqrt(np.mean(np.square(emb), -1, keepdims=True) + 1e-6) * norm_w
  np.testing.assert_allclose(np.asarray(tape[path]), np.asarray(x @ m.gates[path]), atol=1e-4)
  labels = np.random.default_rng(4).integers(-1, N, ids.size)
  got = float(meteora.gate_cross_entropy(tape, jnp.asarray(labels)))
  keep = labels >= 0
  want = np.mean([np.mean(-jax.nn.log_softmax(np.asarray(g), -1)[keep, labels[keep]])
                  for g in tape.values()])
  np.testing.assert_allclose(got, want, rtol=1e-5)
  routing = m.routing(ids)
  np.testing.assert_allclose(np.asarray(routing[path]).reshape(-1, N), np.asarray(tape[path]),
                             atol=1e-5)


def test_save_and_load_round_trip(setup, tmp_path):
  model, _, m, ids = setup
  m.save(tmp_path / "m")
  back = meteora.load_meteora(tmp_path / "m", model)
  assert back.names == m.names and back.top_k == 2
  np.testing.assert_allclose(np.asarray(back(ids)), np.asarray(m(ids)), atol=1e-6)
  assert ja.load_meteora is meteora.load_meteora
  other = CausalLM.random(LlamaConfig(**{**CONFIG.__dict__, "hidden_size": 48}), seed=1)
  with pytest.raises(ValueError, match="trained on a base with {'hidden_size': 32}"):
    meteora.load_meteora(tmp_path / "m", other)
  with pytest.raises(FileNotFoundError, match="no meteora_config.json"):
    meteora.load_meteora(tmp_path, model)
  with pytest.raises(ValueError, match="were given as LoraAdapters.*copy_adapters=True"):
    m.save(tmp_path / "refs", copy_adapters=False)


def test_the_shipped_default_gates_load_by_name():
  """`load_meteora("default")`: gates over the default's task adapters, which the config names
  ("default:<task>") instead of copying; each adapter equals the shipped one."""
  m = ja.load_meteora("default")
  assert m.names == ja.default.TASKS and len(m.gates) == 28 and m.top_k == 2
  assert m.sources == tuple(f"default:{t}" for t in ja.default.TASKS)
  shipped = ja.load_adapter("default:upper")
  path = "model.layers.2.mlp.up_proj"
  np.testing.assert_array_equal(np.asarray(m.adapters[2].weights[path]["a"]),
                                np.asarray(shipped.weights[path]["a"]))


def test_bad_arguments_are_refused(setup):
  model, adapters, m, _ = setup
  with pytest.raises(ValueError, match=r"top_k must be an int in \[1, 4\]"):
    m.context(top_k=5)
  with pytest.raises(ValueError, match="temperature must be a finite float > 0"):
    m.context(temperature=0)
  path = "model.layers.0.self_attn.q_proj"
  with pytest.raises(ValueError, match=rf"the gate at {path} must be \[32, 4\].*found \[32, 3\]"):
    m.with_gates({**m.gates, path: np.zeros((32, 3))})
  with pytest.raises(ValueError, match="no gate for 1 adapter path"):
    m.with_gates({p: w for p, w in m.gates.items() if p != path})
  with pytest.raises(ValueError, match="generate\\(context=\\) takes a context without"):
    model.generate([[1, 2]], context=ja.Context(attention=model.init_cache(1, 8)))
