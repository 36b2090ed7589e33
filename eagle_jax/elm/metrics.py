"""ELM consistency metrics (PAPER_SPEC.md section 4.4), host-side numpy.

**Semantic consistency (SC)**: re-embed the generated text with the domain encoder E_D (MiniLM +
regression head onto the augmented WALS item vectors, ``embed/encoder_train.py``) and compare the
result ``e = E_D(text)`` with the embedding ``z`` the text was decoded from:

* ``cos``: cosine of ``e - m`` and ``z - m``, where ``m`` is the mean of the item table. The
  augmented vectors ``[y, 1, c, 1]`` share two constant columns, which would put every raw cosine
  near 1; centring on the item mean measures agreement in the directions where items differ.
* ``rank``: 1 + the number of existing items ``j`` (the true item itself excluded) whose centred
  cosine with ``e`` exceeds that of ``z``. 1 is best; a random text has an expected rank of about
  ``(N + 1) / 2``. For a hypothetical ``z`` (interpolation, random point) it is the rank of ``z``
  among all items plus itself.

**Behavioural consistency (BC)** of a user profile: a text ranker scores movies given the generated
profile and is compared with the behavioural scores ``<z_u, z_m>`` (the predicted ratings of the
augmented WALS vectors): Spearman rank correlation over a fixed set of movies, per user. The ranker
(our choice; the paper's "DLM-based ranker" is not public) is the cosine between the MiniLM
sentence embedding of the profile and that of the movie's metadata text ("Title (year). Genres:
...", ``encoder_train.metadata_text``).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def _unit(x: np.ndarray) -> np.ndarray:
  n = np.linalg.norm(x, axis=-1, keepdims=True)
  return x / np.where(n > 0, n, 1.0)


def semantic_consistency(pred: np.ndarray, target: np.ndarray, item_table: np.ndarray,
                         target_item: Sequence[int] | np.ndarray | None = None
                         ) -> dict[str, np.ndarray]:
  """Per-row SC of encoded texts against the embeddings they were decoded from.

  Args:
    pred: [N, d] ``E_D(text)`` of each generated text.
    target: [N, d] the embedding each text was decoded from.
    item_table: [I, d] all existing items (augmented WALS vectors).
    target_item: [N] int index of the target in ``item_table`` (-1 or None: hypothetical).

  Returns:
    ``{"cos": [N] float, "rank": [N] int}`` (see the module docstring).
  """
  pred = np.asarray(pred, np.float64)
  target = np.asarray(target, np.float64)
  items = np.asarray(item_table, np.float64)
  if pred.shape != target.shape or pred.ndim != 2 or items.ndim != 2 or (
      items.shape[1] != pred.shape[1]):
    raise ValueError(f"semantic_consistency: pred {pred.shape}, target {target.shape} and "
                     f"item_table {items.shape} must be [N, d], [N, d], [I, d]")
  n = pred.shape[0]
  target_item = np.full(n, -1) if target_item is None else np.asarray(target_item, np.int64)
  if target_item.shape != (n,):
    raise ValueError(f"semantic_consistency: target_item must be [{n}], got {target_item.shape}")
  m = items.mean(0)
  e, z, y = _unit(pred - m), _unit(target - m), _unit(items - m)
  cos = np.sum(e * z, axis=-1)  # [N]
  sims = e @ y.T  # [N, I]
  better = sims > cos[:, None]
  rows = np.flatnonzero(target_item >= 0)
  better[rows, target_item[rows]] = False
  return {"cos": cos, "rank": 1 + better.sum(axis=1)}


def cross_consistency(pred: np.ndarray, targets: np.ndarray, item_table: np.ndarray
                      ) -> dict[str, np.ndarray | float]:
  """Matched vs mismatched SC: does a text fit *its own* embedding better than the others'?

  A decoder that writes the same kind of text for every embedding can score a high SC when the
  targets share a direction (e.g. all popular movies); this separates the embedding-specific part.

  Args:
    pred: [N, d] ``E_D(text_i)``.
    targets: [N, d] the embedding text ``i`` was decoded from.
    item_table: [I, d] items (their mean is the centre of the cosines, as in
      ``semantic_consistency``).

  Returns:
    ``cos`` [N, N] (text i vs target j), ``matched`` (mean of the diagonal), ``mismatched`` (mean
    off the diagonal), ``own_rank`` [N]: 1 + the number of other targets j with cos[i, j] >
    cos[i, i] (chance: (N + 1) / 2).
  """
  pred = np.asarray(pred, np.float64)
  targets = np.asarray(targets, np.float64)
  n = pred.shape[0]
  if targets.shape != pred.shape or n < 2:
    raise ValueError(f"cross_consistency: pred {pred.shape} and targets {targets.shape} must be "
                     "equal [N, d] with N >= 2")
  m = np.asarray(item_table, np.float64).mean(0)
  cos = _unit(pred - m) @ _unit(targets - m).T
  diag = np.diag(cos)
  off = (cos.sum() - diag.sum()) / (n * (n - 1))
  return {"cos": cos, "matched": float(diag.mean()), "mismatched": float(off),
          "own_rank": 1 + np.sum(cos > diag[:, None], axis=1)}


def rankdata(x: np.ndarray) -> np.ndarray:
  """Ranks 1..n along the last axis, ties get their average rank: [..., n] float."""
  x = np.asarray(x)
  order = np.argsort(x, axis=-1, kind="stable")
  ranks = np.empty(x.shape, np.float64)
  np.put_along_axis(ranks, order, np.arange(1, x.shape[-1] + 1, dtype=np.float64)
                    * np.ones(x.shape), axis=-1)
  flat_x = x.reshape(-1, x.shape[-1])
  flat_r = ranks.reshape(-1, x.shape[-1])
  for row_x, row_r in zip(flat_x, flat_r):
    _, inv, counts = np.unique(row_x, return_inverse=True, return_counts=True)
    if np.any(counts > 1):
      sums = np.bincount(inv, weights=row_r)
      row_r[:] = (sums / counts)[inv]
  return flat_r.reshape(x.shape)


def spearman(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  """Spearman rank correlation of each row pair: a, b [..., n] -> [...] (nan if a row is constant)."""
  ra, rb = rankdata(a), rankdata(b)
  ra = ra - ra.mean(-1, keepdims=True)
  rb = rb - rb.mean(-1, keepdims=True)
  den = np.sqrt(np.sum(ra * ra, -1) * np.sum(rb * rb, -1))
  with np.errstate(invalid="ignore", divide="ignore"):
    return np.where(den > 0, np.sum(ra * rb, -1) / np.where(den > 0, den, 1.0), np.nan)


def behavioural_consistency(profile_emb: np.ndarray, movie_emb: np.ndarray, z_users: np.ndarray,
                            z_movies: np.ndarray) -> np.ndarray:
  """Per-user BC: Spearman of the text ranker's scores with ``<z_u, z_m>`` over the movies.

  Args:
    profile_emb: [U, e] sentence embeddings of the (generated) profiles.
    movie_emb: [M, e] sentence embeddings of the movies' metadata texts.
    z_users: [U, d] the user embeddings the profiles were decoded from.
    z_movies: [M, d] the movies' item embeddings (augmented WALS).

  Returns:
    [U] rank correlations in [-1, 1].
  """
  text_scores = _unit(np.asarray(profile_emb, np.float64)) @ _unit(
      np.asarray(movie_emb, np.float64)).T
  z_scores = np.asarray(z_users, np.float64) @ np.asarray(z_movies, np.float64).T
  if text_scores.shape != z_scores.shape:
    raise ValueError(f"behavioural_consistency: ranker scores {text_scores.shape} and "
                     f"behavioural scores {z_scores.shape} differ")
  return spearman(text_scores, z_scores)


def summary(values: np.ndarray) -> dict[str, float]:
  """Mean, standard error and count of a 1-D array (nan entries ignored)."""
  v = np.asarray(values, np.float64)
  v = v[~np.isnan(v)]
  if v.size == 0:
    return {"mean": float("nan"), "sem": float("nan"), "n": 0}
  sem = float(v.std(ddof=1) / np.sqrt(v.size)) if v.size > 1 else float("nan")
  return {"mean": float(v.mean()), "sem": sem, "n": int(v.size)}
