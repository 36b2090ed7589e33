"""The config a workdir was made with: recorded, compared on resume and evaluation, changes logged."""

import json
import os
import subprocess
import sys

import pytest

from configs import movielens_smoke
from eagle_jax import run_config, training

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(**overrides):
  c = movielens_smoke.get_config()
  for dotted, v in overrides.items():
    *parents, last = dotted.split("__")
    node = c
    for p in parents:
      node = node[p]
    node[last] = v
  return c


def test_first_run_records_the_config_and_the_same_config_passes(tmp_path):
  c = _config()
  run_config.check(c, str(tmp_path))
  record = json.loads((tmp_path / "config.json").read_text())
  assert record["config"]["actions"]["k"] == 5
  assert record["config"]["reference"]["kinds"] == ["uniform", "optimistic", "g_optimal"]
  assert record["code_version"] == run_config.code_version() and record["code_version"]
  run_config.check(_config(), str(tmp_path))  # a resume under the same config
  assert not (tmp_path / "config_changes.jsonl").exists()


def test_a_changed_field_is_refused_naming_field_values_and_flag(tmp_path):
  run_config.check(_config(), str(tmp_path))
  with pytest.raises(training.ConfigError) as e:
    run_config.check(_config(actions__k=6, policy__hidden=64), str(tmp_path))
  msg = str(e.value)
  assert "config.actions.k: recorded 5, now 6" in msg
  assert "config.policy.hidden: recorded 128, now 64" in msg
  assert "--allow_config_change=actions.k,policy.hidden" in msg
  assert json.loads((tmp_path / "config.json").read_text())["config"]["actions"]["k"] == 5


def test_allowed_changes_are_logged_and_become_the_record(tmp_path):
  run_config.check(_config(), str(tmp_path))
  run_config.check(_config(rl__steps=300), str(tmp_path), allow=["rl.steps"])
  (change,) = [json.loads(x) for x in (tmp_path / "config_changes.jsonl").read_text().splitlines()]
  assert (change["field"], change["recorded"], change["now"]) == ("rl.steps", 200, 300)
  run_config.check(_config(rl__steps=300), str(tmp_path))  # the new value is the record now
  with pytest.raises(training.ConfigError, match="config.rl.steps: recorded 300, now 200"):
    run_config.check(_config(), str(tmp_path))
  # A block prefix allows every field below it; "all" allows anything.
  run_config.check(_config(rl__steps=300, rl__kl_coef=0.5, rl__batch_size=8), str(tmp_path),
                   allow=["rl"])
  run_config.check(_config(actions__k=4), str(tmp_path), allow=["all"])
  assert json.loads((tmp_path / "config.json").read_text())["config"]["actions"]["k"] == 4


def test_operational_fields_are_not_compared(tmp_path):
  run_config.check(_config(), str(tmp_path))
  c = _config(checkpoint__every=5, tensorboard=False, llm__timeout_s=5.0, llm__concurrency=2)
  c.wals.mesh.data = 2
  run_config.check(c, str(tmp_path))
  assert not (tmp_path / "config_changes.jsonl").exists()


def test_other_evaluation_settings_write_beside_the_recorded_evaluation(tmp_path):
  run_config.check(_config(), str(tmp_path))
  assert run_config.eval_dir(_config(), str(tmp_path)) == str(tmp_path / "eval")
  other = _config(eval__samples=8)
  run_config.check(other, str(tmp_path))  # evaluation-only: no flag needed
  beside = run_config.eval_dir(other, str(tmp_path))
  assert os.path.dirname(beside) == str(tmp_path)
  assert os.path.basename(beside).startswith("eval-") and beside != str(tmp_path / "eval")
  assert run_config.eval_dir(_config(eval__samples=8), str(tmp_path)) == beside
  assert run_config.eval_dir(_config(eval__samples=9), str(tmp_path)) != beside


def test_a_damaged_record_is_a_clear_error(tmp_path):
  (tmp_path / "config.json").write_text('{"config": [1, 2')
  with pytest.raises(training.ConfigError, match="config.json: unreadable config record"):
    run_config.check(_config(), str(tmp_path))


def test_evaluate_with_a_changed_config_fails_at_once_without_a_traceback(tmp_path):
  run_config.check(_config(), str(tmp_path))
  proc = subprocess.run(
      [sys.executable, "-m", "launch.evaluate", f"--workdir={tmp_path}", "--config.actions.k=6"],
      cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert proc.returncode != 0
  assert "config.actions.k: recorded 5, now 6" in proc.stderr
  assert "Traceback" not in proc.stderr
  assert not (tmp_path / "eval").exists() and not (tmp_path / "world.json").exists()


def test_a_config_the_job_refuses_never_becomes_the_record(tmp_path):
  def job_refusing(config):
    raise training.ConfigError("config.eval.confidence=1.5: expected < 1")

  with pytest.raises(training.ConfigError):
    with run_config.recorded(_config(eval__confidence=1.5), str(tmp_path)):
      job_refusing(None)
  assert not (tmp_path / "config.json").exists()
  with run_config.recorded(_config(), str(tmp_path)):
    pass
  recorded = (tmp_path / "config.json").read_bytes()
  with pytest.raises(training.ConfigError):
    with run_config.recorded(_config(rl__steps=300), str(tmp_path), allow=["rl.steps"]):
      job_refusing(None)
  assert (tmp_path / "config.json").read_bytes() == recorded
  assert not (tmp_path / "config_changes.jsonl").exists()
  with pytest.raises(RuntimeError):  # any other failure keeps the record (the run did start)
    with run_config.recorded(_config(rl__steps=300), str(tmp_path), allow=["rl.steps"]):
      raise RuntimeError("crash")
  assert json.loads((tmp_path / "config.json").read_text())["config"]["rl"]["steps"] == 300
