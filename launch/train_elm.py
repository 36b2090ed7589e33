r"""Trains an ELM (adapter E_A into SmolLM2) and reports semantic / behavioural consistency.

  python -m launch.train_elm --config=configs/elm_ml100k.py --workdir=/tmp/elm \
      [--config.train.stage1_steps=300 --config.encoder_dir=/tmp/encoder ...]

Outputs in ``--workdir``: ``checkpoints/<step>/`` (orbax; a rerun resumes from the latest),
``metrics.jsonl`` and ``tensorboard/``, ``responses.jsonl`` (the environment LLM's response cache of
the targets), ``examples.jsonl`` (training targets), ``report.json`` (SC of the trained ELM vs the
title-only prompt vs a random-embedding control on held-out movies, interpolations, BC of user
profiles) and ``encoder/`` when E_D was trained here. ``eagle_jax/elm/trainer.py`` documents it.
"""

from __future__ import annotations

import json
import os

from absl import app, flags
from ml_collections import config_flags

from eagle_jax import training
from eagle_jax.elm import trainer

_CONFIG = config_flags.DEFINE_config_file(
    "config", os.path.join(os.path.dirname(__file__), "..", "configs", "elm_ml100k.py"),
    "ELM configuration file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run folder (checkpoints, metrics, report).")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if _WORKDIR.value is None:
    raise app.UsageError("--workdir is required")
  training.quiet_library_logs()
  try:
    report = trainer.run(_CONFIG.value, _WORKDIR.value)
  except training.ConfigError as e:
    raise app.UsageError(str(e)) from e
  print(json.dumps({"headline": report.get("headline"), "seconds": report["seconds"],
                    "bc": report.get("eval", {}).get("behavioural_consistency", {}).get("elm")},
                   indent=2))


if __name__ == "__main__":
  app.run(main)
