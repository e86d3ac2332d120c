"""The Llama family (Llama 1-3, Mistral, Qwen2) in Flax NNX.

RoPE scalings as transformers: linear, dynamic NTK, Llama-3, YaRN, LongRoPE; MLP activations by
transformers' `hidden_act` names (`ACTIVATIONS`).

Written for a frozen base: the module tree mirrors Hugging Face's module names
(`model.layers.3.self_attn.q_proj`), so parameter paths, PEFT keys and adapter paths are the same
strings, and every linear layer calls `jaxadapt.adapters.hook.project` with its own path.
Kernels use JAX layout `[in, out]`; torch's `[out, in]` is converted at load time only.
"""
from __future__ import annotations

import dataclasses
import math
import os
from typing import Any, Mapping, Optional

import jax
import jax.numpy as jnp
from flax import nnx

from jaxadapt.adapters import embedding as embedding_lora
from jaxadapt.adapters.hook import project
from jaxadapt.context import KVCache, PagedKV
from kernels_pallas import attention as paged_attention
from jaxadapt.io.hf import ShardingArg, read_config, torch_name
from jaxadapt.models import frozen
from jaxadapt.models.layers import Linear

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
# Keys of config.json that have no default: without them the architecture is unknown.
_REQUIRED_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                  "num_attention_heads")
SUPPORTED_ROPE_TYPES = ("default", "linear", "dynamic", "llama3", "yarn", "longrope")
# Keys each rope type needs in `rope_scaling` (after `LlamaConfig.from_hf` filled defaults).
_ROPE_REQUIRED = {
    "default": (), "linear": ("factor",), "dynamic": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor",
               "original_max_position_embeddings"),
    "yarn": ("factor", "original_max_position_embeddings"),
    "longrope": ("short_factor", "long_factor", "original_max_position_embeddings"),
}
# transformers' `hidden_act` names (ACT2FN) that jaxadapt implements, as elementwise functions.
ACTIVATIONS = {
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_fast": lambda x: jax.nn.gelu(x, approximate=True),
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "relu": jax.nn.relu,
    "relu2": lambda x: jnp.square(jax.nn.relu(x)),
}
# transformers' defaults (configuration_<family>.py) for keys a config.json may leave out.
_FAMILY_DEFAULTS = {
    "llama": {"num_key_value_heads": None, "max_position_embeddings": 2048},
    "mistral": {"num_key_value_heads": 8, "max_position_embeddings": 4096 * 32,
                "sliding_window": 4096},
    "qwen2": {"num_key_value_heads": 32, "max_position_embeddings": 32768,
              "sliding_window": 4096, "max_window_layers": 28},
}


def _hashable(value):
  """Lists (e.g. longrope's factors) as tuples, so the config can be a static jit argument."""
  if isinstance(value, (list, tuple)):
    return tuple(_hashable(v) for v in value)
  return value


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
  hidden_act: str = "silu"             # a key of ACTIVATIONS (transformers' name)

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
    if self.hidden_act not in ACTIVATIONS:
      raise ValueError(f"hidden_act {self.hidden_act!r} is not supported; jaxadapt implements "
                       f"{sorted(ACTIVATIONS)}")
    rope = dict(self.rope_scaling or ())
    rope_type = rope.get("rope_type", "default")
    if rope_type not in SUPPORTED_ROPE_TYPES:
      raise ValueError(f"rope type {rope_type!r} is not supported; jaxadapt serves "
                       f"{SUPPORTED_ROPE_TYPES}")
    missing = [k for k in _ROPE_REQUIRED[rope_type] if rope.get(k) is None]
    if missing:
      raise ValueError(f"rope type {rope_type!r} needs {list(_ROPE_REQUIRED[rope_type])} in "
                       f"rope_scaling; missing {missing}")
    if rope_type == "longrope":
      for key in ("short_factor", "long_factor"):
        if len(rope[key]) != self.head_dim // 2:
          raise ValueError(f"longrope {key} needs head_dim // 2 = {self.head_dim // 2} entries, "
                           f"found {len(rope[key])}")

  @classmethod
  def from_hf(cls, cfg: Mapping[str, Any]) -> "LlamaConfig":
    """Builds the config from a parsed HF `config.json`; refuses what it cannot serve.

    Keys the file leaves out take transformers' defaults for its family (e.g. Mistral's 8
    key/value heads and 4096-token window, Qwen2's `max_window_layers` 28), so the model is
    the one `AutoModelForCausalLM.from_pretrained` builds from the same file.
    """
    mt = cfg.get("model_type")
    if mt not in SUPPORTED_MODEL_TYPES:
      raise ValueError(f"config.json has model_type {mt!r}; jaxadapt's Llama family serves "
                       f"{SUPPORTED_MODEL_TYPES}. Use a checkpoint of one of these.")
    defaults = _FAMILY_DEFAULTS[mt]
    act = cfg.get("hidden_act", "silu")
    if act not in ACTIVATIONS:
      raise ValueError(f"config.json has hidden_act {act!r}; jaxadapt implements "
                       f"{sorted(ACTIVATIONS)}")
    if cfg.get("quantization_config"):
      method = dict(cfg["quantization_config"]).get("quant_method", "?")
      raise ValueError(f"config.json has a quantization_config (quant_method {method!r}); "
                       f"jaxadapt loads unquantized weights only (expected no "
                       f"quantization_config). Use the unquantized checkpoint.")
    # pretraining_tp > 1 only sliced the projections in old transformers (same result); the
    # current Llama ignores it, and so does jaxadapt.
    heads = cfg["num_attention_heads"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
    max_pos = cfg.get("max_position_embeddings") or defaults["max_position_embeddings"]
    # transformers lets a legacy `rope_scaling` win over `rope_parameters`; rope_theta inside
    # the dict wins over the top-level key.
    rope = dict(cfg.get("rope_scaling") or cfg.get("rope_parameters") or {})
    theta = rope.pop("rope_theta", None) or cfg.get("rope_theta") or 10000.0
    if "type" in rope and "rope_type" not in rope:
      rope["rope_type"] = rope.pop("type")
    rope.pop("type", None)
    rope_type = rope.get("rope_type", "default")
    if rope_type not in SUPPORTED_ROPE_TYPES:
      raise ValueError(f"config.json asks for rope type {rope_type!r}; jaxadapt serves "
                       f"{SUPPORTED_ROPE_TYPES}")
    partial = float(rope.pop("partial_rotary_factor", None)
                    or cfg.get("partial_rotary_factor") or 1.0)
    if partial != 1.0:
      raise ValueError(f"partial_rotary_factor {partial} is not supported (expected 1.0: "
                       f"rotary embedding on the whole head)")
    if rope_type in ("llama3", "yarn", "longrope"):
      # As transformers: a top-level original_max_position_embeddings (Phi-3 style) wins, then
      # the rope dict's, then max_position_embeddings.
      rope["original_max_position_embeddings"] = (
          cfg.get("original_max_position_embeddings")
          or rope.get("original_max_position_embeddings") or max_pos)
    n_layers = cfg["num_hidden_layers"]
    windows = [0] * n_layers
    if mt == "mistral":
      window = cfg.get("sliding_window", defaults["sliding_window"])
      windows = [int(window or 0)] * n_layers
    if mt == "qwen2" and cfg.get("use_sliding_window", False):
      window = cfg.get("sliding_window", defaults["sliding_window"])
      mwl = cfg.get("max_window_layers", defaults["max_window_layers"])
      types = cfg.get("layer_types") or [
          "sliding_attention" if window is not None and i >= mwl else "full_attention"
          for i in range(n_layers)]
      unknown = sorted(set(types) - {"sliding_attention", "full_attention"})
      if unknown:
        raise ValueError(f"config.json layer_types has {unknown}; expected 'full_attention' or "
                         f"'sliding_attention' per layer")
      windows = [int(window or 0) if t == "sliding_attention" else 0 for t in types]
    # Only Llama has attention_bias / mlp_bias; Mistral's and Qwen2's transformers models ignore
    # these keys (Qwen2 always has q/k/v biases and no o_proj bias).
    llama_bias = mt == "llama" and bool(cfg.get("attention_bias", False))
    return cls(
        model_type=mt,
        vocab_size=cfg["vocab_size"],
        hidden_size=cfg["hidden_size"],
        intermediate_size=cfg["intermediate_size"],
        num_hidden_layers=n_layers,
        num_attention_heads=heads,
        num_key_value_heads=(cfg.get("num_key_value_heads") or defaults["num_key_value_heads"]
                             or heads),
        head_dim=head_dim,
        rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
        rope_theta=float(theta),
        rope_scaling=(tuple(sorted((k, _hashable(v)) for k, v in rope.items()))
                      if rope_type != "default" else None),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        attention_bias=llama_bias or mt == "qwen2",
        o_proj_bias=llama_bias,
        mlp_bias=mt == "llama" and bool(cfg.get("mlp_bias", False)),
        sliding_windows=tuple(windows),
        max_position_embeddings=max_pos,
        hidden_act=act,
    )


def rope_frequencies(config: LlamaConfig, seq_len=None) -> tuple[jax.Array, float]:
  """Inverse RoPE frequencies [head_dim // 2] and the cos/sin scale (RoFormer Eq. 15).

  Scalings as transformers: linear (position interpolation), dynamic NTK, Llama-3, YaRN (Peng et
  al., 2023) and LongRoPE (Ding et al., 2024). `seq_len` (the batch's largest position + 1, may
  be traced) picks dynamic NTK's base and LongRoPE's short or long factors, as transformers does
  per call (its dynamic NTK also remembers the longest length seen across calls; jaxadapt does
  not, so it equals a freshly loaded transformers model).
  """
  dim = config.head_dim
  base = config.rope_theta
  exponents = jnp.arange(0, dim, 2, dtype=jnp.float32) / dim
  inv = 1.0 / (base ** exponents)
  rope = dict(config.rope_scaling or ())
  kind = rope.get("rope_type", "default")
  scale = 1.0
  if kind == "linear":
    inv = inv / rope["factor"]
  elif kind == "dynamic" and seq_len is not None:
    factor, max_pos = rope["factor"], config.max_position_embeddings
    length = jnp.maximum(jnp.asarray(seq_len, jnp.float32), float(max_pos))
    ntk = base * ((factor * length / max_pos) - (factor - 1)) ** (dim / (dim - 2))
    inv = jnp.where(seq_len > max_pos, 1.0 / (ntk ** exponents), inv)
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
  elif kind == "yarn":
    inv, scale = _yarn(config, rope, inv)
  elif kind == "longrope":
    old_len = rope["original_max_position_embeddings"]
    factor = rope.get("factor") or config.max_position_embeddings / old_len
    scale = rope.get("attention_factor")
    if scale is None:
      scale = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(old_len))
    ext = jnp.asarray(rope["short_factor"], jnp.float32)
    if seq_len is not None:
      ext = jnp.where(seq_len > old_len, jnp.asarray(rope["long_factor"], jnp.float32), ext)
    inv = 1.0 / (ext * base ** exponents)
  return inv, float(scale)


def _yarn(config: LlamaConfig, rope: dict, inv: jax.Array) -> tuple[jax.Array, float]:
  """YaRN (Peng et al., 2023, Sec. 3.2-3.4): per-dimension blend of interpolated and original
  frequencies by a linear ramp over the rotation count, and the attention temperature."""
  dim, base = config.head_dim, config.rope_theta
  old_len = rope["original_max_position_embeddings"]
  factor = rope.get("factor") or config.max_position_embeddings / old_len

  def mscale(s, m=1.0):
    return 1.0 if s <= 1 else 0.1 * m * math.log(s) + 1.0

  scale = rope.get("attention_factor")
  if scale is None:
    m, m_all = rope.get("mscale"), rope.get("mscale_all_dim")
    scale = mscale(factor, m) / mscale(factor, m_all) if m and m_all else mscale(factor)
  fast, slow = rope.get("beta_fast") or 32, rope.get("beta_slow") or 1

  def dim_of(rotations):  # the dimension that turns `rotations` times over old_len (Eq. 16)
    return dim * math.log(old_len / (rotations * 2 * math.pi)) / (2 * math.log(base))

  low, high = dim_of(fast), dim_of(slow)
  if rope.get("truncate", True):
    low, high = math.floor(low), math.ceil(high)
  low, high = max(low, 0), min(high, dim - 1)
  if low == high:
    high += 0.001
  ramp = jnp.clip((jnp.arange(dim // 2, dtype=jnp.float32) - low) / (high - low), 0, 1)
  return (inv / factor) * ramp + inv * (1 - ramp), scale


def rope_cos_sin(config: LlamaConfig, positions, dtype) -> tuple[jax.Array, jax.Array]:
  """(cos, sin) [..., head_dim] of `positions` (scaled as the config's rope type says)."""
  inv_freq, rope_scale = rope_frequencies(config, seq_len=jnp.max(positions) + 1)
  freqs = positions.astype(jnp.float32)[..., None] * inv_freq
  emb = jnp.concatenate([freqs, freqs], axis=-1)
  return (jnp.cos(emb) * rope_scale).astype(dtype), (jnp.sin(emb) * rope_scale).astype(dtype)


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

  def __call__(self, x, cos, sin, mask, ctx, cache=None):
    """Attention output; with `cache=(keys, values, slots)` also the updated (keys, values):
    the new tokens' k/v are written at `slots [B, S]` and the queries attend over the cache.
    With a `_PagedStep` cache, `(output, updated kv pages)` (see `PagedKV`)."""
    c = self.config
    b, s, _ = x.shape
    g = c.num_attention_heads // c.num_key_value_heads
    q = self.q_proj(x, ctx).reshape(b, s, c.num_attention_heads, c.head_dim)
    k = self.k_proj(x, ctx).reshape(b, s, c.num_key_value_heads, c.head_dim)
    v = self.v_proj(x, ctx).reshape(b, s, c.num_key_value_heads, c.head_dim)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    if isinstance(cache, _PagedStep):
      return self._paged(q[0], k[0], v[0], ctx, cache)
    if cache is not None:
      keys, values, slots = cache
      rows = jnp.arange(b)[:, None]
      k = keys.at[rows, slots].set(k.astype(keys.dtype))
      v = values.at[rows, slots].set(v.astype(values.dtype))
    q = q.reshape(b, s, c.num_key_value_heads, g, c.head_dim)
    scores = jnp.einsum("bqkgd,bskd->bkgqs", q, k.astype(q.dtype)) * (c.head_dim ** -0.5)
    scores = jnp.where(mask[:, None, None], scores.astype(jnp.float32), -1e30)
    probs = jax.nn.softmax(scores, axis=-1).astype(x.dtype)
    out = jnp.einsum("bkgqs,bskd->bqkgd", probs, v.astype(x.dtype)).reshape(b, s, -1)
    out = self.o_proj(out, ctx)
    return out if cache is None else (out, (k, v))


  def _paged(self, q, k, v, ctx, step: "_PagedStep"):
    """Attention over the pool's KV pages: `(output, pages, new (k, v) or None)`.

    On the TPU kernel path the new keys/values are written into the pages here (the kernel reads
    them there) and the output projection reads its adapter pages from that new version. On the
    reference path the pages are only read: the step's own keys/values are attended in flight
    and returned, and the caller writes them into the pool afterwards in a call of its own, so
    the pool is updated in place (a forward that both reads and writes it makes XLA copy it).
    """
    c, kv = self.config, step.kv
    sliding = step.window or None
    if paged_attention.writes_in_forward():
      q, k, v, pages = jax.lax.optimization_barrier((q, k, v, step.pages))
      page, offset = paged_attention.token_slots(step.tables, kv.token_seq, step.positions,
                                                 kv.block, kv.token_valid)
      pages = paged_attention.write_kv(pages, k, v, page, offset)
      out = paged_attention.ragged_paged_attention(
          q, pages, kv.kv_lens, step.tables, kv.cu_q_lens, kv.num_seqs,
          sm_scale=c.head_dim ** -0.5, max_q=kv.max_q, sliding_window=sliding)
      ctx = ctx.with_pages(pages.reshape(ctx.pool.pages.shape))
      new = None
    else:
      pages, new = step.pages, (k, v)
      out = paged_attention.ragged_paged_attention(
          q, pages, kv.kv_lens, step.tables, kv.cu_q_lens, kv.num_seqs,
          sm_scale=c.head_dim ** -0.5, max_q=kv.max_q, sliding_window=sliding,
          long_seqs=kv.long_seqs, new_kv=new)
    out = self.o_proj(out.reshape(1, q.shape[0], -1).astype(q.dtype), ctx)
    return out, pages, new


@dataclasses.dataclass(frozen=True)
class _PagedStep:
  """One layer's view of a `PagedKV` forward (trace-time only)."""
  pages: jax.Array       # [P, block, 2 * kv_heads, head_dim] the pool's current version
  tables: jax.Array      # [S, pages_per_seq] this layer's page tables
  kv: PagedKV
  positions: jax.Array   # [T]
  window: int            # 0: full attention


class MLP(nnx.Module):
  def __init__(self, config: LlamaConfig, prefix: str, dtype, rngs):
    c = config
    mk = lambda name, i, o: Linear(i, o, path=f"{prefix}.{name}", use_bias=c.mlp_bias,
                                   dtype=dtype, rngs=rngs)
    self.gate_proj = mk("gate_proj", c.hidden_size, c.intermediate_size)
    self.up_proj = mk("up_proj", c.hidden_size, c.intermediate_size)
    self.down_proj = mk("down_proj", c.intermediate_size, c.hidden_size)
    self.act = c.hidden_act

  def __call__(self, x, ctx):
    gate = ACTIVATIONS[self.act](self.gate_proj(x, ctx))
    return self.down_proj(gate * self.up_proj(x, ctx), ctx)


class DecoderLayer(nnx.Module):
  def __init__(self, config: LlamaConfig, index: int, dtype, rngs):
    prefix = f"model.layers.{index}"
    self.window = config.sliding_windows[index] if config.sliding_windows else 0  # 0: full
    self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)
    self.self_attn = Attention(config, f"{prefix}.self_attn", dtype, rngs)
    self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)
    self.mlp = MLP(config, f"{prefix}.mlp", dtype, rngs)

  def __call__(self, x, cos, sin, masks, ctx, cache=None):
    if isinstance(cache, _PagedStep):
      cache = dataclasses.replace(cache, window=self.window)
      attn, pages, new = self.self_attn(self.input_layernorm(x), cos, sin, None, ctx, cache)
      ctx = ctx.with_pages(pages.reshape(ctx.pool.pages.shape))
      x = x + attn
      x = x + self.mlp(self.post_attention_layernorm(x), ctx)
      return x, pages, new
    mask = masks[self.window]
    attn = self.self_attn(self.input_layernorm(x), cos, sin, mask, ctx, cache)
    if cache is not None:
      attn, cache = attn
    x = x + attn
    x = x + self.mlp(self.post_attention_layernorm(x), ctx)
    return x if cache is None else (x, cache)


class Embed(nnx.Module):
  """The token embedding; a LoRA on it (or on a head tied to it) is read from the context."""

  def __init__(self, vocab: int, dim: int, dtype, rngs, *, path: str = "model.embed_tokens",
               tied_head: Optional[str] = None):
    self.path = path
    # The paths whose LoRA this table serves (`FrozenModel.extra_lora_paths`): the embedding,
    # and a head tied to it (which `LlamaForCausalLM.head` projects through the hook).
    self.lora_paths = (path,) + ((tied_head,) if tied_head else ())
    self.embedding = nnx.Param(jax.random.normal(rngs.params(), (vocab, dim), dtype) * 0.02)

  def __call__(self, ids, ctx=None):
    return embedding_lora.lookup(ids, self.embedding[...], ctx, self.path)


class LlamaModel(nnx.Module):
  def __init__(self, config: LlamaConfig, dtype, rngs):
    self.embed_tokens = Embed(config.vocab_size, config.hidden_size, dtype, rngs,
                              tied_head="lm_head" if config.tie_word_embeddings else None)
    self.layers = nnx.List([DecoderLayer(config, i, dtype, rngs)
                            for i in range(config.num_hidden_layers)])
    self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)


class LlamaForCausalLM(nnx.Module):
  """Decoder with a language-model head. Call: `(input_ids, attention_mask, positions, ctx)`.

  Args of `__call__`:
    input_ids: [B, S] int.
    attention_mask: [B, S] 1 for real tokens, 0 for padding (left or right), or None.
    positions: [B, S] int positions, or None for `arange(S)` (as transformers does).
    ctx: the forward context (`jaxadapt.context.Context`), or None for the plain base. With a
      `KVCache` in `ctx.attention` the tokens are the next ones of each row (slots
      `lengths + arange(S)`; positions default to those slots) and the call returns
      `(logits, updated KVCache)`.
  Returns:
    logits [B, S, vocab] in the parameter dtype (and the KVCache, see ctx).
  """

  def __init__(self, config: LlamaConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
    self.config = config
    self.model = LlamaModel(config, dtype, rngs)
    if not config.tie_word_embeddings:
      self.lm_head = Linear(config.hidden_size, config.vocab_size, path="lm_head", dtype=dtype,
                            rngs=rngs)

  def hidden_states(self, input_ids, attention_mask=None, positions=None, ctx=None):
    """The final hidden states [B, S, D]; `(hidden, KVCache)` when `ctx.attention` holds a
    `KVCache` (see `__call__`)."""
    c = self.config
    b, s = input_ids.shape
    cache = None if ctx is None else ctx.attention
    if isinstance(cache, PagedKV):
      return self._paged_hidden(input_ids, positions, ctx)
    if cache is not None and not isinstance(cache, KVCache):
      raise TypeError(f"the Llama family reads a KVCache or PagedKV from ctx.attention, got "
                      f"{type(cache).__name__}")
    keys = (jnp.ones((b, s), bool) if attention_mask is None
            else jnp.asarray(attention_mask).astype(bool))
    qi = jnp.arange(s)[:, None]
    if cache is None:
      ki = jnp.arange(s)[None, :]
      key_valid = keys[:, None, :]
      dist = (qi - ki)[None]                          # [1, Sq, Sk]
    else:  # keys are the cache's slots; the new tokens take the next `s` of every row
      slots = cache.lengths[:, None] + jnp.arange(s, dtype=jnp.int32)[None]  # [B, S]
      valid = cache.valid.at[jnp.arange(b)[:, None], slots].set(keys)
      key_valid = valid[:, None, :]
      dist = slots[:, :, None] - jnp.arange(cache.max_len)[None, None, :]  # [B, Sq, L]
    if positions is None:
      positions = (jnp.broadcast_to(jnp.arange(s), (b, s)) if cache is None else slots)
    x = self.model.embed_tokens(input_ids, ctx)
    cos, sin = rope_cos_sin(c, positions, x.dtype)
    masks = {}
    for w in set(c.sliding_windows or (0,)):
      m = dist >= 0 if w == 0 else (dist >= 0) & (dist < w)
      masks[w] = m & key_valid  # [B, Sq, Sk]
    new_keys, new_values = [], []
    for i, layer in enumerate(self.model.layers):
      if cache is None:
        x = layer(x, cos, sin, masks, ctx)
      else:
        x, (k, v) = layer(x, cos, sin, masks, ctx, (cache.keys[i], cache.values[i], slots))
        new_keys.append(k)
        new_values.append(v)
    h = self.model.norm(x)
    if cache is None:
      return h
    return h, KVCache(keys=tuple(new_keys), values=tuple(new_values), valid=valid,
                      lengths=cache.lengths + s)

  def _paged_hidden(self, input_ids, positions, ctx):
    """`(hidden [1, T, D], pool pages, new keys/values or None)` of a packed forward over
    `PagedKV` (serving). The new keys/values are `(k, v)` each [layers, T, kv_heads, head_dim]
    when the pages were only read (`Attention._paged`): write them with `write_new_kv`."""
    c, kv = self.config, ctx.attention
    if input_ids.shape[0] != 1 or positions is None:
      raise ValueError(f"a PagedKV forward takes packed tokens input_ids [1, T] with their "
                       f"positions; got input_ids {input_ids.shape}, positions "
                       f"{None if positions is None else positions.shape}")
    if ctx.pool is None:
      raise ValueError("a PagedKV forward keeps its KV pages in ctx.pool (an AdapterPool)")
    p, size = ctx.pool.pages.shape
    kv_width = 2 * c.num_key_value_heads * c.head_dim
    if size != kv.block * kv_width:
      raise ValueError(f"pool pages of {size} elements do not hold {kv.block} tokens of K and V "
                       f"({kv.block} x {kv_width} = {kv.block * kv_width})")
    x = self.model.embed_tokens(input_ids, ctx)
    cos, sin = rope_cos_sin(c, positions, x.dtype)
    pages = ctx.pool.pages.reshape(p, kv.block, 2 * c.num_key_value_heads, c.head_dim)
    keys, values = [], []
    for i, layer in enumerate(self.model.layers):
      step = _PagedStep(pages=pages, tables=kv.tables[i], kv=kv, positions=positions[0],
                        window=0)
      x, pages, new = layer(x, cos, sin, None, ctx, step)
      ctx = ctx.with_pages(pages.reshape(p, size))
      if new is not None:
        keys.append(new[0])
        values.append(new[1])
    new_kv = (jnp.stack(keys), jnp.stack(values)) if keys else None
    return self.model.norm(x), ctx.pool.pages, new_kv

  def packed_logits(self, input_ids, positions, select, ctx=None):
    """The serving step: `(logits [S, vocab] at packed token indices `select [S]`, pool pages,
    new keys/values or None)` of a `PagedKV` forward (see `_paged_hidden`)."""
    h, pages, new_kv = self._paged_hidden(input_ids, positions, ctx)
    return self.head(h[0][select][None], ctx.with_pages(pages))[0], pages, new_kv

  def head(self, h, ctx=None):
    """The language-model head: logits [..., vocab] of final hidden states [..., D]."""
    if self.config.tie_word_embeddings:
      return project(h, self.model.embed_tokens.embedding[...].T, None, ctx, "lm_head")
    return self.lm_head(h, ctx)

  def __call__(self, input_ids, attention_mask=None, positions=None, ctx=None):
    out = self.hidden_states(input_ids, attention_mask, positions, ctx)
    h, cache = out if isinstance(out, tuple) else (out, None)
    logits = self.head(h, ctx)
    return logits if cache is None else (logits, cache)

  def last_logits(self, input_ids, attention_mask=None, positions=None, ctx=None):
    """`(logits [B, vocab] of each row's last token, updated KVCache)`: generation's step.

    `ctx.attention` must hold a `KVCache`; the head runs on the last position only (a prefill
    of S tokens costs one head matmul per row, not S).
    """
    h, cache = self.hidden_states(input_ids, attention_mask, positions, ctx)
    return self.head(h[:, -1:], ctx)[:, 0], cache


def load_llama(directory: str, *, dtype=jnp.float32, sharding: ShardingArg = None):
  """Loads a Hugging Face Llama/Mistral/Qwen2 dir (config.json + safetensors).

  Args:
    directory: dir with config.json and model.safetensors (or a sharded index).
    dtype: parameter dtype.
    sharding: None, a Sharding, a Mesh or callable(path, shape) (see `jaxadapt.io.hf`).

  Returns:
    (config, graphdef, params as a pure dict), params memory-mapped and placed as they load.

  Raises:
    ValueError: config.json lacks a key the architecture needs, or asks for something
      `LlamaConfig.from_hf` refuses.
  """
  cfg = read_config(directory)
  missing = [k for k in _REQUIRED_KEYS if cfg.get(k) is None]
  if missing and cfg.get("model_type") in SUPPORTED_MODEL_TYPES:
    raise ValueError(f"{os.path.join(directory, 'config.json')} lacks {missing}, which a "
                     f"{cfg['model_type']} config needs ({list(_REQUIRED_KEYS)}); is it the "
                     f"config.json that came with the weights?")
  config = LlamaConfig.from_hf(cfg)
  graphdef, params = frozen.load_params(
      directory, lambda: LlamaForCausalLM(config, dtype=dtype, rngs=nnx.Rngs(0)), dtype=dtype,
      sharding=sharding, stem="model", name_fn=torch_name)
  return config, graphdef, params
