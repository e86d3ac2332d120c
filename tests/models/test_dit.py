"""jaxadapt's DiT against diffusers' `DiTTransformer2DModel` (the reference)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import jaxadapt as ja
from jaxadapt.adapters.hook import SingleLoRA
from jaxadapt.models import diffusion_layers as dl
from jaxadapt.models.dit import DiT, DiTConfig, load_dit

IN_CH = 4
TINY = dict(num_attention_heads=2, attention_head_dim=8, in_channels=IN_CH,
            out_channels=2 * IN_CH, num_layers=2, sample_size=8, patch_size=2,
            num_embeds_ada_norm=10)


def make_dit(directory, seed=0, **overrides):
  """Builds and saves a tiny random DiT with learned sigma; returns the torch model (eval)."""
  from diffusers import DiTTransformer2DModel
  torch.manual_seed(seed)
  model = DiTTransformer2DModel(**{**TINY, **overrides}).eval()
  with torch.no_grad():  # zero-init gates / unit norms would hide mistakes: perturb everything
    for p in model.parameters():
      p.add_(0.1 * torch.randn_like(p))
  model.save_pretrained(directory)
  return model


@pytest.fixture(scope="module")
def dit(tmp_path_factory):
  d = str(tmp_path_factory.mktemp("dit"))
  return d, make_dit(d), load_dit(d)


def _inputs(seed=0, b=3, size=8):
  g = torch.Generator().manual_seed(seed)
  x = torch.randn(b, IN_CH, size, size, generator=g)
  t = torch.tensor([0, 17, 999])[:b]
  y = torch.tensor([3, 10, 0])[:b]  # 10 = the null class (classifier-free guidance)
  return x, t, y


def test_learned_sigma_output_equals_diffusers(dit):
  _, ref, model = dit
  assert model.config.learned_sigma and model.config.output_channels == 2 * IN_CH
  x, t, y = _inputs()
  with torch.no_grad():
    want = ref(x, timestep=t, class_labels=y).sample.numpy()
  got = np.asarray(model(x.numpy(), t.numpy(), y.numpy()))
  assert got.shape == want.shape == (3, 2 * IN_CH, 8, 8)
  np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)


def test_fractional_timesteps_and_other_resolution_equal_diffusers(dit):
  """Float timesteps, and a 12x12 latent (positions re-computed on the base grid)."""
  _, ref, model = dit
  x, _, y = _inputs(seed=1, b=2, size=12)
  t = torch.tensor([3.5, 500.25])
  with torch.no_grad():
    want = ref(x, timestep=t, class_labels=y[:2]).sample.numpy()
  np.testing.assert_allclose(np.asarray(model(x.numpy(), t.numpy(), y[:2].numpy())), want,
                             atol=1e-4, rtol=0)


def test_lora_on_attention_projection_equals_merged_kernel(dit):
  """A LoRA context on one attn projection equals adding scale * A @ B to its kernel."""
  _, _, model = dit
  path = "transformer_blocks.1.attn1.to_q"
  assert path in model.linear_paths
  k = jax.random.split(jax.random.key(0), 2)
  d, r = model.config.inner_dim, 3
  a = jax.random.normal(k[0], (d, r)) * 0.3
  b = jax.random.normal(k[1], (r, d)) * 0.3
  scale = jnp.asarray(1.7)
  x, t, y = _inputs(seed=2)
  got = model(x.numpy(), t.numpy(), y.numpy(), context=ja.Context(weights={path: SingleLoRA(a=a, b=b, scale=scale)}))
  params = jax.tree_util.tree_map(lambda v: v, model.params)
  q = params["transformer_blocks"][1]["attn1"]["to_q"]
  q["kernel"] = q["kernel"] + scale * (a @ b)
  want = DiT(model.config, model.graphdef, params)(x.numpy(), t.numpy(), y.numpy())
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5, rtol=0)
  base = model(x.numpy(), t.numpy(), y.numpy())
  assert np.abs(np.asarray(got) - np.asarray(base)).max() > 1e-3
  with pytest.raises(ValueError, match="not linear layers"):
    model(x.numpy(), t.numpy(), y.numpy(), context=ja.Context(weights={"transformer_blocks.1.attn1": None}))


def test_lora_on_adaln_modulation_changes_output(dit):
  """adaLN modulation linears are LoRA targets too (same spec as any projection)."""
  _, _, model = dit
  path = "transformer_blocks.0.norm1.linear"
  d = model.config.inner_dim
  a = jnp.ones((d, 2)) * 0.1
  b = jnp.ones((2, 6 * d)) * 0.1
  x, t, y = _inputs(seed=3)
  got = model(x.numpy(), t.numpy(), y.numpy(),
              context=ja.Context(weights={path: SingleLoRA(a=a, b=b, scale=jnp.asarray(0.5))}))
  params = jax.tree_util.tree_map(lambda v: v, model.params)
  lin = params["transformer_blocks"][0]["norm1"]["linear"]
  lin["kernel"] = lin["kernel"] + 0.5 * (a @ b)
  want = DiT(model.config, model.graphdef, params)(x.numpy(), t.numpy(), y.numpy())
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5, rtol=0)


def test_insert_receives_attention_output_and_input(dit):
  """An insert adding a vector at attn1's output equals adding it to `to_out.0`'s bias; the
  insert sees the attention output and the adaLN-modulated block input."""
  _, _, model = dit
  name = "transformer_blocks.0.attn1"
  d = model.config.inner_dim
  delta = jnp.linspace(-1.0, 1.0, d)
  seen = {}

  def add(out, hidden_in, context, inputs):
    seen["args"] = (out, hidden_in, context)
    return out + delta

  x, t, y = _inputs(seed=4)
  got = model(x.numpy(), t.numpy(), y.numpy(), inserts={name: add})
  params = jax.tree_util.tree_map(lambda v: v, model.params)
  o = params["transformer_blocks"][0]["attn1"]["to_out"][0]
  o["bias"] = o["bias"] + delta
  want = DiT(model.config, model.graphdef, params)(x.numpy(), t.numpy(), y.numpy())
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5, rtol=0)
  assert np.abs(np.asarray(got) - np.asarray(model(x.numpy(), t.numpy(), y.numpy()))).max() > 1e-3
  out, hidden_in, context = seen["args"]
  assert out.shape == hidden_in.shape == (3, 16, d) and context is None


def test_insert_tensors_equal_diffusers_attention(dit):
  """The (out, hidden_in) an insert receives are diffusers' attn1 output and input."""
  _, ref, model = dit
  captured = {}
  handle = ref.transformer_blocks[1].attn1.register_forward_hook(
      lambda mod, args, kwargs, out: captured.update(inp=args[0] if args else
                                                     kwargs["hidden_states"], out=out),
      with_kwargs=True)
  x, t, y = _inputs(seed=5)
  try:
    with torch.no_grad():
      ref(x, timestep=t, class_labels=y)
  finally:
    handle.remove()
  seen = {}

  def spy(out, hidden_in, context, inputs):
    seen.update(out=out, inp=hidden_in)
    return out

  # The un-jitted pure forward, so the spy sees concrete arrays.
  dl.apply(model.graphdef, model.params, "__call__", jnp.asarray(x.numpy()),
           jnp.asarray(t.numpy()), jnp.asarray(y.numpy()),
           ctx=ja.Context().with_inserts({"transformer_blocks.1.attn1": spy}))
  np.testing.assert_allclose(np.asarray(seen["inp"]), captured["inp"].numpy(), atol=1e-4, rtol=0)
  np.testing.assert_allclose(np.asarray(seen["out"]), captured["out"].numpy(), atol=1e-4, rtol=0)


def test_bfloat16_close_to_float32(dit):
  directory, ref, _ = dit
  half = load_dit(directory, dtype=jnp.bfloat16)
  x, t, y = _inputs(seed=6)
  with torch.no_grad():
    want = ref(x, timestep=t, class_labels=y).sample.numpy()
  got = half(x.numpy(), t.numpy(), y.numpy())
  assert got.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(got, np.float32), want, atol=0.15, rtol=0.05)


def test_loads_legacy_transformer2d_config(dit, tmp_path):
  """facebook/DiT-XL-2-256 ships its DiT as a `Transformer2DModel` config: it loads the same."""
  import json
  import shutil
  directory, ref, _ = dit
  shutil.copytree(directory, tmp_path / "legacy")
  cfg_path = tmp_path / "legacy" / "config.json"
  cfg = json.loads(cfg_path.read_text())
  cfg.update(_class_name="Transformer2DModel", cross_attention_dim=None, num_vector_embeds=None,
             use_linear_projection=False, only_cross_attention=False)
  cfg_path.write_text(json.dumps(cfg))
  x, t, y = _inputs(seed=7)
  with torch.no_grad():
    want = ref(x, timestep=t, class_labels=y).sample.numpy()
  got = load_dit(str(tmp_path / "legacy"))(x.numpy(), t.numpy(), y.numpy())
  np.testing.assert_allclose(np.asarray(got), want, atol=1e-4, rtol=0)


def test_config_refuses_unsupported():
  base = dict(_class_name="DiTTransformer2DModel", patch_size=2, num_embeds_ada_norm=10)
  with pytest.raises(ValueError, match="norm_type='ada_norm'"):
    DiTConfig.from_config({**base, "norm_type": "ada_norm"})
  with pytest.raises(ValueError, match="expected one of"):
    DiTConfig.from_config({**base, "_class_name": "PixArtTransformer2DModel"})
  with pytest.raises(ValueError, match="cross_attention_dim"):
    DiTConfig.from_config({**base, "_class_name": "Transformer2DModel",
                           "cross_attention_dim": 768})
