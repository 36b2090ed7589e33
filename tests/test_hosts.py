"""Multi-process data placement (``eagle_jax/hosts.py``) in two real CPU processes on loopback,
checked against numpy on the whole batch; and the identity on one process."""

import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np

from eagle_jax import hosts, parallel

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_WORKER = r"""
import json, sys
import jax, numpy as np
from eagle_jax import hosts, parallel
port, pid = sys.argv[1], int(sys.argv[2])
hosts.initialize(f"127.0.0.1:{port}", 2, pid)
mesh = parallel.make_mesh({"data": 2, "fsdp": 2})
n = 12
rows = hosts.process_rows(mesh, n)
full = np.arange(n * 3, dtype=np.float32).reshape(n, 3) ** 1.5
local = full[rows]
gathered = hosts.gather_rows(local, rows, n)
batch = hosts.global_batch({"x": local}, mesh, n)
col_sums = jax.jit(lambda b: b["x"].sum(0), out_shardings=parallel.replicated(mesh))(batch)
print(json.dumps({"rows": [rows.start, rows.stop], "gathered": gathered.tolist(),
                  "col_sums": np.asarray(col_sums).tolist(), "total": hosts.total(pid + 1),
                  "shape": list(batch["x"].shape)}), flush=True)
"""


def _port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_two_processes_split_gather_and_assemble_the_global_batch():
  port = _port()
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2")
  procs = [subprocess.Popen([sys.executable, "-c", _WORKER, str(port), str(i)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
           for i in range(2)]
  outs = [p.communicate(timeout=240) for p in procs]
  for p, (_, err) in zip(procs, outs):
    assert p.returncode == 0, err[-3000:]
  res = [json.loads(out.strip().splitlines()[-1]) for out, _ in outs]
  full = np.arange(36, dtype=np.float32).reshape(12, 3) ** 1.5
  assert sorted(tuple(r["rows"]) for r in res) == [(0, 6), (6, 12)]  # one block each, no overlap
  for r in res:
    np.testing.assert_array_equal(np.asarray(r["gathered"], np.float32), full)
    np.testing.assert_allclose(r["col_sums"], full.sum(0), rtol=1e-6)
    assert r["total"] == 3 and r["shape"] == [12, 3]


def test_one_process_is_the_identity():
  mesh = parallel.make_mesh({"data": -1})
  n = 2 * len(jax.devices())
  rows = hosts.process_rows(mesh, n)
  assert (rows.start, rows.stop) == (0, n)
  x = np.random.default_rng(0).normal(size=(n, 2)).astype(np.float32)
  assert hosts.gather_rows(x, rows, n) is x
  g = hosts.global_batch({"x": x}, mesh, n)["x"]
  np.testing.assert_array_equal(np.asarray(g), x)
  assert g.sharding.is_equivalent_to(parallel.named_sharding(mesh, ("batch", None)), 2)
  assert hosts.total(5) == 5
