"""End to end with real models: a tiny run trained with SmolLM2, evaluated with Gemma 3 270M as the
test environment (environment transfer) and SmolLM2 as an AI rater."""

import glob
import json
import os

import numpy as np
import pytest
import tiny_run

TRAIN = ("--config.reference.steps=10", "--config.rl.steps=10", "--config.checkpoint.every=5")
EVAL = [
    "--config.eval.transfer.enabled=True", "--config.eval.rater.enabled=True",
    "--config.eval.rater.pairs=3",
    "--config.eval.rater.policies=('random','agent[g_optimal]','agent[g_optimal]/greedy')",
]


def _run(module, workdir, extra=()):
  return tiny_run.run(module, workdir, *TRAIN, *extra)


@pytest.mark.slow
def test_transfer_and_rater_sections(tmp_path):
  work = str(tmp_path / "run")
  _run("launch.train", work)
  _run("launch.evaluate", work, EVAL)
  (path,) = glob.glob(os.path.join(work, "eval-*", "report.json"))
  with open(path) as f:
    report = json.load(f)
  t = report["transfer"]
  assert t["train_env_model"] == report["env"]["model"]
  assert t["test_env_model"] != t["train_env_model"] and "+chat:" in t["test_env_model"]
  assert t["test_env"]["transitions"] > 0
  for split, by_policy in t["side_by_side"].items():
    main = report["splits"][split]["policies"]
    test = t["splits"][split]["policies"]
    assert set(by_policy) == set(main) == set(test)
    for name, row in by_policy.items():
      assert row["train_env_gain"]["mean"] == pytest.approx(main[name]["gain"]["mean"], abs=1e-9)
      assert row["test_env_gain"]["mean"] == pytest.approx(test[name]["gain"]["mean"], abs=1e-9)
      diff = np.asarray(test[name]["gain_per_pair"]) - np.asarray(main[name]["gain_per_pair"])
      assert row["test_minus_train"]["mean"] == pytest.approx(diff.mean(), abs=1e-9)
  # The anchors' descriptions are frozen from training: step 0 is the same in both environments.
  for split in t["splits"]:
    a = report["splits"][split]["policies"]["random"]["utility_by_step"][0]
    b = t["splits"][split]["policies"]["random"]["utility_by_step"][0]
    assert a == pytest.approx(b, abs=1e-6)
  r = report["rater"]
  assert r["model"] == report["env"]["model"]
  for block in r["splits"].values():
    assert block["pairs"] == 3
    qs = block["questions"]
    assert set(qs) == {"user", "overall", "distance"}
    assert set(qs["user"]) == {"random", "agent[g_optimal]", "agent[g_optimal]/greedy"}
    assert "random" not in qs["distance"]
    for q in qs.values():
      for row in q.values():
        assert row["items"] == 3 and row["asked"] == 6
        assert 0 <= row["parse_failures"] <= 6
        if row["score"]["n"]:
          assert 0.0 <= row["score"]["mean"] <= 1.0
  # A rerun replays both environments and the rater from the response caches: same report.
  _run("launch.evaluate", work, EVAL)
  with open(path) as f:
    again = json.load(f)
  assert again["transfer"]["side_by_side"] == t["side_by_side"]
  assert again["rater"] == r
