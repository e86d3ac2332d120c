"""The adapter store: thousands of PEFT adapters by name, read on first use, cached in host memory.

S-LoRA (Sheng et al., MLSys 2024) Sec. 4: all adapters live in host memory (here: on disk until
first use, then in a host cache with a byte budget) and only those a batch needs are fetched into
the device pool. The store is that host side:

  * `register(name, dir)` records a PEFT dir without reading it (one `stat`), so registering 2000
    adapters costs no device memory and almost no host memory; `register_tree(root)` registers
    every PEFT dir below a root, named by its path relative to the root.
  * `get(name)` reads the adapter on first use (numpy arrays in host memory), checks it against
    the base (targets and shapes: `FrozenModel.check_adapter`), and caches it under an LRU policy
    within `host_budget_bytes`. Each adapter is identified by its name and a content hash
    (sha256 of its config and weights): when the files change on disk (a re-trained adapter saved
    to the same dir), the next `get` reads them again and returns the new hash, so state keyed by
    the old hash (pool pages, prefix-cache entries) is never reused for it.
  * Reads happen outside the store's lock, one at a time per adapter: a background prefetch and
    a foreground `get` of the same adapter share one read.

Errors name the adapter and the path, and leave the store as it was.
"""
from __future__ import annotations

import collections
import dataclasses
import hashlib
import os
import threading
import time
from typing import Optional

import numpy as np

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


class AdapterError(ValueError):
  """An adapter that cannot be registered or used (unknown, unreadable, or not for this base)."""


class UnknownAdapter(AdapterError):
  """No adapter is registered under the name."""


class AdapterExists(AdapterError):
  """The name is registered already."""


class AdapterBusy(AdapterError):
  """The adapter is being unloaded: it takes no new requests and cannot be loaded again yet."""


@dataclasses.dataclass(frozen=True)
class StoredAdapter:
  """An adapter read into host memory.

  Attributes:
    name: the registered name.
    digest: sha256 hex of adapter_config.json + adapter_model.safetensors (the identity).
    adapter: the `LoraAdapter`, numpy weights in host memory.
    nbytes: bytes of its weights.
  """
  name: str
  digest: str
  adapter: object
  nbytes: int

  @property
  def key(self) -> tuple[str, str]:
    return self.name, self.digest


@dataclasses.dataclass
class _Entry:
  path: str
  stamp: Optional[tuple] = None          # (mtime_ns, size) of both files at the last read
  digest: Optional[str] = None           # the content hash of the last read
  stored: Optional[StoredAdapter] = None  # in the host cache, or None (on disk only)
  loading: Optional[threading.Event] = None
  error: Optional[BaseException] = None


def _stamp(path: str) -> tuple:
  out = []
  for name in ADAPTER_FILES:
    st = os.stat(os.path.join(path, name))
    out += [st.st_mtime_ns, st.st_size]
  return tuple(out)


def _digest(path: str) -> str:
  h = hashlib.sha256()
  for name in ADAPTER_FILES:
    with open(os.path.join(path, name), "rb") as f:
      for chunk in iter(lambda: f.read(1 << 20), b""):
        h.update(chunk)
    h.update(b"\0")
  return h.hexdigest()


class AdapterStore:
  """Named PEFT adapters for one frozen base (module docstring).

  Args:
    base: the frozen model the adapters must fit (`CausalLM`).
    host_budget_bytes: bytes of adapter weights kept in host memory; least recently used
      adapters beyond it are dropped (and read again from disk when next used). An adapter larger
      than the whole budget is returned but not kept.
    dtype: the dtype the weights are read in (the base's by default).
  """

  def __init__(self, base, *, host_budget_bytes: int = 1 << 30, dtype=None):
    if not isinstance(host_budget_bytes, int) or host_budget_bytes < 0:
      raise ValueError(f"host_budget_bytes must be an int >= 0, got {host_budget_bytes!r}")
    self.base = base
    self.host_budget_bytes = host_budget_bytes
    self.dtype = np.dtype(dtype or base.dtype).name
    self._entries: dict[str, _Entry] = {}
    self._lru: collections.OrderedDict[str, None] = collections.OrderedDict()  # cached names
    self._cached_bytes = 0
    self._lock = threading.Lock()
    self._stats = collections.Counter()
    self._load_seconds = 0.0

  # -- registration ----------------------------------------------------------------------------

  def register(self, name: str, path: str, *, replace: bool = False) -> None:
    """Records the PEFT dir `path` (or `"default:<task>"`) under `name`, without reading it.

    Raises:
      AdapterError: a name that is not a non-empty string without whitespace, a name already
        registered (unless `replace`), or a path that is not a PEFT dir (adapter_config.json and
        adapter_model.safetensors).
    """
    path = self._resolve(name, path)
    with self._lock:
      old = self._entries.get(name)
      if old is not None and not replace:
        raise AdapterExists(f"adapter {name!r} is already registered (from {old.path}); "
                            f"unregister it first or pass replace=True")
      if old is not None:
        self._drop(name)
      self._entries[name] = _Entry(path=path)

  @staticmethod
  def _resolve(name: str, path: str) -> str:
    """The absolute PEFT dir of `path` (or of "default:<task>"), checked to hold the files."""
    if not isinstance(name, str) or not name or any(c.isspace() for c in name):
      raise AdapterError(f"an adapter name must be a non-empty string without whitespace, got "
                         f"{name!r}")
    path = os.fspath(path)
    from jaxadapt import default
    try:  # "default:<task>": a task adapter of an embedded model
      path = default.resolve_adapter(path) or path
    except (ValueError, FileNotFoundError) as e:
      raise AdapterError(f"adapter {name!r}: {e}") from None
    path = os.path.abspath(path)
    missing = [f for f in ADAPTER_FILES if not os.path.isfile(os.path.join(path, f))]
    if missing:
      found = sorted(os.listdir(path))[:10] if os.path.isdir(path) else "no such directory"
      raise AdapterError(f"adapter {name!r}: {path} is not a PEFT adapter dir (missing "
                         f"{', '.join(missing)}; found {found})")
    return path

  def register_read(self, name: str, path: str, check=None) -> StoredAdapter:
    """Reads `path` (a PEFT dir or "default:<task>"), checks it against the base (and with
    `check(adapter)`, which raises ValueError), and only then registers it as `name`, its read
    copy in the host cache: nothing is visible under `name` unless it reads and fits.

    Raises:
      AdapterExists: `name` is taken (checked before the read and again after it).
      AdapterError: a bad name or path, unreadable files, or an adapter that does not fit.
    """
    path = self._resolve(name, path)
    with self._lock:
      if name in self._entries:
        raise AdapterExists(f"adapter {name!r} is already registered (from "
                            f"{self._entries[name].path})")
    try:
      stored, stamp = self._read(name, path)
    except AdapterError:
      raise
    except Exception as e:  # unreadable or corrupt files
      raise AdapterError(f"adapter {name!r} ({path}): {e}") from e
    if check is not None:
      try:
        check(stored.adapter)
      except ValueError as e:
        raise AdapterError(str(e)) from None
    with self._lock:
      if name in self._entries:
        raise AdapterExists(f"adapter {name!r} was registered meanwhile (from "
                            f"{self._entries[name].path})")
      entry = self._entries[name] = _Entry(path=path, stamp=stamp, digest=stored.digest)
      if stored.nbytes <= self.host_budget_bytes:
        entry.stored = stored
        self._lru[name] = None
        self._cached_bytes += stored.nbytes
        self._evict()
    return stored

  def register_tree(self, root: str) -> list[str]:
    """Registers every PEFT dir below `root` (names: paths relative to it, '/'-separated).

    Returns:
      The names registered, sorted.
    Raises:
      AdapterError: `root` is not a dir, holds no PEFT dir, or one of its names is taken (then
        none is registered).
    """
    root = os.path.abspath(os.fspath(root))
    if not os.path.isdir(root):
      raise AdapterError(f"{root}: expected a directory of PEFT adapter dirs")
    found = {}
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
      real, parent = os.path.realpath(dirpath), os.path.realpath(os.path.dirname(dirpath))
      if dirpath != root and (parent == real or parent.startswith(real + os.sep)):
        dirnames.clear()  # a symlink to one of its own ancestors: a loop
        continue
      dirnames.sort()
      if all(f in filenames for f in ADAPTER_FILES):
        rel = os.path.relpath(dirpath, root)
        found[os.path.basename(root) if rel == "." else rel.replace(os.sep, "/")] = dirpath
        dirnames.clear()  # an adapter dir's subdirs are not adapters
    if not found:
      raise AdapterError(f"{root}: no PEFT adapter dir below it ({' + '.join(ADAPTER_FILES)})")
    with self._lock:
      taken = sorted(n for n in found if n in self._entries)
      if taken:
        raise AdapterExists(f"{root}: adapter names {taken[:5]} are already registered; none of "
                            f"its {len(found)} adapters was registered")
      for name, path in found.items():
        self._entries[name] = _Entry(path=path)
    return sorted(found)

  def unregister(self, name: str) -> None:
    """Forgets `name` (its host copy too). Raises AdapterError if it is not registered."""
    with self._lock:
      self._entry(name)
      self._drop(name)
      del self._entries[name]

  def names(self) -> list[str]:
    with self._lock:
      return sorted(self._entries)

  def __contains__(self, name) -> bool:
    return name in self._entries

  def __len__(self) -> int:
    return len(self._entries)

  def path(self, name: str) -> str:
    with self._lock:
      return self._entry(name).path

  # -- use -------------------------------------------------------------------------------------

  def get(self, name: str) -> StoredAdapter:
    """The adapter `name` in host memory: from the cache, or read (and checked) from disk.

    Raises:
      AdapterError: an unknown name, unreadable or corrupt files, or an adapter that does not
        fit the base (the message names the adapter, its path and what does not fit).
    """
    while True:
      with self._lock:
        entry = self._entry(name)
        if entry.loading is None:
          stored = entry.stored
          if stored is not None:
            try:
              fresh = _stamp(entry.path) == entry.stamp
            except OSError:
              fresh = False
            if fresh:
              self._stats["hits"] += 1
              self._lru.move_to_end(name)
              return stored
            self._drop(name)  # changed or gone on disk: read it again
          event = entry.loading = threading.Event()
          break
        event = entry.loading
      event.wait()  # another thread is reading it; then look again
    try:
      stored, stamp = self._read(name, entry.path)
    except BaseException as e:
      with self._lock:
        entry.loading = None
      event.set()
      if isinstance(e, AdapterError):
        raise
      raise AdapterError(f"adapter {name!r} ({entry.path}): {e}") from e
    with self._lock:
      entry.loading = None
      if self._entries.get(name) is entry:  # not unregistered or replaced meanwhile
        entry.stamp, entry.digest = stamp, stored.digest
        if stored.nbytes <= self.host_budget_bytes:
          entry.stored = stored
          self._lru[name] = None
          self._cached_bytes += stored.nbytes
          self._evict()
    event.set()
    return stored

  def unchanged(self, name: str, digest: str) -> bool:
    """Whether `name`'s files are still those last read, with content hash `digest` (one
    `stat`, no read): state kept under that digest (pool pages) is still valid."""
    with self._lock:
      entry = self._entries.get(name)
      if entry is None or entry.digest != digest or entry.stamp is None:
        return False
      path, stamp = entry.path, entry.stamp
    try:
      return _stamp(path) == stamp
    except OSError:
      return False

  def cached(self, name: str) -> bool:
    """Whether `name` is in host memory now."""
    with self._lock:
      return self._entry(name).stored is not None

  def info(self, name: str) -> dict:
    """What the store knows of `name` without reading weights: path, and (once read) digest,
    ranks, targets, bytes; `residency` "host" or "disk"."""
    with self._lock:
      entry = self._entry(name)
      out = {"name": name, "path": entry.path,
             "residency": "host" if entry.stored is not None else "disk"}
      stored = entry.stored
    if stored is not None:
      a = stored.adapter
      ranks = sorted({a.rank(p) for p in a.weights})
      out.update(digest=stored.digest, nbytes=stored.nbytes, rank=max(ranks), ranks=ranks,
                 targets=sorted({p.rsplit(".", 1)[-1] for p in a.weights}),
                 use_dora=a.config.use_dora)
    return out

  def stats(self) -> dict:
    """Registered and cached counts, cached bytes, hits, loads, evictions, load seconds."""
    with self._lock:
      return {"registered": len(self._entries), "cached": len(self._lru),
              "cached_bytes": self._cached_bytes, "hits": self._stats["hits"],
              "loads": self._stats["loads"], "evictions": self._stats["evictions"],
              "load_seconds": round(self._load_seconds, 4)}

  # -- internals -------------------------------------------------------------------------------

  def _entry(self, name: str) -> _Entry:
    entry = self._entries.get(name)
    if entry is None:
      known = sorted(self._entries)
      raise UnknownAdapter(f"unknown adapter {name!r}; {len(known)} registered"
                         f"{' (e.g. ' + ', '.join(known[:5]) + ')' if known else ''}")
    return entry

  def _read(self, name: str, path: str) -> tuple[StoredAdapter, tuple]:
    from jaxadapt.io.peft import load_adapter
    start = time.perf_counter()
    for _ in range(3):  # a dir rewritten while it is read: read it again
      stamp = _stamp(path)
      digest = _digest(path)
      adapter = load_adapter(path, dtype=self.dtype, host=True)
      if _stamp(path) == stamp:
        break
    else:
      raise AdapterError(f"adapter {name!r} ({path}) kept changing while it was read")
    try:
      self.base.check_adapter(adapter)
    except (TypeError, ValueError) as e:
      raise AdapterError(f"adapter {name!r} ({path}) does not fit the base model: {e}") from None
    nbytes = sum(int(np.asarray(v).nbytes) for w in adapter.weights.values() for v in w.values())
    with self._lock:
      self._stats["loads"] += 1
      self._load_seconds += time.perf_counter() - start
    return StoredAdapter(name=name, digest=digest, adapter=adapter, nbytes=nbytes), stamp

  def _drop(self, name: str) -> None:
    """Removes `name`'s host copy (lock held)."""
    entry = self._entries[name]
    if entry.stored is not None:
      self._cached_bytes -= entry.stored.nbytes
      entry.stored = None
      self._lru.pop(name, None)

  def _evict(self) -> None:
    while self._cached_bytes > self.host_budget_bytes and self._lru:
      oldest = next(iter(self._lru))
      self._drop(oldest)
      self._stats["evictions"] += 1
