"""Quality metrics of WALS embeddings: rating RMSE and top-k recall of held-out items.

* ``rmse``: root mean squared error of the predicted rating ``mu + b_u + c_i + <x_u, y_i>`` (equal to
  ``<z_u, z_i>`` of ``WALSFactors.augmented``), optionally clipped to the rating scale.
* ``recall_at_k``: for every user with at least one *relevant* held-out item (held-out rating >=
  ``min_rating``; ``min_rating=None`` makes every held-out item relevant), rank all items the user
  did not rate in training by predicted rating, take the top ``k`` and count the relevant ones among
  them, divided by ``min(k, #relevant)`` (the normalisation of Liang et al. 2018, so a perfect ranking
  scores 1). The mean over those users is returned.

Scores are computed for blocks of users at a time ([block, I] floats), so memory stays bounded.
"""

from __future__ import annotations

import numpy as np

from eagle_jax.embed.wals import WALSFactors


def _numpy_factors(factors: WALSFactors):
  return (np.asarray(factors.user_factors, np.float32), np.asarray(factors.item_factors, np.float32),
          np.asarray(factors.user_bias, np.float32), np.asarray(factors.item_bias, np.float32),
          float(np.asarray(factors.global_mean)))


def predict(
    factors: WALSFactors,
    user: np.ndarray,
    item: np.ndarray,
    *,
    clip: tuple[float, float] | None = None,
    chunk: int = 1 << 20,
) -> np.ndarray:
  """[N] float32 predicted ratings of the pairs ``(user[n], item[n])``, clipped to ``clip``."""
  x, y, b, c, mu = _numpy_factors(factors)
  user, item = np.asarray(user), np.asarray(item)
  if user.shape != item.shape or user.ndim != 1:
    raise ValueError(f"user and item must be 1-d of equal length, got {user.shape}, {item.shape}")
  out = np.empty(user.shape[0], np.float32)
  for s in range(0, user.shape[0], chunk):
    u, i = user[s:s + chunk], item[s:s + chunk]
    out[s:s + chunk] = mu + b[u] + c[i] + np.einsum("nk,nk->n", x[u], y[i])
  if clip is not None:
    np.clip(out, clip[0], clip[1], out=out)
  return out


def rmse(
    factors: WALSFactors,
    user: np.ndarray,
    item: np.ndarray,
    rating: np.ndarray,
    *,
    clip: tuple[float, float] | None = None,
) -> float:
  """Root mean squared error of ``predict`` against ``rating`` [N]."""
  rating = np.asarray(rating, np.float64)
  if rating.shape[0] == 0:
    raise ValueError("rmse: no ratings to evaluate")
  err = predict(factors, user, item, clip=clip).astype(np.float64) - rating
  return float(np.sqrt(np.mean(err * err)))


def recall_at_k(
    factors: WALSFactors,
    train_user: np.ndarray,
    train_item: np.ndarray,
    test_user: np.ndarray,
    test_item: np.ndarray,
    test_rating: np.ndarray,
    *,
    k: int = 10,
    min_rating: float | None = 4.0,
    block: int = 1024,
) -> tuple[float, int]:
  """Mean recall@k over users with relevant held-out items (module docstring).

  Returns:
    ``(recall, num_users_evaluated)``; ``(nan, 0)`` when no user has a relevant held-out item.
  """
  if k < 1:
    raise ValueError(f"k must be >= 1, got {k}")
  x, y, _, c, _ = _numpy_factors(factors)
  num_items = y.shape[0]
  test_user, test_item = np.asarray(test_user), np.asarray(test_item)
  relevant = np.ones(test_user.shape[0], bool)
  if min_rating is not None:
    relevant = np.asarray(test_rating) >= min_rating
  users = np.unique(test_user[relevant])
  if users.size == 0:
    return float("nan"), 0
  kk = min(k, num_items)
  total = 0.0
  train_user, train_item = np.asarray(train_user), np.asarray(train_item)
  for s in range(0, users.size, block):
    ub = users[s:s + block]
    pos = np.full(x.shape[0], -1, np.int64)
    pos[ub] = np.arange(ub.size)
    scores = x[ub] @ y.T + c[None, :]  # user terms do not change a user's ranking
    seen = pos[train_user] >= 0
    scores[pos[train_user[seen]], train_item[seen]] = -np.inf
    top = np.argpartition(-scores, kk - 1, axis=1)[:, :kk]
    rel = np.zeros((ub.size, num_items), bool)
    mine = relevant & (pos[test_user] >= 0)
    rel[pos[test_user[mine]], test_item[mine]] = True
    hits = np.take_along_axis(rel, top, axis=1).sum(axis=1)
    total += float(np.sum(hits / np.minimum(kk, rel.sum(axis=1))))
  return total / users.size, int(users.size)
