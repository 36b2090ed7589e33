r"""The paper's Table 4 (action spaces) from the evaluation reports of several runs, and Table 2.

  python -m launch.tables --runs=default=runs/study,no_personal=runs/study_np,\
      macro=runs/study_macro,combined=runs/study_comb [--split=new_anchors] [--out=tables.md]

Each ``label=path`` names a run folder (its ``eval/report.json``, or its one ``eval-*/report.json``)
or a ``report.json`` file. Prints Table 4 (``evaluation.tables.table4``: the main agent of each run,
anchor-bootstrap intervals) and Table 2 of the first run (``tables.table2``), and writes them to
``--out`` when given.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

from absl import app, flags

from eagle_jax import checks, cli, paths
from eagle_jax.evaluation import tables

_RUNS = flags.DEFINE_list("runs", None, "label=path of each run (a run folder or a report.json).")
_SPLIT = flags.DEFINE_enum("split", "new_anchors", ["new_anchors", "new_users"],
                           "Held-out split of the tables.")
_OUT = flags.DEFINE_string("out", "", "Markdown file to write the tables to (\"\": print only).")


def _report_path(label: str, path: str) -> str:
  if not paths.isdir(path):
    return checks.check_input_path(path, f"--runs {label}")
  found = [os.path.join(path, "eval", "report.json")]
  if not paths.exists(found[0]):
    found = sorted(str(p / "report.json") for p in paths.path(path).glob("eval-*")
                   if (p / "report.json").exists())
  if len(found) != 1:
    raise checks.ConfigError(f"--runs {label}={path}: expected one evaluation report "
                             f"(eval/report.json or one eval-*/report.json), found {len(found)}")
  return found[0]


def _load(label: str, path: str) -> dict:
  report_path = _report_path(label, path)
  try:
    report = json.loads(paths.read_text(report_path))
  except ValueError as e:
    raise checks.ConfigError(f"{report_path} (--runs {label}): not a JSON report ({e})") from None
  if not isinstance(report, dict) or "splits" not in report or "main_reference" not in report:
    raise checks.ConfigError(f"{report_path} (--runs {label}): not an evaluation report "
                             "(no 'splits' or 'main_reference')")
  return report


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  runs = {}
  for item in _RUNS.value or ():
    label, sep, path = item.partition("=")
    if not sep or not label or not path or label in runs:
      raise app.UsageError(f"--runs: expected distinct label=path items, got {item!r}")
    runs[label] = _load(label, path)
  if not runs:
    raise app.UsageError("--runs: give at least one label=path")
  try:
    rows = tables.table4(runs, _SPLIT.value)
  except (KeyError, ValueError) as e:
    raise checks.ConfigError(f"--runs: {e}") from None
  first = next(iter(runs))
  rater = tables.rater_split(runs[first], _SPLIT.value)
  text = (f"Table 4, {_SPLIT.value} (main agent per action space; anchor-bootstrap intervals)\n\n"
          f"{tables.table4_markdown(rows)}\n\nTable 2, {_SPLIT.value}, run {first!r}\n\n"
          f"{tables.table2_markdown(runs[first]['splits'][_SPLIT.value], rater)}\n")
  print(text)
  if _OUT.value:
    paths.write_text(_OUT.value, text)


if __name__ == "__main__":
  cli.run(main)
