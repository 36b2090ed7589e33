"""Checkpoints of (step, pytree state, JSON metadata) with orbax, and automatic resume.

A thin wrapper over ``orbax.checkpoint.CheckpointManager`` shared by every trainer (WALS, EAGLE,
ELM): each step is saved as a composite of ``state`` (``StandardSave`` of any pytree of arrays) and
``meta`` (``JsonSave`` of a JSON-serialisable dict: config, history, data provenance). The layout on
disk is orbax's ``<dir>/<step>/{state,meta}``; the newest ``max_to_keep`` steps are kept.

Resume: ``restore_or_init(init_fn)`` restores the latest step of the directory if there is one,
otherwise calls ``init_fn``. Restores take an abstract target (``jax.ShapeDtypeStruct`` leaves, e.g.
from ``jax.eval_shape``) and optional shardings, so a run saved on one mesh restores re-sharded on
another. Never unpickles anything: orbax stores arrays as tensorstore/OCDBT and metadata as JSON.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

PyTree = Any


def abstract_like(tree: PyTree, shardings: PyTree | None = None) -> PyTree:
  """``ShapeDtypeStruct`` leaves for ``tree`` (arrays or structs), with ``shardings`` if given.

  Args:
    tree: pytree whose leaves have ``shape`` and ``dtype``.
    shardings: ``None``, one ``jax.sharding.Sharding`` for every leaf, or a pytree of them matching
      ``tree``.
  """
  def one(x, s=None):
    return jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=s)

  if shardings is None:
    return jax.tree.map(one, tree)
  if isinstance(shardings, jax.sharding.Sharding):
    return jax.tree.map(lambda x: one(x, shardings), tree)
  return jax.tree.map(one, tree, shardings)


class Checkpointer:
  """Saves and restores ``(step, state, metadata)`` in one directory.

  Example::

    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), max_to_keep=2)
    step, state, meta = ckpt.restore_or_init(lambda: (0, init_state(), {}), target=abstract)
    ...
    ckpt.save(step, state, {"history": history})
    ckpt.close()
  """

  def __init__(self, directory: str | os.PathLike, *, max_to_keep: int | None = 2,
               save_interval_steps: int = 1, async_save: bool = False):
    """Opens (creating if needed) the checkpoint directory.

    Args:
      directory: where the steps live.
      max_to_keep: newest steps kept (``None``: all).
      save_interval_steps: ``save`` writes only steps that are multiples of this (unless forced).
      async_save: write in a background thread (call ``wait`` before reading the files).
    """
    if max_to_keep is not None and max_to_keep < 1:
      raise ValueError(f"max_to_keep must be >= 1 or None, got {max_to_keep}")
    if save_interval_steps < 1:
      raise ValueError(f"save_interval_steps must be >= 1, got {save_interval_steps}")
    self.directory = os.path.abspath(os.fspath(directory))
    self._manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, save_interval_steps=save_interval_steps, create=True,
            enable_async_checkpointing=async_save))

  def latest_step(self) -> int | None:
    """The newest saved step, or ``None`` when the directory has none."""
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def save(self, step: int, state: PyTree, metadata: dict[str, Any] | None = None, *,
           force: bool = False) -> bool:
    """Saves ``state`` and ``metadata`` as ``step``. Returns whether a checkpoint was written."""
    if step < 0:
      raise ValueError(f"step must be >= 0, got {step}")
    return self._manager.save(
        int(step), args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(dict(metadata or {}))),
        force=force)

  def restore(self, step: int | None = None, *, target: PyTree | None = None,
              shardings: PyTree | None = None) -> tuple[int, PyTree, dict[str, Any]]:
    """Restores ``step`` (default: the latest).

    Args:
      step: which step.
      target: the state's structure: concrete arrays or ``ShapeDtypeStruct`` leaves. ``None``
        restores the saved structure as numpy-backed arrays.
      shardings: placement of the restored leaves (see ``abstract_like``); needs ``target``.

    Returns:
      ``(step, state, metadata)``.

    Raises:
      FileNotFoundError: no such step in the directory.
    """
    step = self.latest_step() if step is None else int(step)
    if step is None or step not in self._manager.all_steps():
      raise FileNotFoundError(f"no checkpoint step {step} in {self.directory} "
                              f"(have {self.all_steps()})")
    if shardings is not None and target is None:
      raise ValueError("restore: shardings needs a target")
    if target is None:
      state_args = ocp.args.StandardRestore()
    else:
      if shardings is None:  # keep the target's own placement, else the first device
        default = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        shardings = jax.tree.map(lambda x: getattr(x, "sharding", None) or default, target)
      state_args = ocp.args.StandardRestore(abstract_like(target, shardings))
    out = self._manager.restore(step, args=ocp.args.Composite(
        state=state_args, meta=ocp.args.JsonRestore()))
    return step, out["state"], dict(out["meta"] or {})

  def metadata(self, step: int | None = None) -> dict[str, Any]:
    """The JSON metadata of ``step`` (default: the latest) without reading the arrays."""
    step = self.latest_step() if step is None else int(step)
    if step is None or step not in self._manager.all_steps():
      raise FileNotFoundError(f"no checkpoint step {step} in {self.directory} "
                              f"(have {self.all_steps()})")
    out = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
    return dict(out["meta"] or {})

  def restore_or_init(
      self, init_fn: Callable[[], tuple[int, PyTree, dict[str, Any]]], *,
      target: PyTree | None = None, shardings: PyTree | None = None,
  ) -> tuple[int, PyTree, dict[str, Any]]:
    """The latest checkpoint if any (automatic resume), else ``init_fn() -> (step, state, meta)``."""
    if self.latest_step() is None:
      return init_fn()
    return self.restore(target=target, shardings=shardings)

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()

  def __enter__(self) -> Checkpointer:
    return self

  def __exit__(self, *exc) -> None:
    self.close()
