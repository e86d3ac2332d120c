"""Reading `torch.save` files (`.pt`, `.pth`, `.bin`) without torch, through a restricted unpickler.

Since torch 1.6 `torch.save` writes a zip archive: `<archive>/data.pkl` is a pickle of the saved
object in which every tensor is a call `torch._utils._rebuild_tensor_v2(storage, offset, size,
stride, requires_grad, hooks)` (or `_rebuild_tensor_v3(..., dtype)` for dtypes without a typed
storage class), and every storage is a persistent id `("storage", <dtype marker>, key, location,
numel)` whose bytes are the archive member `<archive>/data/<key>`; `<archive>/byteorder` says
"little" or "big".

A pickle can run arbitrary code when it is loaded, so this module never lets one name a global
outside a fixed list: the tensor rebuild functions, `collections.OrderedDict`, the storage-class
and dtype markers (`torch.FloatStorage`, `torch.storage.UntypedStorage`, `torch.float32`, ...).
Those names resolve to functions of this module that build numpy arrays; anything else raises
`UnsafePickleError` naming the global, before it is called. torch is never imported.

Tensors come back as numpy arrays (bfloat16 and float8 through `ml_dtypes`) that share memory with
the file where they can (an uncompressed member, a contiguous tensor: a read-only memory map);
a strided view is copied to a contiguous array. Several tensors on one storage (views, slices)
each read their own elements of it.
"""
from __future__ import annotations

import collections
import os
import pickle
import struct
import zipfile
from typing import Any, Mapping, Optional

import ml_dtypes
import numpy as np

__all__ = ["UnsafePickleError", "load_torch_file"]


class UnsafePickleError(pickle.UnpicklingError):
  """A torch pickle names a global outside the state-dict allow-list (it could run code)."""


# torch dtype name -> numpy dtype (what `torch.float32` and the storage classes stand for).
_DTYPES = {
    "float64": np.float64, "float32": np.float32, "float16": np.float16,
    "bfloat16": ml_dtypes.bfloat16, "float8_e4m3fn": ml_dtypes.float8_e4m3fn,
    "float8_e5m2": ml_dtypes.float8_e5m2, "int64": np.int64, "int32": np.int32,
    "int16": np.int16, "int8": np.int8, "uint8": np.uint8, "uint16": np.uint16,
    "uint32": np.uint32, "uint64": np.uint64, "bool": np.bool_, "complex64": np.complex64,
    "complex128": np.complex128,
}
# torch's aliases of the same dtypes (`torch.float` is `torch.float32`, ...).
_DTYPE_ALIASES = {"float": "float32", "double": "float64", "half": "float16", "long": "int64",
                  "int": "int32", "short": "int16", "cfloat": "complex64",
                  "cdouble": "complex128"}
# The typed storage classes a tensor's storage is pickled as (`torch.FloatStorage`, ...).
_STORAGE_CLASSES = {
    "DoubleStorage": "float64", "FloatStorage": "float32", "HalfStorage": "float16",
    "BFloat16Storage": "bfloat16", "LongStorage": "int64", "IntStorage": "int32",
    "ShortStorage": "int16", "CharStorage": "int8", "ByteStorage": "uint8",
    "BoolStorage": "bool", "ComplexFloatStorage": "complex64",
    "ComplexDoubleStorage": "complex128",
}


class _DtypeMarker:
  """What a storage-class or dtype global stands for once unpickled: a numpy dtype."""

  def __init__(self, name: str, dtype):
    self.name, self.dtype = name, np.dtype(dtype)

  def __repr__(self):
    return f"torch.{self.name}"


class _Storage:
  """One storage of the archive: its raw bytes (uint8, maybe a memory map), the element dtype its
  class names, and whether the file is big-endian."""

  def __init__(self, raw: np.ndarray, dtype: np.dtype, key: str, big_endian: bool):
    self.raw, self.dtype, self.key, self.big_endian = raw, dtype, key, big_endian


def _strided(storage: _Storage, dtype, offset: int, size, stride, where: str) -> np.ndarray:
  """The tensor `size`/`stride` (in elements) at element `offset` of `storage`, as an array.

  Raises:
    ValueError: a view that reads outside its storage (a corrupt or hostile file).
  """
  dtype = np.dtype(dtype)
  size, stride = tuple(int(s) for s in size), tuple(int(s) for s in stride)
  if len(size) != len(stride) or any(s < 0 for s in size) or any(s < 0 for s in stride):
    raise ValueError(f"{where}: tensor with size {size} and stride {stride} is malformed")
  if storage.raw.size % dtype.itemsize:
    raise ValueError(f"{where}: storage {storage.key} holds {storage.raw.size} bytes, not a "
                     f"whole number of {dtype} elements")
  elements = storage.raw.view(dtype.newbyteorder(">") if storage.big_endian else dtype)
  numel = int(np.prod(size, dtype=np.int64))
  if numel == 0:
    return np.zeros(size, dtype)
  last = int(offset) + sum((n - 1) * s for n, s in zip(size, stride))
  if offset < 0 or last >= elements.size:
    raise ValueError(f"{where}: tensor (offset {offset}, size {size}, stride {stride}) reads "
                     f"element {last} of storage {storage.key}, which holds {elements.size}; "
                     f"the file is truncated or corrupt")
  view = np.lib.stride_tricks.as_strided(
      elements[int(offset):], shape=size, strides=tuple(s * dtype.itemsize for s in stride),
      writeable=False)
  out = view if view.flags.c_contiguous else view.copy(order="C")  # keeps 0-d tensors 0-d
  return out.astype(dtype) if storage.big_endian else out


class _Tensor(np.ndarray):
  """Marks an unpickled tensor (a plain ndarray subclass) until the result is flattened."""


def _as_tensor(a: np.ndarray) -> "_Tensor":
  return a.view(_Tensor)


class _RestrictedUnpickler(pickle.Unpickler):
  """Unpickles `data.pkl` of a torch zip archive, allowing only a state dict's globals."""

  def __init__(self, file, archive: zipfile.ZipFile, prefix: str, path: str, big_endian: bool):
    super().__init__(file)
    self._archive, self._prefix, self._path = archive, prefix, path
    self._big_endian = big_endian
    self._raw: dict[str, np.ndarray] = {}  # storage key -> bytes, read once (shared views)

  # --- the allow-list ---------------------------------------------------------------------------

  def find_class(self, module: str, name: str):
    if (module, name) == ("collections", "OrderedDict"):
      return collections.OrderedDict
    if module == "torch._utils" and name in ("_rebuild_tensor_v2", "_rebuild_tensor_v3",
                                             "_rebuild_parameter",
                                             "_rebuild_parameter_with_state"):
      return getattr(self, name)
    if module in ("torch", "torch.cuda") and name in _STORAGE_CLASSES:
      return _DtypeMarker(name, _DTYPES[_STORAGE_CLASSES[name]])
    if module in ("torch", "torch.storage") and name in ("UntypedStorage", "_UntypedStorage"):
      return _DtypeMarker(name, np.uint8)
    if module == "torch" and _DTYPE_ALIASES.get(name, name) in _DTYPES:
      return _DtypeMarker(name, _DTYPES[_DTYPE_ALIASES.get(name, name)])
    hint = (" If the file holds a whole pickled module or other Python objects "
            "(torch.save(model)), re-save only its tensors: torch.save(model.state_dict(), path).")
    raise UnsafePickleError(
        f"{self._path}: the pickle names the global {module}.{name}, which is not allowed: a "
        f"torch pickle may only name the tensor rebuild functions, collections.OrderedDict and "
        f"torch's storage/dtype markers (a pickle can run arbitrary code when it is loaded, so "
        f"jaxadapt never imports other globals).{hint}")

  # --- storages ---------------------------------------------------------------------------------

  def persistent_load(self, pid):
    if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"
            and isinstance(pid[1], _DtypeMarker)):
      raise pickle.UnpicklingError(f"{self._path}: unexpected persistent id {pid!r}; expected "
                                   f"('storage', <storage type>, key, location, numel)")
    _, marker, key, _location, _numel = pid
    key = str(key)
    if key not in self._raw:
      self._raw[key] = _read_member(self._archive, f"{self._prefix}data/{key}", self._path)
    return _Storage(self._raw[key], marker.dtype, key, self._big_endian)

  # --- the rebuild functions the allow-list maps torch's names to -------------------------------

  def _rebuild_tensor_v2(self, storage, storage_offset, size, stride, requires_grad=False,
                         backward_hooks=None, metadata=None):
    del requires_grad, backward_hooks, metadata
    return _as_tensor(_strided(storage, storage.dtype, storage_offset, size, stride, self._path))

  def _rebuild_tensor_v3(self, storage, storage_offset, size, stride, requires_grad,
                         backward_hooks, dtype, metadata=None):
    del requires_grad, backward_hooks, metadata
    if not isinstance(dtype, _DtypeMarker):
      raise pickle.UnpicklingError(f"{self._path}: tensor dtype {dtype!r} is not a torch dtype")
    return _as_tensor(_strided(storage, dtype.dtype, storage_offset, size, stride, self._path))

  def _rebuild_parameter(self, data, requires_grad=False, backward_hooks=None):
    del requires_grad, backward_hooks
    return data

  def _rebuild_parameter_with_state(self, data, requires_grad, backward_hooks, state):
    del requires_grad, backward_hooks, state
    return data


def _read_member(archive: zipfile.ZipFile, name: str, path: str) -> np.ndarray:
  """The bytes of archive member `name` as a uint8 array: a read-only memory map of the file when
  the member is stored uncompressed (torch's default), else read into memory."""
  try:
    info = archive.getinfo(name)
  except KeyError:
    raise ValueError(f"{path}: the pickle refers to storage {name!r}, which the archive does not "
                     f"hold; the file is truncated or corrupt") from None
  if info.compress_type == zipfile.ZIP_STORED and info.file_size:
    with open(path, "rb") as f:
      f.seek(info.header_offset)
      header = f.read(30)
    if len(header) == 30 and header[:4] == b"PK\x03\x04":
      name_len, extra_len = struct.unpack("<HH", header[26:30])
      start = info.header_offset + 30 + name_len + extra_len
      if start + info.file_size <= os.path.getsize(path):
        return np.memmap(path, dtype=np.uint8, mode="r", offset=start, shape=(info.file_size,))
  return np.frombuffer(archive.read(name), dtype=np.uint8)


def _unpickle(path: str) -> Any:
  """The object a zip-format `torch.save` file holds, tensors as `_Tensor` arrays."""
  if not zipfile.is_zipfile(path):
    with open(path, "rb") as f:
      head = f.read(2)
    if head[:1] == b"\x80":  # a pickle PROTO opcode: torch's legacy (< 1.6) format
      raise ValueError(
          f"{path} is in torch's legacy serialization format (torch < 1.6, or "
          f"_use_new_zipfile_serialization=False), which jaxadapt does not read. Re-save it with "
          f"a newer torch: torch.save(torch.load(path), new_path); or convert it to safetensors.")
    raise ValueError(f"{path} is not a torch.save file (expected a zip archive holding "
                     f"<name>/data.pkl; found neither a zip nor a pickle)")
  with zipfile.ZipFile(path) as archive:
    names = archive.namelist()
    pickles = [n for n in names if n.endswith("data.pkl") and n.count("/") == 1]
    if not pickles:
      kind = (" (a TorchScript archive from torch.jit.save: save the state_dict with torch.save)"
              if any(n.endswith("constants.pkl") for n in names) else "")
      raise ValueError(f"{path}: a zip archive without <name>/data.pkl, so not a torch.save "
                       f"file{kind}; it holds e.g. {names[:5]}")
    prefix = pickles[0][:-len("data.pkl")]
    big_endian = False
    if f"{prefix}byteorder" in names:
      order = archive.read(f"{prefix}byteorder").decode("ascii", "replace").strip()
      if order not in ("little", "big"):
        raise ValueError(f"{path}: byteorder record {order!r}, expected 'little' or 'big'")
      big_endian = order == "big"
    with archive.open(pickles[0]) as f:
      return _RestrictedUnpickler(f, archive, prefix, path, big_endian).load()


def _flatten(obj, prefix: str, out: dict) -> None:
  """Tensors of nested dicts/lists into `out`, keyed by dotted paths; other leaves dropped."""
  if isinstance(obj, _Tensor):
    out[prefix] = obj.view(np.ndarray)
  elif isinstance(obj, Mapping):
    for k, v in obj.items():
      _flatten(v, f"{prefix}.{k}" if prefix else str(k), out)
  elif isinstance(obj, (list, tuple)):
    for i, v in enumerate(obj):
      _flatten(v, f"{prefix}.{i}" if prefix else str(i), out)


def load_torch_file(path: str | os.PathLike, *, key: Optional[str] = None,
                    strip_prefix: Optional[str] = None) -> dict[str, np.ndarray]:
  """The tensors of a `torch.save` file (a state dict), as numpy arrays, without torch.

  The pickle is read through an allow-list of globals (see the module docstring), so a file that
  would run code on loading is refused, not run.

  Args:
    path: a file written by `torch.save` (torch >= 1.6 zip format; `.pt`, `.pth`, `.bin`).
    key: the entry to read when the state dict is nested (e.g. "state_dict", "model", or a dotted
      path "ema.model"); by default the whole object is flattened with dotted keys
      (`{"model": {"w": t}}` -> `"model.w"`).
    strip_prefix: a prefix to remove from every key that starts with it (e.g. "module." of
      `nn.DataParallel`); keys without it are kept as they are.

  Returns:
    {dotted name: array}, in the file's order. Non-tensor leaves (an epoch number, a config
    string) are not tensors and are left out. Contiguous tensors of uncompressed members are
    read-only memory maps of the file.

  Raises:
    UnsafePickleError: the pickle names a global outside the allow-list (it names the global).
    ValueError: a legacy-format (torch < 1.6) file, a file that is not a torch.save archive, a
      corrupt tensor, no entry `key`, no tensors, or keys that collide after `strip_prefix`.
  """
  path = os.fspath(path)
  obj = _unpickle(path)
  if key is not None:
    node, walked = obj, []
    parts = [key] if isinstance(obj, Mapping) and key in obj else key.split(".")
    for part in parts:
      if not isinstance(node, Mapping) or part not in node:
        have = sorted(map(str, node)) if isinstance(node, Mapping) else type(node).__name__
        raise ValueError(f"{path}: no entry {'.'.join(walked + [part])!r} (key={key!r}); "
                         f"found {have}")
      node, walked = node[part], walked + [part]
    obj = node
  if isinstance(obj, _Tensor):
    raise ValueError(f"{path} holds a single tensor, not a dict of tensors (a state dict)")
  flat: dict[str, np.ndarray] = {}
  _flatten(obj, "", flat)
  if not flat:
    raise ValueError(f"{path}{f' (key={key!r})' if key else ''} holds no tensors; found a "
                     f"{type(obj).__name__}")
  if strip_prefix:
    stripped: dict[str, np.ndarray] = {}
    for name, arr in flat.items():
      new = name[len(strip_prefix):] if name.startswith(strip_prefix) else name
      if new in stripped:
        raise ValueError(f"{path}: keys collide after stripping {strip_prefix!r}: {new!r}")
      stripped[new] = arr
    flat = stripped
  return flat
