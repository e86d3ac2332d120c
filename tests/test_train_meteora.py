"""train/meteora.py: the routing labels of an example, the hand-routed ceiling against the
adapter alone, gate training through the shared trainer (loss falls, exact resume), and the
tiny end-to-end run (files, report, `--eval`)."""
import dataclasses
import json

import numpy as np
import pytest

import jaxadapt as ja
from jaxadapt import meteora
from train import default_model as dm
from train import meteora as tm
from train import tasks as tl

TASKS = ("reverse", "upper", "count")


@pytest.fixture(scope="module")
def default_meteora():
  model = ja.load_model("default")
  return meteora.build_meteora(model, [f"default:{t}" for t in TASKS], names=TASKS, top_k=2)


def test_routed_example_labels():
  """Tokens, LM targets, gate labels (the next token's task, unknown before a prompt tag's `]`)
  and the hand route (each token's own segment), spelled out on a two-task example."""
  segs = [tl.Segment("upper", "ab"), tl.Segment("count", "xyz")]
  ids, target, gate, route = tm.routed_example(segs, {t: i for i, t in enumerate(TASKS)})
  text = "[upper] ab [count] xyz\n[upper] AB [count] 3"
  assert bytes(int(t) for t in ids[1:-1]).decode() == text
  assert ids[0] == tl.BOS_ID and ids[-1] == tl.EOS_ID
  prompt_len = 1 + len("[upper] ab [count] xyz\n")
  assert not target[:prompt_len].any() and target[prompt_len:].all()
  # route: bos + "[upper] ab " -> upper (1); "[count] xyz\n" -> count (2); the answer likewise.
  want_route = ([1] * (1 + len("[upper] ab ")) + [2] * len("[count] xyz\n")
                + [1] * len("[upper] AB ") + [2] * len("[count] 3<"))
  assert route.tolist() == want_route[:len(ids)]
  # gate labels: -1 until the first tag's "]" (position 7 predicts " "); the next token's task
  # after it; -1 again inside the second prompt tag; the answer fully labelled; -1 at eos.
  first_close = 1 + "[upper] ab".index("]")
  assert (gate[:first_close] == -1).all() and gate[first_close] == 1
  second = 1 + len("[upper] ab ")
  second_close = second + "[count]".index("]")
  assert gate[second - 1] == -1  # predicts the "[" of a tag not read yet
  assert (gate[second:second_close] == -1).all() and gate[second_close] == 2
  assert (gate[prompt_len - 1:-1] >= 0).all() and gate[-1] == -1
  answer_second = prompt_len + len("[upper] AB ")
  assert gate[answer_second - 2] == 1 and gate[answer_second - 1] == 2  # " " predicts "["


def test_hand_routed_single_task_equals_the_adapter_alone(default_meteora):
  """On one-task prompts the hand-routed path sends every token to that task's adapter through
  the top-k op: its greedy answers equal `generate` with the adapter itself."""
  m = default_meteora
  index = {t: i for i, t in enumerate(TASKS)}
  for task in ("reverse", "count"):
    segs = [[s] for s in tl.heldout_segments(task, 6)]
    got = tm.hand_routed_answers(m.model, m.stacks, segs, index)
    want = dm.generated_answers(m.model, m.adapters[index[task]], segs)
    assert got == want
    assert np.mean([g == tl.answer_text(s) for g, s in zip(got, segs)]) > 0.5


def test_gate_training_lowers_the_gate_loss_and_resumes_exactly(default_meteora, tmp_path):
  """Gates only, through the shared trainer: the gate loss falls; a run killed after step 3
  and started again continues from its checkpoint to the same gates and losses."""
  config = tm.MeteoraConfig(tasks=TASKS, composite_sizes=(2,), steps=6, batch_size=4,
                            seq_len=96, warmup_steps=1,
                            learning_rate=3e-2, checkpoint_every=3, log_every=1,
                            out_dir=str(tmp_path / "a"), progress=False)
  mesh = ja.sharding.make_mesh(1, 1)
  gates, rows = tm.train_gates(config, default_meteora, mesh)
  assert len(rows) == 6 and rows[-1]["gate_loss"] < 0.9 * rows[0]["gate_loss"]
  killed = dataclasses.replace(config, out_dir=str(tmp_path / "b"))
  _, first = tm.train_gates(killed, default_meteora, mesh, stop_after=3)
  resumed, rest = tm.train_gates(killed, default_meteora, mesh)
  assert [r["step"] for r in first + rest] == list(range(1, 7))
  np.testing.assert_allclose([r["loss"] for r in first + rest], [r["loss"] for r in rows],
                             rtol=1e-6)
  for p in gates:
    np.testing.assert_allclose(resumed[p], gates[p], rtol=1e-6, atol=1e-7)
    assert not np.allclose(gates[p], default_meteora.gates[p])  # the gates trained


def test_tiny_run_writes_everything(tmp_path):
  out, report = tmp_path / "run", tmp_path / "meteora.md"
  argv = ["--config", "meteora_tiny", "--out_dir", str(out), "--report", str(report)]
  assert tm.main(argv) == 0
  back = ja.load_meteora(out / "meteora")
  assert back.names == TASKS and len(back.gates) == 28
  results = json.loads((out / "results.json").read_text())["results"]
  assert set(results["single"]) == set(TASKS)
  assert set(results["composite"]) == {"2"}
  # The oracle row is the shipped adapters' own accuracy on the same held-out prompts.
  segs = [[s] for s in tl.heldout_segments("upper", 8)]
  oracle = np.mean([a == tl.answer_text(s) for a, s in zip(
      dm.generated_answers(back.model, back.adapters[1], segs), segs)])
  assert results["single"]["upper"]["oracle"] == pytest.approx(oracle)
  text = report.read_text()
  assert "| `upper` |" in text and "composite-2" in text and "## Targets" in text
  # --eval re-evaluates a finished run (`train` with eval_only); on a dir with no run it says so.
  empty = ["--config", "meteora_tiny", "--out_dir", str(tmp_path / "none"), "--eval"]
  assert tm.main(empty) == 2


def test_gate_training_on_a_data_parallel_mesh_equals_one_device(default_meteora, tmp_path):
  """The batch split over 2 (simulated) devices: the same losses and gates as on one."""
  base = tm.MeteoraConfig(tasks=TASKS, composite_sizes=(2,), steps=2, batch_size=4, seq_len=96,
                          warmup_steps=1, learning_rate=3e-2, checkpoint_every=2, log_every=1,
                          out_dir=str(tmp_path / "one"), progress=False)
  two = dataclasses.replace(base, data_parallel=2, out_dir=str(tmp_path / "two"))
  g1, r1 = tm.train_gates(base, default_meteora, ja.sharding.make_mesh(1, 1))
  g2, r2 = tm.train_gates(two, default_meteora, ja.sharding.make_mesh(2, 1))
  np.testing.assert_allclose([r["loss"] for r in r2], [r["loss"] for r in r1], rtol=1e-5)
  for p in g1:
    np.testing.assert_allclose(g2[p], g1[p], rtol=1e-4, atol=1e-6)
