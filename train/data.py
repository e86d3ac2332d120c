"""Causal-LM text data: a synthetic corpus, tokenization, and a resumable packed-batch stream.

The stream is a pure function of `(seed, position)`: the tokens are packed into `seq_len`
chunks, each epoch visits every chunk once in the order `permutation(seed, epoch)`, and the
batch at example position `p` holds examples `p .. p + batch_size - 1`. Resuming a run therefore
needs only the position (examples seen so far), which the checkpoint stores.
"""
from __future__ import annotations

import dataclasses
import functools
import os
from typing import Optional

import numpy as np

from jaxadapt.io.files import json_records

IGNORE = -100  # label of a position that is not trained on (padding), as transformers


def synthetic_corpus(num_docs: int = 2000, seed: int = 0) -> str:
  """A small corpus of learnable patterns, one document per line.

  Four kinds of lines: counting runs (`count: 17 18 19 20`), sums (`sum: 3 + 4 = 7`), alphabet
  runs (`abc: f g h i`) and echoes (`echo: kqz kqz kqz`). Everything after the first few tokens of
  a line is predictable, so a model's next-token loss falls well below the unigram entropy.
  """
  if num_docs < 1:
    raise ValueError(f"num_docs must be >= 1, got {num_docs}")
  rng = np.random.default_rng(seed)
  letters = "abcdefghijklmnopqrstuvwxyz"
  lines = []
  for _ in range(num_docs):
    kind = rng.integers(4)
    if kind == 0:
      start = int(rng.integers(0, 90))
      lines.append("count: " + " ".join(str(start + i) for i in range(int(rng.integers(4, 9)))))
    elif kind == 1:
      a, b = (int(v) for v in rng.integers(0, 50, size=2))
      lines.append(f"sum: {a} + {b} = {a + b}")
    elif kind == 2:
      start = int(rng.integers(0, 18))
      lines.append("abc: " + " ".join(letters[start:start + int(rng.integers(4, 9))]))
    else:
      word = "".join(rng.choice(list(letters), size=int(rng.integers(2, 5))))
      lines.append("echo: " + " ".join([word] * int(rng.integers(3, 6))))
  return "\n".join(lines) + "\n"


def has_tokenizer(model_dir: Optional[str]) -> bool:
  names = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")
  return model_dir is not None and any(os.path.exists(os.path.join(model_dir, n)) for n in names)


def read_json_documents(path: str, text_field: str = "text") -> list[str]:
  """The documents of a `.jsonl` file (one JSON object per line) or a `.json` file (a list of
  objects): the string at `text_field` of each, as in Hugging Face datasets' text column.

  Raises:
    ValueError: naming the file, the line or item, what was expected and what was found.
  """
  with open(path, encoding="utf-8") as f:
    raw = f.read()
  items = json_records(path, raw, f"objects with a {text_field!r} field")
  docs = []
  for where, item in items:
    if not isinstance(item, dict) or text_field not in item:
      found = sorted(item) if isinstance(item, dict) else type(item).__name__
      raise ValueError(f"{path}: {where} has no {text_field!r} field (found {found}); set "
                       f"text_field to the field that holds the text")
    if not isinstance(item[text_field], str):
      raise ValueError(f"{path}: {where}: {text_field!r} must be a string, found "
                       f"{type(item[text_field]).__name__}")
    docs.append(item[text_field])
  return docs


def tokenize(text: str, model_dir: Optional[str] = None) -> np.ndarray:
  """Token ids [N] of `text`, one document per non-empty line (see `tokenize_documents`)."""
  if not has_tokenizer(model_dir):
    return np.frombuffer(text.encode("utf-8"), np.uint8).astype(np.int32)
  return tokenize_documents([line for line in text.splitlines() if line.strip()], model_dir)


def tokenize_documents(docs: list[str], model_dir: Optional[str] = None) -> np.ndarray:
  """Token ids [N] of `docs`: by the tokenizer in `model_dir` if it has one, else UTF-8 bytes.

  With a tokenizer, each document gives its tokens (with the tokenizer's special tokens, e.g.
  BOS) followed by EOS when the tokenizer has one. Without, the documents are joined by newlines
  (each ends with one) and read as bytes.
  """
  if not has_tokenizer(model_dir):
    text = "".join(d if d.endswith("\n") else d + "\n" for d in docs)
    return np.frombuffer(text.encode("utf-8"), np.uint8).astype(np.int32)
  from transformers import AutoTokenizer
  tok = AutoTokenizer.from_pretrained(model_dir)
  ids: list[int] = []
  for doc in docs:
    if doc.strip():
      ids.extend(tok(doc)["input_ids"])
      if tok.eos_token_id is not None:
        ids.append(tok.eos_token_id)
  return np.asarray(ids, np.int32)


def pack(tokens: np.ndarray, seq_len: int, pad_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """Packs [N] tokens into chunks: (ids [C, seq_len], mask [C, seq_len]); the last chunk padded."""
  if seq_len < 2:
    raise ValueError(f"seq_len must be >= 2 (next-token prediction), got {seq_len}")
  tokens = np.asarray(tokens, np.int32)
  if tokens.ndim != 1 or tokens.size < 2:
    raise ValueError(f"need at least 2 tokens of data, got shape {tokens.shape}")
  chunks = -(-tokens.size // seq_len)
  ids = np.full(chunks * seq_len, pad_id, np.int32)
  ids[:tokens.size] = tokens
  mask = np.zeros(chunks * seq_len, np.int32)
  mask[:tokens.size] = 1
  return ids.reshape(chunks, seq_len), mask.reshape(chunks, seq_len)


@dataclasses.dataclass(frozen=True)
class PackedStream:
  """Deterministic, resumable batches over packed chunks (see module docstring)."""
  ids: np.ndarray    # [C, S] int32
  mask: np.ndarray   # [C, S] int32, 1 = real token
  seed: int

  @property
  def num_chunks(self) -> int:
    return int(self.ids.shape[0])

  @functools.lru_cache(maxsize=4)
  def order(self, epoch: int) -> np.ndarray:
    """Chunk order of `epoch`: a permutation drawn from (seed, epoch) alone."""
    return np.random.default_rng((self.seed, epoch)).permutation(self.num_chunks)

  def example_indices(self, position: int, batch_size: int) -> np.ndarray:
    """Chunk indices of examples `position .. position + batch_size - 1`."""
    n = self.num_chunks
    return np.asarray([self.order(i // n)[i % n] for i in range(position, position + batch_size)])

  def batch(self, position: int, batch_size: int) -> dict[str, np.ndarray]:
    """The batch starting at example `position`: input_ids, attention_mask, labels ([B, S])."""
    idx = self.example_indices(position, batch_size)
    ids, mask = self.ids[idx], self.mask[idx]
    return {"input_ids": ids, "attention_mask": mask,
            "labels": np.where(mask == 1, ids, IGNORE).astype(np.int32)}

  def __hash__(self):  # lru_cache on a method needs a hashable self: identity is enough
    return id(self)

  def __eq__(self, other):
    return self is other
