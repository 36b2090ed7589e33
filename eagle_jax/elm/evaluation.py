"""The ELM consistency report on held-out movies and users (``job.run`` writes it).

Semantic consistency (``metrics.semantic_consistency``) of summaries of held-out movies decoded by
the trained ELM, by the same decoder prompted with the title alone (no embedding), and by the ELM
from random embeddings (a Gaussian fitted to the item table; SC measured against the held-out
movie, i.e. the chance level, and against the random point itself). For the ELM and the title-only
texts also the *mismatched* SC (each text against the other held-out movies,
``metrics.cross_consistency``) and the rank of a text's own movie among the held-out ones, which
separate embedding-specific content from text that merely resembles popular movies in general.
SC of decoded interpolations ``0.5 (z_a + z_b)`` of held-out pairs; SC of the environment LLM's own
summaries written from title and genres (a reference); behavioural consistency of decoded profiles
of held-out users, with a mismatched-user control and the environment LLM's profiles as references.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from eagle_jax.elm import metrics as metrics_lib
from eagle_jax.elm import tasks as tasks_lib
from eagle_jax.elm.model import ELM


def evaluate(eval_config, elm: ELM, *, encode, ed, ratings, item_z, user_z, split
             ) -> dict[str, Any]:
  """The SC / BC report (see the module docstring).

  Args:
    eval_config: ``config.eval``.
    elm: the trained ELM.
    encode: N texts -> [N, 384] float32 frozen MiniLM embeddings (behavioural consistency).
    ed: E_D, N texts -> [N, d] float32 points of Z (semantic consistency).
    ratings: ``RatingsData`` (titles, genres, rating counts).
    item_z, user_z: [I, d] and [U, d] float32 raw augmented WALS vectors.
    split: ``data.prepare``'s split (held-out movies and users, reference examples).

  Returns:
    The JSON-serialisable report.
  """
  from eagle_jax.embed import encoder_train  # noqa: PLC0415

  ec = eval_config
  dec = dict(max_new_tokens=ec.max_new_tokens, repetition_penalty=ec.repetition_penalty,
             no_repeat_ngram=ec.no_repeat_ngram)
  test_m = np.asarray(split["test_movies"])
  train_m = np.asarray(split["train_movies"])[:ec.train_movies]
  rng = np.random.default_rng(ec.seed)
  texts: dict[str, list[str]] = {}
  timings: dict[str, float] = {}

  def timed(name, fn):
    t0 = time.perf_counter()
    texts[name] = fn()
    timings[name] = time.perf_counter() - t0
    return texts[name]

  def sc(ts, target, target_item, cross: bool = False):
    e = ed(ts)
    m = metrics_lib.semantic_consistency(e, target, item_z, target_item)
    out = {"cos": metrics_lib.summary(m["cos"]), "rank": metrics_lib.summary(m["rank"]),
           "rank_median": float(np.median(m["rank"])),
           "top10": float(np.mean(m["rank"] <= 10)), "per_item_rank": m["rank"].tolist()}
    if cross and len(ts) >= 2:
      c = metrics_lib.cross_consistency(e, target, item_z)
      out["mismatched_cos"] = c["mismatched"]
      out["own_rank_among_set"] = metrics_lib.summary(c["own_rank"])
      out["own_rank_chance"] = (len(ts) + 1) / 2
    return out

  report: dict[str, Any] = {"num_items": int(item_z.shape[0]),
                            "chance_rank": (item_z.shape[0] + 1) / 2}
  z_test = item_z[test_m]
  movies: dict[str, Any] = {}
  elm_t = timed("elm_heldout", lambda: elm.generate("summary", z_test, **dec))
  movies["elm"] = sc(elm_t, z_test, test_m, cross=True)
  titles = [[str(ratings.titles[i])] for i in test_m]
  title_t = timed("title_only_heldout", lambda: elm.generate_text("summary", titles, **dec))
  movies["title_only"] = sc(title_t, z_test, test_m, cross=True)
  if ec.random_embeddings:
    mean = item_z.mean(0)
    cov = np.cov(item_z.T)
    z_rand = rng.multivariate_normal(mean, cov, size=ec.random_embeddings, method="eigh").astype(
        np.float32)
    rand_t = timed("random_embedding", lambda: elm.generate("summary", z_rand, **dec))
    # Chance: a text decoded from an unrelated point, scored against each held-out movie.
    reps = [rand_t[i % len(rand_t)] for i in range(len(test_m))]
    movies["random_embedding_control"] = sc(reps, z_test, test_m)
    movies["random_embedding_self"] = sc(rand_t, z_rand, None)
  refs = {e.slots[0]: e.target for e in split["reference"] if e.task == "summary"}
  have = [i for i in test_m if int(i) in refs]
  if have:
    texts["env_reference"] = [refs[int(i)] for i in have]
    movies["env_reference"] = sc(texts["env_reference"], item_z[have], np.asarray(have),
                                 cross=True)
  if len(train_m):
    tr_t = timed("elm_train", lambda: elm.generate("summary", item_z[train_m], **dec))
    movies["elm_train_movies"] = sc(tr_t, item_z[train_m], train_m, cross=True)
  report["semantic_consistency"] = movies
  if ec.interpolations and len(test_m) >= 2:
    pr = tasks_lib.pairs(test_m, ec.interpolations, ec.seed)
    z_mix = np.stack([0.5 * (item_z[a] + item_z[b]) for a, b in pr]).astype(np.float32)
    mix_t = timed("interpolation", lambda: elm.generate("summary", z_mix, **dec))
    report["interpolation"] = {"beta": 0.5, "pairs": [list(p) for p in pr],
                               "elm": sc(mix_t, z_mix, None)}
    # Control: the ELM's decoding of endpoint a alone, scored against the midpoint.
    end_t = elm.generate("summary", item_z[[a for a, _ in pr]], **dec)
    report["interpolation"]["endpoint_a_control"] = sc(end_t, z_mix, None)
  test_u = np.asarray(split["test_users"])
  if len(test_u):
    bc_movies = np.argsort(-np.bincount(ratings.item, minlength=ratings.num_items),
                           kind="stable")[:ec.bc_movies]
    meta_texts = [encoder_train.metadata_text(ratings.titles[i], ratings.genres[i])
                  for i in bc_movies]
    movie_emb = np.asarray(encode(meta_texts), np.float32)
    prof_t = timed("elm_profiles", lambda: elm.generate("user_profile", user_z[test_u], **dec))
    bc = metrics_lib.behavioural_consistency(np.asarray(encode(prof_t)), movie_emb,
                                             user_z[test_u], item_z[bc_movies])
    shifted = np.roll(np.arange(len(test_u)), 1)
    bc_mis = metrics_lib.behavioural_consistency(np.asarray(encode(prof_t))[shifted], movie_emb,
                                                 user_z[test_u], item_z[bc_movies])
    out = {"ranker": "cosine(MiniLM(profile), MiniLM(title + genres))",
           "movies": int(len(bc_movies)), "elm": metrics_lib.summary(bc),
           "mismatched_user_control": metrics_lib.summary(bc_mis),
           "per_user": bc.tolist()}
    urefs = {e.slots[0]: e.target for e in split["reference"] if e.task == "user_profile"}
    have_u = [k for k, u in enumerate(test_u) if int(u) in urefs]
    if have_u:
      texts["env_profiles"] = [urefs[int(test_u[k])] for k in have_u]
      out["env_reference"] = metrics_lib.summary(metrics_lib.behavioural_consistency(
          np.asarray(encode(texts["env_profiles"])), movie_emb, user_z[test_u[have_u]],
          item_z[bc_movies]))
    report["behavioural_consistency"] = out
  report["generation_seconds"] = timings
  report["samples"] = {k: v[:4] for k, v in texts.items()}
  report["texts"] = texts
  return report
