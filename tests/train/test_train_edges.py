"""train.lora on bad input: invalid configs, bad data files, mismatched or finished resumes,
interrupted runs and unusable out_dirs give clear errors, and nothing already saved is lost."""
import dataclasses
import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from jaxadapt import cli
from train import checkpoint as ckpt_lib
from train import data as data_lib
from train import lora as train_lora
from train.configs.lora_tiny import get_config

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

TINY = {"steps": 4, "batch_size": 4, "seq_len": 16, "synthetic_docs": 50, "warmup_steps": 1,
        "checkpoint_every": 2, "log_every": 1, "lora_r": 4, "progress": False}


def tiny(tmp_path, name="run", **overrides):
  """A 4-step run on the embedded tiny Llama; runs differing only in out_dir share one compile."""
  return dataclasses.replace(get_config(), **{**TINY, "out_dir": str(tmp_path / name),
                                              **overrides})


def read(path):
  with open(path) as f:
    return f.read()


def snapshot(directory):
  """{relative path: bytes} of every file under `directory`."""
  out = {}
  for root, _, files in os.walk(directory):
    for f in files:
      path = os.path.join(root, f)
      with open(path, "rb") as fh:
        out[os.path.relpath(path, directory)] = fh.read()
  return out


def steps_logged(cfg):
  return [r["step"] for r in ckpt_lib.read_metrics(os.path.join(cfg.out_dir, "metrics.jsonl"))]


# --- config validation -----------------------------------------------------------------------

@pytest.mark.parametrize("field,value,message", [
    ("learning_rate", 0.0, "learning_rate must be > 0, got 0.0"),
    ("learning_rate", float("nan"), "learning_rate must be a finite number, got nan"),
    ("weight_decay", float("inf"), "weight_decay must be a finite number, got inf"),
    ("steps", 0, "steps must be a positive int, got 0"),
    ("steps", True, "steps must be a positive int, got True"),
    ("lora_r", 0, "r must be a positive int, got 0"),
    ("lora_dropout", 1.0, r"lora_dropout must be in \[0, 1\), got 1.0"),
    ("lora_dropout", -0.1, r"lora_dropout must be in \[0, 1\), got -0.1"),
    ("lora_alpha", 0.0, "lora_alpha must be > 0 .*got 0.0"),
    ("warmup_steps", 5, r"warmup_steps must be in \[0, steps=4\], got 5"),
    ("warmup_steps", 1.5, "warmup_steps must be an int, got 1.5"),
    ("target_modules", "q_proj(", "target_modules='q_proj\\(' is neither .* nor a valid regex"),
])
def test_invalid_config_values_are_refused(tmp_path, field, value, message):
  with pytest.raises(ValueError, match=message):
    tiny(tmp_path, **{field: value})


@pytest.mark.parametrize("warmup,expected", [(3, [0, 1 / 3, 2 / 3, 1]),
                                             (4, [0, 1 / 4, 2 / 4, 3 / 4])])
def test_warmup_up_to_all_steps_gives_a_valid_schedule(tmp_path, warmup, expected):
  # warmup_steps == steps passed validation, then optax raised "The cosine_decay_schedule requires
  # positive decay_steps" when the run built its optimizer.
  cfg = tiny(tmp_path, warmup_steps=warmup)
  lrs = [float(train_lora.learning_rate_schedule(cfg)(s)) for s in range(cfg.steps)]
  np.testing.assert_allclose(lrs, np.asarray(expected) * cfg.learning_rate, rtol=1e-6)
  train_lora.optimizer(cfg)  # builds


def test_batch_not_divisible_by_data_parallel_and_too_large_mesh(tmp_path, capsys):
  with pytest.raises(ValueError, match="batch_size=6 must be divisible by data_parallel=4"):
    tiny(tmp_path, batch_size=6, data_parallel=4)
  n = jax.device_count()
  cfg = tiny(tmp_path, batch_size=4 * n, data_parallel=2 * n)
  with pytest.raises(train_lora.RunError, match=f"needs {2 * n} devices, found {n}"):
    train_lora.train(cfg)
  assert not os.path.exists(cfg.out_dir)  # refused before anything was written
  assert train_lora.main(["--out_dir", cfg.out_dir, "--batch_size", str(4 * n),
                          "--data_parallel", str(2 * n)]) == 2
  assert f"needs {2 * n} devices" in capsys.readouterr().err


def test_target_names_that_match_nothing_are_refused(tmp_path):
  # A typo among valid names used to train the valid ones only, silently.
  with pytest.raises(train_lora.RunError, match=r"target_modules \['qproj'\] match no linear "
                                                r"layer.*'q_proj'"):
    train_lora.train(tiny(tmp_path, target_modules=("qproj", "v_proj")))


# --- data files --------------------------------------------------------------------------------

def test_bad_data_files_are_refused_clearly(tmp_path, capsys):
  empty = tmp_path / "empty.txt"
  empty.write_text("")
  with pytest.raises(train_lora.RunError, match="empty.txt gives 0 token.*at least 2"):
    train_lora.train(tiny(tmp_path, data=str(empty)))
  latin = tmp_path / "latin1.txt"
  latin.write_bytes("café au lait\n".encode("latin-1") * 20)
  with pytest.raises(train_lora.RunError, match=r"expected UTF-8 text, found the byte b'\\xe9' "
                                                r"at offset 3"):
    train_lora.train(tiny(tmp_path, data=str(latin)))
  jsonl = tmp_path / "chat.jsonl"
  jsonl.write_text(json.dumps({"text": "hello"}) + "\n{not json\n")
  with pytest.raises(train_lora.RunError, match=r"chat.jsonl: line 2 is not JSON .*expected one "
                                                r"JSON object per line, found '\{not json'"):
    train_lora.train(tiny(tmp_path, data=str(jsonl)))
  # The command line prints the message without a traceback and exits 2.
  assert train_lora.main(["--data", str(latin), "--out_dir", str(tmp_path / "cli")]) == 2
  err = capsys.readouterr().err
  assert err.startswith("error: --data") and "Traceback" not in err


def test_data_shorter_than_one_batch_trains(tmp_path):
  # One packed chunk for a batch of 4: each batch repeats it (epochs wrap), as documented.
  short = tmp_path / "short.txt"
  short.write_text("hi there")
  result = train_lora.train(tiny(tmp_path, data=str(short)))
  assert len(result.losses) == 4 and result.losses[-1] < result.losses[0]


# --- resume ----------------------------------------------------------------------------------

@pytest.mark.parametrize("change,found,was", [
    ({"lora_r": 8}, "'lora_r': 8", "'lora_r': 4"),
    ({"target_modules": ("q_proj",)}, "'target_modules': ['q_proj']", "'lm_head'"),
    ({"use_dora": True}, "'use_dora': True", "'use_dora': False"),
])
def test_resume_with_another_adapter_shape_is_refused_and_keeps_the_checkpoint(
    tmp_path, change, found, was):
  cfg = tiny(tmp_path)
  train_lora.train(cfg, stop_after=3)
  before = snapshot(cfg.out_dir)
  # It used to restore first and fail inside orbax ("Requested shape ... not compatible").
  with pytest.raises(train_lora.RunError) as err:
    train_lora.train(dataclasses.replace(cfg, **change))
  msg = str(err.value)
  assert "has a checkpoint of a different run" in msg and "new --out_dir" in msg
  assert found in msg.split("(it was")[0] and was in msg.split("(it was")[1]
  assert snapshot(cfg.out_dir) == before  # nothing written, nothing lost
  resumed = train_lora.train(cfg)  # the original settings still resume
  assert resumed.first_step == 3 and len(resumed.losses) == 2
  assert steps_logged(cfg) == [1, 2, 3, 4]


def test_resume_refuses_a_data_file_changed_in_place(tmp_path):
  corpus = tmp_path / "corpus.txt"
  corpus.write_text("the cat sat on the mat\n" * 40)
  cfg = tiny(tmp_path, data=str(corpus))
  train_lora.train(cfg, stop_after=2)
  corpus.write_text("a dog lay on a log\n" * 40)  # same path, other text
  before = snapshot(cfg.out_dir)
  with pytest.raises(train_lora.RunError, match="different run.*'data_sha256'"):
    train_lora.train(cfg)
  assert snapshot(cfg.out_dir) == before
  corpus.write_text("the cat sat on the mat\n" * 40)
  assert train_lora.train(cfg).first_step == 3


def test_rerun_of_a_finished_run_changes_nothing(tmp_path, capsys):
  cfg = tiny(tmp_path)
  first = train_lora.train(cfg)
  metrics = read(os.path.join(cfg.out_dir, "metrics.jsonl"))
  again = train_lora.train(cfg)
  assert again.losses == [] and again.first_step == cfg.steps + 1
  assert read(os.path.join(cfg.out_dir, "metrics.jsonl")) == metrics
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(again.adapter.weights),
               jax.device_get(first.adapter.weights))
  args = [f"--{k}={v}" for k, v in {**TINY, "out_dir": cfg.out_dir}.items()]
  assert train_lora.main(args) == 0
  assert "already finished all 4 steps" in capsys.readouterr().out


def test_interrupt_mid_run_keeps_the_last_checkpoint_and_resumes_exactly(tmp_path, monkeypatch):
  full = train_lora.train(tiny(tmp_path, "full"))
  cfg = tiny(tmp_path)
  batch = data_lib.PackedStream.batch

  def interrupted(self, position, batch_size):
    if position >= 3 * batch_size:  # Ctrl-C while step 4 is being prepared
      raise KeyboardInterrupt
    return batch(self, position, batch_size)
  monkeypatch.setattr(data_lib.PackedStream, "batch", interrupted)
  with pytest.raises(KeyboardInterrupt):
    train_lora.train(cfg)
  monkeypatch.setattr(data_lib.PackedStream, "batch", batch)
  assert os.listdir(os.path.join(cfg.out_dir, "checkpoints")) == ["2"]
  assert not os.path.exists(os.path.join(cfg.out_dir, "adapter"))
  resumed = train_lora.train(cfg)
  assert resumed.first_step == 3
  np.testing.assert_array_equal(resumed.losses, full.losses[2:])
  logged = ckpt_lib.read_metrics(os.path.join(cfg.out_dir, "metrics.jsonl"))
  assert [r["step"] for r in logged] == [1, 2, 3, 4]
  np.testing.assert_array_equal([r["loss"] for r in logged], full.losses)


def test_metrics_line_cut_by_a_kill_is_dropped_on_resume(tmp_path):
  cfg = tiny(tmp_path)
  train_lora.train(cfg, stop_after=3)  # checkpoint at 2, step 3 logged
  path = os.path.join(cfg.out_dir, "metrics.jsonl")
  with open(path, "a") as f:
    f.write('{"step": 4, "lo')  # killed mid-write: resuming used to raise JSONDecodeError
  train_lora.train(cfg)
  assert steps_logged(cfg) == [1, 2, 3, 4]
  # A damaged line that is not the last one is an error naming the file and line.
  lines = read(path).splitlines()
  lines[1] = "garbage"
  with open(path, "w") as f:
    f.write("\n".join(lines) + "\n")
  with pytest.raises(ValueError, match=r"metrics.jsonl:2: expected a JSON object with an integer "
                                       r"'step', found 'garbage'"):
    ckpt_lib.MetricsLog(path, resume_step=2)
  assert read(path).splitlines() == lines  # left as it was


# --- out_dir ---------------------------------------------------------------------------------

def test_out_dir_that_is_a_file_is_refused(tmp_path, capsys):
  target = tmp_path / "taken"
  target.write_text("keep me")
  with pytest.raises(train_lora.RunError, match="expected a directory .*found a file"):
    train_lora.train(tiny(tmp_path, "taken"))
  assert target.read_text() == "keep me"
  assert train_lora.main(["--out_dir", str(target)]) == 2
  assert "found a file" in capsys.readouterr().err


def test_exported_adapter_without_checkpoints_is_not_overwritten(tmp_path):
  cfg = tiny(tmp_path)
  train_lora.train(cfg)
  for step in os.listdir(os.path.join(cfg.out_dir, "checkpoints")):  # e.g. deleted to save space
    shutil.rmtree(os.path.join(cfg.out_dir, "checkpoints", step))
  before = snapshot(os.path.join(cfg.out_dir, "adapter"))
  with pytest.raises(train_lora.RunError, match="holds an exported adapter but no checkpoint"):
    train_lora.train(dataclasses.replace(cfg, seed=1))
  assert snapshot(os.path.join(cfg.out_dir, "adapter")) == before


# --- command line ----------------------------------------------------------------------------

def test_cli_train_help(capsys):
  assert cli.main(["train", "--help"]) == 0
  assert "jaxadapt train lora" in capsys.readouterr().out
  assert cli.main(["train", "lorax"]) == 2


def test_module_error_exit_is_one_line_without_a_traceback(tmp_path):
  # A run that stops right after opening the checkpoint dir used to end with an orbax thread's
  # "cannot schedule new futures after interpreter shutdown" traceback.
  empty = tmp_path / "model"
  empty.mkdir()
  proc = subprocess.run([sys.executable, "-m", "train.lora", "--model_dir", str(empty),
                         "--out_dir", str(tmp_path / "run")], cwd=REPO, capture_output=True,
                        text=True, timeout=120, check=False,
                        env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert proc.returncode == 2
  expected = f"error: {empty}: no config.json (expected a Hugging Face model dir); found []"
  assert proc.stderr.splitlines() == [expected]


# --- JSON data -------------------------------------------------------------------------------

def test_jsonl_and_json_train_as_their_text_field(tmp_path):
  """A .jsonl / .json of records trains exactly as the .txt of their text fields (byte-level:
  each document ends with a newline), and bad records are named."""
  docs = [data_lib.synthetic_corpus(60, seed=s).splitlines()[0] for s in range(60)]
  txt = tmp_path / "docs.txt"
  txt.write_text("".join(d + "\n" for d in docs))
  jsonl = tmp_path / "docs.jsonl"
  jsonl.write_text("".join(json.dumps({"id": i, "text": d}) + "\n" for i, d in enumerate(docs)))
  as_json = tmp_path / "docs.json"
  as_json.write_text(json.dumps([{"body": d} for d in docs]))
  base = train_lora.train(tiny(tmp_path, "txt", data=str(txt)))
  for name, cfg in (("jsonl", tiny(tmp_path, "jsonl", data=str(jsonl))),
                    ("json", tiny(tmp_path, "json", data=str(as_json), text_field="body"))):
    got = train_lora.train(cfg)
    for path, w in base.adapter.weights.items():
      for k in w:
        np.testing.assert_array_equal(np.asarray(got.adapter.weights[path][k]), np.asarray(w[k]),
                                      err_msg=f"{name} {path} {k}")
  multi = data_lib.read_json_documents(str(as_json), "body")
  assert multi == docs
  (tmp_path / "bad.jsonl").write_text(json.dumps({"txt": "a"}) + "\n")
  with pytest.raises(ValueError, match=r"bad.jsonl: line 1 has no 'text' field \(found \['txt'\]\)"
                                       r"; set text_field"):
    data_lib.read_json_documents(str(tmp_path / "bad.jsonl"))
  (tmp_path / "bad.json").write_text(json.dumps({"text": "a"}))
  with pytest.raises(ValueError, match=r"bad.json: expected a JSON list of objects with a 'text' "
                                       r"field, found a dict"):
    data_lib.read_json_documents(str(tmp_path / "bad.json"))
  (tmp_path / "num.jsonl").write_text(json.dumps({"text": 3}) + "\n")
  with pytest.raises(ValueError, match=r"num.jsonl: line 1: 'text' must be a string, found int"):
    data_lib.read_json_documents(str(tmp_path / "num.jsonl"))
