"""A tiny random Llama that carries the default model's byte tokenizer and chat template, and
PEFT adapters for it: servers in tests generate and compile cheaply with text prompts and chat."""
import copy
import shutil

import torch

from jaxadapt import default


def tiny_model_with_tokenizer(directory, hf_model_maker, seed: int = 5):
  """Saves the tiny Llama (2 layers, vocab 264, a 64-token context) with the default's tokenizer
  files in `directory`; returns the transformers model."""
  hf = hf_model_maker("llama", str(directory), seed=seed, vocab_size=264,
                      max_position_embeddings=64, bos_token_id=257, eos_token_id=258,
                      pad_token_id=256)
  for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
    shutil.copy(f"{default.model_dir()}/{name}", f"{directory}/{name}")
  return hf


def save_lora(hf, directory, seed: int) -> None:
  """A rank-4 PEFT LoRA on q/v with random (non-zero) B, saved in `directory`."""
  from peft import LoraConfig, get_peft_model
  torch.manual_seed(seed)
  peft = get_peft_model(copy.deepcopy(hf), LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                      init_lora_weights=False))
  peft.save_pretrained(str(directory))
