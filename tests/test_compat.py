"""`jaxadapt compat` (jaxadapt/compat.py) on the embedded default model and its task adapters:
predictions against unbatched references, the report against hand counts, the CLI end to end,
and the errors of malformed data files."""
import json
import random

import numpy as np
import pytest

import jaxadapt as ja
from jaxadapt import cli, compat, muscle
from jaxadapt import default as dm


@pytest.fixture(scope="module")
def model():
  return ja.load_model("default")


@pytest.fixture(scope="module")
def adapters():
  return {task: ja.load_adapter(f"default:{task}") for task in ("reverse", "sort")}


def _word(rng, lo=3, hi=7):
  return "".join(rng.sample("abcdefghijklmnopqrstuvwxyz", rng.randint(lo, hi)))


def _generative_records(per_task=8, seed=0):
  rng = random.Random(seed)
  records = []
  for task in ("reverse", "sort"):
    for _ in range(per_task):
      w = _word(rng)
      records.append({"prompt": dm.prompt(task, w), "answer": f"[{task}] {dm.answer(task, w)}",
                      "category": task})
  return records


def _choice_records(seed=0):
  """Reverse-task questions whose choices have different token lengths and first tokens (the
  right one is at a different index in each record)."""
  rng = random.Random(seed)
  records = []
  for i in range(6):
    w = _word(rng)
    right = f"[reverse] {dm.answer('reverse', w)}"
    wrong = [f"[reverse] {w}", "x", f"[sort] {dm.answer('sort', w)}zz"]
    choices = wrong[:i % 3] + [right] + wrong[i % 3:]
    records.append({"prompt": dm.prompt("reverse", w), "choices": choices, "answer": i % 3,
                    "category": "reverse"})
  return records


def _reference_scores(model, adapter, records):
  """Per record, per choice: (sum of the choice tokens' log-probs, their count), each from an
  unpadded forward of one sequence and a numpy log-softmax."""
  tok = model.tokenizer
  out = []
  for r in records:
    prompt = tok(r["prompt"])["input_ids"]
    row = []
    for c in r["choices"]:
      ids = prompt + tok(c, add_special_tokens=False)["input_ids"]
      logits = np.asarray(model(np.asarray([ids]), adapter=adapter), np.float64)[0]
      logp = logits - logits.max(-1, keepdims=True)
      logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
      row.append((sum(logp[t - 1, ids[t]] for t in range(len(prompt), len(ids))),
                  len(ids) - len(prompt)))
    out.append(row)
  return out


def test_parse_version(tmp_path):
  assert compat.parse_version("default") == ("default", None)
  assert compat.parse_version("default:reverse") == ("default", "default:reverse")
  adapter_dir = str(tmp_path / "ad")
  (tmp_path / "ad").mkdir()
  assert compat.parse_version(f"default:{adapter_dir}") == ("default", adapter_dir)
  assert compat.parse_version("some/dir:other/ad") == ("some/dir", "other/ad")
  for bad in ("", ":x", "default:"):
    with pytest.raises(ValueError, match="MODEL"):
      compat.parse_version(bad)


def test_choice_predictions_match_unbatched_reference(model, adapters):
  records = _choice_records()
  tok = model.tokenizer
  lengths = {len(tok(c, add_special_tokens=False)["input_ids"])
             for r in records for c in r["choices"]}
  assert len(lengths) > 3  # choices of different lengths: the padding is exercised
  for name in ("reverse", "sort"):
    ref = _reference_scores(model, adapters[name], records)
    for normalize in (False, True):
      want_scores = [[s / n if normalize else s for s, n in row] for row in ref]
      got_scores = compat.choice_scores(model, adapters[name], records, normalize=normalize,
                                        batch=4)
      for i, (g, w) in enumerate(zip(got_scores, want_scores)):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-4, err_msg=f"{name}, record {i}")
      want = [int(np.argmax(w)) for w in want_scores]
      got = compat.choice_predictions(model, adapters[name], records, normalize=normalize,
                                      batch=4)
      assert got.dtype.kind == "i" and got.shape == (len(records),)
      np.testing.assert_array_equal(got, want, err_msg=f"{name}, normalize={normalize}")
  # The reverse adapter knows the task: it picks the right answer.
  picks = compat.choice_predictions(model, adapters["reverse"], records, batch=4)
  assert (picks == [r["answer"] for r in records]).mean() >= 5 / 6


def test_generated_texts_and_report_match_hand_counts(model, adapters):
  records = _generative_records()
  max_new = compat.default_max_new_tokens(model, records)
  tok = model.tokenizer
  assert max_new == max(len(tok(r["answer"], add_special_tokens=False)["input_ids"])
                        for r in records) + 8
  texts = {}
  for name in ("reverse", "sort"):
    texts[name] = compat.generated_texts(model, adapters[name], records, batch=8)
    single = [model.generate(r["prompt"], max_new_tokens=max_new, adapter=adapters[name]).text[0]
              for r in records]
    assert texts[name] == single, name
  assert model.generate(dm.prompt("reverse", "hello"), max_new_tokens=max_new,
                        adapter=adapters["reverse"]).text[0] == "[reverse] olleh"
  em = {k: np.asarray([t == r["answer"] for t, r in zip(v, records)]) for k, v in texts.items()}
  rev = np.asarray([r["category"] == "reverse" for r in records])
  # Each adapter solves its own task and not the other one: the flips are many and known.
  assert em["reverse"][rev].mean() >= 7 / 8 and not em["reverse"][~rev].any()
  assert em["sort"][~rev].mean() >= 6 / 8 and not em["sort"][rev].any()

  report = compat.compare(model, adapters["reverse"], model, adapters["sort"], records,
                          "generate", old_name="default:reverse", new_name="default:sort",
                          batch=8, samples=50)
  assert report.n == len(records) and set(report.by_category) == {"reverse", "sort"}
  old, new = em["reverse"], em["sort"]
  for metrics, sel in ((report.overall, slice(None)), (report.by_category["reverse"], rev),
                       (report.by_category["sort"], ~rev)):
    o, n = old[sel], new[sel]
    assert metrics["accuracy_old"].value == pytest.approx(o.mean())
    assert metrics["accuracy_new"].value == pytest.approx(n.mean())
    assert metrics["nfr"].value == pytest.approx((o & ~n).mean())
    assert metrics["pfr"].value == pytest.approx((~o & n).mean())
    assert metrics["nfr"].low <= metrics["nfr"].value <= metrics["nfr"].high
  rouge_old = np.asarray([muscle.rouge1(t, r["answer"]) for t, r in zip(texts["reverse"], records)])
  rouge_new = np.asarray([muscle.rouge1(t, r["answer"]) for t, r in zip(texts["sort"], records)])
  assert report.overall["rouge1_score_old"].value == pytest.approx(rouge_old.mean())
  assert report.overall["rouge1_nfr"].value == pytest.approx((rouge_new < rouge_old).mean())


def test_cli_end_to_end(model, adapters, tmp_path, capsys, monkeypatch):
  records = _generative_records(per_task=4, seed=1)
  data = tmp_path / "tasks.jsonl"
  data.write_text("".join(json.dumps(r) + "\n" for r in records))
  png = tmp_path / "out" / "flips.png"
  argv = ["compat", "--old", "default:reverse", "--new", "default:sort", "--data", str(data),
          "--samples", "50", "--seed", "3", "--no-progress", "--batch", "4"]
  assert cli.main(argv + ["--json", "--plot", str(png)]) == 0
  got = json.loads(capsys.readouterr().out)
  want = compat.compare(model, adapters["reverse"], model, adapters["sort"], records,
                        "generate", old_name="default:reverse", new_name="default:sort",
                        samples=50, seed=3)
  assert got == {**json.loads(json.dumps(want.to_json())), "plot": str(png)}
  assert got["overall"]["nfr"]["value"] > 0.25 and got["overall"]["pfr"]["value"] > 0.25
  assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

  monkeypatch.chdir(tmp_path)  # the default plot goes to the current dir
  assert cli.main(argv) == 0
  out = capsys.readouterr().out
  assert "default:reverse" in out and "default:sort" in out and "N = 8" in out
  for row in ("reverse", "sort"):
    assert any(line.startswith(f"{row} ") for line in out.splitlines()), out
  assert "NFR (negative flips)" in out and "ROUGE-1 m_g" in out
  assert f"plotted to {compat.DEFAULT_PLOT}" in out
  assert (tmp_path / compat.DEFAULT_PLOT).read_bytes()[:4] == b"\x89PNG"


def test_cli_choice_json(model, adapters, tmp_path, capsys):
  records = _choice_records(seed=2)
  data = tmp_path / "mc.json"
  data.write_text(json.dumps(records))
  assert cli.main(["compat", "--old", "default:reverse", "--new", "default:sort", "--data",
                   str(data), "--json", "--no-plot", "--normalize", "--samples", "20",
                   "--no-progress"]) == 0
  got = json.loads(capsys.readouterr().out)
  labels = [r["answer"] for r in records]
  old = compat.choice_predictions(model, adapters["reverse"], records, normalize=True)
  new = compat.choice_predictions(model, adapters["sort"], records, normalize=True)
  assert got["kind"] == "choice" and got["plot"] is None and got["n"] == len(records)
  for key, value in muscle.choice_flip_rates(old, new, labels).items():
    assert got["overall"][key]["value"] == pytest.approx(value), key


BAD_DATA = [
    ("empty.jsonl", "", "at least one record"),
    ("mix.jsonl", '{"prompt": "a", "answer": "b"}\n{"prompt": "a", "choices": ["x", "y"], '
                  '"answer": 0}\n', "line 2: expected a generative record"),
    ("mix.json", '[{"prompt": "a", "choices": ["x", "y"], "answer": 0}, '
                 '{"prompt": "a", "answer": "b"}]', "record 1: expected a multiple-choice"),
    ("missing.jsonl", '{"prompt": "a", "answer": "b"}\n{"prompt": "c"}\n',
     "line 2: expected {\"prompt\": str, \"answer\": str}, found no 'answer'"),
    ("type.jsonl", '{"prompt": "a", "answer": 3}\n', "expected 'answer' to be a string"),
    ("prompt.json", '[{"prompt": 5, "answer": "b"}]', "expected 'prompt' to be a non-empty"),
    ("range.json", '[{"prompt": "a", "choices": ["x", "y"], "answer": 2}]',
     "record 0: expected 'answer' to be a choice index in [0, 2), found 2"),
    ("index.json", '[{"prompt": "a", "choices": ["x", "y"], "answer": "x"}]',
     "expected 'answer' to be an int"),
    ("choices.json", '[{"prompt": "a", "choices": ["x"], "answer": 0}]',
     "expected 'choices' to be a list of 2 or more"),
    ("category.jsonl", '{"prompt": "a", "answer": "b", "category": 1}\n',
     "expected 'category' to be a string"),
    ("notjson.jsonl", '{"prompt": "a", "answer": "b"}\n{oops\n', "line 2 is not JSON"),
    ("list.jsonl", '["a"]\n', "line 1: expected a JSON object, found list"),
    ("object.json", '{"prompt": "a", "answer": "b"}', "expected a JSON list of records"),
    ("data.csv", "prompt,answer\n", "expected a .jsonl file"),
]


@pytest.mark.parametrize("name,text,expected", BAD_DATA, ids=[b[0] for b in BAD_DATA])
def test_cli_bad_data(tmp_path, capsys, name, text, expected):
  path = tmp_path / name
  path.write_text(text)
  rc = cli.main(["compat", "--old", "default:reverse", "--new", "default:sort", "--data",
                 str(path), "--no-plot"])
  err = capsys.readouterr().err
  assert rc == 2, err
  assert str(path) in err and expected in err, err
  assert "Traceback" not in err


def test_cli_missing_data_and_models(tmp_path, capsys):
  data = tmp_path / "tasks.jsonl"
  data.write_text(json.dumps(_generative_records(per_task=1)[0]) + "\n")
  base = ["compat", "--data", str(data), "--no-plot", "--no-progress"]
  assert cli.main(base[:2] + [str(tmp_path / "nope.jsonl")] + base[3:]
                  + ["--old", "default", "--new", "default"]) == 2
  assert "no such data file" in capsys.readouterr().err
  missing = str(tmp_path / "no_model")
  assert cli.main(base + ["--old", missing, "--new", "default:sort"]) == 1
  err = capsys.readouterr().err
  assert missing in err and "Traceback" not in err
  assert cli.main(base + ["--old", "default:nosuch", "--new", "default:sort"]) == 1
  assert "nosuch" in capsys.readouterr().err
  assert cli.main(base + ["--old", "default", "--new", "default", "--batch", "0"]) == 2
  assert "--batch" in capsys.readouterr().err


def test_load_versions_loads_a_shared_model_once():
  old_model, old_adapter, new_model, new_adapter = compat.load_versions("default:reverse",
                                                                        "default")
  assert old_model is new_model and new_adapter is None
  assert isinstance(old_adapter, ja.LoraAdapter)
