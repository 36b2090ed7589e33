"""SIGTERM as a preemption notice: training loops stop after the current step and save it.

``Guard`` is a context manager around a training loop. While it is active, SIGTERM (and SIGINT if
asked) only sets a flag; the loop calls ``guard.should_stop(step)`` after every step and, when it
is true, saves a checkpoint of that step, waits for it to be written and raises ``Preempted``.
The launchers print its one-line message and exit with ``EXIT_CODE`` (75, ``EX_TEMPFAIL``: rerun
the same command to resume from the saved step). Leaving the guard restores the previous handlers.

Multi-host (``jax.process_count() > 1``): every process must stop at the same step. With JAX's
preemption service (``jax_enable_preemption_service``, on by default under
``jax.distributed.initialize``), the coordination service catches SIGTERM itself and agrees on a
sync step; ``should_stop`` asks ``multihost_utils.reached_preemption_sync_point(step)`` (what
orbax's ``CheckpointManager.reached_preemption`` wraps) and no Python handler is installed, which
would replace the service's. Without the service the local flags are gathered every step
(``process_allgather``) and any process's notice stops all. A single process pays for neither.
"""

from __future__ import annotations

import signal
import threading
from typing import Any

import jax
import numpy as np
from absl import logging

EXIT_CODE = 75  # sysexits.h EX_TEMPFAIL: a temporary failure, the command can be retried


class Preempted(Exception):  # noqa: N818  (a notice, not an error)
  """A loop stopped on a preemption notice after saving ``step`` in ``directory``."""

  def __init__(self, step: int, directory: str):
    self.step, self.directory = int(step), str(directory)
    super().__init__(f"preempted: saved checkpoint step {self.step} in {self.directory}; "
                     "rerun the same command to resume from it")


class Guard:
  """Turns SIGTERM (and optionally SIGINT) into a stop request polled after each step.

  Example::

    with preemption.Guard() as guard:
      while step < total:
        ...one step...
        if guard.should_stop(step):
          ckpt.save(step, state, meta, force=True); ckpt.wait()
          raise preemption.Preempted(step, ckpt.directory)
  """

  def __init__(self, *, sigint: bool = False):
    self._signals = [signal.SIGTERM] + ([signal.SIGINT] if sigint else [])
    self._previous: dict[int, Any] = {}
    self._flag = False
    self._multihost = False
    self._service = False

  @property
  def requested(self) -> bool:
    """Whether this process received a notice (see ``should_stop`` for the agreed decision)."""
    return self._flag

  def request(self) -> None:
    """Records a notice as the signal handler does (for callers with their own notice source)."""
    self._flag = True

  def _handle(self, signum, frame) -> None:
    del frame
    if not self._flag:
      logging.warning("received %s: stopping after the current step to save a checkpoint",
                      signal.Signals(signum).name)
    self._flag = True

  def __enter__(self) -> Guard:
    self._multihost = jax.process_count() > 1
    self._service = self._multihost and bool(jax.config.jax_enable_preemption_service)
    if self._service:
      return self
    if threading.current_thread() is not threading.main_thread():
      logging.warning("preemption.Guard outside the main thread: SIGTERM is not intercepted")
      return self
    for sig in self._signals:
      self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def __exit__(self, *exc) -> None:
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
    self._previous.clear()

  def should_stop(self, step: int) -> bool:
    """Whether to save ``step`` and stop; every process gets the same answer at the same step."""
    if self._service:
      from jax.experimental import multihost_utils  # noqa: PLC0415
      return bool(multihost_utils.reached_preemption_sync_point(int(step)))
    if self._multihost:
      from jax.experimental import multihost_utils  # noqa: PLC0415
      flags = multihost_utils.process_allgather(np.asarray(self._flag, np.int32))
      return bool(np.any(flags))
    return self._flag
