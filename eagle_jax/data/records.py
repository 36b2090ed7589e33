"""Append-only JSONL records and stable seeds, shared by every job that writes provenance.

``append_jsonl`` writes one ``os.write`` per line (O_APPEND), so a killed writer leaves every earlier
record intact (on an object store, through ``etils.epath``, the object is rewritten with the new
lines at its end, once per call); ``read_jsonl`` skips unreadable lines (a torn last line) with a
warning.
``derive_seed`` turns a base seed and printable parts into a 31-bit seed that is stable across
runs, platforms and subsets of the work (sha256 of the parts).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Mapping
from typing import Any

from absl import logging

from eagle_jax import paths

_MAX_SEED = 2**31 - 1


def derive_seed(base: int, *parts: Any) -> int:
  """A 31-bit seed from ``base`` and any printable parts (stable across runs and platforms)."""
  blob = "/".join(str(p) for p in (base, *parts))
  return int.from_bytes(hashlib.sha256(blob.encode("utf-8")).digest()[:4], "big") & _MAX_SEED


def append_jsonl(path: str | os.PathLike, records: Iterable[Mapping[str, Any]]) -> int:
  """Appends records, one ``os.write`` per line (O_APPEND). Returns the number written."""
  path = paths.path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  needs_newline = path.exists() and path.stat().length > 0 and not path.read_bytes().endswith(
      b"\n")
  n = 0
  if not paths.is_local(path):
    lines = []
    for rec in records:
      lines.append(json.dumps(rec, ensure_ascii=False, separators=(",", ":")) + "\n")
    if lines:
      paths.append_bytes(path, ("\n" if needs_newline else "").encode("utf-8")
                         + "".join(lines).encode("utf-8"))
    return len(lines)
  fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
  try:
    for rec in records:
      line = (json.dumps(rec, ensure_ascii=False, separators=(",", ":")) + "\n").encode("utf-8")
      if needs_newline:
        line, needs_newline = b"\n" + line, False
      if os.write(fd, line) != len(line):
        raise OSError(f"{path}: short write")
      n += 1
  finally:
    os.close(fd)
  return n


def read_jsonl(path: str | os.PathLike, *, key: str | None = None) -> list[dict[str, Any]]:
  """Records of a JSONL file ([] if missing); unreadable lines (a killed writer) are skipped.

  Args:
    path: the file.
    key: if given, records lacking this field are skipped too, and only the first record of each
      value is kept.
  """
  path = paths.path(path)
  if not path.exists():
    return []
  out, seen, skipped = [], set(), 0
  for number, line in enumerate(path.read_bytes().split(b"\n"), start=1):
    if not line.strip():
      continue
    try:
      rec = json.loads(line)
      if not isinstance(rec, dict) or (key is not None and key not in rec):
        raise ValueError("not a record")
    except ValueError:
      skipped += 1
      logging.warning("%s:%d: skipping an unreadable line", path, number)
      continue
    if key is not None:
      if rec[key] in seen:
        continue
      seen.add(rec[key])
    out.append(rec)
  return out
