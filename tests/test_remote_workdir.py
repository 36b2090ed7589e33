"""A workdir on a non-local filesystem: ``gs://`` paths served by an in-memory fsspec filesystem.

``etils.epath`` sends ``gs://`` paths to fsspec's ``gcs`` protocol (without TensorFlow installed);
the ``fake_gcs`` fixture registers fsspec's ``MemoryFileSystem`` under that protocol, so every
epath call of the library reaches an in-memory bucket of this process and nothing reaches the
network. The tests run from an empty current folder and check that no local folder named ``gs:``
appears, which is what ``os.makedirs("gs://bucket/run")`` used to create.

What is covered on the fake bucket: ``check_workdir``, the workdir lock (skipped for remote
workdirs), the config record and its change log, ``MetricsWriter``'s JSONL (rewrite on resume,
appends), append-only JSONL records, the response cache, ``check_input_path``, and the WALS job
end to end through the launchers' wrapper (``launch.job.run``): ``config.json``,
``config_changes.jsonl``, ``embeddings.npz`` (read back by ``load_npz``) and ``report.json``.

What is not: orbax checkpoints and TensorBoard events. Orbax on a ``gs://`` directory asks
google-cloud-storage for the bucket's hierarchical-namespace setting and writes arrays through
tensorstore's ``gcs`` driver over HTTP; tensorboardX writes ``gs://`` through google-cloud-storage.
None of them goes through fsspec, so none can be served from memory offline. The end-to-end test
therefore maps the job's ``gs://.../checkpoints`` folder to a local folder (``_local_checkpoints``,
the one stand-in), where the real orbax saves and the rerun restores; TensorBoard is off.
"""

import json
import os
import sys

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


def test_wals_job_end_to_end_on_a_gs_workdir_and_resume(fake_gcs, tmp_path, monkeypatch):
  run = "gs://bucket/wals"
  local = tmp_path / "orbax"
  real_init = checkpoint.Checkpointer.__init__

  def _local_checkpoints(self, directory, **kwargs):  # the stand-in: see the module docstring
    directory = os.fspath(directory)
    assert directory == f"{run}/checkpoints", directory
    real_init(self, local / "checkpoints", **kwargs)

  monkeypatch.setattr(checkpoint.Checkpointer, "__init__", _local_checkpoints)
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
  step, state, _ = checkpoint.Checkpointer(f"{run}/checkpoints").restore()
  assert step == 3
  np.testing.assert_array_equal(emb["item_factors"], np.asarray(state["item_factors"]))

  # The rerun with two more sweeps resumes from sweep 3 (a deliberate, logged config change).
  with config.unlocked():
    config.wals.sweeps = 5
  monkeypatch.setattr(flags.FLAGS, "allow_config_change", ["wals.sweeps"])
  again = job.run(run, lambda: wals_train.run(config, run), name="wals", config=config)
  assert [h["sweep"] for h in again["history"]] == [1, 2, 3, 4, 5]
  assert again["history"][:3] == first["history"]  # restored from the checkpoint's metadata
  change = json.loads(paths.read_text(f"{run}/config_changes.jsonl"))
  assert (change["field"], change["recorded"], change["now"]) == ("wals.sweeps", 3, 5)
  assert json.loads(paths.read_text(f"{run}/report.json"))["sweeps"] == 5
  assert sorted(int(p.name) for p in (local / "checkpoints").iterdir() if p.name.isdigit()) == [
      4, 5]
  assert {"bucket/wals/config.json", "bucket/wals/config_changes.jsonl",
          "bucket/wals/embeddings.npz", "bucket/wals/report.json"} <= _objects(fake_gcs)
