"""Attention over a paged KV cache (S-LoRA Sec. 4.1's unified pool holds the pages).

Layout, shared with jax's TPU kernel (`jax.experimental.pallas.ops.tpu.ragged_paged_attention`):
  * `kv_pages [P, block, 2 * kv_heads, head_dim]`: a page holds `block` consecutive tokens of
    one layer; keys and values interleaved on the head axis (k0, v0, k1, v1, ...).
  * queries are ragged: `q [T, heads, head_dim]` packs the new tokens of every sequence in
    order; sequence i owns `q[cu_q_lens[i]:cu_q_lens[i + 1]]`, which are the *last* tokens of
    its `kv_lens[i]` cached tokens (their keys and values are written first, `write_kv`), so
    query j of sequence i sits at position `kv_lens[i] - q_len_i + j`. Causal; an optional
    sliding window keeps keys with `position(q) - position(k) < window`.
  * `page_indices [S, pages_per_seq]`: the pages of each sequence, in token order.

`ragged_paged_attention` runs jax's Pallas kernel on TPU and the jnp reference elsewhere; the
reference scatters the ragged queries into a `[S, max_q]` rectangle (`max_q` static: the engine
passes the step's bucket of the longest query run) and gathers each sequence's pages.
"""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from kernels_pallas import ops

MASK = -1e30


def write_kv(kv_pages: jax.Array, k: jax.Array, v: jax.Array, page: jax.Array,
             offset: jax.Array) -> jax.Array:
  """`kv_pages` with token t's key and value written at `[page[t], offset[t]]`.

  Args:
    kv_pages: [P, block, 2 * kv_heads, head_dim].
    k, v: [T, kv_heads, head_dim].
    page, offset: [T] int32 (padding tokens point at a scratch page nobody reads).
  """
  t, h, d = k.shape
  kv = jnp.stack([k, v], axis=2).reshape(t, 2 * h, d).astype(kv_pages.dtype)
  return kv_pages.at[page, offset].set(kv, mode="promise_in_bounds")


def write_layers(kv_pages: jax.Array, k: jax.Array, v: jax.Array, tables: jax.Array,
                 seq: jax.Array, pos: jax.Array, valid: jax.Array) -> jax.Array:
  """`kv_pages` with every layer's new keys/values written (one scatter for all layers).

  Args:
    kv_pages: [P, block, 2 * kv_heads, head_dim].
    k, v: [L, T, kv_heads, head_dim].
    tables: [L, S, pages_per_seq] each layer's page tables.
    seq, pos, valid: [T] each token's sequence, position and whether it is real.
  """
  layers, t = k.shape[:2]
  block = kv_pages.shape[1]
  page, offset = jax.vmap(lambda tab: token_slots(tab, seq, pos, block, valid))(tables)
  return write_kv(kv_pages, k.reshape(layers * t, *k.shape[2:]),
                  v.reshape(layers * t, *v.shape[2:]), page.reshape(-1), offset.reshape(-1))


def token_slots(page_indices: jax.Array, seq: jax.Array, pos: jax.Array, block: int,
                valid: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(page, offset) of tokens at positions `pos` of sequences `seq` (invalid tokens: page 0)."""
  page = page_indices[seq, pos // block]
  return jnp.where(valid, page, 0), jnp.where(valid, pos % block, 0)


def reference(q, kv_pages, kv_lens, page_indices, cu_q_lens, num_seqs, *, sm_scale: float,
              max_q: int, sliding_window: Optional[int] = None,
              long_seqs: Optional[int] = None, new_kv=None) -> jax.Array:
  """The specification in jnp (module docstring); `[T, heads, head_dim]`, zeros for tokens past
  the last sequence.

  With `long_seqs=n` only the first n sequences may have more than one query (the engine puts
  prefill chunks first and decodes after): those form a `[n, max_q]` rectangle and the rest a
  `[S - n, 1]` one, so a step that mixes one long prefill with many decodes does not pay
  `S x max_q` attention.

  With `new_kv=(k, v)` ([T, kv_heads, head_dim], the step's own tokens) the pages hold only
  the tokens cached before this step and the new ones are attended from `new_kv`: a forward
  that only reads the pages (the engine writes them afterwards, in place, in a call of its own).
  """
  s = kv_lens.shape[0]
  if long_seqs == 0:
    max_q = 1
  elif long_seqs is not None and 0 < long_seqs < s and max_q > 1:
    n = long_seqs
    num = num_seqs.reshape(())
    head = _rectangle(q, kv_pages, kv_lens[:n], page_indices[:n], cu_q_lens[:n + 1],
                      jnp.minimum(num, n), sm_scale, max_q, sliding_window, new_kv)
    tail = _rectangle(q, kv_pages, kv_lens[n:], page_indices[n:], cu_q_lens[n:],
                      jnp.maximum(num - n, 0), sm_scale, 1, sliding_window, new_kv)
    return head + tail  # each is zero outside its own sequences' tokens
  return _rectangle(q, kv_pages, kv_lens, page_indices, cu_q_lens, num_seqs.reshape(()),
                    sm_scale, max_q, sliding_window, new_kv)


def _gather_pages(kv_pages, page_indices):
  """kv_pages[page_indices] as a clamped take: XLA's CPU gather ran 2.6x faster in "clip" mode
  than in indexing's default (0.36 vs 0.94 ms on bench.serving's pages, docs/benchmarks.md);
  every index is in range."""
  flat = jnp.take(kv_pages, page_indices.reshape(-1), axis=0, mode="clip")
  return flat.reshape(page_indices.shape + kv_pages.shape[1:])


def _decode(q, kv_pages, kv_lens, page_indices, cu_q_lens, num_seqs, sm_scale, sliding_window,
            new_kv=None):
  """`_rectangle` with at most one query per sequence (decode rows), without the rectangle:
  each sequence's query is gathered, attends its pages (and its own new key in flight), and is
  scattered back to its token. Equal to `_rectangle(..., max_q=1)`, ~1.5x faster on CPU."""
  t, hq, d = q.shape
  s = kv_lens.shape[0]
  _, block, h2, _ = kv_pages.shape
  hk = h2 // 2
  g = hq // hk
  q_ok = (jnp.arange(s) < num_seqs) & (cu_q_lens[1:] > cu_q_lens[:-1])
  src = jnp.clip(cu_q_lens[:-1], 0, t - 1)
  qs = q[src].astype(jnp.float32).reshape(s, hk, g, d)
  kv = _gather_pages(kv_pages, page_indices).reshape(s, -1, hk, 2, d)
  keys, values = kv[..., 0, :], kv[..., 1, :]                     # [S, K, Hk, D]
  start = kv_lens - q_ok.astype(kv_lens.dtype)                     # cached before this step
  k_pos = jnp.arange(keys.shape[1])
  limit = kv_lens if new_kv is None else start
  mask = (k_pos[None] <= start[:, None]) & (k_pos[None] < limit[:, None])   # [S, K]
  if sliding_window is not None:
    mask &= start[:, None] - k_pos[None] < sliding_window
  scores = jnp.einsum("shgd,skhd->skhg", qs, keys.astype(jnp.float32)) * sm_scale
  scores = jnp.where(mask[:, :, None, None], scores, MASK)
  if new_kv is None:
    probs = jax.nn.softmax(scores, axis=1)
    out = jnp.einsum("skhg,skhd->shgd", probs, values.astype(jnp.float32))
  else:  # the query's own key (always within any window) joins the softmax
    k_new = new_kv[0][src].astype(jnp.float32).reshape(s, hk, 1, d)
    v_new = new_kv[1][src].astype(jnp.float32).reshape(s, hk, 1, d)
    own = jnp.where(q_ok[:, None, None], (qs * k_new).sum(-1) * sm_scale, MASK)  # [S, Hk, g]
    top = jnp.maximum(scores.max(axis=1), own)
    e, e_own = jnp.exp(scores - top[:, None]), jnp.exp(own - top)
    out = (jnp.einsum("skhg,skhd->shgd", e, values.astype(jnp.float32))
           + e_own[..., None] * v_new) / (e.sum(axis=1) + e_own)[..., None]
  out = out.reshape(s, hq, d).astype(q.dtype)
  return jnp.zeros_like(q).at[jnp.where(q_ok, src, t)].set(out, mode="drop")


def _rectangle(q, kv_pages, kv_lens, page_indices, cu_q_lens, num_seqs, sm_scale, max_q,
               sliding_window, new_kv=None):
  if max_q == 1:
    return _decode(q, kv_pages, kv_lens, page_indices, cu_q_lens, num_seqs, sm_scale,
                   sliding_window, new_kv)
  t, hq, d = q.shape
  s = kv_lens.shape[0]
  _, block, h2, _ = kv_pages.shape
  hk = h2 // 2
  g = hq // hk
  live = jnp.arange(s) < num_seqs
  q_lens = jnp.where(live, cu_q_lens[1:] - cu_q_lens[:-1], 0)
  # The rectangle: row i, column j holds query token cu_q_lens[i] + j.
  cols = jnp.arange(max_q)
  src = jnp.clip(cu_q_lens[:-1, None] + cols[None], 0, t - 1)      # [S, max_q]
  q_ok = cols[None] < q_lens[:, None]
  rect = jnp.where(q_ok[..., None, None], q[src], 0)              # [S, Q, Hq, D]
  kv = _gather_pages(kv_pages, page_indices)                       # [S, n, block, 2Hk, D]
  kv = kv.reshape(s, -1, hk, 2, d)
  keys, values = kv[..., 0, :], kv[..., 1, :]                     # [S, K, Hk, D]
  start = kv_lens - q_lens                                         # cached before this step
  q_pos = start[:, None] + cols[None]                              # [S, Q]
  k_pos = jnp.arange(keys.shape[1])
  # With the step's own keys in flight (`new_kv`), the pages hold only the cached tokens.
  limit = kv_lens if new_kv is None else start
  mask = (k_pos[None, None] <= q_pos[..., None]) & (k_pos[None, None] < limit[:, None, None])
  if sliding_window is not None:
    mask &= q_pos[..., None] - k_pos[None, None] < sliding_window
  if new_kv is not None:
    k_new = jnp.where(q_ok[..., None, None], new_kv[0][src], 0)    # [S, Q, Hk, D]
    v_new = jnp.where(q_ok[..., None, None], new_kv[1][src], 0)
    keys = jnp.concatenate([keys, k_new.astype(keys.dtype)], axis=1)
    values = jnp.concatenate([values, v_new.astype(values.dtype)], axis=1)
    own = (cols[None, None, :] <= cols[None, :, None]) & q_ok[:, None, :]  # [S, Q, Q']
    if sliding_window is not None:
      own &= cols[None, :, None] - cols[None, None, :] < sliding_window
    mask = jnp.concatenate([mask, own], axis=-1)
  rect = rect.reshape(s, max_q, hk, g, d)
  scores = jnp.einsum("sqhgd,skhd->shgqk", rect.astype(jnp.float32),
                      keys.astype(jnp.float32)) * sm_scale
  scores = jnp.where(mask[:, None, None], scores, MASK)
  probs = jax.nn.softmax(scores, axis=-1)
  out = jnp.einsum("shgqk,skhd->sqhgd", probs, values.astype(jnp.float32))
  out = out.reshape(s, max_q, hq, d)
  # Back to the ragged layout: token i of the packed batch is (row, column) of the rectangle.
  tok = jnp.arange(t)
  row = jnp.clip(jnp.searchsorted(cu_q_lens[1:], tok, side="right"), 0, s - 1)
  col = tok - cu_q_lens[row]
  ok = ((tok >= cu_q_lens[0]) & (tok < cu_q_lens[jnp.clip(num_seqs, 0, s)]) & (col >= 0)
        & (col < max_q))
  return jnp.where(ok[:, None, None], out[row, jnp.clip(col, 0, max_q - 1)], 0).astype(q.dtype)


def ragged_paged_attention(q, kv_pages, kv_lens, page_indices, cu_q_lens, num_seqs, *,
                           sm_scale: float, max_q: int, sliding_window: Optional[int] = None,
                           backend: Optional[str] = None,
                           tpu_blocks: Optional[tuple[int, int]] = None,
                           long_seqs: Optional[int] = None, new_kv=None) -> jax.Array:
  """Attention of ragged queries over paged keys/values (module docstring).

  Args:
    q: [T, heads, head_dim].
    kv_pages: [P, block, 2 * kv_heads, head_dim].
    kv_lens: [S] int32 cached tokens of each sequence (this step's included).
    page_indices: [S, pages_per_seq] int32.
    cu_q_lens: [S + 1] int32 offsets of each sequence's queries in `q`.
    num_seqs: [1] int32, the sequences in use (the rest are padding).
    sm_scale: the softmax scale (head_dim ** -0.5).
    max_q: a static bound on any sequence's query count (the reference's rectangle).
    sliding_window: keys within this distance only, or None.
    backend: as `kernels_pallas.set_backend` (default: the global choice).
    tpu_blocks: (kv pages, queries) per block of the TPU kernel; None: jax's table tuned per TPU
      generation (which needs a TPU to look up).
    long_seqs: static; only the first `long_seqs` sequences have more than one query (see
      `reference`; the TPU kernel needs no such hint).
    new_kv: the step's own keys and values, not yet in the pages (`reference`); the TPU kernel
      reads them from the pages, so it is refused there.
  Returns:
    [T, heads, head_dim].
  """
  impl = ops.resolve_backend(backend)
  if impl == "tpu":
    if new_kv is not None:
      raise ValueError("the TPU kernel reads the step's keys and values from the pages: write "
                       "them first (write_kv) and pass new_kv=None")
    from jax.experimental.pallas.ops.tpu.ragged_paged_attention import (
        ragged_paged_attention as tpu_kernel)
    blocks = {} if tpu_blocks is None else dict(num_kv_pages_per_block=tpu_blocks[0],
                                                num_queries_per_block=tpu_blocks[1])
    return tpu_kernel(q, kv_pages, kv_lens, page_indices, cu_q_lens, num_seqs,
                      sm_scale=sm_scale, sliding_window=sliding_window, **blocks)
  return reference(q, kv_pages, kv_lens, page_indices, cu_q_lens, num_seqs, sm_scale=sm_scale,
                   max_q=max_q, sliding_window=sliding_window, long_seqs=long_seqs,
                   new_kv=new_kv)


def writes_in_forward(backend: Optional[str] = None) -> bool:
  """Whether the model writes KV pages inside its forward (the TPU kernel reads them there) or
  returns the new keys/values for the caller to write afterwards (`new_kv`, the reference)."""
  return ops.resolve_backend(backend) == "tpu"
