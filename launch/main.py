r"""The quick-start main job: EAGLE CPU smoke training, then evaluation from its orbax checkpoints.

  python -m launch.main --workdir=runs/quickstart [--config=configs/movielens_smoke.py]

1. fetches the pinned offline assets (SmolLM2 GGUF, MiniLM, MovieLens-100K) into the cache;
2. ``launch.train``: builds the world (WALS on ML-100K, E_D, environment cache, anchors and candidate
   actions) and trains one agent per reference policy (uniform, optimistic, G-optimal), with orbax
   checkpoints under ``<workdir>/agents/<kind>``;
3. ``launch.evaluate``: restores every agent from its newest checkpoint and evaluates it on held-out
   (user, anchor) pairs against random actions and its untrained reference policy
   (``<workdir>/eval/report.json`` and PNG plots per held-out split).

Each step resumes: rerunning the command with the same ``--workdir`` continues where it stopped.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence

import jax
from absl import app, flags

from eagle_jax import assets, cli, paths, training
from eagle_jax.agent import trainer
from eagle_jax.agent.world import build_world
from eagle_jax.evaluation import agent_eval
from launch import job

_CONFIG = cli.define_config(
    "config", os.path.join(os.path.dirname(__file__), "..", "configs", "movielens_smoke.py"),
    "EAGLE run configuration.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Run folder; the job resumes from it.")


def run(config, workdir: str) -> dict:
  t0 = time.perf_counter()
  training.check_workdir(workdir)
  trainer.validate(config, training.build_mesh(config.mesh))
  agent_eval.EvalConfig.from_config(config.eval)  # evaluation runs last: check its fields first
  assets.fetch_all(progress=lambda msg: print(msg, flush=True))
  trainer.check_prepared(workdir)
  world = build_world(config, workdir)
  print(f"[main] world ready in {time.perf_counter() - t0:.0f} s; training agents for "
        f"{list(config.reference.kinds)}", flush=True)
  summary = trainer.run(config, workdir, world=world)
  report = agent_eval.run(config, workdir, world=world)
  out = {"wall_seconds": time.perf_counter() - t0, "train": summary,
         "headline": {s: r["headline"] for s, r in report["splits"].items()},
         "env": report["env"]}
  if jax.process_index() == 0:
    paths.write_text(os.path.join(workdir, "summary.json"),
                     json.dumps(out, indent=2, default=float))
  print(f"[main] done in {out['wall_seconds']:.0f} s; summary in "
        f"{os.path.join(workdir, 'summary.json')}", flush=True)
  return out


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  training.quiet_library_logs()
  job.run(_WORKDIR.value, lambda: run(_CONFIG.value, _WORKDIR.value), name="main", config=_CONFIG.value,
          distributed=bool(_CONFIG.value.distributed))


if __name__ == "__main__":
  cli.run(main)
