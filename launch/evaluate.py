r"""Evaluates the EAGLE agents of a run from their orbax checkpoints on held-out pairs.

  python -m launch.evaluate --workdir=runs/smoke [--config=configs/movielens_smoke.py]

Writes ``<workdir>/eval/report.json`` (utility gain over the anchor with confidence intervals per
policy: random actions, each untrained reference policy, each trained agent; paired comparisons;
distances to the nearest existing items; sample trajectories as text) and per split
``gain_<split>.png``, ``utility_by_step_<split>.png``. The config must be the one the run was
trained with (same overrides).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from absl import app, flags

from eagle_jax import cli, training
from eagle_jax.evaluation import agent_eval
from launch import job

_CONFIG = cli.define_config(
    "config", os.path.join(os.path.dirname(__file__), "..", "configs", "movielens_smoke.py"),
    "EAGLE run configuration (as trained).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Run folder written by launch.train.")


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  training.quiet_library_logs()
  job.run(_WORKDIR.value, lambda: agent_eval.run(_CONFIG.value, _WORKDIR.value), name="evaluate",
          config=_CONFIG.value, distributed=bool(_CONFIG.value.distributed))


if __name__ == "__main__":
  cli.run(main)
