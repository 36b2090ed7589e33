"""One live run per workdir: an exclusive ``fcntl.flock`` on ``<workdir>/.eagle_jax.lock``.

``hold(workdir)`` takes the lock for the duration of a job, or raises ``WorkdirLocked`` at once
naming the workdir, the lock file and its owner (pid, host, start time, written into the file by
the owner). The kernel drops an flock when its owner's process dies, however it dies (SIGKILL
included), so a lock left by a killed run never blocks the next one; the file itself stays.

The lock is re-entrant within a process (``launch.main`` trains and then evaluates in one process;
both hold the same workdir). Multi-process jobs (``distributed=True``) lock
``.eagle_jax.lock.<host>.<process>``: the processes of one job share the workdir, a second job with
the same processes is refused. flock over NFS is emulated with POSIX locks by Linux; on filesystems
without locks (some FUSE mounts) ``flock`` fails with ``OSError``, reported as a ``WorkdirLocked``
too.

A workdir on an object store (``gs://``, ``s3://``: any ``scheme://`` path) cannot be flocked and
its objects have no owner process to outlive; ``hold`` takes no lock there (it logs so and yields
``None``), and one live run per remote workdir is left to the scheduler that starts the jobs.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import time
from collections.abc import Iterator

from absl import logging

from eagle_jax import paths

LOCK_NAME = ".eagle_jax.lock"

_held: dict[str, list] = {}  # lock path -> [file object, depth] for this process


class WorkdirLocked(RuntimeError):
  """The workdir is in use by another live run (or cannot be locked); one-line message."""


def lock_path(workdir: str, *, distributed: bool = False, process: int = 0) -> str:
  name = f"{LOCK_NAME}.{socket.gethostname()}.{process}" if distributed else LOCK_NAME
  return os.path.join(os.path.abspath(workdir), name)


def _owner(path: str) -> str:
  try:
    with open(path) as f:
      info = json.loads(f.read() or "{}")
  except (OSError, ValueError):
    info = {}
  if not info:
    return "owner unknown (it is writing the lock file)"
  return f"pid {info.get('pid')} on host {info.get('host')} since {info.get('started')}"


@contextlib.contextmanager
def hold(workdir: str, *, distributed: bool = False, process: int = 0
         ) -> Iterator[str | None]:
  """Holds the workdir's lock while the block runs; yields the lock file's path.

  A remote workdir (``scheme://``) is not locked: see the module docstring; yields ``None``.

  Raises:
    WorkdirLocked: another live process holds it (or the filesystem cannot lock).
  """
  if not paths.is_local(workdir):
    logging.info("workdir %s is remote: no lock (one live run per workdir is up to the "
                 "scheduler)", workdir)
    yield None
    return
  os.makedirs(workdir, exist_ok=True)
  path = lock_path(workdir, distributed=distributed, process=process)
  if path in _held:
    _held[path][1] += 1
    try:
      yield path
    finally:
      _held[path][1] -= 1
    return
  f = open(path, "a+")  # noqa: SIM115  (kept open while held)
  try:
    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except OSError as e:
    f.close()
    if e.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
      raise WorkdirLocked(
          f"workdir {os.path.abspath(workdir)} is in use by another run: {_owner(path)} holds "
          f"{path}; wait for it to finish or stop it") from None
    raise WorkdirLocked(f"workdir {os.path.abspath(workdir)}: cannot lock {path}: "
                        f"{e.strerror}") from None
  f.seek(0)
  f.truncate()
  f.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                      "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}))
  f.flush()
  _held[path] = [f, 1]
  try:
    yield path
  finally:
    _held[path][1] -= 1
    if _held[path][1] == 0:
      del _held[path]
      f.seek(0)
      f.truncate()
      fcntl.flock(f, fcntl.LOCK_UN)
      f.close()
