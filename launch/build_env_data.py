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

from absl import app, flags, logging
from ml_collections import config_flags

from eagle_jax import data
from eagle_jax.env import build
from eagle_jax.env.cache import CachedClient, ResponseCache

_CONFIG = config_flags.DEFINE_config_file("config", None, "Environment data configuration.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Output folder (JSONL files, cache, report).")


def load_ratings(source: str):
  if source == "ml100k":
    return data.load_ml100k_assets()
  if not os.path.isdir(source):
    raise ValueError(f"config.data_source: expected 'ml100k' or a MovieLens folder, got {source!r}")
  return data.load_movielens(source)


async def build_all(config, workdir: str, sampler, encode) -> dict:
  """Runs the three stages through ``CachedClient(sampler)``; returns the report."""
  ratings = load_ratings(config.data_source)
  gen = build.GenerationConfig.from_config(config.generation)
  movies = build.movies_from_ratings(ratings, build.most_rated_items(ratings, config.num_movies))
  users = build.users_from_ratings(ratings, build.most_active_users(ratings, config.num_users),
                                   config.profile_titles)
  cache = ResponseCache(os.path.join(workdir, "responses.jsonl"))
  cached = CachedClient(sampler, cache, model_id=config.llm.model_id)
  client = build.BatchingClient(cached)
  report: dict = {"config": config.to_dict(), "model": config.llm.model_id, "stages": {}}
  paths = {k: os.path.join(workdir, f"{k}.jsonl") for k in ("descriptions", "profiles", "actions")}

  async def stage(name, coro):
    hits, misses, t0 = cached.hits, cached.misses, time.perf_counter()
    records = await coro
    report["stages"][name] = {"records": len(records), "seconds": time.perf_counter() - t0,
                              "cache_hits": cached.hits - hits,
                              "cache_misses": cached.misses - misses}
    logging.info("%s: %s", name, report["stages"][name])
    return records

  descs = await stage("descriptions", build.describe_movies(client, movies, gen,
                                                            paths["descriptions"]))
  profiles = await stage("profiles", build.profile_users(client, users, gen, paths["profiles"]))
  sets = await stage("actions", build.build_action_sets(
      client, encode, descs, profiles, k=config.actions.k, llm_calls=config.actions.llm_calls,
      gen=gen, dedupe_threshold=config.actions.dedupe_threshold, out_path=paths["actions"]))
  await client.aclose()
  cache.close()
  report["stages"]["descriptions"].update(
      ok=sum(bool(d["ok"]) for d in descs),
      parse_failures=sum(d["provenance"]["parse_failures"] for d in descs),
      mean_likes=sum(len(d["likes"]) for d in descs) / max(1, len(descs)),
      mean_dislikes=sum(len(d["dislikes"]) for d in descs) / max(1, len(descs)))
  report["stages"]["profiles"].update(
      ok=sum(bool(p["ok"]) for p in profiles),
      parse_failures=sum(p["provenance"]["parse_failures"] for p in profiles))
  report["stages"]["actions"].update(
      parse_failures=sum(s["stats"]["parse_failures"] for s in sets),
      llm_actions=sum(a["source"] == "llm" for s in sets for a in s["actions"]),
      template_actions=sum(a["source"] == "template" for s in sets for a in s["actions"]),
      min_k=min((len(s["actions"]) for s in sets), default=0))
  with open(os.path.join(workdir, "build_report.json"), "w") as f:
    json.dump(report, f, indent=2)
  return report


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if _WORKDIR.value is None:
    raise app.UsageError("--workdir is required")
  from eagle_jax.env.local import LocalSampler  # noqa: PLC0415 (heavy: JAX model code)
  from eagle_jax.models.text_encoder import SentenceEncoder  # noqa: PLC0415

  config = _CONFIG.value
  os.makedirs(_WORKDIR.value, exist_ok=True)
  t0 = time.perf_counter()
  sampler = LocalSampler.from_gguf(config.llm.gguf or None, chat=True,
                                   model_id=config.llm.model_id,
                                   batch_buckets=tuple(config.llm.batch_buckets))
  encoder = SentenceEncoder.from_pretrained()
  report = asyncio.run(build_all(config, _WORKDIR.value, sampler, encoder.encode))
  report["seconds_total"] = time.perf_counter() - t0
  with open(os.path.join(_WORKDIR.value, "build_report.json"), "w") as f:
    json.dump(report, f, indent=2)
  print(json.dumps(report["stages"], indent=2))


if __name__ == "__main__":
  flags.mark_flags_as_required(["config"])
  app.run(main)
