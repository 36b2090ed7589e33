"""EAGLE agent pieces: reference targets, policy network, learner sharding, config validation."""

import asyncio
import os
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import movielens_25m, movielens_smoke
from eagle_jax import design, training
from eagle_jax.agent import action_book, dry_run, reference, rollout, trainer
from eagle_jax.agent.policy import PolicyConfig, PolicyValueNet
from eagle_jax.embed import wals
from eagle_jax.evaluation import agent_eval


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


def test_reference_registry_lookup_names_the_field_and_the_known_kinds():
  assert tuple(reference.REFERENCES) == ("uniform", "optimistic", "g_optimal")
  for name, kind in reference.REFERENCES.items():
    assert reference.lookup(name, "f") is kind and kind.name == name
  assert not reference.REFERENCES["uniform"].tries_candidates
  with pytest.raises(training.ConfigError,
                     match=r"config.x='greedy' .*\('uniform', 'optimistic', 'g_optimal'\)"):
    reference.lookup("greedy", "config.x")


class _FakeEnv:
  """Deterministic stand-in for ``ContentGapEnv``: texts map to fixed pseudo-random Z points."""

  def __init__(self, d=4):
    self.d = d
    self.item_table = np.random.default_rng(5).normal(size=(30, d)).astype(np.float32)
    self.calls = []

  async def step(self, descriptions, actions):
    self.calls.append(len(descriptions))
    return [f"{x}|{a}" for x, a in zip(descriptions, actions)]

  def embed(self, texts):
    return np.stack([np.random.default_rng([sum(map(ord, t)), len(t)]).normal(size=self.d)
                     for t in texts]).astype(np.float32)

  def text_utility(self, texts, users):
    z = self.embed(texts)
    return {"utility": z[:, 0] + 0.1 * np.asarray(users)}


def _fake_world(k=3):
  anchors = {i: types.SimpleNamespace(state=f"anchor {i}", actions=[f"a{i}{j}" for j in range(k)])
             for i in (1, 2)}
  return types.SimpleNamespace(env=_FakeEnv(), anchors=anchors, num_actions=k,
                               actions=action_book.ActionBook.for_anchors(anchors, k))


def _label(name, world, visited, key):
  config = reference.LabelConfig(episodes=1, rollout_batch=1, exploratory_m=2, design_dim=2,
                                 design_eps=1e-3, design_max_iters=500, design_ridge=0.0)
  return asyncio.run(reference.REFERENCES[name].label(world, visited, config, key))


def test_registry_labels_equal_the_target_functions_on_the_next_states():
  world = _fake_world()
  visited = reference.Visited(texts=["s0", "s1", "s2"], users=np.array([0, 3, 1]),
                              items=np.array([1, 2, 1]), mask=np.ones((3, 3), bool))
  # The K next states of each visited state, built by hand from the fake transition.
  kids = [[f"{x}|a{i}{j}" for j in range(3)] for x, i in zip(visited.texts, visited.items)]
  key = jax.random.key(7)
  q, stats = _label("uniform", world, visited, key)
  np.testing.assert_allclose(q, 1 / 3)
  assert stats == {} and world.env.calls == []  # no environment calls
  q, _ = _label("optimistic", world, visited, key)
  util = np.array([[world.env.embed([c])[0, 0] + 0.1 * u for c in row]
                   for row, u in zip(kids, visited.users)])
  np.testing.assert_array_equal(np.argmax(q, -1), np.argmax(util, -1))
  assert world.env.calls == [9]  # all N * K transitions in one call
  q, stats = _label("g_optimal", world, visited, key)
  z = np.stack([world.env.embed(row) for row in kids])
  proj = reference.principal_projection(world.env.item_table, 2)
  expect, _ = reference.g_optimal_targets(jax.random.fold_in(key, 10_000), z, m=2, eps=1e-3,
                                          max_iters=500, ridge=0.0, projection=proj)
  np.testing.assert_array_equal(q, expect)
  assert set(stats) == {"design_g_over_rank", "design_converged", "design_support"}


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
    learner = trainer.Learner(trainer.validate(config, mesh), 12, 10, mesh)
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
  mesh = training.build_mesh({"data": -1})
  learner = trainer.Learner(trainer.validate(_config(), mesh), 12, 10, mesh)
  state = learner.init_state()
  b = _batch(0)
  targets = np.zeros((8, 6), np.float32)
  targets[np.arange(8), np.arange(8) % 6] = 1.0
  batch = {"state": b["state"][:, 0], "action_feats": b["action_feats"][:, 0],
           "mask": np.ones((8, 6), bool), "targets": targets}
  params, opt = state["params"], state["opt_state"]
  losses = []
  for _ in range(60):  # each loss read before the next step (training.bound_in_flight says why)
    params, opt, m = learner.reference_step(params, opt, batch)
    losses.append(float(m["loss"]))
  first = losses[0]
  assert first == pytest.approx(np.log(6), abs=0.05)  # near-uniform start
  assert losses[-1] < 0.3 * first
  assert float(m["target_agreement"]) == 1.0


@pytest.mark.parametrize("field,value,match", [
    ("reference.kinds", ("uniform", "greedy"), "config.reference.kinds='greedy'"),
    ("reference.main", "greedy", "config.reference.main='greedy'"),
    ("reference.kinds", ("uniform",), "config.reference.main='g_optimal' must be one of"),
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


def test_validate_returns_the_typed_job():
  config = _config(horizon=3, kl_coef=0.25, overlap=False)
  config.reference.kinds = ("g_optimal", "uniform")
  job = trainer.validate(config, training.build_mesh({"data": -1}))
  assert [k.name for k in job.kinds] == ["g_optimal", "uniform"]
  assert job.main is reference.REFERENCES["g_optimal"]
  assert (job.horizon, job.num_actions, job.text_dim) == (3, config.actions.k, 384)
  assert (job.rl.batch_size, job.rl.kl_coef, job.rl.overlap) == (8, 0.25, False)
  assert job.labels.exploratory_m == config.reference.exploratory_m
  assert job.reference.optim is config.reference.optim


@pytest.mark.parametrize("field,value", [("samples", 0), ("confidence", 1.0),
                                         ("trajectories", -1)])
def test_bad_eval_config_names_the_field(field, value):
  config = _config()
  config.eval[field] = value
  with pytest.raises(training.ConfigError, match=f"config.eval.{field}={value!r}"):
    agent_eval.EvalConfig.from_config(config.eval)


@pytest.mark.parametrize("use_bias,center", [(True, True), (False, False)])
def test_augmented_dim_is_the_width_of_the_augmented_vectors(use_bias, center):
  cfg = wals.WALSConfig(rank=5, use_bias=use_bias, center=center)
  z = np.zeros
  factors = wals.WALSFactors(z((4, 5)), z((6, 5)), z(4), z(6), np.float32(0.0))
  zu, zi = factors.augmented()
  assert wals.augmented_dim(cfg) == zu.shape[1] == zi.shape[1] == 8


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
  config = movielens_25m.get_config("head")
  config.encoder.backbone = "minilm"  # E_D's decoder step: tests/test_lm_dry_run.py
  report = dry_run.dry_run(config)
  assert "encoder" not in report
  assert report["mesh"] == {"data": 2, "fsdp": 2, "tensor": 2}
  # Z is the augmented WALS space: rank + 3 wide, in the state (z_u, E_D(x)) and action (E_D(a)).
  latent = config.wals.wals.rank + 3
  assert report["state_dim"] == 2 * config.policy.text_dim + 2 * latent + config.rl.horizon
  assert report["action_dim"] == config.policy.text_dim + latent
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


def test_evaluation_restore_falls_back_past_a_damaged_newest_step(tmp_path, caplog):
  """``AgentTrainer.restore`` (what the evaluation calls) skips a damaged newest step."""
  import logging  # noqa: PLC0415
  import shutil  # noqa: PLC0415

  from eagle_jax import checkpoint  # noqa: PLC0415

  mesh = training.build_mesh({"data": -1})
  learner = trainer.Learner(trainer.validate(_config(), mesh), 12, 10, mesh)
  state = learner.init_state()
  agent = object.__new__(trainer.AgentTrainer)  # restore reads only the folder and the learner
  agent.workdir, agent.learner = str(tmp_path / "agents" / "uniform"), learner
  ckpt_dir = os.path.join(agent.workdir, "checkpoints")
  newer = dict(state, params=jax.tree.map(lambda x: x + 1.0, state["params"]))
  with checkpoint.Checkpointer(ckpt_dir) as ckpt:
    ckpt.save(4, state, {"step": 4})
    ckpt.save(8, newer, {"step": 8})
  shutil.rmtree(os.path.join(ckpt_dir, "8", "state"))
  caplog.set_level(logging.WARNING)
  step, restored, meta = agent.restore()
  assert (step, meta) == (4, {"step": 4})
  jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)),
               restored, state)
  assert any("step 8" in r.getMessage() and os.path.join(ckpt_dir, "8") in r.getMessage()
             for r in caplog.records if r.levelno == logging.WARNING)
