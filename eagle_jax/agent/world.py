"""Everything an EAGLE run needs besides the agent: latent space, E_D, environment, anchors, users.

``build_world(config, workdir)`` is idempotent and resumable. It validates its part of the config
once (``check_config``) and composes phases that each call one library function:

1. latent space: ``embed.wals_train.run`` into ``wals/`` (``embeddings.npz``). Z is the augmented
   space of ``WALSFactors.augmented``: <z_u, z_i> is the WALS prediction. With the smoke config's
   implicit-feedback WALS that is the rating where one was given and ~0 elsewhere, so it scores
   preference and exposure together, as the paper's Hu-Koren-Volinsky factors do;
2. the environment LLM: ``env.stack.open_llm(config.llm, env/cache.jsonl)`` (local sampler or a
   server, behind the response cache, so a rerun replays the environment from disk);
3. E_D: ``embed.encoder_train.run`` into ``encoder/`` (trained once, then restored); with
   ``world.ed_descriptions`` it also trains on descriptions the environment LLM writes first;
4. environment data: ``env.build.build_env_data`` writes ``env/{descriptions,profiles,actions}.jsonl``
   (anchor plots, user profiles, K candidate actions per anchor, with provenance): the same
   pipeline as ``launch.build_env_data``; the paper's profile consistency check on them
   (``env.profile_check``: a ridge head from a profile to its user's vector, trained on the training
   users, scored on the held-out ones);
5. episodes: anchors and users drawn from ratings, train / held-out (user, anchor) pairs;
6. optionally every state of the depth-``env.prefetch_depth`` transition tree (``prefetch_tree``);
7. the world record, for inspection: ``world.json`` (anchors, action provenance, profiles, sizes)
   naming the pair arrays, written as ``world/<split>_pairs.npy`` ([P, 2] int32; at paper scale
   the 40M training pairs do not fit a JSON list); ``load_pairs`` reads them back.

Choices where the paper is silent (recorded in the configs):
* Anchors are drawn (seeded) from the most-rated movies; train and held-out anchors are disjoint, as
  are train and held-out users. Two held-out splits: ``new_users`` (held-out users on the training
  anchors: pairs never trained on) and ``new_anchors`` (held-out users on held-out anchors: transfer
  to movies, and candidate actions, never seen).
* A state is the anchor's plot (``env.states="plot"``) or, as in the paper, its description with
  reasons to like and dislike it (``"description"``; ``agent.env`` says how transitions keep the
  reasons). The K candidate actions of an episode are written once for its anchor and offered at
  every step; ``actions.per_state`` writes a new set for every state, as the paper does
  (``agent.action_book``: ``llm_calls`` more requests per visited state).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import io
import json
import os
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from absl import logging

from eagle_jax import assets, paths, training
from eagle_jax.agent import action_book
from eagle_jax.agent.env import ContentGapEnv
from eagle_jax.agent.features import DecoderPooler, TextFeatures
from eagle_jax.data import catalog, records
from eagle_jax.embed import encoder, encoder_train, wals_train
from eagle_jax.env import build, profile_check, stack
from eagle_jax.env.client import SamplingParams
from eagle_jax.models import loading
from eagle_jax.models.text_encoder import SentenceEncoder
from eagle_jax.models.tokenizer import Tokenizer

BACKBONES = ("minilm", "decoder")
STATES = ("plot", "description")


@dataclasses.dataclass
class Anchor:
  """An existing movie episodes start from.

  ``state``: the episode's first state (``config.env.states``): the anchor's plot, or its rendered
  description (plot and reasons, ``prompts.Description``).
  """

  item: int
  title: str
  state: str
  actions: list[str]
  action_sources: list[str]
  mean_rating: float = float("nan")  # its mean MovieLens rating (the evaluation's rating split)


@dataclasses.dataclass
class World:
  """Latent space, environment and episode population of one run.

  Attributes:
    env: the ``ContentGapEnv``.
    llm: the environment LLM's client stack (``env.stack.LLMStack``).
    features: memoised MiniLM features (E_D's inputs; the policy's too with backbone "minilm").
    policy_features: memoised text features the policy reads (``config.policy.backbone``).
    anchors: item index -> ``Anchor``.
    profiles: user index -> profile text.
    train_pairs: [P, 2] int (user index, anchor item index): train users x train anchors.
    heldout_pairs: dict split -> [P, 2]: ``new_users`` (held-out users x train anchors) and
      ``new_anchors`` (held-out users x held-out anchors); no held-out pair is seen in training.
    num_actions: K.
    actions: the candidate action sets of the states (per anchor, or per state).
  """

  env: ContentGapEnv
  llm: stack.LLMStack
  features: TextFeatures
  policy_features: TextFeatures
  anchors: dict[int, Anchor]
  profiles: dict[int, str]
  train_pairs: np.ndarray
  heldout_pairs: dict[str, np.ndarray]
  num_actions: int
  info: dict[str, Any]
  actions: action_book.ActionBook


def _fail(field: str, expected: str, value) -> None:
  raise training.ConfigError(f"config.{field}={value!r}: expected {expected}")


def check_config(config) -> None:
  """Validates the world's part of a run config (``world``, ``llm``, ``env``, the environment-data
  blocks, ``utility``, ``policy.backbone``); ConfigError naming the field."""
  w = config.world
  for name in ("num_train_anchors", "num_heldout_anchors", "num_train_users", "num_heldout_users",
               "anchor_pool", "min_user_ratings"):
    if int(w[name]) < 1:
      _fail(f"world.{name}", "an int >= 1", w[name])
  if int(w.get("ed_descriptions", 0)) < 0:
    _fail("world.ed_descriptions", "an int >= 0 (0: E_D on metadata text only)",
          w.ed_descriptions)
  if int(w.get("feature_memo", 0)) < 0:
    _fail("world.feature_memo", "an int >= 0 (0: unbounded)", w.feature_memo)
  for name in ("max_in_flight", "cache_memory"):
    if int(config.env.get(name, 0)) < 0:
      _fail(f"env.{name}", "an int >= 0 (0: unbounded)", config.env[name])
  if w.num_train_anchors + w.num_heldout_anchors > w.anchor_pool:
    _fail("world.anchor_pool", f">= num_train_anchors + num_heldout_anchors = "
          f"{w.num_train_anchors + w.num_heldout_anchors}", w.anchor_pool)
  if config.policy.backbone not in BACKBONES:
    _fail("policy.backbone", f"one of {BACKBONES}", config.policy.backbone)
  if float(config.utility.lam) < 0:
    _fail("utility.lam", "a number >= 0", config.utility.lam)
  if int(config.utility.k) < 1:
    _fail("utility.k", "an int >= 1", config.utility.k)
  if int(config.env.max_sentences) < 1:
    _fail("env.max_sentences", "an int >= 1", config.env.max_sentences)
  if config.env.get("states", "plot") not in STATES:
    _fail("env.states", f"one of {STATES}", config.env.get("states"))
  if int(config.env.prefetch_depth) < 0:
    _fail("env.prefetch_depth", "an int >= 0", config.env.prefetch_depth)
  try:
    stack.check_llm_config(config.llm)
    build.check_config(config)
    transition_params(config)
  except ValueError as e:
    raise training.ConfigError(str(e)) from None


def description_states(config) -> bool:
  """Whether states are rendered descriptions with reasons (``config.env.states``)."""
  return config.env.get("states", "plot") == "description"


def transition_params(config) -> SamplingParams:
  """Sampling of every transition (``config.env.sampling``), rendered with the chat template."""
  return SamplingParams.from_config(config.env.sampling, "config.env.sampling", chat=True)


def _select(config, ratings) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
  w = config.world
  rng = np.random.default_rng(int(w.seed))
  pool = catalog.most_rated_items(ratings, int(w.anchor_pool))
  pool = pool[rng.permutation(len(pool))]
  # Held-out anchors first: growing num_train_anchors keeps the held-out set (and its cache) fixed.
  held_items = np.sort(pool[: w.num_heldout_anchors])
  train_items = np.sort(pool[w.num_heldout_anchors: w.num_heldout_anchors + w.num_train_anchors])
  counts = np.bincount(ratings.user, minlength=ratings.num_users)
  eligible = np.flatnonzero(counts >= int(w.min_user_ratings))
  need = w.num_train_users + w.num_heldout_users
  if len(eligible) < need:
    raise training.ConfigError(
        f"config.world: {need} users requested but only {len(eligible)} have >= "
        f"min_user_ratings={w.min_user_ratings} ratings")
  eligible = eligible[rng.permutation(len(eligible))]
  train_users = np.sort(eligible[: w.num_train_users])
  held_users = np.sort(eligible[w.num_train_users: need])
  return train_items, held_items, train_users, held_users


def _pairs(users: np.ndarray, items: np.ndarray) -> np.ndarray:
  return np.stack(np.meshgrid(users, items, indexing="ij"), -1).reshape(-1, 2).astype(np.int32)


@contextlib.contextmanager
def answer_progress(llm: stack.LLMStack, desc: str, total: int):
  """A progress bar (with ETA) over the LLM answers of one phase."""
  bar = training.Progress(total, desc=desc)
  llm.client.on_answer = bar.update
  try:
    yield bar
  finally:
    llm.client.on_answer = None
    bar.close()


def open_llm(config, workdir: str) -> stack.LLMStack:
  """The environment LLM of a run, behind ``<workdir>/env/cache.jsonl`` (one cache file per
  process on multi-host pods, each seeded from the shared one)."""
  paths.makedirs(os.path.join(workdir, "env"))
  path = stack.process_cache_path(os.path.join(workdir, "env", "cache.jsonl"),
                                  jax.process_index(), jax.process_count())
  return stack.open_llm(config.llm, path, cache_memory=int(config.env.get("cache_memory", 0)))


def cache_stats(world: World) -> dict[str, int]:
  """Response-cache hits and misses of the world's environment LLM."""
  return world.llm.counters()


def _latent(config, workdir: str, ratings):
  emb_path = os.path.join(workdir, "wals", "embeddings.npz")
  if not paths.exists(emb_path):
    logging.info("world: training WALS into %s", os.path.dirname(emb_path))
    wals_train.run(config.wals, os.path.dirname(emb_path))
  latent = wals_train.load_npz(emb_path, item_ids=ratings.item_ids, user_ids=ratings.user_ids)
  return emb_path, latent["user_augmented"], latent["item_augmented"]


def _ed_descriptions(config, workdir: str, llm: stack.LLMStack, ratings,
                     anchors: np.ndarray) -> str:
  """E_D's description rows (``config.world.ed_descriptions`` = N > 0): the anchors and N more
  movies drawn (seeded) from the rest of the catalogue, described by the environment LLM into
  ``env/descriptions.jsonl`` before E_D is trained (the anchors' records are then reused by phase 4).
  About ``encoder.heldout_fraction`` of the N fall among E_D's held-out movies: its R^2 on held-out
  descriptions. Returns the file ("" when N = 0: E_D on metadata text only)."""
  n = int(config.world.get("ed_descriptions", 0))
  if n == 0:
    return ""
  rest = np.setdiff1d(np.arange(ratings.num_items), anchors)
  extra = np.random.default_rng(records.derive_seed(int(config.world.seed), "ed_descriptions")
                                ).permutation(rest)[:n]
  movies = catalog.movies_from_ratings(ratings, np.concatenate([anchors, np.sort(extra)]))
  path = os.path.join(workdir, "env", "descriptions.jsonl")
  total = len(movies) * (1 + 2 * int(config.descriptions.n_reasons))
  with answer_progress(llm, "world: E_D descriptions", total):
    asyncio.run(build.describe_movies(llm.client, movies, config.descriptions, path))
  return path


def _encoder(config, workdir: str, emb_path: str, features: TextFeatures, descriptions: str = ""):
  enc_dir = os.path.join(workdir, "encoder")
  if not paths.exists(os.path.join(enc_dir, "report.json")):
    logging.info("world: training E_D into %s", enc_dir)
    enc_cfg = config.encoder.copy_and_resolve_references()
    with enc_cfg.unlocked():
      enc_cfg.embeddings = emb_path
      enc_cfg.wals = config.wals
      if descriptions:  # rows as E_D will read the states
        enc_cfg.descriptions = descriptions
        enc_cfg.description_rows = "text" if description_states(config) else "plot"
    encoder_train.run(enc_cfg, enc_dir, encode=features)
  ed, meta = encoder_train.load_encoder(os.path.join(enc_dir, "checkpoints"),
                                        frozen_encode=features, minilm=config.encoder.minilm)
  try:
    report = json.loads(paths.read_text(os.path.join(enc_dir, "report.json")))
    desc = report["metrics"]["description"]["head"]
    meta = {**meta, "heldout_r2": float(report["metrics"]["heldout_r2"]),
            "description_r2": desc["r2"], "description_rows": desc["rows"]}
  except (OSError, KeyError, ValueError):
    meta = {**meta, "heldout_r2": None}
  return ed, meta


def ed_on_states(world: World, z_items: np.ndarray, nexts: Sequence[Sequence[str]]
                 ) -> dict[str, Any]:
  """How E_D reads the anchors' states and their generated next states (``nexts``: each anchor's
  K, in sorted anchor order, from ``prefetch_tree``): pooled R^2 (``encoder.r2_score``) of
  E_D(anchor state) against the anchors' vectors, of E_D(next state) against its anchor's vector
  (how much of the movie E_D still reads after one edit), and the mean l2 move of E_D from a
  state to its next states."""
  items = np.asarray(sorted(world.anchors))
  states = [world.anchors[int(i)].state for i in items]
  z0 = world.env.embed(states)
  z1 = world.env.embed([t for ts in nexts for t in ts])
  reps = np.repeat(np.arange(len(items)), [len(ts) for ts in nexts])
  r2 = encoder.r2_score if len(items) > 1 else (lambda y, p: None)  # one anchor: no variance
  return {"anchors": int(len(items)), "next_states": int(len(z1)),
          "r2_anchor_states": r2(z_items[items], z0),
          "r2_next_states": r2(z_items[items][reps], z1),
          "mean_move_l2": float(np.mean(np.linalg.norm(z1 - z0[reps], axis=1)))}


def _env_data(config, workdir: str, llm: stack.LLMStack, encode,
              movies: Sequence[catalog.Movie], users: Sequence[catalog.User]) -> build.EnvData:
  """Phase 4: the environment-data pipeline, with one progress bar per stage."""
  with contextlib.ExitStack() as bars:

    def on_stage(name: str, n_requests: int) -> None:
      bars.close()
      if n_requests:
        bars.enter_context(answer_progress(llm, f"world: {name}", n_requests))

    return asyncio.run(build.build_env_data(config, llm.client, encode, movies, users,
                                            os.path.join(workdir, "env"), on_stage=on_stage,
                                            stats=llm.counters))


def _anchors(config, data: build.EnvData, ratings) -> dict[int, Anchor]:
  n_items = ratings.num_items
  means = (np.bincount(ratings.item, weights=ratings.rating, minlength=n_items)
           / np.maximum(np.bincount(ratings.item, minlength=n_items), 1))
  sets = {s["movie_id"]: s for s in data.action_sets}
  out = {}
  for d in data.descriptions:
    s = sets.get(d["movie_id"], {"movie_id": d["movie_id"], "actions": []})
    texts, sources = action_book.space(config.actions, s, repr(d["title"]))
    state = d["text"] if description_states(config) else d["plot"]
    out[d["item_index"]] = Anchor(d["item_index"], d["title"], state, texts, sources,
                                  float(means[d["item_index"]]))
  return out


def _policy_features(config, llm: stack.LLMStack, features: TextFeatures) -> TextFeatures:
  """The policy's text features: MiniLM (shared with E_D) or the decoder's pooled hidden states."""
  if config.policy.backbone == "minilm":
    out = features
  else:
    if llm.local is not None:
      pooler = DecoderPooler(llm.local.sampler.model, llm.local.tokenizer)
    else:  # remote environment: load the decoder locally
      path = assets.resolve_gguf(config.llm.gguf)
      _, model = loading.load_llama_gguf(path)
      pooler = DecoderPooler(model, Tokenizer.from_gguf(path))
    out = TextFeatures(pooler, pooler.dim, max_entries=int(config.world.get("feature_memo", 0)))
  if out.dim != int(config.policy.text_dim):
    raise training.ConfigError(
        f"config.policy.text_dim={config.policy.text_dim} but the {config.policy.backbone} "
        f"features have {out.dim} dimensions")
  return out


def build_world(config, workdir: str, *, llm: stack.LLMStack | None = None,
                encoder=None) -> World:
  """Builds (or restores) the world of a run in ``workdir`` (see module docstring).

  Args:
    config: the run config (``configs/movielens_smoke.py``).
    workdir: run folder.
    llm: optional environment LLM stack (default: ``open_llm(config, workdir)``).
    encoder: optional ``SentenceEncoder``-like object with ``encode`` and ``dim`` (default MiniLM).
  """
  check_config(config)
  ratings = wals_train.load_data(config.wals.data)
  emb_path, z_users, z_items = _latent(config, workdir, ratings)
  if encoder is None:
    encoder = SentenceEncoder.from_pretrained(config.encoder.minilm or None)
  memo = int(config.world.get("feature_memo", 0))
  features = TextFeatures(encoder.encode, encoder.dim, max_entries=memo)
  llm = llm or open_llm(config, workdir)
  train_items, held_items, train_users, held_users = _select(config, ratings)
  ed_rows = _ed_descriptions(config, workdir, llm, ratings, np.concatenate([train_items,
                                                                            held_items]))
  ed, ed_meta = _encoder(config, workdir, emb_path, features, ed_rows)
  movies = catalog.movies_from_ratings(ratings, np.concatenate([train_items, held_items]))
  users = catalog.users_from_ratings(ratings, np.concatenate([train_users, held_users]),
                                     n_titles=int(config.profiles.titles))
  data = _env_data(config, workdir, llm, features, movies, users)
  profiles = {p["user_index"]: p["profile"] for p in data.profiles}
  anchors = _anchors(config, data, ratings)
  consistency = profile_check.check(features, profiles, z_users, train_users, held_users)
  logging.info("world: profile check %s", consistency)
  env = ContentGapEnv(llm.client, transition_params(config), ed, z_items, z_users,
                      lam=float(config.utility.lam), k=int(config.utility.k),
                      max_sentences=int(config.env.max_sentences),
                      reasons=description_states(config),
                      max_in_flight=int(config.env.get("max_in_flight", 0)), memo_size=memo)
  sets_path = action_book.state_sets_path(workdir, jax.process_index(), jax.process_count())
  world = World(
      env=env, llm=llm, features=features,
      policy_features=_policy_features(config, llm, features),
      anchors=anchors,
      profiles=profiles,
      train_pairs=_pairs(train_users, train_items),
      heldout_pairs={"new_users": _pairs(held_users, train_items),
                     "new_anchors": _pairs(held_users, held_items)},
      num_actions=int(config.actions.k),
      info={"encoder_heldout_r2": ed_meta["heldout_r2"],
            "encoder_description_r2": ed_meta.get("description_r2"),
            "encoder_description_rows": ed_meta.get("description_rows"),
            "latent_dim": int(z_items.shape[1]),
            "ed_target": ed_meta.get("target"), "ed_kind": ed_meta.get("kind", "head"),
            "env_model": llm.model_name, "env_data": data.report,
            "profile_check": consistency},
      actions=action_book.from_config(config.actions, anchors, llm.client, features, data,
                                      sets_path))
  if int(config.env.prefetch_depth) > 0:
    n, children = asyncio.run(prefetch_tree(world, sorted(world.anchors),
                                            int(config.env.prefetch_depth)))
    logging.info("world: %d states prefetched to depth %d", n, config.env.prefetch_depth)
    local = llm.local
    if local is not None and local.batcher is not None:  # how much prefix sharing found
      logging.info("world: continuous batching %s", local.batcher.stats())
    world.info["prefetched_states"] = n
    world.info["ed_on_states"] = ed_on_states(world, z_items, children)
    logging.info("world: E_D on states %s", world.info["ed_on_states"])
  world.info["action_sets"] = {
      **world.actions.stats(),
      "state_sets_file": "env/" + os.path.basename(sets_path) if world.actions.per_state else None}
  if jax.process_index() == 0:  # every process of a multi-process run restores the same world
    write_world(world, workdir, ratings, data)
  return world


async def expand(world: World, texts: Sequence[str], items: np.ndarray) -> list[list[str]]:
  """All K next descriptions of each state: [N] texts, [N] anchor items -> N lists of K texts.

  One ``env.step`` call of N * K requests (at most ``env.max_in_flight`` outstanding), after the
  action sets of states met for the first time are written (per-state actions)."""
  descs, acts = [], []
  for x, set_id in zip(texts, await world.actions.ids(texts, items)):
    for a in world.actions.texts(set_id):
      descs.append(x)
      acts.append(a)
  nxt = await world.env.step(descs, acts)
  k = world.num_actions
  return [nxt[j * k:(j + 1) * k] for j in range(len(texts))]


async def prefetch_tree(world: World, items: Sequence[int], depth: int
                        ) -> tuple[int, list[list[str]]]:
  """Computes every state reachable from the anchors ``items`` in ``depth`` steps (and their E_D
  embeddings and policy features), level by level with all of a level's transitions in flight at
  once; returns the number of distinct states and each anchor's K next states (depth 1; [] when
  ``depth`` is 0). Small trees only (K + K^2 + ... per anchor): the
  smoke config uses it so that training steps replay the environment from the cache instead of
  waiting on stragglers.
  """
  level = [(world.anchors[int(i)].state, int(i)) for i in items]
  seen, first = set(level), []
  for d in range(depth):
    if new := world.actions.missing([x for x, _ in level]):  # per-state sets, their own bar
      with answer_progress(world.llm, f"world: action sets at depth {d}",
                           new * world.actions.requests_per_set):
        await world.actions.ids([x for x, _ in level], [i for _, i in level])
    with answer_progress(world.llm, f"world: transitions at depth {d + 1}",
                         len(level) * world.num_actions):
      children = await expand(world, [x for x, _ in level], np.asarray([i for _, i in level]))
    first = first or children
    level = [(c, i) for (_, i), row in zip(level, children) for c in row if (c, i) not in seen]
    level = list(dict.fromkeys(level))
    seen.update(level)
  # E_D and the policy's features of every state in one call each: a text's row then does not
  # depend on which texts a later batch happens to group it with (resumed runs equal uninterrupted).
  states = sorted({x for x, _ in seen})
  world.env.embed(states)
  world.policy_features(states)
  return len(seen), first


PAIRS_DIR = "world"


def _save_pairs(path: str, pairs: np.ndarray) -> None:
  buf = io.BytesIO()
  np.save(buf, np.asarray(pairs, np.int32), allow_pickle=False)
  paths.write_bytes(path, buf.getvalue())


def write_world(world: World, workdir: str, ratings, data: build.EnvData) -> None:
  """``<workdir>/world.json`` (metadata) and ``<workdir>/world/<split>_pairs.npy`` (the pairs)."""
  paths.makedirs(os.path.join(workdir, PAIRS_DIR))
  splits = {"train": world.train_pairs, **world.heldout_pairs}
  files = {}
  for split, pairs in splits.items():
    files[split] = f"{PAIRS_DIR}/{split}_pairs.npy"
    _save_pairs(os.path.join(workdir, files[split]), pairs)
  sets = {s["movie_id"]: s for s in data.action_sets}
  anchors = {}
  user_index = {p["user_id"]: p["user_index"] for p in data.profiles}
  for d in data.descriptions:
    s = sets[d["movie_id"]]
    personal = sum(bool(a["personalised"]) for a in s["actions"])
    anchors[str(d["item_index"])] = {
        **dataclasses.asdict(world.anchors[d["item_index"]]), "movie_id": d["movie_id"],
        "description_source": d["source"], "plot": d["plot"], "likes": d["likes"],
        "dislikes": d["dislikes"], "personalised_to_user": s["user_id"],
        "personalised_to_user_index": user_index.get(s["user_id"]),
        "personalised_actions": personal, "personalised_share": personal / len(s["actions"]),
        "actions_detail": s["actions"]}
  record = {
      "anchors": anchors,
      "profiles": {str(u): p for u, p in world.profiles.items()},
      "profile_source": {str(p["user_index"]): p["source"] for p in data.profiles},
      "user_ids": {str(u): int(ratings.user_ids[u]) for u in world.profiles},
      "pair_files": files,
      "pair_counts": {k: len(v) for k, v in splits.items()},
      "num_actions": world.num_actions, **world.info}
  paths.write_text(os.path.join(workdir, "world.json"), json.dumps(record, indent=1))


def load_pairs(workdir: str) -> dict[str, np.ndarray]:
  """The pairs ``write_world`` recorded: split ("train", "new_users", "new_anchors") -> [P, 2]
  int32.

  Raises:
    ValueError: naming the file when a pair array is missing or not [P, 2] integers.
  """
  record = json.loads(paths.read_text(os.path.join(workdir, "world.json")))
  out = {}
  for split, name in record["pair_files"].items():
    path = os.path.join(workdir, name)
    try:
      with paths.open_file(path, "rb") as f:
        pairs = np.load(f, allow_pickle=False)
    except (OSError, ValueError) as e:
      raise ValueError(f"{path}: cannot read the {split} pairs ({e})") from None
    if pairs.ndim != 2 or pairs.shape[1] != 2 or pairs.dtype.kind not in "iu" or (
        len(pairs) != record["pair_counts"][split]):
      raise ValueError(f"{path}: expected [{record['pair_counts'][split]}, 2] integers, got "
                       f"{pairs.shape} {pairs.dtype}")
    out[split] = pairs
  return out
