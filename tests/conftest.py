"""Shared fixtures: tiny random Hugging Face models saved with `save_pretrained`.

Eight simulated CPU devices are set before jax is imported so sharded tests can build meshes.
XLA's CPU backend compiles at LLVM optimization level 0: the models are tiny, so compiling is
most of the suite's time (a tiny U-Net forward: 2.7 s -> 1.4 s; the suite measured 9m06s -> 8m32s and 7m15s quiet) and
running the compiled code little of it. It also uses XLA:CPU's older loop fusion emitters
(`--xla_cpu_use_fusion_emitters=false`), which compile about twice as fast at -O0 and run as fast
(measured 2026-12-07, jax 0.10.2: the toy FACT U-Net's training-step compile 3.56 s -> 1.66 s,
its run 88 -> 86 ms; tests/test_fact.py + tests/test_agd.py 108 s -> 78 s). HLO-level
optimization is unchanged; float results may differ in the last bits, and every comparison has
its tolerance. The notebooks (test_colab) run with XLA's defaults, as users run them. Set
XLA_FLAGS yourself to test otherwise.
"""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8 "
                                   "--xla_backend_optimization_level=0 "
                                   "--xla_cpu_use_fusion_emitters=false")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import gc  # noqa: E402
import sys  # noqa: E402

# The helpers in tests/ (_notebooks, _adapter_helpers) import from modules in subfolders too.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import pytest  # noqa: E402

@pytest.fixture(autouse=True, scope="module")
def _free_compiled_programs():
  """Drops jax's compiled programs after each test module. Every XLA:CPU executable holds
  memory mappings, and one process running the whole suite reached the kernel's limit
  (vm.max_map_count, 65530) and crashed in the compiler; tests share programs within a module,
  rarely across modules."""
  yield
  import jax
  jax.clear_caches()
  gc.collect()


TINY = dict(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2)


def make_hf_model(family: str, directory: str, seed: int = 0, **overrides):
  """Builds and saves a tiny random transformers model; returns the torch model (eval mode)."""
  import torch
  import transformers as tf
  classes = {"llama": (tf.LlamaConfig, tf.LlamaForCausalLM),
             "mistral": (tf.MistralConfig, tf.MistralForCausalLM),
             "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM)}
  cfg_cls, model_cls = classes[family]
  torch.manual_seed(seed)
  model = model_cls(cfg_cls(**{**TINY, **overrides})).eval()
  with torch.no_grad():  # HF inits norms to ones and biases to zeros: make them matter.
    for name, p in model.named_parameters():
      if name.endswith("norm.weight") or name.endswith(".bias"):
        p.add_(0.1 * torch.randn_like(p))
  model.save_pretrained(directory)
  return model


@pytest.fixture(scope="session")
def hf_model_maker():
  """`make_hf_model`, for tests that build a model of their own (importing it from `conftest`
  would find whichever conftest.py pytest loaded last)."""
  return make_hf_model


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory):
  d = tmp_path_factory.mktemp("llama")
  model = make_hf_model("llama", str(d))
  return str(d), model


@pytest.fixture(scope="session")
def qwen2_dir(tmp_path_factory):
  d = tmp_path_factory.mktemp("qwen2")
  model = make_hf_model("qwen2", str(d), seed=1)
  return str(d), model
