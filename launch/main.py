r"""The quick-start main job: offline assets, behavioural latent space, evaluation from the checkpoint.

  python -m launch.main --workdir=runs/quickstart [--config=configs/wals_ml100k.py]

Steps (each resumable; rerunning with the same ``--workdir`` continues where it stopped):
1. fetch the pinned offline assets (SmolLM2 GGUF, MiniLM, MovieLens-100K) into the cache;
2. train WALS user/item factors on MovieLens-100K with the per-user time split
   (``launch.wals``: orbax checkpoints, ``embeddings.npz``, ``report.json``);
3. restore the factors from the newest orbax checkpoint in a fresh ``Checkpointer`` and evaluate them
   again, checking that the restored metrics equal those of the training run;
4. write ``summary.json`` and print the headline numbers.

When the EAGLE trainer lands (issue 7) this job becomes the CPU smoke training of the agent followed
by ``launch.evaluate`` on its checkpoint.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence

from absl import app, flags
from ml_collections import config_flags

from eagle_jax import assets, checkpoint, data
from eagle_jax.embed import wals, wals_train

_CONFIG = config_flags.DEFINE_config_file(
    "config", os.path.join(os.path.dirname(__file__), "..", "configs", "wals_ml100k.py"),
    "WALS configuration of the behavioural latent space.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Output folder; the job resumes from it.")


def evaluate_from_checkpoint(config, workdir: str) -> dict:
  """Restores the newest WALS checkpoint of ``workdir`` and recomputes the report metrics."""
  ratings = wals_train.load_data(config.data)
  train, test = data.split(ratings, test_fraction=config.data.test_fraction,
                           min_train=config.data.min_train)
  with checkpoint.Checkpointer(os.path.join(workdir, "checkpoints")) as ckpt:
    step, state, _ = ckpt.restore()
  factors = wals.WALSFactors.from_dict(state)
  return {"step": step, **wals_train.evaluate(factors, train, test, config.eval)}


def run(config, workdir: str) -> dict:
  t0 = time.perf_counter()
  for asset in assets.ALL_ASSETS:
    assets.fetch(asset, progress=lambda msg: print(msg, flush=True))
  wals_dir = os.path.join(workdir, "wals")
  print(f"[main] training WALS embeddings into {wals_dir}", flush=True)
  report = wals_train.run(config, wals_dir)
  restored = evaluate_from_checkpoint(config, wals_dir)
  trained = report["metrics"]
  mismatch = {k: (trained[k], restored[k]) for k in trained
              if isinstance(trained[k], float) and abs(trained[k] - restored[k]) > 1e-6}
  if mismatch:
    raise RuntimeError(f"metrics from the restored checkpoint differ from training: {mismatch}")
  summary = {
      "data": report["data"],
      "wals_checkpoint_step": restored["step"],
      "metrics_from_checkpoint": restored,
      "seconds_per_sweep_steady": report["seconds_per_sweep_steady"],
      "peak_rss_bytes": report["peak_rss_bytes"],
      "wall_seconds": time.perf_counter() - t0,
  }
  with open(os.path.join(workdir, "summary.json"), "w") as f:
    json.dump(summary, f, indent=2, default=float)
  print(f"[main] {report['data']['num_users']} users x {report['data']['num_items']} items; "
        f"restored sweep {restored['step']}: test RMSE {restored['test_rmse']:.4f}, "
        f"recall@{config.eval.recall_k} {restored[f'recall@{config.eval.recall_k}']:.4f}; "
        f"summary in {os.path.join(workdir, 'summary.json')}", flush=True)
  return summary


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not _WORKDIR.value:
    raise app.UsageError("--workdir is required")
  os.makedirs(_WORKDIR.value, exist_ok=True)
  if not os.access(_WORKDIR.value, os.W_OK):
    raise app.UsageError(f"--workdir {_WORKDIR.value!r} is not writable")
  run(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
  app.run(main)
