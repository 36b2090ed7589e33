r"""Trains WALS behavioural embeddings, checkpoints them, exports them and writes a JSON report.

  python -m launch.wals --config=configs/wals_ml100k.py --workdir=/tmp/wals_ml100k \
      [--config.wals.rank=32 ...]

Outputs in ``--workdir``:
* ``checkpoints/<sweep>/``: orbax checkpoints of the factors (``eagle_jax.checkpoint``); a rerun
  resumes from the latest one and only runs the remaining sweeps.
* ``embeddings.npz`` (no pickle): ``user_factors`` [U, k], ``item_factors`` [I, k], ``user_bias``
  [U], ``item_bias`` [I], ``global_mean`` [], ``user_ids`` [U] and ``item_ids`` [I] (raw MovieLens ids).
* ``report.json``: data summary, config, train/test RMSE of the predicted rating (unclipped and
  clipped to the rating scale), recall@k on held-out items (relevant = held-out rating >=
  ``eval.relevant_min_rating``), time per sweep, objective per sweep, peak resident memory.
"""

from __future__ import annotations

from absl import app, flags

from eagle_jax import cli
from eagle_jax.embed import wals_train
from launch import job

_CONFIG = cli.define_config("config", None, "WALS configuration file.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Output folder (checkpoints, export, report).")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if _WORKDIR.value is None:
    raise app.UsageError("--workdir is required")
  job.run(_WORKDIR.value, lambda: wals_train.run(_CONFIG.value, _WORKDIR.value), name="wals",
          config=_CONFIG.value)


if __name__ == "__main__":
  cli.run(main, required=["config", "workdir"])
