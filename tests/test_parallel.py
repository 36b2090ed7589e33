"""Mesh construction and logical-axis mapping."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from eagle_jax import parallel


def test_make_mesh_shapes_and_errors():
  mesh = parallel.make_mesh({"data": 2, "fsdp": -1, "tensor": 2})
  assert dict(mesh.shape) == {"data": 2, "fsdp": jax.device_count() // 4, "tensor": 2}
  with pytest.raises(ValueError, match="unknown axes"):
    parallel.make_mesh({"model": 2})
  with pytest.raises(ValueError, match="does not divide"):
    parallel.make_mesh({"data": 3, "fsdp": -1})
  with pytest.raises(ValueError, match="needs 16 devices"):
    parallel.make_mesh({"data": 16})


def test_logical_rules_and_divisibility():
  assert parallel.logical_to_spec(["batch", "embed"]) == P(("data", "fsdp"), None)  # fsdp used once
  assert parallel.logical_to_spec(["embed", "mlp"]) == P("fsdp", "tensor")
  with pytest.raises(ValueError, match="no rule"):
    parallel.logical_to_spec(["nonsense"])
  mesh = parallel.make_mesh({"fsdp": 2, "tensor": 4})
  # 9 heads: tensor=4 does not divide, so that dimension is replicated; 576 = 2 * 288 keeps fsdp.
  assert parallel.fit_spec((576, 9, 64), ("embed", "heads", "kv"), mesh) == P("fsdp", None, None)
  assert parallel.fit_spec((576, 12, 64), ("embed", "heads", "kv"), mesh) == P("fsdp", "tensor", None)
  with pytest.raises(ValueError, match="dims"):
    parallel.fit_spec((4, 4), ("embed",), mesh)


def test_constrain_is_identity_without_mesh_and_shards_under_one():
  x = jnp.arange(64.0).reshape(8, 8)
  assert parallel.constrain(x, ("batch", None)) is x
  mesh = parallel.make_mesh({"data": -1})
  with jax.set_mesh(mesh):
    y = jax.jit(lambda a: parallel.constrain(a * 2, ("batch", None)))(x)
  np.testing.assert_array_equal(y, 2 * np.arange(64.0).reshape(8, 8))
  expected = jax.sharding.NamedSharding(mesh, P("data", None))
  assert y.sharding.is_equivalent_to(expected, 2)
  assert {s.data.shape for s in y.addressable_shards} == {(8 // jax.device_count(), 8)}
