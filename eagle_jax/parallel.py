"""Mesh construction, logical axis rules and named shardings.

Every sharded computation in eagle_jax is a ``jax.jit`` with ``NamedSharding`` in/out shardings over a
``Mesh`` whose axes are a subset of ``("data", "fsdp", "tensor")``. Arrays are annotated with *logical*
axis names (``batch``, ``embed``, ``mlp``, ``heads``, ``kv``, ``vocab``, ...) and mapped to mesh axes by
rules, as in maxtext and t5x, so one model definition serves CPU, a GPU host and a TPU pod slice.

The mesh is built with ``AxisType.Auto`` (classic GSPMD propagation). ``jax.make_mesh`` defaults to
Explicit axes since jax 0.7, under which contracting a sharded dimension needs an explicit
``out_sharding`` everywhere; Auto keeps model code free of that (ENVIRONMENT_FINDINGS.md, section 3).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MESH_AXES: tuple[str, ...] = ("data", "fsdp", "tensor")

# Logical axis -> mesh axis (or axes, or None for replicated). First match wins, as in flax.
LogicalRules = Sequence[tuple[str, str | tuple[str, ...] | None]]

DEFAULT_RULES: LogicalRules = (
    ("batch", ("data", "fsdp")),  # Examples / rows / episodes: data parallel plus FSDP.
    ("rows", ("data", "fsdp")),  # Rows of a factor matrix (users or items in WALS).
    ("embed", "fsdp"),  # Model width: parameters sharded over fsdp.
    ("mlp", "tensor"),  # MLP hidden units: tensor parallel.
    ("heads", "tensor"),  # Attention query heads.
    ("kv_heads", "tensor"),  # Attention key/value heads (GQA).
    ("kv", None),  # Per-head feature dimension.
    ("vocab", "tensor"),  # Vocabulary (embedding rows, logits).
    ("length", None),  # Sequence positions.
    ("latent", None),  # Behavioural latent dimension (small, replicated).
    ("actions", None),  # Candidate actions per state.
)


def make_mesh(
    shape: Mapping[str, int] | None = None,
    *,
    devices: Sequence[jax.Device] | None = None,
) -> Mesh:
  """Builds a mesh with Auto axis types.

  Args:
    shape: mesh axis name -> size, over ``MESH_AXES``. A size of -1 absorbs the remaining devices
      (at most one). ``None`` means all devices on ``data``. Axes not given get size 1.
    devices: devices to use (default: all of ``jax.devices()``).

  Returns:
    A ``Mesh`` with axes ``MESH_AXES`` in that order.

  Raises:
    ValueError: an unknown axis, more than one -1, or sizes that do not multiply to the device count.
  """
  devices = list(devices if devices is not None else jax.devices())
  shape = dict(shape or {"data": -1})
  unknown = set(shape) - set(MESH_AXES)
  if unknown:
    raise ValueError(f"mesh shape: unknown axes {sorted(unknown)}; expected a subset of {MESH_AXES}")
  sizes = [int(shape.get(a, 1)) for a in MESH_AXES]
  if sizes.count(-1) > 1:
    raise ValueError(f"mesh shape {shape}: at most one axis may be -1")
  if any(s == 0 or s < -1 for s in sizes):
    raise ValueError(f"mesh shape {shape}: sizes must be positive (or -1 for the rest)")
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if len(devices) % known:
      raise ValueError(
          f"mesh shape {shape}: fixed axes multiply to {known}, which does not divide the "
          f"{len(devices)} devices")
    sizes[sizes.index(-1)] = len(devices) // known
  if math.prod(sizes) != len(devices):
    raise ValueError(
        f"mesh shape {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} devices, but "
        f"{len(devices)} are available")
  grid = np.asarray(devices, dtype=object).reshape(sizes)
  return Mesh(grid, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def logical_to_spec(
    logical_axes: Sequence[str | None], rules: LogicalRules = DEFAULT_RULES
) -> PartitionSpec:
  """Maps logical axis names to a ``PartitionSpec``; a mesh axis is used at most once."""
  table = dict(reversed(list(rules)))  # first rule wins
  used: set[str] = set()
  out = []
  for name in logical_axes:
    if name is None:
      out.append(None)
      continue
    if name not in table:
      raise ValueError(f"logical axis {name!r} has no rule; known: {sorted(table)}")
    target = table[name]
    axes = (target,) if isinstance(target, str) else tuple(target or ())
    axes = tuple(a for a in axes if a not in used)
    used.update(axes)
    out.append(None if not axes else axes[0] if len(axes) == 1 else axes)
  return PartitionSpec(*out)


def named_sharding(
    mesh: Mesh, logical_axes: Sequence[str | None], rules: LogicalRules = DEFAULT_RULES
) -> NamedSharding:
  """``NamedSharding`` on ``mesh`` for an array with the given logical axes."""
  return NamedSharding(mesh, logical_to_spec(logical_axes, rules))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def axis_size(mesh: Mesh, logical_axis: str, rules: LogicalRules = DEFAULT_RULES) -> int:
  """Number of shards the logical axis is split into on ``mesh``."""
  spec = logical_to_spec([logical_axis], rules)[0]
  if spec is None:
    return 1
  names = (spec,) if isinstance(spec, str) else spec
  return math.prod(mesh.shape[n] for n in names)
