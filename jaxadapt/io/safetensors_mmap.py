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

_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
    "BOOL": np.bool_, "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2,
}


class SafetensorsFile(Mapping):
  """Read-only mapping name -> np.memmap view of one safetensors file."""

  def __init__(self, path: str | os.PathLike):
    self.path = os.fspath(path)
    with open(self.path, "rb") as f:
      raw = f.read(8)
      if len(raw) != 8:
        raise ValueError(f"{self.path} is not a safetensors file (shorter than 8 bytes)")
      (n,) = struct.unpack("<Q", raw)
      header = json.loads(f.read(n))
    self.metadata = header.pop("__metadata__", {}) or {}
    self._header = header
    self._offset = 8 + n
    self._mm = None

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
      with open(index) as f:
        weight_map = json.load(f)["weight_map"]
      for name, fname in weight_map.items():
        self._where[name] = os.path.join(directory, fname)
    elif os.path.exists(single):
      for name in SafetensorsFile(single):
        self._where[name] = single
    else:
      found = sorted(os.listdir(directory)) if os.path.isdir(directory) else "no such directory"
      raise FileNotFoundError(f"{directory}: expected {stem}.safetensors or "
                              f"{stem}.safetensors.index.json, found {found}")

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
