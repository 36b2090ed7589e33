"""Training machinery shared by the EAGLE agent trainer and the ELM trainer.

One job per piece:

* ``check_workdir``: the output folder exists and is writable, checked before any compute.
* ``use_compilation_cache``: XLA's persistent compilation cache for a job's process.
* ``build_mesh`` / ``check_divisible``: a mesh from ``config.mesh`` and batch sizes that split over
  its data axes, with errors naming the config field.
* ``FunctionalModel``: an NNX module split into a static graph and a *pure* parameter pytree (nested
  dicts of arrays), so the train step is a plain ``jax.jit`` over pytrees with named shardings,
  and orbax saves and restores exactly what the step consumes. Parameters are created sharded:
  ``nnx.eval_shape`` gives shapes and logical axes, then one jitted init with ``out_shardings``
  materialises every array directly on its devices (no host copy of the full model).
* ``make_optimizer``: optax AdamW with warm-up + cosine decay and global-norm clipping from a config.
* ``microbatched_value_and_grad``: a batch's mean loss and gradient computed one slice at a time
  (gradient accumulation), for steps whose activations do not fit at the full batch.
* ``MetricsWriter``: metrics to ``metrics.jsonl`` and TensorBoard event files (tensorboardX; no
  TensorFlow). On resume, records after the restored step are dropped first, so a killed-and-resumed
  run's log equals an uninterrupted one.
* ``Progress``: a tqdm bar with ETA and the latest metrics.
* ``bound_in_flight``: a loop that dispatches steps without reading them keeps at most
  ``MAX_IN_FLIGHT_STEPS`` queued, because XLA:CPU with several (forced host) devices deadlocks in a
  collective once a few dozen sharded executions are queued.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from flax import nnx

from eagle_jax import parallel, paths
from eagle_jax.checks import ConfigError

PyTree = Any


# ---------------------------------------------------------------------------------------------------
# Checks that run before any compute.


def check_workdir(path: str | None, flag: str = "--workdir") -> str:
  """Creates ``path`` if needed and checks it is a writable folder; returns it.

  ``path`` may be local or on any filesystem ``etils.epath`` knows (``gs://bucket/run``); a remote
  one is created through epath (never as a local folder) and its permissions are left to the store.

  Raises:
    ConfigError: naming ``flag`` when the path is empty, a file, or not writable.
  """
  if not path:
    raise ConfigError(f"{flag} is required")
  if paths.exists(path) and not paths.isdir(path):
    raise ConfigError(f"{flag}={path!r} exists and is not a folder")
  try:
    paths.makedirs(path)
  except OSError as e:
    raise ConfigError(f"{flag}={path!r} cannot be created: {e.strerror or e}") from e
  if paths.is_local(path) and not os.access(path, os.W_OK | os.X_OK):
    raise ConfigError(f"{flag}={path!r} is not writable by this user")
  return path


# Programs that compile faster than this are not written to the persistent cache (JAX's default,
# 1 s, would leave out every MiniLM length bucket; a read back takes milliseconds).
CACHE_MIN_COMPILE_SECONDS = 0.1


def use_compilation_cache(path: str, workdir: str, field: str = "config.compilation_cache"
                          ) -> str | None:
  """Turns on XLA's persistent compilation cache for this process; returns its folder.

  ``path``: "" (off), a folder, or a relative path taken under ``workdir``. Identical programs then
  compile once per folder: within a run (the agents of each reference kind share their steps), on
  a rerun or resume, and on every host of a multi-host job. Call it before anything compiles.
  """
  if not isinstance(path, str):
    raise ConfigError(f"{field}: expected a folder path string ('' for off), got {path!r}")
  if not path:
    return None
  folder = path if not paths.is_local(path) or os.path.isabs(path) else os.path.join(workdir, path)
  jax.config.update("jax_compilation_cache_dir", folder)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", CACHE_MIN_COMPILE_SECONDS)
  # JAX's default also points XLA's GPU autotuning cache into the folder, and that setting (its
  # path, and a read-only mode on every process but the first) enters each program's cache key:
  # a copied or moved folder, and every other host, would then never hit.
  jax.config.update("jax_persistent_cache_enable_xla_caches", "none")
  return folder


def build_mesh(mesh_config: Mapping[str, int] | None, field: str = "config.mesh",
               devices: Sequence[jax.Device] | None = None) -> jax.sharding.Mesh:
  """``parallel.make_mesh`` over ``mesh_config`` ({axis: size}, -1 = the rest).

  Raises:
    ConfigError: naming ``field`` (unknown axis, sizes that do not multiply to the devices).
  """
  shape = {k: int(v) for k, v in dict(mesh_config or {"data": -1}).items()}
  try:
    return parallel.make_mesh(shape, devices=devices)
  except ValueError as e:
    raise ConfigError(f"{field}: {e}") from e


def data_parallelism(mesh: jax.sharding.Mesh, rules=parallel.DEFAULT_RULES) -> int:
  """How many shards the logical ``batch`` axis has on ``mesh``."""
  return parallel.axis_size(mesh, "batch", rules)


def check_divisible(value: int, mesh: jax.sharding.Mesh, field: str, microbatches: int = 1,
                    rules=parallel.DEFAULT_RULES) -> None:
  """Raises ``ConfigError`` naming ``field`` unless ``value`` splits into ``microbatches`` slices
  that each split over the batch axes."""
  n = data_parallelism(mesh, rules)
  if value <= 0 or value % (n * microbatches):
    slices = f" x microbatches {microbatches}" if microbatches > 1 else ""
    raise ConfigError(
        f"{field}={value} must be a positive multiple of the mesh's data parallelism {n}{slices} "
        f"(mesh {dict(mesh.shape)}; batch is sharded over data x fsdp)")


# ---------------------------------------------------------------------------------------------------
# NNX module <-> pure pytree, created sharded.


class FunctionalModel:
  """An NNX module as ``apply(params, *args)`` over a pure parameter pytree.

  Attributes:
    graphdef: the module's static structure.
    abstract: ``nnx.State`` of ``ShapeDtypeStruct`` leaves with the variables' logical axes.
    shardings: pure-dict pytree of ``NamedSharding`` (None without a mesh).
  """

  def __init__(self, ctor: Callable[[nnx.Rngs], nnx.Module], *, seed: int = 0,
               mesh: jax.sharding.Mesh | None = None, rules=parallel.DEFAULT_RULES):
    self._ctor = ctor
    self.seed = seed
    self.mesh = mesh
    self.rules = rules
    with nnx.use_eager_sharding(False):
      abstract_module = nnx.eval_shape(lambda: ctor(nnx.Rngs(seed)))
    self.graphdef, self.abstract = nnx.split(abstract_module, nnx.Param)
    self.shardings = None if mesh is None else state_shardings(self.abstract, mesh, rules)

  def init(self) -> PyTree:
    """Fresh parameters (pure dict), created directly with their shardings."""
    def make():
      with nnx.use_eager_sharding(False):
        _, state = nnx.split(self._ctor(nnx.Rngs(self.seed)), nnx.Param)
      return nnx.to_pure_dict(state)

    return jax.jit(make, out_shardings=self.shardings)()

  def abstract_params(self) -> PyTree:
    """``ShapeDtypeStruct`` pytree of the parameters (with shardings if there is a mesh)."""
    pure = nnx.to_pure_dict(self.abstract)
    if self.shardings is None:
      return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), pure)
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        pure, self.shardings)

  def module(self, params: PyTree) -> nnx.Module:
    """The module with ``params`` (usable inside ``jax.jit``)."""
    state = jax.tree.map(lambda x: x, self.abstract)
    nnx.replace_by_pure_dict(state, params)
    return nnx.merge(self.graphdef, state)

  def num_params(self) -> int:
    return int(sum(math.prod(x.shape) for x in jax.tree.leaves(nnx.to_pure_dict(self.abstract))))


def state_shardings(state: nnx.State, mesh: jax.sharding.Mesh, rules=parallel.DEFAULT_RULES
                    ) -> dict:
  """Pure-dict pytree of the ``NamedSharding`` of every variable of ``state`` (by its logical
  axes; a mesh axis that does not divide a dimension is dropped)."""
  return _nested([(path, parallel.variable_sharding(var, var.get_value().shape, mesh, rules))
                  for path, var in nnx.to_flat_state(state)])


def _nested(flat: Sequence[tuple[tuple, Any]]) -> dict:
  out: dict = {}
  for path, value in flat:
    node = out
    for key in path[:-1]:
      node = node.setdefault(key, {})
    node[path[-1]] = value
  return out


def batch_shardings(batch: Mapping[str, Any], mesh: jax.sharding.Mesh,
                    rules=parallel.DEFAULT_RULES) -> dict:
  """Shardings of a batch dict: every array split over its leading (logical ``batch``) axis."""
  return {k: parallel.named_sharding(mesh, ("batch",) + (None,) * (np.ndim(v) - 1), rules)
          for k, v in batch.items()}


# ---------------------------------------------------------------------------------------------------
# Optimizer.


def make_optimizer(config: Mapping[str, Any], total_steps: int) -> optax.GradientTransformation:
  """AdamW, linear warm-up then cosine decay to ``final_lr_fraction``, global-norm clipping.

  Args:
    config: fields ``learning_rate``, ``warmup_steps``, ``final_lr_fraction``, ``weight_decay``,
      ``grad_clip`` (0 = off), ``b1``, ``b2``.
    total_steps: steps of the schedule (>= 1).
  """
  lr = float(config["learning_rate"])
  warmup = int(config.get("warmup_steps", 0))
  total = max(int(total_steps), warmup + 1)
  schedule = optax.warmup_cosine_decay_schedule(
      init_value=0.0 if warmup else lr, peak_value=lr, warmup_steps=warmup, decay_steps=total,
      end_value=lr * float(config.get("final_lr_fraction", 1.0)))
  parts = []
  if float(config.get("grad_clip", 0.0)) > 0:
    parts.append(optax.clip_by_global_norm(float(config["grad_clip"])))
  parts.append(optax.adamw(schedule, b1=float(config.get("b1", 0.9)),
                           b2=float(config.get("b2", 0.999)),
                           weight_decay=float(config.get("weight_decay", 0.0))))
  return optax.chain(*parts)


def global_norm(tree: PyTree) -> jax.Array:
  return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(tree)))


def microbatched_value_and_grad(loss_fn: Callable, microbatches: int, mesh: jax.sharding.Mesh,
                                grad_shardings: PyTree = None, rules=parallel.DEFAULT_RULES
                                ) -> Callable:
  """``jax.value_and_grad(loss_fn, has_aux=True)`` over ``microbatches`` slices of the batch.

  ``loss_fn(params, *args, batch) -> (loss, aux)``, where ``batch`` is a dict of arrays with the
  rows on axis 0 (``[B, ...]``, sharded over the mesh's data axes). The returned function gives the
  mean over the M slices of their ``(loss, aux)`` and gradients, computed one slice after another
  (``lax.scan``), so the step holds the activations of B / M rows. Slice m holds the rows
  ``i = m (mod M)``: with the batch split into contiguous blocks over the data devices, every slice
  stays spread over all of them. When the loss is a mean over rows with the same count per slice
  (the EAGLE loss over B episodes x H steps), this equals the whole-batch value and gradient up to
  float reassociation.

  Args:
    loss_fn: the loss; differentiated with respect to its first argument.
    microbatches: M (1: plain ``value_and_grad``); B must be divisible by M x data parallelism.
    mesh: the device mesh (the slices' sharding).
    grad_shardings: shardings of the gradient (the parameters'), for the accumulator.
  """
  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  if microbatches == 1:
    return grad_fn

  def fn(params, *args):
    *rest, batch = args

    def split(x):  # [B, ...] -> [M, B / M, ...]; slice m = rows m, m + M, ...
      rows = x.shape[0] // microbatches
      x = jax.lax.with_sharding_constraint(
          x.reshape((rows, microbatches) + x.shape[1:]),
          parallel.named_sharding(mesh, ("batch",) + (None,) * x.ndim, rules))
      return jnp.moveaxis(x, 1, 0)

    slices = jax.tree.map(split, batch)
    first = jax.tree.map(lambda x: x[0], slices)
    shapes = jax.eval_shape(grad_fn, params, *rest, first)
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, jnp.float32), shapes)
    if grad_shardings is not None:
      zeros = (zeros[0], jax.lax.with_sharding_constraint(zeros[1], grad_shardings))

    def body(total, piece):
      out = grad_fn(params, *rest, piece)
      return jax.tree.map(lambda t, x: t + x.astype(jnp.float32), total, out), None

    total, _ = jax.lax.scan(body, zeros, slices)
    return jax.tree.map(lambda t, s: (t / microbatches).astype(s.dtype), total, shapes)

  return fn


# ---------------------------------------------------------------------------------------------------
# Queued steps.


# Steps a loop may leave queued before it waits. XLA:CPU with forced host devices parks each queued
# execution's launch on a per-device semaphore; past its capacity, one device's launch of step n
# waits while the other devices' step n blocks in its all-reduce, and the process hangs until XLA's
# rendezvous timeout aborts it. Eight keeps the host ahead of the devices without reaching that.
MAX_IN_FLIGHT_STEPS = 8


def bound_in_flight(outputs: Sequence[PyTree]) -> None:
  """Waits for ``outputs[-MAX_IN_FLIGHT_STEPS - 1]`` (a step's output pytree, oldest first) if
  that many steps are queued, so at most ``MAX_IN_FLIGHT_STEPS`` of a loop's steps run ahead."""
  if len(outputs) > MAX_IN_FLIGHT_STEPS:
    jax.block_until_ready(outputs[-MAX_IN_FLIGHT_STEPS - 1])


# ---------------------------------------------------------------------------------------------------
# Metrics and progress.


def _scalar(v: Any) -> float | int | str | bool:
  if isinstance(v, (str, bool, int)):
    return v
  return float(np.asarray(v))


class MetricsWriter:
  """JSONL + TensorBoard metrics of one run folder.

  ``metrics.jsonl`` holds one ``{"step": s, "phase": ..., name: value}`` object per line.
  """

  def __init__(self, workdir: str, *, resume_step: int | None = None, tensorboard: bool = True,
               is_primary: bool | None = None):
    self.path = os.path.join(workdir, "metrics.jsonl")
    self.primary = jax.process_index() == 0 if is_primary is None else is_primary
    self._tb = None
    if not self.primary:
      return
    paths.makedirs(workdir)
    kept = [r for r in read_metrics(self.path)
            if resume_step is not None and r["step"] <= resume_step]
    paths.write_text(self.path, "".join(json.dumps(r) + "\n" for r in kept))
    scheme = os.fspath(workdir).partition("://")[0] if not paths.is_local(workdir) else None
    if tensorboard and scheme not in (None, "gs", "s3"):
      # tensorboardX writes local folders, gs:// and s3:// only; anything else would become a
      # local folder named like the scheme.
      logging.warning("metrics: no TensorBoard events for %s (tensorboardX cannot write %s://)",
                      workdir, scheme)
    elif tensorboard:
      from tensorboardX import SummaryWriter  # noqa: PLC0415 (optional heavy import)

      self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"), purge_step=(
          None if resume_step is None else resume_step + 1))

  def write(self, step: int, metrics: Mapping[str, Any], phase: str = "train") -> dict[str, Any]:
    record = {"step": int(step), "phase": phase,
              **{k: _scalar(v) for k, v in metrics.items()}}
    if self.primary:
      paths.append_bytes(self.path, (json.dumps(record) + "\n").encode("utf-8"))
      if self._tb is not None:
        for k, v in record.items():
          if k not in ("step", "phase") and isinstance(v, (int, float)) and not isinstance(v, bool):
            self._tb.add_scalar(f"{phase}/{k}", v, int(step))
    return record

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()
      self._tb = None


def read_metrics(path: str) -> list[dict[str, Any]]:
  """The records of a ``metrics.jsonl`` (empty if missing; a torn last line is ignored)."""
  if not paths.exists(path):
    return []
  out = []
  for line in paths.read_text(path).splitlines():
    try:
      out.append(json.loads(line))
    except json.JSONDecodeError:
      break
  return out


class Progress:
  """A tqdm bar over steps ``[initial, total)`` with ETA and a few metrics in the postfix."""

  def __init__(self, total: int, *, initial: int = 0, desc: str = "train",
               keys: Sequence[str] = ()):
    from tqdm.auto import tqdm  # noqa: PLC0415

    self.keys = tuple(keys)
    self._bar = tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True,
                     mininterval=2.0, disable=jax.process_index() != 0)

  def update(self, n: int = 1, metrics: Mapping[str, Any] | None = None) -> None:
    if metrics:
      self._bar.set_postfix({k: f"{float(metrics[k]):.4g}" for k in self.keys if k in metrics},
                            refresh=False)
    self._bar.update(n)

  def close(self) -> None:
    self._bar.close()


def quiet_library_logs() -> None:
  """Drops orbax's INFO lines (dozens per checkpoint) from the absl log; warnings still show."""
  import logging as py_logging  # noqa: PLC0415

  from absl import logging as absl_logging  # noqa: PLC0415

  class _Filter(py_logging.Filter):
    def filter(self, record: py_logging.LogRecord) -> bool:
      return record.levelno >= py_logging.WARNING or "orbax" not in record.pathname

  absl_logging.get_absl_handler().addFilter(_Filter())
