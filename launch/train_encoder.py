r"""Trains the encoder E_D (MiniLM + MLP head onto WALS item vectors) and reports held-out metrics.

  python -m launch.train_encoder --config=configs/encoder_ml100k.py --workdir=/tmp/encoder \
      [--config.embeddings=/tmp/wals/embeddings.npz --config.descriptions=/tmp/envdata/...]

Outputs in ``--workdir``: ``checkpoints/<steps>/`` (orbax: head parameters, target mean and scale,
config), ``report.json`` (held-out R^2 and NN recall@k of the head, a genre-only ridge baseline and
a MiniLM ridge baseline), ``split.npz`` and ``texts.jsonl`` (the rows), and ``wals/`` when WALS was
trained here. ``eagle_jax/embed/encoder_train.py`` documents the choices.
"""

from __future__ import annotations

import json

from absl import app, flags

from eagle_jax import cli
from eagle_jax.embed import encoder_train
from launch import job

_CONFIG = cli.define_config("config", None, "Encoder configuration file.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Output folder (checkpoint, report).")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if _WORKDIR.value is None:
    raise app.UsageError("--workdir is required")
  report = job.run(_WORKDIR.value, lambda: encoder_train.run(_CONFIG.value, _WORKDIR.value),
                   name="train_encoder", config=_CONFIG.value)
  m = report["metrics"]
  print(json.dumps({"heldout_r2": m["heldout_r2"], "genre_baseline_r2": m["genre_baseline_r2"],
                    "metadata": m["metadata"], "description": m["description"],
                    "seconds": report["seconds"]}, indent=2))


if __name__ == "__main__":
  cli.run(main, required=["config", "workdir"])
