"""train.pretrain, the trainer's second user: every parameter of a tiny base trains, a run
stopped and resumed equals an uninterrupted one exactly, and the exported Hugging Face dir loads
in jaxadapt and transformers with the trained model's logits."""
import dataclasses
import os

import jax
import numpy as np
import pytest

import jaxadapt as ja
from train import checkpoint as ckpt_lib
from train import lm
from train import loop
from train import pretrain
from train.configs.pretrain_tiny import get_config

TINY = dict(steps=6, batch_size=4, seq_len=16, synthetic_docs=100, warmup_steps=1,
            learning_rate=1e-2, checkpoint_every=3, log_every=1, progress=False)


def tiny(tmp_path, name="run", **overrides):
  """A 6-step run of the tiny Llama; runs differing only in out_dir share one compiled step."""
  return dataclasses.replace(get_config(), **{**TINY, "out_dir": str(tmp_path / name),
                                              **overrides})


def host(tree):
  return jax.tree.map(lambda x: np.asarray(jax.device_get(x)), tree)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """An uninterrupted run (from a given model) and a run stopped after step 5, then resumed."""
  tmp = tmp_path_factory.mktemp("pretrain")
  cfg = tiny(tmp, "full")
  init = ja.CausalLM.random(cfg.model_config(), seed=cfg.seed)
  before = host(init.params)
  cache = loop.jitted_step.cache_info()
  full = pretrain.train(cfg, model=init)
  stopped_cfg = tiny(tmp, "stopped")
  stopped = pretrain.train(stopped_cfg, stop_after=5)
  checkpoints = sorted(os.listdir(os.path.join(stopped_cfg.out_dir, "checkpoints")))
  exported_early = os.path.exists(os.path.join(stopped_cfg.out_dir, "model"))
  resumed = pretrain.train(stopped_cfg)
  after = loop.jitted_step.cache_info()
  return dict(cfg=cfg, init=init, before=before, full=full, stopped=stopped, resumed=resumed,
              stopped_cfg=stopped_cfg, checkpoints=checkpoints, exported_early=exported_early,
              built=after.misses - cache.misses, reused=after.hits - cache.hits)


def test_every_parameter_trains_and_the_loss_falls(runs):
  full, before = runs["full"], runs["before"]
  losses = np.asarray(full.losses)
  assert len(losses) == 6 and abs(losses[0] - np.log(256)) < 0.1  # ~uniform over bytes
  assert losses[-1] < losses[0] - 0.5
  trained = host(full.model.params)
  assert jax.tree.structure(trained) == jax.tree.structure(before)
  moved = jax.tree.map(lambda x, y: float(np.abs(x - y).max()), trained, before)
  assert min(jax.tree.leaves(moved)) > 1e-4, moved  # norms, embeddings, every kernel
  # Adam moments exist for exactly the params (the frozen tree is empty); counters = steps.
  adam = full.opt_state[1][0]
  assert jax.tree.structure(adam.mu) == jax.tree.structure(full.model.params)
  assert int(adam.count) == runs["cfg"].steps
  # The given model was copied, not donated to the step: its params are intact.
  jax.tree.map(np.testing.assert_array_equal, host(runs["init"].params), before)


def test_stopped_and_resumed_equals_uninterrupted(runs):
  full, stopped, resumed, cfg = runs["full"], runs["stopped"], runs["resumed"], runs["stopped_cfg"]
  assert runs["checkpoints"] == ["3"] and not runs["exported_early"]
  assert stopped.first_step == 1 and len(stopped.losses) == 5
  assert resumed.first_step == 4
  np.testing.assert_array_equal(stopped.losses, full.losses[:5])
  np.testing.assert_array_equal(resumed.losses, full.losses[3:])
  jax.tree.map(np.testing.assert_array_equal, host(resumed.model.params), host(full.model.params))
  jax.tree.map(np.testing.assert_array_equal, host(resumed.opt_state), host(full.opt_state))
  logged = ckpt_lib.read_metrics(os.path.join(cfg.out_dir, "metrics.jsonl"))
  assert [r["step"] for r in logged] == list(range(1, 7))
  np.testing.assert_array_equal([r["loss"] for r in logged], full.losses)
  # One compiled step served all three runs (the trainer's cache is keyed on the step itself).
  assert runs["built"] <= 1 and runs["reused"] >= 2
  # Same out_dir, other settings: refused, naming the field, before anything is restored.
  with pytest.raises(loop.RunError, match="different run.*'weight_decay': 0.5"):
    pretrain.train(dataclasses.replace(cfg, weight_decay=0.5))


def test_exported_dir_loads_with_the_trained_logits(runs):
  import torch
  import transformers
  full, cfg = runs["full"], runs["cfg"]
  directory = os.path.join(cfg.out_dir, "model")
  ids = np.random.default_rng(0).integers(0, 256, (2, 12))
  ours = np.asarray(full.model(ids))
  loaded = np.asarray(ja.load_model(directory)(ids))
  np.testing.assert_array_equal(loaded, ours)
  reference = transformers.AutoModelForCausalLM.from_pretrained(directory).eval()
  with torch.no_grad():
    theirs = reference(torch.tensor(ids)).logits.numpy()
  np.testing.assert_allclose(theirs, ours, atol=1e-4, rtol=0)


def test_training_continues_from_a_model_dir(runs, tmp_path):
  """--model_dir starts from the exported weights: the first loss is the trained model's."""
  source = os.path.join(runs["cfg"].out_dir, "model")
  cfg = tiny(tmp_path, model_dir=source, steps=2)
  stream = lm.build_data(cfg, 256)
  batch = stream.batch(0, cfg.batch_size)
  expected = float(lm.causal_lm_loss(runs["full"].model(batch["input_ids"],
                                                        batch["attention_mask"]),
                                     batch["labels"]))
  result = pretrain.train(cfg)
  np.testing.assert_allclose(result.losses[0], expected, rtol=1e-5)
  assert expected < runs["full"].losses[0] - 0.5
  ja.load_model(os.path.join(cfg.out_dir, "model"))  # re-exported with the source's config


def test_bad_settings_are_refused(tmp_path, capsys):
  with pytest.raises(ValueError, match=r"\['hidden_size'\] set the architecture .* model_dir"):
    tiny(tmp_path, model_dir="some/dir", hidden_size=32)
  with pytest.raises(ValueError, match="seq_len=1024 is longer than max_position_embeddings=512"):
    tiny(tmp_path, seq_len=1024)
  with pytest.raises(ValueError, match="warmup_steps must be in"):
    tiny(tmp_path, warmup_steps=7)
  cfg = pretrain.config_from_argv(["--steps", "90", "--hidden_size=32", "--tie_word_embeddings"])
  assert (cfg.steps, cfg.hidden_size, cfg.tie_word_embeddings) == (90, 32, True)
  assert pretrain.main(["--num_key_value_heads", "3"]) == 2  # 4 heads: not a multiple
  assert "error:" in capsys.readouterr().err
  qwen = dataclasses.replace(lm.TINY_LLAMA, model_type="qwen2", attention_bias=True)
  with pytest.raises(ValueError, match="differs from a plain Llama in .*attention_bias"):
    pretrain.hf_config(qwen)
