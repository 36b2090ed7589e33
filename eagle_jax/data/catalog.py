"""Movies and users drawn from ratings: what the environment-data prompts need about each.

``movies_from_ratings`` and ``users_from_ratings`` turn contiguous indices of a ``RatingsData`` into
plain records (title, genres, tags; best and worst rated titles, favourite genres); the selection
helpers rank items and users by how many ratings they have (ties: lower index first), so every
selection is deterministic.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import numpy as np


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
    genre_share: genre -> fraction of all ratings whose movie has it (``genre_shares``).
  """
  liked = rows[ratings.rating[rows] >= min_rating]
  counts: dict[str, int] = {}
  for r in liked:
    for g in ratings.genres[ratings.item[r]]:
      counts[g] = counts.get(g, 0) + 1
  lift = {g: c / len(liked) / genre_share[g] for g, c in counts.items() if c >= min_support}
  return tuple(sorted((g for g in lift if lift[g] > 1), key=lambda g: (-lift[g], g))[:n])


def genre_shares(ratings) -> dict[str, float]:
  """Genre -> fraction of all ratings whose movie has that genre."""
  per_item = np.bincount(ratings.item, minlength=ratings.num_items)
  shares: dict[str, float] = {}
  for i, genres in enumerate(ratings.genres):
    for g in genres:
      shares[g] = shares.get(g, 0.0) + per_item[i] / max(1, len(ratings.item))
  return shares


def users_from_ratings(ratings, user_indices: Sequence[int], n_titles: int = 5) -> list[User]:
  """Each user's ``n_titles`` best and worst rated titles (ties: most recent first) and
  ``favourite_genres``."""
  shares = genre_shares(ratings)
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
