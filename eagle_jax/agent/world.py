"""Everything an EAGLE run needs besides the agent: latent space, E_D, environment, anchors, users.

``build_world(config, workdir)`` is idempotent and resumable; each piece lives in its own subfolder:

* ``wals/``: behavioural embeddings (``launch.wals`` job; orbax checkpoints, ``embeddings.npz``).
  Z is the augmented space of ``WALSFactors.augmented``: <z_u, z_i> is the WALS prediction. With
  the smoke config's implicit-feedback WALS that is the rating where one was given and ~0 elsewhere,
  so it scores preference and exposure together, as the paper's Hu-Koren-Volinsky factors do.
* ``encoder/``: E_D, MiniLM (fine-tuned, or frozen + MLP head) regressed onto the augmented item vectors
  (``launch.train_encoder`` job; trained once, then restored).
* ``env/cache.jsonl``: the environment LLM's response cache. Anchor plots, LLM-written actions and
  every transition go through it, so a rerun replays the environment from disk.
* ``world.json``: the anchors (plot, K candidate actions with provenance), the users (template
  profile) and the train / held-out (user, anchor) pairs, for inspection.

Choices where the paper is silent (recorded in the configs):
* Anchors are drawn (seeded) from the most-rated movies; train and held-out anchors are disjoint, as
  are train and held-out users. Two held-out splits: ``new_users`` (held-out users on the training
  anchors: pairs never trained on) and ``new_anchors`` (held-out users on held-out anchors: transfer
  to movies, and candidate actions, never seen).
* The K candidate actions of an episode are written once for its anchor (LLM requests over the five
  categories, topped up from genre/tag templates, near-duplicates removed) and offered at every step:
  the paper writes new actions per state, which would cost K LLM calls per visited state here.
* User profiles are written from ratings by a template ("Loved: ...; disliked: ..."), not by the LLM.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import shutil
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from absl import logging

from eagle_jax import training
from eagle_jax.agent.env import ContentGapEnv
from eagle_jax.agent.features import TextFeatures
from eagle_jax.embed import encoder_train, wals_train
from eagle_jax.env import actions as actions_lib
from eagle_jax.env import build, prompts
from eagle_jax.env import cache as cache_lib
from eagle_jax.env import client as client_lib


@dataclasses.dataclass
class Anchor:
  """An existing movie episodes start from."""

  item: int
  title: str
  plot: str
  actions: list[str]
  action_sources: list[str]


@dataclasses.dataclass
class World:
  """Latent space, environment and episode population of one run.

  Attributes:
    env: the ``ContentGapEnv``.
    features: memoised MiniLM features (E_D's inputs; the policy's too with backbone "minilm").
    policy_features: memoised text features the policy reads (``config.policy.backbone``).
    anchors: item index -> ``Anchor``.
    profiles: user index -> profile text.
    train_pairs: [P, 2] int (user index, anchor item index): train users x train anchors.
    heldout_pairs: dict split -> [P, 2]: ``new_users`` (held-out users x train anchors) and
      ``new_anchors`` (held-out users x held-out anchors); no held-out pair is seen in training.
    num_actions: K.
  """

  env: ContentGapEnv
  features: TextFeatures
  policy_features: TextFeatures
  anchors: dict[int, Anchor]
  profiles: dict[int, str]
  train_pairs: np.ndarray
  heldout_pairs: dict[str, np.ndarray]
  num_actions: int
  info: dict[str, Any]


def _policy_features(config, client, features: TextFeatures) -> TextFeatures:
  """The policy's text features: MiniLM (shared with E_D) or the decoder's pooled hidden states."""
  backbone = config.policy.backbone  # "minilm" or "decoder" (_check_config)
  if backbone == "minilm":
    out = features
  else:
    from eagle_jax.agent.features import DecoderPooler  # noqa: PLC0415
    from eagle_jax.env.local import LocalSampler  # noqa: PLC0415

    inner = client
    while inner is not None and not isinstance(inner, LocalSampler):
      inner = getattr(inner, "inner", None)
    if inner is None:  # remote environment: load the decoder locally
      from eagle_jax import assets  # noqa: PLC0415
      from eagle_jax.models import loading  # noqa: PLC0415
      from eagle_jax.models.tokenizer import Tokenizer  # noqa: PLC0415

      path = config.llm.gguf or assets.smollm2_gguf()
      _, model = loading.load_llama_gguf(path)
      pooler = DecoderPooler(model, Tokenizer.from_gguf(path))
    else:
      pooler = DecoderPooler(inner.sampler.model, inner.tokenizer)
    out = TextFeatures(pooler, pooler.dim)
  if out.dim != int(config.policy.text_dim):
    raise training.ConfigError(
        f"config.policy.text_dim={config.policy.text_dim} but the {backbone} features have "
        f"{out.dim} dimensions")
  return out


def _check_config(config) -> None:
  w = config.world
  for name in ("num_train_anchors", "num_heldout_anchors", "num_train_users", "num_heldout_users"):
    if int(w[name]) < 1:
      raise training.ConfigError(f"config.world.{name}={w[name]} must be >= 1")
  if w.num_train_anchors + w.num_heldout_anchors > w.anchor_pool:
    raise training.ConfigError(
        f"config.world.anchor_pool={w.anchor_pool} is smaller than num_train_anchors + "
        f"num_heldout_anchors = {w.num_train_anchors + w.num_heldout_anchors}")
  if config.policy.backbone not in ("minilm", "decoder"):
    raise training.ConfigError(
        f"config.policy.backbone={config.policy.backbone!r}: expected 'minilm' or 'decoder'")
  if int(config.actions.k) < 2:
    raise training.ConfigError(f"config.actions.k={config.actions.k} must be >= 2")
  if float(config.utility.lam) < 0:
    raise training.ConfigError(f"config.utility.lam={config.utility.lam} must be >= 0")


def profile_text(user: build.User) -> str:
  """The template profile of a user (liked and disliked titles)."""
  text = "Loved: " + "; ".join(user.liked)
  if user.disliked:
    text += ". Disliked: " + "; ".join(user.disliked)
  return text + "."


def _select(config, ratings) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
  w = config.world
  rng = np.random.default_rng(int(w.seed))
  pool = build.most_rated_items(ratings, int(w.anchor_pool))
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


def make_client(config, workdir: str):
  """The environment LLM (local SmolLM2 sampler, or an OpenAI-compatible server) behind the cache."""
  os.makedirs(os.path.join(workdir, "env"), exist_ok=True)
  # One cache file per process on multi-host pods (no concurrent appends to one file).
  # Each starts from the shared cache written by --prepare_only.
  path = os.path.join(workdir, "env", "cache.jsonl")
  if jax.process_count() > 1:
    own = os.path.join(workdir, "env", f"cache.{jax.process_index()}.jsonl")
    if not os.path.exists(own) and os.path.exists(path):
      shutil.copyfile(path, own + ".tmp")
      os.replace(own + ".tmp", own)
    path = own
  cache = cache_lib.ResponseCache(path)
  if config.llm.server_url:
    from eagle_jax.env.openai import OpenAIClient  # noqa: PLC0415

    inner = OpenAIClient(config.llm.server_url, model=config.llm.model_id)
  else:
    from eagle_jax.env.local import LocalSampler  # noqa: PLC0415

    inner = LocalSampler.from_gguf(config.llm.gguf or None, model_id=config.llm.model_id,
                                   batch_buckets=tuple(config.llm.batch_buckets), chat=True)
  # Batching outside the cache: concurrent one-prompt calls (action requests) become one decode.
  return build.BatchingClient(cache_lib.CachedClient(inner, cache, model_id=config.llm.model_id))


def cache_stats(client) -> dict[str, int]:
  """Hits and misses of the first ``CachedClient`` in a chain of wrapping clients ({} if none)."""
  while client is not None:
    if isinstance(client, cache_lib.CachedClient):
      return {"cache_hits": client.hits, "cache_misses": client.misses}
    client = getattr(client, "inner", None)
  return {}


def transition_params(config) -> client_lib.SamplingParams:
  e = config.env
  return client_lib.SamplingParams(
      max_tokens=int(e.transition_tokens), temperature=float(e.temperature),
      repetition_penalty=float(e.repetition_penalty), no_repeat_ngram=int(e.no_repeat_ngram),
      seed=int(e.seed), chat=True)


async def _anchor_plots(client, movies: Sequence[build.Movie], config) -> list[str]:
  params = transition_params(config).replace(max_tokens=int(config.env.plot_tokens))
  answers = await client.generate(
      [prompts.plot_prompt(m.title, m.genres, m.tags) for m in movies], [params] * len(movies))
  out = []
  for m, c in zip(movies, answers):
    try:
      out.append(prompts.clean_paragraph(c.text, max_sentences=int(config.env.max_sentences)))
    except prompts.ParseError:  # fall back to the metadata: still a valid state
      out.append(f"{m.title}, a {'/'.join(m.genres).lower() or 'feature'} film.")
  return out


async def _action_sets(client, movies, plots, config, encode) -> list[list[actions_lib.Action]]:
  a = config.actions
  sets = await asyncio.gather(*[
      actions_lib.build_action_set(
          client=client, encode=encode, description=f"Plot: {p}", genres=m.genres, tags=m.tags,
          profile=None, k=int(a.k), llm_calls=int(a.llm_calls),
          seed=build.derive_seed(int(a.seed), "actions", m.movie_id),
          max_tokens=int(a.max_tokens), temperature=float(a.temperature),
          dedupe_threshold=float(a.dedupe_threshold))
      for m, p in zip(movies, plots)])
  out = []
  for m, (acts, _) in zip(movies, sets):
    if len(acts) != int(a.k):
      raise training.ConfigError(
          f"config.actions.k={a.k}: only {len(acts)} distinct actions for {m.title!r}; lower k "
          "or raise actions.llm_calls")
    out.append(acts)
  return out


def build_world(config, workdir: str, *, client=None, encoder=None) -> World:
  """Builds (or restores) the world of a run in ``workdir`` (see module docstring).

  Args:
    config: the run config (``configs/movielens_smoke.py``).
    workdir: run folder.
    client: optional environment ``SamplingBackend`` (default: ``make_client``).
    encoder: optional ``SentenceEncoder``-like object with ``encode`` and ``dim`` (default MiniLM).
  """
  _check_config(config)
  ratings = wals_train.load_data(config.wals.data)
  wals_dir = os.path.join(workdir, "wals")
  emb_path = os.path.join(wals_dir, "embeddings.npz")
  if not os.path.exists(emb_path):
    logging.info("world: training WALS into %s", wals_dir)
    wals_train.run(config.wals, wals_dir)
  if encoder is None:
    from eagle_jax.models.text_encoder import SentenceEncoder  # noqa: PLC0415

    encoder = SentenceEncoder.from_pretrained(config.encoder.minilm or None)
  features = TextFeatures(encoder.encode, encoder.dim)
  enc_dir = os.path.join(workdir, "encoder")
  if not os.path.exists(os.path.join(enc_dir, "report.json")):
    logging.info("world: training E_D into %s", enc_dir)
    enc_cfg = config.encoder.copy_and_resolve_references()
    with enc_cfg.unlocked():
      enc_cfg.embeddings = emb_path
      enc_cfg.wals = config.wals
    encoder_train.run(enc_cfg, enc_dir, encode=features)
  ed, ed_meta = encoder_train.load_encoder(os.path.join(enc_dir, "checkpoints"),
                                           frozen_encode=features, minilm=config.encoder.minilm)
  latent = wals_train.load_npz(emb_path, item_ids=ratings.item_ids, user_ids=ratings.user_ids)
  z_users, z_items = latent["user_augmented"], latent["item_augmented"]

  train_items, held_items, train_users, held_users = _select(config, ratings)
  if client is None:
    client = make_client(config, workdir)
  env = ContentGapEnv(client, transition_params(config), ed, z_items, z_users,
                      lam=float(config.utility.lam), k=int(config.utility.k),
                      max_sentences=int(config.env.max_sentences))
  items = np.concatenate([train_items, held_items])
  movies = build.movies_from_ratings(ratings, items)
  logging.info("world: anchor plots and action sets for %d movies", len(movies))
  plots = asyncio.run(_anchor_plots(client, movies, config))
  sets = asyncio.run(_action_sets(client, movies, plots, config, features))
  anchors = {m.item_index: Anchor(m.item_index, m.title, p, [a.text for a in acts],
                                  [f"{a.source}:{a.category}" for a in acts])
             for m, p, acts in zip(movies, plots, sets)}
  users = build.users_from_ratings(ratings, np.concatenate([train_users, held_users]),
                                   n_titles=int(config.world.profile_titles))
  profiles = {u.user_index: profile_text(u) for u in users}
  policy_features = _policy_features(config, client, features)
  world = World(env=env, features=features, policy_features=policy_features, anchors=anchors,
                profiles=profiles,
                train_pairs=_pairs(train_users, train_items),
                heldout_pairs={"new_users": _pairs(held_users, train_items),
                               "new_anchors": _pairs(held_users, held_items)},
                num_actions=int(config.actions.k),
                info={"encoder_heldout_r2": _ed_r2(enc_dir), "latent_dim": int(z_items.shape[1]),
                      "ed_target": ed_meta.get("target"), "ed_kind": ed_meta.get("kind", "head")})
  if int(config.env.prefetch_depth) > 0:
    n = asyncio.run(prefetch_tree(world, sorted(anchors), int(config.env.prefetch_depth)))
    logging.info("world: %d states prefetched to depth %d", n, config.env.prefetch_depth)
    world.info["prefetched_states"] = n
  _write_world(world, os.path.join(workdir, "world.json"), ratings)
  return world


async def expand(world: World, texts: Sequence[str], items: np.ndarray) -> list[list[str]]:
  """All K next descriptions of each state: [N] texts, [N] anchor items -> N lists of K texts.

  One ``env.step`` call with all N * K requests in flight."""
  descs, acts = [], []
  for x, i in zip(texts, items):
    for a in world.anchors[int(i)].actions:
      descs.append(x)
      acts.append(a)
  nxt = await world.env.step(descs, acts)
  k = world.num_actions
  return [nxt[j * k:(j + 1) * k] for j in range(len(texts))]


async def prefetch_tree(world: World, items: Sequence[int], depth: int) -> int:
  """Computes every state reachable from the anchors ``items`` in ``depth`` steps (and their E_D
  embeddings and policy features), level by level with all of a level's transitions in flight at
  once; returns the number of distinct states. Small trees only (K + K^2 + ... per anchor): the
  smoke config uses it so that training steps replay the environment from the cache instead of
  waiting on stragglers.
  """
  level = [(world.anchors[int(i)].plot, int(i)) for i in items]
  seen = set(level)
  for _ in range(depth):
    children = await expand(world, [x for x, _ in level], np.asarray([i for _, i in level]))
    level = [(c, i) for (_, i), row in zip(level, children) for c in row if (c, i) not in seen]
    level = list(dict.fromkeys(level))
    seen.update(level)
  # E_D and the policy's features of every state in one call each: a text's row then does not
  # depend on which texts a later batch happens to group it with (resumed runs equal uninterrupted).
  states = sorted({x for x, _ in seen})
  world.env.embed(states)
  world.policy_features(states)
  return len(seen)


def _ed_r2(enc_dir: str) -> float | None:
  try:
    with open(os.path.join(enc_dir, "report.json")) as f:
      return float(json.load(f)["metrics"]["heldout_r2"])
  except (OSError, KeyError, ValueError):
    return None


def _write_world(world: World, path: str, ratings) -> None:
  record = {
      "anchors": {str(i): dataclasses.asdict(a) for i, a in world.anchors.items()},
      "profiles": {str(u): p for u, p in world.profiles.items()},
      "user_ids": {str(u): int(ratings.user_ids[u]) for u in world.profiles},
      "train_pairs": world.train_pairs.tolist(),
      "heldout_pairs": {k: v.tolist() for k, v in world.heldout_pairs.items()},
      "num_actions": world.num_actions, **world.info}
  with open(path + ".tmp", "w") as f:
    json.dump(record, f, indent=1)
  os.replace(path + ".tmp", path)
