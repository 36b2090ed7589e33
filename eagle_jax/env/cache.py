"""On-disk response cache for the environment LLM: append-only JSONL, crash-safe appends.

Key: ``sha256`` (hex) of the canonical JSON (sorted keys, no whitespace, UTF-8) of
``{"model": model_id, "prompt": str or [{"role", "content"}...], "params": SamplingParams.to_dict()}``;
``params`` holds the prompt seed (``client.prompt_seed``), so two samples of one prompt under
different seeds are different entries and a rerun with the same seeds is served from disk.

File format: one JSON object per line, ``{"key", "model", "prompt", "params", "text",
"finish_reason", "completion_tokens", "time"}``.

Durability:

* Each answer is appended with **one** ``os.write`` of the whole line (newline included) on a
  descriptor opened with ``O_APPEND``. The kernel places it at the end of file as a unit, so a
  process killed at any point (SIGKILL included) leaves every earlier answer intact and at most one
  partial last line; a write that does not complete raises.
* ``fsync="never"`` (default) relies on the page cache: safe against the process dying, not against
  the machine losing power. ``fsync="always"`` calls ``os.fsync`` after every append (slow on
  network disks; use it when the machine itself may go away, e.g. preemptible VMs without a
  persistent-disk write cache).
* Loading skips any line that is not valid JSON with a key (a truncated last line from a killed
  process, or a line that a killed process left half-written in the middle) and warns with the
  count. If the file does not end with a newline, a newline is appended before the next answer so
  the fragment can never swallow a good line.
* Memory: every answer is kept in memory by default. ``max_entries=N`` keeps only the N most
  recently used (least recently used dropped; loading keeps the last N distinct keys of the file,
  read line by line): a paper-scale run's ~26M answers would not fit in host memory. A dropped
  answer stays on disk; asked again, it is a miss, sampled again and appended again (the same text
  for a deterministic environment; on load the first line of a key wins among those remembered).
* On an object store (``gs://...``, through ``etils.epath``) there is no append: each answer
  rewrites the object with the new line at its end (``paths.append_bytes``), so every answer is
  kept as it arrives at the cost of one read and one upload of the whole file per answer.
* A key is never written twice while it is remembered: ``put`` checks the in-memory index under a
  lock before appending.
  One process should own a cache file; several writer processes on one file are not coordinated
  (each would only check its own index; duplicates are then dropped on load, first one wins).

``CachedClient(inner, cache)`` is a ``SamplingBackend`` that answers hits from the cache, sends only
the misses (deduplicated) to ``inner`` in one ``generate`` call, and appends every answer as soon as
the inner call returns.
"""

from __future__ import annotations

import collections
import hashlib
import json
import os
import threading
import time
from collections.abc import Iterator, Sequence
from typing import Any

from absl import logging

from eagle_jax import paths
from eagle_jax.env import client as client_lib
from eagle_jax.env.client import (
    Completion,
    Prompt,
    ResultCallback,
    SamplingBackend,
    SamplingParams,
)


def cache_key(model_id: str, prompt: Prompt, params: SamplingParams) -> str:
  """sha256 hex of the canonical JSON of (model id, prompt, params incl. the prompt seed)."""
  if not isinstance(model_id, str) or not model_id:
    raise ValueError(f"model_id: expected a non-empty str, got {model_id!r}")
  payload = {"model": model_id, "prompt": client_lib.canonical_prompt(prompt),
             "params": params.to_dict()}
  blob = json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
  return hashlib.sha256(blob.encode("utf-8")).hexdigest()


class ResponseCache:
  """Append-only JSONL cache of completions (module docstring for the guarantees).

  Args:
    path: the JSONL file (created with its parent folder if missing).
    fsync: "never" or "always".
    max_entries: most answers kept in memory, least recently used dropped (0: all).
  """

  def __init__(self, path: str | os.PathLike, *, fsync: str = "never", max_entries: int = 0):
    if fsync not in ("never", "always"):
      raise ValueError(f"fsync: expected 'never' or 'always', got {fsync!r}")
    if isinstance(max_entries, bool) or not isinstance(max_entries, int) or max_entries < 0:
      raise ValueError(f"max_entries: expected an int >= 0 (0: all), got {max_entries!r}")
    self.path = paths.path(path)
    self.fsync = fsync
    self.max_entries = max_entries
    self._lock = threading.Lock()
    self._entries: collections.OrderedDict[str, Completion] = collections.OrderedDict()
    self.skipped_lines = 0
    self.duplicate_lines = 0
    self.path.parent.mkdir(parents=True, exist_ok=True)
    self._needs_newline = self._load()
    # Locally one descriptor stays open (one os.write per answer); remote files are rewritten.
    self._remote = not paths.is_local(path)
    self._fd = -2 if self._remote else os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT,
                                                0o644)

  def _load(self) -> bool:
    """Reads the file line by line; returns True when it ends without a newline (a killed
    writer)."""
    if not self.path.exists():
      return False
    number, line = 0, b""
    with paths.open_file(self.path, "rb") as f:
      for number, line in enumerate(f, start=1):
        if not line.strip():
          continue
        try:
          rec = json.loads(line)
          key = rec["key"]
          completion = Completion(text=rec["text"],
                                  finish_reason=rec.get("finish_reason", "length"),
                                  completion_tokens=rec.get("completion_tokens"))
          if not isinstance(key, str) or not isinstance(completion.text, str):
            raise TypeError("key/text")
        except (ValueError, KeyError, TypeError):
          self.skipped_lines += 1
          last = not line.endswith(b"\n")
          logging.warning("%s:%d: skipping an unreadable cache line%s", self.path, number,
                          " (truncated by a killed writer)" if last else "")
          continue
        if key in self._entries:
          self.duplicate_lines += 1
          continue
        self._remember(key, completion)
    if self.skipped_lines:
      logging.warning("%s: %d unreadable line(s) skipped, %d entries loaded", self.path,
                      self.skipped_lines, len(self._entries))
    return number > 0 and not line.endswith(b"\n")

  def _remember(self, key: str, completion: Completion) -> None:
    self._entries[key] = completion
    if self.max_entries and len(self._entries) > self.max_entries:
      self._entries.popitem(last=False)

  def __len__(self) -> int:
    return len(self._entries)

  def __contains__(self, key: str) -> bool:
    return key in self._entries

  def get(self, key: str) -> Completion | None:
    c = self._entries.get(key)
    if c is not None and self.max_entries:
      with self._lock:
        if key in self._entries:
          self._entries.move_to_end(key)
    return c

  def put(
      self, key: str, completion: Completion, *, model: str, prompt: Prompt,
      params: SamplingParams
  ) -> bool:
    """Appends one answer; returns False (and writes nothing) if the key is already cached."""
    record: dict[str, Any] = {
        "key": key, "model": model, "prompt": client_lib.canonical_prompt(prompt),
        "params": params.to_dict(), "text": completion.text,
        "finish_reason": completion.finish_reason,
        "completion_tokens": completion.completion_tokens, "time": round(time.time(), 3)}
    line = (json.dumps(record, ensure_ascii=False, separators=(",", ":")) + "\n").encode("utf-8")
    with self._lock:
      if key in self._entries:
        return False
      if self._fd == -1:
        raise ValueError(f"ResponseCache({self.path}): closed")
      if self._needs_newline:
        line = b"\n" + line
      if self._remote:
        paths.append_bytes(self.path, line)
        self._needs_newline = False
        self._entries[key] = completion
        return True
      written = os.write(self._fd, line)
      if written != len(line):
        raise OSError(f"{self.path}: short write ({written} of {len(line)} bytes)")
      if self.fsync == "always":
        os.fsync(self._fd)
      self._needs_newline = False
      self._remember(key, completion)
      return True

  def close(self) -> None:
    with self._lock:
      if self._fd >= 0:
        os.close(self._fd)
      self._fd = -1

  def __enter__(self):
    return self

  def __exit__(self, *exc) -> None:
    self.close()


class CachedClient(SamplingBackend):
  """Serves hits from ``cache`` and sends only misses to ``inner``.

  Attributes:
    hits, misses: counters over all ``generate`` calls (a miss is one prompt sent to ``inner``).
  """

  def __init__(self, inner: SamplingBackend, cache: ResponseCache, *, model_id: str | None = None):
    if not isinstance(inner, SamplingBackend):
      raise ValueError(f"inner: expected a SamplingBackend, got {type(inner).__name__}")
    self.inner = inner
    self.cache = cache
    self.model_id = model_id or inner.model_id
    self.default_chat = inner.default_chat
    self.hits = 0
    self.misses = 0

  async def generate(
      self,
      prompts: Sequence[Prompt],
      params: Sequence[SamplingParams],
      *,
      on_result: ResultCallback | None = None,
  ) -> list[Completion]:
    client_lib.check_generate_args(prompts, params)
    keys = [cache_key(self.model_id, p, q) for p, q in zip(prompts, params)]
    out: list[Completion | None] = [self.cache.get(k) for k in keys]
    todo: dict[str, int] = {}  # key -> first index (duplicates within the call are sent once)
    for i, (k, c) in enumerate(zip(keys, out)):
      if c is None and k not in todo:
        todo[k] = i
    self.hits += sum(c is not None for c in out)
    self.misses += len(todo)
    if on_result is not None:
      for i, c in enumerate(out):
        if c is not None:
          on_result(i, c)
    if todo:
      idx = list(todo.values())
      waiting: dict[str, list[int]] = {}  # key -> the indices that wait for its answer
      for i, (k, c) in enumerate(zip(keys, out)):
        if c is None:
          waiting.setdefault(k, []).append(i)

      def store(j: int, completion: Completion) -> None:
        # Written as soon as each answer arrives: an interrupted call keeps what it got.
        i = idx[j]
        if out[i] is not None:
          return
        self.cache.put(keys[i], completion, model=self.model_id, prompt=prompts[i],
                       params=params[i])
        for k in waiting[keys[i]]:
          out[k] = completion
          if on_result is not None:
            on_result(k, completion)

      answers = await self.inner.generate([prompts[i] for i in idx], [params[i] for i in idx],
                                          on_result=store)
      if len(answers) != len(idx):
        raise client_lib.SamplingError(
            f"{type(self.inner).__name__}.generate returned {len(answers)} answers for {len(idx)}")
      for j, c in enumerate(answers):
        store(j, c)  # an inner backend that did not call on_result (a no-op for those it did)
    return out  # type: ignore[return-value]

  async def aclose(self) -> None:
    await self.inner.aclose()


def merge_into(path: str | os.PathLike, others: Sequence[str | os.PathLike]) -> int:
  """Appends to the cache file ``path`` every answer of ``others`` (cache files) whose key it
  lacks, first file first; unreadable lines are skipped. Returns how many were appended.

  After a multi-process run, each process's ``cache.<i>.jsonl`` holds the answers it computed;
  merged into the shared file, a later one-process job (evaluation, a rerun) replays all of them.
  """
  def records(p) -> Iterator[tuple[str, bytes]]:
    for line in paths.path(p).read_bytes().splitlines():
      try:
        key = json.loads(line)["key"]
      except (ValueError, KeyError, TypeError):
        continue
      if isinstance(key, str):
        yield key, line

  shared = paths.path(path)
  data = shared.read_bytes() if shared.exists() else b""
  have = {k for k, _ in records(path)} if data else set()
  new = []
  for other in others:
    for key, line in records(other):
      if key not in have:
        have.add(key)
        new.append(line)
  if new:
    lead = b"\n" if data and not data.endswith(b"\n") else b""  # a torn last line stays apart
    paths.append_bytes(path, lead + b"\n".join(new) + b"\n")
  return len(new)
