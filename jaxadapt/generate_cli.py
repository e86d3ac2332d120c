"""`jaxadapt generate`: text generation from the command line.

  jaxadapt generate --model default --use reverse "[reverse] hello"
  jaxadapt generate --model DIR --adapter sql=ADAPTER_DIR --use sql "prompt" --max-new-tokens 64
  jaxadapt generate --model FILE.gguf --chat "What is 2 + 2?"
  jaxadapt generate --model default --adapter r=default:reverse --adapter u=default:upper \\
      --use r --use u "[reverse] abc" "[upper] abc"       # one mixed batch, an adapter per prompt

Each prompt's new text is printed on its own (or, with --json, one JSON object per prompt with
its text, token ids and finish reason). With `--model default`, `--use TASK` names the embedded
default's task adapters without an --adapter.
"""
from __future__ import annotations

import argparse
import json
import sys


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="jaxadapt generate", description=__doc__.split("\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter,
                              epilog=__doc__.split("\n", 2)[2])
  p.add_argument("prompts", nargs="+", help="prompt texts (one row of the batch each)")
  p.add_argument("--model", required=True,
                 help="a Hugging Face model dir, a .gguf file or 'default' (the embedded model)")
  p.add_argument("--adapter", action="append", default=[], metavar="NAME=DIR",
                 help="a PEFT adapter dir (or default:TASK) under a name; repeatable")
  p.add_argument("--use", action="append", default=[], metavar="NAME",
                 help="the adapter of each prompt (one for all, or one per prompt; 'base' = "
                      "none); default: the only --adapter, if one is given")
  p.add_argument("--max-new-tokens", type=int, default=64)
  p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
  p.add_argument("--top-k", type=int, default=0)
  p.add_argument("--top-p", type=float, default=1.0)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--stop", action="append", default=[], help="a stop string; repeatable")
  p.add_argument("--chat", action="store_true",
                 help="wrap each prompt as a user message in the tokenizer's chat template")
  p.add_argument("--dtype", default="float32")
  p.add_argument("--json", action="store_true", help="one JSON object per prompt")
  return p


class UsageError(ValueError):
  """A command line that does not fit (the message says what was expected)."""


def _adapters(args) -> tuple[list[str], dict]:
  named = {}
  for item in args.adapter:
    name, sep, path = item.partition("=")
    if not sep or not name or not path:
      raise UsageError(f"--adapter takes NAME=DIR, got {item!r}")
    if name == "base" or name in named:
      raise UsageError(f"--adapter name {name!r} is {'reserved' if name == 'base' else 'given twice'}")
    named[name] = path
  use = list(args.use)
  if not use:
    use = [next(iter(named))] if len(named) == 1 else ["base"]
  if len(use) not in (1, len(args.prompts)):
    raise UsageError(f"--use takes one adapter for every prompt or one per prompt "
                     f"({len(args.prompts)}); got {len(use)}")
  for name in use:
    if name != "base" and name not in named:
      if args.model == "default":
        named[name] = f"default:{name}"
      else:
        raise UsageError(f"--use {name!r} names no --adapter (given: {sorted(named) or 'none'})")
  if len(use) == 1:
    use = use * len(args.prompts)
  return use, named


def run(argv) -> int:
  args = _parser().parse_args(argv)
  import jaxadapt as ja
  try:
    use, named = _adapters(args)
    model = ja.load_model(args.model, dtype=args.dtype)
    loaded = {name: ja.load_adapter(path, dtype=args.dtype) for name, path in named.items()
              if name in use}
    prompts = list(args.prompts)
    if args.chat:
      tok = model.tokenizer
      if tok is None or not getattr(tok, "chat_template", None):
        raise UsageError(f"--chat needs a tokenizer with a chat template; {args.model} has "
                         f"{'no tokenizer' if tok is None else 'no chat template'}")
      # Token ids straight from the template (it places its own special tokens).
      prompts = [list(tok.apply_chat_template([{"role": "user", "content": p}], tokenize=True,
                                              add_generation_prompt=True, return_dict=False))
                 for p in prompts]
    names = sorted(loaded)
    kwargs = {}
    if len(set(use)) == 1 and use[0] != "base":
      kwargs["adapter"] = loaded[use[0]]
    elif names:
      kwargs["adapters"] = [loaded[n] for n in names]
      kwargs["adapter_ids"] = [-1 if n == "base" else names.index(n) for n in use]
    out = model.generate(prompts, max_new_tokens=args.max_new_tokens,
                         temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                         seed=args.seed, stop=args.stop or None, **kwargs)
  except (ValueError, TypeError, OSError, NotImplementedError) as e:
    print(f"jaxadapt generate: {e}", file=sys.stderr)
    return 2 if isinstance(e, UsageError) else 1
  for i, name in enumerate(use):
    if args.json:
      print(json.dumps({"prompt": args.prompts[i], "adapter": name, "text": out.text[i],
                        "ids": out.ids[i], "finish_reason": out.finish_reasons[i]}))
    else:
      print(out.text[i])
  return 0
