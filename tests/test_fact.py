"""FaceChain-FACT's face adapter (jaxadapt.fact) against references.

- The gated self-attention at every fuser point equals diffusers' GLIGEN fuser
  (`GatedSelfAttentionDense` inside a `UNet2DConditionModel(attention_type="gated")`, torch) at
  face scale 1, and the base exactly at zero gates (the untrained adapter) or scale 0.
- The projector, FAIR, drop, shuffle and curriculum against numpy written out here.
- Save / load and the errors a user meets.
"""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from jaxadapt import context as context_lib  # noqa: E402
from jaxadapt import fact as fact_lib  # noqa: E402
from jaxadapt.models import unet as unet_lib  # noqa: E402

GATED = dict(
    sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32),
    layers_per_block=1, norm_num_groups=8, cross_attention_dim=12, attention_head_dim=(2, 4),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"))
FACE_TOKENS, FACE_DIM, NUM_TOKENS = 9, 6, 3


def _t(x):
  return np.asarray(x.detach().numpy(), np.float32)


@pytest.fixture(scope="module")
def gated(tmp_path_factory):
  """A diffusers GLIGEN U-Net (random, gates and norms moved off init) and jaxadapt's U-Net of
  its base weights + the FACT params of its fusers."""
  torch.manual_seed(0)
  model = diffusers.UNet2DConditionModel(**GATED, attention_type="gated").eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith(".bias") or "norm" in name:
        p.add_(0.2 * torch.randn_like(p))
      if "alpha" in name:
        p.copy_(0.5 + torch.rand(()))
  sd = model.state_dict()
  base = diffusers.UNet2DConditionModel(**GATED).eval()
  base.load_state_dict({k: v for k, v in sd.items()
                        if ".fuser." not in k and not k.startswith("position_net")})
  d = str(tmp_path_factory.mktemp("unet"))
  base.save_pretrained(d)
  unet = unet_lib.load_unet(d)
  fact = fact_lib.init_fact(unet, face_tokens=FACE_TOKENS, face_dim=FACE_DIM,
                            num_tokens=NUM_TOKENS)
  names = {"in": "linear.weight", "in_b": "linear.bias", "q": "attn.to_q.weight",
           "k": "attn.to_k.weight", "v": "attn.to_v.weight", "o": "attn.to_out.0.weight",
           "o_b": "attn.to_out.0.bias", "ln1_scale": "norm1.weight", "ln1_bias": "norm1.bias",
           "ln2_scale": "norm2.weight", "ln2_bias": "norm2.bias",
           "ff1": "ff.net.0.proj.weight", "ff1_b": "ff.net.0.proj.bias",
           "ff2": "ff.net.2.weight", "ff2_b": "ff.net.2.bias", "alpha_attn": "alpha_attn",
           "alpha_ff": "alpha_dense"}
  points = {}
  for point in fact.config.points:
    p = {}
    for ours, theirs in names.items():
      w = _t(sd[f"{point}.{theirs}"])
      p[ours] = jnp.asarray(w.T if w.ndim == 2 else w)
    points[point] = p
  fact.params["points"] = points
  return model, unet, fact


def _inputs(batch=2, seed=0):
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((batch, 4, 8, 8)).astype(np.float32)
  text = rng.standard_normal((batch, 5, 12)).astype(np.float32)
  face = rng.standard_normal((batch, NUM_TOKENS, 12)).astype(np.float32)
  return x, np.array([10, 700][:batch]), text, face


def _diffusers_gligen(model, x, t, text, face):
  class Objs(torch.nn.Module):
    def forward(self, objs):
      return objs
  model.position_net = Objs()
  with torch.no_grad():
    return model(torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(text),
                 cross_attention_kwargs={"gligen": {"objs": torch.from_numpy(face)}}).sample.numpy()


def test_points_and_heads_follow_the_unet(gated):
  _, unet, fact = gated
  assert fact.config.points == tuple(unet.fuser_points)
  assert len(unet.fuser_points) == 7  # 2 down + 1 mid + 2 x 2 up transformer blocks
  assert all(p.endswith("transformer_blocks.0.fuser") for p in unet.fuser_points)
  assert set(unet.fuser_points) <= set(unet.insertion_points)
  by_block = dict(zip(fact.config.points, zip(fact.config.widths, fact.config.heads)))
  assert by_block["down_blocks.0.attentions.0.transformer_blocks.0.fuser"] == (16, 2)
  assert by_block["mid_block.attentions.0.transformer_blocks.0.fuser"] == (32, 4)
  assert by_block["up_blocks.1.attentions.0.transformer_blocks.0.fuser"] == (16, 2)
  assert fact.config.context_dim == 12


def test_equals_diffusers_gligen_fuser_at_scale_one(gated):
  model, unet, fact = gated
  x, t, text, face = _inputs()
  want = _diffusers_gligen(model, x, t, text, face)
  got = np.asarray(unet(x, t, text, context=fact.context(jnp.asarray(face), 1.0)))
  base = np.asarray(unet(x, t, text))
  assert np.abs(want - base).max() > 0.05  # the fusers matter
  np.testing.assert_allclose(got, want, atol=2e-4, rtol=1e-4)


def test_zero_gates_and_zero_scale_are_the_base(gated):
  _, unet, fact = gated
  x, t, text, face = _inputs()
  base = np.asarray(unet(x, t, text))
  fresh = fact_lib.init_fact(unet, face_tokens=FACE_TOKENS, face_dim=FACE_DIM,
                             num_tokens=NUM_TOKENS)
  assert all(float(p["alpha_attn"]) == 0 == float(p["alpha_ff"])
             for p in fresh.params["points"].values())
  np.testing.assert_array_equal(
      np.asarray(unet(x, t, text, context=fresh.context(jnp.asarray(face), 0.7))), base)
  np.testing.assert_array_equal(
      np.asarray(unet(x, t, text, context=fact.context(jnp.asarray(face), 0.0))), base)
  # Per-sample scales: row 0 adapted, row 1 the base.
  both = np.asarray(unet(x, t, text, context=fact.context(jnp.asarray(face),
                                                           jnp.array([1.0, 0.0]))))
  np.testing.assert_array_equal(both[1], base[1])
  np.testing.assert_allclose(both[0], np.asarray(unet(x, t, text, context=fact.context(
      jnp.asarray(face), 1.0)))[0], atol=1e-6)


def test_scale_multiplies_both_branches(gated):
  """At one block: h + s tanh(a_a) SA(...)[:N] then + s tanh(a_f) FF(LN(h)), written in numpy."""
  _, _, fact = gated
  point = fact.config.points[0]
  p = jax.tree.map(np.asarray, fact.params["points"][point])
  heads = fact.config.heads[0]
  rng = np.random.default_rng(3)
  h = rng.standard_normal((2, 7, 16)).astype(np.float32)
  face = rng.standard_normal((2, NUM_TOKENS, 12)).astype(np.float32)
  s = np.array([0.3, 1.7], np.float32)

  def ln(a, g, b):
    m = a.mean(-1, keepdims=True)
    return (a - m) / np.sqrt(((a - m) ** 2).mean(-1, keepdims=True) + 1e-5) * g + b

  def gelu(a):
    from math import erf
    return a * 0.5 * (1 + np.vectorize(erf)(a / np.sqrt(2)))

  z = ln(np.concatenate([h, face @ p["in"] + p["in_b"]], 1), p["ln1_scale"], p["ln1_bias"])
  q, k, v = (np.stack(np.split(z @ p[n], heads, -1), 1) for n in "qkv")  # [B, H, T, d]
  sc = q @ k.transpose(0, 1, 3, 2) / np.sqrt(q.shape[-1])
  att = np.exp(sc - sc.max(-1, keepdims=True))
  att = att / att.sum(-1, keepdims=True)
  a = np.concatenate(list((att @ v).transpose(1, 0, 2, 3)), -1) @ p["o"] + p["o_b"]
  x = h + s[:, None, None] * np.tanh(p["alpha_attn"]) * a[:, :7]
  y, g = np.split(ln(x, p["ln2_scale"], p["ln2_bias"]) @ p["ff1"] + p["ff1_b"], 2, -1)
  want = x + s[:, None, None] * np.tanh(p["alpha_ff"]) * ((y * gelu(g)) @ p["ff2"] + p["ff2_b"])
  got = fact_lib.gated_self_attention(fact.params["points"][point], jnp.asarray(h),
                                      jnp.asarray(face), jnp.asarray(s), heads)
  np.testing.assert_allclose(np.asarray(got), want, atol=2e-5, rtol=1e-5)


def test_projector_is_token_linear_then_width_linear_then_layernorm(gated):
  _, _, fact = gated
  rng = np.random.default_rng(1)
  params = jax.tree.map(lambda a: a + 0.1 * rng.standard_normal(a.shape).astype(np.float32),
                        jax.tree.map(np.asarray, fact.params["projector"]))
  feats = rng.standard_normal((2, FACE_TOKENS, FACE_DIM)).astype(np.float32)
  t = np.einsum("bnd,nm->bmd", feats, params["tokens"]) + params["tokens_b"][None, :, None]
  y = t @ params["proj"] + params["proj_b"]
  m = y.mean(-1, keepdims=True)
  want = ((y - m) / np.sqrt(((y - m) ** 2).mean(-1, keepdims=True) + 1e-5)
          * params["ln_scale"] + params["ln_bias"])
  got = fact_lib.project({"projector": params}, jnp.asarray(feats))
  assert got.shape == (2, NUM_TOKENS, 12)
  np.testing.assert_allclose(np.asarray(got), want, atol=2e-5)
  null = fact_lib.null_face_tokens({"projector": params}, 3)
  np.testing.assert_allclose(np.asarray(null[0]), np.asarray(fact_lib.project(
      {"projector": params}, jnp.zeros((1, FACE_TOKENS, FACE_DIM))))[0], atol=1e-6)
  with pytest.raises(ValueError, match=r"\[B, 9, 6\]"):
    fact_lib.project({"projector": params}, jnp.zeros((2, 8, FACE_DIM)))


def test_tape_records_each_adapters_increment(gated):
  _, unet, fact = gated
  x, t, text, face = _inputs()

  @jax.jit
  def run(params, x, text, face):
    tape = context_lib.Tape()
    ctx = fact_lib.context(fact.config, params, face, 1.0, tape=tape)
    out = unet_lib.forward(unet.graphdef, unet.params, x, jnp.asarray(t, jnp.float32), text, ctx)
    return out, dict(tape.entries)

  out, incs = run(fact.params, x, text, face)
  assert list(incs) == list(fact.config.points)
  sizes = {p: d.shape for p, d in incs.items()}
  assert sizes["down_blocks.0.attentions.0.transformer_blocks.0.fuser"] == (2, 64, 16)
  assert sizes["mid_block.attentions.0.transformer_blocks.0.fuser"] == (2, 16, 32)
  assert all(float(jnp.abs(d).max()) > 1e-3 for d in incs.values())
  np.testing.assert_allclose(np.asarray(out), np.asarray(
      unet(x, t, text, context=fact.context(jnp.asarray(face), 1.0))), atol=1e-5)
  # FAIR of the recorded increments against numpy (mask: a 4x4 face in the 8x8 input).
  mask = np.zeros((2, 8, 8), np.float32)
  mask[:, 2:6, 2:6] = 1
  want = []
  for d in incs.values():
    d = np.asarray(d)
    f = int(np.sqrt(64 // d.shape[1]))
    pooled = mask.reshape(2, 8 // f, f, 8 // f, f).max((2, 4)).reshape(2, -1)
    want.append(np.mean(((1 - pooled)[..., None] * d) ** 2))
  np.testing.assert_allclose(float(fact_lib.fair_loss(incs.items(), mask)), np.mean(want),
                             rtol=1e-5)


def test_fair_is_zero_when_only_the_face_changes():
  rng = np.random.default_rng(0)
  mask = np.zeros((3, 16, 16), np.float32)
  mask[:, 4:12, 4:12] = 1
  incs = []
  for n, c in ((256, 4), (64, 8), (16, 8)):
    f = int(np.sqrt(256 // n))
    inside = mask.reshape(3, 16 // f, f, 16 // f, f).max((2, 4)).reshape(3, n)
    incs.append((f"p{n}", jnp.asarray(rng.standard_normal((3, n, c)) * inside[..., None])))
  assert float(fact_lib.fair_loss(incs, mask)) == 0.0
  leak = [(name, d.at[:, 0].add(1.0)) for name, d in incs]  # token 0 is background everywhere
  assert float(fact_lib.fair_loss(leak, mask)) > 0.01
  with pytest.raises(ValueError, match="does not pool"):
    fact_lib.fair_loss([("p", jnp.zeros((3, 10, 4)))], mask)
  with pytest.raises(ValueError, match="increments"):
    fact_lib.fair_loss([], mask)


def test_drop_shuffle_and_curriculum():
  feats = jnp.ones((4000, 3, 2))
  dropped = fact_lib.condition_drop(feats, jax.random.key(0), 0.25)
  rows = np.asarray(dropped[:, 0, 0])
  assert set(np.unique(rows)) == {0.0, 1.0}
  assert abs((rows == 0).mean() - 0.25) < 0.03
  assert np.array_equal(np.asarray(dropped).min((1, 2)), np.asarray(dropped).max((1, 2)))

  ident = np.repeat(np.arange(50), 4)
  ident[-1] = 99  # an identity with one photo keeps its own
  rng = np.random.default_rng(0)
  idx = fact_lib.shuffled_condition(ident, 1.0, rng)
  assert np.array_equal(ident[idx], ident)
  assert (idx[:-1] != np.arange(len(ident) - 1)).all() and idx[-1] == len(ident) - 1
  half = fact_lib.shuffled_condition(ident, 0.5, np.random.default_rng(1))
  assert np.array_equal(ident[half], ident)
  assert 0.4 < (half != np.arange(len(ident))).mean() < 0.6
  assert np.array_equal(fact_lib.shuffled_condition(ident, 0.0, rng), np.arange(len(ident)))

  cur = fact_lib.Curriculum.default(shuffle=0.6, drop=0.1, fair=2.0, ramp=0.5)
  assert cur.at(0.0) == {"shuffle": 0.0, "drop": 0.1, "fair": 2.0}
  assert cur.at(0.25)["shuffle"] == pytest.approx(0.3)
  assert cur.at(0.9)["shuffle"] == pytest.approx(0.6)
  assert fact_lib.Curriculum.constant(shuffle=0.5).at(0.1)["shuffle"] == 0.5
  with pytest.raises(ValueError, match="increase"):
    fact_lib.Curriculum(shuffle=((0.5, 0.1), (0.2, 0.3)))
  with pytest.raises(ValueError, match=r"\[0, 1\]"):
    fact_lib.Curriculum(drop=((0.0, 1.5),))


def test_save_load_and_errors(gated, tmp_path):
  _, unet, fact = gated
  d = str(tmp_path / "fact")
  fact.save(d)
  back = fact_lib.load_fact(d, unet)
  assert back.config == fact.config
  for a, b in zip(jax.tree.leaves(back.params), jax.tree.leaves(fact.params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  x, t, text, face = _inputs()
  np.testing.assert_array_equal(
      np.asarray(unet(x, t, text, context=back.context(jnp.asarray(face), 0.7))),
      np.asarray(unet(x, t, text, context=fact.context(jnp.asarray(face), 0.7))))
  assert back.num_params == sum(int(np.prod(a.shape)) for a in jax.tree.leaves(fact.params))

  with pytest.raises(FileNotFoundError, match="no FACT adapter"):
    fact_lib.load_fact(str(tmp_path))
  other = unet_lib.UNet.random(unet_lib.UNetConfig(**{
      **GATED, "block_out_channels": (16, 48), "layers_per_block": (1, 1),
      "cross_attention_dim": (12, 12), "transformer_layers_per_block": (1, 1)}))
  with pytest.raises(ValueError, match="built for width 32"):
    fact_lib.load_fact(d, other)
  cfg = json.load(open(os.path.join(d, fact_lib.CONFIG_FILE)))
  cfg["num_tokens"] = 4
  json.dump(cfg, open(os.path.join(d, fact_lib.CONFIG_FILE), "w"))
  with pytest.raises(ValueError, match="do not match"):
    fact_lib.load_fact(d)
  with pytest.raises(ValueError, match="lacks insert inputs"):
    unet(x, t, text, inserts=fact.context(jnp.asarray(face)).inserts)
  with pytest.raises(TypeError, match="UNet"):
    fact_lib.config_for(object())
  with pytest.raises(ValueError, match="not fuser points"):
    fact_lib.config_for(unet, points=["down_blocks.0.attentions.0.transformer_blocks.0.attn1"])
  with pytest.raises(ValueError, match="heads"):
    fact_lib.config_for(unet, heads=3)
