"""Deterministic per-user holdout by time.

For every user the most recent ratings go to the test set: ``floor(test_fraction * n_u)`` of them,
but never so many that fewer than ``min_train`` remain for training, and at least ``min_test`` when the
user has more than ``min_train`` ratings. Ties in time are broken by item index, so the split depends on
nothing but the data (no RNG). This is the "leave the latest out" protocol of sequential recommender
evaluation; it is stricter than a random split because the test ratings are in each user's future.
"""

from __future__ import annotations

import numpy as np

from eagle_jax.data.types import RatingsData


def holdout_by_time(
    data: RatingsData, *, test_fraction: float = 0.2, min_train: int = 1, min_test: int = 1
) -> tuple[np.ndarray, np.ndarray]:
  """Splits the ratings of each user by time.

  Args:
    data: the ratings.
    test_fraction: share of each user's ratings held out (the latest ones), in [0, 1).
    min_train: ratings every user keeps in training (users with fewer keep all).
    min_test: ratings held out per user when the user has more than ``min_train``.

  Returns:
    ``(train_index, test_index)``: sorted int64 row indices into ``data``, disjoint, covering all rows.
  """
  if not 0.0 <= test_fraction < 1.0:
    raise ValueError(f"test_fraction must be in [0, 1), got {test_fraction}")
  if min_train < 0 or min_test < 0:
    raise ValueError(f"min_train and min_test must be >= 0, got {min_train}, {min_test}")
  n = data.num_ratings
  # Order rows by (user, timestamp, item): np.lexsort sorts by the last key first.
  order = np.lexsort((data.item, data.timestamp, data.user))
  users_sorted = data.user[order]
  counts = np.bincount(data.user, minlength=data.num_users)
  starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
  rank = np.arange(n) - starts[users_sorted]  # 0 = oldest rating of that user
  n_u = counts[users_sorted]
  n_test = np.floor(test_fraction * n_u).astype(np.int64)
  n_test = np.maximum(n_test, np.where(n_u > min_train, min_test, 0))
  n_test = np.minimum(n_test, np.maximum(n_u - min_train, 0))
  is_test = rank >= n_u - n_test
  return np.sort(order[~is_test]), np.sort(order[is_test])


def split(data: RatingsData, **kwargs) -> tuple[RatingsData, RatingsData]:
  """``holdout_by_time`` as two ``RatingsData`` sharing ids and metadata."""
  train, test = holdout_by_time(data, **kwargs)
  return data.subset(train), data.subset(test)
