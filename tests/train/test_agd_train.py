"""train.agd: trajectories on disk (Algorithm 1) against direct CFG, resume of the collection,
training (Algorithm 2) sharded = single device, exact resume, and two processes = one.

A tiny random pixel-space DiT pipeline (saved as `train/digits.py` saves the digits base) is the
frozen base; every run is a few steps.
"""
import dataclasses
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxadapt import agd as agd_lib
from jaxadapt import sharding as sharding_lib
from jaxadapt.models.dit import DiT, DiTConfig, DiTTransformer2DModel
from train import agd as train_agd
from train import digits
from train.loop import RunError

from _processes import run_two_processes

SCHED = {"_class_name": "DDIMScheduler", "num_train_timesteps": 1000, "beta_start": 0.0001,
         "beta_end": 0.02, "beta_schedule": "linear", "clip_sample": False,
         "set_alpha_to_one": True, "steps_offset": 0, "prediction_type": "epsilon"}
FLAGS = dict(kinds=("token",), default_kind="token", ablation=False, hidden=8, style_steps=0,
             fourier_features=8, num_steps=3, num_trajectories=12, shard_size=4,
             collect_batch=4, eval_trajectories=2, steps=4, batch_size=8, warmup_steps=1,
             checkpoint_every=2, log_every=1, progress=False, learning_rate=3e-3)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
  """(pipeline dir, the DiT): random weights with the conditioning moved off zero."""
  cfg = DiTConfig(num_attention_heads=2, attention_head_dim=8, in_channels=1, out_channels=1,
                  num_layers=2, sample_size=8, patch_size=2, num_embeds_ada_norm=10)
  graphdef, state = nnx.split(DiTTransformer2DModel(cfg, rngs=nnx.Rngs(0)))
  keys = iter(jax.random.split(jax.random.key(1), 512))
  params = jax.tree.map(lambda x: x + 0.2 * jax.random.normal(next(keys), x.shape),
                        nnx.to_pure_dict(state))
  model = DiT(cfg, graphdef, params)
  directory = str(tmp_path_factory.mktemp("agd_base") / "pipeline")
  digits.save_pipeline(model, directory, SCHED)
  return directory, model


def _config(base, out, **kw):
  return train_agd.AGDTrainConfig(pipeline=base[0], out_dir=str(out), **{**FLAGS, **kw})


@pytest.fixture(scope="module")
def collected(base, tmp_path_factory):
  out = tmp_path_factory.mktemp("agd_run")
  config = _config(base, out)
  pipe = train_agd.load_base(config.pipeline_dir())
  train_agd.collect(pipe, str(out / "trajectories"), train_agd.train_spec(config), batch=4,
                    progress=False)
  return config, pipe


def _timesteps(pipe):
  sched = pipe.default_scheduler
  return np.asarray(sched.init_state(3, jnp.zeros((1, 1, 8, 8))).timesteps)


def test_records_are_direct_cfg(collected, base):
  """Every record's eps_cfg is eps_u + w (eps_c - eps_u) of the base at the record's (x_t, t);
  step 0's x_t is trajectory i's own noise; w is drawn in the configured range."""
  config, _ = collected
  model = base[1]
  data = train_agd.TrajectoryShards(os.path.join(config.out_dir, "trajectories"))
  assert len(data) == 12 * 3
  arr = data.arrays()
  x, t, c, w = (jnp.asarray(arr[k]) for k in ("x", "t", "cond", "w"))
  eps_c, eps_u = model(x, t, c), model(x, t, jnp.full_like(c, 10))
  want = eps_u + w[:, None, None, None] * (eps_c - eps_u)
  np.testing.assert_allclose(arr["eps_cfg"], np.asarray(want), atol=2e-5)
  np.testing.assert_allclose(arr["eps_cond"], np.asarray(eps_c), atol=2e-5)
  assert np.abs(arr["eps_cfg"] - arr["eps_cond"]).max() > 1e-2
  assert ((arr["w"] >= 1.0) & (arr["w"] <= 6.0)).all() and len(set(arr["w"].tolist())) == 12
  noise, label, w5 = train_agd._trajectory_draws(5, config.seed, (1, 8, 8), 10, (1.0, 6.0), None)
  np.testing.assert_array_equal(arr["x"][5 * 3], noise)  # DDIM: init_noise_sigma = 1
  assert arr["cond"][5 * 3] == label and arr["w"][5 * 3] == np.float32(w5)
  np.testing.assert_array_equal(arr["t"][:3], _timesteps(collected[1]))  # DDIM "leading"


def test_collection_resumes_and_refuses_other_settings(collected):
  config, pipe = collected
  directory = os.path.join(config.out_dir, "trajectories")
  before = train_agd.TrajectoryShards(directory).arrays()
  shutil.rmtree(os.path.join(directory, "shard_00001"))
  with pytest.raises(RunError, match="1 of 3 shards are missing"):
    train_agd.TrajectoryShards(directory)
  train_agd.collect(pipe, directory, train_agd.train_spec(config), batch=4, progress=False)
  after = train_agd.TrajectoryShards(directory).arrays()
  for k in before:
    np.testing.assert_array_equal(before[k], after[k])
  other = dataclasses.replace(config, guidance_max=4.0)
  with pytest.raises(RunError, match="another collection"):
    train_agd.collect(pipe, directory, train_agd.train_spec(other), batch=4, progress=False)


def test_forward_noised_records(collected, base, tmp_path):
  """The ablation's records: x_t = sqrt(abar) x_0 + sqrt(1 - abar) eps from real digits at the
  sampler's timesteps, with the same CFG targets computed at those x_t."""
  config, pipe = collected
  real = digits.load_digits("train")[0][:20]
  train_agd.collect(pipe, str(tmp_path / "fn"), train_agd.train_spec(config, "forward_noised"),
                    batch=4, progress=False, real_images=real)
  arr = train_agd.TrajectoryShards(str(tmp_path / "fn")).arrays()
  x, t, c, w = (jnp.asarray(arr[k]) for k in ("x", "t", "cond", "w"))
  eps_c, eps_u = base[1](x, t, c), base[1](x, t, jnp.full_like(c, 10))
  np.testing.assert_allclose(arr["eps_cfg"], np.asarray(eps_u + w[:, None, None, None]
                                                        * (eps_c - eps_u)), atol=2e-5)
  assert sorted(set(arr["t"].tolist())) == sorted(_timesteps(pipe).tolist())


def test_sharded_training_equals_single_device_and_resumes_exactly(collected, tmp_path):
  config, pipe = collected
  data = os.path.join(config.out_dir, "trajectories")
  one = dataclasses.replace(config, out_dir=str(tmp_path / "one"))
  a1, fit1 = train_agd.train_adapter(one, pipe, "token", data,
                                     sharding_lib.make_mesh(1, 1, devices=jax.devices()[:1]))
  four = dataclasses.replace(config, out_dir=str(tmp_path / "four"), data_parallel=4)
  a4, fit4 = train_agd.train_adapter(four, pipe, "token", data, sharding_lib.make_mesh(4, 1))
  np.testing.assert_allclose(fit4.losses, fit1.losses, atol=1e-5, rtol=0)
  for x, y in zip(jax.tree.leaves(a1.params), jax.tree.leaves(a4.params)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-5, rtol=0)
  # Training lowers the loss on the whole collection (4 steps on batches of 8 records).
  everything = {k: jnp.asarray(v) for k, v in
                train_agd.TrajectoryShards(data).arrays().items()}
  loss = train_agd.AGDLoss(pipe.transformer.graphdef, a1.config)
  frozen = {"base": pipe.transformer.params, "fourier": a1.params["fourier"]}
  start = agd_lib.init_params(a1.config)
  before = float(loss(agd_lib.trainable_part(start), frozen, everything, None)[0])
  after = float(loss(agd_lib.trainable_part(a1.params), frozen, everything, None)[0])
  assert after < before, (before, after)
  # A run killed after 2 steps and resumed continues the identical loss curve.
  cut = dataclasses.replace(config, out_dir=str(tmp_path / "cut"))
  mesh = sharding_lib.make_mesh(1, 1, devices=jax.devices()[:1])
  _, first = train_agd.train_adapter(cut, pipe, "token", data, mesh, stop_after=2)
  a2, rest = train_agd.train_adapter(cut, pipe, "token", data, mesh)
  assert rest.first_step == 3
  np.testing.assert_allclose(first.losses + rest.losses, fit1.losses, atol=1e-6, rtol=0)
  for x, y in zip(jax.tree.leaves(a1.params), jax.tree.leaves(a2.params)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-6, rtol=0)


def test_record_batches_read_only_local_rows(collected):
  """Each host reads its share: rows outside the given sharding's devices stay zero."""
  config, _ = collected
  source = train_agd.TrajectoryShards(os.path.join(config.out_dir, "trajectories"))
  mesh = sharding_lib.make_mesh(8, 1)
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  full = train_agd.RecordBatches(source, 16, 0, sharding)
  assert full.rows == list(range(16))
  part = train_agd.RecordBatches(source, 16, 0, sharding)
  part.rows = [r for r in part.rows if r < 8]  # what a process owning devices 0-3 sees
  a, b = full(32), part(32)
  np.testing.assert_array_equal(a["x"][:8], b["x"][:8])
  assert not b["x"][8:].any() and a["x"][8:].any()
  # an epoch is a permutation: positions 0 .. len - 1 read every record once
  four = train_agd.RecordBatches(source, 4, 0, jax.sharding.NamedSharding(
      sharding_lib.make_mesh(4, 1), jax.sharding.PartitionSpec("data")))
  epoch = np.concatenate([four(p)["x"] for p in range(0, len(source), 4)])
  key = lambda x: np.lexsort(x.reshape(len(x), -1).T)  # noqa: E731
  everything = source.arrays()["x"]
  np.testing.assert_array_equal(epoch[key(epoch)], everything[key(everything)])


def test_each_process_collects_its_shards(collected, tmp_path, monkeypatch):
  """Process p of P makes shards p, p + P, ... (multi-host collection on a shared disk): two
  processes' shares together are the one-process collection, record for record."""
  from jax.experimental import multihost_utils
  config, pipe = collected
  out = str(tmp_path / "split")
  monkeypatch.setattr(jax, "process_count", lambda: 2)
  monkeypatch.setattr(multihost_utils, "sync_global_devices", lambda name: None)
  made = []
  for pid in (0, 1):
    monkeypatch.setattr(jax, "process_index", lambda pid=pid: pid)
    before = set(os.listdir(out)) if os.path.isdir(out) else set()
    train_agd.collect(pipe, out, train_agd.train_spec(config), batch=4, progress=False)
    made.append(sorted(n for n in set(os.listdir(out)) - before if n.startswith("shard_")))
  assert made == [["shard_00000", "shard_00002"], ["shard_00001"]]
  monkeypatch.undo()
  mine = train_agd.TrajectoryShards(out).arrays()
  single = train_agd.TrajectoryShards(os.path.join(config.out_dir, "trajectories")).arrays()
  for k in single:
    np.testing.assert_array_equal(mine[k], single[k], err_msg=k)


def test_two_processes_equal_one(collected, tmp_path):
  """`python -m train.agd train` on two processes (4 devices each, the data axis over all 8),
  each reading its rows of every batch, writes the losses and adapter of one process."""
  config, pipe = collected
  multi = tmp_path / "multi"
  shutil.copytree(os.path.join(config.out_dir, "trajectories"), multi / "trajectories")
  flags = {**FLAGS, "data_parallel": 8, "pipeline": config.pipeline, "out_dir": multi}
  argv = ["train", "--config=agd_tiny"] + [
      f"--{k}={','.join(v) if isinstance(v, tuple) else v}" for k, v in flags.items()]
  run_two_processes("train.agd", argv, tmp_path)
  with open(multi / "runs" / "token" / "metrics.jsonl") as f:
    losses = [json.loads(line)["loss"] for line in f]
  one = dataclasses.replace(config, out_dir=str(tmp_path / "single"), data_parallel=8)
  adapter, fit = train_agd.train_adapter(one, pipe, "token",
                                         os.path.join(config.out_dir, "trajectories"),
                                         sharding_lib.make_mesh(8, 1))
  np.testing.assert_allclose(losses, fit.losses, atol=1e-5, rtol=0)
  saved = agd_lib.load_agd(str(multi / "adapters" / "token"))
  for x, y in zip(jax.tree.leaves(saved.params), jax.tree.leaves(adapter.params)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-5, rtol=0)


def test_the_whole_run_writes_its_report(base, tmp_path):
  """`python -m train.agd --config agd_tiny`: every stage, each adapter kind and the ablation,
  the evaluation (numbers from their definitions) and the page with its sample grid."""
  from train import agd_report
  from train.configs.agd_tiny import get_config
  config = dataclasses.replace(get_config(), pipeline=base[0], out_dir=str(tmp_path / "run"),
                               report=str(tmp_path / "docs" / "agd.md"))
  result = train_agd.train(config, command="python -m train.agd --config agd_tiny")
  assert set(result.adapters) == {"offset", "cross_attention", "token", "token_forward_noised"}
  res = result.results
  for w in ("2.0", "8.0"):
    row = res["samples"][w]
    assert row["cfg"]["rmse_to_cfg"] == 0.0 and row["cfg"]["nfe"] == 2 * row["token"]["nfe"]
    assert row["no guidance"]["rmse_to_cfg"] > 0
  # gap recovered re-derived from the held-out records and a fresh forward
  held = train_agd.TrajectoryShards(os.path.join(config.out_dir, "eval_trajectories")).arrays()
  pred = agd_report._predict(base[1], result.adapters["offset"], held)
  m = np.isclose(held["w"], 2.0)
  assert res["gap"]["offset"]["2.0"] == pytest.approx(
      agd_lib.gap_recovered(pred[m], held["eps_cond"][m], held["eps_cfg"][m]))
  page = open(config.report).read()
  assert "| offset |" in page and "AGD token_forward_noised" in page
  assert os.path.exists(tmp_path / "docs" / "agd_samples.png")
  assert "2.0" in res["targets"] and "8.0" not in res["targets"]  # 8 is outside the range
  # the derived checkpoint (a style LoRA merged in) has its own trajectories and numbers
  assert set(res["style"]["gap"]) == {"2.0", "8.0"} and "derived checkpoint" in page
  assert os.path.exists(tmp_path / "docs" / "agd_style.png")
