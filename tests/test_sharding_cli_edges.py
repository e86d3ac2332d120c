"""Edges of `jaxadapt.sharding` (mesh sizes, the partition rule of every param of each model
family, non-dividing dims, tensor-parallel forwards with adapters), the `jaxadapt` command (help,
unknown commands, `info` on each kind of dir) and the demo's self-check."""
import json
import shutil

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

import jaxadapt as ja
from jaxadapt import cli
from jaxadapt import sharding as sharding_lib
from jaxadapt.adapters.lora import LoraAdapter, context
from jaxadapt.models import clip, dit, unet, vae
from jaxadapt.models.layers import Linear
from jaxadapt.models.llama import LlamaConfig, LlamaForCausalLM

COL, ROW, REP = P(None, "model"), P("model", None), P()
QWEN = {"model_type": "qwen2", "vocab_size": 96, "hidden_size": 32, "intermediate_size": 48,
            "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8,
            "attention_bias": True, "tie_word_embeddings": True}
DIT = {"num_attention_heads": 2, "attention_head_dim": 8, "in_channels": 4, "out_channels": 8,
           "num_layers": 1, "sample_size": 4, "patch_size": 2, "num_embeds_ada_norm": 10}


# ----------------------------------------------------------------------------- make_mesh

@pytest.mark.parametrize("kwargs, error, message", [
    ({"data": 0}, ValueError, "data must be >= 1 (the axis size), got 0"),
    ({"model": 0}, ValueError, "model must be >= 1 (the axis size), got 0"),
    ({"data": -1}, ValueError, "data must be >= 1 (the axis size), got -1"),  # was 7 devices
    ({"data": -2, "model": -4}, ValueError, "data must be >= 1 (the axis size), got -2"),
    ({"model": 2.0}, TypeError, "model must be an int (the axis size), got float 2.0"),
    ({"data": "2"}, TypeError, "data must be an int (the axis size), got str '2'"),
    ({"data": 4, "model": 4}, ValueError, "data=4 x model=4 needs 16 devices, found 8"),
    ({"data": 2, "devices": jax.devices()[:1]}, ValueError, "needs 2 devices, found 1"),
])
def test_make_mesh_rejects_bad_sizes(kwargs, error, message):
  with pytest.raises(error) as e:
    sharding_lib.make_mesh(**kwargs)
  assert message in str(e.value)


def test_make_mesh_takes_the_first_devices_when_fewer_are_asked():
  mesh = sharding_lib.make_mesh(data=3)  # 3 does not divide 8: the first 3 devices
  assert dict(mesh.shape) == {"data": 3, "model": 1}
  assert list(mesh.devices.ravel()) == jax.devices()[:3]


# ----------------------------------------------------------------------------- rules per family

def _tree(build):
  """(pure-dict param shapes, linear paths) of the module `build()` makes, without allocating."""
  module = nnx.eval_shape(build)
  return nnx.to_pure_dict(nnx.split(module)[1]), {m.path for _, m in nnx.iter_graph(module)
                                                  if isinstance(m, Linear)}


def _expected(path, shape, linears, model):
  """The spec every param should get: Megatron for attention/MLP projections, replicated else."""
  module, _, leaf = path.rpartition(".")
  split = {"column": lambda d: d[-1], "row": lambda d: d[0]}
  kind = sharding_lib.parallel_kind(module)
  if module.endswith("embed_tokens"):
    return P(None, "model") if shape[1] % model == 0 else P(None, None)
  if module not in linears or kind is None or (kind == "row" and leaf == "bias"):
    return REP
  if split[kind](shape) % model:
    return P(None) if leaf == "bias" else P(None, None)
  if leaf == "bias":
    return P("model")
  return COL if kind == "column" else ROW


def _families():
  def lazy(cls, config):
    return lambda: cls(config, rngs=nnx.Rngs(0))
  unet_cfg = unet.UNetConfig.from_config({
      "sample_size": 8, "in_channels": 4, "out_channels": 4, "block_out_channels": (16, 32),
      "layers_per_block": 1, "norm_num_groups": 8, "cross_attention_dim": 20, "attention_head_dim": [2, 4],
      "use_linear_projection": True, "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
      "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D")})
  vae_cfg = vae.VAEConfig.from_config({
      "block_out_channels": (8, 16), "layers_per_block": 1, "latent_channels": 4, "norm_num_groups": 4,
      "down_block_types": ("DownEncoderBlock2D",) * 2, "up_block_types": ("UpDecoderBlock2D",) * 2})
  clip_cfg = clip.CLIPTextConfig.from_config({
      "vocab_size": 50, "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 1,
      "num_attention_heads": 4, "max_position_embeddings": 16})
  return {
      "qwen2_tied": lazy(LlamaForCausalLM, LlamaConfig(**QWEN)),
      "llama_all_bias": lazy(LlamaForCausalLM, LlamaConfig(**{
          **QWEN, "model_type": "llama", "tie_word_embeddings": False, "o_proj_bias": True,
          "mlp_bias": True})),
      "unet": lazy(unet.UNet2DConditionModel, unet_cfg),
      "dit": lazy(dit.DiTTransformer2DModel, dit.DiTConfig.from_config(DIT)),
      "vae": lazy(vae.AutoencoderKL, vae_cfg),
      "clip": lazy(clip.CLIPTextModel, clip_cfg),
  }


@pytest.fixture(scope="module")
def families():
  return {name: _tree(build) for name, build in _families().items()}


# Params each family must split (a sample of the table below, written out by hand).
MUST = {
    "qwen2_tied": {"model.layers.0.self_attn.q_proj.kernel": COL,
                   "model.layers.0.self_attn.k_proj.bias": P("model"),
                   "model.layers.0.self_attn.o_proj.kernel": ROW,
                   "model.layers.0.mlp.down_proj.kernel": ROW,
                   "model.embed_tokens.embedding": COL},
    "llama_all_bias": {"lm_head.kernel": COL, "model.layers.0.self_attn.o_proj.bias": REP,
                       "model.layers.0.mlp.up_proj.bias": P("model")},
    "unet": {"down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.kernel": COL,
             "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0.kernel": ROW,
             "down_blocks.0.attentions.0.transformer_blocks.0.ff.net.0.proj.kernel": COL,
             "down_blocks.0.attentions.0.transformer_blocks.0.ff.net.2.kernel": ROW,
             "down_blocks.0.attentions.0.proj_in.kernel": REP},
    "dit": {"transformer_blocks.0.norm1.linear.kernel": COL,  # adaLN: 1/3 of DiT-XL, was REP
            "transformer_blocks.0.norm1.linear.bias": P("model"),
            "transformer_blocks.0.attn1.to_out.0.kernel": ROW},
    "vae": {"encoder.mid_block.attentions.0.to_q.kernel": COL,
            "decoder.mid_block.attentions.0.to_out.0.kernel": ROW},
    "clip": {"encoder.layers.0.self_attn.out_proj.kernel": ROW,
             "encoder.layers.0.self_attn.out_proj.bias": REP,
             "encoder.layers.0.mlp.fc1.kernel": COL, "encoder.layers.0.mlp.fc2.kernel": ROW},
}


@pytest.mark.parametrize("model_size", [4, 3])
@pytest.mark.parametrize("family", sorted(MUST))
def test_every_param_gets_its_rule(families, family, model_size):
  """Every param of every family: split Megatron-style when its dim divides the axis, else
  replicated (model=3 divides some dims and not others); never split along a non-dividing dim."""
  params, linears = families[family]
  mesh = sharding_lib.make_mesh(data=1, model=model_size)
  flat = {".".join(str(k.key) for k in kp): x.shape
          for kp, x in jax.tree_util.tree_flatten_with_path(params)[0]}
  got = {p: sharding_lib.param_spec(mesh, p, s) for p, s in flat.items()}
  want = {p: _expected(p, s, linears, model_size) for p, s in flat.items()}
  assert got == want
  if model_size == 4:
    assert {p: got[p] for p in MUST[family]} == MUST[family]
  assert any(s != REP for s in got.values())
  for p, spec in got.items():  # a split dim always divides: device_put would refuse otherwise
    for dim, axis in zip(flat[p], spec):
      assert axis is None or dim % model_size == 0, (p, flat[p], spec)


# ----------------------------------------------------------------------------- TP forwards

def _trained(model, config, seed):
  a = ja.init_lora(model, config, seed=seed)
  key = jax.random.key(seed)
  weights = {}
  for p, w in a.weights.items():
    key, sub = jax.random.split(key)
    weights[p] = dict(w, b=0.2 * jax.random.normal(sub, w["b"].shape))
  return LoraAdapter(weights=weights, config=config)


@pytest.mark.parametrize("model_size", [4, 3])
def test_tensor_parallel_mixed_batch_equals_one_device(model_size):
  """Qwen2 (biases, tied head) with two adapters (one DoRA) and a mixed batch: S-LoRA's
  layout of each adapter leaf and logits equal to the unsharded run. model=3 splits only the
  dims it divides (vocab 96, MLP 48), so base and adapters fall back to replicated together."""
  model = ja.CausalLM.random(LlamaConfig(**QWEN), seed=0)
  model = model.with_params(jax.tree.map(lambda x: x + 0.05, model.params), merged=())
  adapters = [_trained(model, ja.LoraConfig(r=r, lora_alpha=8, target_modules="all-linear",
                                            use_dora=dora), i)
              for i, (r, dora) in enumerate([(2, False), (4, True)])]
  ids = np.random.default_rng(0).integers(0, QWEN["vocab_size"], (3, 5))
  which = [0, -1, 1]
  want = np.asarray(model(ids, adapters=adapters, adapter_ids=which))

  mesh = sharding_lib.make_mesh(data=1, model=model_size)
  sharded = model.with_params(sharding_lib.shard_params(model.params, mesh), merged=())
  s_adapters = [LoraAdapter(weights=sharding_lib.shard_adapter_weights(a.weights, mesh),
                            config=a.config) for a in adapters]
  w = s_adapters[1].weights
  split = model_size == 4
  m = "model" if split else None
  assert {k: v.sharding.spec for k, v in w["model.layers.0.self_attn.q_proj"].items()} == {
      "a": REP, "b": P(None, m), "magnitude": P(m)}           # column-parallel, out 32
  assert {k: v.sharding.spec for k, v in w["model.layers.0.self_attn.o_proj"].items()} == {
      "a": P(m, None), "b": REP, "magnitude": REP}            # row-parallel, in 32
  assert {k: v.sharding.spec for k, v in w["model.layers.0.mlp.down_proj"].items()} == {
      "a": ROW, "b": REP, "magnitude": REP}                   # in 48: divides 3 and 4
  kernel = sharded.params["model"]["layers"][0]["self_attn"]["q_proj"]["kernel"]
  assert kernel.sharding.spec == P(None, m)
  assert {s.data.shape for s in kernel.addressable_shards} == {(32, 32 // model_size if split
                                                                 else 32)}
  got = np.asarray(sharded(ids, adapters=s_adapters, adapter_ids=which))
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
  assert np.abs(want[0] - want[1]).max() > 1e-2  # the adapters change the logits


def test_tensor_parallel_dit_with_adaln_split_equals_one_device():
  """DiT's adaLN-Zero modulation (norm1.linear) is now column-parallel; with a LoRA on it, on
  to_q and on to_out.0 the sharded output equals the unsharded one."""
  config = dit.DiTConfig.from_config(DIT)
  graphdef, state = nnx.split(dit.DiTTransformer2DModel(config, rngs=nnx.Rngs(0)))
  leaves, treedef = jax.tree.flatten(nnx.to_pure_dict(state))
  keys = jax.random.split(jax.random.key(1), len(leaves))
  params = jax.tree.unflatten(treedef, [x + 0.1 * jax.random.normal(k, x.shape)
                                        for x, k in zip(leaves, keys)])
  model = dit.DiT(config, graphdef, params)
  adapter = _trained(model, ja.LoraConfig(r=4, target_modules=["to_q", "to_out.0", "linear"]), 3)
  assert "transformer_blocks.0.norm1.linear" in adapter.weights
  x = np.random.default_rng(0).standard_normal((2, 4, 4, 4)).astype(np.float32)
  t, y = np.array([3, 700]), np.array([1, 7])
  want = np.asarray(model(x, t, y, context=context(adapter)))

  mesh = sharding_lib.make_mesh(data=1, model=4)
  sharded = model.with_params(sharding_lib.shard_params(params, mesh), merged=())
  s_adapter = LoraAdapter(weights=sharding_lib.shard_adapter_weights(adapter.weights, mesh),
                          config=adapter.config)
  assert sharded.params["transformer_blocks"][0]["norm1"]["linear"]["kernel"].sharding.spec == COL
  assert s_adapter.weights["transformer_blocks.0.norm1.linear"]["b"].sharding.spec == COL
  assert s_adapter.weights["transformer_blocks.0.attn1.to_out.0"]["a"].sharding.spec == ROW
  got = np.asarray(sharded(x, t, y, context=context(s_adapter)))
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
  assert np.abs(want - np.asarray(model(x, t, y))).max() > 1e-3


# ----------------------------------------------------------------------------- the command

def _run(capsys, *argv):
  rc = cli.main(list(argv))
  out, err = capsys.readouterr()
  return rc, out, err


def _write(path, obj):
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps(obj))


def test_help_and_unknown_commands(capsys):
  for argv in ([], ["-h"], ["--help"]):
    rc, out, _ = _run(capsys, *argv)
    assert rc == 0 and "jaxadapt info DIR" in out and "jaxadapt demo" in out
  rc, _, err = _run(capsys, "bogus")
  assert rc == 2 and "unknown command 'bogus'" in err
  rc, out, _ = _run(capsys, "info", "--help")
  assert rc == 0 and out.startswith("usage: jaxadapt info DIR")
  rc, _, err = _run(capsys, "info", "a", "b")
  assert rc == 2 and "expected one DIR, got 2 arguments ['a', 'b']" in err
  rc, _, err = _run(capsys, "info")
  assert rc == 2 and "expected one DIR, got 0 arguments" in err


def test_info_errors_name_expected_and_found(capsys, tmp_path):
  expected = "expected a model dir (config.json), a PEFT adapter dir (adapter_config.json) or a "
  rc, _, err = _run(capsys, "info", str(tmp_path / "missing"))
  assert rc == 1 and expected in err and err.strip().endswith("found no such directory")
  (tmp_path / "file.txt").write_text("x")
  rc, _, err = _run(capsys, "info", str(tmp_path / "file.txt"))
  assert rc == 1 and expected in err and err.strip().endswith("found a file")
  (tmp_path / "d").mkdir()
  (tmp_path / "d" / "notes.md").write_text("x")
  rc, _, err = _run(capsys, "info", str(tmp_path / "d"))
  assert rc == 1 and expected in err and "found ['notes.md']" in err
  _write(tmp_path / "u" / "config.json", {"_class_name": "UNet2DModel"})
  rc, _, err = _run(capsys, "info", str(tmp_path / "u"))
  assert rc == 1 and "describes a diffusers UNet2DModel; jaxadapt reads UNet2DConditionModel" in err
  _write(tmp_path / "xl" / "model_index.json", {"_class_name": "StableDiffusionXLPipeline"})
  rc, _, err = _run(capsys, "info", str(tmp_path / "xl"))
  assert rc == 1 and "names 'StableDiffusionXLPipeline'; ja.load_pipeline reads" in err
  _write(tmp_path / "bert" / "config.json", {"model_type": "bert"})
  rc, _, err = _run(capsys, "info", str(tmp_path / "bert"))
  assert rc == 1 and "model_type 'bert'" in err


def test_info_on_model_peft_and_diffusers_dirs(capsys, tmp_path):
  _write(tmp_path / "lm" / "config.json", {**QWEN, "num_hidden_layers": 3})
  rc, out, _ = _run(capsys, "info", str(tmp_path / "lm"))
  assert rc == 0, out
  assert "causal LM (qwen2), loads with ja.load_model" in out and "num_hidden_layers=3" in out
  assert "weights: no .safetensors file found" in out

  model = ja.CausalLM.random(LlamaConfig(**QWEN), seed=0)
  ja.save_adapter(ja.init_lora(model, ja.LoraConfig(r=3, target_modules=["q_proj"])),
                  str(tmp_path / "peft"))
  rc, out, _ = _run(capsys, "info", str(tmp_path / "peft"))
  assert rc == 0 and "PEFT LoRA adapter, loads with ja.load_adapter" in out
  assert "r=3" in out and "weights: adapter_model.safetensors" in out

  pipe = tmp_path / "dit_pipe"
  _write(pipe / "model_index.json", {
      "_class_name": "DiTPipeline", "transformer": ["diffusers", "DiTTransformer2DModel"],
      "vae": ["diffusers", "AutoencoderKL"], "scheduler": ["diffusers", "DDIMScheduler"]})
  _write(pipe / "transformer" / "config.json", {"_class_name": "DiTTransformer2DModel", **DIT})
  _write(pipe / "vae" / "config.json", {"_class_name": "AutoencoderKL",
                                        "block_out_channels": [8, 16], "latent_channels": 4,
                                        "norm_num_groups": 4})
  _write(pipe / "scheduler" / "scheduler_config.json", {"_class_name": "DDIMScheduler"})
  rc, out, _ = _run(capsys, "info", str(pipe))
  assert rc == 0, out
  assert "diffusers DiTPipeline, loads with ja.load_pipeline" in out
  assert "diffusers DiT, loads with ja.load_dit" in out and "num_layers=1" in out
  assert "diffusers VAE, loads with ja.load_vae" in out and "DDIMScheduler" in out
  rc, out, _ = _run(capsys, "info", str(pipe / "vae"))
  assert rc == 0 and "block_out_channels=(8, 16)" in out
  (pipe / "vae" / "config.json").write_text("{not json")  # a broken component is named
  rc, _, err = _run(capsys, "info", str(pipe))
  assert rc == 1 and "vae/config.json is not valid JSON" in err
  shutil.rmtree(pipe / "vae")
  rc, _, err = _run(capsys, "info", str(pipe))
  assert rc == 1 and "model_index.json names component 'vae' but vae/ is missing" in err


# ----------------------------------------------------------------------------- the demo

def test_demo_help_and_bad_arguments(capsys):
  with pytest.raises(SystemExit) as e:
    cli.main(["demo", "--help"])
  assert e.value.code == 0 and capsys.readouterr().out.startswith("usage: jaxadapt demo")
  for argv, message in ((["--tasks", "nope"], "--tasks must name some of reverse"),
                        (["--tasks", ""], "--tasks must name some of"),
                        (["--max-tokens", "0"], "--max-tokens must be >= 1, got 0"),
                        (["--requests", "0"], "--requests must be >= 1, got 0"),
                        (["--adapters", "7"], "--adapters must be >= 8 (the task adapters), got 7"),
                        (["--rate", "0"], "--rate must be > 0, got 0.0")):
    with pytest.raises(SystemExit) as e:
      cli.main(["demo", *argv])
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_demo_check_fails_when_the_engine_is_wrong(monkeypatch, tmp_path):
  """The RESULT line checks the served answers against the task: an engine that picks the
  second-best token makes the demo print RESULT MISMATCH and exit 1."""
  import contextlib
  import io
  import types

  import jax
  import jax.numpy as jnp
  from serve import engine as engine_lib
  real = engine_lib.gen_lib.sample_tokens

  def second_best(logits, *args):
    best = real(logits, *args)
    return jnp.argsort(logits, axis=-1)[:, -2].astype(best.dtype)
  # Only the engine's sampler, traced anew.
  wrong = types.SimpleNamespace(**{**vars(engine_lib.gen_lib), "sample_tokens": second_best})
  monkeypatch.setattr(engine_lib, "gen_lib", wrong)
  jax.clear_caches()
  # Not capsys: uvicorn's logging keeps the streams it was started with, past the fixture's end.
  with pytest.raises(SystemExit) as e, contextlib.redirect_stdout(io.StringIO()) as buf:
    cli.main(["demo", "--tasks", "reverse", "--max-tokens", "8", "--requests", "4",
              "--adapters", "10", "--rate", "20", "--out", str(tmp_path)])
  jax.clear_caches()
  assert e.value.code == 1
  out = buf.getvalue()
  assert out.strip().splitlines()[-1].startswith("RESULT MISMATCH"), out
  assert "correct=0/2" in out.strip().splitlines()[-1], out
