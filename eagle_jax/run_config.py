"""The config a workdir was made with: recorded on the first run, compared on every later one.

``check(config, workdir, ...)`` runs at job entry (``launch/job.py``). The first run writes
``<workdir>/config.json``: the resolved config, the code version (``code_version``) and the time.
A later run (a resume, an evaluation, a rerun of the quick start) compares its config field by field
against that record and refuses any changed field with a ``training.ConfigError`` naming each field
with its recorded and its new value: a resumed run under another config would silently mix two
experiments, and a shape-changing override would only fail deep inside a checkpoint restore.

Deliberate changes are named in ``allow`` (the launchers' ``--allow_config_change`` flag, e.g.
``rl.steps`` to train longer, or a whole block such as ``eval``); they are appended to
``<workdir>/config_changes.jsonl`` (time, field, old, new, code version) and become the record.
Fields that do not change what a run computes are never compared (``OPERATIONAL``: the mesh, the
server address, time-outs, checkpoint cadence, TensorBoard).

Evaluation settings (``config.eval``) may differ from the record without a flag: the evaluation then
writes beside the recorded one, in ``eval-<hash>`` (``eval_dir``), so no report is overwritten by a
run with another config.
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import hashlib
import json
import os
import subprocess
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from eagle_jax import paths, training

RECORD = "config.json"
CHANGES = "config_changes.jsonl"
# Dotted-path prefixes (at any depth) that never change a result.
OPERATIONAL = ("mesh", "distributed", "tensorboard", "compilation_cache", "profile",
               "checkpoint.every", "checkpoint.max_to_keep",
               "llm.server_url", "llm.api_key_env", "llm.concurrency", "llm.timeout_s",
               "llm.retries", "llm.scan_layers")
EVAL_BLOCK = "eval"


@functools.cache
def code_version() -> str:
  """``<package version>+g<commit>[.dirty]`` of the imported eagle_jax (the commit when it is a
  git checkout), for reports and the config record."""
  from importlib import metadata  # noqa: PLC0415

  try:
    version = metadata.version("eagle_jax")
  except metadata.PackageNotFoundError:
    version = "0+unknown"
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  try:
    commit = subprocess.run(["git", "-C", root, "rev-parse", "--short=12", "HEAD"], check=True,
                            capture_output=True, text=True, timeout=10).stdout.strip()
    dirty = subprocess.run(["git", "-C", root, "status", "--porcelain", "--untracked-files=no"],
                           check=True, capture_output=True, text=True, timeout=10).stdout.strip()
  except (OSError, subprocess.SubprocessError):
    return version
  return f"{version}+g{commit}{'.dirty' if dirty else ''}"


def to_dict(config) -> dict[str, Any]:
  """The config as plain JSON values (tuples become lists)."""
  d = config.to_dict() if hasattr(config, "to_dict") else dict(config)
  return json.loads(json.dumps(d, default=str))


def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
  """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``."""
  out: dict[str, Any] = {}
  for k, v in d.items():
    key = f"{prefix}{k}"
    if isinstance(v, Mapping) and v:
      out.update(flatten(v, key + "."))
    else:
      out[key] = v
  return out


def _matches(field: str, prefixes: Iterable[str]) -> bool:
  parts = field.split(".")
  for p in prefixes:
    q = p.split(".")
    if any(parts[i:i + len(q)] == q for i in range(len(parts) - len(q) + 1)):
      return True
  return False


def differences(recorded: Mapping[str, Any], current: Mapping[str, Any]) -> dict[str, tuple]:
  """``field -> (recorded, current)`` of every result-changing field that differs (a field only one
  side has shows ``"<absent>"`` on the other)."""
  a, b = flatten(recorded), flatten(current)
  out = {}
  for field in sorted(set(a) | set(b)):
    if _matches(field, OPERATIONAL):
      continue
    x, y = a.get(field, "<absent>"), b.get(field, "<absent>")
    if x != y:
      out[field] = (x, y)
  return out


def read(workdir: str) -> dict[str, Any] | None:
  """The record of ``workdir`` (``None`` before the first run)."""
  path = os.path.join(workdir, RECORD)
  if not paths.exists(path):
    return None
  try:
    record = json.loads(paths.read_text(path))
    if not isinstance(record, dict) or not isinstance(record.get("config"), dict):
      raise ValueError("expected an object with a 'config' object")
  except (OSError, ValueError) as e:
    raise training.ConfigError(f"{path}: unreadable config record ({e}); restore it, or delete "
                               "it to adopt the current config") from None
  return record


def _write(workdir: str, config: dict[str, Any]) -> None:
  paths.write_text(os.path.join(workdir, RECORD), json.dumps(
      {"config": config, "code_version": code_version(),
       "written": datetime.datetime.now(datetime.timezone.utc).isoformat()}, indent=2))


def check(config, workdir: str, *, allow: Iterable[str] = (), flag: str = "--allow_config_change"
          ) -> dict[str, Any]:
  """Records ``config`` in a new workdir, or compares it with the record (module docstring).

  Args:
    config: the job's resolved config (``ConfigDict`` or mapping).
    workdir: the run folder (created if missing).
    allow: fields (dotted, or a block prefix) allowed to differ; ``"all"`` allows every field.
    flag: the launcher flag that sets ``allow``, named in the error.

  Returns:
    The current config as a plain dict.

  Raises:
    training.ConfigError: a result-changing field differs and is not allowed.
  """
  current = to_dict(config)
  paths.makedirs(workdir)
  record = read(workdir)
  if record is None:
    _write(workdir, current)
    return current
  allow = tuple(a for a in allow if a)
  diff = differences(record["config"], current)
  if "all" not in allow:
    refused = {f: v for f, v in diff.items()
               if not _matches(f, allow) and not _matches(f, (EVAL_BLOCK,))}
    if refused:
      lines = "; ".join(f"config.{f}: recorded {json.dumps(old)}, now {json.dumps(new)}"
                        for f, (old, new) in refused.items())
      raise training.ConfigError(
          f"{os.path.join(workdir, RECORD)}: this run's config differs from the one the workdir "
          f"was made with ({lines}); rerun with the recorded values, use another --workdir, or "
          f"pass {flag}={','.join(refused)} to change them deliberately")
  kept = {f: v for f, v in diff.items() if "all" in allow or _matches(f, allow)}
  if kept:
    stamp = datetime.datetime.now(datetime.timezone.utc).isoformat()
    paths.append_bytes(os.path.join(workdir, CHANGES), "".join(
        json.dumps({"time": stamp, "field": field, "recorded": old, "now": new,
                    "code_version": code_version()}) + "\n"
        for field, (old, new) in kept.items()).encode("utf-8"))
    # The allowed values become the record; evaluation-only differences stay beside it.
    merged, now = flatten(record["config"]), flatten(current)
    for f in kept:
      if f in now:
        merged[f] = now[f]
      else:
        merged.pop(f, None)
    _write(workdir, _unflatten(merged))
  return current


def _unflatten(flat: Mapping[str, Any]) -> dict[str, Any]:
  out: dict[str, Any] = {}
  for key, v in flat.items():
    node = out
    *parents, last = key.split(".")
    for p in parents:
      node = node.setdefault(p, {})
    node[last] = v
  return out


def eval_dir(config, workdir: str) -> str:
  """Where the evaluation of ``config`` writes: ``<workdir>/eval`` under the recorded evaluation
  settings, else ``<workdir>/eval-<sha256[:8] of config.eval>`` beside it."""
  record = read(workdir)
  current = to_dict(config).get(EVAL_BLOCK, {})
  if record is None or record["config"].get(EVAL_BLOCK, {}) == current:
    return os.path.join(workdir, "eval")
  digest = hashlib.sha256(json.dumps(current, sort_keys=True).encode()).hexdigest()[:8]
  return os.path.join(workdir, f"eval-{digest}")


@contextlib.contextmanager
def recorded(config, workdir: str, *, allow: Iterable[str] = (),
             flag: str = "--allow_config_change") -> Iterator[dict[str, Any]]:
  """``check`` for the duration of a job: if the job then refuses its config (a
  ``training.ConfigError`` from its entry validation), the record and the change log are put back
  as they were, so an invalid config never becomes a workdir's record."""
  files = [os.path.join(workdir, RECORD), os.path.join(workdir, CHANGES)]
  before = {}
  for path in files:
    before[path] = paths.path(path).read_bytes() if paths.exists(path) else None
  current = check(config, workdir, allow=allow, flag=flag)
  try:
    yield current
  except training.ConfigError:
    for path, data in before.items():
      if data is None:
        paths.path(path).unlink(missing_ok=True)
      else:
        paths.write_bytes(path, data)
    raise
