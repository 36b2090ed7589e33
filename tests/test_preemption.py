"""SIGTERM as a preemption notice and the workdir lock, on real ``launch.wals`` subprocesses.

WALS on a small synthetic matrix is the cheapest real job that checkpoints (milliseconds per sweep,
deterministic): run R is uninterrupted (and a second run started on its workdir meanwhile must be
refused); run A gets SIGTERM mid-training, saves the sweep it reached and exits with
``preemption.EXIT_CODE``; its rerun resumes from that sweep and must end in R's exact factors.
"""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from eagle_jax import checkpoint, preemption, workdir_lock

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SWEEPS, EVERY = 2000, 300
ARGS = ["--config=configs/wals_ml100k.py", "--config.data.source=synthetic",
        "--config.data.synthetic.num_users=500", "--config.data.synthetic.num_items=300",
        "--config.data.synthetic.num_ratings=20000", f"--config.checkpoint.every={EVERY}"]


def _start(workdir, sweeps=SWEEPS, extra=()):
  """``launch.wals`` in the background; stdout and stderr go to files in the workdir's parent."""
  log = open(f"{workdir}.{time.monotonic_ns()}.log", "w")  # noqa: SIM115
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1")
  proc = subprocess.Popen(
      [sys.executable, "-m", "launch.wals", f"--workdir={workdir}", *ARGS,
       f"--config.wals.sweeps={sweeps}", *extra], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
  proc.log_path = log.name
  return proc


def _finish(proc, timeout=600):
  proc.wait(timeout=timeout)
  with open(proc.log_path) as f:
    return proc.returncode, f.read()


def _steps(workdir):
  d = os.path.join(workdir, "checkpoints")
  return sorted(int(x) for x in os.listdir(d) if x.isdigit()) if os.path.isdir(d) else []


def _wait_for(cond, proc, timeout=300):
  t0 = time.monotonic()
  while not cond():
    assert proc.poll() is None, _finish(proc)[1][-3000:]
    assert time.monotonic() - t0 < timeout, "timed out"
    time.sleep(0.05)


def _factors(workdir):
  with np.load(os.path.join(workdir, "embeddings.npz"), allow_pickle=False) as z:
    return {k: z[k] for k in z.files}


def test_guard_turns_sigterm_into_a_flag_and_restores_the_handler():
  before = signal.getsignal(signal.SIGTERM)
  with preemption.Guard() as guard:
    assert not guard.should_stop(0)
    os.kill(os.getpid(), signal.SIGTERM)  # delivered to the main thread before the next line
    time.sleep(0.01)
    assert guard.requested and guard.should_stop(1)
  assert signal.getsignal(signal.SIGTERM) is before


def test_sigterm_saves_the_reached_sweep_and_the_rerun_equals_an_uninterrupted_run(tmp_path):
  ref, run = str(tmp_path / "ref"), str(tmp_path / "run")
  # R, uninterrupted. A second run on its workdir is refused at once while R keeps going.
  proc_r = _start(ref)
  _wait_for(lambda: _steps(ref), proc_r)
  t0 = time.monotonic()
  code, out = _finish(_start(ref))
  assert code == 1 and proc_r.poll() is None, out[-3000:]
  lock = os.path.join(ref, workdir_lock.LOCK_NAME)
  assert f"workdir {ref} is in use by another run: pid {proc_r.pid} on host " in out, out[-3000:]
  assert lock in out and "Traceback" not in out
  assert time.monotonic() - t0 < 60
  code, out_r = _finish(proc_r)
  assert code == 0, out_r[-3000:]
  assert _steps(ref)[-1] == SWEEPS

  # A: SIGTERM after its first periodic checkpoint.
  proc = _start(run)
  _wait_for(lambda: _steps(run), proc)
  proc.send_signal(signal.SIGTERM)
  code, out = _finish(proc)
  assert code == preemption.EXIT_CODE, out[-3000:]
  steps = _steps(run)
  saved = steps[-1]
  assert EVERY < saved < SWEEPS and steps[0] % EVERY == 0, steps
  assert f"preempted: saved checkpoint step {saved} in {os.path.join(run, 'checkpoints')}" in out
  assert "Traceback" not in out
  assert not [x for x in os.listdir(os.path.join(run, "checkpoints")) if checkpoint.TMP_MARKER in x]
  assert not os.path.exists(os.path.join(run, "embeddings.npz"))
  with checkpoint.Checkpointer(os.path.join(run, "checkpoints")) as ckpt:
    step, _, meta = ckpt.restore()
  assert step == saved and len(meta["history"]) == saved

  # The rerun resumes from that sweep and ends where R ended, bit for bit.
  code, out = _finish(_start(run))
  assert code == 0, out[-3000:]
  assert f"resumed from sweep {saved} in" in out
  with open(os.path.join(run, "report.json")) as f:
    assert len(json.load(f)["history"]) == SWEEPS
  want, got = _factors(ref), _factors(run)
  assert set(want) == set(got)
  for k in want:
    np.testing.assert_array_equal(got[k], want[k], err_msg=k)


def test_lock_of_a_sigkilled_run_does_not_block_the_next(tmp_path):
  workdir = str(tmp_path / "w")
  lock = os.path.join(workdir, workdir_lock.LOCK_NAME)
  proc = _start(workdir)
  _wait_for(lambda: os.path.exists(lock) and f'"pid": {proc.pid}' in open(lock).read(), proc)
  proc.kill()
  proc.wait()
  # A shorter run on the same workdir: a deliberate config change (recorded, not refused).
  code, out = _finish(_start(workdir, sweeps=20, extra=["--allow_config_change=wals.sweeps"]))
  assert code == 0, out[-3000:]
  assert "in use by another run" not in out


@pytest.mark.parametrize("distributed", [False, True])
def test_lock_is_reentrant_in_a_process_and_refuses_another(tmp_path, distributed):
  workdir = str(tmp_path / "w")
  code = ("import sys; from eagle_jax import workdir_lock as w\n"
          "try:\n"
          f"  with w.hold({workdir!r}, distributed={distributed}): print('got it')\n"
          "except w.WorkdirLocked as e: print(e); sys.exit(3)\n")
  with workdir_lock.hold(workdir, distributed=distributed) as path:
    with workdir_lock.hold(workdir, distributed=distributed):  # launch.main: train, then evaluate
      pass
    other = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                           timeout=120)
    assert other.returncode == 3, other.stderr
    assert f"pid {os.getpid()} on host" in other.stdout and path in other.stdout
  other = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         timeout=120)
  assert other.returncode == 0 and "got it" in other.stdout, other.stderr
