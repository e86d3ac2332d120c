"""The unified paged pool (S-LoRA Sec. 4.1): one device array whose pages hold KV or adapters.

`pages [P, page_size]` is one device array, one jit argument of every engine step (donated and
updated in place). A page is `page_size` elements and holds either
  * `block` tokens of one layer's keys and values (`page_size = block * 2 * kv_heads *
    head_dim`; the layout of `kernels_pallas.attention`), or
  * `page_size // d` rank rows of one adapter's A^T (d = the layer's input size) or B (d = its
    output size), as `jaxadapt.context.PoolView` reads them.
S-LoRA's page is one hidden-sized vector; we use `block` tokens per page instead (the attention
kernels read whole pages, and jax's TPU kernel wants blocks of tokens), so `page_size` must be a
multiple of every targeted layer's sizes as well: `PagedPool.block_for(model)` gives the
smallest such block of at least the requested tokens. GQA's narrow k/v and the MLP's wide layers
then share one pool, adapters of any rank up to `max_rank` on any linear target.

One allocator (a free list) serves both kinds; page 0 is a scratch page that padding tokens
write to and nobody reads. Host-side bookkeeping is numpy; the device sees `pages` and the
small `tables` / `scales` / `ranks` arrays of `jaxadapt.context.AdapterPool`.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from jaxadapt.adapters.lora import kernel_at
from jaxadapt.context import AdapterPool, PoolView


def _page_divisors(model, tp=None) -> list:
  """[(path, d)]: a page's size must be a multiple of each d, so that it holds whole rank rows
  of every adapter side (and, under tensor parallelism, each device's part of them)."""
  out = []
  n = 1 if tp is None else tp.size
  for p in model.linear_paths:
    if p == "lm_head":
      continue
    din, dout = kernel_at(model.params, p).shape
    kind = None if tp is None else tp.kind(p)
    out += [(p, din * n if kind == "column" else din), (p, dout)]
  return out


class OutOfPages(RuntimeError):
  """The pool has fewer free pages than an allocation asked for."""


@dataclasses.dataclass
class ResidentAdapter:
  """An adapter in the pool: its slot, its pages, and who holds it."""
  key: tuple            # (name, digest)
  slot: int
  pages: list
  nbytes: int
  users: int = 0        # running or prefetched requests that need it


def _write_pages(pages, index, rows):
  """Rows [n, k] written over the first k elements of pages `index` [n] (k <= page size)."""
  return pages.at[index, :rows.shape[1]].set(rows.astype(pages.dtype), mode="promise_in_bounds")


_write_pages_jit = jax.jit(_write_pages, donate_argnums=0)


class PagedPool:
  """The engine's unified pool for one model (module docstring).

  Args:
    model: the frozen `CausalLM`.
    num_pages: pages in the pool (page 0 is scratch).
    block: KV tokens per page; must make `page_size` a multiple of the sizes of every layer an
      adapter may target (`block_for`).
    max_adapters: adapter slots resident at once.
    max_rank: the largest adapter rank the pool takes.
    dtype: the pool's dtype (the model's by default).
  """

  def __init__(self, model, *, num_pages: int, block: int, max_adapters: int = 64,
               max_rank: int = 64, dtype=None, tp=None, sharding=None):
    c = model.config
    self.model = model
    self.tp = tp  # a jaxadapt.context.TensorParallel: pages hold each device's part (serve.tp)
    self.tp_size = 1 if tp is None else tp.size
    self.block = int(block)
    self.kv_width = 2 * c.num_key_value_heads * c.head_dim
    self.page_size = self.block * self.kv_width
    self.layers = c.num_hidden_layers
    self.dtype = jnp.dtype(dtype or model.dtype)
    if num_pages < 2:
      raise ValueError(f"num_pages must be >= 2 (page 0 is scratch), got {num_pages}")
    self.num_pages = int(num_pages)
    self.max_adapters = int(max_adapters)
    self.max_rank = int(max_rank)
    # Every linear layer but the head can hold adapter pages.
    self.paths = [p for p in model.linear_paths if p != "lm_head"]
    self.sizes = {p: kernel_at(model.params, p).shape for p in self.paths}
    bad = [(p, d) for p, d in _page_divisors(model, tp) if self.page_size % d]
    if bad:
      raise ValueError(f"a page of {self.block} KV tokens ({self.page_size} elements) cannot "
                       f"hold rank rows of {bad[0][0]} (a multiple of {bad[0][1]} needed"
                       f"{' with tensor parallelism ' + str(self.tp_size) if tp else ''}); use "
                       f"block={self.block_for(model, self.block, tp)}")
    self.slot_of = {p: i for i, p in enumerate(self.paths)}
    self.max_pages_per_side = max(-(-self.max_rank // (self.page_size // d))
                                  for dims in self.sizes.values() for d in dims)
    n, lp = self.max_adapters, len(self.paths)
    self.tables = np.zeros((lp, 2, n, self.max_pages_per_side), np.int32)
    self.scales = np.zeros((lp, n), np.float32)
    self.ranks = np.ones((lp, n), np.int32)
    self._pages = jnp.zeros((self.num_pages, self.page_size), self.dtype, device=sharding)
    # Adapter rows staged by `load` as (page, flat rows): written in one call when the pages
    # are next read (a step's loads become one device write, of the rows they use only).
    self._pending: list = []
    self._free = list(range(self.num_pages - 1, 0, -1))  # a stack; page 0 is scratch
    self._kv_pages = 0
    self._adapter_pages = 0
    self.resident: dict[tuple, ResidentAdapter] = {}
    self._free_slots = list(range(n - 1, -1, -1))
    self.targets: frozenset = frozenset()  # paths some resident adapter targets
    self._device = None  # (AdapterPool tables/scales/ranks on the device, views) until a change

  @property
  def pages(self) -> jax.Array:
    """[num_pages, page_size] the pool on the device, with every staged adapter row in it."""
    if self._pending:
      self._flush()
    return self._pages

  @pages.setter
  def pages(self, value: jax.Array) -> None:
    self._pages = value  # staged rows still apply: they are written at the next read

  def _flush(self) -> None:
    pending, self._pending = self._pending, []
    # A prefix of each page when the pool is on one device (the rows past a rank are never
    # read); whole pages under tensor parallelism, where each device holds a slice of a page.
    k = self.page_size
    if self.tp is None:
      k = min(k, max(1024, 1 << (max(r.size for _, r in pending) - 1).bit_length()))
    n = max(8, 1 << (len(pending) - 1).bit_length())  # few distinct programs
    index = np.zeros(n, np.int32)  # padding rows write zeros over scratch page 0
    rows = np.zeros((n, k), np.float32)
    for i, (page, flat) in enumerate(pending):
      index[i] = page
      rows[i, :flat.size] = flat
    self._pages = _write_pages_jit(self._pages, index, rows)

  @staticmethod
  def block_for(model, at_least: int = 16, tp=None) -> int:
    """The smallest block >= `at_least` whose page holds rank rows of every linear layer (each
    device's part of them under tensor parallelism `tp`)."""
    c = model.config
    kv_width = 2 * c.num_key_value_heads * c.head_dim
    need = 1
    for _, d in _page_divisors(model, tp):
      need = math.lcm(need, d)
    step = need // math.gcd(need, kv_width)  # blocks that make block * kv_width a multiple
    return -(-at_least // step) * step

  # -- allocation ------------------------------------------------------------------------------

  @property
  def free_pages(self) -> int:
    return len(self._free)

  def alloc(self, n: int, kind: str = "kv") -> list:
    """`n` free pages (raises OutOfPages, changing nothing, when fewer are free)."""
    if n > len(self._free):
      raise OutOfPages(f"asked for {n} pages, {len(self._free)} free of {self.num_pages - 1}")
    out = [self._free.pop() for _ in range(n)]
    if kind == "kv":
      self._kv_pages += n
    else:
      self._adapter_pages += n
    return out

  def free(self, pages: list, kind: str = "kv") -> None:
    self._free.extend(reversed(pages))
    if kind == "kv":
      self._kv_pages -= len(pages)
    else:
      self._adapter_pages -= len(pages)

  def adapter_pages_needed(self, adapter) -> int:
    """Pages `adapter` takes in this pool."""
    return sum(-(-adapter.rank(p) // (self.page_size // d))
               for p in adapter.weights for d in self.sizes[p])

  def check_adapter(self, name: str, adapter) -> None:
    """Raises ValueError if the pool cannot hold `adapter` (rank, DoRA, targets)."""
    if adapter.config.use_dora:
      raise ValueError(f"adapter {name!r} uses DoRA, which the serving pool does not hold yet "
                       f"(its column norms depend on the merged weight); merge it "
                       f"(ja.merge) or serve it with model.generate")
    too_big = [p for p in adapter.weights if adapter.rank(p) > self.max_rank]
    if too_big:
      raise ValueError(f"adapter {name!r} has rank {adapter.rank(too_big[0])} at {too_big[0]}, "
                       f"above the pool's max_rank={self.max_rank}")
    head = [p for p in adapter.weights if p not in self.slot_of]
    if head:
      raise ValueError(f"adapter {name!r} targets {head[:3]}, which the serving pool does not "
                       f"hold (only the decoder's linear layers)")

  def load(self, key: tuple, adapter, nbytes: int = 0) -> ResidentAdapter:
    """Copies `adapter` (host weights) into free pages and a free slot.

    Raises:
      OutOfPages: not enough free pages or no free slot (nothing changes).
      ValueError: an adapter the pool cannot hold (`check_adapter`).
    """
    if key in self.resident:
      return self.resident[key]
    self.check_adapter(key[0], adapter)
    if not self._free_slots:
      raise OutOfPages(f"all {self.max_adapters} adapter slots are in use")
    need = self.adapter_pages_needed(adapter)
    pages = self.alloc(need, kind="adapter")
    slot = self._free_slots.pop()
    staged = []
    it = iter(pages)
    for path, w in adapter.weights.items():
      ps = self.slot_of[path]
      din, dout = self.sizes[path]
      r = adapter.rank(path)
      for side, (mat, feat) in enumerate(((np.asarray(w["a"]).T, din),
                                          (np.asarray(w["b"]), dout))):
        rpp = self.page_size // feat
        n = -(-r // rpp)
        padded = np.zeros((n * rpp, feat), np.float32)
        padded[:r] = mat
        split_features = self._split(path, side) == "features"
        for j in range(n):
          page = next(it)
          self.tables[ps, side, slot, j] = page
          rows = padded[j * rpp:(j + 1) * rpp]
          if split_features:  # device s holds every row's s-th slice of the features
            rows = rows.reshape(rpp, self.tp_size, -1).transpose(1, 0, 2)
          elif self.tp is None:
            rows = rows[:min(rpp, r - j * rpp)]  # only the rank rows (the rest is never read)
          staged.append((page, rows.reshape(-1)))
      self.scales[ps, slot] = adapter.scale(path)
      self.ranks[ps, slot] = r
    self._pending.extend(staged)
    self.targets = self.targets | frozenset(adapter.weights)
    self._device = None
    res = ResidentAdapter(key=key, slot=slot, pages=pages, nbytes=nbytes)
    self.resident[key] = res
    return res

  def _split(self, path: str, side: int) -> Optional[str]:
    """How a page of `path`'s A (side 0) or B (1) divides among the devices: "rows" (each
    device a contiguous run of the page's rank rows: A of a column-parallel layer, split along
    the rank), "features" (each device a slice of every row, as its base kernel: B, and A of a
    row-parallel layer), or None without tensor parallelism."""
    kind = None if self.tp is None else self.tp.kind(path)
    if kind is None:
      return None
    return "rows" if kind == "column" and side == 0 else "features"

  def _local(self, path: str) -> tuple[int, int]:
    """(in, out) of `path` as one device's pool view sees them."""
    din, dout = self.sizes[path]
    n = self.tp_size
    return (din if self._split(path, 0) != "features" else din // n,
            dout if self._split(path, 1) != "features" else dout // n)

  def unload(self, key: tuple) -> None:
    """Frees an adapter's pages and slot (its users must be 0)."""
    res = self.resident.pop(key)
    if res.users:
      self.resident[key] = res
      raise RuntimeError(f"adapter {key[0]!r} still has {res.users} users")
    self.tables[:, :, res.slot] = 0
    self.scales[:, res.slot] = 0.0
    self.ranks[:, res.slot] = 1
    self._device = None
    gone = set(res.pages)  # rows staged for it and not written yet: dropped, not written later
    self._pending = [(p, r) for p, r in self._pending if p not in gone]
    self.free(res.pages, kind="adapter")
    self._free_slots.append(res.slot)

  def _adapter_waste(self) -> int:
    """Elements of adapter pages that hold no rank row (the last page of each side)."""
    waste = 0
    for ps, path in enumerate(self.paths):
      for side, feat in enumerate(self.sizes[path]):
        rpp = self.page_size // feat
        for res in self.resident.values():
          r = int(self.ranks[ps, res.slot]) if self.scales[ps, res.slot] else 0
          if r:
            waste += (-(-r // rpp) * rpp - r) * feat
    return waste

  # -- what the device sees --------------------------------------------------------------------

  def _on_device(self) -> tuple:
    """(tables, scales, ranks) on the device and the views, made again only after an adapter
    was loaded or unloaded (a step reuses them: no per-step transfers or Python loops)."""
    if self._device is None:
      # Copies (the host arrays change in place; a CPU device array may alias its source).
      self._device = (jax.device_put(self.tables.copy()), jax.device_put(self.scales.copy()),
                      jax.device_put(self.ranks.copy()), self._views())
    return self._device

  def adapter_pool(self) -> AdapterPool:
    """The context's `AdapterPool` over the current pages."""
    tables, scales, ranks, _ = self._on_device()
    return AdapterPool(pages=self.pages, tables=tables, scales=scales, ranks=ranks)

  def views(self) -> dict:
    """`{path: PoolView}` for the paths some resident adapter targets (static geometry)."""
    return dict(self._on_device()[3])

  def _views(self) -> dict:
    out = {}
    slots = [res.slot for res in self.resident.values()]
    for path in self.paths:
      if path in self.targets:
        din, dout = self.sizes[path]
        local_in, local_out = self._local(path)
        ps = self.slot_of[path]
        live = [int(self.ranks[ps, n]) for n in slots if self.scales[ps, n]] or [1]
        # Pages for the largest resident rank (a power of two >= 8, so few programs), not for
        # max_rank: every page of the view is read for every token.
        bound = min(self.max_rank, max(8, 1 << (max(live) - 1).bit_length()))
        out[path] = PoolView(slot=ps, din=local_in, dout=local_out,
                             pages_a=-(-bound // (self.page_size // din)),
                             pages_b=-(-bound // (self.page_size // dout)), rank=bound)
    return out

  def stats(self, kv_tokens: int = 0) -> dict:
    """Occupancy and fragmentation.

    Args:
      kv_tokens: tokens cached now (the engine knows them), to measure the unused slots of
        partly filled KV pages.
    Returns:
      pages (usable), free, kv and adapter pages, occupancy (used / usable), and fragmentation:
      the share of used page elements that hold nothing (unused token slots of KV pages and
      unused rank rows of adapter pages).
    """
    usable = self.num_pages - 1
    used = self._kv_pages + self._adapter_pages
    kv_waste = self._kv_pages * self.page_size - kv_tokens * self.layers * self.kv_width
    waste = max(kv_waste, 0) + self._adapter_waste()
    return {"pages": usable, "free": len(self._free), "kv_pages": self._kv_pages,
            "adapter_pages": self._adapter_pages, "occupancy": used / usable,
            "fragmentation": waste / (used * self.page_size) if used else 0.0,
            "resident_adapters": len(self.resident), "page_size": self.page_size,
            "block": self.block, "bytes": self.num_pages * self.page_size * self.dtype.itemsize}
