"""Decoded images to uint8 pixels, and PNG grids of samples.

The conversion is the one diffusers' pipelines apply: a VAE decodes to [-1, 1], the image is
``clip(x / 2 + 0.5, 0, 1)`` and pixels are ``round(255 * image)`` (round half to even, as numpy).
"""
from __future__ import annotations

import math
import os
import struct
import zlib

import numpy as np


def to_uint8(images) -> np.ndarray:
  """Decoder output [N, C, H, W] in [-1, 1] (NCHW) to uint8 pixels [N, H, W, C].

  Args:
    images: [N, C, H, W] array (jax or numpy), any float dtype.

  Returns:
    uint8 numpy [N, H, W, C]: ``round(255 * clip(x / 2 + 0.5, 0, 1))``.
  """
  x = np.asarray(images, np.float32)
  if x.ndim != 4:
    raise ValueError(f"to_uint8: expected decoded images [N, C, H, W]; got shape {x.shape}.")
  x = np.clip(x / 2 + 0.5, 0.0, 1.0).transpose(0, 2, 3, 1)
  return np.round(x * 255).astype(np.uint8)


def _as_uint8(x: np.ndarray) -> np.ndarray:
  """uint8 pixels as they are; float images in [0, 1] (diffusers' `output_type="np"`) rounded as
  diffusers' `numpy_to_pil` rounds them; anything else refused."""
  if x.dtype == np.uint8:
    return x
  if np.issubdtype(x.dtype, np.floating):
    lo, hi = (float(x.min()), float(x.max())) if x.size else (0.0, 0.0)
    if np.isfinite(x).all() and lo >= 0.0 and hi <= 1.0:
      return (x * 255).round().astype(np.uint8)
    raise ValueError(
        f"image_grid: float images must lie in [0, 1] (as diffusers' output_type=\"np\"); got"
        f" values in [{lo:g}, {hi:g}]. For decoder output in [-1, 1] (NCHW) use `to_uint8`.")
  raise ValueError(
      f"image_grid: expected uint8 pixels (as `generate` returns) or floats in [0, 1]; got"
      f" {x.dtype}.")


def image_grid(images, *, cols: int | None = None) -> np.ndarray:
  """Tiles images [N, H, W, C] into one [rows * H, cols * W, C] uint8 array; empty cells are 0.

  Args:
    images: uint8 [N, H, W, C] (C = 1, 3 or 4), [N, H, W] (grayscale) or one image [H, W, 3|4];
      float images in [0, 1] (diffusers' `output_type="np"`) become round(255 x).
    cols: images per row; default ceil(sqrt(N)). More columns than images are cut to N.
  """
  x = np.asarray(images)
  if x.ndim == 3:  # one RGB(A) image [H, W, 3|4], or a batch of grayscale images [N, H, W]
    x = x[None] if x.shape[-1] in (3, 4) else x[..., None]
  if x.ndim != 4 or x.shape[0] == 0 or x.shape[-1] not in (1, 3, 4):
    raise ValueError(
        f"image_grid: expected images [N, H, W, C] with N >= 1 and C in (1, 3, 4); got shape"
        f" {np.shape(images)}.")
  x = _as_uint8(x)
  n, h, w, c = x.shape
  if cols is None:
    cols = math.ceil(math.sqrt(n))
  if isinstance(cols, (bool, np.bool_)) or not isinstance(cols, (int, np.integer)) or cols < 1:
    raise ValueError(f"image_grid: cols must be a positive int (or None for ceil(sqrt(N)));"
                     f" got {cols!r}.")
  cols = min(int(cols), n)
  rows = math.ceil(n / cols)
  grid = np.zeros((rows * h, cols * w, c), np.uint8)
  for i in range(n):
    r, q = divmod(i, cols)
    grid[r * h:(r + 1) * h, q * w:(q + 1) * w] = x[i]
  return grid


def save_image_grid(images, path: str | os.PathLike, *, cols: int | None = None) -> np.ndarray:
  """Writes images [N, H, W, C] (uint8) as one PNG grid, row by row; returns the grid array.

  Args:
    images: uint8 [N, H, W, C] (e.g. what a pipeline's ``generate`` returns), [N, H, W] or one
      image [H, W, 3|4]; floats in [0, 1] are accepted as ``image_grid`` says.
    path: the PNG file to write (parent folders are created).
    cols: images per row; default ceil(sqrt(N)).

  Returns:
    The grid, uint8 [rows * H, cols * W, C], as written.
  """
  grid = image_grid(images, cols=cols)
  path = os.fspath(path)
  parent = os.path.dirname(path)
  if parent:
    os.makedirs(parent, exist_ok=True)
  try:
    from PIL import Image
  except ImportError:  # Pillow is not a jaxadapt dependency (diffusers brings it)
    with open(path, "wb") as f:
      f.write(encode_png(grid))
  else:
    Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid).save(path, format="PNG")
  return grid


_PNG_COLOR_TYPE = {1: 0, 3: 2, 4: 6}  # channels -> PNG colour type (gray, RGB, RGBA)


def encode_png(image) -> bytes:
  """A uint8 image [H, W, C] (C = 1, 3 or 4) as PNG bytes (8-bit, no filtering, zlib).

  The fallback writer when Pillow is not installed; follows the PNG specification (ISO/IEC
  15948): signature, IHDR, one IDAT of zlib-compressed scanlines each led by filter byte 0, IEND.
  """
  x = np.ascontiguousarray(image)
  if x.dtype != np.uint8 or x.ndim != 3 or x.shape[-1] not in _PNG_COLOR_TYPE:
    raise ValueError(f"encode_png: expected uint8 [H, W, C] with C in (1, 3, 4); got {x.dtype}"
                     f" {x.shape}.")
  h, w, c = x.shape

  def chunk(kind: bytes, data: bytes) -> bytes:
    return (struct.pack(">I", len(data)) + kind + data
            + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))

  rows = np.concatenate([np.zeros((h, 1), np.uint8), x.reshape(h, w * c)], axis=1)
  header = struct.pack(">IIBBBBB", w, h, 8, _PNG_COLOR_TYPE[c], 0, 0, 0)
  return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
          + chunk(b"IDAT", zlib.compress(rows.tobytes(), 6)) + chunk(b"IEND", b""))
