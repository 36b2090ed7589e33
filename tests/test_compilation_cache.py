"""``training.use_compilation_cache``: a job's identical programs compile once per cache folder.

Each process below is a fresh interpreter (the cache is process-wide JAX state): the first
compiles and writes the program, the second, reading a copy of the folder at another path, loads
it instead of compiling (JAX's own log line says so)."""

import os
import shutil
import subprocess
import sys

import pytest

from eagle_jax import training

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_PROGRAM = """
import sys, jax, jax.numpy as jnp
from eagle_jax import training
folder = training.use_compilation_cache(sys.argv[1], sys.argv[2])
def f(x):  # unrolled, so it compiles for longer than the cache's threshold
  for i in range(300):
    x = jnp.tanh(x @ x.T + i)
  return x
print(folder, float(jax.jit(f)(jnp.eye(8)).sum()))
"""


def _run(path: str, workdir: str) -> subprocess.CompletedProcess:
  env = dict(os.environ, JAX_LOG_COMPILES="1")
  return subprocess.run([sys.executable, "-c", _PROGRAM, path, workdir], cwd=_ROOT, env=env,
                        capture_output=True, text=True, timeout=300, check=True)


def test_a_second_process_loads_the_program_instead_of_compiling(tmp_path):
  first = _run("xla", str(tmp_path))  # relative: under the workdir
  folder = tmp_path / "xla"
  assert first.stdout.split()[0] == str(folder)
  assert "Persistent compilation cache hit" not in first.stderr
  entries = [p for p in os.listdir(folder) if p.startswith("jit_f-")]
  assert len(entries) == 1, os.listdir(folder)
  moved = tmp_path / "elsewhere"  # keys do not depend on the folder's path
  shutil.copytree(folder, moved)
  second = _run(str(moved), "/unused")  # absolute: as given
  assert "Persistent compilation cache hit for 'jit_f'" in second.stderr
  assert second.stdout.split()[1] == first.stdout.split()[1]  # the same result
  assert [p for p in os.listdir(moved) if p.startswith("jit_f-")] == entries  # nothing new


def test_off_and_bad_values():
  assert training.use_compilation_cache("", "/unused") is None
  with pytest.raises(training.ConfigError, match=r"config.compilation_cache: expected a folder"):
    training.use_compilation_cache(3, "/unused")
