"""Tables 2 and 4 (evaluation/tables.py, launch/tables.py) against hand-built reports."""

import json
import math
import subprocess
import sys

import pytest
import tiny_run

from eagle_jax.evaluation import tables

KINDS = ("uniform", "optimistic", "g_optimal")


def _ci(m):
  return {"mean": m, "ci_low": m - 0.1, "ci_high": m + 0.1, "anchors": 3}


def _split(offset=0.0, elm=True):
  names = (["random"] + [f"reference[{k}]" for k in KINDS] + [f"agent[{k}]" for k in KINDS]
           + [f"agent[{k}]/greedy" for k in KINDS] + (["elm_baseline"] if elm else []))
  gains = {n: offset + 0.01 * i for i, n in enumerate(names)}
  comps = {}
  for k in KINDS:
    for other in ("random", f"reference[{k}]") + (("elm_baseline",) if elm else ()):
      comps[f"agent[{k}] - {other}"] = _ci(gains[f"agent[{k}]"] - gains[other])
  return {"pairs": 9, "anchors": 3,
          "policies": {n: {"final_utility": 1.0 + g, "fraction_improved": 0.5} for n, g in
                       gains.items()},
          "anchor_bootstrap": {"gain": {n: _ci(g) for n, g in gains.items()},
                               "comparisons": comps}}


def _report(space="default", offset=0.0):
  return {"main_reference": "g_optimal", "splits": {"new_anchors": _split(offset),
                                                    "new_users": _split(offset + 1)},
          "config": {"actions": {"space": space, "k": 10, "personalised": space != "plain",
                                 "macro_size": 3, "macro_k": 5}, "rl": {"horizon": 2}}}


def test_table2_rows_in_paper_order():
  split = _split()
  rows = tables.table2(split)
  assert [r["policy"] for r in rows] == (
      ["random"] + [f"reference[{k}]" for k in KINDS] + [f"agent[{k}]" for k in KINDS]
      + ["elm_baseline"])
  for r in rows:
    assert r["gain"] == split["anchor_bootstrap"]["gain"][r["policy"]]
    assert r["final_utility"] == split["policies"][r["policy"]]["final_utility"]
  agent = rows[6]
  assert agent["minus_random"]["mean"] == pytest.approx(0.06)  # index 6 minus index 0
  assert agent["minus_reference"]["mean"] == pytest.approx(0.03)  # minus reference[g_optimal]
  assert rows[0]["minus_random"] is None and rows[-1]["minus_reference"] is None
  assert [r["policy"] for r in tables.table2(_split(elm=False))][-1] == "agent[g_optimal]"
  text = tables.table2_markdown(split)
  assert text.count("\n") == 1 + len(rows) and "| agent[g_optimal] | +0.060 [-0.040, +0.160] |" in text


def test_table4_rows_and_nan_intervals():
  reports = {"default": _report(), "macro": _report("macro", 0.5)}
  reports["macro"]["config"]["rl"]["horizon"] = 1
  rows = tables.table4(reports, "new_anchors")
  assert [r["run"] for r in rows] == ["default", "macro"]
  assert rows[1]["gain"]["mean"] == pytest.approx(0.56) and rows[1]["random_gain"]["mean"] == 0.5
  assert rows[1]["action_space"] == "macro (3 actions per step), K=10, H=1"
  assert rows[0]["minus_random"]["mean"] == pytest.approx(0.06)
  with pytest.raises(ValueError, match="'default'.*no split 'test'"):
    tables.table4(reports, "test")
  one = {"mean": 0.2, "ci_low": math.nan, "ci_high": math.nan, "anchors": 1}
  assert tables.interval(one) == "+0.200 [n/a]" and tables.interval(None) == "-"


def test_tables_cli(tmp_path):
  for name, rep in (("a", _report()), ("b", _report("combined", 0.2))):
    (tmp_path / name / "eval").mkdir(parents=True)
    (tmp_path / name / "eval" / "report.json").write_text(json.dumps(rep))
  out = tmp_path / "t.md"
  proc = subprocess.run([sys.executable, "-m", "launch.tables",
                         f"--runs=default={tmp_path / 'a'},combined={tmp_path / 'b'}",
                         f"--out={out}"], cwd=tiny_run.ROOT, capture_output=True, text=True)
  assert proc.returncode == 0, proc.stderr
  text = out.read_text()
  assert "| combined | combined (5 of K macro), K=10, H=2 | agent[g_optimal] | +0.260" in text
  assert "Table 2, new_anchors, run 'default'" in text and text.strip() in proc.stdout
  bad = subprocess.run([sys.executable, "-m", "launch.tables", f"--runs=x={tmp_path}"],
                       cwd=tiny_run.ROOT, capture_output=True, text=True)
  assert bad.returncode != 0 and "--runs x=" in bad.stderr and "found 0" in bad.stderr
  assert "Traceback" not in bad.stderr


def test_rater_scores_become_columns():
  split = _split()
  rater = {"pairs": 3, "questions": {
      "user": {"random": {"score": {"mean": 0.25, "ci_low": 0.1, "ci_high": 0.4, "n": 3}},
               "agent[g_optimal]": {"score": {"mean": 0.75, "ci_low": 0.6, "ci_high": 0.9,
                                              "n": 3}}},
      "distance": {"agent[g_optimal]": {"score": {"mean": math.nan, "n": 0}}}}}
  rows = {r["policy"]: r for r in tables.table2(split, rater)}
  assert rows["agent[g_optimal]"]["rater_user"]["mean"] == 0.75
  assert rows["random"]["rater_user"]["mean"] == 0.25 and rows["random"]["rater_distance"] is None
  assert "rater_user" not in tables.table2(split)[0]
  text = tables.table2_markdown(split, rater)
  assert text.splitlines()[0].endswith("| rater_user | rater_distance |")
  assert "| +0.750 [+0.600, +0.900] | +nan [n/a] |" in text
  # Table 4: a run with a rater gets its main agent's scores; one without gets "-".
  with_rater = _report()
  with_rater["rater"] = {"splits": {"new_anchors": rater}}
  rows4 = tables.table4({"a": with_rater, "b": _report()}, "new_anchors")
  text4 = tables.table4_markdown(rows4)
  assert rows4[0]["rater_user"]["mean"] == 0.75 and "rater_user" not in rows4[1]
  assert text4.splitlines()[-1].endswith("| 3 | - | - |")
