"""The paper's Table 2 (policies) and Table 4 (action spaces) as blocks of evaluation reports.

Table 2 (PAPER_SPEC.md section 3): on one held-out split, one row per policy: random actions, each
untrained reference policy, the EAGLE agent trained against each reference, and the ELM baseline
when the run has one. Table 4: one row per run whose world differs only in its action space
(default, no personalised actions, macro actions, combined), for the run's main agent. Every
number comes from the report (``agent_eval._split_report``): the mean gain U(final) - U(anchor)
over pairs with its interval from the bootstrap over anchors (the paper's question on new anchors
is whether a result holds on other anchors), the mean final utility U(final), and for agents the
paired differences to random actions and to their reference (also bootstrapped over anchors);
with the AI rater (``eval.rater``), its scores per question as further columns (``rater_user``:
the paper's User Utility, ``rater_distance``: its Distance Score; ``rater_overall``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

_ROW_COLUMNS = ("policy", "gain", "final_utility", "fraction_improved", "minus_random",
                "minus_reference")


def _kinds(policies: Mapping[str, Any]) -> list[str]:
  return [n[len("agent["):-1] for n in policies if n.startswith("agent[") and n.endswith("]")]


def rater_scores(rater: Mapping[str, Any] | None, policy: str) -> dict[str, Any]:
  """``{"rater_<question>": score}`` of ``policy`` in one split of a report's ``rater`` section
  (the AI rater's share of items where it prefers the policy's description over the anchor, with
  its interval; the paper's Table 2 columns User Utility and Distance Score), None where the
  rater did not rate the policy; {} without a rater section."""
  if not rater:
    return {}
  return {f"rater_{q}": by_policy.get(policy, {}).get("score")
          for q, by_policy in rater["questions"].items()}


def rater_split(report: Mapping[str, Any], split: str) -> Mapping[str, Any] | None:
  """The ``split`` block of a report's ``rater`` section (what ``table2`` takes as ``rater``), or
  None when the run had no rater."""
  return report.get("rater", {}).get("splits", {}).get(split)


def table2(split: Mapping[str, Any], rater: Mapping[str, Any] | None = None
           ) -> list[dict[str, Any]]:
  """Table 2's rows of one split of a report (``report["splits"][name]``).

  Args:
    split: the split's report.
    rater: the same split of the report's ``rater`` section, if any (adds ``rater_scores``).

  Returns:
    Rows ``{policy, gain, final_utility, fraction_improved, minus_random, minus_reference}`` in the
    paper's order (random, references, agents, ELM baseline); ``gain`` and the differences are
    ``{mean, ci_low, ci_high, anchors}`` (anchor bootstrap), absent differences are None.
  """
  policies = split["policies"]
  boot = split["anchor_bootstrap"]
  kinds = _kinds(policies)
  names = (["random"] + [f"reference[{k}]" for k in kinds] + [f"agent[{k}]" for k in kinds]
           + (["elm_baseline"] if "elm_baseline" in policies else []))
  rows = []
  for name in names:
    p = policies[name]
    agent = name[len("agent["):-1] if name.startswith("agent[") else None
    rows.append({
        "policy": name, "gain": boot["gain"][name], "final_utility": p["final_utility"],
        "fraction_improved": p["fraction_improved"],
        "minus_random": boot["comparisons"].get(f"{name} - random") if agent else None,
        "minus_reference": (boot["comparisons"].get(f"{name} - reference[{agent}]")
                            if agent else None),
        **rater_scores(rater, name)})
  return rows


def action_space(config: Mapping[str, Any]) -> str:
  """A run's action space in words, from its report's config (``report["config"]``)."""
  a = config.get("actions", {})
  space = a.get("space", "default")
  text = {"default": "default", "macro": f"macro ({a.get('macro_size')} actions per step)",
          "combined": f"combined ({a.get('macro_k')} of K macro)"}.get(space, space)
  if not a.get("personalised", False):
    text += ", no personalised actions"
  return f"{text}, K={a.get('k')}, H={config.get('rl', {}).get('horizon')}"


def table4(reports: Mapping[str, Mapping[str, Any]], split: str) -> list[dict[str, Any]]:
  """Table 4's rows: one per run (label -> its report), the run's main agent on ``split``.

  Returns:
    Rows ``{run, action_space, agent, gain, random_gain, minus_random, minus_reference,
    final_utility, anchors, pairs}`` (intervals by the anchor bootstrap).

  Raises:
    ValueError: naming the run whose report lacks ``split``.
  """
  rows = []
  for label, report in reports.items():
    if split not in report.get("splits", {}):
      raise ValueError(f"run {label!r}: its report has no split {split!r} (has "
                       f"{sorted(report.get('splits', {}))})")
    s = report["splits"][split]
    main = f"agent[{report['main_reference']}]"
    boot = s["anchor_bootstrap"]
    rows.append({
        "run": label, "action_space": action_space(report.get("config", {})), "agent": main,
        "gain": boot["gain"][main], "random_gain": boot["gain"]["random"],
        "minus_random": boot["comparisons"][f"{main} - random"],
        "minus_reference": boot["comparisons"][f"{main} - reference[{report['main_reference']}]"],
        "final_utility": s["policies"][main]["final_utility"], "anchors": s["anchors"],
        "pairs": s["pairs"],
        **rater_scores(rater_split(report, split), main)})
  return rows


def interval(x: Mapping[str, Any] | None) -> str:
  """``+0.123 [-0.045, +0.301]`` (``-`` for no value, ``n/a`` for an interval that needs more
  than one anchor)."""
  if x is None:
    return "-"
  lo, hi = x.get("ci_low"), x.get("ci_high")
  if lo is None or hi is None or math.isnan(lo) or math.isnan(hi):
    return f"{x['mean']:+.3f} [n/a]"
  return f"{x['mean']:+.3f} [{lo:+.3f}, {hi:+.3f}]"


def markdown(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> str:
  """A markdown table of ``rows`` (interval dicts rendered by ``interval``, floats to 3 places)."""
  def cell(v) -> str:
    if isinstance(v, Mapping) or v is None:
      return interval(v)
    return f"{v:.3f}" if isinstance(v, float) else str(v)

  lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
  lines += ["| " + " | ".join(cell(r.get(c)) for c in columns) + " |" for r in rows]
  return "\n".join(lines)


def _rater_columns(rows: Sequence[Mapping[str, Any]]) -> tuple[str, ...]:
  return tuple(dict.fromkeys(c for r in rows for c in r if c.startswith("rater_")))


def table2_markdown(split: Mapping[str, Any], rater: Mapping[str, Any] | None = None) -> str:
  """Table 2 of one split as markdown (with the rater's columns when ``rater`` is given)."""
  rows = table2(split, rater)
  return markdown(rows, _ROW_COLUMNS + _rater_columns(rows))


def table4_markdown(rows: Sequence[Mapping[str, Any]]) -> str:
  """Table 4 (``table4``'s rows) as markdown (with rater columns where a run has a rater)."""
  return markdown(rows, ("run", "action_space", "agent", "gain", "random_gain", "minus_random",
                         "minus_reference", "final_utility", "anchors") + _rater_columns(rows))
