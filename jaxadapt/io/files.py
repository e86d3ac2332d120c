"""Checks shared by the loaders: JSON files that must hold an object or records, and floating
dtypes."""
from __future__ import annotations

import json

import jax.numpy as jnp


def read_json_object(path: str, expected: str) -> dict:
  """The JSON object stored at `path`.

  Args:
    path: a JSON file.
    expected: what the object should hold, for the error message (e.g. "the model's config").

  Raises:
    ValueError: the file is not JSON, or holds something other than an object.
  """
  try:
    with open(path, encoding="utf-8") as f:  # JSON is UTF-8 (RFC 8259), whatever the locale
      cfg = json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise ValueError(f"{path} is not valid JSON ({e}); expected {expected}") from None
  if not isinstance(cfg, dict):
    raise ValueError(  # noqa: TRY004 (a bad file: a bad value, not a bad argument type)
        f"{path} holds a JSON {type(cfg).__name__}, expected an object: {expected}")
  return cfg


def json_records(path: str, text: str, what: str, *, item: str = "item") -> list[tuple[str, object]]:
  """The records of a .jsonl text (one JSON value a line, blank lines skipped) or, for any other
  `path`, a .json text holding a list: `(where, value)` pairs, `where` = "line N" (1-based) or
  f"{item} i" (0-based), for the callers' messages about single records.

  Args:
    path: the file the text came from (its extension picks the format; named in messages).
    text: the file's content.
    what: what the records are, for messages ("objects with a 'text' field").
    item: the word for a list element in `where`.

  Raises:
    ValueError: a line that is not JSON, a .json text that is not JSON or not a list; the
      message names the file (and line), what was expected and what was found.
  """
  if path.lower().endswith(".jsonl"):
    out = []
    for number, line in enumerate(text.splitlines(), 1):
      if not line.strip():
        continue
      try:
        out.append((f"line {number}", json.loads(line)))
      except json.JSONDecodeError as e:
        raise ValueError(f"{path}: line {number} is not JSON ({e.msg}); expected one JSON object "
                         f"per line, found {line[:60]!r}") from None
    return out
  try:
    value = json.loads(text)
  except json.JSONDecodeError as e:
    raise ValueError(f"{path}: not JSON ({e.msg} at line {e.lineno}); expected a JSON list of "
                     f"{what}") from None
  if not isinstance(value, list):
    raise ValueError(f"{path}: expected a JSON list of {what}, found a {type(value).__name__}")
  return [(f"{item} {i}", v) for i, v in enumerate(value)]


def float_dtype(dtype) -> jnp.dtype:
  """`dtype` as a jnp dtype; ValueError unless it is a floating one."""
  try:
    dt = jnp.dtype(dtype)
  except TypeError:
    dt = None
  if dt is None or not jnp.issubdtype(dt, jnp.floating):
    raise ValueError(f"dtype must be a floating dtype such as 'float32' or 'bfloat16', got "
                     f"{dtype!r}")
  return dt


def save_module_dir(directory: str, tensors: dict, config_json: dict, *, config_file: str,
                    weights_file: str, fmt: str) -> None:
  """Writes an adapter module's dir (AGD, FACT): `config_file` (JSON) and `weights_file`
  (float32 safetensors of the flat `{name: array}`, with `format` metadata `fmt`)."""
  import os

  import numpy as np
  from safetensors.numpy import save_file
  os.makedirs(directory, exist_ok=True)
  save_file({k: np.array(v, np.float32, order="C") for k, v in tensors.items()},
            os.path.join(directory, weights_file), metadata={"format": fmt})
  with open(os.path.join(directory, config_file), "w") as f:
    json.dump(config_json, f, indent=2)


def read_module_dir(directory: str, *, config_file: str, weights_file: str, what: str,
                    writer: str) -> tuple[dict, dict, str, str]:
  """Reads what `save_module_dir` wrote: (config JSON, flat tensors, config path, weights path).

  Raises:
    FileNotFoundError: a file is missing (the message names `what` and its `writer`).
    ValueError: the config is not a JSON object.
  """
  import os

  from safetensors.numpy import load_file
  cfg_path, w_path = (os.path.join(directory, n) for n in (config_file, weights_file))
  for path in (cfg_path, w_path):
    if not os.path.exists(path):
      raise FileNotFoundError(f"{directory}: no {what} here (expected {config_file} and "
                              f"{weights_file}, as `{writer}` writes); missing {path}")
  return read_json_object(cfg_path, what), load_file(w_path), cfg_path, w_path
