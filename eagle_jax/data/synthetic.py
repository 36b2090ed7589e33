"""Deterministic synthetic MovieLens-shaped data, and writers of the GroupLens file layouts.

``generate_ratings`` draws a low-rank preference model (user and item factors, biases, noise) and a
skewed exposure model (log-normal user activity, Zipf-like item popularity), then rounds predicted
preferences to MovieLens half stars. Genres follow each item's dominant latent direction, so content
features carry signal about the behavioural factors, as in real data. The same seed gives the same
arrays on every machine (numpy's PCG64 generator).

``write_movielens_csv`` / ``write_ml100k`` / ``write_recbole`` write a ``RatingsData`` in the exact
layouts the readers take, for tests (round trips across readers) and scale benchmarks (a 25M-shaped
``ratings.csv``).
"""

from __future__ import annotations

import os
import pathlib

import numpy as np
import pyarrow as pa
import pyarrow.csv as pa_csv

from eagle_jax.data.movielens import ML100K_GENRES
from eagle_jax.data.types import RatingsData

ML25M_GENRES = (
    "Action", "Adventure", "Animation", "Children", "Comedy", "Crime", "Documentary", "Drama",
    "Fantasy", "Film-Noir", "Horror", "IMAX", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller",
    "War", "Western")
_TAG_WORDS = (
    "atmospheric", "twist ending", "dark comedy", "based on a book", "visually appealing",
    "thought-provoking", "space", "time travel", "heist", "coming of age", "dystopia", "romance",
    "slow burn", "great soundtrack", "quirky", "violent", "feel-good", "classic", "cult film", "funny")
# ML-25M's time range (seconds since the epoch).
_T0, _T1 = 789_652_009, 1_574_327_703


def generate_ratings(
    *,
    num_users: int,
    num_items: int,
    num_ratings: int,
    rank: int = 16,
    min_per_user: int = 5,
    noise: float = 0.5,
    tags_per_item: int = 3,
    seed: int = 0,
    genres: tuple[str, ...] = ML25M_GENRES,
    chunk: int = 1 << 21,
) -> RatingsData:
  """Draws a synthetic ratings set (see module docstring).

  Args:
    num_users, num_items, num_ratings: the shape (ML-25M: 162_541, 62_423, 25_000_095).
    rank: dimension of the true preference model.
    min_per_user: every user rates at least this many items.
    noise: standard deviation of rating noise, in stars.
    tags_per_item: tags drawn per item (0 for none).
    seed: the only source of randomness.
    genres: genre vocabulary (use ``ML100K_GENRES[1:]`` to write an ML-100K layout).
    chunk: ratings scored per block (bounds memory at 25M scale).

  Returns:
    A ``RatingsData`` with raw user ids ``1..num_users`` and sparse raw movie ids.
  """
  if min(num_users, num_items, num_ratings, rank) <= 0:
    raise ValueError("num_users, num_items, num_ratings and rank must be positive")
  if num_ratings < num_users * min_per_user:
    raise ValueError(f"num_ratings={num_ratings} < num_users*min_per_user="
                     f"{num_users * min_per_user}")
  if num_ratings > num_users * num_items // 2:
    raise ValueError(f"num_ratings={num_ratings} is more than half of the {num_users}x{num_items}"
                     " matrix; synthetic data is meant to be sparse")
  rng = np.random.default_rng(seed)
  # Exposure: how many ratings each user gives, and which items they pick.
  activity = rng.lognormal(0.0, 1.0, num_users)
  extra = num_ratings - num_users * min_per_user
  counts = min_per_user + rng.multinomial(extra, activity / activity.sum())
  counts = np.minimum(counts, num_items // 2)
  deficit = num_ratings - counts.sum()
  while deficit > 0:  # Re-spread what the cap removed over users below it.
    room = np.flatnonzero(counts < num_items // 2)
    add = rng.choice(room, size=int(deficit), replace=True)
    np.add.at(counts, add, 1)
    counts = np.minimum(counts, num_items // 2)
    deficit = num_ratings - counts.sum()
  popularity = 1.0 / (rng.permutation(num_items) + 10.0) ** 0.9
  popularity /= popularity.sum()
  user = np.repeat(np.arange(num_users, dtype=np.int32), counts)
  item = rng.choice(num_items, size=num_ratings, p=popularity).astype(np.int32)
  for _ in range(100):  # Replace repeated (user, item) pairs until all are distinct.
    key = user.astype(np.int64) * num_items + item
    order = np.argsort(key, kind="stable")
    dup = order[1:][key[order][1:] == key[order][:-1]]
    if dup.size == 0:
      break
    item[dup] = rng.integers(0, num_items, size=dup.size, dtype=np.int32)
  else:
    raise RuntimeError("could not draw distinct (user, item) pairs; the matrix is too dense")
  # Preferences: low-rank model plus biases and noise, rounded to half stars.
  user_f = rng.normal(0.0, 1.0 / np.sqrt(rank), (num_users, rank)).astype(np.float32)
  item_f = rng.normal(0.0, 1.0, (num_items, rank)).astype(np.float32)
  user_b = rng.normal(0.0, 0.4, num_users).astype(np.float32)
  item_b = rng.normal(0.0, 0.4, num_items).astype(np.float32)
  rating = np.empty(num_ratings, np.float32)
  for s in range(0, num_ratings, chunk):
    u, i = user[s:s + chunk], item[s:s + chunk]
    score = np.einsum("nk,nk->n", user_f[u], item_f[i]) + user_b[u] + item_b[i]
    score += rng.normal(0.0, noise, score.shape).astype(np.float32)
    rating[s:s + chunk] = np.clip(np.round((3.5 + score) * 2.0) / 2.0, 0.5, 5.0)
  timestamp = rng.integers(_T0, _T1, size=num_ratings, dtype=np.int64)
  # Metadata: sparse raw movie ids, genres from the dominant latent directions, tags.
  item_ids = np.sort(rng.choice(3 * num_items, size=num_items, replace=False) + 1).astype(np.int64)
  years = rng.integers(1920, 2020, size=num_items)
  titles = [f"Synthetic Movie {int(m)} ({int(y)})" for m, y in zip(item_ids, years)]
  top = np.argsort(-np.abs(item_f), axis=1)[:, :2]
  genre_list = [tuple(sorted({genres[int(j) % len(genres)] for j in row})) for row in top]
  tags = [tuple(sorted(set(rng.choice(_TAG_WORDS, size=tags_per_item).tolist())))
          if tags_per_item else () for _ in range(num_items)]
  order = np.lexsort((timestamp, user))
  return RatingsData(
      user=user[order], item=item[order], rating=rating[order], timestamp=timestamp[order],
      user_ids=np.arange(1, num_users + 1, dtype=np.int64), item_ids=item_ids, titles=titles,
      genres=genre_list, tags=tags, source=f"synthetic(seed={seed})")


def _write(table: pa.Table, path: pathlib.Path, *, delimiter: str = ",", header: bool = True,
           quote: bool = True) -> None:
  opts = pa_csv.WriteOptions(include_header=header, delimiter=delimiter,
                             quoting_style="needed" if quote else "none")
  pa_csv.write_csv(table, path, write_options=opts)


def _raw_columns(data: RatingsData):
  return data.user_ids[data.user], data.item_ids[data.item]


def write_movielens_csv(data: RatingsData, folder: str | os.PathLike) -> pathlib.Path:
  """Writes ``ratings.csv``, ``movies.csv`` and (if any item has tags) ``tags.csv``."""
  folder = pathlib.Path(folder)
  folder.mkdir(parents=True, exist_ok=True)
  users, movies = _raw_columns(data)
  _write(pa.table({"userId": users, "movieId": movies, "rating": data.rating.astype(np.float64),
                   "timestamp": data.timestamp}), folder / "ratings.csv")
  _write(pa.table({"movieId": data.item_ids, "title": list(data.titles),
                   "genres": ["|".join(g) if g else "(no genres listed)" for g in data.genres]}),
         folder / "movies.csv")
  tag_items = [(int(m), t) for m, ts in zip(data.item_ids, data.tags) for t in ts]
  if tag_items:
    n = len(tag_items)
    _write(pa.table({"userId": np.ones(n, np.int64), "movieId": [m for m, _ in tag_items],
                     "tag": [t for _, t in tag_items],
                     "timestamp": np.full(n, _T0, np.int64)}), folder / "tags.csv")
  return folder


def _ml100k_flags(data: RatingsData) -> np.ndarray:
  flags = np.zeros((data.num_items, len(ML100K_GENRES)), np.int64)
  index = {g: j for j, g in enumerate(ML100K_GENRES)}
  for i, gs in enumerate(data.genres):
    for g in gs:
      if g not in index:
        raise ValueError(f"genre {g!r} of item {int(data.item_ids[i])} is not an ML-100K genre")
      flags[i, index[g]] = 1
  return flags


def write_ml100k(data: RatingsData, folder: str | os.PathLike) -> pathlib.Path:
  """Writes the original ML-100K layout: ``u.data``, ``u.item`` and (with user features) ``u.user``."""
  folder = pathlib.Path(folder)
  folder.mkdir(parents=True, exist_ok=True)
  users, movies = _raw_columns(data)
  _write(pa.table({"u": users, "i": movies, "r": data.rating.astype(np.int64),
                   "t": data.timestamp}), folder / "u.data", delimiter="\t", header=False,
         quote=False)
  flags = _ml100k_flags(data)
  lines = []
  for i, (mid, title) in enumerate(zip(data.item_ids, data.titles)):
    year = title[-5:-1] if title.endswith(")") and title[-5:-1].isdigit() else ""
    date = f"01-Jan-{year}" if year else ""
    lines.append("|".join([str(int(mid)), title, date, "", "", *map(str, flags[i])]))
  (folder / "u.item").write_text("\n".join(lines) + "\n", encoding="latin-1")
  if data.user_features:
    f = data.user_features
    rows = [f"{int(u)}|{a}|{g}|{o}|{z}" for u, a, g, o, z in zip(
        data.user_ids, f["age"], f["gender"], f["occupation"], f["zip_code"])]
    (folder / "u.user").write_text("\n".join(rows) + "\n", encoding="latin-1")
  return folder


def write_recbole(data: RatingsData, folder: str | os.PathLike, name: str) -> pathlib.Path:
  """Writes RecBole atomic files ``<name>.inter`` and ``<name>.item`` (tab separated, typed headers)."""
  folder = pathlib.Path(folder)
  folder.mkdir(parents=True, exist_ok=True)
  users, movies = _raw_columns(data)
  inter = ["user_id:token\titem_id:token\trating:float\ttimestamp:float"]
  inter += [f"{u}\t{i}\t{r:g}\t{t}" for u, i, r, t in zip(
      users.tolist(), movies.tolist(), data.rating.tolist(), data.timestamp.tolist())]
  (folder / f"{name}.inter").write_text("\n".join(inter) + "\n", encoding="utf8")
  items = ["item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq"]
  for mid, title, gs in zip(data.item_ids, data.titles, data.genres):
    year = title[-5:-1] if title.endswith(")") and title[-5:-1].isdigit() else ""
    bare = title[:-7] if year else title
    items.append(f"{int(mid)}\t{bare}\t{year}\t{' '.join(gs)}")
  (folder / f"{name}.item").write_text("\n".join(items) + "\n", encoding="utf8")
  return folder
