"""Several LoRA adapters as one: PEFT's several active adapters and `add_weighted_adapter`.

`combine(adapters, weights, kind=...)` returns one `LoraAdapter`, which then runs, merges,
stacks and saves like any other:

  * `kind="active"`: the adapters all active at once, in order, as PEFT's
    `set_adapter([a0, a1, ...])` runs them (its eval forward, which also equals merging them one
    after another). Exact: the ranks add up. Plain LoRA adds `s_k x A_k B_k` per adapter; a DoRA
    adapter multiplies everything before it by its `m_k / ||W0 + s_k A_k B_k||_c` (the running
    output, as PEFT's eval forward does), so DoRA adapters need the base `params`.
  * `kind="cat"`, `"linear"`, `"svd"`: PEFT's `add_weighted_adapter(adapters, weights, name,
    combination_type=kind)`, tensor for tensor (rank padded as PEFT pads it; scale 1 under
    PEFT's new config `r = lora_alpha = new rank`).

References:
  LoRA (Hu et al., 2021), Eq. 3; DoRA (Liu et al., 2024), Eq. 5.
"""
from __future__ import annotations

import math
from typing import Mapping, Optional, Sequence

import jax.numpy as jnp
import numpy as np

from jaxadapt.adapters.embedding import SavedBase
from jaxadapt.adapters.lora import LoraAdapter, LoraConfig, kernel_at

KINDS = ("active", "cat", "linear", "svd")
# PEFT's other combination types, refused by name.
_PEFT_ONLY = ("ties", "ties_svd", "dare_ties", "dare_linear", "dare_ties_svd", "dare_linear_svd",
              "magnitude_prune", "magnitude_prune_svd")


def combine(adapters: Sequence[LoraAdapter], weights: Optional[Sequence[float]] = None, *,
            kind: str = "active", params: Optional[Mapping] = None,
            svd_rank: Optional[int] = None, svd_clamp: Optional[float] = None) -> LoraAdapter:
  """One adapter equal to `adapters` combined as `kind` says (see the module docstring).

  Args:
    adapters: the adapters, in PEFT's order (it matters for DoRA under "active").
    weights: one float per adapter (PEFT's `weights`); "active" takes none (each counts once).
    kind: "active", "cat", "linear" or "svd".
    params: the base tree; needed by "active" when an adapter uses DoRA.
    svd_rank: "svd": the new rank (default: the largest config rank, as PEFT).
    svd_clamp: must be None (PEFT's quantile clamp depends on LAPACK's signs: refused).

  Returns:
    A `LoraAdapter` over the union of the adapters' paths (the config names them in full).

  Raises:
    ValueError / NotImplementedError: an unknown kind (PEFT's TIES / DARE / magnitude-prune are
      named), weights that do not match, DoRA adapters where the kind cannot combine them
      ("cat" / "linear" / "svd" combine only A and B, as PEFT does), or mismatched ranks
      ("linear").
  """
  adapters = list(adapters)
  if not adapters or not all(isinstance(a, LoraAdapter) for a in adapters):
    raise TypeError(f"combine takes a non-empty list of LoraAdapters, got "
                    f"{[type(a).__name__ for a in adapters] or 'an empty list'}")
  if kind in _PEFT_ONLY:
    raise NotImplementedError(f"combination kind {kind!r} (PEFT's TIES / DARE / magnitude "
                              f"pruning) is not supported; jaxadapt combines as {KINDS}")
  if kind not in KINDS:
    raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
  if svd_clamp is not None:
    raise NotImplementedError(
        "svd_clamp is not supported: PEFT clips U S and V^T at a quantile of their signed "
        "entries, which depends on the signs LAPACK happens to give the singular vectors (they "
        "differ between torch and numpy on the same matrix), so its result cannot be "
        "reproduced; use svd_clamp=None")
  if kind == "active":
    if weights is not None:
      raise ValueError("kind='active' takes no weights (each active adapter counts once, as "
                       "PEFT's set_adapter); for weighted sums use kind='cat'")
    return _active(adapters, params)
  if weights is None or len(weights) != len(adapters):
    raise ValueError(f"kind={kind!r} needs one weight per adapter ({len(adapters)}), got "
                     f"{weights!r}")
  dora = [i for i, a in enumerate(adapters) if a.config.use_dora]
  if dora:
    raise NotImplementedError(
        f"adapters {dora} use DoRA; kind={kind!r} (PEFT's add_weighted_adapter) combines only "
        f"the LoRA factors A and B, not DoRA's magnitudes. Use kind='active' (all at once, "
        f"exact) or merge them one after another")
  if len(adapters) == 1:
    kind = "linear"  # PEFT: one adapter is always combined linearly
  # PEFT's new rank: from the configs (r, or the largest rank_pattern value), not the tensors.
  ranks = [max([a.config.r, *(r for _, r in a.config.rank_pattern)]) for a in adapters]
  if kind == "linear" and len(set(ranks)) != 1:
    raise ValueError(f"kind='linear' needs adapters of one rank (as PEFT); their ranks are "
                     f"{ranks}. Use kind='cat' or 'svd'")
  new_rank = {"linear": ranks[0], "cat": sum(ranks), "svd": svd_rank or max(ranks)}[kind]
  weights = [float(w) for w in weights]
  out = {}
  for path in _union(adapters):
    present = [(a, w) for a, w in zip(adapters, weights) if path in a.weights]
    if kind == "cat":
      a = jnp.concatenate([w * x.scale(path) * _f32(x, path, "a") for x, w in present], axis=1)
      b = jnp.concatenate([_f32(x, path, "b") for x, _ in present], axis=0)
    elif kind == "linear":
      a, b = _linear(present, path)
    else:
      a, b = _svd(present, path, new_rank)
    pad = new_rank - a.shape[1]
    out[path] = {"a": jnp.pad(a, ((0, 0), (0, pad))), "b": jnp.pad(b, ((0, pad), (0, 0)))}
  first = adapters[0].config
  config = LoraConfig(r=new_rank, lora_alpha=float(new_rank), target_modules=tuple(out),
                      use_rslora=first.use_rslora,
                      base_model_name_or_path=first.base_model_name_or_path)
  return _adapter(out, config, adapters)


def _f32(adapter: LoraAdapter, path: str, side: str):
  return adapter.weights[path][side].astype(jnp.float32)


def _col_norm(w):
  return jnp.sqrt(jnp.sum(w * w, axis=0))


def _union(adapters) -> list[str]:
  paths = []
  for a in adapters:
    paths.extend(p for p in a.weights if p not in paths)
  return paths


def _adapter(weights: dict, config: LoraConfig, adapters) -> LoraAdapter:
  """The combined adapter in the first one's dtype; its embedding paths and saved base weights
  (checked against the model that runs it) are those of the adapters combined."""
  dtype = next(iter(adapters[0].weights.values()))["a"].dtype
  weights = {p: {k: v.astype(dtype) for k, v in w.items()} for p, w in weights.items()}
  embeddings = tuple(sorted({p for a in adapters for p in a.embedding_paths}))
  saved = [a.saved_base for a in adapters if a.saved_base is not None]
  base = None
  if saved:
    tensors = {}
    for s in reversed(saved):
      tensors.update(s.tensors)
    base = SavedBase(tensors, ", ".join(dict.fromkeys(s.source for s in saved)))
  return LoraAdapter(weights=weights, config=config, embedding_paths=embeddings,
                     saved_base=base)


def _linear(present, path):
  """PEFT's "linear": `A = sum sign_k sqrt|w_k s_k| A_k`, `B = sum sqrt|w_k s_k| B_k`."""
  shapes = {x.rank(path) for x, _ in present}
  if len(shapes) != 1:
    raise ValueError(f"kind='linear' needs one rank per path; {path} has ranks {sorted(shapes)}")
  a = b = 0.0
  for x, w in present:
    ws = w * x.scale(path)
    root = math.sqrt(abs(ws))
    a = a + (root if ws >= 0 else -root) * _f32(x, path, "a")
    b = b + root * _f32(x, path, "b")
  return a, b


def _svd(present, path, rank: int):
  """PEFT's "svd": the weighted sum of the deltas, cut to `rank` by its SVD (`B = U S`,
  `A = V^T`)."""
  delta = sum(w * x.scale(path) * (_f32(x, path, "a") @ _f32(x, path, "b")) for x, w in present)
  # In torch layout [out, in], as PEFT decomposes it (the factors' signs follow LAPACK's).
  u, s, vh = np.linalg.svd(np.asarray(delta.T, np.float32), full_matrices=True)
  k = min(rank, s.shape[0])
  up, down = u[:, :k] * s[:k], vh[:k]
  return jnp.asarray(down.T), jnp.asarray(up.T)


def _active(adapters, params) -> LoraAdapter:
  """`kind="active"`: per path, PEFT's eval forward over the active adapters in order:
  `z = x W0; z = f_k (z + s_k x A_k B_k)` (DoRA, `f_k = m_k / ||W0 + s_k A_k B_k||_c`) or
  `z = z + s_k x A_k B_k` (LoRA); then `y = z + bias`. That is `P (x W0 + x A B)` with `A` the
  A_k side by side, `B` the `c_k s_k B_k / P` stacked (`c_k`: the product of the DoRA factors
  from k on, `P` of all of them), and a DoRA magnitude `P ||W0 + A B||_c` when any is DoRA."""
  any_dora = any(a.config.use_dora for a in adapters)
  if any_dora and params is None:
    raise ValueError("combining DoRA adapters (kind='active') needs the base params "
                     "(params=model.params): their norms are taken on the base kernels")
  out, max_rank = {}, 1
  for path in _union(adapters):
    present = [x for x in adapters if path in x.weights]
    w0 = kernel_at(params, path).astype(jnp.float32) if any_dora else None
    factors = []  # f_k: DoRA's magnitude over the column norm of W0 + s_k A_k B_k (LoRA: None)
    for x in present:
      m = x.weights[path].get("magnitude")
      factors.append(None if m is None else m.astype(jnp.float32) / _col_norm(
          w0 + x.scale(path) * (_f32(x, path, "a") @ _f32(x, path, "b"))))
    after, running = [None] * len(present), None  # c_k: the product of the factors from k on
    for i in reversed(range(len(present))):
      if factors[i] is not None:
        running = factors[i] if running is None else running * factors[i]
      after[i] = running
    total = 1.0 if running is None else running  # P
    a = jnp.concatenate([_f32(x, path, "a") for x in present], axis=1)
    b = jnp.concatenate([x.scale(path) * _f32(x, path, "b")
                         * ((1.0 if c is None else c) / total)
                         for x, c in zip(present, after)], axis=0)
    out[path] = {"a": a, "b": b}
    if any_dora:  # every path gets a magnitude (P = 1 where no adapter there is DoRA)
      out[path]["magnitude"] = total * _col_norm(w0 + a @ b)
    max_rank = max(max_rank, a.shape[1])
  # Scale 1 on every path: the config's r and alpha are the largest rank; a path of lower rank
  # r' (scaled max_rank / r' by jaxadapt, which scales by each tensor's own rank) has B
  # multiplied by r' / max_rank.
  for w in out.values():
    w["b"] = w["b"] * (w["a"].shape[1] / max_rank)
  first = adapters[0].config
  config = LoraConfig(r=max_rank, lora_alpha=float(max_rank), target_modules=tuple(out),
                      use_dora=any_dora,
                      base_model_name_or_path=first.base_model_name_or_path)
  return _adapter(out, config, adapters)
