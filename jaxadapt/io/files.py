"""Checks shared by the loaders: JSON files that must hold an object, and floating dtypes."""
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
