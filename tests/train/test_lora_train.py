"""train.lora: sharding-invariant losses, exact resume (also after SIGKILL), adapter-only
optimizer state, a falling loss on the embedded default, and a PEFT export equal to jaxadapt."""
import copy
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
import torch

import jaxadapt as ja
from tests.conftest import make_hf_model
from train import checkpoint as ckpt_lib
from train import data as data_lib
from train import flags
from train import lora as train_lora
from train.configs.lora_tiny import get_config

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def small(tmp_path, name="run", **overrides):
  """A few-step DoRA + dropout config on the embedded tiny Llama and a smaller corpus.

  Tests share it where they can: runs that differ only in out_dir, checkpointing or logging
  reuse one compiled step (train.lora caches it), which keeps this file fast.
  """
  base = dict(out_dir=str(tmp_path / name), steps=6, batch_size=8, seq_len=32,
              synthetic_docs=300, warmup_steps=2, learning_rate=1e-2, checkpoint_every=3,
              log_every=1, progress=False, use_dora=True, lora_dropout=0.1)
  return dataclasses.replace(get_config(), **{**base, **overrides})


def host(tree):
  return jax.tree.map(lambda x: np.asarray(jax.device_get(x)), tree)


# --- loss and data ---------------------------------------------------------------------------

def test_loss_equals_transformers_loss_with_ignored_labels(llama_dir):
  directory, torch_model = llama_dir
  ids = np.random.default_rng(0).integers(0, 97, (3, 9))
  labels = ids.copy()
  labels[0, :4] = data_lib.IGNORE
  labels[2, 6:] = data_lib.IGNORE
  with torch.no_grad():
    ref = torch_model(torch.tensor(ids), labels=torch.tensor(labels)).loss.item()
  logits = ja.load_model(directory)(ids)
  ours = float(train_lora.causal_lm_loss(logits, labels))
  np.testing.assert_allclose(ours, ref, rtol=1e-5)


def test_data_stream_is_a_pure_function_of_seed_and_position():
  tokens = data_lib.tokenize(data_lib.synthetic_corpus(50, seed=3))
  assert tokens.max() < 256 and tokens.size > 500
  ids, mask = data_lib.pack(tokens, 16)
  np.testing.assert_array_equal(ids.reshape(-1)[:tokens.size], tokens)
  assert mask.sum() == tokens.size and mask[-1, -1] == (tokens.size % 16 == 0)
  n = ids.shape[0]
  a = data_lib.PackedStream(ids=ids, mask=mask, seed=1)
  b = data_lib.PackedStream(ids=ids, mask=mask, seed=1)
  # Each epoch visits every chunk once; a fresh stream gives the same batch at a position.
  np.testing.assert_array_equal(np.sort(a.example_indices(n, n)), np.arange(n))
  np.testing.assert_array_equal(a.batch(37, 5)["input_ids"], b.batch(37, 5)["input_ids"])
  whole = a.example_indices(0, 3 * n)
  np.testing.assert_array_equal(whole[37:42], b.example_indices(37, 5))
  assert not np.array_equal(a.order(0), data_lib.PackedStream(ids, mask, seed=2).order(0))
  last = a.batch(int(np.argwhere(whole == n - 1)[0, 0]), 1)  # the padded chunk
  np.testing.assert_array_equal(last["labels"] == data_lib.IGNORE, last["attention_mask"] == 0)


def test_text_file_uses_the_model_dirs_tokenizer(tmp_path):
  from tokenizers import Tokenizer, models, pre_tokenizers
  from transformers import PreTrainedTokenizerFast
  vocab = {"[UNK]": 0, "</s>": 1, "hello": 2, "world": 3, "again": 4}
  tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
  tok.pre_tokenizer = pre_tokenizers.Whitespace()
  PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>",
                          unk_token="[UNK]").save_pretrained(str(tmp_path))
  ids = data_lib.tokenize("hello world\n\nworld again zzz\n", str(tmp_path))
  np.testing.assert_array_equal(ids, [2, 3, 1, 3, 4, 0, 1])
  np.testing.assert_array_equal(data_lib.tokenize("hi", None), [104, 105])  # bytes without one


# --- the training loop -----------------------------------------------------------------------

@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (simulated) devices")
@pytest.mark.parametrize("data,model", [(4, 2), (8, 1)])
def test_sharded_training_matches_one_device(data, model, tmp_path):
  one = train_lora.train(small(tmp_path, "one"))
  many = train_lora.train(small(tmp_path, "many", data_parallel=data, model_parallel=model))
  assert len(one.losses) == 6 and one.losses[-1] < one.losses[0]
  np.testing.assert_allclose(many.losses, one.losses, atol=1e-5, rtol=0)
  # Adam divides by sqrt(nu): float-rounding differences in tiny gradients move weights ~1e-5.
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, atol=1e-4, rtol=0),
               host(many.adapter.weights), host(one.adapter.weights))
  # The adapter and its Adam moments are sharded the same way (Megatron rules on 'model').
  w = many.adapter.weights
  mu = many.opt_state[1][0].mu
  assert jax.tree.structure(mu) == jax.tree.structure(w)
  jax.tree.map(lambda m, x: np.testing.assert_equal(m.sharding.spec, x.sharding.spec), mu, w)
  spec = w["model.layers.0.self_attn.q_proj"]["b"].sharding.spec
  assert spec == jax.sharding.PartitionSpec(None, "model" if model > 1 else None)


def test_resume_after_stop_continues_the_same_curve(tmp_path):
  full = train_lora.train(small(tmp_path, "full"))
  cfg = small(tmp_path, "killed")
  first = train_lora.train(cfg, stop_after=5)  # "killed" after step 5; last checkpoint: 3
  assert first.first_step == 1 and len(first.losses) == 5
  assert not os.path.exists(os.path.join(cfg.out_dir, "adapter"))
  assert os.listdir(os.path.join(cfg.out_dir, "checkpoints")) == ["3"]  # every 3 steps only
  second = train_lora.train(cfg)  # the same command again
  assert second.first_step == 4
  np.testing.assert_array_equal(first.losses[:5], full.losses[:5])
  np.testing.assert_array_equal(second.losses, full.losses[3:])
  jax.tree.map(np.testing.assert_array_equal, host(second.adapter.weights),
               host(full.adapter.weights))
  logged = ckpt_lib.read_metrics(os.path.join(cfg.out_dir, "metrics.jsonl"))
  assert [r["step"] for r in logged] == list(range(1, 7))
  np.testing.assert_array_equal([r["loss"] for r in logged], full.losses)
  # Same out_dir, different run: refused with a message naming the field.
  with pytest.raises(ValueError, match="learning_rate"):
    train_lora.train(dataclasses.replace(cfg, learning_rate=0.5))


@pytest.fixture(scope="module")
def default_run(tmp_path_factory):
  """The embedded default (`python -m train.lora` without arguments), run once in-process."""
  cfg = dataclasses.replace(get_config(), out_dir=str(tmp_path_factory.mktemp("default")),
                            progress=False)
  return cfg, train_lora.train(cfg)


def test_resume_after_sigkill_of_the_module(default_run, tmp_path):
  """`python -m train.lora` killed with SIGKILL mid-run, then rerun: the uninterrupted curve."""
  ref_cfg, ref = default_run
  every = 30
  args = ["--out_dir", str(tmp_path / "cli"), "--config.checkpoint_every", str(every),
          "--log_every=1", "--progress", "false"]
  metrics = tmp_path / "cli" / "metrics.jsonl"
  # A persistent compilation cache spares the rerun the XLA compile (not needed for resume).
  env = {**os.environ, "JAX_COMPILATION_CACHE_DIR": str(tmp_path / "xla_cache"),
         "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
  proc = subprocess.Popen([sys.executable, "-m", "train.lora", *args], cwd=REPO, env=env,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
  deadline = time.time() + 300
  first_ckpt = tmp_path / "cli" / "checkpoints" / str(every)  # orbax renames it when complete
  while time.time() < deadline and proc.poll() is None:
    if first_ckpt.exists() and len(metrics.read_text().splitlines()) >= every + 5:
      break
    time.sleep(0.01)
  assert proc.poll() is None, f"the run ended before it could be killed: {proc.stderr.read()}"
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  done = len(metrics.read_text().splitlines())
  assert every + 5 <= done < ref_cfg.steps
  rerun = subprocess.run([sys.executable, "-m", "train.lora", *args], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=300)
  assert rerun.returncode == 0, rerun.stderr
  resumed_from = int(rerun.stdout.split("steps ")[1].split("..")[0])
  assert resumed_from > every and (resumed_from - 1) % every == 0  # resumed at a checkpoint
  logged = ckpt_lib.read_metrics(str(metrics))
  assert [r["step"] for r in logged] == list(range(1, ref_cfg.steps + 1))
  np.testing.assert_allclose([r["loss"] for r in logged], ref.losses, atol=1e-6, rtol=0)
  exported = ja.load_adapter(str(tmp_path / "cli" / "adapter"))
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, atol=1e-6, rtol=0),
               host(exported.weights), host(ref.adapter.weights))


def test_only_the_adapter_trains_and_the_base_is_untouched(tmp_path):
  model = ja.CausalLM.random(train_lora.TINY_LLAMA, seed=0)
  before = host(model.params)
  cfg = small(tmp_path)
  result = train_lora.train(cfg, model=model)
  init = ja.adapters.lora.init_lora(model.params, model.linear_paths, cfg.lora_config(),
                                    jax.random.key(cfg.seed)).weights
  weights = result.adapter.weights
  assert set(weights) == set(cfg.lora_config().targets(model.linear_paths))
  assert all(set(w) == {"a", "b", "magnitude"} for w in weights.values())
  # Optimizer state: two Adam moments with exactly the adapter's tree, plus scalar counters.
  adam = result.opt_state[1][0]
  assert jax.tree.structure(adam.mu) == jax.tree.structure(weights)
  assert jax.tree.structure(adam.nu) == jax.tree.structure(weights)
  leaves = jax.tree.leaves(result.opt_state)
  n_adapter = len(jax.tree.leaves(weights))
  assert sum(x.ndim > 0 for x in leaves) == 2 * n_adapter
  counters = [int(x) for x in leaves if x.ndim == 0]
  assert counters and all(c == cfg.steps for c in counters)
  # Every adapter leaf moved (b from zero, DoRA magnitudes too); the base is bitwise equal.
  for path, w in host(weights).items():
    for leaf, value in w.items():
      assert np.abs(value - np.asarray(init[path][leaf])).max() > 1e-4, (path, leaf)
  jax.tree.map(np.testing.assert_array_equal, host(model.params), before)
  jax.tree.map(np.testing.assert_array_equal, host(result.model.params), before)


def test_loss_falls_on_the_embedded_default(default_run):
  cfg, result = default_run
  losses = np.asarray(result.losses)
  assert len(losses) == cfg.steps
  assert abs(losses[0] - np.log(256)) < 0.1  # starts at ~uniform over bytes
  assert losses[-20:].mean() < 2.0  # below the corpus' bigram entropy (2.1 nats)
  logged = ckpt_lib.read_metrics(os.path.join(cfg.out_dir, "metrics.jsonl"))
  np.testing.assert_array_equal([r["loss"] for r in logged], losses)
  lrs = [r["learning_rate"] for r in logged]
  assert max(lrs) == pytest.approx(cfg.learning_rate)
  assert lrs[-1] == pytest.approx(cfg.learning_rate * cfg.final_lr_fraction, rel=1e-2)


def test_exported_adapter_loads_in_peft_with_equal_logits(tmp_path):
  model_dir = str(tmp_path / "hf")
  torch_model = make_hf_model("llama", model_dir, vocab_size=256)
  cfg = small(tmp_path, model_dir=model_dir, lora_dropout=0.0, learning_rate=3e-2)
  result = train_lora.train(cfg)
  from peft import PeftModel
  peft_model = PeftModel.from_pretrained(copy.deepcopy(torch_model),
                                         os.path.join(cfg.out_dir, "adapter")).eval()
  ids = np.random.default_rng(0).integers(0, 256, (2, 10))
  with torch.no_grad():
    ref = peft_model(torch.tensor(ids)).logits.numpy()
    base = torch_model(torch.tensor(ids)).logits.numpy()
  ours = np.asarray(ja.load_model(model_dir)(ids, adapter=jax.device_get(result.adapter)))
  np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=0)
  assert np.abs(ref - base).max() > 1e-2  # the trained adapter changes the model
  saved = json.load(open(os.path.join(cfg.out_dir, "adapter", "adapter_config.json")))
  assert saved["use_dora"] is True and saved["r"] == cfg.lora_r


# --- command line ----------------------------------------------------------------------------

def test_flags_override_the_config():
  cfg = train_lora.config_from_argv(["--steps", "20", "--config.batch_size=4", "--use_dora",
                                     "--target_modules", "q_proj,v_proj", "--model_dir", "none",
                                     "--learning_rate=1e-4", "--config", "lora_tiny"])
  assert (cfg.steps, cfg.batch_size, cfg.use_dora, cfg.learning_rate) == (20, 4, True, 1e-4)
  assert cfg.target_modules == ("q_proj", "v_proj") and cfg.model_dir is None
  assert train_lora.config_from_argv(["--target_modules", r".*\.q_proj"]).target_modules == \
      r".*\.q_proj"
  with pytest.raises(flags.FlagError, match="unknown flag --stepz"):
    train_lora.config_from_argv(["--stepz", "3"])
  with pytest.raises(flags.FlagError, match="steps"):
    train_lora.config_from_argv(["--steps", "many"])
  with pytest.raises(ValueError, match="divisible by data_parallel"):
    train_lora.config_from_argv(["--batch_size", "6", "--data_parallel", "4"])
  assert train_lora.main(["--lora_dropout", "1.5"]) == 2


def test_byte_data_on_a_small_vocabulary_is_refused(llama_dir, tmp_path):
  cfg = small(tmp_path, model_dir=llama_dir[0])  # vocab 97, no tokenizer in the dir
  with pytest.raises(ValueError, match="vocab_size >= 256"):
    train_lora.train(cfg)
  with pytest.raises(FileNotFoundError, match="no such file"):
    train_lora.train(dataclasses.replace(cfg, data=str(tmp_path / "missing.txt")))


def test_trains_on_a_text_file_as_bytes(tmp_path):
  path = tmp_path / "corpus.txt"
  path.write_text("the cat sat on the mat. " * 400, encoding="utf-8")
  result = train_lora.train(small(tmp_path, data=str(path)))
  # A periodic text: the loss leaves ln(256) and falls by over a nat in six steps.
  assert abs(result.losses[0] - np.log(256)) < 0.1
  assert result.losses[-1] < result.losses[0] - 1.0


def test_bfloat16_base_trains_close_to_float32(tmp_path):
  """A bf16 base (adapter and optimizer in f32) follows the f32 loss curve to bf16 precision."""
  f32 = train_lora.train(small(tmp_path, "f32", steps=8, use_dora=False, lora_dropout=0.0))
  b16 = train_lora.train(small(tmp_path, "b16", steps=8, use_dora=False, lora_dropout=0.0,
                               dtype="bfloat16"))
  assert jax.tree_util.tree_leaves(b16.model.params)[0].dtype == jax.numpy.bfloat16
  assert all(x.dtype == jax.numpy.float32 for x in jax.tree_util.tree_leaves(b16.adapter.weights))
  l32, l16 = np.asarray(f32.losses), np.asarray(b16.losses)
  assert np.isfinite(l16).all() and l16[-1] < l16[0] - 0.1
  np.testing.assert_allclose(l16[0], l32[0], rtol=1e-2)  # same model, bf16 rounding only
  np.testing.assert_allclose(l16, l32, rtol=0.05)  # trajectories drift apart a little
