"""Workdir paths on any filesystem ``etils.epath`` knows: local folders, ``gs://``, ``s3://`` ...

Every job writes its workdir (metrics, config record, reports, world, caches) through these
helpers, so ``--workdir=gs://bucket/run`` reaches the bucket instead of a local folder named
``gs:``. Checkpoints go to orbax, which takes the same paths.

Local paths keep the POSIX guarantees the jobs rely on: ``write_text`` writes a temporary file and
renames it over the target (atomic), ``append_bytes`` is one ``os.write`` on an ``O_APPEND``
descriptor (a killed writer leaves every earlier line intact). On an object store an object is
published whole when its upload closes, so ``write_text`` uploads directly (readers never see half
an object), and ``append_bytes`` rewrites the object with the new bytes at the end (object stores
have no append: one read and one upload per call, fine for per-step metrics and per-batch records).
"""

from __future__ import annotations

import os
from typing import Any

from etils import epath


def path(p: str | os.PathLike) -> epath.Path:
  """``p`` as an ``epath.Path`` (a ``pathlib.Path`` locally, a ``GPath`` for ``scheme://``)."""
  return epath.Path(p)


def is_local(p: str | os.PathLike) -> bool:
  """Whether ``p`` is on the local filesystem (no ``scheme://`` prefix)."""
  return "://" not in os.fspath(p)


def absolute(p: str | os.PathLike) -> str:
  """``p`` made absolute when local; a ``scheme://`` path is returned as it is."""
  return os.path.abspath(os.fspath(p)) if is_local(p) else os.fspath(p)


def makedirs(p: str | os.PathLike) -> None:
  """Creates the folder ``p`` and its parents if missing (no-op on prefix-only object stores)."""
  path(p).mkdir(parents=True, exist_ok=True)


def exists(p: str | os.PathLike) -> bool:
  return path(p).exists()


def isdir(p: str | os.PathLike) -> bool:
  return path(p).is_dir()


def read_text(p: str | os.PathLike) -> str:
  return path(p).read_text(encoding="utf-8")


def write_text(p: str | os.PathLike, text: str) -> None:
  """Writes ``text`` to ``p`` whole: tmp + rename locally, one upload on an object store."""
  if is_local(p):
    tmp = os.fspath(p) + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
      f.write(text)
    os.replace(tmp, p)
  else:
    path(p).write_text(text, encoding="utf-8")


def write_bytes(p: str | os.PathLike, data: bytes) -> None:
  """Writes ``data`` to ``p`` whole (see ``write_text``)."""
  if is_local(p):
    tmp = os.fspath(p) + ".tmp"
    with open(tmp, "wb") as f:
      f.write(data)
    os.replace(tmp, p)
  else:
    path(p).write_bytes(data)


def append_bytes(p: str | os.PathLike, data: bytes, *, fsync: bool = False) -> None:
  """Appends ``data`` at the end of ``p`` (created if missing); see the module docstring."""
  if is_local(p):
    fd = os.open(p, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
      written = os.write(fd, data)
      if written != len(data):
        raise OSError(f"{p}: short write ({written} of {len(data)} bytes)")
      if fsync:
        os.fsync(fd)
    finally:
      os.close(fd)
  else:
    q = path(p)
    q.write_bytes((q.read_bytes() if q.exists() else b"") + data)


def open_file(p: str | os.PathLike, mode: str = "r", **kwargs: Any):
  """``open`` for local paths, ``epath.Path.open`` otherwise (for numpy, matplotlib, etc.)."""
  if is_local(p):
    return open(p, mode, **kwargs)  # noqa: SIM115  (the caller closes it)
  return path(p).open(mode, **kwargs)
