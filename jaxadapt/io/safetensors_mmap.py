"""Memory-mapped reading of safetensors files (incl. bfloat16) without loading them whole.

A safetensors file is an 8-byte little-endian header length, a JSON header mapping each tensor
name to dtype, shape and byte offsets, then the raw data. Each tensor is returned as a read-only
`np.memmap` view, so a tensor is read from disk only when it is placed on a device.
"""
from __future__ import annotations

import json
import os
import struct
from typing import Iterator, Mapping

import ml_dtypes
import numpy as np

from jaxadapt.io.files import read_json_object

_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
    "BOOL": np.bool_, "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2,
}


class SafetensorsFile(Mapping):
  """Read-only mapping name -> np.memmap view of one safetensors file."""

  def __init__(self, path: str | os.PathLike):
    self.path = os.fspath(path)
    size = os.path.getsize(self.path)
    with open(self.path, "rb") as f:
      raw = f.read(8)
      if len(raw) != 8:
        raise ValueError(f"{self.path} is not a safetensors file (shorter than 8 bytes)")
      (n,) = struct.unpack("<Q", raw)
      if n > size - 8:
        raise ValueError(f"{self.path}: the header claims {n} bytes but the file has {size - 8} "
                         f"after the length field; it is truncated or not a safetensors file. "
                         f"Re-download or re-save it.")
      try:
        header = json.loads(f.read(n))
      except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{self.path}: the header is not valid JSON ({e}); the file is corrupt "
                         f"or not a safetensors file. Re-download or re-save it.") from None
    if not isinstance(header, dict):
      raise ValueError(  # noqa: TRY004 (a corrupt file: a bad value, not a bad argument type)
          f"{self.path}: the header is a JSON {type(header).__name__}, expected an object of "
          f"tensors; the file is corrupt or not a safetensors file")
    self.metadata = header.pop("__metadata__", {}) or {}
    self._header = header
    self._offset = 8 + n
    self._mm = None
    for name in header:
      self._check_entry(name, size - self._offset)

  def _check_entry(self, name: str, data_bytes: int) -> None:
    """Raises unless tensor `name`'s header entry is well formed and lies inside the file."""
    h = self._header[name]
    try:
      dtype, shape = h["dtype"], tuple(int(d) for d in h["shape"])
      start, end = (int(x) for x in h["data_offsets"])
    except (KeyError, TypeError, ValueError):
      raise ValueError(f"{self.path}: tensor {name!r} has header entry {h!r}, expected dtype, "
                       f"shape and data_offsets [start, end]; the file is corrupt") from None
    if not 0 <= start <= end <= data_bytes:
      raise ValueError(f"{self.path}: tensor {name!r} spans bytes [{start}, {end}) of the data, "
                       f"which holds {data_bytes} bytes; the file is truncated or corrupt. "
                       f"Re-download or re-save it.")
    if dtype in _DTYPES:
      want = int(np.prod(shape, dtype=np.int64)) * np.dtype(_DTYPES[dtype]).itemsize
      if end - start != want:
        raise ValueError(f"{self.path}: tensor {name!r} ({dtype} {list(shape)}) needs {want} "
                         f"bytes, its data_offsets give {end - start}; the file is corrupt")

  def _map(self):
    if self._mm is None:
      self._mm = np.memmap(self.path, dtype=np.uint8, mode="r")
    return self._mm

  def info(self, name: str) -> tuple[str, tuple]:
    h = self._header[name]
    return h["dtype"], tuple(h["shape"])

  def __getitem__(self, name: str) -> np.ndarray:
    h = self._header[name]
    if h["dtype"] not in _DTYPES:
      raise ValueError(f"{self.path}: tensor {name!r} has dtype {h['dtype']}, which jaxadapt "
                       f"cannot read (expected one of {sorted(_DTYPES)})")
    start, end = h["data_offsets"]
    buf = self._map()[self._offset + start:self._offset + end]
    return buf.view(_DTYPES[h["dtype"]]).reshape(h["shape"])

  def __iter__(self) -> Iterator[str]:
    return iter(self._header)

  def __len__(self) -> int:
    return len(self._header)


class CheckpointDir(Mapping):
  """All tensors of a HF-style dir: one `*.safetensors` file or a sharded `*.index.json`."""

  def __init__(self, directory: str | os.PathLike, stem: str = "model"):
    directory = os.fspath(directory)
    self.directory = directory
    index = os.path.join(directory, f"{stem}.safetensors.index.json")
    single = os.path.join(directory, f"{stem}.safetensors")
    self._where: dict[str, str] = {}
    self._files: dict[str, SafetensorsFile] = {}
    if os.path.exists(index):
      expected = 'a "weight_map" of tensor name -> shard file'
      try:
        weight_map = read_json_object(index, expected)["weight_map"]
        weight_map = {str(k): os.fspath(v) for k, v in weight_map.items()}
      except (KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"{index}: expected a JSON object with {expected}; could not read one "
                         f"({type(e).__name__}: {e})") from None
      missing = sorted({f for f in weight_map.values()
                        if not os.path.isfile(os.path.join(directory, f))})
      if missing:
        raise FileNotFoundError(f"{index} names shard(s) {missing} that are not in {directory} "
                                f"(found {sorted(os.listdir(directory))}); download the missing "
                                f"shards or re-save the checkpoint")
      for name, fname in weight_map.items():
        self._where[name] = os.path.join(directory, fname)
    elif os.path.exists(single):
      for name in SafetensorsFile(single):
        self._where[name] = single
    else:
      found = sorted(os.listdir(directory)) if os.path.isdir(directory) else "no such directory"
      hint = ""
      if isinstance(found, list) and any(f.endswith((".bin", ".pt", ".pth", ".ckpt"))
                                         for f in found):
        hint = (" (torch pickles are not read: jaxadapt does not run torch; re-save with "
                "save_pretrained(..., safe_serialization=True) to get safetensors)")
      raise FileNotFoundError(f"{directory}: expected {stem}.safetensors or "
                              f"{stem}.safetensors.index.json, found {found}{hint}")

  def _file(self, path):
    if path not in self._files:
      self._files[path] = SafetensorsFile(path)
    return self._files[path]

  def __getitem__(self, name):
    return self._file(self._where[name])[name]

  def __iter__(self):
    return iter(self._where)

  def __len__(self):
    return len(self._where)
