"""A tiny EAGLE run on the real SmolLM2 environment, shared by the end-to-end tests.

The plot-only world (``movielens_smoke.py:plot``; tests opt into parts of the paper's world by
flags): 1 train and 1 held-out anchor, K = 2 template actions, H = 2, 8 train and 4 held-out users,
a real (one-epoch fine-tuned) E_D: the environment is a few dozen short generations."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARGS = (
    "--config=" + os.path.join(ROOT, "configs", "movielens_smoke.py") + ":plot",
    "--config.world.num_train_anchors=1", "--config.world.num_heldout_anchors=1",
    "--config.world.num_train_users=8", "--config.world.num_heldout_users=4",
    "--config.actions.k=2", "--config.actions.llm_calls=0",
    "--config.env.sampling.max_tokens=24", "--config.descriptions.plot_tokens=32",
    "--config.reference.kinds=('g_optimal',)", "--config.reference.main=g_optimal",
    "--config.reference.design_dim=2", "--config.reference.exploratory_m=1",
    "--config.reference.episodes=8", "--config.reference.rollout_batch=8",
    "--config.eval.samples=2", "--config.encoder.finetune.epochs=1",
)


def cmd(module: str, workdir: str, *extra: str) -> list[str]:
  """The command line of ``python -m module`` on the tiny run in ``workdir``."""
  return [sys.executable, "-m", module, f"--workdir={workdir}", *ARGS, *extra]


def env() -> dict[str, str]:
  """The subprocess environment: 8 forced host devices unless the caller chose."""
  e = dict(os.environ)
  e.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
  return e


def run(module: str, workdir: str, *extra: str, timeout: float = 1500
        ) -> subprocess.CompletedProcess:
  """Runs ``module`` on the tiny run to completion; fails with its stderr's tail."""
  proc = subprocess.run(cmd(module, workdir, *extra), cwd=ROOT, env=env(), capture_output=True,
                        text=True, timeout=timeout)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc
