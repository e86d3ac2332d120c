"""A Stable Diffusion pipeline's LoRA file, every component at once.

diffusers' ``StableDiffusionPipeline.save_lora_weights`` writes one
``pytorch_lora_weights.safetensors`` with keys ``unet.<module>.lora_A.weight`` and
``text_encoder.text_model.<module>.lora_A.weight`` (transformers' ``CLIPTextModel`` names),
and a ``lora_adapter_metadata`` entry with each component's PEFT config. ``load_pipeline_lora``
reads each component as a ``LoraAdapter`` keyed by the pipeline's component name, the text
encoder's paths in jaxadapt's CLIP names (``encoder.layers.0.self_attn.q_proj``).
"""

from __future__ import annotations

import os

from jaxadapt.adapters.lora import LoraAdapter
from jaxadapt.io.peft import DIFFUSERS_LORA_FILE, load_adapter
from jaxadapt.io.safetensors_mmap import SafetensorsFile

# The components of a Stable Diffusion 1.x / 2.x pipeline that take a LoRA.
SD_LORA_COMPONENTS = ("unet", "text_encoder")


def load_pipeline_lora(path: str | os.PathLike, *, dtype="float32") -> dict[str, LoraAdapter]:
  """Every component's LoRA of a diffusers pipeline LoRA file.

  Args:
    path: a ``pytorch_lora_weights.safetensors`` (as ``save_lora_weights`` writes it) or the
      folder holding one.
    dtype: floating dtype of the loaded weights.

  Returns:
    {component: LoraAdapter} for the components the file has ("unet", "text_encoder"); the
    text encoder's paths are jaxadapt's CLIP paths.

  Raises:
    FileNotFoundError: no such file.
    ValueError: the file holds a component a Stable Diffusion pipeline does not have (e.g.
      "text_encoder_2" of SDXL), or none.
  """
  from jaxadapt.models.clip import adapter_for_clip

  path = os.fspath(path)
  st_path = path if path.endswith(".safetensors") else os.path.join(path, DIFFUSERS_LORA_FILE)
  if not os.path.isfile(st_path):
    found = sorted(os.listdir(path)) if os.path.isdir(path) else "no such file or directory"
    raise FileNotFoundError(f"{path}: expected a diffusers LoRA file ({DIFFUSERS_LORA_FILE}, as"
                            f" save_lora_weights writes it) or its folder; found {found}")
  components = sorted({key.split(".", 1)[0] for key in SafetensorsFile(st_path)})
  other = [c for c in components if c not in SD_LORA_COMPONENTS]
  if other or not components:
    raise ValueError(f"{st_path} holds LoRAs for {components}; a Stable Diffusion 1.x/2.x"
                     f" pipeline takes LoRAs on {list(SD_LORA_COMPONENTS)} only"
                     f"{' (text_encoder_2 is SDXL)' if 'text_encoder_2' in other else ''}.")
  out = {c: load_adapter(st_path, dtype=dtype, component=c) for c in components}
  if "text_encoder" in out:
    out["text_encoder"] = adapter_for_clip(out["text_encoder"])
  return out
