"""eagle_jax.checkpoint: save/restore round trips, retention, resharding, resume."""

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
