"""Several LoRA adapters as one: PEFT's several active adapters and `add_weighted_adapter`.

`combine(adapters, weights, kind=...)` returns one `LoraAdapter`, which then runs, merges,
stacks and saves like any other:

  * `kind="active"`: the adapters all active at once, in order, as PEFT's
    `set_adapter([a0, a1, ...])` runs them (its eval forward, which also equals merging them one
    after another). Exact: the ranks add up. Plain LoRA adds `s_k x A_k B_k` per adapter; a DoRA
    adapter multiplies everything before it by its `m_k / ||W0 + s_k A_k B_k||_c` (the running
    output, as PEFT's eval forward does), so DoRA adapters need the base `params`.
  * `kind="cat"`, `"linear"`, `"ties"`, `"magnitude_prune"`, `"svd"`, `"ties_svd"`,
    `"magnitude_prune_svd"`: PEFT's `add_weighted_adapter(adapters, weights, name,
    combination_type=kind, ...)`, tensor for tensor (rank padded as PEFT pads it; scale 1 under
    PEFT's new config `r = lora_alpha = new rank`). PEFT's DARE kinds (random) and its
    `svd_clamp` (sign-dependent) are refused, each with the reason.

References:
  LoRA (Hu et al., 2021), Eq. 3; DoRA (Liu et al., 2024), Eq. 5; TIES-Merging (Yadav et al.,
  2023), Sec. 3.
"""
from __future__ import annotations

import math
from typing import Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxadapt.adapters.embedding import SavedBase
from jaxadapt.adapters.lora import LoraAdapter, LoraConfig, kernel_at

KINDS = ("active", "cat", "linear", "ties", "magnitude_prune", "svd", "ties_svd",
         "magnitude_prune_svd")
# PEFT's DARE kinds drop entries at random with torch's generator: refused by name.
_DARE = ("dare_ties", "dare_linear", "dare_ties_svd", "dare_linear_svd")


def combine(adapters: Sequence[LoraAdapter], weights: Optional[Sequence[float]] = None, *,
            kind: str = "active", params: Optional[Mapping] = None,
            svd_rank: Optional[int] = None, svd_clamp: Optional[float] = None,
            density: Optional[float] = None, majority_sign_method: str = "total") -> LoraAdapter:
  """One adapter equal to `adapters` combined as `kind` says (see the module docstring).

  Args:
    adapters: the adapters, in PEFT's order (it matters for DoRA under "active").
    weights: one float per adapter (PEFT's `weights`); "active" takes none (each counts once).
    kind: one of `KINDS`: "active", or PEFT's `combination_type` ("cat", "linear", "ties",
      "magnitude_prune", and "svd" / "ties_svd" / "magnitude_prune_svd", which merge the
      deltas and cut them back to a rank by SVD).
    params: the base tree; needed by "active" when an adapter uses DoRA.
    svd_rank: the SVD kinds' new rank (default: the largest config rank, as PEFT).
    svd_clamp: must be None (PEFT's quantile clamp depends on LAPACK's signs: refused).
    density: "ties" / "magnitude_prune" (and their SVD kinds): the fraction of entries each
      tensor keeps, by magnitude (TIES, Yadav et al., 2023, Sec. 3 "trim").
    majority_sign_method: "ties": the elected sign per entry from the sum ("total") or the
      count ("frequency") of the trimmed tensors' signs.

  Returns:
    A `LoraAdapter` over the union of the adapters' paths (the config names them in full).

  Raises:
    ValueError / NotImplementedError: an unknown kind (PEFT's DARE kinds are named), weights
      or a density that do not fit, DoRA adapters where the kind cannot combine them (PEFT's
      add_weighted_adapter combines only A and B), or mismatched ranks ("linear", "ties",
      "magnitude_prune").

  References:
    TIES-Merging (Yadav et al., 2023), Sec. 3: trim, elect sign, disjoint merge.
  """
  adapters = list(adapters)
  if not adapters or not all(isinstance(a, LoraAdapter) for a in adapters):
    raise TypeError(f"combine takes a non-empty list of LoraAdapters, got "
                    f"{[type(a).__name__ for a in adapters] or 'an empty list'}")
  if kind in _DARE:
    raise NotImplementedError(f"combination kind {kind!r} (PEFT's DARE) drops entries at random "
                              f"with torch's generator, which jaxadapt cannot reproduce; it "
                              f"combines as {KINDS}")
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
  merge = kind[:-len("_svd")] if kind.endswith("_svd") else ("linear" if kind == "svd" else kind)
  if merge in ("ties", "magnitude_prune") and (density is None or not 0 <= density):
    raise ValueError(f"kind={kind!r} needs density= (the fraction of entries kept, >= 0; 1 "
                     f"keeps all), got {density!r}")
  if majority_sign_method not in ("total", "frequency"):
    raise ValueError(f"majority_sign_method must be 'total' or 'frequency', got "
                     f"{majority_sign_method!r}")
  dora = [i for i, a in enumerate(adapters) if a.config.use_dora]
  if dora:
    raise NotImplementedError(
        f"adapters {dora} use DoRA; kind={kind!r} (PEFT's add_weighted_adapter) combines only "
        f"the LoRA factors A and B, not DoRA's magnitudes. Use kind='active' (all at once, "
        f"exact) or merge them one after another")
  if len(adapters) == 1:
    kind = merge = "linear"  # PEFT: one adapter is always combined linearly
  svd = kind.endswith("svd")
  # PEFT's new rank: from the configs (r, or the largest rank_pattern value), not the tensors.
  ranks = [max([a.config.r, *(r for _, r in a.config.rank_pattern)]) for a in adapters]
  if not svd and kind != "cat" and len(set(ranks)) != 1:
    raise ValueError(f"kind={kind!r} needs adapters of one rank (as PEFT); their ranks are "
                     f"{ranks}. Use kind='cat' or 'svd'")
  new_rank = sum(ranks) if kind == "cat" else (svd_rank or max(ranks)) if svd else ranks[0]
  weights = [float(w) for w in weights]
  task = dict(method=merge, density=density, sign_method=majority_sign_method)
  out = {}
  for path in _union(adapters):
    present = [(a, w) for a, w in zip(adapters, weights) if path in a.weights]
    if kind == "cat":
      a = jnp.concatenate([w * x.scale(path) * _f32(x, path, "a") for x, w in present], axis=1)
      b = jnp.concatenate([_f32(x, path, "b") for x, _ in present], axis=0)
    elif svd:
      a, b = _svd(present, path, new_rank, task)
    else:
      a, b = _factors(present, path, task)
    pad = new_rank - a.shape[1]
    out[path] = {"a": jnp.pad(a, ((0, 0), (0, pad))), "b": jnp.pad(b, ((0, pad), (0, 0)))}
  first = adapters[0].config
  # Every source scale is folded into the factors, so the result's scale is exactly 1:
  # lora_alpha = r and no rsLoRA (PEFT >= 0.22 sets use_rslora=False too; earlier versions kept
  # the first adapter's, which scaled the sum by sqrt(r)).
  config = LoraConfig(r=new_rank, lora_alpha=float(new_rank), target_modules=tuple(out),
                      use_rslora=False,
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


def _trim(t, density: float):
  """TIES' trim (PEFT's magnitude pruning): the `int(density * size)` largest |entries| kept."""
  if density >= 1:
    return t
  k = int(density * t.size)
  if k == 0:
    return jnp.zeros_like(t)
  _, idx = jax.lax.top_k(jnp.abs(t).ravel(), k)
  return (t.ravel() * jnp.zeros(t.size, t.dtype).at[idx].set(1)).reshape(t.shape)


def _task_merge(tensors, weights, *, method: str, density, sign_method: str):
  """PEFT's task arithmetic ("linear"), "magnitude_prune" (trim, then the weighted sum) and
  "ties" (trim, elect each entry's sign, the weighted mean of the entries of that sign)."""
  if method != "linear":
    tensors = [_trim(t, density) for t in tensors]
  stacked = jnp.stack(tensors)
  weighted = stacked * jnp.asarray(weights, jnp.float32).reshape((-1,) + (1,) * tensors[0].ndim)
  if method != "ties":
    return weighted.sum(0)
  sign = jnp.sign(stacked)
  votes = stacked.sum(0) if sign_method == "total" else sign.sum(0)
  agree = sign == jnp.where(votes >= 0, 1.0, -1.0)
  return (weighted * agree).sum(0) / jnp.maximum(agree.sum(0), 1)


def _factors(present, path, task):
  """PEFT's merges on the factors: `A` from the `sign_k sqrt|w_k s_k| A_k`, `B` from the
  `sqrt|w_k s_k| B_k` (so "linear" is `A = sum ...`, `B = sum ...`)."""
  shapes = {x.rank(path) for x, _ in present}
  if len(shapes) != 1:
    raise ValueError(f"kind={task['method']!r} needs one rank per path; {path} has ranks "
                     f"{sorted(shapes)}")
  wa, wb = [], []
  for x, w in present:
    ws = w * x.scale(path)
    wa.append(math.copysign(math.sqrt(abs(ws)), ws if ws != 0 else 1.0))
    wb.append(math.sqrt(abs(ws)))
  return (_task_merge([_f32(x, path, "a") for x, _ in present], wa, **task),
          _task_merge([_f32(x, path, "b") for x, _ in present], wb, **task))


def _svd(present, path, rank: int, task):
  """PEFT's SVD kinds: the deltas merged (weights `w_k`), cut to `rank` by their SVD (`B = U S`,
  `A = V^T`)."""
  delta = _task_merge([x.scale(path) * (_f32(x, path, "a") @ _f32(x, path, "b"))
                       for x, _ in present], [w for _, w in present], **task)
  # In torch layout [out, in], as PEFT decomposes it (the factors' signs follow LAPACK's).
  u, s, vh = np.linalg.svd(np.asarray(delta.T, np.float32), full_matrices=True)
  k = min(rank, s.shape[0])
  up, down = u[:, :k] * s[:k], vh[:k]
  return jnp.asarray(down.T), jnp.asarray(up.T)


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
