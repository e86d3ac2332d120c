"""`CausalLM`: a frozen decoder (graphdef + params) you can call with adapters.

`model(input_ids)`, `model(input_ids, adapter=a)`, and mixed batches
`model(input_ids, adapters=[a0, a1], adapter_ids=[0, 1, -1])` (one id per sequence, -1 = base)
all run the same jitted forward; only the adapter context differs.
"""
from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxadapt.adapters import lora as lora_lib
from jaxadapt.models.frozen import FrozenModel, apply, token_inputs
from jaxadapt.models.llama import LlamaConfig, LlamaForCausalLM


def forward(graphdef, params, input_ids, attention_mask=None, positions=None, lora=None):
  """The pure forward (not jitted): for use inside a user's own jit/grad (training)."""
  return apply(graphdef, params, "__call__", input_ids, attention_mask, positions, lora)


_forward = jax.jit(forward, static_argnums=(0,))


class CausalLM(FrozenModel):
  """A frozen Llama-family model: `config`, `graphdef`, `params` (a pure dict, never mutated)."""

  @classmethod
  def random(cls, config: LlamaConfig, *, seed: int = 0, dtype=jnp.float32) -> "CausalLM":
    """A randomly initialised model (demos, benchmarks, tests)."""
    graphdef, state = nnx.split(LlamaForCausalLM(config, dtype=dtype, rngs=nnx.Rngs(seed)))
    return cls(config, graphdef, nnx.to_pure_dict(state))

  @property
  def dtype(self):
    return self.params["model"]["embed_tokens"]["embedding"].dtype

  @functools.cached_property
  def tokenizer(self):
    """The transformers tokenizer saved in the model dir (local files only), or None."""
    directory = getattr(self, "directory", None)
    if directory is None or not any(
        os.path.exists(os.path.join(directory, f))
        for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")):
      return None
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(directory, local_files_only=True)

  def __call__(self, input_ids, attention_mask=None, *, adapter=None, adapters=None,
               adapter_ids=None, position_ids=None):
    """Logits `[batch, seq, vocab]`.

    Args:
      input_ids: [batch, seq] ints (numpy or jax).
      attention_mask: [batch, seq] 1 = token, 0 = padding (left or right), as transformers.
      adapter: one `LoraAdapter` for the whole batch.
      adapters: a list of adapters, with `adapter_ids` one id per sequence (-1 = base only).
      position_ids: [batch, seq] positions; default `arange(seq)` as transformers.
    """
    input_ids, attention_mask, position_ids = token_inputs(input_ids, attention_mask,
                                                           position_ids)
    if adapter_ids is not None and np.shape(adapter_ids) != (input_ids.shape[0],):
      raise ValueError(f"adapter_ids must hold one id per sequence, shape "
                       f"({input_ids.shape[0]},); got shape {np.shape(adapter_ids)}")
    lora = self.lora_contexts(adapter=adapter, adapters=adapters, adapter_ids=adapter_ids)
    return _forward(self.graphdef, self.params, input_ids, attention_mask, position_ids, lora)


def merge(model: FrozenModel, adapter, *, keep_original: bool = False) -> FrozenModel:
  """A new model with `adapter` folded into its kernels (the input model is untouched).

  Works for every jaxadapt model (LLMs, UNet, DiT, ...). `unmerge` undoes it arithmetically, as
  PEFT's unmerge does (exact up to rounding). With `keep_original=True` the new model also keeps
  references to the pre-merge kernels of the targeted layers, and `unmerge` restores them
  bitwise; they are the arrays the input model holds (nothing is copied), but they stay alive
  while the merged model does, so `model = ja.merge(model, a, keep_original=True)` holds up to
  two copies of every targeted kernel.
  """
  model.check_adapter(adapter)
  params, undo = lora_lib.merge_params(model.params, adapter, keep_original=keep_original)
  return model.with_params(params, merged=model.merged + ((adapter, undo),))


def unmerge(model: FrozenModel, adapter=None) -> FrozenModel:
  """Removes the most recently merged adapter (or the given one, which must be the newest)."""
  if not model.merged:
    raise ValueError("this model has no merged adapter to unmerge")
  last, undo = model.merged[-1]
  if adapter is not None and adapter is not last:
    raise ValueError("unmerge removes adapters newest first; the given adapter is not the "
                     "newest merged one")
  params = lora_lib.unmerge_params(model.params, last, undo)
  return model.with_params(params, merged=model.merged[:-1])


def load_model(directory: str, *, dtype="float32", sharding=None) -> CausalLM:
  """Loads a Hugging Face Llama/Mistral/Qwen2 dir as a frozen `CausalLM`.

  Args:
    directory: dir with config.json and model.safetensors (or a sharded index).
    dtype: a floating dtype for the params ("float32", "bfloat16", "float16").
    sharding: None, a Sharding, a Mesh (jaxadapt.sharding rules) or callable(path, shape).
  """
  from jaxadapt.io.files import float_dtype
  from jaxadapt.io.hf import load_llama
  config, graphdef, params = load_llama(directory, dtype=float_dtype(dtype), sharding=sharding)
  model = CausalLM(config, graphdef, params)
  model.directory = os.fspath(directory)
  return model
