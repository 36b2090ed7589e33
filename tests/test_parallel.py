"""Mesh construction and logical-axis mapping."""

import os
import subprocess
import sys

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


_QUEUED_STEPS = """
import sys
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
from eagle_jax import training

mesh = jax.make_mesh((8,), ("data",))
@jax.jit
def step(w, x):
  g = jnp.mean(jnp.tanh(x @ w), axis=0)  # a mean over the sharded rows: an all-reduce
  return w - 0.01 * g[None, :], g.sum()
rng = np.random.default_rng(0)
w0, x0 = rng.normal(size=(16, 16)).astype(np.float32), rng.normal(size=(64, 16)).astype(np.float32)
w = jax.device_put(w0, NamedSharding(mesh, P()))
x = jax.device_put(x0, NamedSharding(mesh, P("data")))
outs = []
for _ in range(200):
  w, s = step(w, x)
  outs.append(s)
  training.bound_in_flight(outs)
ref = w0.astype(np.float64)
for _ in range(200):
  ref = ref - 0.01 * np.tanh(x0 @ ref).mean(0)[None, :]
np.testing.assert_allclose(np.asarray(w), ref, rtol=1e-4, atol=1e-5)
print("ok", float(s))
"""


def test_bounded_queue_of_sharded_steps_finishes_on_forced_host_devices(tmp_path):
  # 200 steps dispatched without reading them, 8 forced host devices, an all-reduce per step: the
  # bounded queue must finish (an unbounded one hangs in the all-reduce, and XLA's rendezvous
  # timeout, 60 s here, aborts the process) with the float64 NumPy iterate.
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8 "
             "--xla_cpu_collective_call_terminate_timeout_seconds=60")
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  proc = subprocess.run([sys.executable, "-c", _QUEUED_STEPS], cwd=root, env=env,
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0 and proc.stdout.startswith("ok"), proc.stderr[-2000:]
