"""Command-line overrides for a frozen dataclass config (big_vision style, without absl).

Every field of the config is a flag, written any of these ways:
  --steps 20   --steps=20   --config.steps=20   --config.steps 20
`--config NAME` picks the base config: a module in `train/configs/` (`lora_tiny`) or a path to a
`.py` file with `get_config()`. Values are parsed by the field's type: ints, floats, bools
(true/false/1/0/yes/no), strings, `none` for an optional field, and comma-separated lists for
tuple fields. `--help` lists the fields with their defaults and comments.
"""
from __future__ import annotations

import dataclasses
import difflib
import importlib
import importlib.util
import inspect
import os
import re
import types
import typing
from typing import Any, Optional, Sequence

_TRUE = ("1", "true", "yes", "y", "on")
_FALSE = ("0", "false", "no", "n", "off")


class FlagError(ValueError):
  """A command line that does not fit the config: says what was given and what is expected."""


def load_config_module(name: str, package: str = "train.configs"):
  """`get_config()` of `train/configs/<name>.py`, or of a `.py` file at the path `name`."""
  if name.endswith(".py") or os.sep in name:
    if not os.path.exists(name):
      raise FlagError(f"--config {name}: no such file (expected a .py with get_config() or a "
                      f"module name in {package})")
    spec = importlib.util.spec_from_file_location(f"_config_{abs(hash(name))}", name)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
  else:
    try:
      module = importlib.import_module(f"{package}.{name}")
    except ModuleNotFoundError as e:
      raise FlagError(f"--config {name}: no module {package}.{name} ({e})") from None
  if not hasattr(module, "get_config"):
    raise FlagError(f"--config {name}: the module has no get_config()")
  return module.get_config()


def field_comments(cls) -> dict[str, str]:
  """The trailing `# comment` of each field in the class source (for --help)."""
  try:
    source = inspect.getsource(cls)
  except (OSError, TypeError):
    return {}
  out = {}
  for m in re.finditer(r"^\s+(\w+)\s*:[^#\n]*#\s*(.*)$", source, re.M):
    out.setdefault(m.group(1), m.group(2).strip())
  return out


def help_text(config) -> str:
  cls = type(config)
  comments = field_comments(cls)
  lines = [f"fields of {cls.__name__} (override with --name value or --config.name=value):"]
  for f in dataclasses.fields(cls):
    flag = f"--{f.name}={getattr(config, f.name)!r}"
    lines.append(f"  {flag:<34} {comments.get(f.name, '')}")
  return "\n".join(lines)


def _strip_optional(tp) -> tuple[Any, bool]:
  origin = typing.get_origin(tp)
  if origin in (typing.Union, types.UnionType):
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    optional = len(args) < len(typing.get_args(tp))
    return (args[0] if len(args) == 1 else typing.Union[tuple(args)]), optional
  return tp, False


def parse_value(name: str, tp, text: str):
  """`text` as a value of type `tp` (the field `name` is named in errors)."""
  tp, optional = _strip_optional(tp)
  if optional and text.lower() == "none":
    return None
  try:
    if tp is bool:
      if text.lower() in _TRUE:
        return True
      if text.lower() in _FALSE:
        return False
      raise ValueError(text)
    if tp is int:
      return int(text)
    if tp is float:
      return float(text)
    if tp is str:
      return text
    if tp is tuple or typing.get_origin(tp) is tuple:
      item = (typing.get_args(tp) or (str,))[0]
      item = str if item is Ellipsis else item
      return tuple(parse_value(name, item, t.strip()) for t in text.split(",") if t.strip())
    if typing.get_origin(tp) is typing.Union:  # e.g. Union[str, tuple]: the field parses itself
      return text
  except ValueError:
    raise FlagError(f"--{name}: cannot read {text!r} as {getattr(tp, '__name__', tp)}") from None
  return text


def split_config_flag(argv: Sequence[str]) -> tuple[Optional[str], list[str]]:
  """Pulls `--config NAME` / `--config=NAME` (no dot) out of argv."""
  rest, name = [], None
  argv = list(argv)
  i = 0
  while i < len(argv):
    arg = argv[i]
    if arg == "--config":
      if i + 1 >= len(argv):
        raise FlagError("--config needs a value: a module in train/configs or a .py path")
      name = argv[i + 1]
      i += 2
      continue
    if arg.startswith("--config="):
      name = arg[len("--config="):]
    else:
      rest.append(arg)
    i += 1
  return name, rest


def apply_overrides(config, argv: Sequence[str]):
  """A copy of the frozen dataclass `config` with the fields named in `argv` replaced."""
  cls = type(config)
  hints = typing.get_type_hints(cls)
  names = [f.name for f in dataclasses.fields(cls)]
  changes = {}
  argv = list(argv)
  i = 0
  while i < len(argv):
    arg = argv[i]
    if not arg.startswith("--"):
      raise FlagError(f"unexpected argument {arg!r}: flags look like --steps 20 or "
                      f"--config.steps=20")
    body = arg[2:]
    if "=" in body:
      key, value = body.split("=", 1)
      i += 1
    else:
      key = body
      has_value = i + 1 < len(argv) and not argv[i + 1].startswith("--")
      if has_value:
        value, i = argv[i + 1], i + 2
      elif hints.get(key.removeprefix("config.")) is bool:  # a bare --flag means true
        value, i = "true", i + 1
      else:
        raise FlagError(f"--{key} needs a value (--{key} VALUE or --{key}=VALUE)")
    key = key.removeprefix("config.")
    if key not in names:
      close = difflib.get_close_matches(key, names, n=3)
      raise FlagError(f"unknown flag --{key}; {cls.__name__} has fields {names}"
                      + (f" (did you mean {close}?)" if close else ""))
    changes[key] = parse_value(key, hints[key], value)
  return dataclasses.replace(config, **changes)


def config_from_argv(argv: Sequence[str], *, default: str, cls: type, doc: str):
  """A recipe's config from its command line: `--config NAME` (default `default`) with field
  overrides; `--help` prints `doc`'s first paragraph and the fields, then exits.

  Args:
    argv: the arguments after the program name.
    default: the config module used without `--config`.
    cls: the config class `get_config()` must return (e.g. `train.lora.TrainConfig`).
    doc: the recipe module's docstring.
  """
  name, rest = split_config_flag(argv)
  config = load_config_module(name or default)
  if not isinstance(config, cls):
    raise FlagError(f"--config {name}: get_config() returned {type(config).__name__}, "
                    f"expected {cls.__module__}.{cls.__qualname__}")
  if any(a in ("-h", "--help") for a in rest):
    print(doc.split("\n\n")[0] + "\n\n" + help_text(config))
    raise SystemExit(0)
  return apply_overrides(config, rest)
