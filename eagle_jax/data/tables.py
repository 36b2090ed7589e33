"""Columnar reading of delimited text files with errors that name the file, line and field.

Parsing uses ``pyarrow.csv`` (multi-threaded, columnar), so MovieLens 25M's 25M-row ``ratings.csv``
is parsed natively, not row by row in Python. pyarrow's own conversion errors do not say which row
failed, so on any failure the file is scanned once more in Python to find the first offending line;
the fast path pays nothing for that.

Encoding: the GroupLens CSV files and recbole's atomic files are UTF-8; only the original ML-100K
``u.item`` / ``u.user`` are latin-1 (their reader passes ``encoding="latin-1"``). A UTF-8 byte-order
mark at the start of a file is skipped. A byte that is not valid in the file's encoding is refused
naming the file, the line, the byte and its column, rather than guessed at: a latin-1 title in a
UTF-8 file is a file that was re-saved in another encoding, and decoding it as latin-1 would
silently garble every correctly encoded non-ASCII title in it.
"""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.csv as pa_csv

from eagle_jax.data.types import DataFormatError

# Column kinds: "int" -> int64, "float" -> float32 (finite), "float64" -> float64 (finite, e.g.
# timestamps written as floats), "str" -> Python str objects.
_ARROW_TYPES = {"int": pa.int64(), "float": pa.float64(), "float64": pa.float64(),
                "str": pa.string()}
_NUMPY_TYPES = {"int": np.int64, "float": np.float32, "float64": np.float64}


def read_table(
    path: str | os.PathLike,
    columns: Mapping[str, str],
    *,
    delimiter: str = ",",
    names: Sequence[str] | None = None,
    header_aliases: Mapping[str, str] | None = None,
    quoting: bool = True,
    encoding: str = "utf8",
    allow_empty: bool = False,
) -> dict[str, np.ndarray]:
  """Reads the requested ``columns`` of a delimited file.

  Args:
    path: the file.
    columns: column name -> kind (``"int"``, ``"float"``, ``"float64"`` or ``"str"``). Only these
      are returned.
    delimiter: field separator.
    names: column names for a headerless file (``None``: the first line is the header).
    header_aliases: header name as written in the file -> name used in ``columns`` (e.g. recbole's
      ``user_id:token`` -> ``user_id``).
    quoting: whether ``"`` quotes fields (CSV); off for tab/pipe files with raw quotes in titles.
    encoding: text encoding (ML-100K's ``u.item`` is latin-1).
    allow_empty: return empty arrays for a file with a header and no rows instead of raising.

  Returns:
    Column name -> [N] array: int64, float32, float64 or object (str).

  Raises:
    DataFormatError: missing file or column, empty file, a value that does not parse as its kind, an
      empty or non-finite numeric value. The message names file, line (1-based) and field.
  """
  path = os.fspath(path)
  _check_file(path)
  aliases = dict(header_aliases or {})
  read_opts = pa_csv.ReadOptions(
      encoding=encoding, column_names=list(names) if names is not None else None,
      block_size=1 << 24)
  if names is None:
    header = read_header(path, delimiter=delimiter, quoting=quoting, encoding=encoding)
    file_names = [aliases.get(h, h) for h in header]
    read_opts = pa_csv.ReadOptions(
        encoding=encoding, column_names=file_names, skip_rows=1, block_size=1 << 24)
  else:
    file_names = list(names)
  missing = [c for c in columns if c not in file_names]
  if missing:
    raise DataFormatError(
        path, f"missing column(s) {missing}; the file has columns {file_names}", line=1,
        field=missing[0])
  parse_opts = pa_csv.ParseOptions(
      delimiter=delimiter, quote_char='"' if quoting else False, newlines_in_values=False)
  convert_opts = pa_csv.ConvertOptions(
      column_types={c: _ARROW_TYPES[k] for c, k in columns.items()},
      include_columns=list(columns), strings_can_be_null=False, quoted_strings_can_be_null=False)
  try:
    table = pa_csv.read_csv(
        path, read_options=read_opts, parse_options=parse_opts, convert_options=convert_opts)
  except (pa.ArrowInvalid, UnicodeDecodeError) as e:
    _raise_bad_byte(path, encoding)
    _raise_located(path, columns, file_names, delimiter, quoting, encoding, names is None)
    raise DataFormatError(path, f"could not parse: {e}") from e  # not located: still name the file
  if table.num_rows == 0 and not allow_empty:
    raise DataFormatError(path, "no data rows", line=2 if names is None else 1)
  out = {}
  for name, kind in columns.items():
    col = table.column(name)
    if col.null_count or (kind.startswith("float") and not _all_finite(col)):
      _raise_located(path, columns, file_names, delimiter, quoting, encoding, names is None)
      raise DataFormatError(path, "empty or non-finite value", field=name)
    if kind == "str":
      try:
        out[name] = np.asarray(col.to_pylist(), dtype=object)
      except UnicodeDecodeError:
        _raise_bad_byte(path, encoding)
        raise
    else:
      out[name] = col.to_numpy().astype(_NUMPY_TYPES[kind])
  return out


def _all_finite(col: pa.ChunkedArray) -> bool:
  return bool(np.isfinite(col.to_numpy()).all()) if len(col) else True


def _check_file(path: str) -> None:
  if not os.path.isfile(path):
    raise DataFormatError(path, "file not found")
  if os.path.getsize(path) == 0:
    raise DataFormatError(path, "file is empty", line=1)


def _python_encoding(encoding: str) -> str:
  """The codec Python reads ``encoding`` with: UTF-8 skips a leading byte-order mark."""
  return "utf-8-sig" if encoding.lower().replace("-", "").replace("_", "") == "utf8" else encoding


def read_header(path: str | os.PathLike, *, delimiter: str = ",", quoting: bool = True,
                encoding: str = "utf8") -> list[str]:
  """The stripped column names on the first line of ``path`` (a UTF-8 byte-order mark skipped).

  Raises:
    DataFormatError: missing or empty file, or a header byte not valid in ``encoding``.
  """
  path = os.fspath(path)
  _check_file(path)
  try:
    with open(path, encoding=_python_encoding(encoding), newline="") as f:
      reader = csv.reader(f, delimiter=delimiter, quoting=csv.QUOTE_MINIMAL if quoting
                          else csv.QUOTE_NONE)
      return [h.strip() for h in next(reader)]
  except StopIteration:
    raise DataFormatError(path, "file is empty", line=1) from None
  except UnicodeDecodeError:
    _raise_bad_byte(path, encoding)
    raise


def _raise_bad_byte(path: str, encoding: str) -> None:
  """Raises a DataFormatError at the first byte of ``path`` not valid in ``encoding``, if any."""
  codec = _python_encoding(encoding)
  with open(path, "rb") as f:
    for lineno, raw in enumerate(f, start=1):
      try:
        raw.decode(codec if lineno == 1 else encoding)
      except UnicodeDecodeError as e:
        byte = raw[e.start]
        raise DataFormatError(
            path, f"byte 0x{byte:02x} at column {e.start + 1} is not valid {encoding} text; "
            f"expected a {encoding} file (re-save it as {encoding})", line=lineno) from None


def _raise_located(path, columns, file_names, delimiter, quoting, encoding, has_header):
  """Scans ``path`` in Python and raises a DataFormatError at the first bad value, if any."""
  try:
    f = open(path, encoding=_python_encoding(encoding), newline="")
  except OSError:
    return
  with f:
    reader = csv.reader(f, delimiter=delimiter, quoting=csv.QUOTE_MINIMAL if quoting
                        else csv.QUOTE_NONE)
    index = {c: file_names.index(c) for c in columns}
    try:
      for lineno, row in enumerate(reader, start=1):
        if has_header and lineno == 1:
          continue
        if not row:
          continue
        if len(row) != len(file_names):
          raise DataFormatError(
              path, f"expected {len(file_names)} fields, found {len(row)}", line=lineno)
        for name, kind in columns.items():
          value = row[index[name]]
          if kind == "str":
            continue
          if value.strip() == "":
            raise DataFormatError(path, f"empty {kind} value", line=lineno, field=name)
          try:
            number = int(value) if kind == "int" else float(value)
          except ValueError:
            raise DataFormatError(
                path, f"expected {'an integer' if kind == 'int' else 'a number'}, got {value!r}",
                line=lineno, field=name) from None
          if kind != "int" and not math.isfinite(number):
            raise DataFormatError(path, f"non-finite value {value!r}", line=lineno, field=name)
    except UnicodeDecodeError:
      _raise_bad_byte(path, encoding)
      raise
