"""The ELM job: ``run(config, workdir)`` is what ``python -m launch.train_elm`` calls.

1. **Embeddings** (``data.load_encoder``): E_D (``encoder_dir``, or trained into
   ``<workdir>/encoder`` with WALS) gives the WALS ``embeddings.npz``; movies use the augmented item
   vectors ``[y_i, 1, c_i, 1]`` (EAGLE's Z), users ``[x_u, b_u, 1, mu]``, standardised per column
   (``data.domain_tables``).
2. **Model** (``model.build_parts``): the decoder and the adapter as functional models, parameters
   created sharded on the mesh of ``config.mesh``.
3. **Examples** (``data.prepare``): targets from the environment LLM (the decoder before training)
   through ``CachedClient`` (``responses.jsonl``); written to ``examples.jsonl``.
4. **Training** (``train_loop.TrainLoop``): stage 1 (adapter only), then stage 2 (adapter and
   decoder), resuming from ``<workdir>/checkpoints``; metrics in ``metrics.jsonl``.
5. **Report** (``report.json``): the data and training summary and, with ``eval.enabled``, the
   SC / BC report of ``evaluation.evaluate`` with its headline numbers.

``validate_config`` checks the whole config once, before any compute; the stages get their
sub-configs. ``load_elm(workdir)`` restores the trained ELM of a run folder.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from absl import logging

from eagle_jax import checkpoint, checks, paths, training
from eagle_jax.elm import data as data_lib
from eagle_jax.elm import evaluation, train_loop
from eagle_jax.elm import model as model_lib
from eagle_jax.elm import tasks as tasks_lib
from eagle_jax.embed import encoder_train
from eagle_jax.models import sampling as sampling_lib
from eagle_jax.models.sampling_params import SamplingParams

# open_env(sampler, model_name) -> an env.stack.LLMStack-like object with client, cached, aclose.
OpenEnv = Callable[[Any, "str | None"], Any]

ConfigError = training.ConfigError


def validate_config(config) -> None:
  """Raises ``ConfigError`` naming the first invalid field."""
  def positive_int(field: str, value, allow_zero: bool = False):
    if isinstance(value, bool) or not isinstance(value, int) or value < (0 if allow_zero else 1):
      raise ConfigError(f"config.{field}: expected an int >= {0 if allow_zero else 1}, "
                        f"got {value!r}")

  if config.decoder.kind not in ("gguf", "random"):
    raise ConfigError(f"config.decoder.kind: expected 'gguf' or 'random', got "
                      f"{config.decoder.kind!r}")
  if config.decoder.gguf:
    checks.check_input_path(config.decoder.gguf, "config.decoder.gguf")
  if config.encoder_dir:
    checks.check_input_path(config.encoder_dir, "config.encoder_dir", kind="dir")
  else:
    encoder_train.check_config(config.encoder, "config.encoder")
  for f in ("hidden", "n_tokens"):
    positive_int(f"adapter.{f}", config.adapter[f])
  if not float(config.adapter.out_scale) > 0:
    raise ConfigError(f"config.adapter.out_scale: expected > 0, got {config.adapter.out_scale!r}")
  tasks = tuple(config.data.movie_tasks)
  for t in tasks:
    if t not in tasks_lib.TASKS or tasks_lib.TASKS[t].domains != ("movie",):
      raise ConfigError(f"config.data.movie_tasks: {t!r} is not a single-movie task; known: "
                        f"{sorted(k for k, v in tasks_lib.TASKS.items() if v.domains == ('movie',))}")
  positive_int("data.train_movies", config.data.train_movies)
  positive_int("data.test_movies", config.data.test_movies)
  for f in ("comparison_pairs", "train_users", "test_users"):
    positive_int(f"data.{f}", config.data[f], allow_zero=True)
  if config.data.train_movies < 2 and config.data.comparison_pairs:
    raise ConfigError("config.data.comparison_pairs needs config.data.train_movies >= 2")
  if isinstance(config.data.target_tokens, bool) or not isinstance(
      config.data.target_tokens, int) or config.data.target_tokens < 8:
    raise ConfigError(f"config.data.target_tokens: expected an int >= 8, got "
                      f"{config.data.target_tokens!r}")
  positive_int("train.stage1_steps", config.train.stage1_steps, allow_zero=True)
  positive_int("train.stage2_steps", config.train.stage2_steps, allow_zero=True)
  if config.train.stage1_steps + config.train.stage2_steps < 1:
    raise ConfigError("config.train.stage1_steps + config.train.stage2_steps must be >= 1")
  for f in ("batch_size", "save_every", "max_to_keep", "log_every"):
    positive_int(f"train.{f}", config.train[f])
  for stage in ("stage1_optimizer", "stage2_optimizer"):
    lr = config.train[stage].learning_rate
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not lr > 0:
      raise ConfigError(f"config.train.{stage}.learning_rate: expected > 0, got {lr!r}")
  for f in ("batch", "max_new_tokens", "bc_movies"):
    positive_int(f"eval.{f}", config.eval[f])
  for f in ("interpolations", "random_embeddings", "train_movies"):
    positive_int(f"eval.{f}", config.eval[f], allow_zero=True)
  positive_int("targets.retries", config.targets.retries, allow_zero=True)
  positive_int("targets.seed", config.targets.seed, allow_zero=True)
  try:
    SamplingParams.from_config(config.targets.sampling, "config.targets.sampling")
  except ValueError as e:
    raise ConfigError(str(e)) from None


def _headline(sc: dict[str, Any]) -> dict[str, Any]:
  """Mean cos / rank / top-10 (and mismatched SC) of each SC entry, and whether the ELM wins."""
  out: dict[str, Any] = {
      k: {"cos": v["cos"]["mean"], "rank": v["rank"]["mean"], "top10": v["top10"],
          **({"mismatched_cos": v["mismatched_cos"],
              "own_rank_among_set": v["own_rank_among_set"]["mean"]}
             if "mismatched_cos" in v else {})}
      for k, v in sc.items()}
  out["elm_beats_title_only_and_random"] = bool(
      sc["elm"]["cos"]["mean"] > sc["title_only"]["cos"]["mean"]
      and sc["elm"]["cos"]["mean"] > sc.get("random_embedding_control", {}).get(
          "cos", {}).get("mean", -np.inf))
  return out


def run(config, workdir: str, *, open_env: OpenEnv) -> dict[str, Any]:
  """Prepares data, trains (resuming), evaluates; writes ``report.json``. Returns the report.

  Args:
    config: the ELM config (``configs/elm_ml100k.py``), validated here.
    workdir: run folder.
    open_env: builds the environment LLM's client stack that writes the targets, as
      ``open_env(sampler, model_name)``: ``sampler`` is a ``sampling.Sampler`` of the untrained
      decoder (the local environment shares its weights) and ``model_name`` the cache identity of
      those weights when they come from no file (a random decoder), else None. The launcher passes
      ``env.stack.open_llm`` over ``config.llm``.
  """
  from eagle_jax.embed import wals_train  # noqa: PLC0415

  t_start = time.perf_counter()
  validate_config(config)
  training.check_workdir(workdir)
  mesh = training.build_mesh(config.mesh)
  training.check_divisible(config.train.batch_size, mesh, "config.train.batch_size")
  seconds: dict[str, float] = {}

  t0 = time.perf_counter()
  ed, enc_meta, enc_dir = data_lib.load_encoder(config.encoder_dir, config.encoder, workdir)
  ratings = wals_train.load_data(config.encoder.wals.data)
  latent = wals_train.load_npz(enc_meta["embeddings"], item_ids=np.asarray(ratings.item_ids),
                               user_ids=np.asarray(ratings.user_ids))
  item_z, user_z = latent["item_augmented"], latent["user_augmented"]
  seconds["encoder_and_embeddings"] = time.perf_counter() - t0

  t0 = time.perf_counter()
  in_dim = int(item_z.shape[1])
  parts, dec_params = model_lib.build_parts(config.decoder, config.adapter, mesh, in_dim)
  seconds["load_decoder"] = time.perf_counter() - t0
  norms, tables = data_lib.domain_tables(item_z, user_z)

  t0 = time.perf_counter()
  with jax.set_mesh(mesh):
    env_model = parts.decoder_fm.module(dec_params)
  env_sampler = sampling_lib.Sampler(env_model, parts.tokenizer, mesh=mesh)
  random_name = None
  if config.decoder.kind == "random":
    blob = json.dumps({"random": config.decoder.random.to_dict(), "seed": config.adapter.seed},
                      sort_keys=True)
    random_name = "local-jax:random-" + hashlib.sha256(blob.encode()).hexdigest()[:16]
  env = open_env(env_sampler, random_name)
  client = env.cached
  try:
    split, examples, records = data_lib.prepare(
        config.data, env.client, ratings, tokenizer=parts.tokenizer,
        sampling=config.targets.sampling, seed=config.targets.seed,
        retries=config.targets.retries,
        ed_heldout=data_lib.encoder_heldout(enc_dir, ratings.num_items))
  finally:
    asyncio.run(env.aclose())
  seconds["targets"] = time.perf_counter() - t0
  paths.write_text(os.path.join(workdir, "examples.jsonl"), "".join(
      json.dumps({"task": e.task, "slots": list(e.slots), "target": e.target,
                  "split": "train" if e in examples else "reference"}) + "\n"
      for e in examples + split["reference"]))
  failures = sum(not r["parsed"] for r in records)
  logging.info("%d training examples (%d env answers, %d unparsable; cache hits %d, misses %d)",
               len(examples), len(records), failures, client.hits, client.misses)

  data = data_lib.make_dataset(examples, parts, tables, config.data.target_tokens)
  meta = {"config": config.to_dict(), "in_dim": in_dim,
          "norms": {str(k): [v[0].tolist(), v[1].tolist()] for k, v in norms.items()},
          "prompt_len": data.prompt_len, "embeddings": enc_meta["embeddings"]}
  t0 = time.perf_counter()
  loop = train_loop.TrainLoop(config.train, parts, data)
  state, dec_params, _ = loop.train(workdir, dec_params, meta)
  seconds["train"] = time.perf_counter() - t0
  # The whole history, including steps of earlier (interrupted) invocations in this workdir.
  train_records = training.read_metrics(os.path.join(workdir, "metrics.jsonl"))

  report: dict[str, Any] = {
      "data": {"train_examples": len(examples), "per_task": {
          t: sum(e.task == t for e in examples) for t in tasks_lib.TASKS},
               "test_movies": [int(i) for i in split["test_movies"]],
               "test_titles": [str(ratings.titles[i]) for i in split["test_movies"]],
               "test_users": [int(u) for u in split["test_users"]],
               "env_answers": len(records), "env_unparsable": failures,
               "cache_hits": client.hits, "cache_misses": client.misses,
               "prompt_len": data.prompt_len, "target_len": data.target_len},
      "train": {"records": train_records,
                "first_loss_window": (train_records[0].get("loss_window")
                                      if train_records else None),
                "last_loss_window": (train_records[-1].get("loss_window")
                                     if train_records else None)},
      "devices": jax.device_count(), "mesh": dict(mesh.shape)}
  if config.eval.enabled:
    from eagle_jax.models.text_encoder import SentenceEncoder  # noqa: PLC0415

    t0 = time.perf_counter()
    encoder = SentenceEncoder.from_pretrained(config.encoder.minilm or None)
    elm = model_lib.ELM(parts, state["adapter"], dec_params, norms, batch=config.eval.batch)
    report["eval"] = evaluation.evaluate(config.eval, elm, encode=encoder.encode, ed=ed,
                                         ratings=ratings, item_z=item_z, user_z=user_z,
                                         split=split)
    seconds["eval"] = time.perf_counter() - t0
    report["headline"] = _headline(report["eval"]["semantic_consistency"])
  seconds["total"] = time.perf_counter() - t_start
  report["seconds"] = seconds
  report["config"] = config.to_dict()
  paths.write_text(os.path.join(workdir, "report.json"),
                   json.dumps(report, indent=2, default=float))
  return report


def load_elm(workdir: str, config=None, *, mesh=None, batch: int = 8) -> model_lib.ELM:
  """Restores the trained ELM of a ``run`` folder (latest checkpoint).

  Args:
    workdir: the run folder.
    config: the run's config (default: the one saved with the checkpoint).
    mesh: where to place the parameters (default: ``config.mesh``).
    batch: decode batch size of the ELM.

  Raises:
    FileNotFoundError: no checkpoint in ``<workdir>/checkpoints``.
  """
  import ml_collections  # noqa: PLC0415

  ckpt_dir = os.path.join(workdir, "checkpoints")
  ckpt = checkpoint.Checkpointer(ckpt_dir)
  try:
    if ckpt.latest_step() is None:
      raise FileNotFoundError(f"no ELM checkpoint in {ckpt_dir}")
    meta = ckpt.metadata()
  finally:
    ckpt.close()
  config = config or ml_collections.ConfigDict(meta["config"])
  mesh = mesh or training.build_mesh(config.mesh)
  parts, dec_params = model_lib.build_parts(config.decoder, config.adapter, mesh,
                                            int(meta["in_dim"]))
  params, _ = train_loop.restore_trained(ckpt_dir, parts, config.train)
  norms = {int(k): (np.asarray(v[0]), np.asarray(v[1])) for k, v in meta["norms"].items()}
  return model_lib.ELM(parts, params["adapter"], params.get("decoder", dec_params), norms,
                       batch=batch)
