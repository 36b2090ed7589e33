"""The one entry wrapper of the launchers that write a workdir: lock, one-line errors, preemption.

``run(workdir, fn)`` checks ``--workdir`` (``training.check_workdir``), holds the workdir's lock
(``workdir_lock.hold``: a second live run on the same workdir is refused at once) and calls
``fn()``, after comparing the job's config with the one the workdir was made with
(``run_config.check``). Errors a user acts on are printed as one line, without a traceback: a bad
config value or a changed one (``training.ConfigError``, absl's usage error), a locked workdir or a
checkpoint with no intact step (``error: ...``, exit status 1). A run stopped by SIGTERM after
saving its checkpoint (``preemption.Preempted``) logs where it saved and exits with
``preemption.EXIT_CODE`` (75).

Multi-process jobs (``--config.distributed=True``, or the coordinator flags) start ``jax.distributed``
here, before the lock, the config record or any device use: on Cloud TPU VMs the cluster is detected;
elsewhere (CPU processes on one machine, GPU hosts) ``--coordinator_address``, ``--num_processes``
and ``--process_id`` name it, e.g. two CPU processes on loopback::

  python -m launch.train --workdir=runs/w --coordinator_address=127.0.0.1:1234 \
      --num_processes=2 --process_id=0 &
  python -m launch.train --workdir=runs/w --coordinator_address=127.0.0.1:1234 \
      --num_processes=2 --process_id=1
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import jax
from absl import app, flags, logging

from eagle_jax import checkpoint, hosts, preemption, run_config, training, workdir_lock

_ALLOW = flags.DEFINE_list(
    "allow_config_change", [], "Config fields (dotted, or a block such as rl) allowed to differ "
    "from the config the workdir was made with ('all': any); recorded in config_changes.jsonl.")

_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", "", "Multi-process runs off Cloud TPU: host:port of process 0's "
    "jax.distributed coordinator (every process passes the same one); empty: auto-detect.")
_NUM_PROCESSES = flags.DEFINE_integer(
    "num_processes", 0, "Multi-process runs with --coordinator_address: the number of processes.")
_PROCESS_ID = flags.DEFINE_integer(
    "process_id", -1, "Multi-process runs with --coordinator_address: this process's index.")

T = TypeVar("T")


def run(workdir: str | None, fn: Callable[[], T], *, name: str, config=None,
        distributed: bool = False, usage_errors: tuple[type[Exception], ...] = (training.ConfigError,)) -> T:
  """``fn()`` under the workdir's lock; see the module docstring.

  Args:
    workdir: the ``--workdir`` flag's value.
    fn: the job.
    name: the launcher's name for its log lines (``train``, ``wals`` ...).
    config: the job's config, recorded in / compared with ``<workdir>/config.json``
      (``run_config.check``, with ``--allow_config_change``) under the lock, before ``fn``.
    distributed: a multi-process job (``jax.distributed`` started here, one lock per process,
      see ``workdir_lock``); implied by ``--coordinator_address``.
    usage_errors: exception types reported as absl usage errors.
  """
  try:
    path = training.check_workdir(workdir)
    distributed = distributed or bool(_COORDINATOR.value)
    if distributed:
      try:
        hosts.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
      except ValueError as e:
        raise app.UsageError(str(e)) from e
    process = jax.process_index() if distributed else 0
    if config is not None and "compilation_cache" in config:  # before anything compiles
      training.use_compilation_cache(config.compilation_cache, path)
    with workdir_lock.hold(path, distributed=distributed, process=process):
      if config is None:
        return fn()
      with run_config.recorded(config, path, allow=_ALLOW.value):
        return fn()
  except usage_errors as e:
    raise app.UsageError(str(e)) from e
  except (workdir_lock.WorkdirLocked, checkpoint.CheckpointError) as e:
    raise SystemExit(f"[{name}] error: {e}") from None
  except preemption.Preempted as e:
    logging.warning("[%s] %s", name, e)
    print(f"[{name}] {e}", flush=True)
    raise SystemExit(preemption.EXIT_CODE) from None
