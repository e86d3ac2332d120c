"""The S-LoRA engine: continuous batching of requests for many adapters over one unified pool.

Paper: "S-LoRA: Serving Thousands of Concurrent LoRA Adapters" (Sheng et al., MLSys 2024).
  * Sec. 4.1 unified paging: KV pages and adapter pages share one device array
    (`serve.pool.PagedPool`); a request's adapter is copied into the pool when it is admitted and
    freed when no running request needs it (least recently used first).
  * Sec. 4.2 prefetch: a background thread reads the adapters of the waiting queue from disk
    into host memory (`serve.store.AdapterStore`) while the batch decodes, so an admission
    rarely waits for a disk read (`stats()["admissions_waited"]`).
  * Sec. 5 heterogeneous batching: one packed forward per step (prefill chunks first, then one
    token per decoding request), every projection's LoRA read straight from the pool pages
    through `kernels_pallas` in the per-token layout; base-only requests in the same batch.
  * Admission, preemption and the prefix cache (`serve.scheduler`, as S-LoRA's scheduler): a
    request is admitted when the pool can hold its adapter and the KV pages of its worst-case
    length (`reserve="worst"`; `reserve="none"` admits on the prompt alone, as vLLM does, and
    relies on preemption). When a step cannot get the pages it needs, the most recently
    admitted request is preempted: its pages are freed and it is recomputed later from its
    tokens so far (nothing is lost).

```python
engine = Engine(model, adapters={"sql": "adapters/sql"}, pool_mb=256)
out = engine.generate([Request(prompt="...", adapter="sql", max_tokens=32)])
handle = engine.submit(Request(prompt=ids, temperature=0.8, seed=1))
for event in handle: ...              # streamed tokens (online use: engine.start() first)
```

Shapes are bucketed (sequences, tokens, query run, pages per sequence to powers of two, with
floors), so a repeated workload compiles nothing new (`tests/serve/test_engine.py`; the demo's
32 requests compile 6 step programs).
"""
from __future__ import annotations

import collections
import dataclasses
import functools
import itertools
import math
import os
import queue
import threading
import time
import weakref
from typing import Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

from jaxadapt import generate as gen_lib
from jaxadapt.context import Context, PagedKV, Router, make_routing
from jaxadapt.models.frozen import apply
from kernels_pallas import attention as paged_attention
from serve.pool import PagedPool
from serve.detokenize import IncrementalText
from serve.scheduler import Scheduler, _Seq
from serve.store import AdapterBusy, AdapterError, AdapterExists, AdapterStore, UnknownAdapter


@dataclasses.dataclass
class Request:
  """One generation request.

  Attributes:
    prompt: text (through the model's tokenizer) or token ids.
    adapter: a registered adapter name, or None for the base model.
    max_tokens: new tokens at most (> 0).
    temperature, top_k, top_p, seed: sampling as `model.generate` (0 = greedy); a seed makes
      the request reproducible (its draws are `fold_in(key(seed), i)` for its i-th token,
      whatever batch it runs in: equal to `model.generate(..., seed=[seed])`).
    stop: strings that end the request (not included in the text).
    eos_token_id: ids that end it; None = the model's.
    request_id: any string; one is made when None.
  """
  prompt: Union[str, Sequence[int]]
  adapter: Optional[str] = None
  max_tokens: int = 16
  temperature: float = 0.0
  top_k: int = 0
  top_p: float = 1.0
  seed: Optional[int] = None
  stop: Sequence[str] = ()
  eos_token_id: Optional[Sequence[int]] = None
  request_id: Optional[str] = None


@dataclasses.dataclass
class Completion:
  """A finished request: new token ids and text, why it finished, and its timings (seconds)."""
  request_id: str
  adapter: Optional[str]
  prompt_tokens: int
  tokens: list
  text: Optional[str]
  finish_reason: str           # "stop", "length", "cancelled" or "error"
  error: Optional[str] = None
  arrival: float = 0.0
  first_token: Optional[float] = None   # time to first token
  finished: float = 0.0
  preemptions: int = 0
  logprobs: list = dataclasses.field(default_factory=list)      # per new token
  top_logprobs: list = dataclasses.field(default_factory=list)  # per new token: ((id, lp), ...)


@dataclasses.dataclass(frozen=True)
class TokenEvent:
  """One streamed token: its id, the text it completes (may be empty mid-character or while a
  possible stop string is held back), its log-probability under the model (before sampling
  warpers) and the `TOP_LOGPROBS` most likely tokens as ((id, logprob), ...)."""
  token: int
  text: str
  logprob: float = 0.0
  top_logprobs: tuple = ()


TOP_LOGPROBS = 5  # alternatives reported per token (OpenAI's completions allow logprobs <= 5)
# A step whose tokens use at most this many distinct adapters reads each of them once
# (`kernels_pallas.lora_members`, one fixed size so it adds one program per shape bucket); more,
# and each token reads its own adapter's rank rows (`lora_rows`). Measured on bench.serving's
# decode step (32 tokens, rank 8 on q/k/v/o; docs/benchmarks.md, Session 11): 1 and 8 adapters
# +5.0 / +3.4 ms over the base's 60.3, against +6.1 / +6.0 per token; with 32 members the
# matmuls cost more than the per-token reads (+16 against +10 ms).
MEMBERS = 8


class Overloaded(RuntimeError):
  """The engine's queue is full (`max_queue`) or it is shutting down: try again later."""


class Handle:
  """A submitted request. Iterate it for `TokenEvent`s (ends when the request does); `result()`
  waits for the `Completion`; `cancel()` ends it early (its pages are freed)."""

  def __init__(self, engine: "Engine", request: Request, request_id: str):
    self.engine, self.request, self.request_id = engine, request, request_id
    self._events: queue.Queue = queue.Queue()
    self._done = threading.Event()
    self.completion: Optional[Completion] = None
    self.cancelled = False

  def __iter__(self):
    while True:
      event = self._events.get()
      if event is None:
        return
      yield event

  def cancel(self) -> None:
    self.cancelled = True
    self.engine._wake()

  def done(self) -> bool:
    return self._done.is_set()

  def result(self, timeout: Optional[float] = None) -> Completion:
    if not self._done.wait(timeout):
      raise TimeoutError(f"request {self.request_id} did not finish within {timeout} s")
    return self.completion


def _bucket(n: int, minimum: int = 1) -> int:
  return gen_lib.bucket(n, minimum)


class _Frozen:
  """A model's static parts as one step-program argument: its graph and its params' tree
  structure, hashed once. jit hashes static arguments on every call, and a GraphDef's hash
  walks the whole graph (~3 ms a step here); the params travel as a flat list of leaves (no
  per-step flattening of the nnx State either). Equal for equal models, so engines on one
  model share their programs."""

  def __init__(self, graphdef, params):
    leaves, self.treedef = jax.tree.flatten(params)
    self.graphdef = graphdef
    self.leaves = tuple(leaves)
    self._hash = hash((graphdef, self.treedef))

  def __hash__(self) -> int:
    return self._hash

  def __eq__(self, other) -> bool:
    return self is other or (isinstance(other, _Frozen) and self._hash == other._hash
                             and self.treedef == other.treedef
                             and self.graphdef == other.graphdef)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _engine_forward(frozen, sampling, leaves, pages, ctx, ids, positions, select, samp):
  """One packed forward over the pool and the next token of each selected sequence. On the
  reference path it only reads the pool and returns the new keys/values (`_write_kv` writes
  them, in place); on the TPU kernel path it returns the written pool. `frozen` is the model's
  `_Frozen`, `leaves` its params' leaves."""
  graphdef, params = frozen.graphdef, jax.tree.unflatten(frozen.treedef, leaves)
  ctx = ctx.with_pages(pages)
  logits, pages, new_kv = apply(graphdef, params, "packed_logits", ids, positions, select,
                                ctx=ctx)
  tokens, logprobs = sample_and_score(logits, samp, sampling)
  return (pages if new_kv is None else None), new_kv, tokens, logprobs


def sample_and_score(logits, samp, sampling: bool):
  """(next token of each row, (its logprob, the TOP_LOGPROBS best (logprobs, ids))) from a
  step's logits [S, vocab]; `samp` = (temperature, top_k, top_p, seeds, counts) per row."""
  temperature, top_k, top_p, seeds, counts = samp
  keys = jax.vmap(jax.random.key)(seeds)
  tokens = gen_lib.sample_tokens(logits, temperature, top_k, top_p, keys, counts, sampling)
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  chosen = jnp.take_along_axis(logp, tokens[:, None], axis=-1)[:, 0]
  return tokens, (chosen, jax.lax.top_k(logp, min(TOP_LOGPROBS, logp.shape[-1])))


_engine_forward_donated = jax.jit(_engine_forward.__wrapped__, static_argnums=(0, 1),
                                  donate_argnums=(3,))


@functools.partial(jax.jit, static_argnums=(0,), donate_argnums=(1,))
def _write_kv(shape, pages, new_kv, tables, seq, pos, valid):
  """The pool with the step's keys/values written: the only op on the donated pool, so XLA
  updates it in place."""
  kv_pages = pages.reshape(shape)
  kv_pages = paged_attention.write_layers(kv_pages, new_kv[0], new_kv[1], tables, seq, pos,
                                          valid)
  return kv_pages.reshape(pages.shape)


def _prefetch_loop(ref) -> None:
  """The prefetch thread (S-LoRA Sec. 4.2). It holds its engine only weakly and ends when the
  engine is gone."""
  failed = {}
  while True:
    engine = ref()
    if engine is None:
      return
    busy = engine._prefetch_once(failed)
    event = engine._prefetch_event
    del engine
    if not busy:
      event.wait(0.05)
      event.clear()


class Engine:
  """S-LoRA serving over one frozen `CausalLM` (module docstring).

  Args:
    model: the base (`ja.load_model(...)`).
    adapters: {name: PEFT dir} to register (read lazily).
    adapter_dir: a dir whose PEFT subdirs are all registered (names: relative paths).
    pool_mb: the unified pool's size in MiB (or `num_pages`).
    num_pages: the pool's size in pages (instead of pool_mb).
    block: KV tokens per page (default: the smallest >= 16 that every layer's size divides).
    max_seqs: requests in a batch at most.
    max_step_tokens: tokens of one forward at most (prefill chunks are cut to fit).
    max_adapters: adapters resident in the pool at once.
    max_rank: the largest adapter rank served.
    host_cache_mb: host memory for adapter weights (the store's LRU budget).
    reserve: "worst" (admit when the worst-case KV fits) or "none" (prompt only; preempt).
    prefetch: read waiting requests' adapters on a background thread.
    prefix_cache: keep the KV of full prompt blocks for reuse by later requests with the same
      adapter and the same leading tokens (a repeated system prompt); never across adapters.
    max_queue: requests waiting at most; `submit` raises `Overloaded` beyond it.
    tensor_parallel: devices to shard the base, the adapters and the KV pool over (S-LoRA
      Sec. 6, `serve.tp`); the pool's size (pool_mb / num_pages) is its total over them.
  """

  def __init__(self, model, *, adapters: Optional[dict] = None,
               adapter_dir: Optional[str] = None, pool_mb: Optional[float] = None,
               num_pages: Optional[int] = None, block: Optional[int] = None,
               max_seqs: int = 32, max_step_tokens: int = 256, max_adapters: int = 64,
               max_rank: int = 64, host_cache_mb: float = 1024, reserve: str = "worst",
               prefetch: bool = True, prefix_cache: bool = True, max_queue: int = 4096,
               tensor_parallel: int = 1, meteora=None, meteora_name: str = "meteora"):
    if reserve not in ("worst", "none"):
      raise ValueError(f"reserve must be 'worst' or 'none', got {reserve!r}")
    if max_seqs < 1 or max_step_tokens < max_seqs:
      raise ValueError(f"need max_seqs >= 1 and max_step_tokens >= max_seqs; got {max_seqs}, "
                       f"{max_step_tokens}")
    self.model = model
    self.store = AdapterStore(model, host_budget_bytes=int(host_cache_mb * 2 ** 20))
    for name, path in (adapters or {}).items():
      self.store.register(name, path)
    if adapter_dir is not None:
      self.store.register_tree(adapter_dir)
    self.tp_plan = None
    self._frozen = None  # the model's _Frozen for the step programs, made at the first step
    if tensor_parallel != 1:
      from serve import tp as tp_lib
      self.tp_plan = tp_lib.plan(model, tensor_parallel)
    tp = None if self.tp_plan is None else self.tp_plan.tp
    block = block or PagedPool.block_for(model, 16, tp)
    if num_pages is None:
      c = model.config
      page_bytes = block * 2 * c.num_key_value_heads * c.head_dim * np.dtype(model.dtype).itemsize
      num_pages = int((pool_mb if pool_mb is not None else 256) * 2 ** 20 // page_bytes)
    self.pool = PagedPool(model, num_pages=num_pages, block=block, max_adapters=max_adapters,
                          max_rank=max_rank, tp=tp,
                          sharding=None if self.tp_plan is None else self.tp_plan.pool_sharding)
    self.max_seqs, self.max_step_tokens, self.reserve = max_seqs, max_step_tokens, reserve
    self.max_queue = max_queue
    self._closed = False
    self._retiring: set = set()  # adapters being unloaded: no new requests; gone when unused
    self._step_lock = threading.RLock()  # one step, or one change of adapters/stats, at a time
    self.default_eos = frozenset(gen_lib._default_eos(model))
    self._lock = threading.Lock()
    self._incoming: collections.deque = collections.deque()
    self._prefetch_names: list = []  # adapters of the waiting queue, for the prefetch thread
    self._prefetch_event = threading.Event()
    self._ids = itertools.count()
    self._stats = collections.Counter()
    self._peak_pages = 0
    self.prefix_cache = prefix_cache
    self.scheduler = Scheduler(self.pool, self.store, self._finish, self._stats,
                               max_seqs=max_seqs, max_step_tokens=max_step_tokens,
                               reserve=reserve, prefix_cache=prefix_cache)
    self.meteora, self.meteora_name = None, None
    if meteora is not None:
      self._pin_meteora(meteora, meteora_name, tensor_parallel)
    self._wake_event = threading.Event()
    self._loop_thread = None
    self._stop_loop = False
    self._prefetch_thread = None
    if prefetch:
      self._prefetch_thread = threading.Thread(target=_prefetch_loop, args=(weakref.ref(self),),
                                               daemon=True, name="jaxadapt-prefetch")
      self._prefetch_thread.start()

  def _pin_meteora(self, meteora, name: str, tensor_parallel: int) -> None:
    """Serves a MeteoRA model (jaxadapt.meteora) as adapter `name`: its N adapters are loaded
    into the pool once and stay (pinned: never idle, never evicted); its requests' tokens are
    routed by the gates in the same batched forward as the plain adapters' (MeteoRA Eq. 3-4)."""
    from jaxadapt import meteora as meteora_lib
    if tensor_parallel != 1:
      raise ValueError("a MeteoRA model is served without tensor parallelism (the gated "
                       "mixture runs on one device); drop --tensor-parallel or --meteora")
    if isinstance(meteora, (str, os.PathLike)):
      meteora = meteora_lib.load_meteora(meteora, self.model)
    if not isinstance(meteora, meteora_lib.Meteora):
      raise TypeError(f"meteora= takes a jaxadapt Meteora or its dir, got "
                      f"{type(meteora).__name__}")
    if name in self.store:
      raise ValueError(f"the MeteoRA model's name {name!r} is also an adapter's; pass another "
                       f"meteora_name")
    if meteora.num_adapters > self.pool.max_adapters:
      raise ValueError(f"the MeteoRA model has {meteora.num_adapters} adapters; the pool holds "
                       f"{self.pool.max_adapters} (max_adapters)")
    need = sum(self.pool.adapter_pages_needed(a) for a in meteora.adapters)
    if need > self.pool.free_pages:
      raise ValueError(f"the MeteoRA model's {meteora.num_adapters} adapters need {need} pool "
                       f"pages, {self.pool.free_pages} are free; a larger pool (pool_mb)")
    slots = []
    for sub, adapter in zip(meteora.names, meteora.adapters):
      res = self.pool.load((f"{name}/{sub}", "pinned"), jax.device_get(adapter))
      res.users += 1  # pinned for the engine's life
      slots.append(res.slot)
    self.meteora, self.meteora_name = meteora, name
    self._meteora_slots = jnp.asarray(slots, jnp.int32)
    self.scheduler.routed_names = frozenset({name})

  def _routed(self, name: Optional[str]) -> bool:
    return name is not None and name == self.meteora_name

  # -- submission ------------------------------------------------------------------------------

  def _tokenize(self, prompt) -> list:
    if isinstance(prompt, str):
      tok = self.model.tokenizer
      if tok is None:
        raise ValueError("a text prompt needs the model's tokenizer, and this model has none; "
                         "pass token ids")
      return [int(t) for t in tok(prompt)["input_ids"]]
    ids = np.asarray(prompt)
    if ids.ndim != 1 or ids.size == 0 or not np.issubdtype(ids.dtype, np.integer):
      raise ValueError(f"a prompt must be text or a non-empty list of int token ids; got "
                       f"{type(prompt).__name__} of shape {ids.shape}")
    return [int(t) for t in ids]

  def check(self, request: Request) -> tuple[list, frozenset]:
    """The prompt ids and eos set of `request`, or a ValueError naming what is wrong."""
    if not isinstance(request, Request):
      raise TypeError(f"expected a serve.Request, got {type(request).__name__}")
    ids = self._tokenize(request.prompt)
    vocab = self.model.config.vocab_size
    bad = [t for t in ids if not 0 <= t < vocab]
    if bad:
      raise ValueError(f"prompt token ids {bad[:3]} are outside the vocabulary [0, {vocab})")
    mt = request.max_tokens
    if not isinstance(mt, (int, np.integer)) or isinstance(mt, bool) or mt <= 0:
      raise ValueError(f"max_tokens must be an int > 0, got {mt!r}")
    context = self.model.config.max_position_embeddings
    if len(ids) + mt > context:
      raise ValueError(f"the prompt has {len(ids)} tokens and max_tokens={mt}: {len(ids) + mt} "
                       f"> the model's context of {context} tokens")
    blocks = -(-(len(ids) + mt) // self.pool.block) * self.pool.layers
    if blocks > self.pool.num_pages - 1:
      raise ValueError(f"the prompt ({len(ids)} tokens) + max_tokens={mt} need {blocks} KV "
                       f"pages; the pool has {self.pool.num_pages - 1}, so it can never hold "
                       f"this request (a larger pool_mb, or fewer tokens)")
    t, k, p = request.temperature, request.top_k, request.top_p
    if not (isinstance(t, (int, float)) and math.isfinite(t) and t >= 0):
      raise ValueError(f"temperature must be a float >= 0, got {t!r}")
    if not (isinstance(k, (int, np.integer)) and not isinstance(k, bool) and k >= 0):
      raise ValueError(f"top_k must be an int >= 0, got {k!r}")
    if not (isinstance(p, (int, float)) and 0 < p <= 1):
      raise ValueError(f"top_p must be in (0, 1], got {p!r}")
    if request.seed is not None and not (isinstance(request.seed, (int, np.integer))
                                         and 0 <= request.seed < 2 ** 32):
      raise ValueError(f"seed must be an int in [0, 2**32) or None, got {request.seed!r}")
    stops = list(request.stop or ())
    if any(not isinstance(s, str) or not s for s in stops):
      raise ValueError(f"stop must be a list of non-empty strings, got {request.stop!r}")
    if stops and self.model.tokenizer is None:
      raise ValueError("stop strings need the model's tokenizer, and this model has none")
    if request.adapter in self._retiring:
      raise AdapterBusy(f"adapter {request.adapter!r} is being unloaded; it takes no new "
                        f"requests")
    if (request.adapter is not None and request.adapter not in self.store
        and not self._routed(request.adapter)):
      names = self.store.names()
      raise UnknownAdapter(f"unknown adapter {request.adapter!r}; {len(names)} registered"
                         f"{' (e.g. ' + ', '.join(names[:5]) + ')' if names else ''}")
    eos = (self.default_eos if request.eos_token_id is None
           else frozenset(int(e) for e in np.atleast_1d(request.eos_token_id)))
    return ids, eos

  def submit(self, request: Request) -> Handle:
    """Queues `request` and returns its `Handle`.

    Raises:
      ValueError (AdapterError for an unknown adapter): a request that can never run; nothing
        is queued.
    """
    return self._queue(request, *self.check(request))

  def submit_many(self, requests: Sequence[Request]) -> list:
    """Queues every request or none (each checked first; `Overloaded` when the queue cannot take
    them all), between two steps, so they are admitted together (a request's n choices, a batch
    of prompts). Returns their `Handle`s in order."""
    checked = [self.check(r) for r in requests]
    with self._step_lock:
      if self._closed:
        raise Overloaded("the engine is shutting down and takes no new requests")
      if len(self._incoming) + len(self.waiting) + len(requests) > self.max_queue:
        raise Overloaded(f"{len(requests)} requests would exceed max_queue={self.max_queue}; "
                         f"retry later")
      for r in requests:  # unloaded since `check`? (unloading takes the step lock too)
        self._servable(r.adapter)
      return [self._queue(r, *c) for r, c in zip(requests, checked)]

  def _queue(self, request: Request, ids: list, eos: frozenset) -> Handle:
    if self._closed:
      raise Overloaded("the engine is shutting down and takes no new requests")
    if len(self._incoming) + len(self.waiting) >= self.max_queue:
      raise Overloaded(f"{self.max_queue} requests are waiting already (max_queue); retry later")
    rid = request.request_id or f"req-{next(self._ids)}"
    handle = Handle(self, request, rid)
    seq = _Seq(handle=handle, tokens=list(ids), prompt_len=len(ids), eos=eos,
               arrival=time.perf_counter())
    with self._lock:  # `_retire` forgets adapters under this lock: checked and queued at once
      self._servable(request.adapter)
      self._incoming.append(seq)
    self._wake()
    self._prefetch_event.set()
    return handle

  def generate(self, requests: Sequence[Request]) -> list:
    """Runs `requests` to completion (offline batch) and returns their `Completion`s in order.
    Every request is checked before any is queued."""
    handles = self.submit_many(requests)
    if self._loop_thread is None:
      while not all(h.done() for h in handles):
        self.step()
    return [h.result() for h in handles]

  # -- the loop --------------------------------------------------------------------------------

  def start(self) -> None:
    """Runs steps on a background thread whenever there is work (online use: the server)."""
    if self._loop_thread is not None:
      return
    self._stop_loop = False
    self._loop_thread = threading.Thread(target=self._loop, daemon=True, name="jaxadapt-engine")
    self._loop_thread.start()

  def stop(self) -> None:
    self._stop_loop = True
    self._wake()
    if self._loop_thread is not None:
      self._loop_thread.join()
      self._loop_thread = None

  def _wake(self) -> None:
    self._wake_event.set()

  def _loop(self) -> None:
    while not self._stop_loop:
      if not self.has_work():
        self._wake_event.wait(0.05)
        self._wake_event.clear()
        continue
      try:
        self.step()
      except Exception as e:  # a bug must not kill the server: fail the running requests
        for seq in list(self.running) + list(self.waiting):
          self._finish(seq, "error", error=f"engine error: {type(e).__name__}: {e}")
        self.scheduler.running, self.scheduler.waiting = [], collections.deque()

  @property
  def closed(self) -> bool:
    """Whether `close()` was called (no new requests)."""
    return self._closed

  @property
  def loop_alive(self) -> bool:
    """Whether the background step loop (`start()`) is running."""
    return self._loop_thread is not None and self._loop_thread.is_alive()

  def has_work(self) -> bool:
    return bool(self._incoming or self.waiting or self.running)

  def close(self, timeout: Optional[float] = None) -> bool:
    """Stops admitting new requests (`submit` raises `Overloaded`) and waits up to `timeout`
    seconds (None: no limit) for those in flight to finish. Returns whether all finished."""
    self._closed = True
    deadline = None if timeout is None else time.monotonic() + timeout
    while self.has_work():
      if self._loop_thread is None:
        self.step()
      elif deadline is not None and time.monotonic() > deadline:
        return False
      else:
        time.sleep(0.01)
    return True

  def step(self) -> int:
    """One iteration: admit, run one packed forward, emit tokens. Returns tokens produced."""
    with self._step_lock:
      return self._step()

  def _step(self) -> int:
    with self._lock:
      while self._incoming:
        self.waiting.append(self._incoming.popleft())
    for seq in [s for s in itertools.chain(self.running, self.waiting) if s.handle.cancelled]:
      self._finish(seq, "cancelled")
    if self._retiring:
      self._retire()
    self.scheduler.admit()
    self._prefetch_names = [s.handle.request.adapter for s in self.waiting]
    if self._prefetch_names:
      self._prefetch_event.set()
    batch = self.scheduler.plan()
    produced = self._run(batch) if batch else 0
    if self._retiring:
      self._retire()
    return produced

  # -- scheduling (serve/scheduler.py) -------------------------------------------------------

  @property
  def waiting(self) -> collections.deque:
    return self.scheduler.waiting

  @property
  def running(self) -> list:
    return self.scheduler.running

  def _run(self, plan: list) -> int:
    pool, c = self.pool, self.model.config
    long = sum(1 for _, n in plan if n > 1)
    # Few buckets (at least 8 sequences, 16 tokens, a 16-token query run when any prefill,
    # pages for 64 tokens per sequence), so a stream of steps compiles a handful of programs.
    # The page floor is in tokens: attention reads every page of the bucket, and a model whose
    # MLP size has a large odd factor has large blocks (bench.serving's: 172 tokens).
    s = _bucket(len(plan), min(8, _bucket(self.max_seqs)))
    total = sum(n for _, n in plan)
    t = _bucket(total, max(s, 16))
    longest = max(n for _, n in plan)
    max_q = 1 if longest == 1 else _bucket(longest, 16)
    pps = _bucket(max(len(seq.blocks) for seq, _ in plan), -(-64 // pool.block))
    tokens = np.zeros(t, np.int32)
    positions = np.zeros(t, np.int32)
    token_seq = np.zeros(t, np.int32)
    valid = np.zeros(t, bool)
    slots = np.full(t, -1, np.int32)
    routed = np.zeros(t, bool)  # tokens of MeteoRA requests: the gates route them
    tables = np.zeros((pool.layers, s, pps), np.int32)
    kv_lens = np.zeros(s, np.int32)
    cu = np.zeros(s + 1, np.int32)
    select = np.zeros(s, np.int32)
    temp = np.zeros(s, np.float32)
    top_k = np.zeros(s, np.int32)
    top_p = np.ones(s, np.float32)
    seeds = np.zeros(s, np.uint32)
    counts = np.zeros(s, np.int32)
    at = 0
    for i, (seq, n) in enumerate(plan):
      lo = seq.computed
      tokens[at:at + n] = seq.tokens[lo:lo + n]
      positions[at:at + n] = np.arange(lo, lo + n)
      token_seq[at:at + n] = i
      valid[at:at + n] = True
      slots[at:at + n] = seq.slot
      routed[at:at + n] = self._routed(seq.handle.request.adapter)
      blocks = np.asarray(seq.blocks, np.int32).reshape(-1, pool.layers)
      tables[:, i, :blocks.shape[0]] = blocks.T
      kv_lens[i] = lo + n
      at += n
      cu[i + 1] = at
      select[i] = at - 1
      r = seq.handle.request
      # top_k >= vocab keeps every token, as 0 does (and fits int32 whatever was asked).
      temp[i], top_p[i] = r.temperature, r.top_p
      top_k[i] = 0 if r.top_k >= self.model.config.vocab_size else r.top_k
      seeds[i] = 0 if r.seed is None else r.seed
      counts[i] = seq.generated
    cu[len(plan) + 1:] = at
    sampling = bool((temp > 0).any())
    # Host arrays go to the step programs as numpy: jit's own transfer is the cheap one (a
    # jnp.asarray each costs ~0.3 ms of Python here, ~20 per step).
    kv = PagedKV(tables=tables, kv_lens=kv_lens, cu_q_lens=cu,
                 num_seqs=np.asarray([len(plan)], np.int32), token_seq=token_seq,
                 token_valid=valid,
                 block=pool.block, max_q=max_q,
                 long_seqs=_bucket(long) if 0 < long and _bucket(long) < s else
                 (0 if long == 0 else None))
    views = pool.views()
    routers = None
    if routed.any():  # MeteoRA rows in this step (jaxadapt.context.Router with rows/slots)
      m = self.meteora
      rows, temp_m = routed, np.float32(m.temperature)
      routers = {p: Router(w_gate=w, temperature=temp_m, top_k=m.top_k,
                           slots=self._meteora_slots, rows=rows)
                 for p, w in m.gates.items() if p in views}
    ctx = Context(weights=views or None, pool=dataclasses.replace(pool.adapter_pool(),
                                                                  pages=None),
                  routing=(make_routing("token", slots, pool.max_adapters,
                                        members=self._members(slots, routed))
                           if views else None),
                  routers=routers, attention=kv)
    samp = (temp, top_k, top_p, seeds, counts)
    arrays = (pool.pages, ctx, tokens[None], positions[None], select, samp)
    c = self.model.config
    if self.tp_plan is None:
      forward, donated, write = _engine_forward, _engine_forward_donated, _write_kv
      if self._frozen is None:
        self._frozen = _Frozen(self.model.graphdef, self.model.params)
      static, params = self._frozen, self._frozen.leaves
      kv_heads = c.num_key_value_heads
    else:
      from serve import tp as tp_lib
      forward, donated = tp_lib.forward, tp_lib.forward_donated
      write = functools.partial(tp_lib.write_kv, self.tp_plan)
      static, params = self.tp_plan, self.tp_plan.params
      kv_heads = c.num_key_value_heads // self.tp_plan.tp.size
    if paged_attention.writes_in_forward():
      pool.pages, _, out, logp = donated(static, sampling, params, *arrays)
    else:
      _, new_kv, out, logp = forward(static, sampling, params, *arrays)
      pool.pages = write((pool.num_pages, pool.block, 2 * kv_heads, c.head_dim), pool.pages,
                         new_kv, kv.tables, kv.token_seq, positions,
                         kv.token_valid)
    out = np.asarray(out)
    chosen, (top_lp, top_ids) = (np.asarray(x) for x in (logp[0], logp[1]))
    produced = 0
    now = time.perf_counter()
    self._stats["steps"] += 1
    self._stats["tokens_fed"] += total
    used = pool.num_pages - 1 - pool.free_pages
    self._peak_pages = max(self._peak_pages, used)
    for i, (seq, n) in enumerate(plan):
      seq.computed += n
      self.scheduler.share_prefix(seq)
      if seq.computed < len(seq.tokens):
        continue  # a prefill chunk short of the prompt's end: no token yet
      token = int(out[i])
      seq.tokens.append(token)
      seq.logprobs.append(float(chosen[i]))
      seq.top_logprobs.append(tuple((int(a), float(b)) for a, b in zip(top_ids[i], top_lp[i])))
      produced += 1
      if seq.first_token is None:
        seq.first_token = now
      self._emit(seq, token)
    self._stats["tokens_generated"] += produced
    return produced

  def _members(self, slots: np.ndarray, routed: np.ndarray) -> Optional[np.ndarray]:
    """The step's distinct adapter slots padded to MEMBERS, or None (too many, tensor
    parallelism, or MeteoRA rows in the step, whose hook paths do not read members)."""
    if self.tp_plan is not None or routed.any():
      return None
    used = np.unique(slots[slots >= 0])
    if used.size > MEMBERS:
      return None
    return np.concatenate([used, np.full(MEMBERS - used.size, -1)]).astype(np.int32)

  # -- tokens out ------------------------------------------------------------------------------

  def _text(self, seq: _Seq) -> Optional[str]:
    tok = self.model.tokenizer
    if tok is None:
      return None
    ids = seq.tokens[seq.prompt_len:]
    if ids and ids[-1] in seq.eos:
      ids = ids[:-1]
    return tok.decode(ids, skip_special_tokens=True)

  def _streamed_text(self, seq: _Seq) -> Optional[str]:
    """The text so far, decoded a few tokens per step (serve/detokenize.py), an incomplete
    character at the end held back."""
    tok = self.model.tokenizer
    if tok is None:
      return None
    if seq.stream_text is None:
      seq.stream_text = IncrementalText(tok)
    ids = seq.tokens[seq.prompt_len:]
    if ids and ids[-1] in seq.eos:
      ids = ids[:-1]
    return seq.stream_text.update(ids)

  def _emit(self, seq: _Seq, token: int) -> None:
    r = seq.handle.request
    reason = None
    text = None
    stops = list(r.stop or ())
    cut = False  # the text ends at a stop string
    if token in seq.eos:
      reason = "stop"
    if stops or self.model.tokenizer is not None:
      text = self._streamed_text(seq)
    if stops and text is not None:
      # Only the new text (and the longest stop's length before it) can hold a new match.
      start = max(seq.searched - max(len(x) for x in stops) + 1, 0)
      hits = [i for i in (text.find(x, start) for x in stops) if i >= 0]
      seq.searched = len(text)
      if hits:
        text, reason, cut = text[:min(hits)], "stop", True
    if reason is None and seq.generated >= r.max_tokens:
      reason = "length"
    if reason is not None and not cut and text is not None:
      text = self._text(seq)  # the end: one whole decode (a held character included)
    delta = ""
    if text is not None:
      hold = 0 if reason else max([len(x) - 1 for x in stops] + [0])
      upto = max(len(text) - hold, seq.sent_text)
      if text.endswith("\ufffd") and reason is None:  # a character cut in the middle
        upto = min(upto, len(text) - 1)
      delta = text[seq.sent_text:upto]
      seq.sent_text = max(seq.sent_text, upto)
    seq.handle._events.put(TokenEvent(token=token, text=delta, logprob=seq.logprobs[-1],
                                      top_logprobs=seq.top_logprobs[-1]))
    if reason is not None:
      self._finish(seq, reason, text=text)

  def _finish(self, seq: _Seq, reason: str, text: Optional[str] = None,
              error: Optional[str] = None) -> None:
    if seq.handle.done():
      return
    self.scheduler.release(seq)
    if text is None and reason != "error":
      text = self._text(seq)
    r = seq.handle.request
    seq.handle.completion = Completion(
        request_id=seq.handle.request_id, adapter=r.adapter, prompt_tokens=seq.prompt_len,
        tokens=seq.tokens[seq.prompt_len:], text=text, finish_reason=reason, error=error,
        arrival=seq.arrival,
        first_token=None if seq.first_token is None else seq.first_token - seq.arrival,
        finished=time.perf_counter() - seq.arrival, preemptions=seq.preemptions,
        logprobs=seq.logprobs[:len(seq.tokens) - seq.prompt_len],
        top_logprobs=seq.top_logprobs[:len(seq.tokens) - seq.prompt_len])
    self._stats["finished_" + reason] += 1
    seq.handle._events.put(None)
    seq.handle._done.set()

  # -- prefetch (S-LoRA Sec. 4.2) --------------------------------------------------------------

  def _prefetch_once(self, failed: dict) -> bool:
    """Reads up to 4 adapters the waiting queue needs and the host cache lacks; False when
    there was nothing to read."""
    with self._lock:
      names = list(self._prefetch_names) + [s.handle.request.adapter for s in self._incoming]
    now = time.monotonic()
    todo = [n for n in dict.fromkeys(names) if n is not None and n in self.store
            and not self.store.cached(n) and now - failed.get(n, -1e9) > 1.0]
    for name in todo[:4]:
      try:
        self.store.get(name)
        self._stats["prefetched"] += 1
      except AdapterError:
        failed[name] = time.monotonic()  # retried after a second; admission reports it
    return bool(todo)

  # -- adapters at run time (the server's load/unload) ------------------------------------------

  def load_adapter(self, name: str, path: str) -> dict:
    """Registers the PEFT dir `path` as `name` and reads and checks it now (against the base
    and the pool's limits), so a bad adapter is refused before anything changes. Returns its
    `adapter_info`.

    Raises:
      AdapterError: a taken name, a bad path, unreadable files, or an adapter that does not fit
        the base or the pool (nothing is registered then).
    """
    def loadable():
      if name in self._retiring:
        raise AdapterBusy(f"adapter {name!r} is still being unloaded; try again when its "
                          f"requests have finished")
      if name in self.store:
        raise AdapterExists(f"adapter {name!r} is already registered (from "
                            f"{self.store.path(name)}); unload it first")
    with self._step_lock:
      loadable()
    # Read and checked on this thread while steps go on; the name appears only once it fits.
    self.store.register_read(name, path,
                             check=lambda adapter: self.pool.check_adapter(name, adapter))
    try:
      return self.adapter_info(name)
    except UnknownAdapter:  # unloaded again meanwhile (another thread)
      return {"name": name, "path": path, "residency": "disk", "state": "unloaded"}

  def unload_adapter(self, name: str) -> None:
    """Takes no new requests for `name`; those queued or running finish first, then its host
    and pool copies are freed and the name is forgotten.

    Raises:
      AdapterError: `name` is not registered (or already being unloaded).
    """
    with self._step_lock:
      if name in self._retiring:
        raise AdapterBusy(f"adapter {name!r} is already being unloaded")
      if name not in self.store:
        raise UnknownAdapter(f"unknown adapter {name!r}")
      self._retiring.add(name)
      self._retire()

  def _servable(self, name: Optional[str]) -> None:
    """Raises AdapterBusy / UnknownAdapter if adapter `name` is being unloaded or is gone."""
    if name is None or self._routed(name):
      return
    if name in self._retiring:
      raise AdapterBusy(f"adapter {name!r} is being unloaded; it takes no new requests")
    if name not in self.store:
      raise UnknownAdapter(f"unknown adapter {name!r} (unloaded)")

  def _retire(self) -> None:
    """Forgets the retiring adapters that no request uses any more (under the queue lock, so
    no request for them is queued meanwhile)."""
    with self._lock:
      busy = {s.handle.request.adapter
              for s in itertools.chain(self._incoming, self.waiting, self.running)}
      for name in sorted(self._retiring - busy):
        self.scheduler.forget(name)
        self.store.unregister(name)
        self._retiring.discard(name)

  def adapter_info(self, name: str) -> dict:
    """The store's `info(name)` with `residency` "device" when its pages are in the pool (else
    "host" or "disk") and `state` "serving" or "unloading"; for the MeteoRA model, its
    adapters (always resident)."""
    if self._routed(name):
      m = self.meteora
      return {"name": name, "kind": "meteora", "adapters": list(m.names), "top_k": m.top_k,
              "temperature": m.temperature, "residency": "device", "state": "serving",
              "path": getattr(m, "directory", None)}
    info = self.store.info(name)
    key = self.scheduler.resident_key(name)
    if key is not None and self.store.unchanged(name, key[1]):
      info["residency"] = "device"
    info["state"] = "unloading" if name in self._retiring else "serving"
    return info

  def lora_state(self) -> dict:
    """Adapters of the running and the waiting requests (sorted names) and the most the pool
    serves at once: what an inference gateway routes on."""
    with self._lock:
      waiting = list(self.waiting) + list(self._incoming)
      running = list(self.running)
    names = lambda seqs: sorted({s.handle.request.adapter for s in seqs} - {None})
    return {"running": names(running), "waiting": names(waiting),
            "max_lora": self.pool.max_adapters}

  # -- reporting -------------------------------------------------------------------------------

  @staticmethod
  def compiled_programs() -> int:
    """Step programs compiled so far in this process (every engine shares them)."""
    from serve import tp as tp_lib
    return (_engine_forward._cache_size() + _engine_forward_donated._cache_size()
            + tp_lib.forward._cache_size() + tp_lib.forward_donated._cache_size())

  def stats(self) -> dict:
    """Counters (steps, tokens, admissions and how many waited for a disk read, adapter loads,
    hits and evictions, preemptions, finishes by reason), the pool's occupancy and
    fragmentation, and the store's cache."""
    with self._step_lock:
      return self._stats_now()

  def _stats_now(self) -> dict:
    st = dict(self._stats)
    kv_tokens = sum(s.computed for s in self.running)
    st["running"], st["waiting"] = len(self.running), len(self.waiting) + len(self._incoming)
    st["admission_wait_share"] = (st.get("admissions_waited", 0) / st["admissions"]
                                  if st.get("admissions") else 0.0)
    st["pool"] = self.pool.stats(kv_tokens=kv_tokens)
    st["pool"]["peak_occupancy"] = self._peak_pages / (self.pool.num_pages - 1)
    st["pool"]["evictable_pages"] = self.scheduler._idle_pages()  # idle prefix blocks, adapters
    st["loop_alive"] = self.loop_alive
    st["prefix_cached_blocks"] = self.scheduler.prefix_blocks()
    st["prefix_cached_pages"] = self.scheduler.prefix_blocks() * self.pool.layers
    st["store"] = self.store.stats()
    return st
