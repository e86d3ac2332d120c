"""The embedded default: a small byte-level Llama trained in this repo, and its task LoRAs.

```python
import jaxadapt as ja
model = ja.load_model("default")                 # jaxadapt/default/model (a Hugging Face dir)
adapter = ja.load_adapter("default:reverse")     # jaxadapt/default/adapters/reverse (PEFT)
model.generate(ja.default.prompt("reverse", "hello"), adapter=adapter).text[0]
# '[reverse] olleh'
```

The task format (see docs/default_model.md): a prompt is one or more segments `[task] input`
joined by spaces and ended by a newline; the answer restates each segment's tag with its
output, joined by spaces, then eos:

    [reverse] hello [upper] world\\n   ->   [reverse] olleh [upper] WORLD<eos>

Inputs never hold `[`, so a prompt splits into its segments at `" ["`. Every file here is
rebuilt from scratch by `python -m train.default_model` (the inputs it trains on are drawn in
`train/tasks.py`; each task's oracle is `answer` here).
"""
from __future__ import annotations

import os

# The task adapters, in the order of docs/default_model.md. Each adapter turns the segments
# tagged `[<task>]` into their answers.
TASKS = ("reverse", "sort", "upper", "rot13", "count", "max", "dedupe", "swapcase")

# What each task does, for users (help texts, demos, the docs' table).
DESCRIPTIONS = {
    "reverse": "the letters in reverse order: hello -> olleh",
    "sort": "the letters sorted: hello -> ehllo",
    "upper": "upper case: hello world -> HELLO WORLD",
    "rot13": "each letter moved 13 places along the alphabet: hello -> uryyb",
    "count": "how many letters: hello -> 5",
    "max": "the largest digit: 38251 -> 8",
    "dedupe": "the words without repeats, first occurrences kept: cat dog cat -> cat dog",
    "swapcase": "each letter's case swapped: HeLLo -> hEllO",
}

_HERE = os.path.dirname(os.path.abspath(__file__))

_LOWER = "abcdefghijklmnopqrstuvwxyz"
_ROT13 = str.maketrans(_LOWER + _LOWER.upper(),
                       _LOWER[13:] + _LOWER[:13] + _LOWER.upper()[13:] + _LOWER.upper()[:13])

# Each task's oracle: input -> output (the one definition; train/tasks.py trains on it).
SOLVERS = {
    "reverse": lambda s: s[::-1],
    "sort": lambda s: "".join(sorted(s)),
    "upper": str.upper,
    "rot13": lambda s: s.translate(_ROT13),
    "count": lambda s: str(len(s)),
    "max": max,
    "dedupe": lambda s: " ".join(dict.fromkeys(s.split(" "))),
    "swapcase": str.swapcase,
}


def answer(task: str, text: str) -> str:
  """What `task` makes of `text` (the oracle): `answer("reverse", "hello") == "olleh"`.

  Raises:
    ValueError: an unknown task (the message lists them).
  """
  if task not in SOLVERS:
    raise ValueError(f"unknown task {task!r}; the default model's tasks are {', '.join(TASKS)}")
  return SOLVERS[task](text)


# The embedded model versions: the default (v1) and its retrained successor (v2: deeper, trained
# longer from another seed; `python -m train.default_model --config default_model_v2`). Both
# read the same byte-level tokenizer, so their logits compare token for token (MUSCLE).
VERSIONS = {"default": _HERE, "default-v2": os.path.join(_HERE, "v2")}


def _version_dir(name: str) -> str:
  if name not in VERSIONS:
    raise ValueError(f"unknown embedded model {name!r}; the embedded models are "
                     f"{', '.join(VERSIONS)}")
  return VERSIONS[name]


def _rebuild_command(name: str) -> str:
  return ("python -m train.default_model" if name == "default" else
          "python -m train.default_model --config default_model_v2")


def model_dir(name: str = "default") -> str:
  """The Hugging Face dir (config.json, model.safetensors, tokenizer) of an embedded model:
  "default" (v1) or "default-v2" (its successor).

  Raises:
    ValueError: an unknown name.
    FileNotFoundError: the package was installed without its data files.
  """
  path = os.path.join(_version_dir(name), "model")
  if not os.path.isfile(os.path.join(path, "config.json")):
    raise FileNotFoundError(
        f"{path}: the embedded model {name!r} is missing (no config.json). The package data "
        f"of jaxadapt/default/ was not installed; reinstall jaxadapt, or rebuild the files "
        f"with `{_rebuild_command(name)}`.")
  return path


def meteora_dir() -> str:
  """The shipped MeteoRA gates over the default model's task adapters (`jaxadapt.meteora`;
  written by `python -m train.meteora --config train/configs/meteora_default.py`).

  Raises:
    FileNotFoundError: the package was installed without its data files.
  """
  path = os.path.join(_HERE, "meteora")
  if not os.path.isfile(os.path.join(path, "meteora_config.json")):
    raise FileNotFoundError(
        f"{path}: the default MeteoRA gates are missing (no meteora_config.json). Reinstall "
        f"jaxadapt, or rebuild them with `python -m train.meteora`.")
  return path


def adapter_dir(task: str, name: str = "default") -> str:
  """The PEFT dir of an embedded model's adapter for `task` (one of `TASKS`); `name` is
  "default" or "default-v2" (whose adapters are trained the same way on the v2 base).

  Raises:
    ValueError: `task` is not one of `TASKS`, or an unknown model name (the message lists them).
    FileNotFoundError: the package was installed without its data files.
  """
  root = _version_dir(name)
  if task not in TASKS:
    raise ValueError(f"the {name} model has no adapter {task!r}; its task adapters are "
                     f"{', '.join(TASKS)} (load one as '{name}:<task>', e.g. '{name}:reverse')")
  path = os.path.join(root, "adapters", task)
  if not os.path.isfile(os.path.join(path, "adapter_config.json")):
    raise FileNotFoundError(
        f"{path}: the {name} model's {task!r} adapter is missing (no adapter_config.json). "
        f"Reinstall jaxadapt, or rebuild the files with `{_rebuild_command(name)}`.")
  return path


def resolve_adapter(spec: str):
  """The PEFT dir that `"default:<task>"` or `"default-v2:<task>"` names, or None when `spec`
  names no embedded adapter (a path).

  Raises:
    ValueError, FileNotFoundError: as `adapter_dir` (an embedded name with an unknown task).
  """
  name, sep, task = str(spec).partition(":")
  if not sep or name not in VERSIONS:
    return None
  return adapter_dir(task, name)


def prompt(*segments: str) -> str:
  """The prompt text of one or more task segments: `prompt("reverse", "hello")` or
  `prompt(("reverse", "hello"), ("upper", "world"))` -> `"[reverse] hello [upper] world\\n"`.

  The tokenizer adds the bos token; the model answers `"[reverse] olleh [upper] WORLD"` + eos.

  Raises:
    ValueError: an unknown task, or an input that holds `[` or a newline (they delimit
      segments and the prompt).
  """
  if len(segments) == 2 and all(isinstance(s, str) for s in segments):
    segments = (tuple(segments),)
  parts = []
  for seg in segments:
    if not (isinstance(seg, (tuple, list)) and len(seg) == 2):
      raise ValueError(f"a segment is (task, input), e.g. ('reverse', 'hello'); got {seg!r}")
    task, text = seg
    if task not in TASKS:
      raise ValueError(f"unknown task {task!r}; the default model's tasks are {', '.join(TASKS)}")
    if "[" in text or "\n" in text:
      raise ValueError(f"the input of a segment cannot hold '[' or a newline (they delimit "
                       f"segments and the prompt); got {text!r}")
    parts.append(f"[{task}] {text}")
  if not parts:
    raise ValueError("prompt needs at least one (task, input) segment")
  return " ".join(parts) + "\n"
