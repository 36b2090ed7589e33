"""End to end with the real SmolLM2 environment: quick-start main job, SIGKILL resume equality.

A tiny world (1 train and 1 held-out anchor, K = 2 template actions, H = 2) keeps the environment to a
few dozen short generations. Run A is the quick-start job (train + evaluate). Run B starts from A's
world (WALS, E_D and the environment's response cache: the deterministic environment the issue asks
for), is killed with SIGKILL mid-RL and restarted with the same command; its metrics and final
parameters must equal A's.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from eagle_jax import training

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARGS = [
    "--config.world.num_train_anchors=1", "--config.world.num_heldout_anchors=1",
    "--config.world.num_train_users=8", "--config.world.num_heldout_users=4",
    "--config.actions.k=2", "--config.actions.llm_calls=0",
    "--config.env.sampling.max_tokens=24", "--config.descriptions.plot_tokens=32",
    "--config.reference.kinds=('g_optimal',)", "--config.reference.main=g_optimal",
    "--config.reference.design_dim=2", "--config.reference.exploratory_m=1",
    "--config.reference.episodes=8", "--config.reference.rollout_batch=8",
    "--config.reference.steps=6", "--config.reference.batch_size=8",
    "--config.rl.steps=80", "--config.rl.batch_size=8", "--config.checkpoint.every=4",
    "--config.eval.samples=2",
    "--config.encoder.finetune.epochs=1",  # a real (fine-tuned) E_D, one epoch to keep CI short
]
VOLATILE = {"env_seconds", "learner_seconds", "cache_hits", "cache_misses", "env_transitions"}


def _cmd(module, workdir):
  return [sys.executable, "-m", module, f"--workdir={workdir}", *ARGS]


def _env():
  env = dict(os.environ)
  env.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
  return env


def _steps(workdir):
  d = os.path.join(workdir, "agents", "g_optimal", "checkpoints")
  if not os.path.isdir(d):
    return []
  return sorted(int(x) for x in os.listdir(d) if x.isdigit())


def test_quickstart_job_then_sigkill_resume(tmp_path):
  # One test (not a shared fixture): pytest-xdist would run a module fixture once per worker.
  quickstart = str(tmp_path / "a")
  subprocess.run(_cmd("launch.main", quickstart), cwd=ROOT, env=_env(), check=True, timeout=900)
  _check_report(quickstart)
  _check_sigkill_resume(quickstart, str(tmp_path / "b"))


def _check_report(quickstart):
  with open(os.path.join(quickstart, "eval", "report.json")) as f:
    report = json.load(f)
  assert report["checkpoint_steps"] == {"g_optimal": 86}
  assert {s: r["pairs"] for s, r in report["splits"].items()} == {"new_users": 4,
                                                                   "new_anchors": 4}
  for split, r in report["splits"].items():
    pol = r["policies"]
    assert set(pol) == {"random", "reference[g_optimal]", "agent[g_optimal]",
                        "agent[g_optimal]/greedy"}
    for p in pol.values():
      per = np.asarray(p["gain_per_pair"])
      assert p["gain"]["mean"] == pytest.approx(per.mean(), abs=1e-6)
      assert p["gain"]["ci_low"] <= p["gain"]["mean"] <= p["gain"]["ci_high"]
      assert 0.0 <= p["fraction_improved"] <= 1.0
      # The gain is the last step's utility over the anchor's.
      assert p["final_utility"] - p["anchor_utility"] == pytest.approx(per.mean(), abs=1e-4)
    diff = r["comparisons"]["agent[g_optimal] - random"]["mean"]
    assert diff == pytest.approx(pol["agent[g_optimal]"]["gain"]["mean"]
                                 - pol["random"]["gain"]["mean"], abs=1e-6)
    for png in (f"gain_{split}.png", f"utility_by_step_{split}.png"):
      assert os.path.getsize(os.path.join(quickstart, "eval", png)) > 1000
  traj = report["trajectories"][0]
  assert len(traj["steps"]) == 3 and traj["steps"][0]["action"]
  metrics = training.read_metrics(os.path.join(quickstart, "agents", "g_optimal",
                                               "metrics.jsonl"))
  assert [m["step"] for m in metrics] == list(range(1, 87))


def _check_sigkill_resume(quickstart, b):
  os.makedirs(b)
  for sub in ("wals", "encoder", "env"):
    shutil.copytree(os.path.join(quickstart, sub), os.path.join(b, sub))
  proc = subprocess.Popen(_cmd("launch.train", b), cwd=ROOT, env=_env(),
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  deadline = time.time() + 600
  while time.time() < deadline and proc.poll() is None and not any(
      s >= 20 for s in _steps(b)):
    time.sleep(0.02)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  killed_at = _steps(b)
  assert killed_at and max(killed_at) < 86, f"not killed mid-training: {killed_at}"
  subprocess.run(_cmd("launch.train", b), cwd=ROOT, env=_env(), check=True, timeout=600)
  assert max(_steps(b)) == 86

  ma = training.read_metrics(os.path.join(quickstart, "agents", "g_optimal", "metrics.jsonl"))
  mb = training.read_metrics(os.path.join(b, "agents", "g_optimal", "metrics.jsonl"))
  assert [m["step"] for m in mb] == [m["step"] for m in ma]
  for ra, rb in zip(ma, mb):
    for k in set(ra) - VOLATILE:
      if isinstance(ra[k], str):
        assert rb[k] == ra[k], (ra["step"], k)
      else:
        assert rb[k] == pytest.approx(ra[k], rel=1e-6, abs=1e-7), (ra["step"], k)

  from eagle_jax import checkpoint  # noqa: PLC0415

  def final(workdir):
    with checkpoint.Checkpointer(os.path.join(workdir, "agents", "g_optimal",
                                              "checkpoints")) as ckpt:
      return ckpt.restore()[1]["params"]

  pa, pb = final(quickstart), final(b)
  for x, y in zip(__import__("jax").tree.leaves(pa), __import__("jax").tree.leaves(pb)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-6, atol=1e-7)
