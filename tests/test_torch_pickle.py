"""`load_torch_file` reads what `torch.save` writes, bit for bit, and refuses unsafe pickles."""
import os
import pickle
import zipfile

import ml_dtypes
import numpy as np
import pytest
import torch

from jaxadapt.io.torch_pickle import UnsafePickleError, load_torch_file


def _bits(t: torch.Tensor) -> np.ndarray:
  """The tensor's values as numpy (bfloat16 through its bits, to compare bitwise)."""
  if t.dtype == torch.bfloat16:
    return t.contiguous().view(torch.int16).numpy().view(ml_dtypes.bfloat16)
  if t.dtype == torch.float8_e4m3fn:
    return t.contiguous().view(torch.uint8).numpy().view(ml_dtypes.float8_e4m3fn)
  return t.contiguous().numpy()


def _assert_bitwise(got: np.ndarray, want: torch.Tensor):
  ref = _bits(want)
  assert got.dtype == ref.dtype and got.shape == ref.shape, (got.dtype, got.shape, ref.dtype,
                                                             ref.shape)
  assert got.tobytes() == ref.tobytes()


def test_tensors_read_back_bitwise(tmp_path):
  g = torch.Generator().manual_seed(0)
  base = torch.randn(5, 7, generator=g)
  shared = torch.randn(4, 6, generator=g)
  tensors = {
      "f32": base,
      "f16": torch.randn(3, 4, generator=g).half(),
      "bf16": torch.randn(3, 4, generator=g).bfloat16(),
      "f64": torch.randn(2, 3, generator=g).double(),
      "i64": torch.randint(-2**40, 2**40, (6,), generator=g),
      "i32": torch.randint(-1000, 1000, (2, 2), generator=g, dtype=torch.int32),
      "u8": torch.randint(0, 256, (9,), generator=g, dtype=torch.uint8),
      "bool": torch.rand(3, 3, generator=g) > 0.5,
      # dtypes without a storage class: pickled with _rebuild_tensor_v3 and a dtype global
      "u16": torch.tensor([0, 1, 65535], dtype=torch.int32).to(torch.uint16),
      "f8": torch.randn(4, generator=g).to(torch.float8_e4m3fn),
      "scalar": torch.tensor(3.25),
      "empty": torch.empty(0, 3),
      "transposed": base.t(),                      # a non-contiguous view of f32's storage
      "slice": base[2:, 1:5],                      # offset 15, stride (7, 1)
      "step": base[::2, ::3],                      # strides (14, 3)
      "shared_a": shared[:2],                      # two views of one storage
      "shared_b": shared[1:].reshape(-1)[3:11],
      "param": torch.nn.Parameter(torch.randn(2, 5, generator=g)),
  }
  path = tmp_path / "t.pt"
  torch.save(tensors, path)
  got = load_torch_file(path)
  assert list(got) == list(tensors)
  for name, t in tensors.items():
    _assert_bitwise(got[name], t.detach())
  assert got["scalar"].shape == () and got["scalar"] == np.float32(3.25)
  assert got["empty"].shape == (0, 3)
  # the views read the same bytes the storage holds: the transpose is the base transposed
  np.testing.assert_array_equal(got["transposed"], got["f32"].T)


def test_nested_dict_key_and_prefix(tmp_path):
  g = torch.Generator().manual_seed(1)
  model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
  with torch.no_grad():
    model[1].running_mean.normal_(generator=g)
  sd = model.state_dict()  # an OrderedDict with _metadata; num_batches_tracked int64 0-d
  wrapped = {f"module.{k}": v for k, v in sd.items()}
  path = tmp_path / "ckpt.pt"
  torch.save({"state_dict": wrapped, "epoch": 7, "meta": {"name": "x", "ema": {"w": sd["0.bias"]}}},
             path)

  flat = load_torch_file(path)  # everything, dotted; non-tensor leaves left out
  assert set(flat) == {f"state_dict.module.{k}" for k in sd} | {"meta.ema.w"}
  got = load_torch_file(path, key="state_dict", strip_prefix="module.")
  assert list(got) == list(sd)
  for k, v in sd.items():
    _assert_bitwise(got[k], v)
  assert got["1.num_batches_tracked"].dtype == np.int64 and got["1.num_batches_tracked"].shape == ()
  _assert_bitwise(load_torch_file(path, key="meta.ema")["w"], sd["0.bias"])
  with pytest.raises(ValueError, match=r"no entry 'model'.*state_dict"):
    load_torch_file(path, key="model")


class _RunsCode:
  """Unpickling this would call os.system (a pickle's __reduce__ names any callable)."""

  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return (os.system, (f"touch {self.marker}",))


def test_forbidden_global_refused_without_running(tmp_path):
  marker = tmp_path / "ran"
  path = tmp_path / "evil.pt"
  torch.save({"w": torch.ones(2), "x": _RunsCode(marker)}, path)
  with pytest.raises(UnsafePickleError, match=r"global (posix|os|nt)\.system.*not allowed"):
    load_torch_file(path)
  assert not marker.exists()
  # a whole pickled module is refused too, naming its class
  path2 = tmp_path / "module.pt"
  torch.save(torch.nn.Linear(2, 2), path2)
  with pytest.raises(UnsafePickleError, match=r"torch\.nn\.modules\.linear\.Linear.*state_dict"):
    load_torch_file(path2)


def test_legacy_and_non_torch_files_refused(tmp_path):
  legacy = tmp_path / "legacy.pt"
  torch.save({"w": torch.ones(2)}, legacy, _use_new_zipfile_serialization=False)
  with pytest.raises(ValueError, match=r"legacy serialization format.*Re-save it with a newer "
                                       r"torch"):
    load_torch_file(legacy)
  other = tmp_path / "other.pt"
  other.write_bytes(b"not a checkpoint")
  with pytest.raises(ValueError, match="not a torch.save file"):
    load_torch_file(other)
  plain_zip = tmp_path / "plain.zip"
  with zipfile.ZipFile(plain_zip, "w") as z:
    z.writestr("a/readme.txt", "hi")
  with pytest.raises(ValueError, match="without <name>/data.pkl"):
    load_torch_file(plain_zip)


def test_out_of_bounds_view_refused(tmp_path):
  """A hostile stride may not read memory past its storage."""
  path = tmp_path / "t.pt"
  torch.save({"w": torch.arange(4.0)}, path)
  with zipfile.ZipFile(path) as z:
    members = {n: z.read(n) for n in z.namelist()}
  pkl = next(n for n in members if n.endswith("data.pkl"))
  # size (4,) -> (40,): rewrite the pickled size tuple's BININT1 4 after the storage id
  data = members[pkl]
  patched = data.replace(b"K\x00K\x04\x85", b"K\x00K(\x85", 1)
  assert patched != data
  members[pkl] = patched
  bad = tmp_path / "bad.pt"
  with zipfile.ZipFile(bad, "w") as z:
    for n, b in members.items():
      z.writestr(n, b)
  with pytest.raises(ValueError, match="reads element 39 of storage 0, which holds 4"):
    load_torch_file(bad)
  assert pickle  # (the stdlib pickle is what the restricted unpickler extends)
