"""`model.generate` against transformers' and PEFT's `generate` (greedy, token for token), the
sampling distribution against transformers' logits warpers, the compile count of a stream of
calls, and bad input."""
import copy

import numpy as np
import pytest
import torch

import jaxadapt as ja
from jaxadapt import generate as gen

NEW = 12
PAD = 96  # the pad id transformers writes after a finished row


def _prompts(seed, lengths):
  rng = np.random.default_rng(seed)
  return [[int(t) for t in rng.integers(1, 97, n)] for n in lengths]


def _left_padded(prompts):
  width = max(map(len, prompts))
  ids = np.zeros((len(prompts), width), np.int64)
  mask = np.zeros_like(ids)
  for i, p in enumerate(prompts):
    ids[i, width - len(p):], mask[i, width - len(p):] = p, 1
  return ids, mask


def _hf_generate(model, prompts, **kwargs):
  """transformers' greedy generate; the new tokens of each row, pads after a finished row
  removed."""
  ids, mask = _left_padded(prompts)
  kwargs.setdefault("eos_token_id", None)
  with torch.no_grad():
    out = model.generate(torch.tensor(ids), attention_mask=torch.tensor(mask), do_sample=False,
                         max_new_tokens=NEW, pad_token_id=PAD, **kwargs)
  return [list(map(int, row)) for row in out[:, ids.shape[1]:].numpy()]


def _assert_same(ours, theirs, finished):
  """Row by row: our ids equal transformers' up to where the row finished, pads after."""
  for i, (a, b) in enumerate(zip(ours, theirs)):
    assert a == b[:len(a)], (i, a, b)
    if finished[i]:
      assert all(t == PAD for t in b[len(a):]), (i, a, b)
    else:
      assert len(a) == NEW, (i, a, b)


def _byte_tokenizer(directory, vocab=97):
  """A tokenizer for the tiny vocab: id i is the byte 32 + i (printable ASCII)."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers
  from transformers import PreTrainedTokenizerFast
  # The byte-level alphabet: printable bytes stand for themselves, the others for chr(256 + n).
  printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
  others = [b for b in range(256) if b not in printable]
  chars = {**{b: chr(b) for b in printable}, **{b: chr(256 + n) for n, b in enumerate(others)}}
  tok = Tokenizer(models.BPE(vocab={chars[32 + i]: i for i in range(vocab)}, merges=[]))
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  PreTrainedTokenizerFast(tokenizer_object=tok).save_pretrained(directory)


@pytest.fixture(scope="module")
def llama(tmp_path_factory, hf_model_maker):
  d = str(tmp_path_factory.mktemp("gen_llama"))
  hf = hf_model_maker("llama", d, initializer_range=0.2)  # peaked logits: no near-ties
  _byte_tokenizer(d)
  return ja.load_model(d), hf, d


@pytest.mark.parametrize("family,overrides", [
    ("mistral", dict(sliding_window=4)),   # a window shorter than the output
    ("qwen2", dict()),
])
def test_greedy_equals_transformers_other_families(family, overrides, tmp_path, hf_model_maker):
  hf = hf_model_maker(family, str(tmp_path), seed=3, initializer_range=0.2, **overrides)
  model = ja.load_model(str(tmp_path))
  prompts = _prompts(1, (9, 4, 7))
  out = model.generate(prompts, max_new_tokens=NEW, eos_token_id=[])
  _assert_same(out.ids, _hf_generate(hf, prompts), [False] * 3)
  assert out.finish_reasons == ["length"] * 3


def test_greedy_left_padding_eos_and_stop_strings_equal_transformers(llama):
  model, hf, _ = llama
  prompts = _prompts(0, (5, 9, 3, 6))
  ours = model.generate(prompts, max_new_tokens=NEW, eos_token_id=[])
  theirs = _hf_generate(hf, prompts)
  _assert_same(ours.ids, theirs, [False] * 4)
  # An id array with its own (left) padding gives the same.
  ids, mask = _left_padded(prompts)
  assert model.generate(ids, attention_mask=mask, max_new_tokens=NEW,
                        eos_token_id=[]).ids == ours.ids
  # eos: two ids that occur mid-way in two rows' greedy outputs end those rows.
  eos = [ours.ids[0][4], ours.ids[2][6]]
  with_eos = model.generate(prompts, max_new_tokens=NEW, eos_token_id=eos)
  finished = [any(t in eos for t in row) for row in ours.ids]
  assert sum(finished) >= 2
  _assert_same(with_eos.ids, _hf_generate(hf, prompts, eos_token_id=eos), finished)
  for row, full, done, reason in zip(with_eos.ids, ours.ids, finished, with_eos.finish_reasons):
    assert reason == ("stop" if done else "length")
    if done:
      assert row[-1] in eos and row == full[:len(row)]
  # Stop strings: the decoded text of two tokens of row 1's output.
  tok = model.tokenizer
  stop = tok.decode(ours.ids[1][5:7])
  eos = [95]  # transformers pads finished rows only when it has an eos id
  stopped = model.generate(prompts, max_new_tokens=NEW, eos_token_id=eos, stop=[stop])
  theirs = _hf_generate(hf, prompts, stop_strings=[stop], tokenizer=tok, eos_token_id=eos)
  finished = [stop in tok.decode(row) or 95 in row for row in ours.ids]
  _assert_same(stopped.ids, theirs, finished)
  assert stopped.finish_reasons[1] == "stop" and len(stopped.ids[1]) <= 7
  text = tok.decode(ours.ids[1])
  assert stopped.text[1] == text[:text.index(stop)]  # the text is cut before the stop string


def test_text_prompts_through_the_tokenizer(llama):
  model, hf, _ = llama
  out = model.generate(["hello", "a longer prompt"], max_new_tokens=NEW, eos_token_id=[])
  prompts = [model.tokenizer(t)["input_ids"] for t in ("hello", "a longer prompt")]
  _assert_same(out.ids, _hf_generate(hf, prompts), [False, False])
  assert out.text == [model.tokenizer.decode(r) for r in out.ids]
  assert out.prompt_lengths == [5, 15]


def test_mixed_batch_of_8_adapters_equals_peft(llama, tmp_path):
  from peft import LoraConfig, PeftModel, get_peft_model
  model, hf, _ = llama
  targets = [["q_proj", "v_proj"], "all-linear", ["k_proj", "o_proj"], ["gate_proj", "down_proj"]]
  dirs = []
  for i in range(8):
    torch.manual_seed(100 + i)
    cfg = LoraConfig(r=i + 1, lora_alpha=2 * (i + 1), target_modules=targets[i % 4],
                     init_lora_weights=False)
    peft = get_peft_model(copy.deepcopy(hf), cfg)
    with torch.no_grad():  # larger B so each adapter changes the greedy tokens
      for name, p in peft.named_parameters():
        if "lora_B" in name:
          p.mul_(30.0)
    dirs.append(str(tmp_path / f"a{i}"))
    peft.save_pretrained(dirs[-1])
  multi = PeftModel.from_pretrained(copy.deepcopy(hf), dirs[0], adapter_name="a0").eval()
  for i in range(1, 8):
    multi.load_adapter(dirs[i], adapter_name=f"a{i}")
  adapters = [ja.load_adapter(d) for d in dirs]
  prompts = _prompts(2, (4, 7, 5, 3, 8, 6, 2, 9, 5))
  which = [0, 1, 2, 3, -1, 4, 5, 6, 7]
  ours = model.generate(prompts, max_new_tokens=NEW, eos_token_id=[], adapters=adapters,
                        adapter_ids=which)
  names = ["__base__" if a < 0 else f"a{a}" for a in which]
  _assert_same(ours.ids, _hf_generate(multi, prompts, adapter_names=names), [False] * 9)
  base = model.generate(prompts, max_new_tokens=NEW, eos_token_id=[])
  assert base.ids[4] == ours.ids[4]
  assert sum(b != o for b, o in zip(base.ids, ours.ids)) >= 6  # the adapters matter
  # One adapter for the whole batch equals PEFT with that adapter active.
  multi.set_adapter("a1")
  one = model.generate(prompts[:3], max_new_tokens=NEW, eos_token_id=[], adapter=adapters[1])
  _assert_same(one.ids, _hf_generate(multi, prompts[:3]), [False] * 3)


def test_logits_processing_equals_transformers_warpers():
  from transformers.generation.logits_process import (TemperatureLogitsWarper,
                                                      TopKLogitsWarper, TopPLogitsWarper)
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(6, 50)).astype(np.float32) * 3
  logits[1, :5] = logits[1, 5]  # ties at the k-th value
  for t, k, p in ((1.0, 0, 1.0), (0.7, 5, 1.0), (1.3, 0, 0.8), (0.5, 10, 0.5), (2.0, 1, 0.9),
                  (1.0, 50, 0.01)):
    ref = torch.tensor(logits)
    ref = TemperatureLogitsWarper(t)(None, ref)
    if k:
      ref = TopKLogitsWarper(k)(None, ref)
    if p < 1:
      ref = TopPLogitsWarper(p)(None, ref)
    ref = torch.log_softmax(ref, -1).numpy()
    ours = np.asarray(gen.process_logits(logits, np.full(6, t, np.float32), np.full(6, k),
                                         np.full(6, p, np.float32)))
    np.testing.assert_array_equal(np.isinf(ours), np.isinf(ref))
    np.testing.assert_allclose(ours[~np.isinf(ref)], ref[~np.isinf(ref)], atol=1e-5)


def test_sampling_is_reproducible_and_follows_the_processed_softmax(tmp_path, hf_model_maker):
  """Chi-square of 4096 first tokens against transformers' warped softmax on a 16-token vocab."""
  from scipy import stats
  from transformers.generation.logits_process import (TemperatureLogitsWarper,
                                                      TopKLogitsWarper, TopPLogitsWarper)
  hf = hf_model_maker("llama", str(tmp_path), seed=5, vocab_size=16, initializer_range=0.1)
  model = ja.load_model(str(tmp_path))
  prompt = [3, 1, 4, 1, 5]
  n, t, k, p = 4096, 0.8, 8, 0.9
  out = model.generate([prompt] * n, max_new_tokens=1, temperature=t, top_k=k, top_p=p,
                       seed=7, eos_token_id=[])
  tokens = np.array([row[0] for row in out.ids])
  with torch.no_grad():
    logits = hf(torch.tensor([prompt])).logits[:, -1]
  ref = TopPLogitsWarper(p)(None, TopKLogitsWarper(k)(None, TemperatureLogitsWarper(t)(
      None, logits)))
  probs = torch.softmax(ref, -1)[0].double().numpy()
  kept = probs > 0
  assert 2 <= kept.sum() <= k and not np.isin(tokens, np.flatnonzero(~kept)).any()
  counts = np.bincount(tokens, minlength=16)[kept]
  chi = stats.chisquare(counts, probs[kept] / probs[kept].sum() * n)
  assert chi.pvalue > 1e-3, (counts, probs[kept] * n)
  # A fixed seed reproduces; another seed differs; per-prompt seeds do not depend on the row.
  again = model.generate([prompt] * 8, max_new_tokens=6, temperature=t, seed=7, eos_token_id=[])
  assert again.ids == model.generate([prompt] * 8, max_new_tokens=6, temperature=t, seed=7,
                                     eos_token_id=[]).ids
  assert again.ids != model.generate([prompt] * 8, max_new_tokens=6, temperature=t, seed=8,
                                     eos_token_id=[]).ids
  solo = model.generate([prompt], max_new_tokens=6, temperature=t, seed=[11], eos_token_id=[])
  mixed = model.generate([[2, 2], prompt], max_new_tokens=6, temperature=[0.0, t],
                         seed=[0, 11], eos_token_id=[])
  assert mixed.ids[1] == solo.ids[0]
  assert mixed.ids[0] == model.generate([[2, 2]], max_new_tokens=6, eos_token_id=[]).ids[0]


def test_a_stream_of_calls_compiles_once_per_bucket(llama):
  model = llama[0]
  before = gen.compile_counts()
  rng = np.random.default_rng(3)
  seen_prefill, seen_decode = set(), set()
  for _ in range(24):
    rows = int(rng.integers(1, 9))
    lengths = rng.integers(1, 40, rows)
    new = int(rng.integers(1, 20))
    model.generate(_prompts(int(rng.integers(1000)), lengths), max_new_tokens=new,
                   eos_token_id=[])
    b, p = gen.bucket(rows), gen.bucket(max(lengths), gen.MIN_PROMPT_BUCKET)
    seen_prefill.add((b, p, gen.bucket(p + new)))
    if new > 1:
      seen_decode.add((b, gen.bucket(p + new)))
  after = gen.compile_counts()
  assert after["prefill"] - before["prefill"] <= len(seen_prefill)
  assert after["decode"] - before["decode"] <= len(seen_decode)
  assert len(seen_prefill) < 24  # the stream did repeat buckets
  # A repeated call compiles nothing.
  model.generate(_prompts(0, (5, 9)), max_new_tokens=5, eos_token_id=[])
  counts = gen.compile_counts()
  model.generate(_prompts(9, (7, 3)), max_new_tokens=6, eos_token_id=[])
  assert gen.compile_counts() == counts


def test_bad_input_is_refused_and_changes_nothing(llama, tmp_path, hf_model_maker):
  model = llama[0]
  prompts = _prompts(0, (5, 9))
  before = model.generate(prompts, max_new_tokens=4, eos_token_id=[]).ids
  context = model.config.max_position_embeddings
  cases = [
      (dict(inputs=[[1] * (context + 1)]), "context"),
      (dict(max_new_tokens=context), "context"),
      (dict(max_new_tokens=0), "max_new_tokens"),
      (dict(max_new_tokens=-3), "max_new_tokens"),
      (dict(temperature=-0.5), "temperature"),
      (dict(temperature=float("nan")), "temperature"),
      (dict(top_k=-1), "top_k"),
      (dict(top_p=0.0), "top_p"),
      (dict(top_p=1.5), "top_p"),
      (dict(seed=-1), "seed"),
      (dict(inputs=[[]]), "empty"),
      (dict(inputs=[[5, 200]]), "vocabulary"),
      (dict(eos_token_id=[1000]), "eos_token_id"),
      (dict(temperature=[0.5]), "temperature"),
      (dict(adapters=[], adapter_ids=[0]), "adapter_ids"),
  ]
  for kwargs, match in cases:
    kwargs = {"inputs": prompts, "max_new_tokens": 4, **kwargs}
    with pytest.raises(ValueError, match=match):
      model.generate(kwargs.pop("inputs"), **kwargs)
  hf_model_maker("llama", str(tmp_path), hidden_size=48, num_attention_heads=4)
  other = ja.init_lora(ja.load_model(str(tmp_path)), ja.LoraConfig(target_modules=["q_proj"]))
  with pytest.raises(ValueError, match="another base"):
    model.generate(prompts, max_new_tokens=4, adapter=other)
  no_tok = ja.CausalLM(model.config, model.graphdef, model.params)
  with pytest.raises(ValueError, match="tokenizer"):
    no_tok.generate("hello", max_new_tokens=4)
  with pytest.raises(ValueError, match="tokenizer"):
    no_tok.generate(prompts, max_new_tokens=4, stop=["x"])
  assert model.generate(prompts, max_new_tokens=4, eos_token_id=[]).ids == before


def test_generate_command_line(llama, tmp_path, capsys):
  import json
  from _adapter_helpers import perturbed
  from jaxadapt import cli
  model, _, directory = llama
  adapter = perturbed(ja.init_lora(model, ja.LoraConfig(r=4, target_modules="all-linear")), 3)
  ja.save_adapter(adapter, str(tmp_path / "x"))
  argv = ["generate", "--model", directory, "--adapter", f"x={tmp_path / 'x'}", "--use", "x",
          "--use", "base", "--max-new-tokens", "6", "--json", "hello", "abc"]
  assert cli.main(argv) == 0
  rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
  want = model.generate(["hello", "abc"], max_new_tokens=6, adapters=[ja.load_adapter(
      str(tmp_path / "x"))], adapter_ids=[0, -1])
  assert [r["ids"] for r in rows] == want.ids and [r["text"] for r in rows] == want.text
  assert [r["adapter"] for r in rows] == ["x", "base"]
  assert want.ids[0] != model.generate(["hello"], max_new_tokens=6).ids[0]
  for bad, message in ((["--adapter", "nodir"], "NAME=DIR"), (["--use", "y"], "names no"),
                       (["--max-new-tokens", "0"], "max_new_tokens"),
                       (["--chat"], "chat template")):
    rc = cli.main(["generate", "--model", directory, *bad, "hello"])
    assert rc in (1, 2) and message in capsys.readouterr().err
