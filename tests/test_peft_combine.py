"""Several adapters against PEFT: stacked DoRA merges, several active adapters, PEFT's
add_weighted_adapter (linear / cat / svd), and VeLoRA configs loading as LoRA."""
import copy

import numpy as np
import pytest
import torch
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, get_peft_model

import jaxadapt as ja
from jaxadapt.adapters.combine import combine
from jaxadapt.adapters.lora import kernel_at

_IDS = torch.randint(0, 97, (2, 6), generator=torch.Generator().manual_seed(0))


def _logits(model):
  with torch.no_grad():
    return model(_IDS).logits.numpy()


def _perturb_magnitudes(model):
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "lora_magnitude_vector" in name:
        p.mul_(1 + 0.3 * torch.rand_like(p))


def _peft_multi(base, configs, seed=0):
  """A PeftModel with adapters a0, a1, ... (random A and B, magnitudes moved off the norms)."""
  torch.manual_seed(seed)
  model = None
  for i, options in enumerate(configs):
    cfg = PeftLoraConfig(init_lora_weights=False, **options)
    if model is None:
      model = get_peft_model(copy.deepcopy(base), cfg, adapter_name="a0")
    else:
      model.add_adapter(f"a{i}", cfg)
  _perturb_magnitudes(model)
  return model.eval()


def _load_all(peft_model, tmp_path, names):
  peft_model.save_pretrained(str(tmp_path))
  # Named adapters (not "default") go to <dir>/<name>.
  return [ja.load_adapter(str(tmp_path / n)) for n in names]


DORA_STACK = [dict(r=3, target_modules=["q_proj", "v_proj"], use_dora=True),
              dict(r=2, target_modules=["q_proj", "down_proj"], lora_alpha=6),
              dict(r=4, target_modules=["v_proj", "q_proj", "o_proj"], use_dora=True,
                   use_rslora=True)]


@pytest.fixture(scope="module")
def dora_stack(llama_dir, tmp_path_factory):
  directory, base = llama_dir
  peft_model = _peft_multi(base, DORA_STACK)
  names = ["a0", "a1", "a2"]
  adapters = _load_all(peft_model, tmp_path_factory.mktemp("dora_stack"), names)
  return ja.load_model(directory), peft_model, adapters, names


def test_stacked_dora_merge_equals_peft_merge_and_unload(dora_stack):
  model, peft_model, adapters, names = dora_stack
  ref = copy.deepcopy(peft_model).merge_and_unload(adapter_names=names)
  merged = model
  for a in adapters:
    merged = ja.merge(merged, a)
  for path in ("model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.v_proj"):
    np.testing.assert_allclose(np.asarray(kernel_at(merged.params, path)),
                               ref.get_submodule(path).weight.detach().numpy().T,
                               atol=2e-6, rtol=0)
  np.testing.assert_allclose(np.asarray(merged(_IDS.numpy())), _logits(ref), atol=1e-5, rtol=0)
  # Unmerged newest first, the kernels come back.
  for _ in adapters:
    merged = ja.unmerge(merged)
  for path in adapters[0].weights:
    np.testing.assert_allclose(np.asarray(kernel_at(merged.params, path)),
                               np.asarray(kernel_at(model.params, path)), atol=1e-6, rtol=0)


def test_several_active_adapters_equal_peft_set_adapter(dora_stack, llama_dir, tmp_path):
  model, peft_model, adapters, names = dora_stack
  peft_model.base_model.set_adapter(names)
  ref = _logits(peft_model)
  peft_model.base_model.set_adapter("a0")
  both = combine(adapters, kind="active", params=model.params)
  np.testing.assert_allclose(np.asarray(model(_IDS.numpy(), adapter=both)), ref, atol=1e-5,
                             rtol=0)
  # Several active adapters are the merges one after another (PEFT's eval forward).
  np.testing.assert_allclose(np.asarray(ja.merge(model, both)(_IDS.numpy())), ref, atol=1e-5,
                             rtol=0)
  # Saved, PEFT runs it as one DoRA adapter with the same outputs.
  ja.save_adapter(both, str(tmp_path))
  reloaded = PeftModel.from_pretrained(copy.deepcopy(llama_dir[1]), str(tmp_path)).eval()
  np.testing.assert_allclose(_logits(reloaded), ref, atol=1e-5, rtol=0)
  with pytest.raises(ValueError, match="needs the base params"):
    combine(adapters, kind="active")


LORAS = [dict(r=3, target_modules=["q_proj", "v_proj"], lora_alpha=5),
         dict(r=3, target_modules=["q_proj", "up_proj"], lora_alpha=2, use_rslora=True),
         dict(r=5, target_modules=["v_proj"], lora_alpha=7)]


@pytest.mark.parametrize("kind,which,weights,extra", [
    ("linear", (0, 1), (0.7, -0.4), {}), ("cat", (0, 1, 2), (1.0, -0.5, 2.0), {}),
    ("svd", (0, 2), (0.6, 1.3), {}), ("svd", (1, 2), (1.0, 0.8), dict(svd_rank=2)),
    ("ties", (0, 1), (0.7, -0.4), dict(density=0.5)),
    ("magnitude_prune", (0, 1), (1.0, 0.6), dict(density=0.4)),
    ("ties_svd", (0, 2), (0.6, 1.3), dict(density=0.7, majority_sign_method="frequency"))])
def test_add_weighted_adapter_equals_peft(kind, which, weights, extra, llama_dir, tmp_path):
  directory, base = llama_dir
  peft_model = _peft_multi(base, [LORAS[i] for i in which], seed=1)
  names = [f"a{i}" for i in range(len(which))]
  adapters = _load_all(peft_model, tmp_path, names)
  peft_model.add_weighted_adapter(names, list(weights), "mix", combination_type=kind, **extra)
  peft_model.set_adapter("mix")
  ref = _logits(peft_model)
  model = ja.load_model(directory)
  mix = combine(adapters, weights, kind=kind, **extra)
  np.testing.assert_allclose(np.asarray(model(_IDS.numpy(), adapter=mix)), ref, atol=1e-5,
                             rtol=0)
  state = peft_model.state_dict()
  for path, w in mix.weights.items():
    a = state[f"base_model.model.{path}.lora_A.mix.weight"].numpy().T
    b = state[f"base_model.model.{path}.lora_B.mix.weight"].numpy().T
    if kind.endswith("svd"):  # factors equal up to LAPACK's signs: compare their product
      np.testing.assert_allclose(np.asarray(w["a"] @ w["b"]), a @ b, atol=1e-5, rtol=0)
    else:
      np.testing.assert_allclose(np.asarray(w["a"]), a, atol=1e-6, rtol=0)
      np.testing.assert_allclose(np.asarray(w["b"]), b, atol=1e-6, rtol=0)
  # Saved, it reloads in PEFT's layout (the config says r = lora_alpha = the new rank).
  ja.save_adapter(mix, str(tmp_path / "mix_ours"))
  again = ja.load_adapter(str(tmp_path / "mix_ours"))
  np.testing.assert_allclose(np.asarray(model(_IDS.numpy(), adapter=again)), ref, atol=1e-5,
                             rtol=0)


def test_combine_refusals(dora_stack):
  _, _, adapters, _ = dora_stack
  with pytest.raises(NotImplementedError, match="DoRA's magnitudes"):
    combine(adapters[:2], [1.0, 1.0], kind="cat")
  with pytest.raises(NotImplementedError, match="'dare_ties' .* at random"):
    combine(adapters, [1.0] * 3, kind="dare_ties")
  with pytest.raises(ValueError, match="needs density="):
    combine(adapters[1:], [1.0] * 2, kind="magnitude_prune_svd")
  with pytest.raises(ValueError, match="one weight per adapter"):
    combine(adapters[1:2], None, kind="svd")
  with pytest.raises(ValueError, match="takes no weights"):
    combine(adapters, [1.0] * 3)
  with pytest.raises(NotImplementedError, match="svd_clamp is not supported: .* signs"):
    combine(adapters[1:2], [1.0], kind="svd", svd_clamp=0.9)


def test_velora_config_loads_as_lora(llama_dir, tmp_path):
  directory, base = llama_dir
  torch.manual_seed(2)
  cfg = PeftLoraConfig(r=3, target_modules=["q_proj", "down_proj"], init_lora_weights=False,
                       velora_config=dict(num_groups=4))
  peft_model = get_peft_model(copy.deepcopy(base), cfg)
  peft_model.train()
  peft_model(_IDS).logits.sum().backward()  # fills VeLoRA's projection vectors (saved too)
  peft_model.eval()
  peft_model.save_pretrained(str(tmp_path))
  adapter = ja.load_adapter(str(tmp_path))
  assert set(adapter.weights["model.layers.0.mlp.down_proj"]) == {"a", "b"}
  out = ja.load_model(directory)(_IDS.numpy(), adapter=adapter)
  np.testing.assert_allclose(np.asarray(out), _logits(peft_model), atol=1e-5, rtol=0)
