"""LoRA on token embeddings, and the base weights PEFT saves beside embedding / head LoRAs.

An embedding LoRA is a linear LoRA on the one-hot token: with the table `E [vocab, dim]` as the
`[in, out]` kernel, `a [vocab, r]` and `b [r, dim]` (PEFT's `lora_embedding_A [r, vocab]` and
`lora_embedding_B [dim, r]`, transposed), `e(t) = E[t] + scale * a[t] @ b`. `lookup` is that
forward, read from the context as the projection hook reads it for a linear layer: nothing, one
adapter (`SingleLoRA`), or a dense `Stack` with "sequence" or "token" routing (mixed batches).

PEFT's default save of a LoRA on `embed_tokens` or `lm_head` (`save_embedding_layers="auto"`)
writes the base layer's weight too. `SavedBase` holds those tensors (memory-mapped, never placed
on a device) so that the model that runs the adapter can check they are its own weights.

References:
  LoRA (Hu et al., 2021), Eq. 3, applied to the embedding as a linear map of one-hot tokens.
"""
from __future__ import annotations

from typing import Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np

from jaxadapt.adapters import lora as lora_lib
from jaxadapt.adapters.hook import dora_weight_norm
from jaxadapt.context import Context, PoolView, SingleLoRA, Stack
from jaxadapt.paths import path_get


def lookup(ids: jax.Array, table: jax.Array, ctx: Optional[Context] = None,
           path: Optional[str] = None) -> jax.Array:
  """Token embeddings `table[ids]` [..., dim] plus the context's LoRA for `path`, if any.

  Args:
    ids: [...] int token ids ([B, S]; packed [1, T] for serving).
    table: [vocab, dim] the frozen embedding.
    ctx: the forward context or None.
    path: the embedding's module path (the key of `ctx.weights`).

  DoRA as PEFT's `DoraEmbeddingLayer`: `m / ||E + s a b||_c * (E[t] + s a[t] b)`, the column
  norm taken over the vocabulary (the table as the `[in, out]` kernel).

  Raises:
    NotImplementedError: a view this lookup does not serve on an embedding (a MeteoRA router,
      the serving pool's pages), naming it.
  """
  out = jnp.take(table, ids, axis=0)
  if not isinstance(ctx, Context) or path is None:
    return out
  if ctx.router(path) is not None:
    raise NotImplementedError(f"{path} is an embedding; a MeteoRA router on it is not "
                              f"supported (routers gate linear layers)")
  view = ctx.weights.get(path) if ctx.weights else None
  if view is None:
    return out
  if isinstance(view, PoolView):
    raise NotImplementedError(
        f"{path}: an embedding LoRA in the serving pool (S-LoRA pages) is not supported; the "
        f"pool serves LoRAs on linear layers. Serve this adapter without its embedding LoRA, or "
        f"run it with model(..., adapters=[...], adapter_ids=...) (dense stacks)")
  if isinstance(view, SingleLoRA):
    delta = (jnp.take(view.a, ids, axis=0).astype(jnp.float32)
             @ view.b.astype(jnp.float32)) * view.scale.astype(jnp.float32)
    new = out.astype(jnp.float32) + delta
    if view.magnitude is not None:  # DoRA: m / ||E + s a b||_c, the norm over the vocabulary
      norm = jax.lax.stop_gradient(dora_weight_norm(table, view.a, view.b, view.scale))
      new = new * (view.magnitude.astype(jnp.float32) / norm)
    return new.astype(out.dtype)
  if isinstance(view, Stack):
    return _mixed(ids, out, view, ctx, path)
  raise TypeError(f"the weight view of embedding {path} must be SingleLoRA or Stack; got "
                  f"{type(view).__name__}")


def _mixed(ids, out, view: Stack, ctx: Context, path: str):
  """A mixed batch: each row's (or token's) adapter n adds `scale[n] * a[n, t] @ b[n]`."""
  if not isinstance(view.a, jax.Array) or not isinstance(view.b, jax.Array):
    raise NotImplementedError(f"{path}: an embedding LoRA over paged weights (the serving "
                              f"pool) is not supported; use dense stacks")
  routing = ctx.routing
  if routing is None or routing.layout not in ("sequence", "token"):
    raise NotImplementedError(
        f"{path}: an embedding LoRA in a stack needs 'sequence' or 'token' routing (one "
        f"adapter per row or per token); got "
        f"{'no routing' if routing is None else repr(routing.layout)}")
  n = view.scale.shape[0]
  rid = routing.ids
  if routing.layout == "sequence":  # one id per row
    if ids.ndim < 1 or rid.shape[0] != ids.shape[0]:
      raise ValueError(f"sequence routing has {rid.shape[0]} ids for token ids of shape "
                       f"{ids.shape}: expected one per batch row")
    valid = (rid >= 0) & (rid < n)
    safe = jnp.where(valid, rid, 0)
    lead = (-1,) + (1,) * (ids.ndim - 1)
    h = view.a[safe.reshape(lead), ids].astype(jnp.float32)         # [B, ..., r]
    b = view.b[safe].astype(jnp.float32)                            # [B, r, dim]: once per row
    delta = jnp.einsum("b...r,brd->b...d", h, b)
    scale = jnp.where(valid, view.scale[safe], 0.0).reshape(lead + (1,))
    if view.dora_scale is not None:  # each row's m / ||E + s a b||_c (ones: LoRA, no adapter)
      dora = jnp.where(valid[:, None], view.dora_scale[safe], 1.0)
      dora = dora.reshape(lead[:1] + (1,) * (ids.ndim - 1) + dora.shape[-1:])
  else:  # one id per token of the flattened ids
    if rid.shape[0] != ids.size:
      raise ValueError(f"token routing has {rid.shape[0]} ids for {ids.size} tokens: expected "
                       f"one per token")
    rid = rid.reshape(ids.shape)
    valid = (rid >= 0) & (rid < n)
    safe = jnp.where(valid, rid, 0)
    h = view.a[safe, ids].astype(jnp.float32)                       # [..., r]
    delta = jnp.einsum("...r,...rd->...d", h, view.b[safe].astype(jnp.float32))
    scale = jnp.where(valid, view.scale[safe], 0.0)[..., None]
    if view.dora_scale is not None:
      dora = jnp.where(valid[..., None], view.dora_scale[safe], 1.0)
  new = out.astype(jnp.float32) + scale * delta
  if view.dora_scale is not None:
    new = new * dora.astype(jnp.float32)
  return new.astype(out.dtype)


class SavedBase:
  """Base-layer weights saved with an adapter (PEFT's `save_embedding_layers`), by path.

  `tensors[path]` is the torch-layout weight (`[vocab, dim]` for an embedding, `[out, in]` for a
  head): host arrays, memory-mapped from the adapter file. Compared by identity (it is static
  metadata of a `LoraAdapter`).
  """

  def __init__(self, tensors: Mapping[str, np.ndarray], source: str):
    self.tensors = dict(tensors)
    self.source = source      # the file, for messages
    self._checked = []        # (path, parameter) found equal; held, so their ids stay unique

  def __repr__(self):
    return f"SavedBase({sorted(self.tensors)}, source={self.source!r})"

  def check(self, path: str, params: Mapping) -> None:
    """Raises unless the saved weight of `path` equals the model's (up to the rounding of the
    lower of the two precisions): an adapter saved with another base's embedding or head.

    Raises:
      ValueError: shapes or values differ, naming the tensor and the largest difference.
    """
    if lora_lib.is_tied_head(params, path):  # its torch weight is the embedding table
      leaf, transpose = path_get(params, "model.embed_tokens")["embedding"], False
    else:
      leaf = lora_lib.kernel_at(params, path)
      transpose = not lora_lib.is_embedding(params, path)  # a kernel [in, out] is torch's [out, in]^T
    if any(p == path and k is leaf for p, k in self._checked):
      return
    saved = self.tensors[path]
    host = np.asarray(leaf)
    host = host.T if transpose else host
    if tuple(saved.shape) != tuple(host.shape):
      raise ValueError(
          f"{self.source}: the adapter was saved with the base weight of {path} (PEFT's "
          f"save_embedding_layers) of shape {list(saved.shape)}, but this model's is "
          f"{list(host.shape)}: it was trained on another base (a resized vocabulary?). Load "
          f"it on that base")
    eps = max(float(jnp.finfo(saved.dtype).eps), float(jnp.finfo(host.dtype).eps))
    worst = 0.0
    for lo in range(0, saved.shape[0], 4096):  # in row blocks: no full-size temporaries
      s = np.asarray(saved[lo:lo + 4096], np.float32)
      k = host[lo:lo + 4096].astype(np.float32)
      diff = np.abs(s - k)
      if (diff > eps * np.maximum(np.abs(s), np.abs(k))).any():
        worst = max(worst, float(diff.max()))
    if worst:
      raise ValueError(
          f"{self.source}: the adapter was saved with the base weight of {path} (PEFT's "
          f"save_embedding_layers), and it differs from this model's by up to {worst:.3g}: the "
          f"adapter was trained with a changed {path} (e.g. new tokens) or on another base. "
          f"jaxadapt does not replace base weights; load the model it was trained on")
    self._checked = self._checked[-3:] + [(path, leaf)]
