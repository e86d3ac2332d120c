"""train.digits: the stratified split, the Frechet distance against its closed form, the judge's
held-out accuracy, and the tiny DiT base: its loss falls, a stopped and resumed run equals an
uninterrupted one exactly, and the exported pipeline loads in jaxadapt and in diffusers with the
trained model's outputs."""
import dataclasses
import json
import os

import jax
import numpy as np
import pytest

from jaxadapt.diffusion.schedulers import scheduler_from_config
from jaxadapt.models.dit import load_dit
from train import digits
from train.configs.digits_tiny import get_config


def host(tree):
  return jax.tree.map(lambda x: np.asarray(jax.device_get(x)), tree)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """An uninterrupted 6-step tiny run, and one stopped after step 5 and resumed (from step 3)."""
  tmp = tmp_path_factory.mktemp("digits")
  cfg = dataclasses.replace(get_config(), out_dir=str(tmp / "full"))
  full = digits.train_base(cfg)
  stopped_cfg = dataclasses.replace(cfg, out_dir=str(tmp / "stopped"))
  stopped = digits.train_base(stopped_cfg, stop_after=5)
  exported_early = os.path.exists(os.path.join(stopped_cfg.out_dir, "pipeline"))
  resumed = digits.train_base(stopped_cfg)
  return dict(cfg=cfg, full=full, stopped=stopped, resumed=resumed,
              exported_early=exported_early)


def _inputs(seed=0, b=4):
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((b, 1, 8, 8)).astype(np.float32)
  return x, np.array([0, 17, 500, 999])[:b], np.array([3, 10, 0, 9])[:b]  # 10 = null label


def test_split_is_deterministic_stratified_and_disjoint():
  x_tr, y_tr = digits.load_digits("train")
  x_ho, y_ho = digits.load_digits("held_out")
  x_all, y_all = digits.load_digits("all")
  assert x_tr.shape == (1442, 1, 8, 8) and x_ho.shape == (355, 1, 8, 8)
  assert x_all.shape == (1797, 1, 8, 8) and x_tr.dtype == np.float32 and y_tr.dtype == np.int32
  assert x_all.min() == -1.0 and x_all.max() == 1.0  # pixel values 0..16 -> v / 8 - 1
  np.testing.assert_array_equal(np.unique(x_all * 8 + 8), np.arange(17))
  idx_tr = digits.split_indices(y_all, "train")
  idx_ho = digits.split_indices(y_all, "held_out")
  assert not set(idx_tr) & set(idx_ho) and len(idx_tr) + len(idx_ho) == 1797
  counts = np.bincount(y_all, minlength=10)
  # Per class: floor(n / 5) held out (every 5th image in dataset order).
  np.testing.assert_array_equal(np.bincount(y_ho, minlength=10), counts // 5)
  np.testing.assert_array_equal(np.bincount(y_tr, minlength=10), counts - counts // 5)
  np.testing.assert_array_equal(digits.load_digits("held_out")[1], y_ho)  # deterministic
  with pytest.raises(ValueError, match="split must be one of"):
    digits.load_digits("test")


def test_frechet_distance_equals_the_closed_form():
  """Large Gaussian samples: ||mu_a - mu_b||^2 + sum_i (s_a,i - s_b,i)^2 for diagonal covs."""
  rng = np.random.default_rng(0)
  mu_a, mu_b = np.array([0.0, 1.0, -2.0, 0.5]), np.array([1.0, 1.0, 0.0, 0.5])
  sd_a, sd_b = np.array([1.0, 2.0, 0.5, 1.0]), np.array([2.0, 1.0, 0.5, 3.0])
  n = 400_000
  a = mu_a + sd_a * rng.standard_normal((n, 4))
  b = mu_b + sd_b * rng.standard_normal((n, 4))
  want = np.sum((mu_a - mu_b) ** 2) + np.sum((sd_a - sd_b) ** 2)  # 5 + 6 = 11
  assert want == 11.0
  assert abs(digits.frechet_distance(a, b) - want) < 0.05
  assert abs(digits.frechet_distance(a, a)) < 1e-8
  # Exact for the sample moments: a set shifted by c has FD |c|^2 to itself.
  assert abs(digits.frechet_distance(a[:1000], a[:1000] + 0.5) - 4 * 0.25) < 1e-8
  with pytest.raises(ValueError, match="same F"):
    digits.frechet_distance(a[:, :3], b)


def test_classifier_reaches_95_percent_held_out_and_round_trips(tmp_path):
  clf = digits.train_classifier(seed=0, steps=200)
  x, y = digits.load_digits("held_out")
  acc = clf.accuracy(x, y)
  assert acc >= 0.95 and clf.info["held_out_accuracy"] == acc
  assert clf.features(x[:5]).shape == (5, digits.DigitsClassifier.FEATURES)
  path = str(tmp_path / "clf.safetensors")
  clf.save(path)
  back = digits.DigitsClassifier.load(path)
  np.testing.assert_array_equal(back.logits(x), clf.logits(x))
  assert back.info["held_out_accuracy"] == acc
  # The FD floor (train vs held-out real digits) is far below random noise's.
  noise = np.random.default_rng(0).uniform(-1, 1, (355, 1, 8, 8)).astype(np.float32)
  assert digits.digits_fd(clf, digits.load_digits("train")[0]) < 0.05 * digits.digits_fd(
      clf, noise)
  with pytest.raises(ValueError, match=r"expected digits \[N, 1, 8, 8\]"):
    clf.predict(x[:, 0])


def test_the_base_trains(runs):
  full = runs["full"]
  losses = np.asarray(full.losses)
  assert len(losses) == 6 and full.first_step == 1
  assert 0.6 < losses[0] < 1.5  # eps-prediction from a zero output: E||eps||^2 = 1
  assert losses[-3:].mean() < losses[:3].mean() - 0.05


def test_stopped_and_resumed_equals_uninterrupted(runs):
  full, stopped, resumed = runs["full"], runs["stopped"], runs["resumed"]
  assert not runs["exported_early"] and stopped.pipeline_dir is None
  assert len(stopped.losses) == 5 and resumed.first_step == 4
  np.testing.assert_array_equal(stopped.losses, full.losses[:5])
  np.testing.assert_array_equal(resumed.losses, full.losses[3:])
  jax.tree.map(np.testing.assert_array_equal, host(resumed.model.params), host(full.model.params))


def test_pipeline_loads_in_jaxadapt_and_diffusers(runs):
  torch = pytest.importorskip("torch")
  diffusers = pytest.importorskip("diffusers")
  full = runs["full"]
  d = full.pipeline_dir
  with open(os.path.join(d, "model_index.json")) as f:
    index = json.load(f)
  assert index["_class_name"] == "DiTPipeline" and index["vae"] == [None, None]
  assert index["id2label"]["7"] == "seven"
  sched = scheduler_from_config(os.path.join(d, "scheduler"))
  assert type(sched).__name__ == "DDIMScheduler"
  assert diffusers.DDIMScheduler.from_pretrained(d, subfolder="scheduler").config.beta_end == 0.02
  x, t, y = _inputs()
  want = np.asarray(full.model(x, t, y))
  loaded = load_dit(os.path.join(d, "transformer"))
  assert loaded.config == full.model.config
  np.testing.assert_allclose(np.asarray(loaded(x, t, y)), want, atol=1e-5, rtol=0)
  ref = diffusers.DiTTransformer2DModel.from_pretrained(os.path.join(d, "transformer")).eval()
  with torch.no_grad():
    got = ref(torch.from_numpy(x), timestep=torch.from_numpy(t),
              class_labels=torch.from_numpy(y)).sample.numpy()
  assert np.abs(want).max() > 1e-3  # the trained output is not the zero-init one
  np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)


def test_config_errors_are_clear(tmp_path):
  with pytest.raises(ValueError, match="label_dropout must be in"):
    dataclasses.replace(get_config(), label_dropout=1.0)
  with pytest.raises(ValueError, match="patch_size must divide"):
    dataclasses.replace(get_config(), patch_size=3)
  with pytest.raises(ValueError, match="batch_size=15 must divide"):
    dataclasses.replace(get_config(), batch_size=15, data_parallel=2)
