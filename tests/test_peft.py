"""LoRA on the frozen tree against PEFT (the reference): forward, merge, save/load both ways."""
import copy
import json

import numpy as np
import pytest
import torch
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, get_peft_model

import jaxadapt as ja

OPTIONS = {
    "list": dict(target_modules=["q_proj", "v_proj"]),
    "regex": dict(target_modules=r".*\.(k|o|up)_proj"),
    "all_linear": dict(target_modules="all-linear"),
    "layers_to_transform": dict(target_modules=["q_proj", "down_proj"], layers_to_transform=[1],
                                layers_pattern="layers"),
    "rank_alpha_pattern": dict(target_modules="all-linear", r=4,
                               rank_pattern={"q_proj": 2, r"layers\.1\.mlp\.up_proj": 7},
                               alpha_pattern={"v_proj": 3.0}, lora_alpha=16),
    "rslora": dict(target_modules=["gate_proj", "q_proj"], use_rslora=True, lora_alpha=5),
    "dora": dict(target_modules=["q_proj", "v_proj", "down_proj"], use_dora=True),
    "exclude_dropout": dict(target_modules="all-linear", exclude_modules=["o_proj"],
                            lora_dropout=0.1),
}


def _peft_model(base, options, seed=0):
  torch.manual_seed(seed)
  cfg = PeftLoraConfig(init_lora_weights=False, **{"r": 3, **options})
  model = get_peft_model(copy.deepcopy(base), cfg).eval()
  if cfg.use_dora:  # move magnitudes away from ||W + BA|| so they matter
    with torch.no_grad():
      for name, p in model.named_parameters():
        if "lora_magnitude_vector" in name:
          p.mul_(1 + 0.2 * torch.rand_like(p))
  return model


def _ids(seed=0, b=2, s=6):
  return torch.randint(0, 97, (b, s), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("option", sorted(OPTIONS))
def test_peft_adapter_forward_merge_and_save(option, llama_dir, tmp_path):
  directory, base = llama_dir
  peft_model = _peft_model(base, OPTIONS[option])
  peft_model.save_pretrained(str(tmp_path / "peft"))
  ids = _ids()
  with torch.no_grad():
    ref = peft_model(ids).logits.numpy()
  model = ja.load_model(directory)
  adapter = ja.load_adapter(str(tmp_path / "peft"))
  peft_paths = {n[len("base_model.model."):] for n, m in peft_model.named_modules()
                if hasattr(m, "lora_A")}
  assert set(adapter.weights) == peft_paths
  # jaxadapt's own target resolution agrees with PEFT's.
  assert set(adapter.config.targets(model.linear_paths)) == peft_paths
  out = np.asarray(model(ids.numpy(), adapter=adapter))
  np.testing.assert_allclose(out, ref, atol=1e-4, rtol=0)

  # merge == PEFT's merge_and_unload; the base tree is untouched; unmerge restores it.
  before = np.asarray(model.params["model"]["layers"][1]["self_attn"]["q_proj"]["kernel"]).copy()
  merged = ja.merge(model, adapter)
  merged_ref = copy.deepcopy(peft_model).merge_and_unload()
  with torch.no_grad():
    ref_merged = merged_ref(ids).logits.numpy()
  np.testing.assert_allclose(np.asarray(merged(ids.numpy())), ref_merged, atol=1e-4, rtol=0)
  for path in adapter.weights:
    torch_w = merged_ref.get_submodule(path).weight.detach().numpy().T
    ours = ja.adapters.lora.kernel_at(merged.params, path)
    np.testing.assert_allclose(np.asarray(ours), torch_w, atol=1e-5, rtol=0)
  np.testing.assert_array_equal(
      np.asarray(model.params["model"]["layers"][1]["self_attn"]["q_proj"]["kernel"]), before)
  restored = ja.unmerge(merged)
  for path in adapter.weights:
    np.testing.assert_allclose(np.asarray(ja.adapters.lora.kernel_at(restored.params, path)),
                               np.asarray(ja.adapters.lora.kernel_at(model.params, path)),
                               atol=1e-5, rtol=0)

  # A saved adapter reloads in PEFT with equal outputs.
  ja.save_adapter(adapter, str(tmp_path / "ours"))
  reloaded = PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "ours")).eval()
  with torch.no_grad():
    np.testing.assert_allclose(reloaded(ids).logits.numpy(), ref, atol=1e-4, rtol=0)


def test_qwen2_adapter_with_biases(qwen2_dir, tmp_path):
  directory, base = qwen2_dir
  peft_model = _peft_model(base, dict(target_modules="all-linear", use_dora=True))
  peft_model.save_pretrained(str(tmp_path))
  ids = _ids(1)
  with torch.no_grad():
    ref = peft_model(ids).logits.numpy()
  out = ja.load_model(directory)(ids.numpy(), adapter=ja.load_adapter(str(tmp_path)))
  np.testing.assert_allclose(np.asarray(out), ref, atol=1e-4, rtol=0)


@pytest.mark.parametrize("option,value", [
    ("bias", "all"), ("modules_to_save", ["lm_head"]), ("use_qalora", True),
    ("layer_replication", [[0, 1]]), ("init_lora_weights", "pissa"), ("lora_bias", True),
    ("fan_in_fan_out", True), ("target_parameters", ["x"]),
])
def test_unsupported_peft_option_is_named(option, value, llama_dir, tmp_path):
  directory, base = llama_dir
  _peft_model(base, dict(target_modules=["q_proj"])).save_pretrained(str(tmp_path))
  cfg_path = tmp_path / "adapter_config.json"
  cfg = json.loads(cfg_path.read_text())
  cfg[option] = value
  cfg_path.write_text(json.dumps(cfg))
  with pytest.raises(NotImplementedError, match=option):
    ja.load_adapter(str(tmp_path))


def test_lora_dropout_matches_its_definition():
  import jax
  import jax.numpy as jnp
  from jaxadapt.adapters.hook import SingleLoRA, project
  k = jax.random.split(jax.random.key(0), 4)
  x = jax.random.normal(k[0], (5, 8))
  w = jax.random.normal(k[1], (8, 6))
  a, b = jax.random.normal(k[2], (8, 2)), jax.random.normal(k[3], (2, 6))
  key = jax.random.key(7)
  ctx = SingleLoRA(a=a, b=b, scale=jnp.float32(0.5), dropout_key=key, dropout=0.25)
  keep = jax.random.bernoulli(key, 0.75, x.shape)
  want = x @ w + 0.5 * ((jnp.where(keep, x / 0.75, 0)) @ a) @ b
  np.testing.assert_allclose(np.asarray(project(x, w, None, ctx)), np.asarray(want), atol=1e-5)


def test_diffusers_lora_file_components(tmp_path):
  """A diffusers LoRA file with several components needs component=; each reads on its own."""
  from safetensors.numpy import save_file
  rng = np.random.default_rng(0)
  t = {"unet.mid.attn.to_q.lora_A.weight": rng.normal(size=(2, 8)).astype(np.float32),
       "unet.mid.attn.to_q.lora_B.weight": rng.normal(size=(6, 2)).astype(np.float32),
       "text_encoder.layers.0.q_proj.lora_A.weight": rng.normal(size=(3, 4)).astype(np.float32),
       "text_encoder.layers.0.q_proj.lora_B.weight": rng.normal(size=(4, 3)).astype(np.float32)}
  save_file(t, str(tmp_path / "pytorch_lora_weights.safetensors"))
  with pytest.raises(ValueError, match=r"\['text_encoder', 'unet'\]; pass component="):
    ja.load_adapter(str(tmp_path))
  unet = ja.load_adapter(str(tmp_path), component="unet")
  assert list(unet.weights) == ["mid.attn.to_q"] and unet.scale("mid.attn.to_q") == 1.0
  np.testing.assert_array_equal(np.asarray(unet.weights["mid.attn.to_q"]["b"]),
                                t["unet.mid.attn.to_q.lora_B.weight"].T)
  te = ja.load_adapter(str(tmp_path / "pytorch_lora_weights.safetensors"),
                       component="text_encoder")
  assert te.rank("layers.0.q_proj") == 3
  with pytest.raises(ValueError, match="no LoRA for component 'vae'"):
    ja.load_adapter(str(tmp_path), component="vae")
  with pytest.raises(FileNotFoundError, match="PEFT adapter dir"):
    ja.load_adapter(str(tmp_path / "nothing_here"))
