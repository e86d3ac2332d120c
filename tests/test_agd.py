"""AGD adapters (jaxadapt.agd): zero-init start, each kind against a hand-written jnp reference,
the guidance scale traced, save/load, the CFG trajectory (Algorithm 1) against direct CFG, and
`pipe.generate(guidance="agd")` as one conditional pass per step.

The models are tiny random DiT / U-Net modules built in JAX (no torch needed): the adapters'
math is checked against the jnp specification of AGD (Jensen & Sadat 2025) written out here.
"""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxadapt as ja
from jaxadapt import agd as agd_lib
from jaxadapt.adapters.lora import LoraConfig
from jaxadapt.diffusion import sampling
from jaxadapt.diffusion.pipeline import DiTPipeline
from jaxadapt.diffusion.schedulers import scheduler_from_config
from jaxadapt.models import diffusion_layers as dl
from jaxadapt.models.dit import DiT, DiTConfig, DiTTransformer2DModel
from jaxadapt.models.unet import UNet, UNetConfig, UNet2DConditionModel

SCHED = {"_class_name": "DDIMScheduler", "num_train_timesteps": 1000, "beta_start": 0.0001,
         "beta_end": 0.02, "beta_schedule": "linear", "clip_sample": False,
         "set_alpha_to_one": True, "steps_offset": 0, "prediction_type": "epsilon"}


def _perturbed(model_cls, config, seed):
  """A random module with biases and norms moved off their init (so every path matters)."""
  graphdef, state = nnx.split(model_cls(config, rngs=nnx.Rngs(seed)))
  params = nnx.to_pure_dict(state)
  keys = iter(jax.random.split(jax.random.key(seed + 1), 4096))
  params = jax.tree_util.tree_map_with_path(
      lambda kp, x: x + 0.3 * jax.random.normal(next(keys), x.shape, x.dtype)
      if "bias" in jax.tree_util.keystr(kp) or "linear" in jax.tree_util.keystr(kp) else x,
      params)
  return graphdef, params


@pytest.fixture(scope="module")
def dit():
  cfg = DiTConfig(num_attention_heads=2, attention_head_dim=8, in_channels=1, out_channels=1,
                  num_layers=2, sample_size=8, patch_size=2, num_embeds_ada_norm=10)
  return DiT(cfg, *_perturbed(DiTTransformer2DModel, cfg, 0))


@pytest.fixture(scope="module")
def unet():
  cfg = UNetConfig(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32),
                   layers_per_block=(1, 1), norm_num_groups=8, cross_attention_dim=(12, 12),
                   attention_head_dim=(2, 2),
                   down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                   up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
                   transformer_layers_per_block=(1, 1))
  return UNet(cfg, *_perturbed(UNet2DConditionModel, cfg, 3))


def _inputs(b=4, seed=0):
  x = jax.random.normal(jax.random.key(seed), (b, 1, 8, 8))
  return x, jnp.array([10, 300, 600, 990][:b]), jnp.array([1, 4, 7, 10][:b])


def _trained(adapter, seed=5, scale=0.2):
  """The adapter with every weight moved (the zero-initialised outputs included)."""
  keys = iter(jax.random.split(jax.random.key(seed), 512))
  params = jax.tree.map(lambda x: x + scale * jax.random.normal(next(keys), x.shape),
                        agd_lib.trainable_part(adapter.params))
  return agd_lib.AGDAdapter(adapter.config, agd_lib.with_trainable(adapter.params, params))


# -- the jnp specification --------------------------------------------------------------------

def _ln(x):
  return (x - x.mean(-1, keepdims=True)) / jnp.sqrt(x.var(-1, keepdims=True) + 1e-6)


def _w_embedding(params, w):
  m = params["w_mlp"]
  f = np.asarray(params["fourier"])
  feats = np.concatenate([np.sin(2 * np.pi * w[:, None] * f), np.cos(2 * np.pi * w[:, None] * f)],
                         -1)
  h = jax.nn.silu(feats @ m["l1"] + m["b1"]) @ m["l2"] + m["b2"]
  return _ln(h) * m["ln_scale"] + m["ln_bias"]


def _reference_insert(adapter, point, w):
  """The adapter at `point` written out from AGD's description (module docstring)."""
  p, params, c = adapter.params["points"][point], adapter.params, adapter.config

  def fn(out, hidden_in, cond, inputs):
    temb, cemb = inputs["timestep_emb"], inputs.get("class_emb")
    ew = _w_embedding(params, np.broadcast_to(w, (out.shape[0],)))
    if c.kind in ("offset", "token"):
      e = ew + jax.nn.silu(temb) @ p["t"] + p["b"]
      if cemb is not None:
        e = e + jax.nn.silu(cemb) @ p["c"]
      if c.kind == "offset":
        return out + (jax.nn.silu(e) @ p["out"] + p["out_b"])[:, None]
      z = _ln(hidden_in) @ p["h"] + _ln(out) @ p["a"] + e[:, None]
      return out + jax.nn.gelu(z) @ p["out"] + p["out_b"]
    toks = [ew, jax.nn.silu(temb) @ p["t"] + p["b"]]
    if cemb is not None:
      toks.append(jax.nn.silu(cemb) @ p["c"])
    toks = jnp.stack(toks, 1)
    if cond is not None:
      toks = jnp.concatenate([toks, cond @ p["ctx"]], 1)
    toks = toks + p["pos"]
    q, k, v = _ln(hidden_in) @ p["q"], toks @ p["k"], toks @ p["v"]
    heads = c.heads
    outs = []
    for h in range(heads):  # one head at a time
      sl = slice(h * q.shape[-1] // heads, (h + 1) * q.shape[-1] // heads)
      s = jnp.einsum("bnd,bmd->bnm", q[..., sl], k[..., sl]) / np.sqrt(q.shape[-1] // heads)
      outs.append(jax.nn.softmax(s, -1) @ v[..., sl])
    return out + jnp.concatenate(outs, -1) @ p["out"] + p["out_b"]
  return fn


# -- tests ------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", agd_lib.KINDS)
def test_zero_init_is_the_base(dit, kind):
  """AGD starts from the base: the last projections are zero, so the output is the base's."""
  x, t, y = _inputs()
  adapter = agd_lib.init_agd(dit, kind=kind, hidden=16)
  base = np.asarray(dit(x, t, y))
  got = np.asarray(dit(x, t, y, context=adapter.context(jnp.array([1.0, 2.0, 4.0, 7.0]))))
  # The adapters add exact zeros; the base's own ops may be fused differently once they are in
  # the program (XLA:CPU's loop emitters, tests/conftest.py), hence float rounding, not bits.
  np.testing.assert_allclose(got, base, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("kind", agd_lib.KINDS)
def test_each_kind_equals_its_reference(dit, kind):
  """A trained adapter's forward equals the DiT with the reference inserts (every block)."""
  x, t, y = _inputs()
  adapter = _trained(agd_lib.init_agd(dit, kind=kind, hidden=16, heads=2))
  w = np.array([1.0, 2.5, 4.0, 6.0], np.float32)
  got = np.asarray(dit(x, t, y, context=adapter.context(w)))
  ref_inserts = {pt: _reference_insert(adapter, pt, w) for pt in adapter.config.points}
  want = np.asarray(dl.apply(dit.graphdef, dit.params, "__call__", x, t, y,
                             ctx=ja.Context().with_inserts(ref_inserts)))
  base = np.asarray(dit(x, t, y))
  assert np.abs(want - base).max() > 1e-2  # the reference moves the output
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


def test_the_offset_is_one_vector_per_sample(dit):
  """The offset adapter adds the same vector to every token of a sample (AGD's DiT adapter)."""
  adapter = _trained(agd_lib.init_agd(dit, kind="offset", hidden=8))
  point = adapter.config.points[0]
  seen = {}
  fn = adapter.inserts()[point]
  out = jnp.zeros((2, 16, dit.config.inner_dim))
  hidden = jax.random.normal(jax.random.key(0), out.shape)
  inputs = {"guidance_scale": jnp.array([2.0, 5.0]), "timestep_emb": jnp.ones((2, 16)),
            "class_emb": jnp.ones((2, 16))}
  seen["delta"] = np.asarray(fn(out, hidden, None, inputs))
  np.testing.assert_allclose(seen["delta"], np.broadcast_to(seen["delta"][:, :1], out.shape))
  assert np.abs(seen["delta"][0] - seen["delta"][1]).max() > 1e-3  # w moves it


def test_unet_cross_attention_adapter_equals_reference(unet):
  """The U-Net default: cross-attention adapters on every attn2, over [w, t, prompt tokens]."""
  adapter = _trained(agd_lib.init_agd(unet, hidden=8, heads=2, context_tokens=5))
  assert adapter.config.points and all(p.endswith("attn2") for p in adapter.config.points)
  assert adapter.config.class_dim == 0 and adapter.config.context_dim == 12
  x = jax.random.normal(jax.random.key(1), (2, 4, 8, 8))
  t, ehs = jnp.array([50, 700]), jax.random.normal(jax.random.key(2), (2, 5, 12))
  w = np.array([2.0, 4.5], np.float32)
  zero = agd_lib.init_agd(unet, hidden=8, heads=2, context_tokens=5)
  np.testing.assert_array_equal(np.asarray(unet(x, t, ehs, context=zero.context(w))),
                                np.asarray(unet(x, t, ehs)))
  got = np.asarray(unet(x, t, ehs, context=adapter.context(w)))
  ref = {pt: _reference_insert(adapter, pt, w) for pt in adapter.config.points}
  want = np.asarray(dl.apply(unet.graphdef, unet.params, "__call__", x, t, ehs,
                             ctx=ja.Context().with_inserts(ref)))
  assert np.abs(want - np.asarray(unet(x, t, ehs))).max() > 1e-3
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


def test_guidance_scale_and_weights_are_traced(dit):
  """A new w or new adapter weights reuse the compiled forward (no recompiles per step)."""
  x, t, y = _inputs()
  adapter = agd_lib.init_agd(dit, kind="token", hidden=8)
  traces = []

  @jax.jit
  def run(params, w):
    traces.append(1)
    ctx = agd_lib.context(adapter.config, params, w)
    return dl.apply(dit.graphdef, dit.params, "__call__", x, t, y, ctx=ctx)
  a = run(_trained(adapter).params, jnp.float32(2.0))
  b = run(_trained(adapter).params, jnp.float32(5.0))
  c = run(_trained(adapter, seed=9).params, jnp.float32(5.0))
  assert len(traces) == 1
  assert np.abs(np.asarray(a - b)).max() > 1e-4 and np.abs(np.asarray(b - c)).max() > 1e-4


def test_parameter_count(dit):
  adapter = agd_lib.init_agd(dit, kind="offset", hidden=16)
  c, d, h, f = adapter.config, dit.config.inner_dim, 16, 64
  per_point = 2 * d * h + h + h * d + d   # P_t, P_c, b; W_o, b_o
  shared = f * h + h + h * h + h + 2 * h  # the w MLP and its LayerNorm
  assert adapter.num_params == len(c.points) * per_point + shared
  total = sum(x.size for x in jax.tree.leaves(dit.params))
  assert adapter.fraction_of(dit) == pytest.approx(adapter.num_params / total)


def test_save_load_roundtrip_and_errors(dit, unet, tmp_path):
  adapter = _trained(agd_lib.init_agd(dit, kind="cross_attention", hidden=8, heads=2))
  adapter.save(str(tmp_path / "a"))
  back = agd_lib.load_agd(str(tmp_path / "a"), dit)
  assert back.config == adapter.config
  for (kp, a), b in zip(jax.tree_util.tree_leaves_with_path(adapter.params),
                        jax.tree.leaves(back.params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=str(kp))
  with pytest.raises(FileNotFoundError, match="no AGD adapter"):
    agd_lib.load_agd(str(tmp_path))
  with pytest.raises(ValueError, match="no attention module"):
    agd_lib.load_agd(str(tmp_path / "a"), unet)
  wide = DiT(dataclasses.replace(dit.config, attention_head_dim=16),
             *_perturbed(DiTTransformer2DModel, dataclasses.replace(dit.config,
                                                                   attention_head_dim=16), 1))
  with pytest.raises(ValueError, match="built for width 16, the model's is 32"):
    back.check_model(wide)
  with pytest.raises(ValueError, match="kind must be one of"):
    agd_lib.init_agd(dit, kind="lora")
  with pytest.raises(ValueError, match="lacks insert inputs"):
    dit(*_inputs(), inserts=adapter.inserts())  # no guidance_scale in the context


def test_cfg_trajectory_records_direct_cfg(dit):
  """Algorithm 1: every recorded eps_cfg is eps_u + w (eps_c - eps_u) at the recorded x_t, and
  the trajectory ends where the CFG sampler ends."""
  sched = scheduler_from_config(SCHED)
  x0, _, y = _inputs()
  w = jnp.array([1.5, 3.0, 4.0, 6.0])
  denoise = jax.tree_util.Partial(lambda g, p, x, t, c: dl.apply(g, p, "__call__", x, t, c),
                                  dit.graphdef, dit.params)
  rec = jax.jit(agd_lib.cfg_trajectory, static_argnums=(1, 6))(
      denoise, sched, x0, y, jnp.full_like(y, 10), w, 5)
  assert rec["x"].shape == (5, 4, 1, 8, 8) and rec["t"].shape == (5,)
  for i in (0, 3):
    x, t = rec["x"][i], jnp.broadcast_to(rec["t"][i], (4,))
    eps_c, eps_u = dit(x, t, y), dit(x, t, jnp.full_like(y, 10))
    np.testing.assert_allclose(np.asarray(rec["eps_cond"][i]), np.asarray(eps_c), atol=1e-5)
    np.testing.assert_allclose(np.asarray(rec["eps_cfg"][i]),
                               np.asarray(eps_u + w[:, None, None, None] * (eps_c - eps_u)),
                               atol=1e-5)
  final = sampling.sample(denoise, sched, x0, y, jnp.full_like(y, 10), w, 5, None)
  np.testing.assert_allclose(np.asarray(rec["sample"]), np.asarray(final), atol=1e-5)
  assert np.abs(np.asarray(rec["eps_cfg"] - rec["eps_cond"])).max() > 1e-3


def test_gap_recovered():
  c = np.zeros((2, 3))
  g = np.ones((2, 3))
  assert agd_lib.gap_recovered(g, c, g) == 1.0
  assert agd_lib.gap_recovered(c, c, g) == 0.0
  assert agd_lib.gap_recovered(0.25 * g, c, g) == pytest.approx(0.25)
  with pytest.raises(ValueError, match="no gap"):
    agd_lib.gap_recovered(c, c, c)


@pytest.fixture(scope="module")
def pipe(dit):
  """A pixel-space DiT pipeline (no VAE), as train/digits.py writes one."""
  return DiTPipeline("mem", dit, None, SCHED, {"_class_name": "DiTPipeline"})


def test_generate_with_agd_is_one_pass_per_step(pipe, dit):
  """guidance="agd": the sampler calls the adapted model once per step at the given w."""
  adapter = _trained(agd_lib.init_agd(dit, kind="token", hidden=8))
  noise = np.asarray(jax.random.normal(jax.random.key(3), (2, 1, 8, 8)))
  got = pipe.generate(class_labels=[3, 8], guidance_scale=[2.0, 4.0], guidance="agd",
                      agd=adapter, num_steps=4, latents=noise, progress=False)
  assert got.shape == (2, 8, 8, 1) and got.dtype == np.uint8
  ctx_denoise = jax.tree_util.Partial(
      lambda g, p, ins, x, t, c: dl.apply(
          g, p, "__call__", x, t, c["c"],
          ctx=ja.Context().with_inserts(ins).with_insert_inputs(guidance_scale=c["w"])),
      dit.graphdef, dit.params, adapter.inserts())
  sched = scheduler_from_config(SCHED)
  z = sampling.sample(ctx_denoise, sched, jnp.asarray(noise),
                      {"c": jnp.array([3, 8]), "w": jnp.array([2.0, 4.0])}, None, None, 4, None)
  from jaxadapt.diffusion.images import to_uint8
  np.testing.assert_array_equal(got, to_uint8(z))
  # The zero adapter is the unguided conditional model.
  zero = agd_lib.init_agd(dit, kind="token", hidden=8)
  a = pipe.generate(class_labels=[3, 8], guidance_scale=4.0, guidance="agd", agd=zero,
                    num_steps=4, latents=noise, progress=False)
  b = pipe.generate(class_labels=[3, 8], guidance_scale=1.0, num_steps=4, latents=noise,
                    progress=False)
  np.testing.assert_array_equal(a, b)


def test_generate_refuses_bad_guidance(pipe, dit, unet):
  adapter = agd_lib.init_agd(dit, kind="offset", hidden=8)
  kw = dict(class_labels=[1], num_steps=2, progress=False)
  with pytest.raises(ValueError, match="guidance must be one of"):
    pipe.generate(guidance="distilled", **kw)
  with pytest.raises(TypeError, match="needs agd= an AGD adapter"):
    pipe.generate(guidance="agd", **kw)
  with pytest.raises(ValueError, match="pass guidance='agd'"):
    pipe.generate(agd=adapter, **kw)
  with pytest.raises(ValueError, match="no attention module"):
    pipe.generate(guidance="agd", agd=agd_lib.init_agd(unet, hidden=8, heads=2,
                                                      context_tokens=5), **kw)


def test_adapter_loads_onto_a_derived_checkpoint(dit, tmp_path):
  """An adapter trained on the base attaches to the base with a style LoRA merged in: same
  points and widths; on top of the merged weights it adds what it adds on the base."""
  adapter = _trained(agd_lib.init_agd(dit, kind="offset", hidden=8))
  adapter.save(str(tmp_path / "agd"))
  lora = ja.init_lora(dit, LoraConfig(r=4, lora_alpha=8, target_modules=("to_q", "to_v", "ff.net.2")),
                      seed=1)
  lora = dataclasses.replace(lora, weights={p: {**w, "b": w["b"] + 0.05}
                                            for p, w in lora.weights.items()})
  styled = ja.merge(dit, lora)
  back = agd_lib.load_agd(str(tmp_path / "agd"), styled)
  x, t, y = _inputs()
  base_styled = np.asarray(styled(x, t, y))
  assert np.abs(base_styled - np.asarray(dit(x, t, y))).max() > 1e-3  # the LoRA did something
  got = np.asarray(styled(x, t, y, context=back.context(3.0)))
  ref = {pt: _reference_insert(adapter, pt, np.float32(3.0)) for pt in adapter.config.points}
  want = np.asarray(dl.apply(styled.graphdef, styled.params, "__call__", x, t, y,
                             ctx=ja.Context().with_inserts(ref)))
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


def test_paper_configs_are_about_two_percent_of_their_bases():
  """The shipped DiT-XL/2 and SD 2.1 configs' adapters, counted on the real architectures
  (abstract shapes, nothing allocated): ~2% of the base, as the paper's adapters."""
  from train.configs import agd_dit_xl2, agd_sd21
  xl = DiTConfig()  # DiT-XL/2: 28 blocks of width 1152
  g, st = nnx.split(nnx.eval_shape(lambda: DiTTransformer2DModel(xl, rngs=nnx.Rngs(0))))
  dit = DiT(xl, g, nnx.to_pure_dict(st))
  cfg = agd_dit_xl2.get_config()
  shares = {}
  for kind in cfg.kinds:
    c = agd_lib.config_for(dit, kind=kind, hidden=cfg.hidden, heads=cfg.heads)
    shares[kind] = agd_lib.num_params(agd_lib.init_params_shapes(c)) / sum(
        x.size for x in jax.tree.leaves(dit.params))
  sd = UNetConfig(sample_size=96, block_out_channels=(320, 640, 1280, 1280),
                  attention_head_dim=(5, 10, 20, 20), cross_attention_dim=(1024,) * 4,
                  use_linear_projection=True)
  g, st = nnx.split(nnx.eval_shape(lambda: UNet2DConditionModel(sd, rngs=nnx.Rngs(0))))
  unet = UNet(sd, g, nnx.to_pure_dict(st))
  cfg = agd_sd21.get_config()
  c = agd_lib.config_for(unet, hidden=cfg.hidden, heads=cfg.heads, context_tokens=77)
  assert len(c.points) == 16  # every cross-attention module of SD 2.x
  shares["sd21"] = agd_lib.num_params(agd_lib.init_params_shapes(c)) / sum(
      x.size for x in jax.tree.leaves(unet.params))
  assert all(0.01 < s < 0.03 for s in shares.values()), shares


@pytest.mark.parametrize("kind", agd_lib.KINDS)
def test_scale_by_guidance(dit, kind):
  """With `scale_by_guidance` each point adds (w - 1) times what it adds without, so the
  adapted model is exactly the base at w = 1 whatever the weights."""
  plain = _trained(agd_lib.init_agd(dit, kind=kind, hidden=8, heads=2))
  gained = agd_lib.AGDAdapter(dataclasses.replace(plain.config, scale_by_guidance=True),
                              plain.params)
  point = plain.config.points[1]
  out = jax.random.normal(jax.random.key(4), (2, 16, dit.config.inner_dim))
  hidden = jax.random.normal(jax.random.key(5), out.shape)
  inputs = {"guidance_scale": jnp.array([1.0, 4.0]), "timestep_emb": jnp.ones((2, 16)),
            "class_emb": -jnp.ones((2, 16))}
  a = plain.inserts()[point](out, hidden, None, inputs) - out
  b = gained.inserts()[point](out, hidden, None, inputs) - out
  np.testing.assert_allclose(np.asarray(b), np.asarray(a * jnp.array([0.0, 3.0])[:, None, None]),
                             atol=1e-5)
  x, t, y = _inputs()
  np.testing.assert_allclose(np.asarray(dit(x, t, y, context=gained.context(1.0))),
                             np.asarray(dit(x, t, y)), rtol=1e-6, atol=1e-6)  # float rounding
