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
    devices: devices to use, in this order (default: all of ``jax.devices()``, arranged by
      ``jax.make_mesh`` to follow the physical topology).

  Returns:
    A ``Mesh`` with axes ``MESH_AXES`` in that order.

  Raises:
    ValueError: an unknown axis, more than one -1, or sizes that do not multiply to the device count.
  """
  explicit = devices is not None
  devices = list(devices if explicit else jax.devices())
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
  axis_types = (AxisType.Auto,) * len(MESH_AXES)
  if explicit:
    grid = np.asarray(devices, dtype=object).reshape(sizes)
    return Mesh(grid, MESH_AXES, axis_types=axis_types)
  # All devices: ``jax.make_mesh`` orders them by the physical topology (TPU ICI rings).
  return jax.make_mesh(tuple(sizes), MESH_AXES, axis_types=axis_types)


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


def fit_spec(
    shape: Sequence[int],
    logical_axes: Sequence[str | None],
    mesh,
    rules: LogicalRules = DEFAULT_RULES,
) -> PartitionSpec:
  """Like ``logical_to_spec``, but drops mesh axes that ``mesh`` lacks or that do not divide.

  Real checkpoints have dimensions no mesh size divides (SmolLM2's 9 heads, MiniLM's 30,522-row
  vocabulary); such a dimension is replicated over the offending axis instead of failing.

  Args:
    shape: the array's shape.
    logical_axes: one logical name (or None) per dimension.
    mesh: a ``Mesh`` or ``AbstractMesh``.
    rules: logical axis rules.
  """
  if len(shape) != len(logical_axes):
    raise ValueError(f"fit_spec: shape {tuple(shape)} has {len(shape)} dims but logical_axes "
                     f"{tuple(logical_axes)} has {len(logical_axes)}")
  spec = logical_to_spec(logical_axes, rules)
  out = []
  for dim, entry in zip(shape, spec):
    names = () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)
    kept, size = [], 1
    for n in names:
      if n in mesh.shape and dim % (size * mesh.shape[n]) == 0:
        kept.append(n)
        size *= mesh.shape[n]
    out.append(None if not kept else kept[0] if len(kept) == 1 else tuple(kept))
  return PartitionSpec(*out)


def constrain(
    x: jax.Array, logical_axes: Sequence[str | None], rules: LogicalRules = DEFAULT_RULES
) -> jax.Array:
  """``with_sharding_constraint`` by logical names under ``jax.set_mesh``; the identity without."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return x
  return jax.lax.with_sharding_constraint(x, fit_spec(x.shape, logical_axes, mesh, rules))


def variable_axes(variable) -> tuple | None:
  """Logical axes recorded on an NNX variable by ``nnx.with_partitioning`` (None if absent)."""
  meta = variable.get_metadata() if hasattr(variable, "get_metadata") else {}
  axes = meta.get("out_sharding") or meta.get("sharding_names") or meta.get("sharding")
  return tuple(axes) if axes else None


def variable_sharding(
    variable, shape: Sequence[int], mesh: Mesh, rules: LogicalRules = DEFAULT_RULES
) -> NamedSharding:
  """``NamedSharding`` of an NNX variable of ``shape`` from its logical axes (replicated if none)."""
  axes = variable_axes(variable) or (None,) * len(shape)
  return NamedSharding(mesh, fit_spec(shape, axes, mesh, rules))


def shard_module(module, mesh: Mesh, rules: LogicalRules = DEFAULT_RULES):
  """Places every variable of an NNX module on ``mesh`` by its logical axes (in place; returns it)."""
  from flax import nnx  # Local import: the mesh helpers above do not need flax.

  flat = []
  for path, var in nnx.to_flat_state(nnx.state(module)):
    value = var.get_value()
    sharding = variable_sharding(var, value.shape, mesh, rules)
    flat.append((path, var.replace(jax.device_put(value, sharding))))
  nnx.update(module, nnx.from_flat_state(flat))
  return module
