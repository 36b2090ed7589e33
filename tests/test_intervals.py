"""Evaluation intervals: the anchor (cluster) bootstrap against a numpy resampling and scipy."""

import numpy as np
import pytest
from scipy import stats

from eagle_jax.evaluation import intervals


def test_anchor_bootstrap_equals_a_numpy_cluster_bootstrap():
  rng = np.random.default_rng(0)
  anchors = np.repeat([3, 8, 1, 9, 4, 7], [2, 5, 3, 4, 1, 6])
  values = rng.normal(size=len(anchors)) + 0.3 * anchors
  out = intervals.anchor_bootstrap(values, anchors, 0.9, resamples=4000, seed=1)
  assert out["mean"] == pytest.approx(values.mean()) and out["anchors"] == 6
  # Independent reference: draw anchors with replacement, mean over all their pairs.
  ids = np.unique(anchors)
  draws = np.random.default_rng(2).integers(0, len(ids), size=(20000, len(ids)))
  groups = [values[anchors == a] for a in ids]
  means = [np.concatenate([groups[j] for j in row]).mean() for row in draws]
  lo, hi = np.percentile(means, [5, 95])
  assert out["ci_low"] == pytest.approx(lo, abs=0.12) and out["ci_high"] == pytest.approx(hi, abs=0.12)


def test_equal_cluster_sizes_reduce_to_a_bootstrap_of_anchor_means():
  rng = np.random.default_rng(3)
  anchors = np.repeat(np.arange(8), 4)
  values = rng.normal(size=32)
  out = intervals.anchor_bootstrap(values, anchors, 0.95, resamples=3000, seed=5)
  ref = stats.bootstrap((values.reshape(8, 4).mean(1),), np.mean, confidence_level=0.95,
                        n_resamples=3000, method="percentile",
                        random_state=np.random.default_rng(5))
  assert out["ci_low"] == pytest.approx(ref.confidence_interval.low, abs=0.03)
  assert out["ci_high"] == pytest.approx(ref.confidence_interval.high, abs=0.03)
  # Wider than the pair-level interval when anchors differ (correlated pairs).
  shifted = values + np.repeat(rng.normal(scale=2.0, size=8), 4)
  a = intervals.anchor_bootstrap(shifted, anchors, 0.95, seed=0)
  p = intervals.mean_ci(shifted, 0.95)
  assert a["ci_high"] - a["ci_low"] > p["ci_high"] - p["ci_low"]


def test_degenerate_inputs():
  one = intervals.anchor_bootstrap(np.array([1.0, 2.0]), np.array([5, 5]), 0.95)
  assert one["mean"] == 1.5 and np.isnan(one["ci_low"]) and one["anchors"] == 1
  flat = intervals.anchor_bootstrap(np.ones(4), np.array([1, 1, 2, 2]), 0.95)
  assert flat["mean"] == 1.0 and np.isnan(flat["ci_high"])
  with pytest.raises(ValueError, match="same non-empty"):
    intervals.anchor_bootstrap(np.ones(3), np.ones(2), 0.95)
