"""train/muscle.py: the MUSCLE recipe on the embedded default (tiny configs, numbers checked)."""
import dataclasses
import json
import os

import jax
import numpy as np
import pytest

import jaxadapt as ja
from jaxadapt import muscle as muscle_lib
from jaxadapt.io.peft import load_adapter
from train import flags
from train import default_model
from train import muscle
from train import tasks as tasks_lib


def _tiny(out_dir, **kw):
  kw.setdefault("report", os.path.join(str(out_dir), "muscle.md"))
  return dataclasses.replace(flags.load_config_module("muscle_tiny"), out_dir=str(out_dir), **kw)


@pytest.fixture(scope="module")
def same_version_run(tmp_path_factory):
  """v1 = v2 = the default model: the update changes nothing."""
  config = _tiny(tmp_path_factory.mktemp("same"), new_model="default", seeds=(0,))
  return config, muscle.train(config)


def test_identical_versions_are_a_fixed_point(same_version_run):
  config, result = same_version_run
  r = result.results[0]["sort"]
  # LoRA2 = LoRA1 (same base, init and data): no flip of any kind.
  assert r["flips"]["v2"]["nfr"] == r["flips"]["v2"]["pfr"] == r["flips"]["v2"]["nfr_mc"] == 0
  # Both teachers equal the student's start (LoRA2 = LoRA1 on the same base), so Eq. 1 is 0
  # there and stays ~0: the gradient is float noise (which AdamW still turns into lr-sized
  # steps, so the weights drift a little); CE-continued's loss is the task's cross-entropy.
  d = os.path.join(config.out_dir, "seed0", "sort")
  for variant in ("muscle", "kd_v1"):
    rows = [json.loads(line) for line in open(os.path.join(d, variant, "metrics.jsonl"))]
    assert len(rows) == config.compat_steps
    assert abs(rows[0]["kd"]) < 1e-6 and max(r["kd"] for r in rows) < 1e-3, rows
  ce = [json.loads(line) for line in open(os.path.join(d, "ce_continued", "metrics.jsonl"))]
  assert min(r["loss"] for r in ce) > 1.0 and all(r["kd"] == 0.0 for r in ce)
  lora2 = load_adapter(os.path.join(d, "v2", "adapter"))

  def moved(variant):
    got = load_adapter(os.path.join(d, variant, "adapter"))
    return max(float(np.abs(np.asarray(got.weights[p][k]) - np.asarray(lora2.weights[p][k])).max())
               for p in lora2.weights for k in lora2.weights[p])
  assert moved("ce_continued") > 0


def test_results_and_report_recompute_from_the_answers(same_version_run):
  config, result = same_version_run
  with open(os.path.join(config.out_dir, "results.json")) as f:
    saved = json.load(f)
  per = saved["results"]["0"]["sort"]["per_example"]
  v1 = np.asarray(per["v1"])
  for name, right in per.items():
    right = np.asarray(right)
    flips = saved["results"]["0"]["sort"]["flips"][name]
    assert flips["accuracy_new"] == pytest.approx(right.mean())
    assert flips["nfr"] == pytest.approx((v1 & ~right).mean())
    assert flips["pfr"] == pytest.approx((~v1 & right).mean())
    assert saved["summary"]["pooled"][name]["nfr"] == [pytest.approx(flips["nfr"]), 0.0]
  # The report names the command's numbers and the PNG is a PNG.
  with open(config.report) as f:
    text = f.read()
  assert "| CE-continued |" in text and "not met" in text or "met" in text
  with open(os.path.join(config.out_dir, "muscle_flips.png"), "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  # The answers were greedy generation: re-generate Mv1's first few and compare.
  model = ja.load_model("default")
  adapter = load_adapter(os.path.join(config.out_dir, "seed0", "sort", "v1", "adapter"))
  examples = muscle.heldout(config, "sort")[:4]
  got = default_model.generated_answers(model, adapter, examples)
  assert got == saved["results"]["0"]["sort"]["answers"]["v1"][:4]


def test_compat_cli_on_the_runs_files_gives_the_recipes_flips(same_version_run, tmp_path, capsys):
  """Two implementations of one number: `jaxadapt compat` on the run's held-out file and
  adapters, and the recipe's own table (seed 0, CE-continued against Mv1)."""
  from jaxadapt import cli
  config, result = same_version_run
  d = os.path.join(config.out_dir, "seed0", "sort")
  assert cli.main(["compat", "--old", f"default:{d}/v1/adapter", "--new",
                   f"default:{d}/ce_continued/adapter", "--data",
                   os.path.join(config.out_dir, "heldout.jsonl"), "--json", "--no-plot",
                   "--samples", "10", "--no-progress"]) == 0
  report = json.loads(capsys.readouterr().out)
  flips = result.results[0]["sort"]["flips"]["ce_continued"]
  assert report["n"] == config.eval_examples
  for key in ("accuracy_new", "nfr", "pfr"):
    assert report["overall"][key]["value"] == pytest.approx(flips[key]), key


def test_variants_on_a_previous_runs_task_loras(same_version_run, tmp_path):
  """lora_dir: the task LoRAs are loaded (the same answers), only the variant trains; the
  report's ablation section pairs it with the first run's seeds."""
  from train import muscle_report
  config, result = same_version_run
  other = dataclasses.replace(config, out_dir=str(tmp_path / "abl"), report=None,
                              lora_dir=config.out_dir, variants=("muscle_answer",))
  got = muscle.train(other)
  r0, r1 = result.results[0]["sort"], got.results[0]["sort"]
  assert r1["per_example"]["v1"] == r0["per_example"]["v1"]
  assert r1["per_example"]["v2"] == r0["per_example"]["v2"]
  assert not os.path.exists(tmp_path / "abl" / "seed0" / "sort" / "v1")  # not retrained
  assert os.path.isdir(tmp_path / "abl" / "seed0" / "sort" / "muscle_answer" / "adapter")
  text = muscle_report.ablation_section(result.results, got.results, "cmd")
  assert "| M^C, answer mask (ours) |" in text and "identical to" in text
  with pytest.raises(muscle.RunError, match="no v1 task LoRA for seed 5"):
    muscle.train(dataclasses.replace(other, seeds=(5,)))


def test_rerun_resumes_without_training(same_version_run):
  config, result = same_version_run
  d = os.path.join(config.out_dir, "seed0", "sort", "muscle", "metrics.jsonl")
  before = open(d).read()
  again = muscle.train(config)
  assert open(d).read() == before
  assert again.results[0]["sort"]["per_example"] == result.results[0]["sort"]["per_example"]
  # Another setting is refused, naming it, before anything is overwritten.
  with pytest.raises(muscle.RunError, match="compat_lr"):
    muscle.train(dataclasses.replace(config, compat_lr=1e-4))


def test_compat_loss_equals_the_library_loss_on_the_models_logits():
  old = ja.load_model("default")
  new = ja.load_model("default-v2")
  cfg = ja.LoraConfig(r=2, lora_alpha=4.0, target_modules=("q_proj", "v_proj"))
  l1 = ja.init_lora(old, cfg, seed=0)
  l2 = ja.init_lora(new, cfg, seed=1)
  # Non-zero B so the adapters change the logits.
  l1 = ja.LoraAdapter(weights=jax.tree.map(lambda x: x + 0.05, l1.weights), config=cfg)
  l2 = ja.LoraAdapter(weights=jax.tree.map(lambda x: x - 0.03, l2.weights), config=cfg)
  student = jax.tree.map(lambda x: x * 1.5, l2.weights)
  batch = tasks_lib.eval_batch([[tasks_lib.Segment("sort", "hello")],
                                [tasks_lib.Segment("sort", "abcab")]])
  frozen = {"new": new.params, "new_lora": l2.weights, "old": old.params, "old_lora": l1.weights}
  ids, attn = batch["input_ids"], batch["attention_mask"]
  z_c = new(ids, attn, adapter=ja.LoraAdapter(weights=student, config=cfg))
  z_2 = new(ids, attn, adapter=l2)
  z_1 = old(ids, attn, adapter=l1)
  for mask, lam in (("muscle", 0.0), ("old", 0.0), ("new", 1.0), ("muscle", 0.5)):
    loss = muscle.CompatLoss(new.graphdef, cfg, old.graphdef, cfg, mask=mask, ce_weight=lam)
    got, metrics = loss(student, frozen, batch, None)
    want, _ = muscle_lib.compat_loss(z_c, z_1, z_2, batch["labels"], mask=mask, ce_weight=lam)
    np.testing.assert_allclose(float(got), float(want), rtol=1e-5)


def test_cli_runs_and_refuses_bad_settings(tmp_path, capsys):
  from jaxadapt import cli
  assert cli.main(["train", "muscle", "--config", "muscle_tiny", "--tasks", "nope"]) == 2
  assert "tasks must be some of" in capsys.readouterr().err
  assert cli.main(["train", "muscle", "--config", "muscle_tiny", "--out_dir", str(tmp_path),
                   "--new_model", str(tmp_path / "missing")]) == 2
  assert "cannot load the base" in capsys.readouterr().err


def test_data_parallel_mesh_equals_one_device(tmp_path):
  """The compatibility stage on a 2-way data mesh trains the same adapter (float tolerance)."""
  one = muscle.train(_tiny(tmp_path / "one", seeds=(1,),
                           variants=("muscle",), report=None))
  two = muscle.train(_tiny(tmp_path / "two", seeds=(1,),
                           variants=("muscle",), report=None, data_parallel=2))
  a = load_adapter(str(tmp_path / "one" / "seed1" / "sort" / "muscle" / "adapter"))
  b = load_adapter(str(tmp_path / "two" / "seed1" / "sort" / "muscle" / "adapter"))
  for p in a.weights:
    for k in a.weights[p]:
      np.testing.assert_allclose(np.asarray(a.weights[p][k]), np.asarray(b.weights[p][k]),
                                 atol=2e-5)
  assert one.results[1]["sort"]["per_example"] == two.results[1]["sort"]["per_example"]
