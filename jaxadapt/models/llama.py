"""The Llama family (Llama 1-3 incl. Llama-3 rope scaling, Mistral, Qwen2) in Flax NNX.

Written for a frozen base: the module tree mirrors Hugging Face's module names
(`model.layers.3.self_attn.q_proj`), so parameter paths, PEFT keys and adapter paths are the same
strings, and every linear layer calls `jaxadapt.adapters.hook.project` with its own path.
Kernels use JAX layout `[in, out]`; torch's `[out, in]` is converted at load time only.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, Optional

import jax
import jax.numpy as jnp
from flax import nnx

from jaxadapt.adapters.hook import project
from jaxadapt.models.layers import Linear

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


@dataclasses.dataclass(frozen=True, kw_only=True)
class LlamaConfig:
  """Architecture of a Llama-family decoder, read from a Hugging Face `config.json`."""
  model_type: str = "llama"            # one of SUPPORTED_MODEL_TYPES
  vocab_size: int = 32000
  hidden_size: int = 4096
  intermediate_size: int = 11008
  num_hidden_layers: int = 32
  num_attention_heads: int = 32
  num_key_value_heads: int = 32        # < num_attention_heads means grouped-query attention
  head_dim: int = 128
  rms_norm_eps: float = 1e-6
  rope_theta: float = 10000.0
  rope_scaling: Optional[tuple] = None  # sorted (key, value) pairs of HF's rope parameters
  tie_word_embeddings: bool = False
  attention_bias: bool = False         # bias on q/k/v (Qwen2: True)
  o_proj_bias: bool = False            # bias on o_proj (Llama's attention_bias covers it too)
  mlp_bias: bool = False
  sliding_windows: tuple = ()          # per layer: window length or 0 for full attention
  max_position_embeddings: int = 2048

  def __post_init__(self):
    if self.model_type not in SUPPORTED_MODEL_TYPES:
      raise ValueError(f"model_type must be one of {SUPPORTED_MODEL_TYPES}, got "
                       f"{self.model_type!r}")
    if self.num_attention_heads % self.num_key_value_heads:
      raise ValueError(f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                       f"num_key_value_heads ({self.num_key_value_heads})")
    if self.sliding_windows and len(self.sliding_windows) != self.num_hidden_layers:
      raise ValueError(f"sliding_windows needs one entry per layer ({self.num_hidden_layers}), "
                       f"got {len(self.sliding_windows)}")
    rope_type = dict(self.rope_scaling or ()).get("rope_type", "default")
    if rope_type not in SUPPORTED_ROPE_TYPES:
      raise ValueError(f"rope type {rope_type!r} is not supported; jaxadapt serves "
                       f"{SUPPORTED_ROPE_TYPES}")

  @classmethod
  def from_hf(cls, cfg: Mapping[str, Any]) -> "LlamaConfig":
    """Builds the config from a parsed HF `config.json`; refuses what it cannot serve."""
    mt = cfg.get("model_type")
    if mt not in SUPPORTED_MODEL_TYPES:
      raise ValueError(f"config.json has model_type {mt!r}; jaxadapt's Llama family serves "
                       f"{SUPPORTED_MODEL_TYPES}. Use a checkpoint of one of these.")
    act = cfg.get("hidden_act", "silu")
    if act != "silu":
      raise ValueError(f"hidden_act {act!r} is not supported (expected 'silu')")
    if cfg.get("pretraining_tp", 1) not in (1, None):
      raise ValueError(f"pretraining_tp={cfg['pretraining_tp']} is not supported (expected 1)")
    heads = cfg["num_attention_heads"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
    rope = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
    theta = rope.pop("rope_theta", cfg.get("rope_theta", 10000.0))
    if "type" in rope and "rope_type" not in rope:
      rope["rope_type"] = rope.pop("type")
    rope.pop("type", None)
    rope_type = rope.get("rope_type", "default")
    if rope_type not in SUPPORTED_ROPE_TYPES:
      raise ValueError(f"config.json asks for rope type {rope_type!r}; jaxadapt serves "
                       f"{SUPPORTED_ROPE_TYPES}")
    if float(rope.get("partial_rotary_factor", cfg.get("partial_rotary_factor", 1.0))) != 1.0:
      raise ValueError("partial_rotary_factor != 1 is not supported")
    n_layers = cfg["num_hidden_layers"]
    windows = [0] * n_layers
    if mt == "mistral" and cfg.get("sliding_window"):
      windows = [int(cfg["sliding_window"])] * n_layers
    if mt == "qwen2" and cfg.get("use_sliding_window") and cfg.get("sliding_window"):
      types = cfg.get("layer_types") or [
          "sliding_attention" if i >= cfg.get("max_window_layers", 0) else "full_attention"
          for i in range(n_layers)]
      windows = [int(cfg["sliding_window"]) if t == "sliding_attention" else 0 for t in types]
    attention_bias = bool(cfg.get("attention_bias", False)) or mt == "qwen2"
    return cls(
        model_type=mt,
        vocab_size=cfg["vocab_size"],
        hidden_size=cfg["hidden_size"],
        intermediate_size=cfg["intermediate_size"],
        num_hidden_layers=n_layers,
        num_attention_heads=heads,
        num_key_value_heads=cfg.get("num_key_value_heads") or heads,
        head_dim=head_dim,
        rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
        rope_theta=float(theta),
        rope_scaling=tuple(sorted(rope.items())) if rope_type != "default" else None,
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        attention_bias=attention_bias,
        o_proj_bias=bool(cfg.get("attention_bias", False)) and mt != "qwen2",
        mlp_bias=bool(cfg.get("mlp_bias", False)),
        sliding_windows=tuple(windows),
        max_position_embeddings=cfg.get("max_position_embeddings", 2048),
    )


def rope_inv_freq(config: LlamaConfig) -> jax.Array:
  """Inverse RoPE frequencies [head_dim // 2] (RoFormer Eq. 15; Llama-3 scaling)."""
  dim = config.head_dim
  inv = 1.0 / (config.rope_theta ** (jnp.arange(0, dim, 2, dtype=jnp.float32) / dim))
  rope = dict(config.rope_scaling or ())
  kind = rope.get("rope_type", "default")
  if kind == "linear":
    inv = inv / rope["factor"]
  elif kind == "llama3":
    factor = rope["factor"]
    low, high = rope["low_freq_factor"], rope["high_freq_factor"]
    old_len = rope["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv
    scaled = jnp.where(wavelen > old_len / low, inv / factor, inv)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    inv = jnp.where(medium, smoothed, scaled)
  return inv


def apply_rope(x, cos, sin):
  """x: [B, S, H, hd]; cos/sin: [B, S, hd]. Rotate-half convention of HF Llama."""
  half = x.shape[-1] // 2
  rot = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
  return x * cos[:, :, None, :] + rot * sin[:, :, None, :]


class RMSNorm(nnx.Module):
  """RMSNorm (Zhang & Sennrich, 2019), computed in float32 as HF Llama does."""

  def __init__(self, dim: int, eps: float, dtype=jnp.float32):
    self.weight = nnx.Param(jnp.ones((dim,), dtype))
    self.eps = eps

  def __call__(self, x):
    h = x.astype(jnp.float32)
    h = h * jax.lax.rsqrt(jnp.mean(h * h, axis=-1, keepdims=True) + self.eps)
    return self.weight[...] * h.astype(x.dtype)


class Attention(nnx.Module):
  def __init__(self, config: LlamaConfig, prefix: str, dtype, rngs):
    c = config
    self.config = c
    qd, kvd = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
    mk = lambda name, i, o, b: Linear(i, o, path=f"{prefix}.{name}", use_bias=b, dtype=dtype,
                                      rngs=rngs)
    self.q_proj = mk("q_proj", c.hidden_size, qd, c.attention_bias)
    self.k_proj = mk("k_proj", c.hidden_size, kvd, c.attention_bias)
    self.v_proj = mk("v_proj", c.hidden_size, kvd, c.attention_bias)
    self.o_proj = mk("o_proj", qd, c.hidden_size, c.o_proj_bias)

  def __call__(self, x, cos, sin, mask, lora):
    c = self.config
    b, s, _ = x.shape
    g = c.num_attention_heads // c.num_key_value_heads
    q = self.q_proj(x, lora).reshape(b, s, c.num_attention_heads, c.head_dim)
    k = self.k_proj(x, lora).reshape(b, s, c.num_key_value_heads, c.head_dim)
    v = self.v_proj(x, lora).reshape(b, s, c.num_key_value_heads, c.head_dim)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    q = q.reshape(b, s, c.num_key_value_heads, g, c.head_dim)
    scores = jnp.einsum("bqkgd,bskd->bkgqs", q, k) * (c.head_dim ** -0.5)
    scores = jnp.where(mask[:, None, None], scores.astype(jnp.float32), -1e30)
    probs = jax.nn.softmax(scores, axis=-1).astype(x.dtype)
    out = jnp.einsum("bkgqs,bskd->bqkgd", probs, v).reshape(b, s, -1)
    return self.o_proj(out, lora)


class MLP(nnx.Module):
  def __init__(self, config: LlamaConfig, prefix: str, dtype, rngs):
    c = config
    mk = lambda name, i, o: Linear(i, o, path=f"{prefix}.{name}", use_bias=c.mlp_bias,
                                   dtype=dtype, rngs=rngs)
    self.gate_proj = mk("gate_proj", c.hidden_size, c.intermediate_size)
    self.up_proj = mk("up_proj", c.hidden_size, c.intermediate_size)
    self.down_proj = mk("down_proj", c.intermediate_size, c.hidden_size)

  def __call__(self, x, lora):
    return self.down_proj(jax.nn.silu(self.gate_proj(x, lora)) * self.up_proj(x, lora), lora)


class DecoderLayer(nnx.Module):
  def __init__(self, config: LlamaConfig, index: int, dtype, rngs):
    prefix = f"model.layers.{index}"
    self.window = config.sliding_windows[index] if config.sliding_windows else 0  # 0: full
    self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)
    self.self_attn = Attention(config, f"{prefix}.self_attn", dtype, rngs)
    self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)
    self.mlp = MLP(config, f"{prefix}.mlp", dtype, rngs)

  def __call__(self, x, cos, sin, masks, lora):
    mask = masks[self.window]
    x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, lora)
    return x + self.mlp(self.post_attention_layernorm(x), lora)


class Embed(nnx.Module):
  def __init__(self, vocab: int, dim: int, dtype, rngs):
    self.embedding = nnx.Param(jax.random.normal(rngs.params(), (vocab, dim), dtype) * 0.02)

  def __call__(self, ids):
    return jnp.take(self.embedding[...], ids, axis=0)


class LlamaModel(nnx.Module):
  def __init__(self, config: LlamaConfig, dtype, rngs):
    self.embed_tokens = Embed(config.vocab_size, config.hidden_size, dtype, rngs)
    self.layers = nnx.List([DecoderLayer(config, i, dtype, rngs)
                            for i in range(config.num_hidden_layers)])
    self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)


class LlamaForCausalLM(nnx.Module):
  """Decoder with a language-model head. Call: `(input_ids, attention_mask, positions, lora)`.

  Args of `__call__`:
    input_ids: [B, S] int.
    attention_mask: [B, S] 1 for real tokens, 0 for padding (left or right), or None.
    positions: [B, S] int positions, or None for `arange(S)` (as transformers does).
    lora: mapping from projection path to adapter context (see `adapters.hook`), or None.
  Returns:
    logits [B, S, vocab] in the parameter dtype.
  """

  def __init__(self, config: LlamaConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
    self.config = config
    self.model = LlamaModel(config, dtype, rngs)
    if not config.tie_word_embeddings:
      self.lm_head = Linear(config.hidden_size, config.vocab_size, path="lm_head", dtype=dtype,
                            rngs=rngs)

  def linear_paths(self) -> list[str]:
    """Paths of every linear projection, in module order (lm_head last)."""
    paths = [m.path for _, m in nnx.iter_graph(self) if isinstance(m, Linear)]
    return sorted(set(paths), key=paths.index)

  def hidden_states(self, input_ids, attention_mask=None, positions=None, lora=None):
    c = self.config
    b, s = input_ids.shape
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(s), (b, s))
    freqs = positions.astype(jnp.float32)[..., None] * rope_inv_freq(c)
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    x = self.model.embed_tokens(input_ids)
    cos, sin = jnp.cos(emb).astype(x.dtype), jnp.sin(emb).astype(x.dtype)
    qi = jnp.arange(s)[:, None]
    ki = jnp.arange(s)[None, :]
    causal = ki <= qi
    keys = (jnp.ones((b, s), bool) if attention_mask is None
            else jnp.asarray(attention_mask).astype(bool))
    masks = {}
    for w in set(c.sliding_windows or (0,)):
      m = causal if w == 0 else causal & (qi - ki < w)
      masks[w] = m[None] & keys[:, None, :]  # [B, Sq, Sk]
    for layer in self.model.layers:
      x = layer(x, cos, sin, masks, lora)
    return self.model.norm(x)

  def __call__(self, input_ids, attention_mask=None, positions=None, lora=None):
    h = self.hidden_states(input_ids, attention_mask, positions, lora)
    if self.config.tie_word_embeddings:
      ctx = None if lora is None else lora.get("lm_head")
      return project(h, self.model.embed_tokens.embedding[...].T, None, ctx)
    return self.lm_head(h, lora)
