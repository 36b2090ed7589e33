"""Checks of user input shared by every job: config fields, input paths and finite arrays.

Each check raises an error whose message names what was checked (``config.eval.confidence``,
``--gguf``, ``wals/embeddings.npz: item_factors``) and what was expected, so a launcher can print it
as one line (``eagle_jax.cli``) and a job can refuse bad input before any heavy work. Plain Python
and numpy: importing it pulls in no JAX.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable
from typing import Any

import numpy as np


class InputError(ValueError):
  """Bad user input (config, flag, file or array); the message names it and what was expected."""


class ConfigError(InputError):
  """A config value or flag is invalid; the message names the field and what was expected."""


class NonFiniteError(InputError):
  """An array that enters the computation holds NaN or infinity; the message names its source."""


def field_value(config, path: str) -> Any:
  """The value at ``config.<a>.<b>`` for ``path`` ``"config.a.b"`` (the leading name is skipped)."""
  value = config
  for part in path.split(".")[1:]:
    value = value[part]
  return value


def check_number(config, path: str, *, integer: bool = False, lo: float | None = None,
                 hi: float | None = None, lo_open: bool = False, hi_open: bool = False,
                 optional: bool = False) -> float | int | None:
  """The number at ``path`` in ``config`` (see ``field_value``), checked against a range.

  Args:
    config: the root config.
    path: ``"config.<block>.<field>"``.
    integer: require an int (bools are refused).
    lo, hi: bounds (None: unbounded); ``lo_open`` / ``hi_open`` exclude them.
    optional: None is allowed (and returned).

  Returns:
    The value (an int when ``integer``).

  Raises:
    ConfigError: ``path=value: expected <kind> in <range>``.
  """
  value = field_value(config, path)
  if value is None and optional:
    return None
  kind = "an int" if integer else "a finite number"
  parts = []
  if lo is not None:
    parts.append(f"{'>' if lo_open else '>='} {lo}")
  if hi is not None:
    parts.append(f"{'<' if hi_open else '<='} {hi}")
  expected = kind + (" " + " and ".join(parts) if parts else "") + (" or None" if optional else "")
  ok = not isinstance(value, bool) and isinstance(value, int if integer else (int, float))
  if ok:
    v = float(value)
    ok = (math.isfinite(v) and (lo is None or (v > lo if lo_open else v >= lo))
          and (hi is None or (v < hi if hi_open else v <= hi)))
  if not ok:
    raise ConfigError(f"{path}={value!r}: expected {expected}")
  return value


def check_numbers(config, specs: Iterable[tuple]) -> None:
  """``check_number`` over ``(path, keyword arguments)`` pairs, in order."""
  for path, kwargs in specs:
    check_number(config, path, **kwargs)


def check_choice(config, path: str, choices: Iterable[Any]) -> Any:
  """The value at ``path``, which must be one of ``choices``; ConfigError naming it otherwise."""
  value, choices = field_value(config, path), tuple(choices)
  if value not in choices:
    raise ConfigError(f"{path}={value!r}: expected one of {choices}")
  return value


def check_input_path(path, field: str, *, kind: str = "file") -> str:
  """An existing, readable input ``path`` given by ``field`` (a flag or config field).

  Args:
    path: the path as given.
    field: what gave it, for the message (``--gguf``, ``config.embeddings``).
    kind: ``"file"`` or ``"dir"``.

  Returns:
    ``path`` as a string.

  Raises:
    ConfigError: ``field='path': no such file`` (or not a folder, not readable).
  """
  path = os.fspath(path)
  if not os.path.exists(path):
    raise ConfigError(f"{field}={path!r}: no such {'folder' if kind == 'dir' else 'file'}")
  if kind == "dir" and not os.path.isdir(path):
    raise ConfigError(f"{field}={path!r}: expected a folder, found a file")
  if kind == "file" and not os.path.isfile(path):
    raise ConfigError(f"{field}={path!r}: expected a file, found a folder")
  if not os.access(path, os.R_OK | (os.X_OK if kind == "dir" else 0)):
    raise ConfigError(f"{field}={path!r}: not readable by this user")
  return path


def check_finite(array, what: str) -> np.ndarray:
  """``array`` as a numpy array, refused if any entry is NaN or infinite.

  Args:
    array: any array-like of numbers.
    what: its source for the message (``"<file>: item_factors"``, ``"E_D output for 'text'"``).

  Returns:
    The numpy array.

  Raises:
    NonFiniteError: naming ``what``, how many entries are bad and the first one's index.
  """
  arr = np.asarray(array)
  if arr.dtype.kind in "fc":
    bad = ~np.isfinite(arr)
    if bad.any():
      first = tuple(int(i) for i in np.argwhere(bad)[0])
      where = f"row {first[0]}" if arr.ndim == 2 else f"index {first if arr.ndim > 1 else first[0]}"
      raise NonFiniteError(f"{what}: {int(bad.sum())} non-finite value(s), first at {where} "
                           f"({arr[first]}); expected finite numbers")
  return arr
