"""`jaxadapt compat`: how compatible a new model version is with the old one (MUSCLE Sec. 3).

  jaxadapt compat --old default:reverse --new default:sort --data tasks.jsonl
  jaxadapt compat --old OLD_DIR:OLD_ADAPTER --new NEW_DIR:NEW_ADAPTER --data mmlu.json --normalize
  jaxadapt compat --old default:reverse --new default:sort --data tasks.jsonl --json --no-plot

Each version is MODEL[:ADAPTER]: a Hugging Face dir, a .gguf file or an embedded name
(`default`), and optionally a PEFT adapter dir (for an embedded model, a task name:
`default:reverse`). The data file is .jsonl (one object a line) or .json (a list of objects):

  generative       {"prompt": str, "answer": str, "category": str (optional)}
  multiple choice  {"prompt": str, "choices": [str, ...], "answer": int, "category": ...}

Generative records are answered greedily and scored by exact match (accuracy, NFR, PFR) and
ROUGE-1 (its PFR / NFR and the mean gain m_g and loss m_r); multiple-choice records pick the
choice of highest log-likelihood (`--normalize`: per choice token) and add NFR_mc. Every number
comes with a paired bootstrap interval, overall and per category; the flip rates are also
drawn as a PNG (`--plot`, default compat_flips.png).

References: Echterhoff et al., "MUSCLE: A Model Update Strategy for Compatible LLM Evolution",
EMNLP Findings 2024, Sec. 3; the metrics live in `jaxadapt.muscle`.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxadapt import muscle
from jaxadapt.generate import MIN_PROMPT_BUCKET, bucket
from jaxadapt.generate_cli import UsageError
from jaxadapt.io.files import json_records

KINDS = ("choice", "generate")
DEFAULT_PLOT = "compat_flips.png"
MAX_DEFAULT_NEW_TOKENS = 256  # the default --max-new-tokens is at most this
EXTRA_NEW_TOKENS = 8          # ... and the longest reference answer's tokens + this

# The report's metrics in display order: (key in CompatReport.overall, label).
METRICS = {
    "choice": (("accuracy_old", "accuracy (old)"), ("accuracy_new", "accuracy (new)"),
               ("nfr", "NFR (negative flips)"), ("pfr", "PFR (positive flips)"),
               ("nfr_mc", "NFR_mc (new wrong, answer changed)")),
    "generate": (("accuracy_old", "exact match (old)"), ("accuracy_new", "exact match (new)"),
                 ("nfr", "NFR (negative flips)"), ("pfr", "PFR (positive flips)"),
                 ("rouge1_score_old", "ROUGE-1 (old)"), ("rouge1_score_new", "ROUGE-1 (new)"),
                 ("rouge1_nfr", "ROUGE-1 NFR (score fell)"),
                 ("rouge1_pfr", "ROUGE-1 PFR (score rose)"),
                 ("rouge1_m_g", "ROUGE-1 m_g (mean gain)"),
                 ("rouge1_m_r", "ROUGE-1 m_r (mean loss)")),
}
# The columns of the per-category table and the bars of the plot.
CATEGORY_COLUMNS = {"choice": ("accuracy_old", "accuracy_new", "nfr", "pfr", "nfr_mc"),
                    "generate": ("accuracy_old", "accuracy_new", "nfr", "pfr", "rouge1_nfr",
                                 "rouge1_pfr")}
PLOTTED = {"choice": ("nfr", "pfr", "nfr_mc"), "generate": ("nfr", "pfr")}
SHORT = {"accuracy_old": "acc old", "accuracy_new": "acc new", "nfr": "NFR", "pfr": "PFR",
         "nfr_mc": "NFR_mc", "rouge1_nfr": "R1 NFR", "rouge1_pfr": "R1 PFR"}


# --- data --------------------------------------------------------------------------------------

def _type_name(value) -> str:
  return "null" if value is None else type(value).__name__


def _check_record(where: str, value, kind: str) -> dict:
  """The record at `where` as {"prompt", "answer", "category"[, "choices"]}, checked."""
  if not isinstance(value, dict):
    raise UsageError(f"{where}: expected a JSON object, found {_type_name(value)}")
  expected = ('{"prompt": str, "choices": [str, ...], "answer": int}' if kind == "choice"
              else '{"prompt": str, "answer": str}')
  for key in ("prompt", "answer"):
    if key not in value:
      raise UsageError(f"{where}: expected {expected}, found no {key!r} (keys: "
                       f"{sorted(value)})")
  if not isinstance(value["prompt"], str) or not value["prompt"]:
    raise UsageError(f"{where}: expected 'prompt' to be a non-empty string, found "
                     f"{_type_name(value['prompt'])} {value['prompt']!r:.60}")
  category = value.get("category", "all")
  if not isinstance(category, str):
    raise UsageError(f"{where}: expected 'category' to be a string, found "
                     f"{_type_name(category)} {category!r:.60}")
  record = {"prompt": value["prompt"], "category": category}
  answer = value["answer"]
  if kind == "generate":
    if not isinstance(answer, str):
      raise UsageError(f"{where}: expected 'answer' to be a string (the reference answer), found "
                       f"{_type_name(answer)} {answer!r:.60}")
    return {**record, "answer": answer}
  choices = value["choices"]
  if (not isinstance(choices, list) or len(choices) < 2
      or not all(isinstance(c, str) and c for c in choices)):
    raise UsageError(f"{where}: expected 'choices' to be a list of 2 or more non-empty strings, "
                     f"found {_type_name(choices)} {choices!r:.60}")
  if isinstance(answer, bool) or not isinstance(answer, int):
    raise UsageError(f"{where}: expected 'answer' to be an int (the index of the right choice), "
                     f"found {_type_name(answer)} {answer!r:.60}")
  if not 0 <= answer < len(choices):
    raise UsageError(f"{where}: expected 'answer' to be a choice index in [0, {len(choices)}), "
                     f"found {answer}")
  return {**record, "choices": list(choices), "answer": answer}


def read_records(path: str) -> tuple[str, list[dict]]:
  """The records of a compatibility data set and their kind.

  Args:
    path: a .jsonl file (one JSON object a line) or a .json file (a list of objects). Each
      record is generative, `{"prompt": str, "answer": str}`, or multiple choice,
      `{"prompt": str, "choices": [str, ...] (>= 2), "answer": int}`; both may hold a
      "category" (default "all").

  Returns:
    ("choice" or "generate", records): each record a dict with "prompt", "answer", "category"
    (and "choices").

  Raises:
    UsageError (a ValueError): no such file, another extension, invalid JSON, no records, a mix
      of both kinds, or a record with a missing field, a wrong type or an answer index out of
      range; the message names the file, the line (.jsonl) or index (.json), what was expected
      and what was found.
  """
  path = os.fspath(path)
  ext = os.path.splitext(path)[1].lower()
  if ext not in (".jsonl", ".json"):
    raise UsageError(f"{path}: expected a .jsonl file (one JSON object a line) or a .json file "
                     f"(a list of objects), found the extension {ext or 'none'!r}")
  try:
    with open(path, encoding="utf-8") as f:
      text = f.read()
  except FileNotFoundError:
    raise UsageError(f"{path}: no such data file (expected a .jsonl or .json file of "
                     f"records)") from None
  except (OSError, UnicodeDecodeError) as e:
    raise UsageError(f"{path}: cannot read the data file ({e})") from None
  try:
    items = json_records(path, text, "records", item="record")
  except ValueError as e:
    raise UsageError(str(e)) from None
  if not items:
    raise UsageError(f"{path}: expected at least one record, found none (an empty file)")
  first_where, first = items[0]
  kind = "choice" if isinstance(first, dict) and "choices" in first else "generate"
  records = []
  for where, value in items:
    if isinstance(value, dict) and ("choices" in value) != (kind == "choice"):
      raise UsageError(
          f"{path}, {where}: expected a {'multiple-choice' if kind == 'choice' else 'generative'}"
          f" record like the first ({first_where}), found one "
          f"{'without' if kind == 'choice' else 'with'} 'choices'; a file holds one kind")
    records.append(_check_record(f"{path}, {where}", value, kind))
  return kind, records


# --- versions ----------------------------------------------------------------------------------

def parse_version(spec: str) -> tuple[str, Optional[str]]:
  """(model, adapter or None) of a version `MODEL[:ADAPTER]`, split at the first ':'.

  An embedded model name (not an existing path, no '/') with an adapter that is not an
  existing path names the embedded model's own adapter: `default:reverse` ->
  ("default", "default:reverse"), as `jaxadapt.load_adapter` takes it.

  Raises:
    UsageError: an empty model or adapter part.
  """
  model, sep, adapter = spec.partition(":")
  if not model or (sep and not adapter):
    raise UsageError(f"expected a version MODEL[:ADAPTER] (e.g. default:reverse or "
                     f"MODEL_DIR:ADAPTER_DIR), found {spec!r}")
  if not sep:
    return model, None
  if not os.path.exists(model) and "/" not in model and not os.path.exists(adapter):
    adapter = f"{model}:{adapter}"
  return model, adapter


def load_versions(old: str, new: str, *, dtype="float32") -> tuple:
  """(old_model, old_adapter, new_model, new_adapter) of two `MODEL[:ADAPTER]` specs; a model
  both name is loaded once.

  Raises:
    UsageError: a malformed spec; FileNotFoundError, ValueError: from the loaders.
  """
  import jaxadapt as ja
  specs = [parse_version(old), parse_version(new)]
  models: dict = {}
  out = []
  for model_spec, adapter_spec in specs:
    key = os.path.realpath(model_spec) if os.path.exists(model_spec) else model_spec
    if key not in models:
      models[key] = ja.load_model(model_spec, dtype=dtype)
    out += [models[key], None if adapter_spec is None else ja.load_adapter(adapter_spec,
                                                                            dtype=dtype)]
  return tuple(out)


# --- predictions -------------------------------------------------------------------------------

def _tokenizer(model):
  tok = model.tokenizer
  if tok is None:
    raise ValueError("the compatibility report tokenizes text prompts, and this model dir has no "
                     "tokenizer (tokenizer.json / tokenizer_config.json)")
  return tok


def _progress(total: int, desc: str, enabled: bool):
  from tqdm.auto import tqdm
  return tqdm(total=total, desc=desc, unit="batch", disable=not enabled)


@jax.jit
def _span_logprobs(logits, ids, span):
  """[B] sum over the positions t with `span[:, t]` of log p(ids[:, t] | ids[:, :t])."""
  logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
  token_logp = jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1)[..., 0]
  return jnp.sum(jnp.where(span[:, 1:], token_logp, 0.0), axis=-1)


def choice_scores(model, adapter, records: Sequence[dict], *, normalize: bool = False,
                  batch: int = 16, progress: bool = False) -> list[np.ndarray]:
  """Each choice's log-likelihood given its prompt: the sum of the log-probs of the choice's
  tokens (`normalize`: their mean, as lm-eval-harness `acc_norm`).

  The prompt is tokenized with special tokens (bos), the choice without, and the ids
  concatenated. The (record, choice) rows run in batches sorted by length, right-padded with an
  attention mask to a power-of-two length (>= 16) and row count, so a data set compiles the
  forward a few times, not once per length.

  Args:
    model: a `CausalLM` with a tokenizer.
    adapter: a `LoraAdapter` for every row, or None (the base).
    records: dicts with "prompt" and "choices" (`read_records`).
    normalize: divide each choice's log-likelihood by its token count.
    batch: rows per forward pass.
    progress: show a tqdm bar over the batches.

  Returns:
    Per record, [choices] float64 log-likelihoods.

  Raises:
    ValueError: a model without a tokenizer, a choice without tokens, or a prompt + choice
      longer than the model's context.
  """
  tok = _tokenizer(model)
  window = model.config.max_position_embeddings
  rows, starts, owners = [], [], []  # ids, where the choice starts, (record, choice)
  for i, record in enumerate(records):
    prompt = list(tok(record["prompt"])["input_ids"])
    for j, choice in enumerate(record["choices"]):
      ids = prompt + list(tok(choice, add_special_tokens=False)["input_ids"])
      if len(ids) == len(prompt):
        raise ValueError(f"record {i}, choice {j} ({choice!r}) has no tokens to score")
      if len(ids) > window:
        raise ValueError(f"record {i}, choice {j}: prompt + choice are {len(ids)} tokens, more "
                         f"than the model's context of {window}")
      rows.append(ids)
      starts.append(len(prompt))
      owners.append((i, j))
  order = sorted(range(len(rows)), key=lambda r: len(rows[r]))
  scores = np.zeros(len(rows))
  pad = tok.pad_token_id if tok.pad_token_id is not None else 0
  with _progress(-(-len(rows) // batch), "scoring choices", progress) as bar:
    for lo in range(0, len(order), batch):
      chunk = order[lo:lo + batch]
      b = bucket(len(chunk))
      length = min(bucket(max(len(rows[r]) for r in chunk), MIN_PROMPT_BUCKET), window)
      ids = np.full((b, length), pad, np.int32)
      mask = np.zeros((b, length), np.int32)
      span = np.zeros((b, length), bool)
      for k in range(b):
        r = chunk[min(k, len(chunk) - 1)]  # extra rows repeat the last one (never all padding)
        ids[k, :len(rows[r])] = rows[r]
        mask[k, :len(rows[r])] = 1
        span[k, starts[r]:len(rows[r])] = True
      logits = model(ids, mask, adapter=adapter)
      scores[chunk] = np.asarray(_span_logprobs(logits, jnp.asarray(ids),
                                                jnp.asarray(span)))[:len(chunk)]
      bar.update()
  if normalize:
    scores /= np.asarray([len(rows[r]) - starts[r] for r in range(len(rows))])
  out = [np.zeros(len(r["choices"])) for r in records]
  for r, (i, j) in enumerate(owners):
    out[i][j] = scores[r]
  return out


def choice_predictions(model, adapter, records: Sequence[dict], *, normalize: bool = False,
                       batch: int = 16, progress: bool = False) -> np.ndarray:
  """The choice each record's model version picks: the one of highest log-likelihood after the
  prompt (`choice_scores`; MUSCLE Sec. 3's multiple-choice setting, as lm-eval-harness `acc`,
  or `acc_norm` with `normalize`).

  Args:
    model, adapter, records, normalize, batch, progress: as `choice_scores`.

  Returns:
    [N] int, the index of the picked choice (the first on ties).
  """
  scores = choice_scores(model, adapter, records, normalize=normalize, batch=batch,
                         progress=progress)
  return np.asarray([int(np.argmax(s)) for s in scores], np.int64)


def default_max_new_tokens(model, records: Sequence[dict]) -> int:
  """Enough new tokens for the longest reference answer: its tokens + 8, at most 256 (and what
  the longest prompt leaves of the model's context)."""
  tok = _tokenizer(model)
  answer = max(len(tok(r["answer"], add_special_tokens=False)["input_ids"]) for r in records)
  prompt = max(len(tok(r["prompt"])["input_ids"]) for r in records)
  room = model.config.max_position_embeddings - prompt
  return max(1, min(answer + EXTRA_NEW_TOKENS, MAX_DEFAULT_NEW_TOKENS, room))


def generated_texts(model, adapter, records: Sequence[dict], *,
                    max_new_tokens: Optional[int] = None, batch: int = 16,
                    progress: bool = False) -> list[str]:
  """Each record's greedy answer (`model.generate`'s `.text`, eos and special tokens dropped).

  The prompts run in batches sorted by length (greedy answers do not depend on the batch).

  Args:
    model: a `CausalLM` with a tokenizer.
    adapter: a `LoraAdapter` or None (the base).
    records: dicts with "prompt" and "answer" (`read_records`).
    max_new_tokens: per answer; None = `default_max_new_tokens`.
    batch: prompts per `generate` call.
    progress: show a tqdm bar over the batches.

  Returns:
    [N] the generated texts, in the order of `records`.
  """
  tok = _tokenizer(model)
  if max_new_tokens is None:
    max_new_tokens = default_max_new_tokens(model, records)
  lengths = [len(tok(r["prompt"])["input_ids"]) for r in records]
  order = sorted(range(len(records)), key=lambda i: lengths[i])
  texts: list = [None] * len(records)
  with _progress(-(-len(records) // batch), "generating", progress) as bar:
    for lo in range(0, len(order), batch):
      chunk = order[lo:lo + batch]
      out = model.generate([records[i]["prompt"] for i in chunk],
                           max_new_tokens=max_new_tokens, adapter=adapter)
      for i, text in zip(chunk, out.text):
        texts[i] = text
      bar.update()
  return texts


def compare(old_model, old_adapter, new_model, new_adapter, records: Sequence[dict], kind: str,
            *, old_name: str = "old", new_name: str = "new", normalize: bool = False,
            max_new_tokens: Optional[int] = None, batch: int = 16, samples: int = 1000,
            confidence: float = 0.95, seed: int = 0,
            progress: bool = False) -> muscle.CompatReport:
  """The compatibility report of two model versions on `records` (MUSCLE Sec. 3).

  Args:
    old_model, old_adapter, new_model, new_adapter: the two versions (adapters may be None).
    records, kind: from `read_records`.
    old_name, new_name: what the report calls the versions.
    normalize: multiple choice: per-token log-likelihoods (`choice_predictions`).
    max_new_tokens: generative: per answer (`generated_texts`; None = enough for the longest
      reference).
    batch: rows per forward pass / prompts per generate call.
    samples, confidence, seed: of the bootstrap intervals (`muscle.bootstrap`).
    progress: tqdm bars.

  Returns:
    A `muscle.CompatReport`: for "choice", `choice_flip_rates` (accuracy, NFR, PFR, NFR_mc);
    for "generate", `flip_rates` on exact match and `score_flip_rates` on ROUGE-1
    ("rouge1_*" keys), overall and per category.
  """
  if kind not in KINDS:
    raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
  categories = [r["category"] for r in records]
  versions = ((old_model, old_adapter, old_name), (new_model, new_adapter, new_name))
  if kind == "choice":
    old_pred, new_pred = (choice_predictions(m, a, records, normalize=normalize, batch=batch,
                                             progress=progress) for m, a, _ in versions)
    per_example = (old_pred, new_pred, np.asarray([r["answer"] for r in records]))
  else:
    if max_new_tokens is None:
      max_new_tokens = max(default_max_new_tokens(m, records) for m, _, _ in versions)
    old_text, new_text = (generated_texts(m, a, records, max_new_tokens=max_new_tokens,
                                          batch=batch, progress=progress)
                          for m, a, _ in versions)
    score = lambda texts, fn: np.asarray([fn(t, r["answer"]) for t, r in zip(texts, records)])
    per_example = (score(old_text, muscle.exact_match), score(new_text, muscle.exact_match),
                   score(old_text, muscle.rouge1), score(new_text, muscle.rouge1))
  return muscle.compat_report(kind, per_example, categories, old=old_name, new=new_name,
                              samples=samples, confidence=confidence, seed=seed)


# --- output ------------------------------------------------------------------------------------

def _estimate(e: muscle.Estimate) -> str:
  return f"{e.value:.3f} [{e.low:.3f}, {e.high:.3f}]"


def format_report(report: muscle.CompatReport) -> str:
  """The report as a text table: the versions, the overall metrics with their intervals, then
  one row per category."""
  kind_text = {"choice": "multiple choice (max log-likelihood)",
               "generate": "generative (greedy; exact match and ROUGE-1)"}[report.kind]
  lines = [f"MUSCLE compatibility (Sec. 3): old = {report.old}, new = {report.new}",
           f"{kind_text}, N = {report.n}, {report.confidence:.0%} bootstrap intervals", ""]
  labels = METRICS[report.kind]
  width = max(len(label) for _, label in labels)
  lines.append(f"{'metric':<{width}}  value [low, high]")
  lines += [f"{label:<{width}}  {_estimate(report.overall[key])}" for key, label in labels]
  columns = CATEGORY_COLUMNS[report.kind]
  cells = [["category", "n"] + [SHORT[c] for c in columns]]
  for name, metrics in report.by_category.items():
    cells.append([name, str(metrics["n"])]
                 + [f"{metrics[c].value:.3f}" if c.startswith("accuracy") else
                    _estimate(metrics[c]) for c in columns])
  widths = [max(len(row[k]) for row in cells) for k in range(len(cells[0]))]
  lines += ["", "by category:"]
  lines += ["  ".join(cell.ljust(w) if k == 0 else cell.rjust(w)
                      for k, (cell, w) in enumerate(zip(row, widths))).rstrip() for row in cells]
  return "\n".join(lines)


def plot_flips(report: muscle.CompatReport, path: str) -> str:
  """Saves grouped bars of the flip rates (NFR, PFR, and NFR_mc for multiple choice) per
  category, with the bootstrap intervals as error bars, as a PNG (matplotlib, Agg).

  Returns:
    `path`.
  """
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  groups = dict(report.by_category)
  if len(groups) > 1:
    groups = {"overall": report.overall, **groups}
  keys = PLOTTED[report.kind]
  x = np.arange(len(groups))
  bar = 0.8 / len(keys)
  fig, ax = plt.subplots(figsize=(max(5.0, 1.2 * len(groups) + 2), 3.8))
  top = 0.0
  for k, key in enumerate(keys):
    est = [m[key] for m in groups.values()]
    top = max([top] + [e.high for e in est])
    values = np.asarray([e.value for e in est])
    err = np.asarray([[max(e.value - e.low, 0.0) for e in est],
                      [max(e.high - e.value, 0.0) for e in est]])
    ax.bar(x + (k - (len(keys) - 1) / 2) * bar, values, bar, yerr=err, capsize=3,
           label=SHORT[key])
  ax.set_xticks(x, [f"{name}\n(n={report.n if name == 'overall' else m['n']})"
                    for name, m in groups.items()])
  ax.set_ylabel("share of examples")
  ax.set_ylim(0, min(1.0, max(top, 0.01)) * 1.35)  # the bars' scale, room for the legend
  ax.set_title(f"flips {report.old} -> {report.new} ({report.confidence:.0%} CI)", fontsize=10)
  ax.legend(ncol=len(keys), loc="upper center", fontsize=8)
  fig.tight_layout()
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return path


# --- the command -------------------------------------------------------------------------------

def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="jaxadapt compat", description=__doc__.split("\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter,
                              epilog=__doc__.split("\n", 2)[2])
  p.add_argument("--old", required=True, metavar="MODEL[:ADAPTER]", help="the old version")
  p.add_argument("--new", required=True, metavar="MODEL[:ADAPTER]", help="the new version")
  p.add_argument("--data", required=True, metavar="FILE", help="a .jsonl or .json data set")
  p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
  plot = p.add_mutually_exclusive_group()
  plot.add_argument("--plot", default=DEFAULT_PLOT, metavar="PATH",
                    help=f"the flip-rate PNG (default {DEFAULT_PLOT})")
  plot.add_argument("--no-plot", action="store_true", help="write no PNG")
  p.add_argument("--max-new-tokens", type=int, default=None, metavar="N",
                 help="generative: tokens per answer (default: the longest reference + 8, at "
                      "most 256)")
  p.add_argument("--batch", type=int, default=16, metavar="N", help="rows per forward / generate call")
  p.add_argument("--normalize", action="store_true",
                 help="multiple choice: log-likelihood per choice token (acc_norm)")
  p.add_argument("--samples", type=int, default=1000, metavar="N", help="bootstrap resamples")
  p.add_argument("--confidence", type=float, default=0.95, help="the intervals' coverage")
  p.add_argument("--seed", type=int, default=0, help="of the bootstrap")
  p.add_argument("--dtype", default="float32")
  p.add_argument("--no-progress", action="store_true", help="no progress bars (stderr)")
  return p


def _check_args(args) -> None:
  for name, value in (("--batch", args.batch), ("--samples", args.samples),
                      ("--max-new-tokens", args.max_new_tokens)):
    if value is not None and value < 1:
      raise UsageError(f"{name} must be an int >= 1, got {value}")
  if not 0 < args.confidence < 1:
    raise UsageError(f"--confidence must be in (0, 1), got {args.confidence}")


def main(argv=None) -> int:
  """`jaxadapt compat ARGS`: 0 on success, 2 for a bad command line or data file, 1 when a
  model or adapter does not load or run."""
  args = _parser().parse_args(argv)
  try:
    _check_args(args)
    kind, records = read_records(args.data)
    versions = load_versions(args.old, args.new, dtype=args.dtype)
    report = compare(*versions, records, kind, old_name=args.old, new_name=args.new,
                     normalize=args.normalize, max_new_tokens=args.max_new_tokens,
                     batch=args.batch, samples=args.samples, confidence=args.confidence,
                     seed=args.seed, progress=not args.no_progress)
    plot = None if args.no_plot else plot_flips(report, args.plot)
  except (ValueError, OSError, NotImplementedError) as e:
    print(f"jaxadapt compat: {e}", file=sys.stderr)
    return 2 if isinstance(e, UsageError) else 1
  if args.json:
    print(json.dumps({**report.to_json(), "plot": plot}))
  else:
    print(format_report(report))
    if plot is not None:
      print(f"\nflip rates plotted to {plot}")
  return 0
