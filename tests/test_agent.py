"""EAGLE agent pieces: reference targets, policy network, learner sharding, config validation."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import movielens_25m, movielens_smoke
from eagle_jax import design, training
from eagle_jax.agent import reference, rollout, trainer
from eagle_jax.agent.policy import PolicyConfig, PolicyValueNet


def test_uniform_and_optimistic_targets_against_numpy():
  rng = np.random.default_rng(0)
  u = rng.normal(size=(5, 4)).astype(np.float32)
  u[2, 1] = u[2, 3] = 10.0  # a tie: the lower index wins
  mask = np.ones((5, 4), bool)
  mask[0, np.argmax(u[0])] = False  # the best candidate is invalid: the next best wins
  q = reference.optimistic_targets(u, mask)
  for n in range(5):
    best = max((j for j in range(4) if mask[n, j]), key=lambda j: (u[n, j], -j))
    assert q[n].tolist() == [1.0 if j == best else 0.0 for j in range(4)]
  np.testing.assert_allclose(reference.uniform_targets(mask).sum(-1), 1.0)
  assert reference.uniform_targets(mask)[0, np.argmax(u[0])] == 0.0
  np.testing.assert_allclose(reference.uniform_targets(mask)[1], 0.25)


def test_g_optimal_targets_equal_the_design_module():
  rng = np.random.default_rng(1)
  z = rng.normal(size=(3, 6, 5)).astype(np.float32)
  items = rng.normal(size=(40, 5)).astype(np.float32)
  mean, p = reference.principal_projection(items, 3)
  # The projection spans the top-3 principal subspace (numpy eigendecomposition of the covariance).
  evals, evecs = np.linalg.eigh(np.cov((items - items.mean(0)).T))
  top = evecs[:, np.argsort(evals)[::-1][:3]]
  np.testing.assert_allclose(p @ p.T, top @ top.T, atol=1e-5)
  key = jax.random.key(3)
  q, d = reference.g_optimal_targets(key, z, m=3, eps=1e-3, max_iters=1000, ridge=0.0,
                                     projection=(mean, p))
  zp = (z - mean) @ p
  expect = design.g_optimal_design(zp, eps=1e-3, max_iters=1000)
  np.testing.assert_allclose(np.asarray(d.weights), np.asarray(expect.weights), atol=1e-6)
  chosen = np.asarray(design.sample_exploratory_actions(key, zp, expect, 3))
  for n in range(3):
    assert set(np.flatnonzero(q[n])) == set(chosen[n].tolist())
    np.testing.assert_allclose(q[n][chosen[n]], 1 / 3)
  # Kiefer-Wolfowitz certificate in the projected space: g = rank = 3 at the optimum.
  assert np.all(np.asarray(d.g_value) <= 3 * (1 + 1e-3) + 1e-4)


def test_reference_kind_is_checked():
  with pytest.raises(training.ConfigError, match="config.reference.kind.*'greedy'"):
    reference.check_kind("greedy")


def test_policy_is_permutation_equivariant_over_candidates():
  net = PolicyValueNet(PolicyConfig(7, 5, 16), rngs=__import__("flax").nnx.Rngs(0))
  rng = np.random.default_rng(0)
  s = jnp.asarray(rng.normal(size=(3, 7)), jnp.float32)
  a = jnp.asarray(rng.normal(size=(3, 4, 5)), jnp.float32)
  logits, value = net(s, a)
  perm = np.array([2, 0, 3, 1])
  logits_p, value_p = net(s, a[:, perm])
  np.testing.assert_allclose(np.asarray(logits_p), np.asarray(logits)[:, perm], rtol=1e-5,
                             atol=1e-6)
  np.testing.assert_allclose(np.asarray(value_p), np.asarray(value), rtol=1e-6)
  # The score depends on the state: another state changes the logits.
  assert not np.allclose(np.asarray(net(s[::-1], a)[0]), np.asarray(logits))


def _config(**rl):
  config = movielens_smoke.get_config()
  config.rl.batch_size = 8
  config.reference.batch_size = 8
  config.update_from_flattened_dict({f"rl.{k}": v for k, v in rl.items()})
  return config


def _batch(seed, b=8, h=2, k=6, s=12, a=10):
  rng = np.random.default_rng(seed)
  return {"state": rng.normal(size=(b, h, s)).astype(np.float32),
          "action_feats": rng.normal(size=(b, h, k, a)).astype(np.float32),
          "mask": rng.random((b, h, k)) > 0.2,
          "actions": np.zeros((b, h), np.int32),
          "behaviour_logp": np.full((b, h), np.log(1 / k), np.float32),
          "reward": rng.normal(size=(b,)).astype(np.float32)}


def test_sharded_rl_step_equals_single_device():
  config = _config()
  results = []
  for mesh in (training.build_mesh({"data": 1}, devices=jax.devices()[:1]),
               training.build_mesh({"data": 2, "fsdp": 2, "tensor": 2})):
    learner = trainer.Learner(config, 12, 10, mesh)
    state = learner.start_rl(learner.init_state())
    batch = _batch(0)
    batch["mask"][:, :, 0] = True
    params, _, m = learner.rl_step(state["params"], state["opt_state"], state["ref_params"], batch)
    params, _, m2 = learner.rl_step(params, _, state["ref_params"], _batch(1))
    results.append((float(m["total"]), float(m2["total"]), jax.tree.map(np.asarray, params)))
    if mesh.size == 8:  # parameters really are split over the mesh
      kernel = params["state_in"]["kernel"]
      assert kernel.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")
      assert len(kernel.addressable_shards) == 8
  (a1, a2, pa), (b1, b2, pb) = results
  assert a1 == pytest.approx(b1, abs=1e-5)
  assert a2 == pytest.approx(b2, abs=1e-5)
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, atol=1e-5), pa, pb)


def test_reference_step_learns_targets():
  config = _config()
  learner = trainer.Learner(config, 12, 10, training.build_mesh({"data": -1}))
  state = learner.init_state()
  b = _batch(0)
  targets = np.zeros((8, 6), np.float32)
  targets[np.arange(8), np.arange(8) % 6] = 1.0
  batch = {"state": b["state"][:, 0], "action_feats": b["action_feats"][:, 0],
           "mask": np.ones((8, 6), bool), "targets": targets}
  params, opt = state["params"], state["opt_state"]
  first = None
  for _ in range(60):
    params, opt, m = learner.reference_step(params, opt, batch)
    first = float(m["loss"]) if first is None else first
  assert first == pytest.approx(np.log(6), abs=0.05)  # near-uniform start
  assert float(m["loss"]) < 0.3 * first
  assert float(m["target_agreement"]) == 1.0


@pytest.mark.parametrize("field,value,match", [
    ("reference.kinds", ("uniform", "greedy"), "config.reference.kinds='greedy'"),
    ("mesh", {"data": 3}, "config.mesh"),
    ("rl.batch_size", 12, "config.rl.batch_size=12 must be a positive multiple of .* 8"),
    ("reference.exploratory_m", 9, "config.reference.exploratory_m=9"),
    ("rl.gamma", 1.5, "config.rl.gamma=1.5"),
])
def test_bad_config_fails_before_compute(tmp_path, field, value, match):
  config = _config()
  if field == "mesh":
    config.mesh = value
  else:
    config.update_from_flattened_dict({field: value})
  with pytest.raises(training.ConfigError, match=match):
    trainer.run(config, str(tmp_path / "run"))
  assert not os.path.exists(tmp_path / "run" / "wals")  # nothing was computed


def test_workdir_errors_name_the_flag(tmp_path, monkeypatch):
  f = tmp_path / "file"
  f.write_text("x")
  with pytest.raises(training.ConfigError, match="--workdir=.*is not a folder"):
    trainer.run(_config(), str(f))
  with pytest.raises(training.ConfigError, match="--workdir=.*cannot be created"):
    trainer.run(_config(), str(f / "sub"))
  monkeypatch.setattr(os, "access", lambda *a: False)
  with pytest.raises(training.ConfigError, match="--workdir=.*not writable"):
    trainer.run(_config(), str(tmp_path / "ro"))


def test_paper_scale_config_dry_run_on_fake_devices():
  report = trainer.dry_run(movielens_25m.get_config())
  assert report["mesh"] == {"data": 2, "fsdp": 2, "tensor": 2}
  assert report["compiled"]
  assert report["param_count"] > 0
  assert report["batch_sharding"]["state"] == "P(('data', 'fsdp'), None, None)"
  assert report["param_shardings"]["score_hidden/kernel"] == "P('fsdp', 'tensor')"
  assert report["flops_per_step"] > 0


def test_pairs_are_a_function_of_seed_and_step():
  pairs = np.arange(40).reshape(20, 2)
  a = rollout.sample_pairs(pairs, 8, 0, 5)
  np.testing.assert_array_equal(a, rollout.sample_pairs(pairs, 8, 0, 5))
  assert not np.array_equal(a, rollout.sample_pairs(pairs, 8, 0, 6))
  assert len({tuple(x) for x in a}) == 8  # without replacement when the pool is large enough
