"""jaxadapt's Stable Diffusion U-Net against diffusers' `UNet2DConditionModel` (torch, CPU).

Tiny random U-Nets are built with diffusers, saved with `save_pretrained` and loaded through
`jaxadapt.models.unet.load_unet`; outputs must match diffusers' within 1e-4 in float32.
"""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

import jaxadapt  # noqa: E402
from jaxadapt.models import unet as unet_lib  # noqa: E402
from jaxadapt.models.diffusion_layers import torch_name  # noqa: E402

# SD-1.5 style: conv proj_in/proj_out, one head count for every block, CrossAttn down blocks
# followed by a plain DownBlock2D, two resnets per down block.
SD15 = dict(
    sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32, 32),
    layers_per_block=2, norm_num_groups=8, cross_attention_dim=24, attention_head_dim=2,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"))
# SD-2.1 style: linear projections, a head count per block, upcast attention, 2 transformer
# layers per attention; non-default timestep embedding options to check they are honoured.
SD21 = dict(
    sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32),
    layers_per_block=1, norm_num_groups=8, cross_attention_dim=20, attention_head_dim=[2, 4],
    use_linear_projection=True, upcast_attention=True, transformer_layers_per_block=2,
    flip_sin_to_cos=False, freq_shift=1,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"))


def make_unet(directory, config, seed=0):
  """A tiny random diffusers U-Net (norms and biases perturbed so they matter), saved."""
  torch.manual_seed(seed)
  model = diffusers.UNet2DConditionModel(**config).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith(".bias") or "norm" in name:
        p.add_(0.2 * torch.randn_like(p))
  model.save_pretrained(directory)
  return model


def inputs(config, batch=2, size=8, seq=5, seed=0):
  rng = np.random.default_rng(seed)
  sample = rng.standard_normal((batch, config["in_channels"], size, size)).astype(np.float32)
  ehs = rng.standard_normal((batch, seq, config["cross_attention_dim"])).astype(np.float32)
  return sample, np.array([10, 730][:batch]), ehs


def torch_out(model, sample, t, ehs):
  with torch.no_grad():
    return model(torch.from_numpy(sample), torch.from_numpy(t),
                 torch.from_numpy(ehs)).sample.numpy()


@pytest.fixture(scope="module")
def sd15(tmp_path_factory):
  d = str(tmp_path_factory.mktemp("unet15"))
  return d, make_unet(d, SD15)


@pytest.fixture(scope="module")
def sd21(tmp_path_factory):
  d = str(tmp_path_factory.mktemp("unet21"))
  return d, make_unet(d, SD21, seed=1)


def test_sd15_matches_diffusers(sd15):
  d, model = sd15
  unet = unet_lib.load_unet(d)
  assert unet.config.attention_head_dim == (2, 2, 2)
  assert not unet.config.use_linear_projection
  # An odd size: 10 -> 5 -> 3 and back up to the skips' sizes (diffusers' upsample_size path).
  sample, t, ehs = inputs(SD15, size=10)
  ref = torch_out(model, sample, t, ehs)
  out = np.asarray(unet(sample, t, ehs))
  assert out.shape == ref.shape == (2, 4, 10, 10)
  np.testing.assert_allclose(out, ref, atol=1e-4, rtol=1e-4)
  # A scalar timestep is broadcast over the batch (the same compiled forward).
  ref = torch_out(model, sample, np.array(421), ehs)
  np.testing.assert_allclose(np.asarray(unet(sample, 421, ehs)), ref, atol=1e-4, rtol=1e-4)


def test_sd21_matches_diffusers(sd21):
  d, model = sd21
  unet = unet_lib.load_unet(d)
  assert unet.config.attention_head_dim == (2, 4)
  assert unet.config.use_linear_projection and unet.config.upcast_attention
  assert "down_blocks.0.attentions.0.proj_in" in unet.linear_paths
  sample, t, ehs = inputs(SD21)
  ref = torch_out(model, sample, t, ehs)
  np.testing.assert_allclose(np.asarray(unet(sample, t, ehs)), ref, atol=1e-4, rtol=1e-4)


# diffusers' own Stable Diffusion test dummy (tests/pipelines/stable_diffusion): the first block
# has no attention, so its 4 channels need not split into attention_head_dim=8 heads (the
# attention blocks have 8 channels: 8 heads of width 1).
SD_DUMMY = dict(
    sample_size=8, in_channels=4, out_channels=4, block_out_channels=(4, 8),
    layers_per_block=1, norm_num_groups=2, cross_attention_dim=32, attention_head_dim=8,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"))


def test_first_block_without_attention_matches_diffusers(tmp_path):
  model = make_unet(str(tmp_path), SD_DUMMY, seed=2)
  unet = unet_lib.load_unet(str(tmp_path))
  assert unet.config.attention_head_dim == (8, 8)
  sample, t, ehs = inputs(SD_DUMMY)
  ref = torch_out(model, sample, t, ehs)
  np.testing.assert_allclose(np.asarray(unet(sample, t, ehs)), ref, atol=1e-4, rtol=1e-4)
  # A block with attention still needs its channels to split into its heads.
  bad = dict(SD_DUMMY, down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"))
  with pytest.raises(ValueError, match=r"block_out_channels\[0\]=4 is not a multiple of its"):
    unet_lib.UNetConfig.from_config(bad)


def test_param_paths_are_checkpoint_names(sd15):
  """Every NNX param is one checkpoint tensor and every checkpoint tensor is used."""
  d, model = sd15
  unet = unet_lib.load_unet(d)
  names = {torch_name(".".join(str(k.key) for k in kp))[0]
           for kp, _ in jax.tree_util.tree_flatten_with_path(unet.params)[0]}
  assert names == set(model.state_dict())
  torch_linears = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
  assert set(unet.linear_paths) == torch_linears


def test_sharded_load(sd21):
  """A Mesh places every tensor as it loads (U-Net params replicated: data parallel)."""
  d, _ = sd21
  mesh = jax.make_mesh((2,), ("data",), axis_types=(jax.sharding.AxisType.Auto,),
                       devices=jax.devices()[:2])
  unet = unet_lib.load_unet(d, sharding=mesh)
  ref = unet_lib.load_unet(d)
  for (kp, x), y in zip(jax.tree_util.tree_flatten_with_path(unet.params)[0],
                        jax.tree_util.tree_leaves(ref.params)):
    assert len(x.sharding.device_set) == 2, kp
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_tensor_parallel_load_and_forward(sd21):
  """On a (data=2, model=4) mesh attention and feed-forward kernels are split Megatron-style
  (to_q/k/v and ff.net.0 on out, to_out.0 and ff.net.2 on in) and the output is unchanged."""
  from jax.sharding import PartitionSpec as P
  from jaxadapt import sharding as sharding_lib
  d, _ = sd21
  mesh = sharding_lib.make_mesh(data=2, model=4)
  unet = unet_lib.load_unet(d, sharding=mesh)
  block = unet.params["down_blocks"][0]["attentions"][0]["transformer_blocks"][0]
  assert block["attn1"]["to_q"]["kernel"].sharding.spec == P(None, "model")
  assert block["attn1"]["to_out"][0]["kernel"].sharding.spec == P("model", None)
  assert block["ff"]["net"][0]["proj"]["kernel"].sharding.spec == P(None, "model")
  assert block["ff"]["net"][2]["kernel"].sharding.spec == P("model", None)
  sample, t, ehs = inputs(SD21)
  want = np.asarray(unet_lib.load_unet(d)(sample, t, ehs))
  np.testing.assert_allclose(np.asarray(unet(sample, t, ehs)), want, atol=1e-5, rtol=0)


def test_bfloat16_close_to_diffusers_float32(sd21):
  d, model = sd21
  sample, t, ehs = inputs(SD21)
  ref = torch_out(model, sample, t, ehs)
  unet = unet_lib.load_unet(d, dtype="bfloat16")
  assert unet.params["conv_in"]["kernel"].dtype == jnp.bfloat16
  out = unet(sample, t, ehs)
  assert out.dtype == jnp.bfloat16
  err = np.abs(np.asarray(out, np.float32) - ref).max() / np.abs(ref).max()
  assert err < 0.03, err  # measured ~0.01


def test_peft_lora_matches_peft(sd21, tmp_path):
  peft = pytest.importorskip("peft")
  d, _ = sd21
  model = diffusers.UNet2DConditionModel.from_pretrained(d).eval()
  torch.manual_seed(3)
  cfg = peft.LoraConfig(r=4, lora_alpha=6, target_modules=["to_q", "to_k", "to_v", "to_out.0"],
                        init_lora_weights=False)
  pmodel = peft.get_peft_model(model, cfg).eval()
  pmodel.save_pretrained(str(tmp_path))
  sample, t, ehs = inputs(SD21, seed=2)
  ref = torch_out(pmodel, sample, t, ehs)

  unet = unet_lib.load_unet(d)
  adapter = jaxadapt.load_adapter(str(tmp_path))
  # Transformer2DModels: 1 per down block x 2 + 1 mid + 2 per up block x 2 = 7, each with 2
  # transformer layers of attn1 and attn2, 4 projections each.
  assert len(adapter.weights) == 7 * 2 * 2 * 4
  assert "mid_block.attentions.0.transformer_blocks.0.attn2.to_out.0" in adapter.weights
  out = np.asarray(unet(sample, t, ehs, adapter=adapter))
  np.testing.assert_allclose(out, ref, atol=1e-4, rtol=1e-4)
  base = np.asarray(unet(sample, t, ehs))
  assert np.abs(base - ref).max() > 1e-2  # the adapter changes the prediction
  # Mixed batch: element 0 with the adapter, element 1 base only (S-LoRA-style contexts).
  mixed = np.asarray(unet(sample, t, ehs, adapters=[adapter], adapter_ids=[0, -1]))
  np.testing.assert_allclose(mixed[0], ref[0], atol=1e-4, rtol=1e-4)
  np.testing.assert_allclose(mixed[1], base[1], atol=1e-4, rtol=1e-4)


def test_insertion_points(sd15):
  """Insert fns see the attention output, its input and the context as diffusers computes
  them, and what they return replaces the attention output (checked against torch hooks)."""
  d, model = sd15
  unet = unet_lib.load_unet(d)
  sample, t, ehs = inputs(SD15)
  self_name = "down_blocks.1.attentions.0.transformer_blocks.0.attn1"
  cross_name = "up_blocks.2.attentions.1.transformer_blocks.0.attn2"
  assert self_name in unet.attention_paths and cross_name in unet.attention_paths
  got, shapes = {}, {}

  def probe(name):
    def fn(delta, out, hidden_in, context, inputs):
      shapes[name] = (out.shape, hidden_in.shape, None if context is None else context.shape)
      jax.debug.callback(lambda o, h: got.__setitem__(name, (np.asarray(o), np.asarray(h))),
                         out, hidden_in)
      return out + delta
    return fn

  fns = {self_name: probe(self_name), cross_name: probe(cross_name)}

  def run(delta):  # the delta is a traced Partial argument: one compile for both calls
    ins = {self_name: jax.tree_util.Partial(fns[self_name], jnp.float32(0.0)),
           cross_name: jax.tree_util.Partial(fns[cross_name], jnp.float32(delta))}
    out = np.asarray(unet(sample, t, ehs, inserts=ins))
    jax.effects_barrier()
    return out

  # torch reference: record each attention module's input and output; optionally shift one.
  ref_io, shift = {}, {"delta": 0.0}
  handles = []
  for name in (self_name, cross_name):
    mod = model.get_submodule(name)
    handles.append(mod.register_forward_pre_hook(
        lambda m, args, kwargs, name=name: ref_io.__setitem__(name, [args[0].numpy()]),
        with_kwargs=True))
    handles.append(mod.register_forward_hook(
        lambda m, args, out, name=name: (ref_io[name].append(out.numpy()),
                                          out + (shift["delta"] if name == cross_name else 0))[1]))
  try:
    ref = torch_out(model, sample, t, ehs)
    out = run(0.0)
    np.testing.assert_allclose(out, ref, atol=1e-4, rtol=1e-4)
    for name in (self_name, cross_name):
      np.testing.assert_allclose(got[name][1], ref_io[name][0], atol=1e-4, rtol=1e-4)
      np.testing.assert_allclose(got[name][0], ref_io[name][1], atol=1e-4, rtol=1e-4)
    # down_blocks.1 works at 4x4 on 32 channels; up_blocks.2 at 8x8 on 16 channels.
    assert shapes[self_name] == ((2, 16, 32), (2, 16, 32), None)
    assert shapes[cross_name] == ((2, 64, 16), (2, 64, 16), (2, 5, 24))
    # A change at the insertion point propagates exactly as the same change in diffusers.
    shift["delta"] = 0.5
    ref_moved = torch_out(model, sample, t, ehs)
    moved = run(0.5)
    assert np.abs(moved - out).max() > 1e-2
    np.testing.assert_allclose(moved, ref_moved, atol=1e-4, rtol=1e-4)
  finally:
    for h in handles:
      h.remove()
  with pytest.raises(ValueError, match="not insertion points"):
    unet(sample, t, ehs, inserts={"down_blocks.0.attn9": lambda o, h, c, i: o})


@pytest.mark.parametrize("option,value", [
    ("class_embed_type", "timestep"),
    ("addition_embed_type", "text_time"),
    ("attention_type", "gated"),
    ("cross_attention_norm", "group_norm"),
    ("resnet_time_scale_shift", "scale_shift"),
    ("only_cross_attention", True),
    ("time_embedding_type", "fourier"),
    ("some_future_option", "on"),  # an option jaxadapt does not know is refused, not ignored
])
def test_unsupported_option_refused(option, value):
  cfg = dict(SD15, **{option: value})
  with pytest.raises(NotImplementedError, match=option):
    unet_lib.UNetConfig.from_config(cfg)


def test_unsupported_block_refused(tmp_path):
  cfg = dict(SD15, down_block_types=("SimpleCrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                                     "DownBlock2D"))
  with pytest.raises(ValueError, match="SimpleCrossAttnDownBlock2D"):
    unet_lib.UNetConfig.from_config(cfg)
  # Through load_unet too: the refusal happens before any tensor is read.
  with open(os.path.join(tmp_path, "config.json"), "w") as f:
    json.dump(dict(SD15, addition_embed_type="text_time", _class_name="UNet2DConditionModel"),
              f)
  with pytest.raises(NotImplementedError, match="addition_embed_type='text_time'"):
    unet_lib.load_unet(str(tmp_path))


def test_prediction_type_from_scheduler(sd21, tmp_path):
  d, _ = sd21
  assert unet_lib.load_unet(d).prediction_type == "epsilon"
  # A pipeline layout: unet/ next to scheduler/scheduler_config.json.
  os.makedirs(tmp_path / "unet")
  os.makedirs(tmp_path / "scheduler")
  for name in os.listdir(d):
    os.symlink(os.path.join(d, name), tmp_path / "unet" / name)
  with open(tmp_path / "scheduler" / "scheduler_config.json", "w") as f:
    json.dump({"_class_name": "DDIMScheduler", "prediction_type": "v_prediction"}, f)
  assert unet_lib.load_unet(str(tmp_path / "unet")).prediction_type == "v_prediction"


def test_merge_and_unmerge_on_unet(sd15):
  """`ja.merge` folds a LoRA (DoRA too) into UNet kernels: merged == unmerged forward, and
  `ja.unmerge` restores the base kernels."""
  import jaxadapt as ja
  from jaxadapt.adapters.lora import LoraAdapter, kernel_at
  directory, _ = sd15
  unet = unet_lib.load_unet(directory)
  conv = ja.LoraConfig(r=3, target_modules=["to_q", "to_v", "proj_in"], use_dora=True)
  with pytest.raises(NotImplementedError, match=r"proj_in"):  # a 1x1 conv in SD 1.5: PEFT
    ja.init_lora(unet, conv, seed=2)                         # would adapt it; we refuse
  cfg = ja.LoraConfig(r=3, target_modules=["to_q", "to_v"], use_dora=True)
  adapter = ja.init_lora(unet, cfg, seed=2)
  key = jax.random.key(3)
  weights = {}
  for path, w in adapter.weights.items():  # non-zero B, moved magnitudes
    key, k1 = jax.random.split(key)
    weights[path] = dict(w, b=0.3 * jax.random.normal(k1, w["b"].shape),
                         magnitude=w["magnitude"] * 1.1)
  adapter = LoraAdapter(weights=weights, config=cfg)
  sample, t, ehs = inputs(SD15, size=10)  # test_sd15_matches_diffusers' inputs: its compile
  unmerged = np.asarray(unet(sample, t, ehs, adapter=adapter))
  merged = ja.merge(unet, adapter)
  assert type(merged) is type(unet)
  np.testing.assert_allclose(np.asarray(merged(sample, t, ehs)), unmerged, atol=1e-4, rtol=0)
  assert np.abs(unmerged - np.asarray(unet(sample, t, ehs))).max() > 1e-3
  restored = ja.unmerge(merged)
  for path in adapter.weights:
    np.testing.assert_allclose(np.asarray(kernel_at(restored.params, path)),
                               np.asarray(kernel_at(unet.params, path)), atol=1e-5, rtol=0)


def test_sd15_with_chunked_attention_matches_diffusers(sd15, monkeypatch):
  """The whole U-Net with query blocks of 16 (so every attention is chunked) == diffusers."""
  from jaxadapt.models import diffusion_layers
  monkeypatch.setattr(diffusion_layers, "QUERY_BLOCK", 16)
  seen = []
  attend = diffusion_layers._attend
  monkeypatch.setattr(diffusion_layers, "_attend",
                      lambda q, *a: seen.append(q.shape[1]) or attend(q, *a))
  from jaxadapt.models import frozen
  # An earlier test compiled this U-Net unchunked: drop the models' forwards (only those, so
  # later tests keep every other compiled function).
  frozen._apply_jit.clear_cache()  # pylint: disable=protected-access
  d, model = sd15
  sample, t, ehs = inputs(SD15, size=10)
  unet = unet_lib.load_unet(d)
  np.testing.assert_allclose(np.asarray(unet(sample, t, ehs)), torch_out(model, sample, t, ehs),
                             atol=1e-4, rtol=0)
  assert 16 in seen  # the blocked path was traced


def test_chunked_attention_equals_full():
  """Query-blocked attention (bounded score memory) == full attention, values and grads."""
  from jaxadapt.models.diffusion_layers import dot_product_attention
  rng = np.random.default_rng(0)
  q = jnp.asarray(rng.normal(size=(2, 37, 16)), jnp.float32)
  k = jnp.asarray(rng.normal(size=(2, 23, 16)), jnp.float32)
  v = jnp.asarray(rng.normal(size=(2, 23, 16)), jnp.float32)
  full = dot_product_attention(q, k, v, 4, 0.5, query_block=64)
  blocked = dot_product_attention(q, k, v, 4, 0.5, query_block=8)  # 5 blocks, last padded
  np.testing.assert_allclose(np.asarray(blocked), np.asarray(full), atol=1e-6, rtol=0)
  grad = lambda qb: jax.grad(lambda x: jnp.sum(dot_product_attention(x, k, v, 4, 0.5,
                                                                     query_block=qb) ** 2))(q)
  np.testing.assert_allclose(np.asarray(grad(8)), np.asarray(grad(64)), atol=1e-5, rtol=0)


@pytest.mark.parametrize("with_metadata", [True, False])
def test_diffusers_lora_file_matches_diffusers(sd21, tmp_path, with_metadata):
  """`ja.load_adapter` reads diffusers' `pytorch_lora_weights.safetensors` (save_lora_weights)
  and gives diffusers' noise prediction: from its metadata, or, without metadata, as diffusers
  infers the config (ranks from shapes, scale 1)."""
  import copy
  from peft import LoraConfig
  from peft.utils import get_peft_model_state_dict
  d, base = sd21
  torch.manual_seed(7)
  lora_unet = copy.deepcopy(base)
  cfg = LoraConfig(r=4, lora_alpha=2, target_modules=["to_q", "to_v", "to_out.0"],
                   rank_pattern={"to_v": 2}, init_lora_weights=False)
  lora_unet.add_adapter(cfg)
  out_dir = tmp_path / "lora"
  diffusers.StableDiffusionPipeline.save_lora_weights(
      str(out_dir), unet_lora_layers=get_peft_model_state_dict(lora_unet),
      unet_lora_adapter_metadata=cfg.to_dict() if with_metadata else None)
  if with_metadata:
    reference = lora_unet.eval()
  else:  # diffusers' own reading of a file without metadata
    reference = copy.deepcopy(base)
    reference.load_lora_adapter(str(out_dir), prefix="unet", use_safetensors=True,
                                weight_name="pytorch_lora_weights.safetensors")
    reference.eval()
  sample, t, ehs = inputs(SD21)
  want = torch_out(reference, sample, t, ehs)
  adapter = jaxadapt.load_adapter(str(out_dir))
  unet = unet_lib.load_unet(d)
  got = np.asarray(unet(sample, t, ehs, adapter=adapter))
  np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
  assert np.abs(want - torch_out(base, sample, t, ehs)).max() > 1e-3  # the LoRA matters
