"""`CausalLM`: a frozen decoder (graphdef + params) you can call with adapters.

`model(input_ids)`, `model(input_ids, adapter=a)`, and mixed batches
`model(input_ids, adapters=[a0, a1], adapter_ids=[0, 1, -1])` (one id per sequence, -1 = base)
all run the same jitted forward; only the adapter context differs.
"""
from __future__ import annotations

import functools
import os

import jax.numpy as jnp
from flax import nnx

from jaxadapt.context import KVCache
from jaxadapt.io.files import float_dtype
from jaxadapt.models.frozen import FrozenModel, apply, token_inputs
from jaxadapt.models.llama import LlamaConfig, LlamaForCausalLM, load_llama


def forward(graphdef, params, input_ids, attention_mask=None, positions=None, ctx=None):
  """The pure forward (not jitted): for use inside a user's own jit/grad (training).

  `ctx` is a forward `Context` (e.g. `jaxadapt.adapters.lora.context(adapter)`) or None.
  """
  return apply(graphdef, params, "__call__", input_ids, attention_mask, positions, ctx=ctx)


class CausalLM(FrozenModel):
  """A frozen Llama-family model: `config`, `graphdef`, `params` (a pure dict, never mutated)."""

  batch_item = "sequence"

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

  def init_cache(self, batch: int, max_len: int, dtype=None) -> KVCache:
    """An empty `KVCache` for `batch` rows of up to `max_len` tokens (prompt + new tokens);
    pass it as `context=ja.Context(attention=cache)` (the call then returns the new cache)."""
    c = self.config
    return KVCache.empty(c.num_hidden_layers, batch, max_len, c.num_key_value_heads, c.head_dim,
                         dtype or self.dtype)

  def generate(self, inputs, **kwargs):
    """Generates continuations of `inputs` (token ids or text): see `jaxadapt.generate.generate`
    for the arguments (max_new_tokens, sampling, eos and stop strings, adapters)."""
    from jaxadapt.generate import generate
    return generate(self, inputs, **kwargs)

  def __call__(self, input_ids, attention_mask=None, *, adapter=None, adapters=None,
               adapter_ids=None, context=None, position_ids=None):
    """Logits `[batch, seq, vocab]`.

    Args:
      input_ids: [batch, seq] ints (numpy or jax).
      attention_mask: [batch, seq] 1 = token, 0 = padding (left or right), as transformers.
      adapter: one `LoraAdapter` for the whole batch.
      adapters: a list of adapters, with `adapter_ids` one id per sequence (-1 = base only).
      context: a ready forward `Context` (a mixed batch in another layout, a pool, routers, a
        `KVCache` in `attention`: then the call returns `(logits, updated cache)`).
      position_ids: [batch, seq] positions; default `arange(seq)` as transformers.
    """
    input_ids, attention_mask, position_ids = token_inputs(input_ids, attention_mask,
                                                           position_ids)
    return self._call("__call__", (input_ids, attention_mask, position_ids), adapter=adapter,
                      adapters=adapters, adapter_ids=adapter_ids, context=context,
                      batch=input_ids.shape[0])


def load_model(directory: str, *, dtype="float32", sharding=None) -> CausalLM:
  """Loads a Hugging Face Llama/Mistral/Qwen2 dir (or a GGUF file) as a frozen `CausalLM`.

  Args:
    directory: dir with config.json and model.safetensors (or a sharded index); a llama.cpp
      `.gguf` file (`jaxadapt.io.gguf`); or `"default"` / `"default-v2"`, the embedded
      default model and its successor (`jaxadapt.default`).
    dtype: a floating dtype for the params ("float32", "bfloat16", "float16").
    sharding: None, a Sharding, a Mesh (jaxadapt.sharding rules) or callable(path, shape).
  """
  directory = os.fspath(directory)
  from jaxadapt import default
  if directory in default.VERSIONS:  # "default", "default-v2": the embedded models
    directory = default.model_dir(directory)
  if directory.endswith(".gguf") and os.path.isfile(directory):
    from jaxadapt.io.gguf import load_gguf
    return load_gguf(directory, dtype=float_dtype(dtype), sharding=sharding)
  config, graphdef, params = load_llama(directory, dtype=float_dtype(dtype), sharding=sharding)
  model = CausalLM(config, graphdef, params)
  model.directory = os.fspath(directory)
  return model
