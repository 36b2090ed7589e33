r"""Builds the EAGLE environment data: movie descriptions, user profiles, candidate action sets.

  python -m launch.build_env_data --config=configs/env_ml100k.py --workdir=/tmp/envdata \
      [--config.num_movies=100 ...]

Outputs in ``--workdir`` (``eagle_jax.env.build`` documents the record formats):
* ``responses.jsonl``: the environment LLM's response cache (a rerun is served from it);
* ``descriptions.jsonl``, ``profiles.jsonl``, ``actions.jsonl``: records with provenance;
* ``build_report.json``: counts, parse failures, cache hits/misses and wall time per stage.

Rerunning with the same workdir skips every record already written (and answers every request
already cached), so an interrupted build continues where it stopped.
"""

from __future__ import annotations

import asyncio
import json
import os
import time

from absl import app, flags

from eagle_jax import checks, cli, data, paths
from eagle_jax.data import catalog
from eagle_jax.env import build, stack
from eagle_jax.models.text_encoder import SentenceEncoder
from launch import job

_CONFIG = cli.define_config("config", None, "Environment data configuration.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Output folder (JSONL files, cache, report).")


def _ratings(source: str):
  if source == "ml100k":
    return data.load_ml100k_assets()
  checks.check_input_path(source, "config.data_source (expected 'ml100k' or a MovieLens folder)",
                          kind="dir")
  return data.load_movielens(source)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  config, workdir = _CONFIG.value, _WORKDIR.value
  try:
    stack.check_llm_config(config.llm)
    build.check_config(config)
    ratings = _ratings(config.data_source)
  except ValueError as e:
    raise app.UsageError(str(e)) from None
  job.run(workdir, lambda: _build(config, workdir, ratings), name="build_env_data", config=config)


def _build(config, workdir: str, ratings) -> None:
  t0 = time.perf_counter()
  movies = catalog.movies_from_ratings(ratings,
                                       catalog.most_rated_items(ratings, config.num_movies))
  users = catalog.users_from_ratings(ratings, catalog.most_active_users(ratings, config.num_users),
                                     int(config.profiles.titles))
  llm = stack.open_llm(config.llm, os.path.join(workdir, "responses.jsonl"))
  encoder = SentenceEncoder.from_pretrained()

  async def run():
    try:
      return await build.build_env_data(config, llm.client, encoder.encode, movies, users, workdir,
                                        stats=llm.counters)
    finally:
      await llm.aclose()

  result = asyncio.run(run())
  report = {"config": config.to_dict(), "model": llm.model_name, **result.report,
            "seconds_total": time.perf_counter() - t0}
  paths.write_text(os.path.join(workdir, "build_report.json"), json.dumps(report, indent=2))
  print(json.dumps(report["stages"], indent=2))


if __name__ == "__main__":
  cli.run(main, required=["config", "workdir"])
