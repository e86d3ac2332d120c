"""The embedded default model (jaxadapt/default): the shipped files, against transformers + PEFT,
the tasks they solve, and a tiny rebuild (`python -m train.default_model --quick`)."""
import json
import os

import numpy as np
import pytest

import jaxadapt as ja
from jaxadapt import default
from train import default_model as dm
from train import tasks as tasks_lib

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

PROMPTS_PER_TASK = 6


@pytest.fixture(scope="module", params=tuple(default.VERSIONS))
def version(request):
  """Each embedded model: the default and its successor ("default-v2")."""
  return request.param


@pytest.fixture(scope="module")
def model(version):
  return ja.load_model(version)


@pytest.fixture(scope="module")
def adapters(version):
  return {t: ja.load_adapter(f"{version}:{t}") for t in default.TASKS}


def test_shipped_files_load_and_fit_the_budget(model, adapters):
  assert model.config.num_key_value_heads < model.config.num_attention_heads  # GQA
  assert model.config.tie_word_embeddings
  assert len(default.TASKS) >= 8 and set(adapters) == set(default.TASKS)
  for task, adapter in adapters.items():
    assert sorted(adapter.paths) == sorted(adapter.config.targets(model.linear_paths)), task
  size = sum(dm.shipped_bytes(root) for root in default.VERSIONS.values())
  assert size <= 25e6, f"the shipped files are {size / 1e6:.1f} MB, over the 25 MB budget"
  with open(os.path.join(model.directory, "config.json")) as f:
    assert json.load(f)["architectures"] == ["LlamaForCausalLM"]


def test_unknown_task_names_the_tasks():
  with pytest.raises(ValueError, match="reverse, sort"):
    ja.load_adapter("default:nope")
  with pytest.raises(ValueError, match="default-v2:reverse"):
    ja.load_adapter("default-v2:nope")
  with pytest.raises(ValueError, match="default, default-v2"):
    default.model_dir("default-v3")


def test_the_versions_share_the_tokenizer_and_differ_in_depth():
  """The successor is an update of the default (MUSCLE's setting): one tokenizer, one task
  format, more layers."""
  v1, v2 = (ja.load_model(v) for v in default.VERSIONS)
  for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
    with open(os.path.join(v1.directory, name)) as a, open(os.path.join(v2.directory, name)) as b:
      assert a.read() == b.read(), name
  assert v2.config.num_hidden_layers > v1.config.num_hidden_layers
  assert v2.config.vocab_size == v1.config.vocab_size
  with pytest.raises(ValueError, match="unknown task"):
    default.prompt("nope", "x")


def test_tokenizer_is_bytes_offline():
  tok = transformers.AutoTokenizer.from_pretrained(default.model_dir(), local_files_only=True)
  text = "[reverse] h\u00e9llo \u2713 {x}\n"
  ids = tok(text)["input_ids"]
  assert ids == [tasks_lib.BOS_ID, *text.encode("utf-8")]
  assert tok.decode(ids, skip_special_tokens=True) == text
  assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (
      tasks_lib.PAD_ID, tasks_lib.BOS_ID, tasks_lib.EOS_ID)
  chat = tok.apply_chat_template([{"role": "user", "content": "[reverse] hello"}],
                                 add_generation_prompt=True, tokenize=False)
  assert tok(chat, add_special_tokens=False)["input_ids"] == tok(default.prompt(
      "reverse", "hello"))["input_ids"]
  with open(os.path.join(default.model_dir(), "generation_config.json")) as f:
    assert json.load(f)["eos_token_id"] == tasks_lib.EOS_ID


def _heldout(n=PROMPTS_PER_TASK):
  """(task, segments) of the first n held-out examples of every task."""
  return [(t, [s]) for t in default.TASKS for s in tasks_lib.heldout_segments(t)[:n]]


def test_adapters_solve_their_tasks_and_the_base_does_not(model, adapters):
  items = _heldout()
  prompts = [tasks_lib.prompt_text(segs) for _, segs in items]
  want = [tasks_lib.answer_text(segs) for _, segs in items]
  ids = [default.TASKS.index(t) for t, _ in items]
  # One mixed batch: every row with its own task's adapter.
  out = model.generate(prompts, max_new_tokens=24, adapters=[adapters[t] for t in default.TASKS],
                       adapter_ids=ids)
  base = model.generate(prompts, max_new_tokens=24)
  for task in default.TASKS:
    rows = [i for i, (t, _) in enumerate(items) if t == task]
    solved = [out.text[i] == want[i] and out.finish_reasons[i] == "stop" for i in rows]
    by_base = [base.text[i] == want[i] for i in rows]
    assert sum(solved) >= len(rows) - 1, (task, [(want[i], out.text[i]) for i in rows])
    assert sum(by_base) <= 1, (task, [base.text[i] for i in rows])


def test_transformers_and_peft_load_the_shipped_dirs_and_agree(version, model, adapters):
  hf = transformers.AutoModelForCausalLM.from_pretrained(
      default.model_dir(version), local_files_only=True, dtype=torch.float32).eval()
  tok = transformers.AutoTokenizer.from_pretrained(default.model_dir(version),
                                                   local_files_only=True)
  tasks = ("reverse", "max", "dedupe")
  prompts = [tasks_lib.prompt_text(tasks_lib.heldout_segments(t)[:1]) for t in tasks]
  prompts.append(default.prompt(("reverse", "hello"), ("upper", "world")))
  batch = tok(prompts, return_tensors="pt", padding=True)  # left padding (tokenizer_config)
  with torch.no_grad():
    ref = hf(**batch).logits.numpy()
  mask = batch["attention_mask"].numpy()
  got = np.asarray(model(batch["input_ids"].numpy(), mask))
  np.testing.assert_allclose(got[mask == 1], ref[mask == 1], atol=2e-4, rtol=2e-4)
  peft_model = peft.PeftModel.from_pretrained(hf, default.adapter_dir(tasks[0], version),
                                              adapter_name=tasks[0])
  for t in tasks[1:]:
    peft_model.load_adapter(default.adapter_dir(t, version), adapter_name=t)
  for t in tasks:
    peft_model.set_adapter(t)
    with torch.no_grad():
      ref = peft_model(**batch).logits.numpy()
      hf_ids = peft_model.generate(**batch, max_new_tokens=20, do_sample=False,
                                   pad_token_id=tok.pad_token_id)[:, batch["input_ids"].shape[1]:]
    got = np.asarray(model(batch["input_ids"].numpy(), mask, adapter=adapters[t]))
    np.testing.assert_allclose(got[mask == 1], ref[mask == 1], atol=2e-4, rtol=2e-4)
    ours = model.generate(prompts, max_new_tokens=20, adapter=adapters[t])
    theirs = tok.batch_decode(hf_ids, skip_special_tokens=True)
    assert ours.text == theirs, t


def test_quick_rebuild_writes_loadable_files(tmp_path):
  out = tmp_path / "default"
  assert dm.main(["--quick", "--out", str(out)]) == 0
  model = ja.load_model(str(out / "model"))
  adapter = ja.load_adapter(str(out / "adapters" / "reverse"))
  tok = transformers.AutoTokenizer.from_pretrained(str(out / "model"), local_files_only=True)
  assert model.tokenizer is not None and tok("ab")["input_ids"] == [tasks_lib.BOS_ID, 97, 98]
  assert np.isfinite(np.asarray(model([[tasks_lib.BOS_ID, 97]], adapter=adapter))).all()
  assert (out / "default_model.md").read_text().count("| `reverse` |") == 1
