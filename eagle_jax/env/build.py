"""The environment-data pipeline: movie descriptions, user profiles and candidate action sets.

One pipeline writes the data every consumer reads (the EAGLE world, ``launch.build_env_data``, E_D
training on descriptions): ``build_env_data`` runs three resumable stages over a ``SamplingClient``
(normally ``env.stack.open_llm(...).client``), each configured by its own config block and
validated once by ``check_config``:

* ``describe_movies`` (``config.descriptions``): a plot and up to ``n_reasons`` one-sentence reasons
  to like and to dislike each movie, each its own request (a 135M model cannot write a five-item
  list, DESIGN.md); an answer that does not parse is retried with a new seed ``retries`` times; a
  plot that never parses falls back to the movie's metadata when ``fallback`` is set.
* ``profile_users`` (``config.profiles``): ``kind="llm"`` asks the LLM for the sections of a
  profile under the paper's headings (overall, genre, director, aesthetic, other preferences; one
  request per heading, from the user's best and worst rated titles); ``kind="template"`` writes
  "Loved: ...; Disliked: ...".
* ``build_action_sets`` (``config.actions``): K candidate actions per described movie
  (``actions.build_action_set``), personalised (``personalised=True``) to one profile drawn at
  random (seeded by the movie id) from the usable profiles, as the paper's App. C draws a random
  user profile for the personalised half of each set.

Every request carries an explicit seed ``records.derive_seed(block.seed, purpose, id, index,
attempt)``, so a prompt's answer never depends on which other prompts were in flight and the
response cache serves a rerun.

Outputs (JSONL, one record a line, ``data.records.append_jsonl``):

* descriptions: ``{"movie_id", "item_index", "title", "genres", "tags", "ok", "source", "plot",
  "likes", "dislikes", "text", "provenance"}``. ``text`` is ``prompts.Description.render()``;
  ``source`` is "llm" or "metadata" (the fallback); ``ok`` is False when no plot could be parsed
  and there is no fallback (the record is still written so a rerun does not ask again).
* profiles: ``{"user_id", "user_index", "liked", "disliked", "liked_genres", "ok", "source",
  "profile", "provenance"}``.
* action sets: ``{"movie_id", "item_index", "user_id", "k", "actions": [{"text", "category",
  "personalised", "source", "seed"}], "stats", "provenance"}``.

``provenance`` holds the answering model, every request's prompt (chat messages), its full sampling
parameters (seed included), the raw answer, whether it parsed and the parse error.

Resume: each stage reads the records already in its output file and only builds the missing ones
(descriptions and action sets by movie id, profiles by user id).
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np
from absl import logging

from eagle_jax import prompts as prompts_lib
from eagle_jax.data import records
from eagle_jax.data.catalog import Movie, User
from eagle_jax.env import actions as actions_lib
from eagle_jax.env import client as client_lib
from eagle_jax.env.batching import batching
from eagle_jax.env.client import SamplingParams
from eagle_jax.models.sampling_params import check_int

PROFILE_KINDS = ("template", "llm")
STAGES = ("descriptions", "profiles", "actions")


def _positive(block, field: str, names: Sequence[str], lo: int = 1) -> None:
  for name in names:
    try:
      check_int(name, block[name], lo)
    except ValueError as e:
      raise ValueError(f"{field}.{e}") from None


def check_config(config) -> None:
  """Validates the ``descriptions``, ``profiles`` and ``actions`` blocks of a config (once, at the
  job's entry); ValueError naming the field and what was expected."""
  d, p, a = config.descriptions, config.profiles, config.actions
  _positive(d, "config.descriptions", ("plot_tokens", "reason_tokens", "max_sentences"))
  _positive(d, "config.descriptions", ("n_reasons", "retries", "seed"), lo=0)
  SamplingParams.from_config(d.sampling, "config.descriptions.sampling")
  if p.kind not in PROFILE_KINDS:
    raise ValueError(f"config.profiles.kind: expected one of {PROFILE_KINDS}, got {p.kind!r}")
  _positive(p, "config.profiles", ("titles", "tokens"))
  heads = tuple(p.get("headings", ()))
  if not heads or len(set(heads)) != len(heads) or not set(heads) <= set(
      prompts_lib.PROFILE_HEADINGS):
    raise ValueError(f"config.profiles.headings: expected distinct headings from "
                     f"{prompts_lib.PROFILE_HEADINGS}, got {heads!r}")
  _positive(p, "config.profiles", ("retries", "seed"), lo=0)
  SamplingParams.from_config(p.sampling, "config.profiles.sampling")
  _positive(a, "config.actions", ("k",), lo=2)
  _positive(a, "config.actions", ("llm_calls", "seed"), lo=0)
  SamplingParams.from_config(a.sampling, "config.actions.sampling")
  space = a.get("space", "default")
  if space not in actions_lib.ACTION_SPACES:
    raise ValueError(f"config.actions.space: expected one of {actions_lib.ACTION_SPACES}, got "
                     f"{space!r}")
  if space != "default" and int(a.get("macro_size", 0)) < 2:
    raise ValueError(f"config.actions.macro_size: expected an int >= 2, got {a.get('macro_size')}")
  if space == "combined" and not 1 <= int(a.get("macro_k", 0)) < int(a.k):
    raise ValueError(f"config.actions.macro_k: expected 1 .. k - 1 = {int(a.k) - 1} for the "
                     f"combined space, got {a.get('macro_k')}")
  if not isinstance(a.get("per_state", False), bool):
    raise ValueError(f"config.actions.per_state: expected True or False, got {a.per_state!r}")
  if not 0.0 < float(a.dedupe_threshold) <= 1.0:
    raise ValueError(f"config.actions.dedupe_threshold: expected in (0, 1], got "
                     f"{a.dedupe_threshold}")


def _sampling(block, field: str, **overrides) -> SamplingParams:
  return SamplingParams.from_config(block.sampling, f"{field}.sampling", chat=True, **overrides)


# ---------------------------------------------------------------------------------------------------
# Requests with parsing, retries and provenance.


@dataclasses.dataclass
class _Job:
  purpose: str
  prompt: list[dict[str, str]]
  seed_parts: tuple
  params: SamplingParams
  parse: Callable[[str], str]
  result: str | None = None
  calls: list[dict[str, Any]] = dataclasses.field(default_factory=list)


async def _run_jobs(client, jobs: Sequence[_Job], *, seed: int, retries: int) -> None:
  """Samples every job, retrying unparsable answers with a new seed ``retries`` times."""
  for attempt in range(retries + 1):
    todo = [j for j in jobs if j.result is None]
    if not todo:
      return
    params = [j.params.replace(seed=records.derive_seed(seed, *j.seed_parts, attempt))
              for j in todo]
    answers = await asyncio.gather(*[client_lib.sample_one(client, j.prompt, p)
                                     for j, p in zip(todo, params)])
    for j, p, text in zip(todo, params, answers):
      record = {"purpose": j.purpose, "prompt": j.prompt, "params": p.to_dict(), "text": text,
                "parsed": True, "error": None}
      try:
        j.result = j.parse(text)
      except prompts_lib.ParseError as e:
        record["parsed"], record["error"] = False, str(e)
      j.calls.append(record)


def _provenance(client, jobs: Sequence[_Job]) -> dict[str, Any]:
  calls = [c for j in jobs for c in j.calls]
  failures = [c["error"] for c in calls if not c["parsed"]]
  return {"model": getattr(client, "model_id", type(client).__name__), "created": time.time(),
          "calls": calls, "parse_failures": len(failures), "failures": failures}


def _parse_reason(text: str) -> str:
  return prompts_lib.clean_sentence(text, min_words=4, max_words=40)


def _unique(items: Iterable[str]) -> list[str]:
  seen, out = set(), []
  for x in items:
    key = " ".join(x.lower().split())
    if key not in seen:
      seen.add(key)
      out.append(x)
  return out


def _resume(out_path, key: str) -> dict[Any, dict[str, Any]]:
  return {r[key]: r for r in records.read_jsonl(out_path, key=key)} if out_path else {}


def metadata_plot(movie: Movie) -> str:
  """The fallback plot of a movie whose LLM plot never parsed: still a valid state."""
  return f"{movie.title}, a {'/'.join(movie.genres).lower() or 'feature'} film."


# ---------------------------------------------------------------------------------------------------
# Stages.


async def describe_movies(client, movies: Sequence[Movie], cfg,
                          out_path: str | os.PathLike | None = None) -> list[dict[str, Any]]:
  """Descriptions (plot, reasons to like, reasons to dislike) of ``movies``.

  Args:
    client: a ``SamplingClient`` (wrapped in ``BatchingClient`` here when it is a backend).
    movies: the movies.
    cfg: the ``config.descriptions`` block (validated by ``check_config``).
    out_path: JSONL file; movies already in it are skipped and new records appended.

  Returns:
    The records of all ``movies`` (old and new), in input order.
  """
  client = batching(client)
  done = _resume(out_path, "movie_id")
  todo = [m for m in movies if m.movie_id not in done]
  if todo:
    logging.info("describing %d movies (%d already done)", len(todo), len(movies) - len(todo))
    seed, retries, n_sent = int(cfg.seed), int(cfg.retries), int(cfg.max_sentences)
    plot_params = _sampling(cfg, "config.descriptions", max_tokens=int(cfg.plot_tokens))
    reason_params = _sampling(cfg, "config.descriptions", max_tokens=int(cfg.reason_tokens))
    plots = [_Job("plot", prompts_lib.plot_prompt(m.title, m.genres, m.tags), ("plot", m.movie_id),
                  plot_params, lambda t: prompts_lib.clean_paragraph(t, max_sentences=n_sent))
             for m in todo]
    await _run_jobs(client, plots, seed=seed, retries=retries)
    reasons: dict[int, list[_Job]] = {}
    for m, p in zip(todo, plots):
      if p.result is None:
        continue
      reasons[m.movie_id] = [
          _Job("like" if like else "dislike",
               prompts_lib.reason_prompt(m.title, p.result, like=like),
               ("like" if like else "dislike", m.movie_id, r), reason_params, _parse_reason)
          for like in (True, False) for r in range(int(cfg.n_reasons))]
    await _run_jobs(client, [j for js in reasons.values() for j in js], seed=seed, retries=retries)
    new = []
    for m, p in zip(todo, plots):
      js = reasons.get(m.movie_id, [])
      likes = _unique(j.result for j in js if j.purpose == "like" and j.result)
      dislikes = _unique(j.result for j in js if j.purpose == "dislike" and j.result)
      plot, source = p.result, "llm"
      if plot is None and cfg.fallback:
        plot, source = metadata_plot(m), "metadata"
      ok = plot is not None
      desc = prompts_lib.Description(plot or "", tuple(likes), tuple(dislikes))
      new.append({"movie_id": m.movie_id, "item_index": m.item_index, "title": m.title,
                  "genres": list(m.genres), "tags": list(m.tags), "ok": ok,
                  "source": source if ok else None, "plot": plot, "likes": likes,
                  "dislikes": dislikes, "text": desc.render() if ok else None,
                  "provenance": _provenance(client, [p, *js])})
    if out_path:
      records.append_jsonl(out_path, new)
    done.update((r["movie_id"], r) for r in new)
  return [done[m.movie_id] for m in movies]


def template_profile(user: User) -> str:
  """The template profile of a user: "Loved: a; b. Disliked: c; d."."""
  text = "Loved: " + "; ".join(user.liked)
  if user.disliked:
    text += ". Disliked: " + "; ".join(user.disliked)
  return text + "."


async def profile_users(client, users: Sequence[User], cfg,
                        out_path: str | os.PathLike | None = None) -> list[dict[str, Any]]:
  """User profiles (``cfg.kind``: LLM-written or template), resumable like ``describe_movies``.

  Args:
    client: a ``SamplingClient`` (unused for templates).
    users: the users (``catalog.users_from_ratings`` with ``cfg.titles`` titles).
    cfg: the ``config.profiles`` block.
    out_path: JSONL file; users already in it are skipped.
  """
  done = _resume(out_path, "user_id")
  todo = [u for u in users if u.user_id not in done]
  if todo:
    logging.info("profiling %d users (%d already done)", len(todo), len(users) - len(todo))
    if cfg.kind == "template":
      texts = [template_profile(u) for u in todo]
      prov = [{"model": None, "created": time.time(), "calls": [], "parse_failures": 0,
               "failures": []}] * len(todo)
    else:
      client = batching(client)
      params = _sampling(cfg, "config.profiles", max_tokens=int(cfg.tokens))
      heads = tuple(cfg.headings)
      jobs = [[_Job(h, prompts_lib.profile_prompt(u.liked, u.disliked, h),
                    ("profile", u.user_id, h), params, _parse_reason) for h in heads]
              for u in todo]
      await _run_jobs(client, [j for js in jobs for j in js], seed=int(cfg.seed),
                      retries=int(cfg.retries))
      # A profile needs its first section (the overall taste); a later one that never parsed is
      # left out.
      texts = [prompts_lib.render_profile([(j.purpose, j.result) for j in js if j.result])
               if js[0].result else None for js in jobs]
      prov = [_provenance(client, js) for js in jobs]
    new = [{"user_id": u.user_id, "user_index": u.user_index, "liked": list(u.liked),
            "disliked": list(u.disliked), "liked_genres": list(u.liked_genres),
            "ok": t is not None, "source": cfg.kind, "profile": t, "provenance": pv}
           for u, t, pv in zip(todo, texts, prov)]
    if out_path:
      records.append_jsonl(out_path, new)
    done.update((r["user_id"], r) for r in new)
  return [done[u.user_id] for u in users]


def profile_draw(seed: int, movie_id: int, n_profiles: int) -> int:
  """The index of the profile a movie's action set is personalised to: uniform over
  ``n_profiles``, a function of (seed, movie id) only (resumable, independent of the other movies)."""
  return int(np.random.default_rng(records.derive_seed(seed, "profile", movie_id)).integers(
      n_profiles))


async def build_action_sets(
    client,
    encode: Callable[[Sequence[str]], np.ndarray],
    descriptions: Sequence[Mapping[str, Any]],
    profiles: Sequence[Mapping[str, Any]],
    cfg,
    out_path: str | os.PathLike | None = None,
) -> list[dict[str, Any]]:
  """K candidate actions for each described movie (``actions.build_action_set``).

  With ``cfg.personalised``, each movie's set is personalised to the profile ``profile_draw``
  picks: half of its LLM requests carry the profile text, and about half of its templates name the
  profile's ``liked_genres``. Otherwise (or with no usable profile) the set is generic.

  Args:
    client: a ``SamplingClient``.
    encode: texts -> [n, e] sentence embeddings (near-duplicate removal).
    descriptions: records of ``describe_movies`` (those with ``ok`` False are skipped).
    profiles: records of ``profile_users`` (those with ``ok`` False are not used).
    cfg: the ``config.actions`` block.
    out_path: JSONL file; movies already in it are skipped.

  Returns:
    The records of all usable descriptions, in input order.
  """
  client = batching(client)
  done = _resume(out_path, "movie_id")
  usable = [d for d in descriptions if d.get("ok")]
  users = [p for p in profiles if p.get("ok")] if cfg.personalised else []
  todo = [(i, d) for i, d in enumerate(usable) if d["movie_id"] not in done]
  params = _sampling(cfg, "config.actions")
  k, llm_calls = int(cfg.k), int(cfg.llm_calls)

  async def one(i: int, d: Mapping[str, Any]) -> dict[str, Any]:
    user = users[profile_draw(int(cfg.seed), d["movie_id"], len(users))] if users else None
    seed = records.derive_seed(int(cfg.seed), "actions", d["movie_id"])
    profile = user["profile"] if user else None
    liked_genres = list(user.get("liked_genres", ())) if user else []
    acts, stats = await actions_lib.build_action_set(
        client=client, encode=encode, description=d["text"], genres=d["genres"], tags=d["tags"],
        profile=profile, k=k, llm_calls=llm_calls, seed=seed, params=params,
        dedupe_threshold=float(cfg.dedupe_threshold), liked_genres=liked_genres)
    requests = [
        {"category": r.category, "personalised": r.personalised, "prompt": r.messages,
         "params": params.replace(seed=r.seed).to_dict()}
        for r in actions_lib.action_requests(d["text"], profile, llm_calls, seed)]
    return {"movie_id": d["movie_id"], "item_index": d["item_index"],
            "user_id": user["user_id"] if user else None, "k": k,
            "actions": [dataclasses.asdict(a) for a in acts],
            "stats": dataclasses.asdict(stats),
            "provenance": {"model": getattr(client, "model_id", type(client).__name__),
                           "created": time.time(), "requests": requests,
                           "liked_genres": liked_genres,
                           "parse_failures": stats.parse_failures, "failures": stats.failures}}

  if todo:
    logging.info("building %d action sets (%d already done)", len(todo), len(usable) - len(todo))
    new = await asyncio.gather(*[one(i, d) for i, d in todo])
    if out_path:
      records.append_jsonl(out_path, new)
    done.update((r["movie_id"], r) for r in new)
  return [done[d["movie_id"]] for d in usable]


# ---------------------------------------------------------------------------------------------------
# The pipeline.


@dataclasses.dataclass
class EnvData:
  """What ``build_env_data`` wrote and returns (records in input order) and its report."""

  descriptions: list[dict[str, Any]]
  profiles: list[dict[str, Any]]
  action_sets: list[dict[str, Any]]
  report: dict[str, Any]


def paths(out_dir: str | os.PathLike) -> dict[str, str]:
  """Stage name -> its JSONL file in ``out_dir``."""
  return {s: os.path.join(os.fspath(out_dir), f"{s}.jsonl") for s in STAGES}


async def build_env_data(config, client, encode, movies: Sequence[Movie], users: Sequence[User],
                         out_dir: str | os.PathLike, *,
                         on_stage: Callable[[str, int], Any] | None = None,
                         stats: Callable[[], Mapping[str, int]] | None = None) -> EnvData:
  """Runs the three stages (module docstring) into ``out_dir``; returns the records and a report.

  Args:
    config: a config with ``descriptions``, ``profiles`` and ``actions`` blocks (``check_config``).
    client: a ``SamplingClient``.
    encode: texts -> [n, e] sentence embeddings (action near-duplicate removal).
    movies, users: what to describe and profile.
    out_dir: folder of the JSONL files.
    on_stage: called as ``on_stage(name, n_requests)`` before each stage, with the number of LLM
      requests it will send on first attempts (progress bars).
    stats: returns cache counters (``cache_hits``, ``cache_misses``) for the per-stage report.
  """
  out = paths(out_dir)
  report: dict[str, Any] = {"stages": {}}

  async def stage(name, n, coro):
    if on_stage is not None:
      on_stage(name, n)
    before, t0 = dict(stats() if stats else {}), time.perf_counter()
    recs = await coro
    after = dict(stats() if stats else {})
    report["stages"][name] = {"records": len(recs), "seconds": time.perf_counter() - t0,
                              **{k: after[k] - before.get(k, 0) for k in after}}
    return recs

  d, p, a = config.descriptions, config.profiles, config.actions
  descs = await stage("descriptions", len(movies) * (1 + 2 * int(d.n_reasons)),
                      describe_movies(client, movies, d, out["descriptions"]))
  profs = await stage("profiles", len(users) * len(p.headings) if p.kind == "llm" else 0,
                      profile_users(client, users, p, out["profiles"]))
  sets = await stage("actions", sum(bool(x["ok"]) for x in descs) * int(a.llm_calls),
                     build_action_sets(client, encode, descs, profs, a, out["actions"]))
  report["stages"]["descriptions"].update(
      ok=sum(bool(d["ok"]) for d in descs),
      fallbacks=sum(d.get("source") == "metadata" for d in descs),
      parse_failures=sum(d["provenance"]["parse_failures"] for d in descs),
      mean_likes=sum(len(d["likes"]) for d in descs) / max(1, len(descs)),
      mean_dislikes=sum(len(d["dislikes"]) for d in descs) / max(1, len(descs)))
  report["stages"]["profiles"].update(
      ok=sum(bool(p["ok"]) for p in profs),
      parse_failures=sum(p["provenance"]["parse_failures"] for p in profs))
  report["stages"]["actions"].update(
      parse_failures=sum(s["stats"]["parse_failures"] for s in sets),
      llm_actions=sum(a["source"] == "llm" for s in sets for a in s["actions"]),
      template_actions=sum(a["source"] == "template" for s in sets for a in s["actions"]),
      personalised_actions=sum(bool(a["personalised"]) for s in sets for a in s["actions"]),
      min_k=min((len(s["actions"]) for s in sets), default=0))
  return EnvData(descs, profs, sets, report)
