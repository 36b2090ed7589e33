"""Multi-process runs: starting ``jax.distributed``, and which process holds which rows of a batch.

JAX runs one controller process per host (a TPU VM worker, a GPU host, or a CPU process on loopback
in tests). Every process executes the same program on its own devices of one global mesh, so a
batch sharded over the logical ``batch`` axis lives in blocks of rows, one block per process. The
trainer collects only its own block of every episode batch (its environment calls are its share of
the load) and builds the global batch from those blocks with
``jax.make_array_from_process_local_data``; small host arrays (states the policy acts on, metrics)
are all-gathered back in global row order, so every process computes exactly what one process with
the same global batch computes.

With one process every function here is the identity (``process_rows`` is the whole batch).
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import numpy as np
from jax.experimental import multihost_utils

from eagle_jax import parallel


def initialize(coordinator_address: str = "", num_processes: int = 0, process_id: int = -1
               ) -> None:
  """Starts ``jax.distributed`` once per process (before any backend is used).

  Args:
    coordinator_address: ``host:port`` of process 0's coordination service; empty: detected from
      the cluster environment (Cloud TPU VMs, SLURM, ...).
    num_processes, process_id: the run's process count and this process's index (required with
      an address; detected otherwise).

  Raises:
    ValueError: an address without a process count and id, or an id outside the count.
  """
  if jax.distributed.is_initialized():
    return
  if not coordinator_address:
    jax.distributed.initialize()
    return
  if num_processes < 1 or not 0 <= process_id < num_processes:
    raise ValueError(f"--coordinator_address={coordinator_address} needs --num_processes >= 1 and "
                     f"0 <= --process_id < --num_processes (got {num_processes}, {process_id})")
  # CPU processes exchange collectives through gloo (the CPU client has none of its own across
  # processes); accelerator backends ignore this setting.
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address, num_processes=num_processes,
                             process_id=process_id)


def is_multiprocess() -> bool:
  return jax.process_count() > 1


def process_rows(mesh: jax.sharding.Mesh, n: int, rules=parallel.DEFAULT_RULES) -> slice:
  """The rows ``[lo, hi)`` of a global ``[n, ...]`` batch (logical ``batch`` axis first) held by
  this process's devices: the block of episodes it collects.

  Raises:
    ValueError: the mesh gives this process rows that are not one contiguous block.
  """
  sharding = parallel.named_sharding(mesh, ("batch",), rules)
  blocks = sorted({s[0].indices(n)[:2] for s in sharding.addressable_devices_indices_map((n,))
                   .values()})
  lo, hi = blocks[0]
  for start, stop in blocks[1:]:
    if start > hi:
      raise ValueError(f"mesh {dict(mesh.shape)}: process {jax.process_index()} holds rows "
                       f"{blocks} of the batch, not one block; order the devices by process")
    hi = max(hi, stop)
  return slice(lo, hi)


def gather_rows(x: np.ndarray, rows: slice, n: int) -> np.ndarray:
  """``[hi - lo, ...]`` rows of every process -> the global ``[n, ...]`` array, in row order.

  Every process must call this with the same shapes (the same point of the same program).
  """
  x = np.asarray(x)
  if not is_multiprocess() or rows.indices(n)[:2] == (0, n):  # one process, or rows run by all
    return x
  blocks = np.asarray(multihost_utils.process_allgather(x))  # [P, rows, ...]
  starts = np.asarray(multihost_utils.process_allgather(np.int64(rows.start)))
  out = np.empty((n, *x.shape[1:]), x.dtype)
  for start, block in zip(starts.reshape(-1), blocks):
    out[start:start + len(block)] = block
  return out


def global_batch(batch: Mapping[str, np.ndarray], mesh: jax.sharding.Mesh, n: int,
                 rules=parallel.DEFAULT_RULES) -> dict[str, jax.Array]:
  """Process-local rows (``process_rows``) of every array -> global ``[n, ...]`` arrays sharded
  over the logical ``batch`` axis."""
  out = {}
  for k, v in batch.items():
    v = np.asarray(v)
    sharding = parallel.named_sharding(mesh, ("batch",) + (None,) * (v.ndim - 1), rules)
    out[k] = jax.make_array_from_process_local_data(sharding, v, (n, *v.shape[1:]))
  return out


def total(x: float | int) -> float:
  """The sum of a per-process count over every process."""
  if not is_multiprocess():
    return x
  return type(x)(np.asarray(multihost_utils.process_allgather(np.asarray(x))).sum())
