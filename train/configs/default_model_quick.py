"""A tiny rebuild of the default model: the whole pipeline in seconds (tests), not the accuracy.

Command:
  python -m train.default_model --quick --out /tmp/default_quick    # = --config default_model_quick

Takes about 15 s on 2 CPU cores (mostly compiling): a 1-layer, 32-wide base trained 20 steps and
the reverse adapter 5 steps, evaluated on 4 held-out prompts. Writes the same
files as the full build (model/, adapters/<task>/) and the report to OUT/default_model.md.

Expect: loadable files (jaxadapt, transformers, PEFT); accuracy near 0 (far too little training).
"""
from train.default_model import DefaultModelConfig


def get_config() -> DefaultModelConfig:
  return DefaultModelConfig(
      out="runs/default_model_quick", tasks=("reverse",), hidden_size=32,
      intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
      head_dim=16, base_steps=20, base_batch=8, base_warmup=2, lora_steps=5, lora_task_steps=(),
      lora_batch=8, lora_warmup=1, lora_r=4, lora_alpha=8.0, eval_examples=4, progress=False)
