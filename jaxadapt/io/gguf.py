"""llama.cpp GGUF checkpoints into a frozen Llama-family `CausalLM`.

`load_gguf("model.gguf")` parses the header (memory-mapped; the tokenizer's large metadata arrays
are skipped), rebuilds the `LlamaConfig` from the metadata, and dequantizes the weights to the
requested dtype tensor by tensor, a block of rows at a time (float32 only ever holds one block of
rows, about 16 MB), placing each tensor on its sharding as it loads. The tokenizer and chat
template are those the metadata holds, built as transformers builds them
(`AutoTokenizer.from_pretrained(dir, gguf_file=name)`), lazily, on first use of `model.tokenizer`.

Facts of the format that the loader undoes (llama.cpp's `convert_hf_to_gguf.py`):
- A tensor's shape is listed innermost first (`ne`): a torch `[out, in]` weight is `ne = [in, out]`,
  rows of `in` values, each row a whole number of quantization blocks.
- For the `llama` architecture the converter permutes the rows of `q_proj`/`k_proj` (weights and
  biases) from Hugging Face's rotate-half RoPE layout to llama.cpp's interleaved pairs: within each
  head, row `2 i + j` of the file is row `j * head_dim / 2 + i` of the model. `qwen2` files keep
  Hugging Face's layout (llama.cpp runs them with rotate-half RoPE).
- Tied embeddings: the file has no `output.weight`.
- Llama 3.x files store the Llama-3 RoPE scaling as a `rope_freqs.weight` tensor of per-frequency
  divisors instead of metadata; jaxadapt applies it as a LongRoPE scaling with those factors and
  attention factor 1 (`inv_freq / factor` per frequency, the same numbers).

Block formats (ggml's `ggml-common.h`; each block is little-endian, scales are float16):
  Q8_0  32 values:  d, int8 q[32]                           x = d q
  Q4_0  32 values:  d, nibbles[16]                          x = d (q - 8)
  Q4_1  32 values:  d, m, nibbles[16]                       x = d q + m
  Q5_0  32 values:  d, high bits u32, nibbles[16]           x = d (q - 16)
  Q5_1  32 values:  d, m, high bits u32, nibbles[16]        x = d q + m
  Q4_K  256 values: d, dmin, 6-bit scales/mins[12], nibbles[128]; 8 sub-blocks of 32:
                    x = d sc_j q - dmin m_j
  Q5_K  256 values: as Q4_K plus high bits[32]
  Q6_K  256 values: low nibbles[128], high 2 bits[64], int8 scales[16], d; 16 sub-blocks of 16:
                    x = d sc_j (q - 32)
Nibbles: in Q4_0/Q4_1/Q5_0/Q5_1 byte `i` holds value `i` (low) and `i + 16` (high); in the K types
each 32 bytes hold 64 values: 32 low nibbles, then 32 high nibbles.

transformers builds the same model from a GGUF file (`from_pretrained(dir, gguf_file=...)`), but
ignores RoPE scaling metadata and `rope_freqs.weight`; jaxadapt applies them as llama.cpp does.
"""
from __future__ import annotations

import dataclasses
import functools
import mmap
import os
import struct
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from gguf import GGUF_DEFAULT_ALIGNMENT, GGMLQuantizationType, GGUFValueType
from tqdm.auto import tqdm

from jaxadapt import paths
from jaxadapt.causal_lm import CausalLM
from jaxadapt.io.files import float_dtype
from jaxadapt.io.hf import ShardingArg, _resolve_sharding
from jaxadapt.models.llama import LlamaConfig, LlamaForCausalLM

# GGUF architectures jaxadapt loads, and the Hugging Face model_type each becomes. Mistral files use
# the `llama` architecture (llama.cpp runs them as Llama: no sliding window).
SUPPORTED_ARCHITECTURES = {"llama": "llama", "qwen2": "qwen2"}
# Architectures whose q/k rows llama.cpp's converter permuted for its interleaved RoPE.
_PERMUTED_QK = ("llama",)
_ROWS_PER_CHUNK_ELEMS = 1 << 22  # dequantize about this many values at a time (16 MB of float32)


def _f16(blocks: np.ndarray, start: int) -> np.ndarray:
  """The float16 at byte `start` of each block, as float32 [n, 1]."""
  return blocks[:, start:start + 2].copy().view(np.float16).astype(np.float32)


def _split_nibbles(q: np.ndarray) -> np.ndarray:
  """[n, 16] bytes -> [n, 32] values: low nibbles (values 0-15), then high (values 16-31)."""
  return np.concatenate([q & 0x0F, q >> 4], axis=1)


def _high_bits(qh: np.ndarray) -> np.ndarray:
  """[n, 4] bytes of a little-endian u32 -> [n, 32] bits, bit `i` for value `i`."""
  return np.unpackbits(qh, axis=1, bitorder="little")


def _q8_0(b):
  return _f16(b, 0) * b[:, 2:].view(np.int8).astype(np.float32)


def _q4_0(b):
  return _f16(b, 0) * (_split_nibbles(b[:, 2:]).astype(np.float32) - 8)


def _q4_1(b):
  return _f16(b, 0) * _split_nibbles(b[:, 4:]).astype(np.float32) + _f16(b, 2)


def _q5_0(b):
  q = _split_nibbles(b[:, 6:]) | (_high_bits(b[:, 2:6]) << 4)
  return _f16(b, 0) * (q.astype(np.float32) - 16)


def _q5_1(b):
  q = _split_nibbles(b[:, 8:]) | (_high_bits(b[:, 4:8]) << 4)
  return _f16(b, 0) * q.astype(np.float32) + _f16(b, 2)


def _k_scales_mins(s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """The 8 six-bit scales and mins [n, 8] packed in 12 bytes `s [n, 12]` (Q4_K, Q5_K).

  Sub-blocks 0-3: scale = s[j] & 63, min = s[j + 4] & 63. Sub-blocks 4-7: the low 4 bits are the
  nibbles of s[j + 4] (scale low, min high), the high 2 bits the top bits of s[j - 4] (scale) and
  s[j] (min).
  """
  lo, mid, hi = s[:, 0:4], s[:, 4:8], s[:, 8:12]
  scales = np.concatenate([lo & 63, (hi & 0x0F) | ((lo >> 6) << 4)], axis=1)
  mins = np.concatenate([mid & 63, (hi >> 4) | ((mid >> 6) << 4)], axis=1)
  return scales.astype(np.float32), mins.astype(np.float32)


def _k_nibbles(qs: np.ndarray) -> np.ndarray:
  """[n, 128] bytes -> [n, 8, 32]: each 32 bytes give sub-block 2c (low nibbles) and 2c+1 (high)."""
  q = qs.reshape(-1, 4, 1, 32)
  return np.concatenate([q & 0x0F, q >> 4], axis=2).reshape(-1, 8, 32)


def _q4_k(b):
  d, dmin = _f16(b, 0), _f16(b, 2)
  scales, mins = _k_scales_mins(b[:, 4:16])
  q = _k_nibbles(b[:, 16:144]).astype(np.float32)
  return ((d * scales)[:, :, None] * q - (dmin * mins)[:, :, None]).reshape(-1, 256)


def _q5_k(b):
  d, dmin = _f16(b, 0), _f16(b, 2)
  scales, mins = _k_scales_mins(b[:, 4:16])
  # qh [n, 32]: bit j of byte l is the fifth bit of value l of sub-block j.
  high = np.unpackbits(b[:, 16:48, None], axis=2, bitorder="little").transpose(0, 2, 1)
  q = (_k_nibbles(b[:, 48:176]) | (high << 4)).astype(np.float32)
  return ((d * scales)[:, :, None] * q - (dmin * mins)[:, :, None]).reshape(-1, 256)


def _q6_k(b):
  ql, qh = b[:, 0:128].reshape(-1, 2, 2, 32), b[:, 128:192].reshape(-1, 2, 1, 32)
  scales = b[:, 192:208].view(np.int8).astype(np.float32)  # [n, 16], one per 16 values
  d = _f16(b, 208)
  # Each half (128 values) has 64 ql bytes and 32 qh bytes; its four runs of 32 values take the
  # low nibbles of ql[0:32], of ql[32:64], then the high nibbles, with qh bits 0-1, 2-3, 4-5, 6-7.
  low = np.concatenate([ql & 0x0F, ql >> 4], axis=2)          # [n, 2, 4, 32]
  high = (qh >> np.array([0, 2, 4, 6], np.uint8)[:, None]) & 3  # [n, 2, 4, 32]
  q = ((low | (high << 4)).astype(np.float32) - 32).reshape(-1, 16, 16)
  return ((d * scales)[:, :, None] * q).reshape(-1, 256)


def _f32(b):
  return b.copy().view(np.float32)


def _f16_values(b):
  return b.copy().view(np.float16).astype(np.float32)


def _bf16(b):
  return (b.copy().view(np.uint16).astype(np.uint32) << 16).view(np.float32)


# GGML type name -> (values per block, bytes per block, fn: raw blocks [n, bytes] -> float32
# [n, values]).
DEQUANTIZERS: dict[str, tuple[int, int, Callable[[np.ndarray], np.ndarray]]] = {
    "F32": (1, 4, _f32),
    "F16": (1, 2, _f16_values),
    "BF16": (1, 2, _bf16),
    "Q8_0": (32, 34, _q8_0),
    "Q4_0": (32, 18, _q4_0),
    "Q4_1": (32, 20, _q4_1),
    "Q5_0": (32, 22, _q5_0),
    "Q5_1": (32, 24, _q5_1),
    "Q4_K": (256, 144, _q4_k),
    "Q5_K": (256, 176, _q5_k),
    "Q6_K": (256, 210, _q6_k),
}


def _type_name(qtype) -> str:
  """The GGML type's name (`"Q4_K"`) of an enum member or its number."""
  try:
    return GGMLQuantizationType(int(qtype)).name
  except ValueError:
    return f"unknown type {int(qtype)}"


def _dequantizer(qtype, what: str):
  """(values per block, bytes per block, fn) of a GGML type.

  Raises:
    ValueError: a type jaxadapt does not dequantize (naming it and the supported ones).
  """
  name = _type_name(qtype)
  if name not in DEQUANTIZERS:
    raise ValueError(f"{what} has GGML tensor type {name}, which jaxadapt cannot dequantize; it "
                     f"reads {', '.join(DEQUANTIZERS)}. Convert the file to one of these types "
                     f"(e.g. llama.cpp's llama-quantize ... Q4_K_M or Q8_0).")
  return DEQUANTIZERS[name]


def dequantize(data: np.ndarray, qtype) -> np.ndarray:
  """Raw GGUF tensor bytes as float32 values (the numbers ggml computes from them).

  Args:
    data: uint8 `[..., row_bytes]`, each row a whole number of blocks of `qtype` (float types as
      their raw bytes too).
    qtype: a `gguf.GGMLQuantizationType` (or its number), one of `DEQUANTIZERS`.

  Returns:
    float32 `[..., row_values]` (the `gguf.quants.dequantize` result of the same bytes).

  Raises:
    ValueError: an unsupported type, or rows that are not a whole number of blocks.
  """
  values, size, fn = _dequantizer(qtype, "the data")
  data = np.asarray(data)
  if data.dtype != np.uint8:
    data = np.ascontiguousarray(data).view(np.uint8)
  if data.ndim == 0 or data.shape[-1] % size:
    raise ValueError(f"{_type_name(qtype)} rows must be a whole number of {size}-byte blocks; got "
                     f"data of shape {data.shape}")
  rows = data.shape[:-1]
  out = fn(np.ascontiguousarray(data).reshape(-1, size))
  return out.reshape(*rows, data.shape[-1] // size * values)


# ---------------------------------------------------------------------------------------------
# Reading the file: header, metadata, tensor table (GGUF v2/v3, little-endian; llama.cpp's
# `docs/gguf.md`). The metadata's large arrays (the tokenizer's tokens, merges, scores) are
# skipped: only their lengths are kept; transformers reads them when the tokenizer is built.

# GGUF metadata value types of fixed size: struct format.
_SCALARS = {
    GGUFValueType.UINT8: "<B", GGUFValueType.INT8: "<b", GGUFValueType.UINT16: "<H",
    GGUFValueType.INT16: "<h", GGUFValueType.UINT32: "<I", GGUFValueType.INT32: "<i",
    GGUFValueType.FLOAT32: "<f", GGUFValueType.BOOL: "<?", GGUFValueType.UINT64: "<Q",
    GGUFValueType.INT64: "<q", GGUFValueType.FLOAT64: "<d",
}
_MAX_ARRAY_KEPT = 4096  # arrays longer than this are skipped (their length is kept)


@dataclasses.dataclass(frozen=True)
class TensorInfo:
  """One entry of a GGUF tensor table."""
  name: str
  ne: tuple        # shape, innermost (contiguous) dimension first, as ggml lists it
  qtype: int       # a GGMLQuantizationType number
  offset: int      # absolute byte offset of the data in the file

  @property
  def shape(self) -> tuple:
    """The shape in numpy order (a torch `[out, in]` weight has `ne = (in, out)`)."""
    return tuple(reversed(self.ne))


@dataclasses.dataclass(frozen=True)
class GGUFFile:
  """A parsed GGUF file: its metadata, tensor table and memory-mapped bytes."""
  path: str
  metadata: dict        # key -> int/float/bool/str or a list (arrays up to _MAX_ARRAY_KEPT)
  array_lengths: dict   # key -> length, for every array (kept or skipped)
  tensors: dict         # name -> TensorInfo, in file order
  data: np.ndarray      # the whole file as uint8 (memory-mapped)


class _Cursor:
  """Reads little-endian values from a buffer; a read past its end is a truncated file."""

  def __init__(self, buf, path: str):
    self.buf, self.pos, self.path = buf, 0, path

  def take(self, fmt: str):
    size = struct.calcsize(fmt)
    if self.pos + size > len(self.buf):
      raise ValueError(f"{self.path}: truncated or corrupt GGUF file: its header needs more than "
                       f"the {len(self.buf)} bytes it has (reading at byte {self.pos})")
    value = struct.unpack_from(fmt, self.buf, self.pos)[0]
    self.pos += size
    return value

  def string(self, what: str) -> str:
    n = self.take("<Q")
    if self.pos + n > len(self.buf):
      raise ValueError(f"{self.path}: truncated or corrupt GGUF file: {what} claims {n} bytes at "
                       f"byte {self.pos}, the file has {len(self.buf)}")
    raw = self.buf[self.pos:self.pos + n]
    self.pos += n
    return raw.decode("utf-8", errors="replace")

  def value(self, kind: int, key: str):
    if kind == GGUFValueType.STRING:
      return self.string(f"the value of {key!r}")
    if kind in _SCALARS:
      return self.take(_SCALARS[kind])
    raise ValueError(f"{self.path}: corrupt GGUF metadata: {key!r} has value type {kind} (expected "
                     f"0-12)")


def read_gguf(path: str) -> GGUFFile:
  """Parses a GGUF file's header, metadata and tensor table (the tensor data stays mapped).

  Args:
    path: a `.gguf` file.

  Returns:
    A `GGUFFile`.

  Raises:
    ValueError: not a GGUF file (magic), an unsupported version, or a truncated/corrupt file
      (naming the byte where it fails).
  """
  size = os.path.getsize(path)
  if size < 24:
    raise ValueError(f"{path}: not a GGUF file: {size} bytes (a GGUF header alone is 24)")
  with open(path, "rb") as f:
    buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
  if buf[:4] != b"GGUF":
    raise ValueError(f"{path}: not a GGUF file (expected the magic bytes b'GGUF' at the start, "
                     f"found {buf[:4]!r})")
  cur = _Cursor(buf, path)
  cur.pos = 4
  version = cur.take("<I")
  if version not in (2, 3):
    hint = " (a big-endian file?)" if version > 0xFFFF else ""
    raise ValueError(f"{path}: GGUF version {version} is not supported{hint}; jaxadapt reads "
                     f"little-endian versions 2 and 3")
  n_tensors, n_kv = cur.take("<Q"), cur.take("<Q")
  if n_tensors > size or n_kv > size:
    raise ValueError(f"{path}: corrupt GGUF header: {n_tensors} tensors and {n_kv} metadata keys "
                     f"in a {size}-byte file")
  metadata, lengths = {}, {}
  for _ in range(n_kv):
    key = cur.string("a metadata key")
    kind = cur.take("<I")
    if kind != GGUFValueType.ARRAY:
      metadata[key] = cur.value(kind, key)
      continue
    item, count = cur.take("<I"), cur.take("<Q")
    lengths[key] = count
    if item in _SCALARS:
      width = struct.calcsize(_SCALARS[item])
      if cur.pos + count * width > size:
        raise ValueError(f"{path}: truncated or corrupt GGUF file: array {key!r} of {count} "
                         f"values runs past its {size} bytes")
      if count <= _MAX_ARRAY_KEPT:
        metadata[key] = list(struct.unpack_from(f"<{count}{_SCALARS[item][1]}", buf, cur.pos))
      cur.pos += count * width
    elif item == GGUFValueType.STRING:
      values = [cur.string(f"an entry of {key!r}") for _ in range(count)]
      if count <= _MAX_ARRAY_KEPT:
        metadata[key] = values
    else:
      raise ValueError(f"{path}: GGUF metadata {key!r} is an array of type {item}; jaxadapt reads "
                       f"arrays of scalars and strings")
  infos = []
  for _ in range(n_tensors):
    name = cur.string("a tensor name")
    n_dims = cur.take("<I")
    if not 1 <= n_dims <= 4:
      raise ValueError(f"{path}: corrupt GGUF tensor table: {name!r} has {n_dims} dims "
                       f"(expected 1-4)")
    ne = tuple(cur.take("<Q") for _ in range(n_dims))
    infos.append((name, ne, cur.take("<I"), cur.take("<Q")))
  align = int(metadata.get("general.alignment", GGUF_DEFAULT_ALIGNMENT))
  start = -(-cur.pos // align) * align
  data = np.frombuffer(buf, np.uint8)
  tensors = {name: TensorInfo(name, ne, qtype, start + offset) for name, ne, qtype, offset in infos}
  return GGUFFile(path, metadata, lengths, tensors, data)


def _tensor_bytes(t: TensorInfo, path: str) -> tuple[int, int, int, int, Callable]:
  """(rows, bytes per row, values per row, bytes per block, block dequantizer) of a tensor.

  Raises:
    ValueError: an unsupported type, or a row that is not a whole number of its blocks.
  """
  values, size, fn = _dequantizer(t.qtype, f"{path}: tensor {t.name!r}")
  row_len = t.ne[0]
  if row_len % values:
    raise ValueError(f"{path}: tensor {t.name!r} rows of {row_len} values are not a whole number "
                     f"of {_type_name(t.qtype)} blocks ({values} values)")
  return int(np.prod(t.ne[1:], dtype=np.int64)), row_len // values * size, row_len, size, fn


def _hf_config(file: GGUFFile) -> dict:
  """A Hugging Face `config.json` dict for the model the metadata describes.

  Raises:
    ValueError: an unsupported architecture, a missing key, or something jaxadapt cannot serve.
  """
  meta, lengths, tensors, path = file.metadata, file.array_lengths, file.tensors, file.path
  arch = meta.get("general.architecture")
  if arch not in SUPPORTED_ARCHITECTURES:
    raise ValueError(f"{path}: GGUF architecture {arch!r} is not supported; jaxadapt loads "
                     f"{sorted(SUPPORTED_ARCHITECTURES)} (the Llama family)")

  def key(name, default=None, required=False):
    value = meta.get(f"{arch}.{name}", default)
    if required and value is None:
      raise ValueError(f"{path}: GGUF metadata lacks {arch}.{name}, which a {arch} model needs")
    return value

  heads = key("attention.head_count", required=True)
  kv_heads = key("attention.head_count_kv", heads)
  for name, value in (("attention.head_count", heads), ("attention.head_count_kv", kv_heads)):
    if isinstance(value, list):  # per-layer counts (hybrid models): one value for Llama
      if len(set(value)) != 1:
        raise ValueError(f"{path}: {arch}.{name} differs per layer ({value}); jaxadapt's Llama "
                         f"family needs one count for every layer")
  heads = heads[0] if isinstance(heads, list) else heads
  kv_heads = kv_heads[0] if isinstance(kv_heads, list) else kv_heads
  hidden = key("embedding_length", required=True)
  head_dim = key("attention.key_length") or key("rope.dimension_count") or hidden // heads
  rope_dim = key("rope.dimension_count", head_dim)
  if rope_dim != head_dim:
    raise ValueError(f"{path}: {arch}.rope.dimension_count is {rope_dim}, the head dim "
                     f"{head_dim}; jaxadapt applies RoPE to the whole head (partial rotary is "
                     f"not supported)")
  embed = tensors.get("token_embd.weight", TensorInfo("", (), 0, 0))
  vocab = key("vocab_size") or lengths.get("tokenizer.ggml.tokens") or (
      int(embed.ne[1]) if len(embed.ne) == 2 else None)
  context = key("context_length", 2048)
  cfg = {
      "model_type": SUPPORTED_ARCHITECTURES[arch],
      "vocab_size": vocab,
      "hidden_size": hidden,
      "intermediate_size": key("feed_forward_length", required=True),
      "num_hidden_layers": key("block_count", required=True),
      "num_attention_heads": heads,
      "num_key_value_heads": kv_heads,
      "head_dim": head_dim,
      "rms_norm_eps": key("attention.layer_norm_rms_epsilon", 1e-5),
      "rope_theta": key("rope.freq_base", 10000.0),
      "max_position_embeddings": context,
      "tie_word_embeddings": "output.weight" not in tensors,
      "hidden_act": "silu",
  }
  if arch == "llama":  # Llama's optional biases show as tensors (Qwen2 always has q/k/v biases)
    cfg["attention_bias"] = "blk.0.attn_q.bias" in tensors
    cfg["mlp_bias"] = "blk.0.ffn_gate.bias" in tensors
  rope = _rope_scaling(meta, arch, context, path)
  if rope is not None:
    cfg["rope_scaling"] = rope
  return cfg


def _rope_scaling(meta: dict, arch: str, context: int, path: str) -> Optional[dict]:
  """HF `rope_scaling` for the metadata's `rope.scaling.*` keys (None: no scaling)."""
  kind = meta.get(f"{arch}.rope.scaling.type")
  factor = meta.get(f"{arch}.rope.scaling.factor")
  if kind is None and meta.get(f"{arch}.rope.scale_linear"):  # the older key
    kind, factor = "linear", meta[f"{arch}.rope.scale_linear"]
  if kind in (None, "none") or (kind == "linear" and factor in (None, 1.0)):
    return None
  if kind == "linear":
    return {"rope_type": "linear", "factor": float(factor)}
  if kind == "yarn":
    original = meta.get(f"{arch}.rope.scaling.original_context_length") or context
    rope = {"rope_type": "yarn", "factor": float(factor),
            "original_max_position_embeddings": int(original)}
    for gguf_key, hf_key in (("yarn_beta_fast", "beta_fast"), ("yarn_beta_slow", "beta_slow")):
      value = meta.get(f"{arch}.rope.scaling.{gguf_key}")
      if value is not None:
        rope[hf_key] = float(value)
    return rope
  raise ValueError(f"{path}: {arch}.rope.scaling.type {kind!r} is not supported; jaxadapt reads "
                   f"'none', 'linear' and 'yarn' (and Llama 3's rope_freqs.weight)")


# jaxadapt module path suffix (after `model.layers.{i}.`) -> GGUF tensor name (after `blk.{i}.`).
_LAYER_NAMES = {
    "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
_TOP_NAMES = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}


def gguf_name(path: str) -> str:
  """A jaxadapt param path's GGUF tensor name: `model.layers.3.self_attn.q_proj.kernel` ->
  `blk.3.attn_q.weight` (kernels, embeddings and norm weights are `weight`; biases `bias`)."""
  stem, leaf = path.rsplit(".", 1)
  suffix = "bias" if leaf == "bias" else "weight"
  if stem in _TOP_NAMES:
    return f"{_TOP_NAMES[stem]}.{suffix}"
  parts = stem.split(".")
  if parts[:2] == ["model", "layers"] and ".".join(parts[3:]) in _LAYER_NAMES:
    return f"blk.{parts[2]}.{_LAYER_NAMES['.'.join(parts[3:])]}.{suffix}"
  raise KeyError(f"no GGUF tensor name for jaxadapt param {path!r}")


def _unpermute_rows(n_rows: int, n_heads: int) -> np.ndarray:
  """`src` such that model row `r` of a q/k projection is file row `src[r]` (see the module doc:
  file row `2 i + j` of a head holds model row `j * half + i`)."""
  half = n_rows // n_heads // 2
  return np.arange(n_rows).reshape(n_heads, half, 2).transpose(0, 2, 1).reshape(-1)


def _check_in_file(file: GGUFFile, t: TensorInfo, n_bytes: int) -> None:
  """Raises ValueError if the tensor's data runs past the end of the file."""
  if t.offset + n_bytes > file.data.size:
    raise ValueError(f"{file.path}: truncated GGUF file: tensor {t.name!r} ends at byte "
                     f"{t.offset + n_bytes}, the file has {file.data.size}. Was the download or "
                     f"copy cut short?")


def _read_tensor(file: GGUFFile, t: TensorInfo, *, dtype, transpose: bool = False,
                 rows_from: Optional[np.ndarray] = None) -> np.ndarray:
  """One GGUF tensor dequantized into a host array of `dtype`, a block of rows at a time.

  Args:
    file: the parsed file (its memory map).
    t: the tensor.
    dtype: the numpy dtype of the result.
    transpose: a 2-D weight into jaxadapt's `[in, out]` kernel layout.
    rows_from: model row r is file row rows_from[r] (the q/k RoPE permutation), or None.

  Returns:
    The tensor in numpy order (`t.shape`), or `[in, out]` when `transpose`.

  Raises:
    ValueError: an unsupported tensor type, or data past the end of the file.
  """
  n_rows, row_bytes, row_len, size, fn = _tensor_bytes(t, file.path)
  _check_in_file(file, t, n_rows * row_bytes)
  raw = file.data[t.offset:t.offset + n_rows * row_bytes].reshape(n_rows, row_bytes)
  out = np.empty((row_len, n_rows) if transpose else (n_rows, row_len), dtype)
  to_model = None if rows_from is None else np.argsort(rows_from)  # file row -> model row
  step = max(1, _ROWS_PER_CHUNK_ELEMS // row_len)
  for r0 in range(0, n_rows, step):
    block = raw[r0:r0 + step]
    x = fn(np.ascontiguousarray(block).reshape(-1, size)).reshape(block.shape[0], row_len)
    x = x.astype(dtype, copy=False)
    dest = slice(r0, r0 + x.shape[0]) if to_model is None else to_model[r0:r0 + x.shape[0]]
    if transpose:
      out[:, dest] = x.T
    else:
      out[dest] = x
  return out if transpose else out.reshape(t.shape)


def _check_tensors(file: GGUFFile, leaves: dict, arch: str) -> None:
  """Checks, before anything is read, that the file holds exactly the tensors of the model the
  metadata describes, each of a readable type, the shape the model needs, inside the file.

  Args:
    file: the parsed file.
    leaves: GGUF tensor name -> (jaxadapt param path, abstract leaf with the shape it needs).
    arch: the GGUF architecture (for messages).

  Raises:
    ValueError: naming the first tensors that are unexpected, missing, of an unsupported type,
      of the wrong shape, or past the end of the file.
  """
  tensors, path = file.tensors, file.path
  unknown = sorted(set(tensors) - set(leaves) - {"rope_freqs.weight"})
  if unknown:
    raise ValueError(f"{path}: tensors {unknown[:5]} are not part of a {arch} model as jaxadapt "
                     f"builds it from this metadata (it expects {sorted(leaves)[:3]} ...)")
  missing = sorted(set(leaves) - set(tensors))
  if missing:
    raise ValueError(f"{path}: no tensor {missing[:5]} (needed for "
                     f"{[leaves[m][0] for m in missing[:5]]}); the file has e.g. "
                     f"{sorted(tensors)[:5]}")
  for name, (param, leaf) in leaves.items():
    t = tensors[name]
    shape = tuple(reversed(t.shape)) if param.endswith(".kernel") else t.shape  # jaxadapt layout
    if shape != tuple(leaf.shape):
      raise ValueError(f"{path}: tensor {name!r} has shape {shape} in jaxadapt's layout (ggml ne "
                       f"{list(t.ne)}); the metadata implies {tuple(leaf.shape)} for {param}")
    n_rows, row_bytes = _tensor_bytes(t, path)[:2]
    _check_in_file(file, t, n_rows * row_bytes)


class GGUFCausalLM(CausalLM):
  """A `CausalLM` loaded from a GGUF file: `directory` is the file's dir and `gguf_file` its name;
  the tokenizer (with its chat template) is built from the file's metadata on first use."""

  @functools.cached_property
  def tokenizer(self):
    """The tokenizer the GGUF metadata describes, as transformers builds it from the file."""
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(self.directory, gguf_file=self.gguf_file,
                                         local_files_only=True)


def load_gguf(path: str, *, dtype=jnp.float32, sharding: ShardingArg = None) -> GGUFCausalLM:
  """Loads a llama.cpp GGUF file (Llama or Qwen2 architecture) as a frozen `CausalLM`.

  Args:
    path: a `.gguf` file (one file; split `-00001-of-0000N.gguf` sets are not supported).
    dtype: a floating dtype for the params; every tensor is dequantized to it as it loads.
    sharding: None, a Sharding, a Mesh (jaxadapt.sharding rules) or callable(path, shape).

  Returns:
    A `GGUFCausalLM` (a `CausalLM`) with `directory` the file's dir and `gguf_file` its name;
    `model.tokenizer` is built from the metadata on first use.

  Raises:
    ValueError: not a GGUF file, a truncated or corrupt one, an unsupported architecture or
      tensor type, metadata the architecture needs missing, tensors that do not fit it, or a
      dtype that is not floating.
  """
  path = os.fspath(path)
  file = read_gguf(path)
  tensors = file.tensors
  cfg = _hf_config(file)
  arch = file.metadata["general.architecture"]
  if "rope_freqs.weight" in tensors and "rope_scaling" not in cfg:
    # Llama 3.x: per-frequency divisors of inv_freq (its Llama-3 scaling, precomputed).
    factors = _read_tensor(file, tensors["rope_freqs.weight"], dtype=np.float32).reshape(-1)
    if factors.shape != (cfg["head_dim"] // 2,):
      raise ValueError(f"{path}: rope_freqs.weight has {factors.size} factors; the head dim "
                       f"{cfg['head_dim']} needs {cfg['head_dim'] // 2}")
    cfg["rope_scaling"] = {"rope_type": "longrope", "short_factor": factors.tolist(),
                           "long_factor": factors.tolist(), "attention_factor": 1.0,
                           "original_max_position_embeddings": cfg["max_position_embeddings"]}
  config = LlamaConfig.from_hf(cfg)
  dtype = float_dtype(dtype)
  graphdef, state = nnx.split(nnx.eval_shape(
      lambda: LlamaForCausalLM(config, dtype=dtype, rngs=nnx.Rngs(0))))
  shapes = nnx.to_pure_dict(state)
  leaves = {}  # GGUF tensor name -> (param path, abstract leaf)
  paths.map_with_paths(lambda p, leaf: leaves.setdefault(gguf_name(p), (p, leaf)), shapes)
  _check_tensors(file, leaves, arch)
  place = _resolve_sharding(sharding)
  heads = {"q_proj": config.num_attention_heads, "k_proj": config.num_key_value_heads}
  bar = tqdm(total=len(leaves), desc="Dequantizing GGUF tensors", disable=None, leave=False)

  def load(param, leaf):
    kernel = param.endswith(".kernel")
    module = param.rsplit(".", 2)[-2]
    rows_from = None  # the q/k RoPE permutation over the output features
    if arch in _PERMUTED_QK and module in heads:
      rows_from = _unpermute_rows(leaf.shape[-1], heads[module])
    host = _read_tensor(file, tensors[gguf_name(param)], dtype=dtype, transpose=kernel,
                        rows_from=rows_from if kernel else None)
    if rows_from is not None and not kernel:  # a bias: one row of output features
      host = host[rows_from]
    target = place(param, host.shape)
    bar.update()
    return jax.device_put(host, target) if target is not None else jnp.asarray(host)

  try:
    params = paths.map_with_paths(load, shapes)
  finally:
    bar.close()
  model = GGUFCausalLM(config, graphdef, params)
  model.directory = os.path.dirname(os.path.abspath(path))
  model.gguf_file = os.path.basename(path)
  return model
