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

from eagle_jax import paths


class InputError(ValueError):
  """Bad user input (config, flag, file or array); the message names it and what was expected."""


class ConfigError(InputError):
  """A config value or flag is invalid; the message names the field and what was expected."""


class NonFiniteError(InputError):
  """An array that enters the computation holds NaN or infinity; the message names its source."""


def field_value(block, name: str) -> Any:
  """The value at dotted ``name`` (``"eval.confidence"``) inside ``block``."""
  value = block
  for part in name.split("."):
    value = value[part]
  return value


def check_number(block, name: str, *, prefix: str = "config", integer: bool = False,
                 lo: float | None = None, hi: float | None = None, lo_open: bool = False,
                 hi_open: bool = False, optional: bool = False) -> float | int | None:
  """The number at dotted ``name`` inside ``block``, checked against a range.

  Args:
    block: a config (or one of its blocks).
    name: dotted path inside ``block`` (``"eval.confidence"``).
    prefix: what ``block`` is called in messages (``"config"``, ``"config.wals"``).
    integer: require an int (bools are refused).
    lo, hi: bounds (None: unbounded); ``lo_open`` / ``hi_open`` exclude them.
    optional: None is allowed (and returned).

  Returns:
    The value (an int when ``integer``).

  Raises:
    ConfigError: ``<prefix>.<name>=value: expected <kind> in <range>``.
  """
  path = f"{prefix}.{name}"
  value = field_value(block, name)
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


def check_numbers(block, specs: Iterable[tuple[str, dict]], prefix: str = "config") -> None:
  """``check_number`` over ``(name, keyword arguments)`` pairs, in order."""
  for name, kwargs in specs:
    check_number(block, name, prefix=prefix, **kwargs)


def check_choice(block, name: str, choices: Iterable[Any], prefix: str = "config") -> Any:
  """The value at ``name``, which must be one of ``choices``; ConfigError naming it otherwise."""
  value, choices = field_value(block, name), tuple(choices)
  if value not in choices:
    raise ConfigError(f"{prefix}.{name}={value!r}: expected one of {choices}")
  return value


# Fields of an AdamW block (``training.make_optimizer``): name -> check_number arguments.
OPTIMIZER_FIELDS = {
    "learning_rate": dict(lo=0.0, lo_open=True), "warmup_steps": dict(integer=True, lo=0),
    "final_lr_fraction": dict(lo=0.0, hi=1.0), "weight_decay": dict(lo=0.0),
    "grad_clip": dict(lo=0.0), "b1": dict(lo=0.0, hi=1.0, hi_open=True),
    "b2": dict(lo=0.0, hi=1.0, hi_open=True)}


def check_optimizer(block, name: str, prefix: str = "config") -> None:
  """Checks the AdamW block at ``name`` (every field of ``OPTIMIZER_FIELDS`` it has)."""
  opt = field_value(block, name)
  check_numbers(block, [(f"{name}.{k}", v) for k, v in OPTIMIZER_FIELDS.items() if k in opt],
                prefix)


def typed_fields(cls, block, field: str, special: dict[str, Any] | None = None) -> dict[str, Any]:
  """The fields of the dataclass ``cls`` read from ``block`` (a ConfigDict, dict or object; absent
  fields take their default), each checked against its default's type (an int is accepted for a
  float; a bool never for a number). ``special`` maps a field name to ``(value, name) -> value``
  for fields needing their own reading. Raises ``ConfigError`` naming ``<field>.<name>``."""
  import dataclasses  # noqa: PLC0415

  def get(name, default):
    return block.get(name, default) if hasattr(block, "get") else getattr(block, name, default)

  values = {}
  for f in dataclasses.fields(cls):
    default = f.default_factory() if f.default is dataclasses.MISSING else f.default
    value, kind = get(f.name, default), type(default)
    if special and f.name in special:
      values[f.name] = special[f.name](value, f"{field}.{f.name}")
      continue
    ok = isinstance(value, kind) or (kind is float and isinstance(value, int))
    if not ok or (kind is not bool and isinstance(value, bool)):
      raise ConfigError(f"{field}.{f.name}={value!r}: expected {kind.__name__}")
    values[f.name] = kind(value)
  return values


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
  if not paths.is_local(path):  # gs://... through etils.epath; permissions are the store's
    p = paths.path(path)
    if not p.exists():
      raise ConfigError(f"{field}={path!r}: no such {'folder' if kind == 'dir' else 'file'}")
    if p.is_dir() != (kind == "dir"):
      raise ConfigError(f"{field}={path!r}: expected a {'folder' if kind == 'dir' else 'file'}")
    return path
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
