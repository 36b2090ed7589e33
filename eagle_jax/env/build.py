"""Building the EAGLE environment data: movie descriptions, user profiles and candidate action sets.

Every LLM request goes through a ``SamplingClient`` (normally ``CachedClient`` over the in-process
``LocalSampler`` or an OpenAI-compatible server), one prompt per ``sample`` call with its own
explicit seed, so a prompt's answer never depends on which other prompts were in flight (the
response cache then serves a rerun). ``BatchingClient`` merges the concurrent one-prompt calls that
an ``asyncio.gather`` starts in one event-loop tick into a single ``generate`` of the inner backend,
which is what lets the local sampler decode them as full batches.

Seeds: request seeds are ``derive_seed(base_seed, purpose, id, index, attempt)`` (sha256 of the parts,
31 bits), so they are stable across reruns, subsets of movies and batch composition.

Outputs (JSONL, one record a line, appended with one ``os.write`` per line so a killed run leaves
every earlier record intact; unreadable lines are skipped with a warning when read):

* descriptions: ``{"movie_id", "item_index", "title", "genres", "tags", "ok", "plot", "likes",
  "dislikes", "text", "provenance"}``. ``text`` is ``prompts.Description.render()``; ``ok`` is False
  when no plot could be parsed after all attempts (the record is still written so a rerun does not
  ask again and the failure is visible).
* profiles: ``{"user_id", "user_index", "liked", "disliked", "liked_genres", "ok", "profile",
  "provenance"}`` (``liked_genres``: ``favourite_genres`` of the ratings; absent in older files).
* action sets: ``{"movie_id", "item_index", "user_id", "k", "actions": [{"text", "category",
  "personalised", "source", "seed"}], "stats", "provenance"}``.

``provenance`` holds the model id, every request's prompt (chat messages), its full sampling
parameters (seed included), the raw answer, whether it parsed and the parse error. Action sets are
built by ``actions.build_action_set``; their provenance lists the prompts and seeds it sent (rebuilt
here from the same rule) and its parse failures, since it does not return the raw answers.

Resume: each builder takes the output path, reads the records already there and only builds the
missing ones (descriptions and action sets by movie id, profiles by user id).

Choices where the paper is silent: a description is a plot (three sentences asked) and up to
``n_reasons`` distinct one-sentence reasons to like and to dislike it, each its own request (a 135M
model cannot write a five-item list, DESIGN.md); a request whose answer does not parse is retried
with a new seed up to ``retries`` times. A profile is written from the user's five best and five
worst rated titles (ties broken by recency); the favourite genres that fill the personalised action
templates are those over-represented among the user's 4-5 star ratings (``favourite_genres``).
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import os
import pathlib
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np
from absl import logging

from eagle_jax.env import actions as actions_lib
from eagle_jax.env import client as client_lib
from eagle_jax.env import prompts as prompts_lib
from eagle_jax.env.client import Completion, Prompt, SamplingBackend, SamplingParams

_MAX_SEED = 2**31 - 1


# ---------------------------------------------------------------------------------------------------
# Seeds, batching.


def derive_seed(base: int, *parts: Any) -> int:
  """A 31-bit seed from ``base`` and any printable parts (stable across runs and platforms)."""
  blob = "/".join(str(p) for p in (base, *parts))
  return int.from_bytes(hashlib.sha256(blob.encode("utf-8")).digest()[:4], "big") & _MAX_SEED


class BatchingClient(SamplingBackend):
  """Merges ``generate`` calls started in the same event-loop tick into one inner ``generate``.

  ``asyncio.gather`` over many one-prompt ``sample`` calls thus becomes one call of the inner
  backend (which the local sampler splits into decode batches of equal sampling parameters). Each
  prompt keeps its own ``SamplingParams`` (and prompt seed), so answers are unchanged by merging.

  Attributes:
    inner: the wrapped backend.
    inner_calls: number of merged calls sent to ``inner``.
  """

  def __init__(self, inner: SamplingBackend):
    if not isinstance(inner, SamplingBackend):
      raise ValueError(f"inner: expected a SamplingBackend, got {type(inner).__name__}")
    self.inner = inner
    self.model_id = inner.model_id
    self.default_chat = inner.default_chat
    self.inner_calls = 0
    self._pending: list[tuple[list, list, Any, asyncio.Future]] = []
    self._scheduled = False
    self._tasks: set[asyncio.Task] = set()

  async def generate(self, prompts, params, *, on_result=None) -> list[Completion]:
    client_lib.check_generate_args(prompts, params)
    loop = asyncio.get_running_loop()
    fut = loop.create_future()
    self._pending.append((list(prompts), list(params), on_result, fut))
    if not self._scheduled:
      self._scheduled = True
      loop.call_soon(self._flush)
    return await fut

  def _flush(self) -> None:
    self._scheduled = False
    batch, self._pending = self._pending, []
    task = asyncio.get_running_loop().create_task(self._run(batch))
    self._tasks.add(task)
    task.add_done_callback(self._tasks.discard)

  async def _run(self, batch) -> None:
    prompts = [p for b in batch for p in b[0]]
    params = [q for b in batch for q in b[1]]
    owner = [(j, i) for j, b in enumerate(batch) for i in range(len(b[0]))]

    def on_result(n: int, completion: Completion) -> None:
      j, i = owner[n]
      if batch[j][2] is not None:
        batch[j][2](i, completion)

    self.inner_calls += 1
    try:
      answers = await self.inner.generate(prompts, params, on_result=on_result)
    except Exception as e:  # noqa: BLE001 (handed to every waiting caller)
      for b in batch:
        if not b[3].done():
          b[3].set_exception(e)
      return
    start = 0
    for b in batch:
      n = len(b[0])
      if not b[3].done():
        b[3].set_result(list(answers[start:start + n]))
      start += n

  async def aclose(self) -> None:
    await self.inner.aclose()


def batching(client) -> Any:
  """``client`` wrapped in a ``BatchingClient`` when it is a backend that is not one already."""
  if isinstance(client, SamplingBackend) and not isinstance(client, BatchingClient):
    return BatchingClient(client)
  return client


# ---------------------------------------------------------------------------------------------------
# JSONL with provenance.


def append_jsonl(path: str | os.PathLike, records: Iterable[Mapping[str, Any]]) -> int:
  """Appends records, one ``os.write`` per line (O_APPEND). Returns the number written."""
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  needs_newline = path.exists() and path.stat().st_size > 0 and not path.read_bytes().endswith(
      b"\n")
  n = 0
  fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
  try:
    for rec in records:
      line = (json.dumps(rec, ensure_ascii=False, separators=(",", ":")) + "\n").encode("utf-8")
      if needs_newline:
        line, needs_newline = b"\n" + line, False
      if os.write(fd, line) != len(line):
        raise OSError(f"{path}: short write")
      n += 1
  finally:
    os.close(fd)
  return n


def read_jsonl(path: str | os.PathLike, *, key: str | None = None) -> list[dict[str, Any]]:
  """Records of a JSONL file ([] if missing); unreadable lines (a killed writer) are skipped.

  Args:
    path: the file.
    key: if given, records lacking this field are skipped too, and only the first record of each
      value is kept.
  """
  path = pathlib.Path(path)
  if not path.exists():
    return []
  out, seen, skipped = [], set(), 0
  for number, line in enumerate(path.read_bytes().split(b"\n"), start=1):
    if not line.strip():
      continue
    try:
      rec = json.loads(line)
      if not isinstance(rec, dict) or (key is not None and key not in rec):
        raise ValueError("not a record")
    except ValueError:
      skipped += 1
      logging.warning("%s:%d: skipping an unreadable line", path, number)
      continue
    if key is not None:
      if rec[key] in seen:
        continue
      seen.add(rec[key])
    out.append(rec)
  return out


# ---------------------------------------------------------------------------------------------------
# Requests with parsing, retries and provenance.


@dataclasses.dataclass(frozen=True)
class GenerationConfig:
  """Sampling settings shared by all requests (``max_tokens`` per request kind).

  Attributes:
    seed: base seed of ``derive_seed``.
    temperature, top_p, top_k, repetition_penalty, no_repeat_ngram: see ``SamplingParams``.
    plot_tokens, reason_tokens, profile_tokens, action_tokens: ``max_tokens`` per request kind.
    n_reasons: reasons to like and (separately) to dislike, one request each.
    retries: extra attempts (new seed) for a request whose answer does not parse.
  """

  seed: int = 0
  temperature: float = 0.7
  top_p: float = 0.9
  top_k: int = 0
  repetition_penalty: float = 1.2
  no_repeat_ngram: int = 3
  plot_tokens: int = 96
  reason_tokens: int = 40
  profile_tokens: int = 64
  action_tokens: int = 40
  n_reasons: int = 5
  retries: int = 1

  def __post_init__(self):
    for name in ("plot_tokens", "reason_tokens", "profile_tokens", "action_tokens"):
      client_lib._check_int(name, getattr(self, name), 1)  # noqa: SLF001 (shared validator)
    client_lib._check_int("n_reasons", self.n_reasons, 0)  # noqa: SLF001
    client_lib._check_int("retries", self.retries, 0)  # noqa: SLF001
    client_lib._check_int("seed", self.seed, 0, _MAX_SEED)  # noqa: SLF001
    self.params(1, 0)  # validates the sampling knobs

  @classmethod
  def from_config(cls, config: Mapping[str, Any] | Any) -> GenerationConfig:
    d = dict(config)
    unknown = sorted(set(d) - {f.name for f in dataclasses.fields(cls)})
    if unknown:
      raise ValueError(f"generation config: unknown field(s) {unknown}")
    return cls(**d)

  def params(self, max_tokens: int, seed: int) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=self.temperature, top_p=self.top_p,
                          top_k=self.top_k, repetition_penalty=self.repetition_penalty,
                          no_repeat_ngram=self.no_repeat_ngram, seed=seed, chat=True)


@dataclasses.dataclass
class _Job:
  purpose: str
  prompt: list[dict[str, str]]
  seed_parts: tuple
  max_tokens: int
  parse: Callable[[str], str]
  result: str | None = None
  calls: list[dict[str, Any]] = dataclasses.field(default_factory=list)


async def _sample_one(client, prompt: Prompt, params: SamplingParams) -> str:
  extra = {"top_p": params.top_p, "top_k": params.top_k,
           "repetition_penalty": params.repetition_penalty,
           "no_repeat_ngram": params.no_repeat_ngram, "chat": params.chat}
  out = await client.sample([prompt], max_tokens=params.max_tokens,
                            temperature=params.temperature, seed=params.seed, **extra)
  return out[0]


async def _run_jobs(client, jobs: Sequence[_Job], gen: GenerationConfig) -> None:
  """Samples every job, retrying unparsable answers with a new seed (``gen.retries`` times)."""
  for attempt in range(gen.retries + 1):
    todo = [j for j in jobs if j.result is None]
    if not todo:
      return
    params = [gen.params(j.max_tokens, derive_seed(gen.seed, *j.seed_parts, attempt))
              for j in todo]
    answers = await asyncio.gather(*[_sample_one(client, j.prompt, p)
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


# ---------------------------------------------------------------------------------------------------
# Movies, users, action sets.


@dataclasses.dataclass(frozen=True)
class Movie:
  """What the prompts need about one movie."""

  movie_id: int
  item_index: int
  title: str
  genres: tuple[str, ...]
  tags: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class User:
  """A user's best and worst rated titles (input of the profile prompt) and favourite genres
  (``favourite_genres``; they fill the personalised action templates)."""

  user_id: int
  user_index: int
  liked: tuple[str, ...]
  disliked: tuple[str, ...]
  liked_genres: tuple[str, ...] = ()


def movies_from_ratings(ratings, item_indices: Sequence[int]) -> list[Movie]:
  """``Movie`` records for contiguous item indices of a ``data.RatingsData``."""
  out = []
  for i in item_indices:
    i = int(i)
    if not 0 <= i < ratings.num_items:
      raise ValueError(f"item_indices: {i} is outside [0, {ratings.num_items})")
    out.append(Movie(int(ratings.item_ids[i]), i, str(ratings.titles[i]),
                     tuple(ratings.genres[i]), tuple(ratings.tags[i])))
  return out


def most_rated_items(ratings, n: int) -> np.ndarray:
  """The ``n`` items with the most ratings (ties: lower index first): [n] int."""
  counts = np.bincount(ratings.item, minlength=ratings.num_items)
  return np.lexsort((np.arange(ratings.num_items), -counts))[:n]


def most_active_users(ratings, n: int) -> np.ndarray:
  """The ``n`` users with the most ratings (ties: lower index first): [n] int."""
  counts = np.bincount(ratings.user, minlength=ratings.num_users)
  return np.lexsort((np.arange(ratings.num_users), -counts))[:n]


def favourite_genres(ratings, rows: np.ndarray, genre_share: Mapping[str, float], *, n: int = 3,
                     min_rating: float = 4.0, min_support: int = 3) -> tuple[str, ...]:
  """Up to ``n`` genres over-represented among a user's ratings >= ``min_rating``.

  A genre qualifies with at least ``min_support`` such ratings and a lift (its share among them
  over ``genre_share``, its share among all ratings) above 1; highest lift first (ties: name).

  Args:
    ratings: a ``data.RatingsData``.
    rows: the user's rating rows.
    genre_share: genre -> fraction of all ratings whose movie has it (``_genre_shares``).
  """
  liked = rows[ratings.rating[rows] >= min_rating]
  counts: dict[str, int] = {}
  for r in liked:
    for g in ratings.genres[ratings.item[r]]:
      counts[g] = counts.get(g, 0) + 1
  lift = {g: c / len(liked) / genre_share[g] for g, c in counts.items() if c >= min_support}
  return tuple(sorted((g for g in lift if lift[g] > 1), key=lambda g: (-lift[g], g))[:n])


def _genre_shares(ratings) -> dict[str, float]:
  per_item = np.bincount(ratings.item, minlength=ratings.num_items)
  shares: dict[str, float] = {}
  for i, genres in enumerate(ratings.genres):
    for g in genres:
      shares[g] = shares.get(g, 0.0) + per_item[i] / max(1, len(ratings.item))
  return shares


def users_from_ratings(ratings, user_indices: Sequence[int], n_titles: int = 5) -> list[User]:
  """Each user's ``n_titles`` best and worst rated titles (ties: most recent first) and
  ``favourite_genres``."""
  shares = _genre_shares(ratings)
  out = []
  for u in user_indices:
    u = int(u)
    if not 0 <= u < ratings.num_users:
      raise ValueError(f"user_indices: {u} is outside [0, {ratings.num_users})")
    rows = np.flatnonzero(ratings.user == u)
    best = rows[np.lexsort((-ratings.timestamp[rows], -ratings.rating[rows]))]
    worst = rows[np.lexsort((-ratings.timestamp[rows], ratings.rating[rows]))]
    liked = [str(ratings.titles[ratings.item[r]]) for r in best[:n_titles]]
    disliked = [str(ratings.titles[ratings.item[r]]) for r in worst[:n_titles]
                if str(ratings.titles[ratings.item[r]]) not in liked]
    out.append(User(int(ratings.user_ids[u]), u, tuple(liked), tuple(disliked),
                    favourite_genres(ratings, rows, shares)))
  return out


async def describe_movies(client, movies: Sequence[Movie], gen: GenerationConfig,
                          out_path: str | os.PathLike | None = None) -> list[dict[str, Any]]:
  """Descriptions (plot, reasons to like, reasons to dislike) of ``movies``.

  Args:
    client: a ``SamplingClient`` (wrapped in ``BatchingClient`` here when it is a backend).
    movies: the movies.
    gen: sampling settings.
    out_path: JSONL file; movies already in it are skipped and new records appended.

  Returns:
    The records of all ``movies`` (old and new), in input order.
  """
  client = batching(client)
  done = {r["movie_id"]: r for r in read_jsonl(out_path, key="movie_id")} if out_path else {}
  todo = [m for m in movies if m.movie_id not in done]
  if todo:
    logging.info("describing %d movies (%d already done)", len(todo), len(movies) - len(todo))
    plots = [_Job("plot", prompts_lib.plot_prompt(m.title, m.genres, m.tags), ("plot", m.movie_id),
                  gen.plot_tokens, prompts_lib.clean_paragraph) for m in todo]
    await _run_jobs(client, plots, gen)
    reasons: dict[int, list[_Job]] = {}
    for m, p in zip(todo, plots):
      if p.result is None:
        continue
      reasons[m.movie_id] = [
          _Job("like" if like else "dislike",
               prompts_lib.reason_prompt(m.title, p.result, like=like),
               ("like" if like else "dislike", m.movie_id, r), gen.reason_tokens, _parse_reason)
          for like in (True, False) for r in range(gen.n_reasons)]
    await _run_jobs(client, [j for js in reasons.values() for j in js], gen)
    new = []
    for m, p in zip(todo, plots):
      js = reasons.get(m.movie_id, [])
      likes = _unique(j.result for j in js if j.purpose == "like" and j.result)
      dislikes = _unique(j.result for j in js if j.purpose == "dislike" and j.result)
      ok = p.result is not None
      desc = prompts_lib.Description(p.result or "", tuple(likes), tuple(dislikes))
      new.append({"movie_id": m.movie_id, "item_index": m.item_index, "title": m.title,
                  "genres": list(m.genres), "tags": list(m.tags), "ok": ok, "plot": p.result,
                  "likes": likes, "dislikes": dislikes, "text": desc.render() if ok else None,
                  "provenance": _provenance(client, [p, *js])})
    if out_path:
      append_jsonl(out_path, new)
    done.update((r["movie_id"], r) for r in new)
  return [done[m.movie_id] for m in movies]


async def profile_users(client, users: Sequence[User], gen: GenerationConfig,
                        out_path: str | os.PathLike | None = None) -> list[dict[str, Any]]:
  """User profile summaries (``prompts.profile_prompt``), resumable like ``describe_movies``."""
  client = batching(client)
  done = {r["user_id"]: r for r in read_jsonl(out_path, key="user_id")} if out_path else {}
  todo = [u for u in users if u.user_id not in done]
  if todo:
    logging.info("profiling %d users (%d already done)", len(todo), len(users) - len(todo))
    jobs = [_Job("profile", prompts_lib.profile_prompt(u.liked, u.disliked),
                 ("profile", u.user_id), gen.profile_tokens, prompts_lib.parse_profile)
            for u in todo]
    await _run_jobs(client, jobs, gen)
    new = [{"user_id": u.user_id, "user_index": u.user_index, "liked": list(u.liked),
            "disliked": list(u.disliked), "liked_genres": list(u.liked_genres),
            "ok": j.result is not None, "profile": j.result,
            "provenance": _provenance(client, [j])} for u, j in zip(todo, jobs)]
    if out_path:
      append_jsonl(out_path, new)
    done.update((r["user_id"], r) for r in new)
  return [done[u.user_id] for u in users]


async def build_action_sets(
    client,
    encode: Callable[[Sequence[str]], np.ndarray],
    descriptions: Sequence[Mapping[str, Any]],
    profiles: Sequence[Mapping[str, Any]],
    *,
    k: int,
    llm_calls: int,
    gen: GenerationConfig,
    dedupe_threshold: float = 0.9,
    out_path: str | os.PathLike | None = None,
) -> list[dict[str, Any]]:
  """K candidate actions for each described movie (``actions.build_action_set``).

  Movie ``i`` (among the usable descriptions) is personalised to profile ``i % len(profiles)``:
  half of its LLM requests carry the profile text, and about half of its templates name the
  profile's ``liked_genres`` (generic only when no usable profile exists; generic templates only
  for a profile record without ``liked_genres``).

  Args:
    client: a ``SamplingClient``.
    encode: texts -> [n, e] sentence embeddings (near-duplicate removal).
    descriptions: records of ``describe_movies`` (those with ``ok`` False are skipped).
    profiles: records of ``profile_users`` (those with ``ok`` False are not used).
    k: actions per set.
    llm_calls: LLM requests per set (the rest comes from templates).
    gen: sampling settings (``action_tokens``, ``temperature``, ``seed``).
    dedupe_threshold: cosine similarity above which an action is a near-duplicate.
    out_path: JSONL file; movies already in it are skipped.

  Returns:
    The records of all usable descriptions, in input order.
  """
  if k < 1 or llm_calls < 0:
    raise ValueError(f"k: expected >= 1 and llm_calls >= 0, got k={k}, llm_calls={llm_calls}")
  client = batching(client)
  done = {r["movie_id"]: r for r in read_jsonl(out_path, key="movie_id")} if out_path else {}
  usable = [d for d in descriptions if d.get("ok")]
  users = [p for p in profiles if p.get("ok")]
  todo = [(i, d) for i, d in enumerate(usable) if d["movie_id"] not in done]

  async def one(i: int, d: Mapping[str, Any]) -> dict[str, Any]:
    user = users[i % len(users)] if users else None
    seed = derive_seed(gen.seed, "actions", d["movie_id"])
    profile = user["profile"] if user else None
    liked_genres = list(user.get("liked_genres", ())) if user else []
    acts, stats = await actions_lib.build_action_set(
        client=client, encode=encode, description=d["text"], genres=d["genres"], tags=d["tags"],
        profile=profile, k=k, llm_calls=llm_calls, seed=seed,
        max_tokens=gen.action_tokens, temperature=gen.temperature,
        dedupe_threshold=dedupe_threshold, liked_genres=liked_genres)
    requests = [
        {"category": r.category, "personalised": r.personalised, "prompt": r.messages,
         "params": SamplingParams(max_tokens=gen.action_tokens, temperature=gen.temperature,
                                  seed=r.seed, chat=True).to_dict()}
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
      append_jsonl(out_path, new)
    done.update((r["movie_id"], r) for r in new)
  return [done[d["movie_id"]] for d in usable]
