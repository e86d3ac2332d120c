"""The `jaxadapt` command.

  jaxadapt demo [ARGS]          the embedded-default main job (`make demo`)
  jaxadapt train lora [ARGS]    LoRA fine-tuning (train/lora.py)
  jaxadapt info MODEL_DIR       what jaxadapt reads from a Hugging Face model dir
"""
from __future__ import annotations

import sys


def main(argv=None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  if not argv or argv[0] in ("-h", "--help"):
    print(__doc__)
    return 0
  cmd, rest = argv[0], argv[1:]
  if cmd == "demo":
    from jaxadapt import demo
    demo.main(rest)
    return 0
  if cmd == "train":
    if rest and rest[0] in ("-h", "--help"):
      print("usage: jaxadapt train lora [ARGS]   (jaxadapt train lora --help lists the ARGS)")
      return 0
    if not rest or rest[0] != "lora":
      print(f"jaxadapt train: expected a recipe name (lora), got {rest[:1]}", file=sys.stderr)
      return 2
    from train import lora
    return lora.main(rest[1:]) or 0
  if cmd == "info":
    if len(rest) != 1:
      print("usage: jaxadapt info MODEL_DIR", file=sys.stderr)
      return 2
    from jaxadapt.io.hf import read_config
    from jaxadapt.models.llama import LlamaConfig
    try:
      print(LlamaConfig.from_hf(read_config(rest[0])))
    except (ValueError, FileNotFoundError) as e:
      print(f"jaxadapt info: {e}", file=sys.stderr)
      return 1
    return 0
  print(f"jaxadapt: unknown command {cmd!r}\n{__doc__}", file=sys.stderr)
  return 2


if __name__ == "__main__":
  sys.exit(main())
