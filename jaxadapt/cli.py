"""The `jaxadapt` command.

  jaxadapt demo [ARGS]          the embedded-default main job (`make demo`)
  jaxadapt generate --model M [--adapter NAME=DIR] [--use NAME] PROMPT...
                                text generation (jaxadapt generate --help)
  jaxadapt serve [--model M] [--adapter NAME=DIR] [--adapter-dir DIR] [--api-key KEY] ...
                                the OpenAI-compatible server over the S-LoRA engine
                                (serve/api.py; jaxadapt serve --help)
  jaxadapt train lora [ARGS]    LoRA fine-tuning (train/lora.py)
  jaxadapt train pretrain [ARGS]  full-parameter training of a small base (train/pretrain.py)
  jaxadapt train meteora [ARGS]   MeteoRA gate training + evaluation (train/meteora.py)
  jaxadapt train agd [collect|train|eval] [ARGS]  AGD: CFG trajectories, guidance adapters,
                                the digits reproduction (train/agd.py)
  jaxadapt train muscle [ARGS]  MUSCLE: task LoRAs on two model versions and the compatibility
                                adapter (train/muscle.py)
  jaxadapt train fact [ARGS]    FaceChain-FACT: base, face encoder and face adapters on
                                synthetic faces, the reproduction (train/fact.py)
  jaxadapt compat --old MODEL[:ADAPTER] --new MODEL[:ADAPTER] --data FILE [--json] ...
                                MUSCLE compatibility of two model versions: accuracy, negative
                                and positive flips, per category (jaxadapt compat --help)
  jaxadapt info DIR             what jaxadapt reads from a dir: a Hugging Face model (Llama,
                                Mistral, Qwen2, CLIP text), a PEFT LoRA adapter, a diffusers
                                pipeline (model_index.json) or one diffusers model (UNet, DiT, VAE)
"""
from __future__ import annotations

import os
import sys

# Modules of train/ with a main(argv).
TRAIN_RECIPES = ("lora", "pretrain", "meteora", "agd", "muscle", "fact")

INFO_USAGE = "usage: jaxadapt info DIR   (a model, PEFT adapter or diffusers pipeline dir)"
_EXPECTED = ("a model dir (config.json), a PEFT adapter dir (adapter_config.json) or a diffusers "
             "pipeline dir (model_index.json)")


def _weight_files(directory: str) -> str:
  names = sorted(n for n in os.listdir(directory) if n.endswith(".safetensors"))
  return f"weights: {', '.join(names)}" if names else "weights: no .safetensors file found"


def _describe_model(directory: str) -> list[str]:
  """Lines describing the model in `directory` (a dir with config.json), as jaxadapt reads it."""
  from jaxadapt.io.hf import read_config
  cfg = read_config(directory)
  name = cfg.get("_class_name")
  if name == "UNet2DConditionModel":
    from jaxadapt.models.unet import UNetConfig
    kind, loader, config = "diffusers U-Net", "ja.load_unet", UNetConfig.from_config(cfg)
  elif name in ("DiTTransformer2DModel", "Transformer2DModel"):
    from jaxadapt.models.dit import DiTConfig
    kind, loader, config = "diffusers DiT", "ja.load_dit", DiTConfig.from_config(cfg)
  elif name == "AutoencoderKL":
    from jaxadapt.models.vae import VAEConfig
    kind, loader, config = "diffusers VAE", "ja.load_vae", VAEConfig.from_config(cfg)
  elif name is not None:
    raise ValueError(f"{directory}: config.json describes a diffusers {name}; jaxadapt reads "
                     f"UNet2DConditionModel, DiTTransformer2DModel and AutoencoderKL dirs")
  elif cfg.get("model_type") in ("clip", "clip_text_model"):
    from jaxadapt.models.clip import CLIPTextConfig
    kind, loader, config = "CLIP text encoder", "ja.load_clip_text", CLIPTextConfig.from_config(cfg)
  else:
    from jaxadapt.models.llama import LlamaConfig
    config = LlamaConfig.from_hf(cfg)
    kind, loader = f"causal LM ({config.model_type})", "ja.load_model"
  return [f"{directory}: {kind}, loads with {loader}", f"  {config}", f"  {_weight_files(directory)}"]


def _describe_adapter(directory: str) -> list[str]:
  from jaxadapt.io.peft import read_peft_config
  config = read_peft_config(directory)
  return [f"{directory}: PEFT LoRA adapter, loads with ja.load_adapter", f"  {config}",
          f"  {_weight_files(directory)}"]


def _describe_pipeline(directory: str) -> list[str]:
  from jaxadapt.io.files import read_json_object
  index = read_json_object(os.path.join(directory, "model_index.json"),
                           "a diffusers pipeline index (_class_name and its components)")
  name = index.get("_class_name")
  if not (name == "DiTPipeline" or (isinstance(name, str) and name.startswith("StableDiffusion")
                                    and "XL" not in name)):
    raise ValueError(f"{directory}: model_index.json names {name!r}; ja.load_pipeline reads "
                     f"StableDiffusionPipeline (1.x / 2.x) and DiTPipeline dirs")
  lines = [f"{directory}: diffusers {name}, loads with ja.load_pipeline"]
  for part in sorted(k for k, v in index.items() if not k.startswith("_") and isinstance(v, list)
                     and len(v) == 2 and v[1] is not None):
    sub = os.path.join(directory, part)
    if not os.path.isdir(sub):
      raise FileNotFoundError(f"{directory}: model_index.json names component {part!r} but "
                              f"{part}/ is missing")
    if os.path.exists(os.path.join(sub, "config.json")):
      lines += ["  " + line for line in _describe_model(sub)]
    else:
      lines.append(f"  {sub}: {index[part][1]} (files {sorted(os.listdir(sub))})")
  return lines


def info(directory: str) -> list[str]:
  """What jaxadapt reads from `directory`, as lines of text.

  Raises:
    FileNotFoundError: no such dir, a file, or a dir with none of the files jaxadapt reads (other
      OSErrors pass through from unreadable files).
    ValueError, NotImplementedError: a config jaxadapt cannot load (the message says why).
  """
  directory = os.fspath(directory)
  if not os.path.isdir(directory):
    found = "a file" if os.path.exists(directory) else "no such directory"
    raise FileNotFoundError(f"{directory}: expected {_EXPECTED}; found {found}")
  has = set(os.listdir(directory))
  if "adapter_config.json" in has:
    return _describe_adapter(directory)
  if "model_index.json" in has:
    return _describe_pipeline(directory)
  if "config.json" in has:
    return _describe_model(directory)
  raise FileNotFoundError(f"{directory}: expected {_EXPECTED}; found {sorted(has)[:20]}")


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
  if cmd == "generate":
    from jaxadapt import generate_cli
    return generate_cli.run(rest)
  if cmd == "compat":
    from jaxadapt import compat
    return compat.main(rest)
  if cmd == "serve":
    from serve import api
    return api.main(rest)
  if cmd == "train":
    if rest and rest[0] in ("-h", "--help"):
      print(f"usage: jaxadapt train {{{','.join(TRAIN_RECIPES)}}} [ARGS]   (jaxadapt train lora "
            f"--help lists the ARGS)")
      return 0
    if not rest or rest[0] not in TRAIN_RECIPES:
      print(f"jaxadapt train: expected a recipe name ({', '.join(TRAIN_RECIPES)}), got "
            f"{rest[:1]}", file=sys.stderr)
      return 2
    import importlib
    return importlib.import_module(f"train.{rest[0]}").main(rest[1:]) or 0
  if cmd == "info":
    if rest in (["-h"], ["--help"]):
      print(INFO_USAGE)
      return 0
    if len(rest) != 1:
      print(f"{INFO_USAGE}\njaxadapt info: expected one DIR, got {len(rest)} arguments {rest}",
            file=sys.stderr)
      return 2
    try:
      print("\n".join(info(rest[0])))
    except (ValueError, OSError, NotImplementedError) as e:  # OSError: unreadable files
      print(f"jaxadapt info: {e}", file=sys.stderr)
      return 1
    return 0
  print(f"jaxadapt: unknown command {cmd!r}\n{__doc__}", file=sys.stderr)
  return 2


if __name__ == "__main__":
  sys.exit(main())
