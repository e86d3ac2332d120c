"""The S-LoRA scheduler: admission by pool budget, preemption by recompute, the prefix cache.

Paper: "S-LoRA: Serving Thousands of Concurrent LoRA Adapters" (Sheng et al., MLSys 2024),
Sec. 4.3 and its router: a request is admitted when the unified pool (`serve.pool.PagedPool`)
can hold its adapter and the KV pages of its worst-case length (`reserve="worst"`;
`reserve="none"` admits on the prompt alone, as vLLM does, and relies on preemption). Each step
is planned as prefill chunks first, then one token per decoding request, within a token budget;
when the pool cannot hold the step's KV, the most recently admitted request is preempted: its
pages are freed and it is recomputed later from its tokens so far (nothing is lost). Idle
adapters stay resident until their pages are needed (least recently used first), as do idle
prefix-cache blocks.

The prefix cache (SGLang/vLLM practice, not in the paper) keeps full prompt blocks keyed by a
hash chain over (adapter identity, the tokens of the block and every block before it): a
repeated system prompt under the same adapter reuses its KV pages; never across adapters.

The scheduler owns the queues and the host-side bookkeeping of the pool; the engine
(`serve.engine.Engine`) runs the planned step, streams the tokens and finishes requests.
"""
from __future__ import annotations

import collections
import dataclasses
from typing import Callable, Optional

from serve.pool import PagedPool
from serve.store import AdapterError, AdapterStore


@dataclasses.dataclass(eq=False)
class _Seq:
  handle: object  # its serve.engine.Handle
  tokens: list                  # prompt + generated ids
  prompt_len: int
  eos: frozenset
  key: Optional[tuple] = None   # (adapter name, digest) once its adapter is read
  slot: int = -1                # its adapter's pool slot (-1: base)
  computed: int = 0             # tokens whose KV is in the pool
  blocks: list = dataclasses.field(default_factory=list)  # per block: L page ids
  cached: list = dataclasses.field(default_factory=list)  # per block: its _Block if shared
  reserved: int = 0             # pages promised at admission, not yet allocated
  arrival: float = 0.0
  first_token: Optional[float] = None
  preemptions: int = 0
  sent_text: int = 0            # chars of text streamed so far
  stream_text: object = None    # its serve.detokenize.IncrementalText (made on first use)
  searched: int = 0             # chars of text already searched for stop strings
  error: Optional[str] = None
  logprobs: list = dataclasses.field(default_factory=list)
  top_logprobs: list = dataclasses.field(default_factory=list)

  @property
  def generated(self) -> int:
    return len(self.tokens) - self.prompt_len


@dataclasses.dataclass(eq=False)
class _Block:
  """A full block of prompt tokens' KV in the prefix cache, shared by the requests that hold it.
  Keyed by a hash chain over (adapter identity, the tokens of this block and every block before
  it), so it is reused only for the same adapter and the same preceding tokens."""
  key: int
  pages: list    # L page ids, one per layer
  refs: int = 0  # requests that hold it (0: idle, evictable)


class Scheduler:
  """Queues, admission, preemption and the prefix cache over one pool (module docstring).

  Args:
    pool: the unified pool.
    store: the adapter store (reads adapters on admission).
    finish: `finish(seq, reason, error=...)`, the engine's: ends a request (it calls `release`).
    stats: the engine's counters (admissions, waits, loads, hits, evictions, preemptions, ...).
    max_seqs, max_step_tokens, reserve, prefix_cache: as `serve.Engine`.
  """

  def __init__(self, pool: PagedPool, store: AdapterStore, finish: Callable,
               stats: collections.Counter, *, max_seqs: int, max_step_tokens: int,
               reserve: str, prefix_cache: bool):
    self.pool, self.store, self.finish, self._stats = pool, store, finish, stats
    self.max_seqs, self.max_step_tokens = max_seqs, max_step_tokens
    self.reserve, self.prefix_cache = reserve, prefix_cache
    self.waiting: collections.deque = collections.deque()
    self.running: list = []
    self._lru: collections.OrderedDict = collections.OrderedDict()  # resident keys, idle order
    self._name_key: dict = {}  # adapter name -> the key (name, digest) last made resident
    self._prefix: collections.OrderedDict = collections.OrderedDict()  # key -> _Block
    self._idle_blocks: collections.OrderedDict = collections.OrderedDict()  # refs == 0, LRU
    self.routed_names: frozenset = frozenset()  # a MeteoRA model's name: adapters pinned

  def release(self, seq: _Seq) -> None:
    """Takes a finished request off the queues and frees what it holds."""
    if seq in self.running:
      self.running.remove(seq)
    if seq in self.waiting:
      self.waiting.remove(seq)
    self._release_blocks(seq)
    seq.reserved = 0
    self._release_adapter(seq)

  def forget(self, name: str) -> None:
    """Drops adapter `name`'s pool pages if no request holds them (an unloaded adapter)."""
    key = self._name_key.pop(name, None)
    if key is not None and key in self._lru:
      self._lru.pop(key)
      self.pool.unload(key)

  def resident_key(self, name: str) -> Optional[tuple]:
    """The (name, digest) of `name`'s pages in the pool, or None."""
    key = self._name_key.get(name)
    return key if key is not None and key in self.pool.resident else None

  def prefix_blocks(self) -> int:
    return len(self._prefix)

  # -- admission -------------------------------------------------------------------------------

  def _resident(self, seq: _Seq) -> bool:
    """Puts `seq`'s adapter in the pool (reading it if needed); False if it does not fit now.
    A bad adapter finishes `seq` with an error and returns False."""
    name = seq.handle.request.adapter
    if name is None:
      return True
    if name in self.routed_names:  # its adapters are pinned; its own prefix-cache identity
      seq.key, seq.slot = ("routed", name), -1
      return True
    key = self._name_key.get(name)
    if key in self.pool.resident and self.store.unchanged(name, key[1]):
      self._stats["adapter_hits"] += 1  # on the device already (and its files unchanged)
    else:
      try:
        if not self.store.cached(name):
          self._stats["admissions_waited"] += 1  # a disk read now: prefetch did not get to it
        stored = self.store.get(name)
        self.pool.check_adapter(name, stored.adapter)
      except (AdapterError, ValueError) as e:
        self.finish(seq, "error", error=str(e))
        return False
      key = stored.key
      if key not in self.pool.resident:
        need = self.pool.adapter_pages_needed(stored.adapter)
        if not self._make_room(need, slots=True):
          return False
        self.pool.load(key, stored.adapter, stored.nbytes)
        self._stats["adapter_loads"] += 1
      else:
        self._stats["adapter_hits"] += 1
      old = self._name_key.get(name)
      if old is not None and old != key and old in self._lru:  # a stale version, idle: free it
        self._lru.pop(old)
        self.pool.unload(old)
      self._name_key[name] = key
    res = self.pool.resident[key]
    res.users += 1
    self._lru.pop(key, None)
    seq.key, seq.slot = key, res.slot
    return True

  def _evict_one(self, adapters: bool = True) -> bool:
    """Frees the least recently used idle prefix block, else (with `adapters`) the least
    recently used idle adapter; False when there is nothing idle."""
    if self._idle_blocks:
      key, _ = self._idle_blocks.popitem(last=False)
      block = self._prefix.pop(key)
      self.pool.free(block.pages, kind="kv")
      self._stats["prefix_evictions"] += 1
      return True
    if adapters and self._lru:
      key, _ = self._lru.popitem(last=False)
      self.pool.unload(key)
      self._stats["adapter_evictions"] += 1
      return True
    return False

  def _make_room(self, pages: int, slots: bool = False) -> bool:
    """Evicts idle prefix blocks and idle adapters (least recently used first) until `pages`
    are free beyond what is reserved (and a slot, with `slots`)."""
    def ok():
      return (self.pool.free_pages - self._reserved() >= pages
              and (not slots or self.pool._free_slots))
    while not ok():
      if slots and not self.pool._free_slots:
        if not self._lru:
          break
        key, _ = self._lru.popitem(last=False)  # a slot only an adapter can free
        self.pool.unload(key)
        self._stats["adapter_evictions"] += 1
      elif not self._evict_one():
        break
    return bool(ok())

  def _idle_pages(self) -> int:
    """Pages that eviction could free now: idle prefix blocks and idle adapters."""
    adapters = sum(len(self.pool.resident[k].pages) for k in self._lru if k in self.pool.resident)
    return len(self._idle_blocks) * self.pool.layers + adapters

  def _cached_pages(self, seq: _Seq) -> int:
    """KV pages of `seq`'s prefix that the cache holds (0 before its adapter is known)."""
    if not self.prefix_cache or (seq.handle.request.adapter is not None and seq.key is None):
      return 0
    n = 0
    for key in self._chain(seq, (len(seq.tokens) - 1) // self.pool.block):
      if key not in self._prefix:
        break
      n += 1
    return n * self.pool.layers

  def _reserved(self) -> int:
    return sum(s.reserved for s in self.running)

  def _kv_pages(self, tokens: int) -> int:
    return -(-tokens // self.pool.block) * self.pool.layers

  def _on_disk(self, seq: _Seq) -> bool:
    """Whether `seq`'s adapter is neither in the pool nor in host memory (a disk read)."""
    name = seq.handle.request.adapter
    if name is None or name not in self.store:
      return False
    key = self._name_key.get(name)
    if key in self.pool.resident:
      return False
    try:
      return not self.store.cached(name)
    except AdapterError:  # unregistered meanwhile: admission reports it
      return False

  def admit(self) -> None:
    """Moves waiting requests into the running batch while the pool and `max_seqs` allow, in
    arrival order; a request whose adapter is still on disk is passed over while others run
    (the prefetch thread reads it meanwhile: S-LoRA Sec. 4.2), so the step loop does not wait
    for a disk read unless there is nothing else to run."""
    deferred = []
    try:
      self._admit(deferred)
    finally:
      self.waiting.extendleft(reversed(deferred))  # back at the front, in order
    if deferred:
      self._stats["admission_deferrals"] += len(deferred)

  def _admit(self, deferred: list) -> None:
    while self.waiting and len(self.running) < self.max_seqs:
      seq = self.waiting[0]
      if seq.handle.cancelled:
        self.waiting.popleft()
        self.finish(seq, "cancelled")
        continue
      if self.running and len(deferred) < self.max_seqs and self._on_disk(seq):
        deferred.append(self.waiting.popleft())
        continue
      remaining = seq.handle.request.max_tokens - seq.generated
      total = len(seq.tokens) + (remaining if self.reserve == "worst" else 1)
      need = self._kv_pages(total)
      room = self.pool.free_pages + self._idle_pages() - self._reserved()
      if room < need - self._cached_pages(seq):
        if not self.running:
          self._cannot_fit(seq, need)
          continue
        break  # not even with every idle page: wait for running requests to finish
      if not self._resident(seq):
        if seq.handle.done():  # its adapter failed (`_finish` took it off the queue): go on
          continue
        if not self.running:
          self._cannot_fit(seq, need)
          continue
        break
      self._reuse_prefix(seq)  # holds its cached blocks, so making room cannot evict them
      need -= len(seq.blocks) * self.pool.layers
      if not self._make_room(need):
        self._release_blocks(seq)
        seq.computed = 0
        self._release_adapter(seq)
        if not self.running:
          self._cannot_fit(seq, need)
          continue
        break
      self.waiting.popleft()
      seq.reserved = need
      self.running.append(seq)
      self._stats["admissions"] += 1

  def _cannot_fit(self, seq: _Seq, kv_pages: int) -> None:
    """Ends a request that does not fit even in the otherwise empty pool (nothing runs, every
    idle page was evictable): its adapter's pages plus its KV exceed the pool."""
    name = seq.handle.request.adapter
    self.finish(seq, "error", error=(
        f"the request needs {kv_pages} KV pages" + (f" plus adapter {name!r}'s pages" if name
                                                    else "")
        + f", more than the pool's {self.pool.num_pages - 1} pages hold; use a larger pool_mb "
        f"or fewer tokens"))

  def _release_adapter(self, seq: _Seq) -> None:
    if seq.key is None:
      return
    res = self.pool.resident.get(seq.key)
    if res is not None:
      res.users -= 1
      if res.users == 0:
        self._lru[seq.key] = None
    seq.key, seq.slot = None, -1

  # -- one step's KV ------------------------------------------------------------------------

  def _grow(self, seq: _Seq, upto: int) -> bool:
    """Allocates KV pages so `seq` can hold `upto` tokens; False if the pool is out."""
    need = -(-upto // self.pool.block) - len(seq.blocks)
    if need <= 0:
      return True
    n = need * self.pool.layers
    while self.pool.free_pages < n:  # idle prefix blocks, then idle adapters, make room
      if not self._evict_one():
        return False
    pages = self.pool.alloc(n, kind="kv")
    seq.blocks += [pages[i * self.pool.layers:(i + 1) * self.pool.layers] for i in range(need)]
    seq.cached += [None] * need
    seq.reserved = max(seq.reserved - n, 0)
    return True

  def _release_blocks(self, seq: _Seq) -> None:
    """Frees `seq`'s KV pages; shared prefix blocks lose a holder (kept, idle, when none is
    left)."""
    for pages, block in zip(seq.blocks, seq.cached):
      if block is None:
        self.pool.free(pages, kind="kv")
      else:
        block.refs -= 1
        if block.refs == 0:
          self._idle_blocks[block.key] = None
    seq.blocks, seq.cached = [], []

  def _chain(self, seq: _Seq, n_blocks: int) -> list:
    """The prefix-cache keys of `seq`'s first `n_blocks` full blocks."""
    b, keys, h = self.pool.block, [], hash(("prefix", seq.key))
    for i in range(n_blocks):
      h = hash((h, tuple(seq.tokens[i * b:(i + 1) * b])))
      keys.append(h)
    return keys

  def _reuse_prefix(self, seq: _Seq) -> None:
    """On admission: takes the cached blocks of `seq`'s longest cached prefix (at least one
    prompt token is left to compute, for the logits)."""
    if not self.prefix_cache or seq.blocks:
      return
    for key in self._chain(seq, (len(seq.tokens) - 1) // self.pool.block):
      block = self._prefix.get(key)
      if block is None:
        break
      if block.refs == 0:
        self._idle_blocks.pop(key, None)
      block.refs += 1
      self._prefix.move_to_end(key)
      seq.blocks.append(block.pages)
      seq.cached.append(block)
    seq.computed = len(seq.blocks) * self.pool.block
    self._stats["prefix_hit_tokens"] += seq.computed

  def share_prefix(self, seq: _Seq) -> None:
    """After a step: puts `seq`'s newly computed full prompt blocks in the cache."""
    if not self.prefix_cache:
      return
    full = min(seq.computed, seq.prompt_len) // self.pool.block
    if full == 0 or all(c is not None for c in seq.cached[:full]):
      return
    for i, key in enumerate(self._chain(seq, full)):
      if seq.cached[i] is not None:
        continue
      if key in self._prefix:  # another request cached the same block meanwhile: keep ours
        continue
      block = _Block(key=key, pages=seq.blocks[i], refs=1)
      self._prefix[key] = block
      seq.cached[i] = block

  def _preempt(self, seq: _Seq) -> None:
    """Frees `seq`'s KV pages and queues it again at the front (recomputed from its tokens)."""
    self.running.remove(seq)
    self._release_blocks(seq)
    seq.computed, seq.reserved = 0, 0
    self._release_adapter(seq)
    seq.preemptions += 1
    self._stats["preemptions"] += 1
    self.waiting.appendleft(seq)

  def plan(self) -> list:
    """[(seq, number of its tokens to feed)] for this step: prefill chunks first, then decodes;
    preempts the newest requests when the pool cannot hold the step's KV."""
    while True:
      budget = self.max_step_tokens
      plan = []
      prefill = [s for s in self.running if len(s.tokens) - s.computed > 1]
      decode = [s for s in self.running if len(s.tokens) - s.computed == 1]
      budget -= len(decode)
      for s in prefill:
        n = min(len(s.tokens) - s.computed, budget)
        if n <= 0:
          break
        plan.append((s, n))
        budget -= n
      plan += [(s, 1) for s in decode]
      failed = next((s for s, n in plan if not self._grow(s, s.computed + n)), None)
      if failed is None:
        return plan
      victim = max(self.running, key=lambda s: s.arrival)  # the newest admitted
      self._preempt(victim)
      if not self.running:
        return []
