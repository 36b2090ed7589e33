"""Reading model files (GGUF, safetensors, JSON) with errors that name the file and the problem.

``gguf.GGUFReader`` memory-maps the file and slices it without bounds checks, so a truncated file
fails deep inside numpy (``cannot reshape array``) and a file of another kind with a bare
``GGUF magic invalid``. ``open_gguf`` checks the magic first, reads the header through a reader
whose every slice is bounds-checked, and checks that each tensor's bytes lie inside the file
before the reader maps them: a damaged file is refused with ``LoadingError`` naming the path, the
tensor, the bytes it needs, its offset and the file size.

safetensors files are read with ``safetensors.numpy`` (no torch, no pickle); a truncated or
garbage file is refused naming its path. Every weight read here is checked finite: one NaN in a
checkpoint would otherwise silently propagate into every output.
"""

from __future__ import annotations

import json
import os
import pathlib

import gguf
import numpy as np
import safetensors.numpy

from eagle_jax.checks import InputError, NonFiniteError, check_finite

MAGIC = b"GGUF"


class LoadingError(InputError):
  """A model file is unreadable or does not match the model: names the file, tensor and problem."""



class _CheckedReader(gguf.GGUFReader):
  """``GGUFReader`` whose slices and tensor extents are checked against the file size."""

  _path = ""

  def _get(self, offset, dtype, count=1, override_order=None):
    # gguf's own ``_get``, bounds-checked, slicing a plain ndarray view of the memory map: a slice
    # of the ``np.memmap`` itself goes through its ``__array_finalize__``, and a tokenizer's
    # vocabulary is a few hundred thousand slices.
    plain = self.__dict__.get("_plain")
    if plain is None or plain.base is not self.data:
      plain = self._plain = self.data.view(np.ndarray)
    dtype = np.dtype(dtype)
    count = int(count)
    end = offset + count * dtype.itemsize
    if offset < 0 or end > len(plain):
      raise LoadingError(f"{self._path}: truncated: the header needs {end - offset} bytes at "
                         f"offset {offset}, file has {len(plain)}")
    order = self.byte_order if override_order is None else override_order
    return plain[offset:end].view(dtype.newbyteorder(order))

  def _build_tensors(self, start_offs, fields):
    size = len(self.data)
    for field in fields:
      _, name_data, _, dims, raw_dtype, offset_tensor = field.parts
      name = bytes(name_data).decode("utf-8", "replace")
      try:
        qtype = gguf.GGMLQuantizationType(int(raw_dtype[0]))
      except ValueError:
        raise LoadingError(f"{self._path}: tensor {name!r} has unknown type id "
                        f"{int(raw_dtype[0])}") from None
      block, type_size = gguf.GGML_QUANT_SIZES[qtype]
      n_bytes = int(np.prod(dims.astype(np.int64))) * type_size // block
      offset = int(start_offs + offset_tensor[0])
      if offset + n_bytes > size:
        raise LoadingError(f"{self._path}: truncated: tensor {name!r} needs {n_bytes} bytes at "
                        f"offset {offset}, file has {size}")
    super()._build_tensors(start_offs, fields)


def open_gguf(path: str | os.PathLike) -> gguf.GGUFReader:
  """A ``GGUFReader`` over ``path`` after checking it is a complete GGUF file.

  Raises:
    LoadingError: the file is missing, empty, not a GGUF (bad magic), truncated (names the tensor,
      the bytes it needs, its offset and the file size) or has a corrupt header.
  """
  path = pathlib.Path(path)
  if not path.is_file():
    raise LoadingError(f"GGUF file not found: {path}")
  with open(path, "rb") as f:
    head = f.read(4)
  if head != MAGIC:
    raise LoadingError(f"{path}: not a GGUF file (bad magic {head!r}, expected {MAGIC!r})")
  reader = _CheckedReader.__new__(_CheckedReader)
  reader._path = str(path)
  try:
    reader.__init__(str(path))
    return reader
  except LoadingError:
    raise
  except (ValueError, KeyError, IndexError, OverflowError, UnicodeDecodeError) as e:
    raise LoadingError(f"{path}: corrupt GGUF header: {e}") from None


def finite_weights(arr: np.ndarray, what: str) -> np.ndarray:
  """``arr`` if every weight is finite; LoadingError naming ``what`` otherwise."""
  try:
    return check_finite(arr, what)
  except NonFiniteError as e:
    raise LoadingError(str(e)) from None


def read_json(path: pathlib.Path) -> dict:
  """A JSON object file; LoadingError naming the file when it is not one."""
  try:
    value = json.loads(path.read_text(encoding="utf-8"))
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise LoadingError(f"{path}: not valid JSON ({e})") from None
  if not isinstance(value, dict):
    raise LoadingError(f"{path}: expected a JSON object, got {type(value).__name__}")
  return value


def load_safetensors_file(path: str | pathlib.Path) -> dict[str, np.ndarray]:
  """Every tensor of one safetensors file, each checked finite; LoadingError naming the file."""
  path = pathlib.Path(path)
  if not path.is_file():
    raise LoadingError(f"{path}: safetensors file not found")
  try:
    tensors = dict(safetensors.numpy.load_file(str(path)))
  except Exception as e:  # noqa: BLE001 (SafetensorError and numpy errors on damaged files)
    raise LoadingError(f"{path}: not a readable safetensors file "
                       f"(truncated or corrupt: {e})") from None
  for name, arr in tensors.items():
    finite_weights(arr, f"{path}: tensor {name!r}")
  return tensors
