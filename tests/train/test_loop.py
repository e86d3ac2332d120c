"""train.loop.Trainer on its own: a pluggable loss with metrics, a frozen tree that is an argument
(not a constant), per-step rngs from (seed, step), exact resume, and clear errors."""
import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from train import checkpoint as ckpt_lib
from train import loop

ROWS = 4
STEPS = 20


def regression_batches(position):
  """Rows `position ..` of a fixed linear-regression stream: y = x @ [1, -2, 3] (+ 0.5 noise)."""
  rng = np.random.default_rng(position)
  x = rng.normal(size=(ROWS, 3)).astype(np.float32)
  return {"x": x, "y": (x @ np.float32([1, -2, 3])).astype(np.float32)}


@dataclasses.dataclass(frozen=True)
class NoisyMSE:
  """Mean squared error with the step's rng as label noise, scaled by the frozen tree."""
  noise: float = 0.5

  def __call__(self, trainable, frozen, batch, rng):
    pred = batch["x"] @ trainable["w"] * frozen["scale"]
    y = batch["y"] + self.noise * jax.random.normal(rng, batch["y"].shape)
    err = pred - y
    return jnp.mean(err ** 2), {"mae": jnp.mean(jnp.abs(err))}


def fit(out_dir, frozen_scale=1.0, **kw):
  mesh = jax.make_mesh((1,), ("data",), axis_types=(jax.sharding.AxisType.Auto,),
                       devices=jax.devices()[:1])
  tx = loop.AdamW(learning_rate=0.3, steps=STEPS, warmup_steps=2)
  with loop.Trainer(str(out_dir), steps=STEPS, checkpoint_every=8, log_every=3, progress=False,
                    resumable=("note",)) as trainer:
    return trainer.fit(NoisyMSE(), tx, {"w": jnp.zeros(3)}, {"scale": jnp.float32(frozen_scale)},
                       regression_batches, mesh=mesh, batch_size=ROWS, seed=7,
                       record={"config": {"lr": 0.3, "note": kw.pop("note", "")}},
                       learning_rate=tx.schedule, **kw)


def test_metrics_resume_and_a_frozen_argument(tmp_path):
  full = fit(tmp_path / "full")
  assert len(full.losses) == STEPS and max(full.losses[-5:]) < min(full.losses[:5])
  np.testing.assert_allclose(full.trainable["w"], [1, -2, 3], atol=0.3)  # learnt, with noise
  rows = ckpt_lib.read_metrics(os.path.join(tmp_path / "full", "metrics.jsonl"))
  assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
  assert all(set(r) == {"step", "loss", "mae", "learning_rate", "time"} for r in rows)
  assert rows[0]["learning_rate"] == 0.0 and rows[2]["learning_rate"] == pytest.approx(0.3)
  stopped = fit(tmp_path / "stopped", stop_after=12)  # last checkpoint: step 8
  resumed = fit(tmp_path / "stopped", note="resumable fields may change")
  assert resumed.first_step == 9
  np.testing.assert_array_equal(stopped.losses, full.losses[:12])
  np.testing.assert_array_equal(resumed.losses, full.losses[8:])
  np.testing.assert_array_equal(np.asarray(resumed.trainable["w"]),
                                np.asarray(full.trainable["w"]))
  # The frozen tree is a traced argument: another value reuses the compiled step and changes
  # the curve (a constant closed over would need a new compile to change it).
  before = loop.jitted_step.cache_info()
  other = fit(tmp_path / "scaled", frozen_scale=2.0)
  after = loop.jitted_step.cache_info()
  assert after.misses == before.misses and after.hits == before.hits + 1
  assert other.losses[:2] == full.losses[:2]  # w = 0 until the warmup moves it
  assert all(a != b for a, b in zip(other.losses[2:], full.losses[2:]))
  # The per-step rng is a pure function of (seed, step).
  np.testing.assert_array_equal(jax.random.key_data(loop.step_rng(7, 3)),
                                jax.random.key_data(loop.step_rng(jax.random.key(7), 3)))


def test_a_different_record_is_refused_before_anything_is_restored(tmp_path):
  fit(tmp_path / "run", stop_after=8)
  with pytest.raises(loop.RunError, match=r"different run; resuming it with \{'lr': 0.2\} "
                                          r"\(it was \{'lr': 0.3\}\)"):
    with loop.Trainer(str(tmp_path / "run"), steps=STEPS, checkpoint_every=8) as trainer:
      trainer.check_resume({"config": {"lr": 0.2}})


def test_bad_batches_and_losses_are_named(tmp_path):
  mesh = jax.make_mesh((1,), ("data",), axis_types=(jax.sharding.AxisType.Auto,),
                       devices=jax.devices()[:1])
  args = dict(mesh=mesh, batch_size=ROWS + 1, record={"config": {}})
  with loop.Trainer(str(tmp_path / "a"), steps=2, checkpoint_every=2, progress=False) as t:
    with pytest.raises(ValueError, match=r"batches\(0\)\['x'\] has shape \(4, 3\); expected the "
                                         r"global batch of batch_size=5 rows"):
      t.fit(NoisyMSE(), optax.sgd(0.1), {"w": jnp.zeros(3)}, {"scale": 1.0},
            regression_batches, **args)
  args["batch_size"] = ROWS
  with loop.Trainer(str(tmp_path / "b"), steps=2, checkpoint_every=2, progress=False) as t:
    with pytest.raises(ValueError, match=r"loss_fn must return a scalar loss .*shape \(4,\)"):
      t.fit(lambda w, f, b, r: b["x"] @ w["w"], optax.sgd(0.1), {"w": jnp.zeros(3)}, {},
            regression_batches, **args)
  with pytest.raises(ValueError, match=r"warmup_steps must be in \[0, steps=4\], got 5"):
    loop.AdamW(learning_rate=0.1, steps=4, warmup_steps=5)
