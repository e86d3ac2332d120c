"""The tasks of the embedded default model: definitions, input generators, the oracle, the corpus.

`python -m train.default_model` pre-trains a byte-level Llama on English prose and on the prompt
format with four *base skills* that are none of the tasks (`copy`, `repeat`, `spell`, `inc`), then
trains one LoRA per task (`jaxadapt.default.TASKS`) on the frozen base. Everything it trains and
evaluates on is made here, deterministically:

Format (the same for every task and skill; one token per byte, see `encode`):

    <bos>[reverse] hello [upper] world\\n[reverse] olleh [upper] WORLD<eos>
    `---------------- prompt ---------------'`------------ answer ----------'

  A prompt is one or more segments `[tag] input` joined by spaces, ended by a newline; the answer
  restates each segment's tag followed by its output, joined by spaces, ended by eos. Inputs
  never hold `[` or a newline, so the segments split at `" ["`.

Training targets: the base learns every token (prose and the base skills' examples). A task's
LoRA learns only its own answer segments: the tag, the output and the delimiter after it (the
space before the next segment, or eos), with any other task's segments of the same example as
context, so that adapters gated per token (MeteoRA) compose.

Held-out sets: each task's evaluation inputs come from their own seed, and no training example
(base or LoRA) uses an input of any held-out set.

The prose is the docstrings of a fixed list of Python standard-library modules (every machine has
them), in a fixed order, split into paragraphs; it depends only on the Python version.
"""
from __future__ import annotations

import dataclasses
import functools
import importlib
import inspect
import re
import string
import warnings
from typing import Callable, Optional, Sequence

import numpy as np

from jaxadapt.default import SOLVERS, TASKS

# --- the byte-level vocabulary -----------------------------------------------------------------
# Token ids 0..255 are the byte values; the special tokens follow. The model's embedding has
# VOCAB_SIZE rows (a multiple of 8; ids past EOS_ID are never used).
PAD_ID, BOS_ID, EOS_ID = 256, 257, 258
SPECIAL_TOKENS = {"<pad>": PAD_ID, "<bos>": BOS_ID, "<eos>": EOS_ID}
VOCAB_SIZE = 264
IGNORE = -100  # label of a position that is not trained on (train.data.IGNORE)

# --- inputs ---------------------------------------------------------------------------------------
LETTERS = string.ascii_lowercase
# Short words for `dedupe` (and the base skills' word inputs).
WORDS = ("cat", "dog", "sun", "red", "big", "cup", "hat", "box", "pen", "map", "fox", "owl",
         "bee", "ant", "egg", "ice", "jam", "key", "log", "net", "oak", "pig", "sky", "toy")


def _letters(rng: np.random.Generator, lo: int, hi: int, alphabet: str = LETTERS) -> str:
  n = int(rng.integers(lo, hi + 1))
  return "".join(alphabet[i] for i in rng.integers(0, len(alphabet), size=n))


def _word_input(rng) -> str:
  """1-2 lowercase words, 3-10 characters in all."""
  while True:
    words = [_letters(rng, 2, 5) for _ in range(int(rng.integers(1, 3)))]
    text = " ".join(words)
    if 3 <= len(text) <= 10:
      return text


def _mixed_case(rng) -> str:
  """3-8 letters, each upper or lower case at random."""
  text = _letters(rng, 3, 8)
  flips = rng.integers(0, 2, size=len(text))
  return "".join(c.upper() if f else c for c, f in zip(text, flips))


def _number(rng) -> int:
  """A 1-, 2- or 3-digit number (each digit count equally likely)."""
  digits = int(rng.integers(1, 4))
  return int(rng.integers(0 if digits == 1 else 10 ** (digits - 1), 10 ** digits))


def _digits(rng) -> str:
  """3-8 random digits."""
  return "".join(str(d) for d in rng.integers(0, 10, size=int(rng.integers(3, 9))))


def _repeated_words(rng) -> str:
  """2-4 words of `WORDS` with at least one repeated."""
  while True:
    n = int(rng.integers(2, 5))
    words = [WORDS[i] for i in rng.integers(0, len(WORDS), size=n)]
    if len(set(words)) < n:
      return " ".join(words)


@dataclasses.dataclass(frozen=True)
class Task:
  """A task (or a base skill): its tag, how its inputs are drawn and its oracle."""
  name: str                                        # the tag is `[name]`
  make_input: Callable[[np.random.Generator], str]  # draws one input
  solve: Callable[[str], str]                      # the oracle: input -> output

  @property
  def tag(self) -> str:
    return f"[{self.name}]"


# The eight task adapters' tasks. Inputs stay short (1-10 characters, 2-4 words).
TASK_SPECS = {  # the oracles are jaxadapt.default.SOLVERS (the one definition)
    "reverse": Task("reverse", lambda rng: _letters(rng, 3, 8), SOLVERS["reverse"]),
    "sort": Task("sort", lambda rng: _letters(rng, 3, 8), SOLVERS["sort"]),
    "upper": Task("upper", _word_input, SOLVERS["upper"]),
    "rot13": Task("rot13", lambda rng: _letters(rng, 3, 8), SOLVERS["rot13"]),
    "count": Task("count", lambda rng: _letters(rng, 1, 10), SOLVERS["count"]),
    "max": Task("max", _digits, SOLVERS["max"]),
    "dedupe": Task("dedupe", _repeated_words, SOLVERS["dedupe"]),
    "swapcase": Task("swapcase", _mixed_case, SOLVERS["swapcase"]),
}
assert tuple(TASK_SPECS) == TASKS, "train.tasks and jaxadapt.default.TASKS must list the same tasks"


def _any_input(rng) -> str:
  """An input of any task's kind, or a few random letters, digits and punctuation."""
  kind = int(rng.integers(0, len(TASKS) + 1))
  if kind < len(TASKS):
    return TASK_SPECS[TASKS[kind]].make_input(rng)
  return _letters(rng, 3, 10, string.ascii_letters + string.digits + "+-*/=.,:;!?")


def _spell(text: str) -> str:
  return " ".join(text)


# The base's own skills: generic, none of them a task (the base learns the format and the byte
# strings of every task's inputs with them, not the tasks).
BASE_SKILLS = {
    "copy": Task("copy", _any_input, lambda s: s),
    "repeat": Task("repeat", _any_input, lambda s: f"{s} {s}"),
    "spell": Task("spell", lambda rng: _any_input(rng).replace(" ", ""), _spell),
    "inc": Task("inc", lambda rng: str(_number(rng)), lambda s: str(int(s) + 1)),
}


def spec(name: str) -> Task:
  """The task or base skill called `name`."""
  if name in TASK_SPECS:
    return TASK_SPECS[name]
  if name in BASE_SKILLS:
    return BASE_SKILLS[name]
  raise ValueError(f"unknown task {name!r}; the tasks are {', '.join(TASKS)} and the base skills "
                   f"{', '.join(BASE_SKILLS)}")


# --- examples -------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Segment:
  """One `[task] input` of a prompt and its answer `[task] output`."""
  task: str
  input: str

  @property
  def output(self) -> str:
    return spec(self.task).solve(self.input)

  @property
  def prompt(self) -> str:
    return f"[{self.task}] {self.input}"

  @property
  def answer(self) -> str:
    return f"[{self.task}] {self.output}"


def prompt_text(segments: Sequence[Segment]) -> str:
  """The prompt (without bos): segments joined by spaces, then a newline."""
  return " ".join(s.prompt for s in segments) + "\n"


def answer_text(segments: Sequence[Segment]) -> str:
  """The answer (without eos): each segment's tag and output, joined by spaces."""
  return " ".join(s.answer for s in segments)


def _bytes(text: str) -> list[int]:
  return list(text.encode("utf-8"))


def encode(segments: Sequence[Segment], targets: Optional[Sequence[str]] = None
           ) -> tuple[np.ndarray, np.ndarray]:
  """The token ids of one example and the positions trained on.

  Args:
    segments: the example's segments.
    targets: the tasks whose answer segments are trained on (each segment's tag, output and the
      delimiter after it: a space or eos); None = every token after bos (base pre-training).

  Returns:
    (ids [n] int32: bos, prompt bytes, answer bytes, eos; target [n] bool).
  """
  ids = [BOS_ID] + _bytes(prompt_text(segments))
  target = [targets is None] * len(ids)
  target[0] = False
  for i, seg in enumerate(segments):
    part = _bytes(seg.answer) + ([ord(" ")] if i + 1 < len(segments) else [EOS_ID])
    ids += part
    target += [targets is None or seg.task in targets] * len(part)
  return np.asarray(ids, np.int32), np.asarray(target, bool)


# --- held-out sets -----------------------------------------------------------------------------

HELDOUT_SEED = 1_000


@functools.lru_cache(maxsize=None)
def heldout_inputs(task: str, n: int = 256) -> tuple[str, ...]:
  """The `n` distinct held-out inputs of `task` (from their own seed, fixed)."""
  rng = np.random.default_rng([HELDOUT_SEED, TASKS.index(task)])
  out: dict[str, None] = {}
  while len(out) < n:
    out.setdefault(TASK_SPECS[task].make_input(rng))
  return tuple(out)


@functools.lru_cache(maxsize=None)
def _excluded(n: int) -> frozenset:
  """Every task's held-out inputs: no training example uses one."""
  return frozenset(x for t in TASKS for x in heldout_inputs(t, n))


def heldout_segments(task: str, n: int = 256) -> list[Segment]:
  """The held-out set of `task`: single-segment examples."""
  return [Segment(task, x) for x in heldout_inputs(task, n)]


def draw_segment(name: str, rng: np.random.Generator, heldout_n: int = 256) -> Segment:
  """A training segment of task or skill `name`, never one of the held-out inputs."""
  excluded = _excluded(heldout_n)
  while True:
    text = spec(name).make_input(rng)
    if text not in excluded:
      return Segment(name, text)


# --- the prose corpus -----------------------------------------------------------------------------

# Standard-library modules whose docstrings make the prose (importing them has no side effects).
PROSE_MODULES = (
    "abc", "argparse", "array", "ast", "base64", "bisect", "calendar", "cmath", "codecs",
    "collections", "colorsys", "contextlib", "copy", "csv", "dataclasses", "datetime", "decimal",
    "difflib", "enum", "filecmp", "fnmatch", "fractions", "functools", "gettext", "glob",
    "graphlib", "gzip", "hashlib", "heapq", "hmac", "html", "http", "inspect", "io", "ipaddress",
    "itertools", "json", "keyword", "linecache", "locale", "logging", "lzma", "math", "mimetypes",
    "numbers", "operator", "os", "pathlib", "pickle", "pkgutil", "platform", "pprint", "queue",
    "quopri", "random", "re", "reprlib", "sched", "secrets", "selectors", "shelve", "shlex",
    "shutil", "signal", "socket", "statistics", "string", "struct", "subprocess", "symtable",
    "tarfile", "tempfile", "textwrap", "threading", "time", "timeit", "tokenize", "traceback",
    "types", "typing", "unittest", "uuid", "warnings", "wave", "weakref", "zipfile", "zlib")


def _docstrings(module_name: str):
  """The docstrings of a module, its public functions and classes, and their public methods."""
  module = importlib.import_module(module_name)
  yield inspect.getdoc(module)
  for name in sorted(dir(module)):
    obj = getattr(module, name, None)
    if name.startswith("_") or getattr(obj, "__module__", None) != module_name:
      continue
    yield inspect.getdoc(obj)
    if inspect.isclass(obj):
      for attr in sorted(vars(obj)):
        member = getattr(obj, attr, None)
        if not attr.startswith("_") and callable(member):
          yield inspect.getdoc(member)


@functools.lru_cache(maxsize=1)
def prose_paragraphs() -> tuple[str, ...]:
  """English prose: the paragraphs (>= 40 characters, printable ASCII, whitespace collapsed,
  no doctest lines, each once) of the docstrings of `PROSE_MODULES`, in a fixed order."""
  seen: dict[str, None] = {}
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    for module_name in PROSE_MODULES:
      for doc in _docstrings(module_name):
        for para in re.split(r"\n\s*\n", doc or ""):
          if ">>>" in para:
            continue
          text = " ".join(para.split())
          if len(text) >= 40 and text.isascii() and text.isprintable():
            seen.setdefault(text)
  return tuple(seen)


@functools.lru_cache(maxsize=1)
def prose_tokens() -> tuple[np.ndarray, np.ndarray]:
  """The prose as one token stream (each paragraph: bos, bytes, eos) and each paragraph's start."""
  ids, starts = [], []
  for para in prose_paragraphs():
    starts.append(len(ids))
    ids += [BOS_ID] + _bytes(para) + [EOS_ID]
  return np.asarray(ids, np.int32), np.asarray(starts, np.int64)


# --- batches --------------------------------------------------------------------------------------

def to_batch(rows: Sequence[tuple[np.ndarray, np.ndarray]], seq_len: int) -> dict:
  """Rows right-padded into `{input_ids, attention_mask, labels}` [len(rows), seq_len]; labels
  are the ids at target positions and IGNORE elsewhere (train.lm.causal_lm_loss)."""
  b = len(rows)
  ids = np.full((b, seq_len), PAD_ID, np.int32)
  mask = np.zeros((b, seq_len), np.int32)
  labels = np.full((b, seq_len), IGNORE, np.int32)
  for i, (r_ids, r_target) in enumerate(rows):
    n = len(r_ids)
    ids[i, :n], mask[i, :n] = r_ids, 1
    labels[i, :n] = np.where(r_target, r_ids, IGNORE)
  return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _fill_rows(draw: Callable[[], tuple], batch_size: int, seq_len: int) -> list:
  """`batch_size` rows of whole examples from `draw()`, packed greedily (an example that does
  not fit the current row starts the next one)."""
  rows, ids, target, used = [], [], [], 0
  while len(rows) < batch_size:
    e_ids, e_target = draw()
    if len(e_ids) > seq_len:
      continue
    if used + len(e_ids) > seq_len:
      rows.append((np.concatenate(ids), np.concatenate(target)))
      ids, target, used = [], [], 0
    ids.append(e_ids)
    target.append(e_target)
    used += len(e_ids)
  return rows


def base_batch(position: int, batch_size: int, seq_len: int, *, seed: int,
               prose_fraction: float, multi_fraction: float) -> dict:
  """The base pre-training batch at example `position` (a pure function of its arguments).

  Each row is, with probability `prose_fraction`, a window of the prose stream starting at a
  paragraph; otherwise whole examples of the base skills (each example, with probability
  `multi_fraction`, of 2-3 segments), every token a target.
  """
  rng = np.random.default_rng([seed, position])
  skills = tuple(BASE_SKILLS)
  prose, starts = prose_tokens()

  def draw():
    n = int(rng.integers(2, 4)) if rng.random() < multi_fraction else 1
    segs = [draw_segment(skills[int(rng.integers(0, len(skills)))], rng) for _ in range(n)]
    return encode(segs)

  rows = []
  for _ in range(batch_size):
    if rng.random() < prose_fraction:
      start = int(starts[int(rng.integers(0, len(starts)))])
      window = prose[start:start + seq_len]
      rows.append((window, np.ones(len(window), bool)))
    else:
      rows.extend(_fill_rows(draw, 1, seq_len))
  return to_batch(rows, seq_len)


def task_batch(task: str, position: int, batch_size: int, seq_len: int, *, seed: int,
               multi_fraction: float, heldout_n: int = 256) -> dict:
  """A task LoRA's training batch at example `position` (a pure function of its arguments).

  Whole examples packed into rows; each example, with probability `multi_fraction`, holds the
  task's segment among one or two segments of other tasks (context, not trained on). No input
  is one of the first `heldout_n` held-out inputs of any task (`heldout_inputs`).
  """
  rng = np.random.default_rng([seed, TASKS.index(task), position])
  others = tuple(t for t in TASKS if t != task)

  def draw():
    segs = [draw_segment(task, rng, heldout_n)]
    if rng.random() < multi_fraction:
      for _ in range(int(rng.integers(1, 3))):
        segs.append(draw_segment(others[int(rng.integers(0, len(others)))], rng, heldout_n))
      rng.shuffle(segs)
    return encode(segs, targets=(task,))

  return to_batch(_fill_rows(draw, batch_size, seq_len), seq_len)


def eval_batch(examples: Sequence[Sequence[Segment]], seq_len: Optional[int] = None, *,
               task: Optional[str] = None) -> dict:
  """One example per row (at position 0, as in generation), right-padded to `seq_len` (default:
  the longest); labels mark the answer: `task`'s segments (tag, output, delimiter), or with
  `task=None` the whole answer (every segment, the delimiters and eos)."""
  encoded = [encode(segs, targets=(task,) if task else tuple({s.task for s in segs}))
             for segs in examples]
  return to_batch(encoded, seq_len or max(len(ids) for ids, _ in encoded))
