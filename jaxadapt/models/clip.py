"""The CLIP text encoder (transformers' `CLIPTextModel`) in Flax NNX, for frozen use + adapters.

The text tower of CLIP (Radford et al. 2021, "Learning Transferable Visual Models From Natural
Language Supervision", Sec. 2.4): token + learned position embeddings, pre-LayerNorm transformer
layers with causal self-attention, a final LayerNorm; the pooled output is the final state at
the end-of-text token. Stable Diffusion conditions on `last_hidden_state` (SD 1.x) or on the
penultimate layer's states passed through the final LayerNorm (SD 2.x, `clip_skip`).

The module tree mirrors transformers' names (`encoder.layers.3.self_attn.q_proj`), so parameter
paths, PEFT keys and adapter paths are the same strings; every projection is a `Linear` with its
path. Checkpoints written with the older `text_model.` prefix (e.g. Stable Diffusion's
`text_encoder/`) load as well.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any, Mapping, NamedTuple, Optional

import jax
import jax.numpy as jnp
from flax import nnx

from jaxadapt.io.hf import read_config
from jaxadapt.io.safetensors_mmap import CheckpointDir
from jaxadapt.models import diffusion_layers as dl
from jaxadapt.models import frozen
from jaxadapt.context import insert
from jaxadapt.models.layers import Linear

SUPPORTED_ACTIVATIONS = ("quick_gelu", "gelu")


@dataclasses.dataclass(frozen=True, kw_only=True)
class CLIPTextConfig:
  """Architecture of a CLIP text encoder, read from a transformers `config.json`."""
  vocab_size: int = 49408
  hidden_size: int = 512
  intermediate_size: int = 2048
  num_hidden_layers: int = 12
  num_attention_heads: int = 8
  max_position_embeddings: int = 77
  hidden_act: str = "quick_gelu"      # one of SUPPORTED_ACTIVATIONS
  layer_norm_eps: float = 1e-5
  eos_token_id: int = 49407           # 2 selects the pooled token by argmax(input_ids) (legacy)

  def __post_init__(self):
    if self.hidden_act not in SUPPORTED_ACTIVATIONS:
      raise ValueError(f"CLIP hidden_act must be one of {SUPPORTED_ACTIVATIONS}, got "
                       f"{self.hidden_act!r}")
    if self.hidden_size % self.num_attention_heads:
      raise ValueError(f"hidden_size ({self.hidden_size}) must be a multiple of "
                       f"num_attention_heads ({self.num_attention_heads})")

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_attention_heads

  @classmethod
  def from_config(cls, cfg: Mapping[str, Any]) -> "CLIPTextConfig":
    """Builds the config from a parsed `config.json`; refuses what it cannot run."""
    if cfg.get("model_type") == "clip" and "text_config" in cfg:
      cfg = cfg["text_config"]
    mt = cfg.get("model_type", "clip_text_model")
    if mt != "clip_text_model":
      raise ValueError(f"config.json has model_type {mt!r}; expected 'clip_text_model' "
                       "(a transformers CLIPTextModel dir, e.g. Stable Diffusion's text_encoder/)")
    archs = cfg.get("architectures") or ["CLIPTextModel"]
    if archs[0] != "CLIPTextModel":
      raise ValueError(f"config.json architecture {archs[0]!r} is not supported; expected "
                       "'CLIPTextModel' (the projection head of CLIPTextModelWithProjection is not "
                       "implemented)")
    act = cfg.get("hidden_act", "quick_gelu")
    if act not in SUPPORTED_ACTIVATIONS:
      raise ValueError(f"hidden_act {act!r} is not supported; expected one of "
                       f"{SUPPORTED_ACTIVATIONS}")
    # A key left out takes transformers' CLIPTextConfig default (the dataclass defaults).
    eos = cfg.get("eos_token_id", cls.eos_token_id)
    if not isinstance(eos, int):
      raise ValueError(f"eos_token_id={eos!r} is not supported; expected one int (the token "
                       f"whose final state is pooled)")
    return cls(
        vocab_size=cfg.get("vocab_size", cls.vocab_size),
        hidden_size=cfg.get("hidden_size", cls.hidden_size),
        intermediate_size=cfg.get("intermediate_size", cls.intermediate_size),
        num_hidden_layers=cfg.get("num_hidden_layers", cls.num_hidden_layers),
        num_attention_heads=cfg.get("num_attention_heads", cls.num_attention_heads),
        max_position_embeddings=cfg.get("max_position_embeddings", cls.max_position_embeddings),
        hidden_act=act,
        layer_norm_eps=cfg.get("layer_norm_eps", cls.layer_norm_eps),
        eos_token_id=eos,
    )


class CLIPTextOutput(NamedTuple):
  last_hidden_state: jax.Array         # [B, S, D] after the final LayerNorm
  pooler_output: jax.Array             # [B, D] last_hidden_state at the end-of-text token
  penultimate_hidden_state: jax.Array  # [B, S, D] output of layer N-1, no final LayerNorm
  hidden_states: tuple                 # N+1 x [B, S, D]: embeddings, then each layer's output


class CLIPTextEmbeddings(nnx.Module):
  def __init__(self, c: CLIPTextConfig, dtype, rngs):
    self.token_embedding = dl.Embedding(c.vocab_size, c.hidden_size, dtype=dtype, rngs=rngs)
    self.position_embedding = dl.Embedding(c.max_position_embeddings, c.hidden_size,
                                           dtype=dtype, rngs=rngs)

  def __call__(self, input_ids, position_ids):
    return self.token_embedding(input_ids) + self.position_embedding(position_ids)


class CLIPAttention(nnx.Module):
  """Multi-head self-attention with q/k/v/out projections (all with bias)."""

  def __init__(self, c: CLIPTextConfig, prefix: str, dtype, rngs):
    self.path = prefix
    self.heads = c.num_attention_heads
    self.scale = c.head_dim ** -0.5
    mk = lambda name: Linear(c.hidden_size, c.hidden_size, path=f"{prefix}.{name}",
                             use_bias=True, dtype=dtype, rngs=rngs)
    self.q_proj, self.k_proj, self.v_proj = mk("q_proj"), mk("k_proj"), mk("v_proj")
    self.out_proj = mk("out_proj")

  def __call__(self, x, mask, ctx):
    q, k, v = self.q_proj(x, ctx), self.k_proj(x, ctx), self.v_proj(x, ctx)
    out = self.out_proj(dl.dot_product_attention(q, k, v, self.heads, self.scale, mask), ctx)
    return insert(ctx, self.path, out, x, None)


class CLIPMLP(nnx.Module):
  def __init__(self, c: CLIPTextConfig, prefix: str, dtype, rngs):
    self.act = c.hidden_act
    self.fc1 = Linear(c.hidden_size, c.intermediate_size, path=f"{prefix}.fc1", use_bias=True,
                      dtype=dtype, rngs=rngs)
    self.fc2 = Linear(c.intermediate_size, c.hidden_size, path=f"{prefix}.fc2", use_bias=True,
                      dtype=dtype, rngs=rngs)

  def __call__(self, x, ctx):
    return self.fc2(dl.activation(self.act)(self.fc1(x, ctx)), ctx)


class CLIPEncoderLayer(nnx.Module):
  def __init__(self, c: CLIPTextConfig, index: int, dtype, rngs):
    prefix = f"encoder.layers.{index}"
    self.layer_norm1 = dl.LayerNorm(c.hidden_size, eps=c.layer_norm_eps, dtype=dtype)
    self.self_attn = CLIPAttention(c, f"{prefix}.self_attn", dtype, rngs)
    self.layer_norm2 = dl.LayerNorm(c.hidden_size, eps=c.layer_norm_eps, dtype=dtype)
    self.mlp = CLIPMLP(c, f"{prefix}.mlp", dtype, rngs)

  def __call__(self, x, mask, ctx):
    x = x + self.self_attn(self.layer_norm1(x), mask, ctx)
    return x + self.mlp(self.layer_norm2(x), ctx)


class CLIPEncoder(nnx.Module):
  def __init__(self, c: CLIPTextConfig, dtype, rngs):
    self.layers = nnx.List([CLIPEncoderLayer(c, i, dtype, rngs)
                            for i in range(c.num_hidden_layers)])


class CLIPTextModel(nnx.Module):
  """CLIP's text transformer (Radford et al. 2021, Sec. 2.4), as transformers' `CLIPTextModel`.

  Call: `(input_ids, attention_mask=None, *, position_ids=None, ctx=None)`.
  Args:
    input_ids: [B, S] int token ids.
    attention_mask: [B, S] 1 = token, 0 = padding, or None; combined with the causal mask.
    position_ids: [B, S] or None for `arange(S)`.
    ctx: the forward `Context` (adapters; inserts at `encoder.layers.i.self_attn`), or None.
  Returns:
    `CLIPTextOutput` (last hidden state, pooled output, penultimate and all hidden states).
  """

  def __init__(self, config: CLIPTextConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
    self.config = config
    self.embeddings = CLIPTextEmbeddings(config, dtype, rngs)
    self.encoder = CLIPEncoder(config, dtype, rngs)
    self.final_layer_norm = dl.LayerNorm(config.hidden_size, eps=config.layer_norm_eps,
                                         dtype=dtype)

  def __call__(self, input_ids, attention_mask=None, *, position_ids=None,
               ctx=None) -> CLIPTextOutput:
    c = self.config
    b, s = input_ids.shape
    if s > c.max_position_embeddings:
      raise ValueError(f"sequence length {s} exceeds max_position_embeddings "
                       f"({c.max_position_embeddings})")
    if position_ids is None:
      position_ids = jnp.broadcast_to(jnp.arange(s), (b, s))
    x = self.embeddings(input_ids, position_ids)
    mask = jnp.tril(jnp.ones((s, s), bool))[None]
    if attention_mask is not None:
      mask = mask & jnp.asarray(attention_mask).astype(bool)[:, None, :]
    mask = mask[:, None]  # [B or 1, 1 (heads), Sq, Sk]
    states = [x]
    for layer in self.encoder.layers:
      x = layer(x, mask, ctx)
      states.append(x)
    last = self.final_layer_norm(x)
    if c.eos_token_id == 2:  # legacy configs: the end-of-text token has the largest id
      eos = jnp.argmax(input_ids, axis=-1)
    else:
      eos = jnp.argmax((input_ids == c.eos_token_id).astype(jnp.int32), axis=-1)
    pooled = last[jnp.arange(b), eos]
    penultimate = states[-2]
    return CLIPTextOutput(last, pooled, penultimate, tuple(states))


class CLIPTextEncoder(dl.FrozenModel):
  """A frozen CLIP text encoder: `config`, `graphdef`, `params` (pure dict); jitted calls."""

  @classmethod
  def random(cls, config: CLIPTextConfig, *, seed: int = 0,
             dtype=jnp.float32) -> "CLIPTextEncoder":
    """A randomly initialised text encoder (models trained from scratch, demos, tests)."""
    module = CLIPTextModel(config, dtype=jnp.dtype(dtype), rngs=nnx.Rngs(seed))
    graphdef, state = nnx.split(module)
    return cls(config, graphdef, nnx.to_pure_dict(state))

  def __call__(self, input_ids, attention_mask=None, *, position_ids=None, adapter=None,
               context=None, inserts=None) -> CLIPTextOutput:
    """`CLIPTextOutput` for `input_ids` [B, S] (see `CLIPTextModel`)."""
    input_ids, attention_mask, position_ids = frozen.token_inputs(input_ids, attention_mask,
                                                                   position_ids)
    return self._call("__call__", (input_ids, attention_mask), dict(position_ids=position_ids),
                      adapter=adapter, context=context, inserts=inserts)

  def prompt_embeds(self, input_ids, attention_mask=None, *, clip_skip: Optional[int] = None,
                    adapter=None, context=None, inserts=None) -> jax.Array:
    """Text conditioning as diffusers' pipelines build it, `[B, S, D]`.

    `clip_skip=None` is `last_hidden_state`; `clip_skip=k` takes the output of layer N-k and
    applies the final LayerNorm (`clip_skip=1` is the penultimate layer, as SD 2.x uses).
    """
    out = self(input_ids, attention_mask, adapter=adapter, context=context, inserts=inserts)
    if not clip_skip:
      return out.last_hidden_state
    if not 0 < clip_skip < len(out.hidden_states):
      raise ValueError(f"clip_skip must be in [1, {len(out.hidden_states) - 1}], got {clip_skip}")
    h = out.hidden_states[-(clip_skip + 1)]
    return dl.apply(self.graphdef, self.params, "final_layer_norm", h)


# transformers 4.x nests the text transformer under `text_model.`; diffusers' LoRA files of SD
# 1.x/2.x (`text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight`) and PEFT
# dirs of such a model name its modules so.
TRANSFORMERS_PREFIX = "text_model."


def adapter_for_clip(adapter):
  """`adapter` with transformers' `text_model.`-prefixed module paths in this family's names.

  jaxadapt's CLIP paths (as transformers 5.x's) start at `embeddings.` / `encoder.`; a LoRA
  saved from a 4.x `CLIPTextModel` has `text_model.encoder.layers.0.self_attn.q_proj`. The
  weights' paths lose the prefix, and so do the config's module names, exclusions and
  rank/alpha patterns (as names or as escaped regexes). Without prefixed paths the adapter is
  returned as it is.
  """
  p, p_re = TRANSFORMERS_PREFIX, re.escape(TRANSFORMERS_PREFIX)
  if not any(k.startswith(p) for k in adapter.weights):
    return adapter

  def strip(s):
    if not isinstance(s, str):
      return s
    return s[len(p_re):] if s.startswith(p_re) else s[len(p):] if s.startswith(p) else s

  def names(v):
    return tuple(strip(x) for x in v) if isinstance(v, (list, tuple)) else strip(v)

  c = adapter.config
  config = dataclasses.replace(
      c, target_modules=names(c.target_modules), exclude_modules=names(c.exclude_modules),
      rank_pattern=tuple((strip(k), v) for k, v in c.rank_pattern),
      alpha_pattern=tuple((strip(k), v) for k, v in c.alpha_pattern))
  return dataclasses.replace(adapter, weights={strip(k): w for k, w in adapter.weights.items()},
                             config=config,
                             embedding_paths=tuple(strip(e) for e in adapter.embedding_paths))


def _clip_name_fn(prefix: str):
  def name_fn(path: str):
    name, transform = dl.torch_name(path)
    return prefix + name, transform
  return name_fn


def load_clip_text(directory: str, *, dtype=jnp.float32, sharding=None) -> CLIPTextEncoder:
  """Loads a transformers `CLIPTextModel` dir (config.json + model.safetensors).

  Args:
    directory: e.g. Stable Diffusion's `text_encoder/`.
    dtype: parameter dtype (float32 or bfloat16).
    sharding: None, a Sharding, a Mesh or callable(path, shape) (see `jaxadapt.io.hf`).
  """
  config = CLIPTextConfig.from_config(read_config(directory))
  prefix = ("text_model." if "text_model.embeddings.token_embedding.weight"
            in CheckpointDir(directory, "model") else "")
  graphdef, params = dl.load_params(
      directory, lambda: CLIPTextModel(config, dtype=dtype, rngs=nnx.Rngs(0)),
      dtype=jnp.dtype(dtype), sharding=sharding, stem="model", name_fn=_clip_name_fn(prefix))
  return CLIPTextEncoder(config, graphdef, params)
