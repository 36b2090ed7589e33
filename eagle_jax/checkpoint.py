"""Checkpoints of (step, pytree state, JSON metadata) with orbax, resume, and damaged-step fallback.

A thin wrapper over ``orbax.checkpoint.CheckpointManager`` shared by every trainer (WALS, EAGLE,
ELM, E_D): each step is saved as a composite of ``state`` (``StandardSave`` of any pytree of
arrays), ``meta`` (``JsonSave`` of a JSON-serialisable dict: config, history, data provenance) and
``digest`` (``JsonSave`` of one fingerprint per state leaf). The layout on disk is orbax's
``<dir>/<step>/{state,meta,digest}``; the newest ``max_to_keep`` steps are kept.

Resume: ``restore_or_init(init_fn)`` restores the newest step of the directory if there is one,
otherwise calls ``init_fn``. Restores take an abstract target (``jax.ShapeDtypeStruct`` leaves, e.g.
from ``jax.eval_shape``) and optional shardings, so a run saved on one mesh restores re-sharded on
another. Never unpickles anything: orbax stores arrays as tensorstore/OCDBT and metadata as JSON.

Damaged steps: a step whose files are truncated, missing or corrupt fails to restore (any orbax or
tensorstore error) or restores arrays whose fingerprints differ from the saved ones (orbax's
compressed chunks carry no checksum, so overwritten bytes inside a chunk read back silently as
wrong values). ``restore`` and ``metadata`` without an explicit step then log a warning naming the
step and its path and fall back to the newest intact older step; when none is intact they raise
``CheckpointError`` (one line: the directory, each step with its reason, the way out). The damaged
steps are moved to ``<dir>/damaged/`` before the next save, so the resumed run can save those step
numbers again. Folders of interrupted saves (``<step>.orbax-checkpoint-tmp-*``) are never read
and are removed before the first save.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

from eagle_jax import paths

PyTree = Any
TMP_MARKER = ".orbax-checkpoint-tmp"
DAMAGED_DIR = "damaged"


class CheckpointError(RuntimeError):
  """No intact checkpoint step could be restored; the message is one line for launchers."""


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


_UINT = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint32}


def _leaf_fingerprint(x: jax.Array) -> jax.Array:
  """Two position-mixed uint32 sums of the leaf's bytes: ``[2] uint32`` (order-sensitive)."""
  if x.dtype == jnp.bool_:
    u = x.astype(jnp.uint32)
  else:
    u = jax.lax.bitcast_convert_type(x, _UINT[x.dtype.itemsize]).astype(jnp.uint32)
  u = u.reshape(-1)
  i = jnp.arange(u.size, dtype=jnp.uint32)
  a = jnp.sum((u ^ (i * jnp.uint32(0x9E3779B1))) * jnp.uint32(0x85EBCA6B), dtype=jnp.uint32)
  b = jnp.sum((u + i) * jnp.uint32(0xC2B2AE35) ^ (u >> 7), dtype=jnp.uint32)
  return jnp.stack([a, b])


# One program per leaf: leaves of one tree may live on different device sets (a restore without a
# target places each leaf as it was saved), which a single jitted call over all leaves refuses.
_fingerprint = jax.jit(_leaf_fingerprint)


def _fingerprintable(x) -> bool:
  try:
    dtype = np.dtype(x.dtype)
  except TypeError:  # typed PRNG keys and other extended dtypes
    return False
  return dtype == np.bool_ or (dtype.itemsize in _UINT and dtype.kind in "iufV")


def _path_name(path) -> str:
  """``a/0/mu``-style name of a tree path, the same for a dict, list or namedtuple node (orbax
  restores every node as a dict when no target is given)."""
  parts = []
  for k in path:
    for attr in ("key", "name", "idx"):
      if hasattr(k, attr):
        parts.append(str(getattr(k, attr)))
        break
    else:
      parts.append(str(k))
  return "/".join(parts)


def digest(tree: PyTree) -> dict[str, dict[str, Any]]:
  """Fingerprint of every leaf of ``tree``: ``{path: {"dtype", "shape", "fp": [2] ints}}``.

  Leaves of other dtypes (complex, typed PRNG keys) get ``fp=None`` and are not checked.
  """
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  todo = [i for i, (_, x) in enumerate(flat) if _fingerprintable(x)]
  fps = jax.device_get([_fingerprint(jnp.asarray(flat[i][1])) for i in todo])
  out = {_path_name(p): {"dtype": str(getattr(x, "dtype", "")), "shape": list(np.shape(x)),
                         "fp": None} for p, x in flat}
  for i, fp in zip(todo, fps):
    out[_path_name(flat[i][0])]["fp"] = [int(v) for v in np.asarray(fp)]
  return out


def _digest_mismatch(saved: dict[str, dict[str, Any]], state: PyTree) -> str | None:
  """Why ``state`` differs from its saved digest (``None``: it matches where comparable)."""
  for path, b in digest(state).items():
    a = saved.get(path)
    if a is None or a.get("fp") is None or a.get("dtype") != b["dtype"] or (
        list(a.get("shape", [])) != b["shape"]):
      continue  # another structure, dtype or shape on request: not comparable
    if list(a["fp"]) != b["fp"]:
      return f"state leaf {path or '<root>'} does not match its saved fingerprint (corrupt data)"
  return None


def _short(e: BaseException, limit: int = 160) -> str:
  """One line naming the innermost cause of ``e`` (orbax wraps tensorstore's error)."""
  while e.__cause__ is not None:
    e = e.__cause__
  text = " ".join(str(e).split()) or type(e).__name__
  text = text if len(text) <= limit else text[:limit - 3] + "..."
  return f"{type(e).__name__}: {text}"


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
      directory: where the steps live: a local folder or any path orbax and ``etils.epath``
        take (``gs://bucket/run/checkpoints``).
      max_to_keep: newest steps kept (``None``: all).
      save_interval_steps: ``save`` writes only steps that are multiples of this (unless forced).
      async_save: write in a background thread (call ``wait`` before reading the files).
    """
    if max_to_keep is not None and max_to_keep < 1:
      raise ValueError(f"max_to_keep must be >= 1 or None, got {max_to_keep}")
    if save_interval_steps < 1:
      raise ValueError(f"save_interval_steps must be >= 1, got {save_interval_steps}")
    self.directory = paths.absolute(directory)
    self._manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, save_interval_steps=save_interval_steps, create=True,
            enable_async_checkpointing=async_save))
    self._damaged: dict[int, str] = {}  # step -> reason, found by restore / metadata
    self._saved_once = False

  def step_path(self, step: int) -> str:
    return os.path.join(self.directory, str(int(step)))

  def latest_step(self) -> int | None:
    """The newest saved step not found damaged, or ``None`` when the directory has none."""
    steps = self.all_steps()
    return steps[-1] if steps else None

  def all_steps(self) -> list[int]:
    """Saved steps, oldest first, without those found damaged (or interrupted saves)."""
    return sorted(s for s in self._manager.all_steps() if s not in self._damaged)

  def damaged_steps(self) -> dict[int, str]:
    """Steps found damaged by ``restore`` / ``metadata`` so far: ``{step: reason}``."""
    return dict(self._damaged)

  # -- save ----------------------------------------------------------------------------------------

  def save(self, step: int, state: PyTree, metadata: dict[str, Any] | None = None, *,
           force: bool = False) -> bool:
    """Saves ``state`` and ``metadata`` as ``step``. Returns whether a checkpoint was written."""
    if step < 0:
      raise ValueError(f"step must be >= 0, got {step}")
    if not self._saved_once:
      self._prepare_for_writing()
    elif self._damaged:
      self._quarantine_damaged()
    self._saved_once = True
    return self._manager.save(
        int(step), args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(dict(metadata or {})),
            digest=ocp.args.JsonSave({"leaves": digest(state)})),
        force=force)

  def _prepare_for_writing(self) -> None:
    """Before the first save: removes interrupted saves' folders and moves damaged steps aside."""
    if jax.process_index() == 0:
      root = paths.path(self.directory)
      for tmp in sorted(root.glob(f"*{TMP_MARKER}*")) if root.exists() else ():
        logging.warning("checkpoint: removing %s, left by an interrupted save", tmp)
        try:
          tmp.rmtree()
        except OSError as e:
          logging.warning("checkpoint: could not remove %s: %s", tmp, e)
    self._quarantine_damaged()

  def _quarantine_damaged(self) -> None:
    if not self._damaged:
      return
    if jax.process_index() == 0:
      dest_root = os.path.join(self.directory, DAMAGED_DIR)
      paths.makedirs(dest_root)
      for step in sorted(self._damaged):
        src = self.step_path(step)
        if paths.exists(src):
          dest = os.path.join(dest_root, f"{step}-{time.strftime('%Y%m%dT%H%M%S')}")
          paths.path(src).replace(dest)
          logging.warning("checkpoint: moved damaged step %d to %s", step, dest)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # noqa: PLC0415
      multihost_utils.sync_global_devices("eagle_jax.checkpoint.quarantine")
    self._damaged.clear()
    self._manager.reload()

  # -- restore -------------------------------------------------------------------------------------

  def restore(self, step: int | None = None, *,
              target: PyTree | Callable[[dict[str, Any]], PyTree] | None = None,
              shardings: PyTree | None = None) -> tuple[int, PyTree, dict[str, Any]]:
    """Restores ``step``; by default the newest intact step, falling back past damaged ones.

    Args:
      step: which step; ``None``: the newest step that restores intact (a warning names every
        damaged step skipped).
      target: the state's structure: concrete arrays or ``ShapeDtypeStruct`` leaves, or a function
        of the step's metadata returning one (when the structure depends on it). ``None``
        restores the saved structure as numpy-backed arrays.
      shardings: placement of the restored leaves (see ``abstract_like``); needs ``target``.

    Returns:
      ``(step, state, metadata)``.

    Raises:
      FileNotFoundError: no such step (or no step at all) in the directory.
      CheckpointError: the requested step, or every step, is damaged.
    """
    if shardings is not None and target is None:
      raise ValueError("restore: shardings needs a target")
    return self._first_intact(step, lambda s: self._restore_step(s, target, shardings))

  def metadata(self, step: int | None = None) -> dict[str, Any]:
    """The JSON metadata of ``step`` (default: the newest step whose metadata reads) alone."""
    return self._first_intact(step, self._read_meta)[2]

  def restore_or_init(
      self, init_fn: Callable[[], tuple[int, PyTree, dict[str, Any]]], *,
      target: PyTree | None = None, shardings: PyTree | None = None,
  ) -> tuple[int, PyTree, dict[str, Any]]:
    """The newest intact checkpoint if any (automatic resume), else ``init_fn()``.

    Raises:
      CheckpointError: the directory has steps and every one of them is damaged.
    """
    if self.latest_step() is None:
      return init_fn()
    return self.restore(target=target, shardings=shardings)

  def _first_intact(self, step: int | None, read: Callable[[int], tuple]) -> tuple:
    if step is not None:
      step = int(step)
      if step not in self._manager.all_steps():
        raise FileNotFoundError(f"no checkpoint step {step} in {self.directory} "
                                f"(have {self.all_steps()})")
      try:
        return read(step)
      except Exception as e:  # noqa: BLE001  (any orbax / tensorstore / JSON error)
        raise CheckpointError(f"checkpoint step {step} at {self.step_path(step)} is damaged "
                              f"({_short(e)})") from e
    candidates = self.all_steps()[::-1]
    if not candidates:
      raise FileNotFoundError(f"no checkpoint step in {self.directory}")
    for s in candidates:
      try:
        out = read(s)
      except Exception as e:  # noqa: BLE001  (any orbax / tensorstore / JSON error)
        self._damaged[s] = _short(e)
        logging.warning("checkpoint step %d at %s is damaged (%s); trying the next older step",
                        s, self.step_path(s), self._damaged[s])
        continue
      if s != candidates[0]:
        logging.warning("checkpoint: restored step %d of %s instead of damaged step(s) %s", s,
                        self.directory, [c for c in candidates if c > s])
      return out
    broken = "; ".join(f"step {s}: {self._damaged[s]}" for s in candidates)
    raise CheckpointError(
        f"no intact checkpoint in {self.directory}: {broken}. Delete {self.directory} to start "
        "over (if the steps are intact, check that the config matches the run that wrote them)")

  def _read_meta(self, step: int) -> tuple[int, None, dict[str, Any]]:
    out = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
    meta = out["meta"]
    if meta is not None and not isinstance(meta, dict):
      raise ValueError(f"meta is a {type(meta).__name__}, expected a JSON object")
    return step, None, dict(meta or {})

  def _restore_step(self, step: int, target, shardings) -> tuple[int, PyTree, dict[str, Any]]:
    meta = self._read_meta(step)[2]
    if callable(target):
      target = target(meta)
    if target is None:
      # The saved placement names the writer's devices, which may not exist here (another
      # process's, or a run on another mesh): restore the saved structure on this process.
      saved = ocp.StandardCheckpointHandler().metadata(
          paths.path(self.step_path(step)) / "state").tree
      target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype), saved)
    if shardings is None:  # keep the target's own placement, else the first local device
      default = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
      shardings = jax.tree.map(lambda x: getattr(x, "sharding", None) or default, target)
    items = {"state": ocp.args.StandardRestore(abstract_like(target, shardings))}
    has_digest = paths.isdir(os.path.join(self.step_path(step), "digest"))
    if has_digest:  # (steps saved before fingerprints existed have none)
      items["digest"] = ocp.args.JsonRestore()
    out = self._manager.restore(step, args=ocp.args.Composite(**items))
    if has_digest:
      leaves = (out["digest"] or {}).get("leaves")
      if not isinstance(leaves, dict):
        raise ValueError("digest holds no 'leaves' object")
      mismatch = _digest_mismatch(leaves, out["state"])
      if mismatch:
        raise ValueError(mismatch)
    return step, out["state"], meta

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()

  def __enter__(self) -> Checkpointer:
    return self

  def __exit__(self, *exc) -> None:
    self.close()
