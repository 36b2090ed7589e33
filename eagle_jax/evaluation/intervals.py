"""Confidence intervals of the evaluation: over pairs, and over anchors (a cluster bootstrap).

Held-out pairs of one anchor share its candidate actions and its start state, so their gains are
correlated; an interval that treats pairs as independent is too narrow when few anchors are
evaluated. ``anchor_bootstrap`` resamples *anchors* with replacement and recomputes the mean over
all pairs of the drawn anchors (``scipy.stats.bootstrap`` with the per-anchor sums and counts
resampled together, percentile interval), so the interval reflects how much the result would
change on other anchors: the paper's question on new anchors.
"""

from __future__ import annotations

import statistics

import numpy as np
from scipy import stats


def mean_ci(x: np.ndarray, confidence: float) -> dict[str, float]:
  """Mean and normal-approximation interval of the mean of [N] values."""
  x = np.asarray(x, np.float64)
  z = statistics.NormalDist().inv_cdf(0.5 + confidence / 2)
  se = float(x.std(ddof=1) / np.sqrt(len(x))) if len(x) > 1 else float("nan")
  m = float(x.mean())
  return {"mean": m, "ci_low": m - z * se, "ci_high": m + z * se, "stderr": se, "n": int(len(x))}


def anchor_bootstrap(values: np.ndarray, anchors: np.ndarray, confidence: float, *,
                     resamples: int = 2000, seed: int = 0) -> dict[str, float]:
  """Mean of [P] pair values with a bootstrap interval over their [P] anchors.

  Returns ``{mean, ci_low, ci_high, anchors}``: ``mean`` is the plain mean over pairs; the interval
  is NaN with fewer than two anchors (nothing to resample) or when every anchor mean is equal.
  """
  values = np.asarray(values, np.float64)
  anchors = np.asarray(anchors)
  if values.shape != anchors.shape or values.ndim != 1 or not len(values):
    raise ValueError(f"anchor_bootstrap: values {values.shape} and anchors {anchors.shape} must be "
                     "the same non-empty [P]")
  _, inv = np.unique(anchors, return_inverse=True)
  sums, counts = np.bincount(inv, weights=values), np.bincount(inv).astype(np.float64)
  out = {"mean": float(values.mean()), "ci_low": float("nan"), "ci_high": float("nan"),
         "anchors": int(len(sums))}
  means = sums / counts
  if len(sums) < 2 or np.ptp(means) == 0.0:
    return out
  res = stats.bootstrap((sums, counts), lambda s, c, axis=-1: s.sum(axis) / c.sum(axis),
                        paired=True, vectorized=True, confidence_level=confidence,
                        n_resamples=resamples, method="percentile",
                        random_state=np.random.default_rng(seed))
  out["ci_low"], out["ci_high"] = (float(res.confidence_interval.low),
                                   float(res.confidence_interval.high))
  return out
