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
from jaxadapt import default
from jaxadapt import fact
from jaxadapt.adapters.combine import combine
from jaxadapt.adapters.lora import LoraAdapter, LoraConfig
from jaxadapt.context import Context
from jaxadapt.adapters.merge import merge, unmerge
from jaxadapt.causal_lm import CausalLM, load_model
from jaxadapt.diffusion.images import save_image_grid
from jaxadapt.diffusion.pipeline import load_pipeline
from jaxadapt.io.peft import load_adapter, save_adapter
from jaxadapt import meteora
from jaxadapt.meteora import load_meteora
from jaxadapt.models.clip import load_clip_text
from jaxadapt.models.dit import load_dit
from jaxadapt.models.unet import load_unet
from jaxadapt.models.vae import load_vae


def init_lora(model, config: LoraConfig, *, seed: int = 0, dtype="float32"):
  """A fresh LoRA adapter for any jaxadapt model, equal to the base (as PEFT: B = 0 on linear
  layers, A = 0 on embeddings and tied heads, which `config` may target by name)."""
  import jax
  from jaxadapt.adapters.lora import init_lora as _init
  return _init(model.params, model.linear_paths, config, jax.random.key(seed), dtype=dtype,
               extra_paths=getattr(model, "extra_lora_paths", ()))


__all__ = ["CausalLM", "Context", "combine", "default", "fact", "LoraAdapter", "LoraConfig", "init_lora", "load_adapter", "load_clip_text",
           "load_dit", "load_meteora", "load_model", "meteora", "load_pipeline", "load_unet", "load_vae", "merge",
           "save_adapter", "save_image_grid", "unmerge"]
