r"""Trains EAGLE agents (one per reference policy) and resumes from ``--workdir``.

  python -m launch.train --workdir=runs/smoke [--config=configs/movielens_smoke.py] \
      [--config.rl.steps=100]

Builds (or restores) the world in the workdir (WALS, E_D, environment cache, anchors, actions), then
trains ``config.reference.kinds`` in turn into ``<workdir>/agents/<kind>`` (orbax checkpoints,
metrics.jsonl, TensorBoard). Killing and rerunning the same command continues from the newest
checkpoint. Multi-host TPU pods: build the world once with ``--prepare_only`` on one host, then start
every host with ``--config.distributed=True`` (see ``launch/tpu_vm.sh``); each host appends the
environment answers it computes to its own ``env/cache.<process>.jsonl``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

from absl import app, flags, logging

from eagle_jax import cli, training
from eagle_jax.agent import dry_run, trainer
from eagle_jax.agent.world import build_world
from launch import job

_CONFIG = cli.define_config(
    "config", os.path.join(os.path.dirname(__file__), "..", "configs", "movielens_smoke.py"),
    "EAGLE run configuration.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Run folder; the job resumes from it.")
_PREPARE_ONLY = flags.DEFINE_bool(
    "prepare_only", False, "Only build the world (WALS, E_D, environment cache) and exit; on "
    "multi-host pods run this once on one host before starting every host.")
_DRY_RUN = flags.DEFINE_bool(
    "dry_run", False, "Only build the mesh, sharded shapes and the AOT-compiled train step.")


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  training.quiet_library_logs()
  if _DRY_RUN.value:
    try:
      print(json.dumps(dry_run.dry_run(_CONFIG.value), indent=2, default=str), flush=True)
    except training.ConfigError as e:
      raise app.UsageError(str(e)) from e
    return

  def prepare():
    world = build_world(_CONFIG.value, _WORKDIR.value)
    print(f"[train] world ready in {_WORKDIR.value}: {len(world.anchors)} anchors, "
          f"{len(world.train_pairs)} train pairs", flush=True)

  if _PREPARE_ONLY.value:
    job.run(_WORKDIR.value, prepare, name="train", config=_CONFIG.value)
    return
  summary = job.run(_WORKDIR.value, lambda: trainer.run(_CONFIG.value, _WORKDIR.value),
                    name="train", config=_CONFIG.value, distributed=bool(_CONFIG.value.distributed))
  logging.info("train summary: %s", json.dumps(summary, default=float)[:2000])


if __name__ == "__main__":
  cli.run(main)
