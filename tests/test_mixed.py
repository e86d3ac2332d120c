"""A mixed batch (each sequence its own adapter, or none) equals per-sequence runs."""
import numpy as np

import jaxadapt as ja
from _adapter_helpers import perturbed
from jaxadapt.adapters.lora import LoraAdapter


def test_mixed_batch_equals_per_sequence(llama_dir):
  directory, _ = llama_dir
  model = ja.load_model(directory)
  configs = [
      ja.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
      ja.LoraConfig(r=2, lora_alpha=4, target_modules="all-linear", use_rslora=True),
      ja.LoraConfig(r=8, lora_alpha=8, target_modules=["down_proj", "o_proj"], use_dora=True,
                    rank_pattern={"o_proj": 3}),
  ]
  adapters = [perturbed(ja.init_lora(model, c, seed=i), 10 + i) for i, c in enumerate(configs)]
  rng = np.random.default_rng(0)
  ids = rng.integers(0, 97, (5, 7))
  mask = np.ones_like(ids)
  mask[1, :2] = 0  # left padding
  mask[3, -3:] = 0  # right padding
  which = [0, 1, -1, 2, 0]
  mixed = np.asarray(model(ids, attention_mask=mask, adapters=adapters, adapter_ids=which))
  for i, a in enumerate(which):
    alone = np.asarray(model(ids[i:i + 1], attention_mask=mask[i:i + 1],
                             adapter=None if a < 0 else adapters[a]))
    real = mask[i].astype(bool)
    np.testing.assert_allclose(mixed[i][real], alone[0][real], atol=1e-5, rtol=0)
  # The adapters do change the output (the check above cannot pass vacuously).
  base = np.asarray(model(ids, attention_mask=mask))
  for i in (0, 1, 3):
    assert np.abs(mixed[i] - base[i]).max() > 1e-2


def test_mixed_batch_bad_ids_are_refused(llama_dir):
  import pytest
  model = ja.load_model(llama_dir[0])
  a = ja.init_lora(model, ja.LoraConfig(target_modules=["q_proj"]))
  ids = np.zeros((2, 3), np.int32)
  with pytest.raises(ValueError, match="adapter_ids"):
    model(ids, adapters=[a], adapter_ids=[0, 1])
  with pytest.raises(ValueError, match="adapter_ids"):
    model(ids, adapters=[a], adapter_ids=[0])
  with pytest.raises(ValueError, match="not both"):
    model(ids, adapter=a, adapters=[a], adapter_ids=[0, 0])


def test_per_token_ids_equal_per_sequence_ids(llama_dir):
  """The hook's per-token path (S-LoRA decode/BGMV layout) equals its per-sequence path."""
  from jaxadapt.adapters import stack as stack_lib
  model = ja.load_model(llama_dir[0])
  adapters = [perturbed(ja.init_lora(model, ja.LoraConfig(r=r, target_modules="all-linear",
                                                           use_dora=d), seed=r), r)
              for r, d in ((2, False), (5, True))]
  ids = np.random.default_rng(1).integers(0, 97, (3, 6))
  which = np.array([1, -1, 0])
  stacks = stack_lib.stack_adapters(model.params, adapters)
  per_seq = model(ids, context=stack_lib.mixed_context(stacks, which, layout="sequence"))
  per_tok = model(ids, context=stack_lib.mixed_context(stacks, np.repeat(which, ids.shape[1]),
                                                       layout="token"))
  np.testing.assert_allclose(np.asarray(per_tok), np.asarray(per_seq), atol=1e-5, rtol=0)
  alone = model(ids[:1], adapter=adapters[1])
  np.testing.assert_allclose(np.asarray(per_tok[:1]), np.asarray(alone), atol=1e-5, rtol=0)


def _stack_setup(llama_dir, use_dora=False):
  from jaxadapt.adapters import stack as stack_lib
  model = ja.load_model(llama_dir[0])
  adapters = [perturbed(ja.init_lora(model, ja.LoraConfig(r=r, target_modules=t, use_dora=use_dora),
                                      seed=r), r)
              for r, t in ((3, "all-linear"), (6, ["q_proj", "down_proj"]), (1, ["v_proj"]))]
  return model, adapters, stack_lib.stack_adapters(model.params, adapters)


def test_paged_pool_equals_dense_stack(llama_dir):
  """Adapters read from shuffled pages of a pool (S-LoRA unified paging) == the dense stack."""
  from jaxadapt.adapters import stack as stack_lib
  model, adapters, stacks = _stack_setup(llama_dir, use_dora=True)
  ids = np.random.default_rng(2).integers(0, 97, (4, 5))
  which = np.array([2, 0, -1, 1])
  tokens = np.repeat(which, ids.shape[1])
  dense = model(ids, context=stack_lib.mixed_context(stacks, tokens, layout="token"))
  for page_rows in (1, 4):
    paged = stack_lib.page_stacks(stacks, page_rows, seed=page_rows)
    out = model(ids, context=stack_lib.mixed_context(paged, tokens, layout="token"))
    np.testing.assert_allclose(np.asarray(out), np.asarray(dense), atol=1e-5, rtol=0)
  alone = model(ids[:1], adapter=adapters[2])
  np.testing.assert_allclose(np.asarray(dense[:1]), np.asarray(alone), atol=1e-5, rtol=0)


def test_gated_topk_equals_weighted_sum_of_adapters(llama_dir):
  """MeteoRA's gated context at every projection == the gate-weighted sum of single LoRAs
  (MeteoRA Eq. 3-4), checked projection by projection against the jnp specification."""
  import jax.numpy as jnp
  from jaxadapt.adapters import stack as stack_lib
  from jaxadapt.adapters.hook import SingleLoRA, project
  from jaxadapt.adapters.lora import kernel_at
  model, adapters, stacks = _stack_setup(llama_dir)
  rng = np.random.default_rng(3)
  t = 7
  topk = np.stack([rng.permutation(3)[:2] for _ in range(t)]).astype(np.int32)
  topk[0, 1] = -1  # a skipped slot
  gates = rng.uniform(0.1, 1.0, (t, 2)).astype(np.float32)
  ctx = stack_lib.gated_context(stacks, topk, gates)
  for path in ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"):
    kernel = kernel_at(model.params, path)
    x = jnp.asarray(rng.normal(size=(t, kernel.shape[0])), jnp.float32)
    got = project(x, kernel, None, ctx, path)
    want = np.array(x @ kernel)
    for i in range(t):
      for j in range(2):
        a = topk[i, j]
        if a < 0 or path not in adapters[a].weights:
          continue
        w = adapters[a].weights[path]
        single = SingleLoRA(a=w["a"], b=w["b"], scale=jnp.float32(adapters[a].scale(path)))
        want[i] += gates[i, j] * np.asarray(project(x[i:i + 1], kernel, None, single)
                                            - x[i:i + 1] @ kernel)[0]
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-5, rtol=0)


def test_hook_runs_the_pallas_kernels(llama_dir):
  """The hook's mixed path through the interpreted Pallas kernels == its XLA path."""
  import jax.numpy as jnp
  import kernels_pallas
  from jaxadapt.adapters import stack as stack_lib
  from jaxadapt.adapters.hook import project
  from jaxadapt.adapters.lora import kernel_at
  model, _, stacks = _stack_setup(llama_dir)
  path = "model.layers.1.self_attn.q_proj"
  kernel = kernel_at(model.params, path)
  x = jnp.asarray(np.random.default_rng(4).normal(size=(2, 5, kernel.shape[0])), jnp.float32)
  outs = {}
  for backend in ("xla", "pallas_interpret"):
    kernels_pallas.set_backend(backend)
    try:
      per_seq = stack_lib.mixed_context(stacks, np.array([1, 0]), layout="sequence")
      per_tok = stack_lib.mixed_context(stacks, np.array([1, 1, 0, -1, 2] * 2), layout="token")
      outs[backend] = (project(x, kernel, None, per_seq, path),
                       project(x, kernel, None, per_tok, path))
    finally:
      kernels_pallas.set_backend("auto")
  for got, want in zip(outs["pallas_interpret"], outs["xla"]):
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5, rtol=0)
  assert np.abs(np.asarray(outs["xla"][0]) - np.asarray(x @ kernel)).max() > 1e-3


def test_adapter_for_another_base_is_refused(llama_dir):
  """An adapter whose weights do not fit the kernels fails early with both shapes named."""
  import pytest
  model = ja.load_model(llama_dir[0])
  a = ja.init_lora(model, ja.LoraConfig(r=2, target_modules=["q_proj"]))
  path = next(iter(a.weights))
  bad = LoraAdapter(weights={**a.weights, path: dict(a.weights[path],
                                                     a=np.zeros((16, 2), np.float32))},
                    config=a.config)
  ids = np.zeros((1, 3), np.int32)
  with pytest.raises(ValueError, match=r"do not fit .*\[32, 32\].*found a \[16, 2\]"):
    model(ids, adapter=bad)
  with pytest.raises(ValueError, match="do not fit"):
    model(ids, adapters=[a, bad], adapter_ids=[1])
  with pytest.raises(ValueError, match="do not fit"):
    ja.merge(model, bad)


def test_dora_in_bfloat16_rounds_once():
  """DoRA's `m/n * (x W + s x A B)` in bfloat16 (one adapter, and a mixed batch with per-row
  `m/n`) is combined in float32 and rounded once. Inputs are small multiples of powers of two,
  so every bfloat16 matmul is exact and the combination is the only rounding: within half a
  bfloat16 ulp (2^-8 relative) of the float32 computation."""
  import jax.numpy as jnp
  from jaxadapt.adapters import hook
  rng = np.random.default_rng(0)
  din, dout, r = 16, 32, 4  # |x W| <= 4 in steps of 1/4, |x A B| <= 4 in steps of 1/16: exact
  grid = lambda shape, step: jnp.asarray(rng.integers(-1, 2, shape) * step, jnp.bfloat16)
  x, w = grid((4, 8, din), 1.0), grid((din, dout), 0.25)
  a, b = grid((2, din, r), 0.25), grid((2, r, dout), 0.25)
  scale = jnp.array([2.0, 0.5])
  norms = jnp.stack([hook.dora_weight_norm(w, a[n], b[n], scale[n]) for n in range(2)])
  mag = (norms * jnp.asarray(1 + 0.3 * rng.random((2, dout)))).astype(jnp.bfloat16)
  f32 = lambda v: v.astype(jnp.float32)

  def check(got, want):
    assert got.dtype == jnp.bfloat16
    err = np.abs(np.asarray(f32(got)) - np.asarray(want))
    assert np.all(err <= 2.0 ** -8 * np.abs(np.asarray(want)) + 1e-6), float(err.max())

  def single(n, xs, dtype_of):
    return hook.SingleLoRA(a=dtype_of(a[n]), b=dtype_of(b[n]), scale=scale[n],
                           magnitude=dtype_of(mag[n]))
  check(hook.project(x, w, None, single(0, x, lambda v: v)),
        hook.project(f32(x), f32(w), None, single(0, x, f32)))
  ids = jnp.array([0, 1, -1, 1], jnp.int32)
  from jaxadapt.context import Context, Stack, make_routing
  mixed = Context(weights={"p": Stack(a=a, b=b, scale=scale, dora_scale=f32(mag) / norms)},
                  routing=make_routing("sequence", ids, 2))
  rows = [hook.project(f32(x[i]), f32(w), None, single(n, x, f32)) if n >= 0 else
          f32(x[i]) @ f32(w) for i, n in enumerate(ids.tolist())]
  check(hook.project(x, w, None, mixed, "p"), jnp.stack(rows))
