"""jaxadapt: adapters on frozen JAX/Flax models.

```python
import jaxadapt as ja
model = ja.load_model("hf_model_dir", dtype="float32")
adapter = ja.load_adapter("peft_adapter_dir")
logits = model(input_ids, adapter=adapter)
logits = model(input_ids, adapters=[a0, a1], adapter_ids=[0, 1, -1])
merged = ja.merge(model, adapter)
ja.save_adapter(adapter, "out_dir")
```
"""
from jaxadapt.adapters.lora import LoraAdapter, LoraConfig
from jaxadapt.causal_lm import CausalLM, load_model, merge, unmerge
from jaxadapt.io.peft import load_adapter, save_adapter


def init_lora(model: CausalLM, config: LoraConfig, *, seed: int = 0, dtype="float32"):
  """A fresh LoRA adapter for `model` (B = 0, so the adapted model starts equal to the base)."""
  import jax
  from jaxadapt.adapters.lora import init_lora as _init
  return _init(model.params, model.linear_paths, config, jax.random.key(seed), dtype=dtype)


__all__ = ["CausalLM", "LoraAdapter", "LoraConfig", "init_lora", "load_adapter", "load_model",
           "merge", "save_adapter", "unmerge"]
