"""eagle_jax.checkpoint: save/restore round trips, retention, resharding, resume."""

import logging
import os
import shutil

import jax
import numpy as np
import pytest

from eagle_jax import checkpoint, parallel


def _state(mesh):
  a = np.arange(64, dtype=np.float32).reshape(16, 4)
  return {"a": jax.device_put(a, parallel.named_sharding(mesh, ["rows", None])),
          "b": {"c": jax.device_put(np.array([1, 2, 3], np.int32), parallel.replicated(mesh))}}


def test_round_trip_retention_and_metadata(tmp_path):
  mesh = parallel.make_mesh()
  state = _state(mesh)
  with checkpoint.Checkpointer(tmp_path, max_to_keep=2) as ckpt:
    assert ckpt.latest_step() is None
    for step in (1, 2, 3):
      scaled = jax.tree.map(lambda x, s=step: x * s, state)
      assert ckpt.save(step, scaled, {"step": step, "history": [0.5, 0.25]})
    ckpt.wait()
    assert ckpt.all_steps() == [2, 3] and ckpt.latest_step() == 3
    step, out, meta = ckpt.restore(target=state)
  assert step == 3 and meta == {"step": 3, "history": [0.5, 0.25]}
  np.testing.assert_array_equal(np.asarray(out["a"]), 3 * np.arange(64).reshape(16, 4))
  np.testing.assert_array_equal(np.asarray(out["b"]["c"]), [3, 6, 9])
  assert out["a"].sharding.is_equivalent_to(state["a"].sharding, 2)
  assert out["b"]["c"].dtype == np.int32


def test_restore_resharded_and_abstract(tmp_path):
  mesh = parallel.make_mesh()
  state = _state(mesh)
  ckpt = checkpoint.Checkpointer(tmp_path)
  ckpt.save(5, state)
  ckpt.wait()
  abstract = jax.eval_shape(lambda: state)
  _, out, meta = ckpt.restore(5, target=abstract, shardings=parallel.replicated(mesh))
  assert meta == {}
  assert out["a"].sharding.is_equivalent_to(parallel.replicated(mesh), 2)
  np.testing.assert_array_equal(np.asarray(out["a"]), np.arange(64).reshape(16, 4))
  with pytest.raises(FileNotFoundError, match="no checkpoint step 4"):
    ckpt.restore(4, target=abstract)
  with pytest.raises(ValueError, match="step must be >= 0"):
    ckpt.save(-1, state)
  ckpt.close()


def test_restore_or_init_resumes(tmp_path):
  calls = []

  def init():
    calls.append(1)
    return 0, {"w": np.zeros(3, np.float32)}, {"note": "fresh"}

  ckpt = checkpoint.Checkpointer(tmp_path / "run")
  step, state, meta = ckpt.restore_or_init(init, target={"w": np.zeros(3, np.float32)})
  assert (step, meta, len(calls)) == (0, {"note": "fresh"}, 1)
  ckpt.save(7, {"w": np.array([1.0, 2.0, 3.0], np.float32)}, {"note": "saved"})
  ckpt.close()
  again = checkpoint.Checkpointer(tmp_path / "run")  # a new process would do the same
  step, state, meta = again.restore_or_init(init, target={"w": np.zeros(3, np.float32)})
  assert (step, meta, len(calls)) == (7, {"note": "saved"}, 1)
  np.testing.assert_array_equal(np.asarray(state["w"]), [1.0, 2.0, 3.0])
  again.close()
  with pytest.raises(ValueError, match="max_to_keep"):
    checkpoint.Checkpointer(tmp_path / "x", max_to_keep=0)


# ---------------------------------------------------------------------------------------------------
# Damaged steps: fallback to the newest intact one, the clear error, interrupted saves.


def _step_state(step):
  return {"a": np.arange(4000, dtype=np.float32) * step, "b": {"c": np.full(3, step, np.int32)}}


def _two_steps(directory):
  """Steps 1, 2, 3 saved with max_to_keep=2: steps 2 and 3 remain."""
  with checkpoint.Checkpointer(directory, max_to_keep=2) as ckpt:
    for step in (1, 2, 3):
      ckpt.save(step, _step_state(step), {"step": step})
  return directory


def _largest_data_file(step_dir):
  files = [os.path.join(r, f) for r, _, fs in os.walk(os.path.join(step_dir, "state"))
           for f in fs if os.sep + "d" + os.sep in os.path.join(r, f)]
  return max(files, key=os.path.getsize)


def _truncate(step_dir):
  path = _largest_data_file(step_dir)
  with open(path, "r+b") as f:
    f.truncate(os.path.getsize(path) // 2)


def _zero_bytes(step_dir):  # same length, overwritten bytes: orbax itself reads this back silently
  path = _largest_data_file(step_dir)
  data = bytearray(open(path, "rb").read())
  data[len(data) // 2:len(data) // 2 + 16] = bytes(16)
  open(path, "wb").write(bytes(data))


def _garbage_meta(step_dir):
  with open(os.path.join(step_dir, "meta", "metadata"), "w") as f:
    f.write('{"step": 3, trunc')


DAMAGE = {
    "truncated_data_file": _truncate,
    "deleted_data_file": lambda d: os.remove(_largest_data_file(d)),
    "zeroed_bytes_in_data_file": _zero_bytes,
    "deleted_state_manifest": lambda d: os.remove(os.path.join(d, "state", "manifest.ocdbt")),
    "garbage_meta_json": _garbage_meta,
    "deleted_meta_file": lambda d: os.remove(os.path.join(d, "meta", "metadata")),
    "removed_state_folder": lambda d: shutil.rmtree(os.path.join(d, "state")),
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
@pytest.mark.parametrize("with_target", [True, False])
def test_damaged_newest_step_falls_back_to_older(tmp_path, caplog, damage, with_target):
  directory = _two_steps(tmp_path / "ckpt")
  DAMAGE[damage](str(directory / "3"))
  target = _step_state(0) if with_target else None
  caplog.set_level(logging.WARNING)
  ckpt = checkpoint.Checkpointer(directory, max_to_keep=2)
  step, state, meta = ckpt.restore_or_init(lambda: pytest.fail("must not start fresh"),
                                           target=target)
  assert (step, meta) == (2, {"step": 2})
  np.testing.assert_array_equal(np.asarray(state["a"]), _step_state(2)["a"])
  np.testing.assert_array_equal(np.asarray(state["b"]["c"]), [2, 2, 2])
  warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
  assert any("step 3" in w and str(directory / "3") in w for w in warned), warned
  assert list(ckpt.damaged_steps()) == [3] and ckpt.latest_step() == 2
  # The resumed run saves step 3 again: the damaged one is moved aside, the new one restores.
  assert ckpt.save(3, _step_state(30), {"step": 3})
  ckpt.close()
  assert len(os.listdir(directory / checkpoint.DAMAGED_DIR)) == 1
  again = checkpoint.Checkpointer(directory)
  assert again.all_steps() == [2, 3]
  step, state, meta = again.restore(target=target)
  assert (step, meta) == (3, {"step": 3})
  np.testing.assert_array_equal(np.asarray(state["a"]), _step_state(30)["a"])
  again.close()


def test_metadata_falls_back_past_damaged_meta(tmp_path):
  directory = _two_steps(tmp_path / "ckpt")
  _garbage_meta(str(directory / "3"))
  with checkpoint.Checkpointer(directory) as ckpt:
    assert ckpt.metadata() == {"step": 2}
    with pytest.raises(checkpoint.CheckpointError, match=r"step 3 at .*3 is damaged"):
      ckpt.metadata(3)  # an explicit step never falls back


def test_every_step_damaged_is_one_clear_error(tmp_path):
  directory = _two_steps(tmp_path / "ckpt")
  _truncate(str(directory / "3"))
  shutil.rmtree(directory / "2" / "state")
  ckpt = checkpoint.Checkpointer(directory)
  with pytest.raises(checkpoint.CheckpointError) as info:
    ckpt.restore_or_init(lambda: pytest.fail("must not start fresh"), target=_step_state(0))
  msg = str(info.value)
  assert "\n" not in msg and str(directory) in msg and f"Delete {directory}" in msg
  assert "step 3: " in msg and "step 2: " in msg and "OUT_OF_RANGE" in msg, msg
  assert "Traceback" not in msg and len(msg) < 800
  ckpt.close()


def test_interrupted_save_folder_is_ignored_then_removed(tmp_path):
  directory = _two_steps(tmp_path / "ckpt")
  tmp = directory / f"4{checkpoint.TMP_MARKER}-1700000000"
  shutil.copytree(directory / "3", tmp)  # what a save killed before its final rename leaves
  _truncate(str(tmp))
  ckpt = checkpoint.Checkpointer(directory, max_to_keep=2)
  assert ckpt.all_steps() == [2, 3]
  step, state, _ = ckpt.restore(target=_step_state(0))
  assert step == 3 and not ckpt.damaged_steps()
  np.testing.assert_array_equal(np.asarray(state["a"]), _step_state(3)["a"])
  assert ckpt.save(4, _step_state(4), {"step": 4})
  ckpt.close()
  assert sorted(os.listdir(directory)) == ["3", "4"]
  with checkpoint.Checkpointer(directory) as again:
    step, state, _ = again.restore()
  assert step == 4
  np.testing.assert_array_equal(np.asarray(state["a"]), _step_state(4)["a"])


def test_digest_is_order_and_value_sensitive():
  a = {"x": np.arange(6, dtype=np.float32), "k": np.array([True, False])}
  d = checkpoint.digest(a)
  assert d == checkpoint.digest({"x": np.arange(6, dtype=np.float32),
                                 "k": np.array([True, False])})
  assert d["x"]["fp"] != checkpoint.digest({"x": np.arange(6, dtype=np.float32)[::-1].copy(),
                                            "k": a["k"]})["x"]["fp"]
  assert d["k"]["fp"] != checkpoint.digest({"x": a["x"], "k": np.array([False, True])})["k"]["fp"]


def test_restore_without_target_of_leaves_on_different_devices(tmp_path):
  # Leaves on 8 devices and on one device in one tree: a restore without a target places each as
  # saved, and verifying their fingerprints must not mix device sets (a resumed agent's state).
  mesh = parallel.make_mesh()
  state = {**_state(mesh), "one": jax.device_put(np.arange(5, dtype=np.float32),
                                                 jax.devices()[0])}
  with checkpoint.Checkpointer(tmp_path) as ckpt:
    ckpt.save(1, state)
    ckpt.wait()
    step, out, _ = ckpt.restore()
  assert step == 1
  for x, y in zip(jax.tree.leaves(state), jax.tree.leaves(out)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
