"""SC / BC metrics against brute-force numpy and scipy, and the ELM baseline's ascent."""

import numpy as np
import pytest
import scipy.stats

from eagle_jax.elm import metrics
from eagle_jax.evaluation import elm_baseline as baseline


def _brute_sc(pred, target, items, target_item):
  m = items.mean(0)
  cos, rank = [], []
  for e, z, ti in zip(pred, target, target_item):
    def c(a, b):
      a, b = a - m, b - m
      return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))
    s = c(e, z)
    cos.append(s)
    rank.append(1 + sum(c(e, y) > s for j, y in enumerate(items) if j != ti))
  return np.array(cos), np.array(rank)


def test_semantic_consistency_matches_brute_force():
  rng = np.random.default_rng(0)
  items = rng.normal(size=(30, 5))
  target_item = np.array([3, 17, -1, 0])
  target = items[np.maximum(target_item, 0)].copy()
  target[2] = rng.normal(size=5)  # a hypothetical point
  pred = target + 0.8 * rng.normal(size=target.shape)
  out = metrics.semantic_consistency(pred, target, items, target_item)
  cos, rank = _brute_sc(pred, target, items, target_item)
  np.testing.assert_allclose(out["cos"], cos, rtol=1e-10)
  np.testing.assert_array_equal(out["rank"], rank)
  # A perfect text ranks its own item first.
  perfect = metrics.semantic_consistency(items[[5]], items[[5]], items, [5])
  assert perfect["rank"][0] == 1 and perfect["cos"][0] == pytest.approx(1.0)


def test_rankdata_and_spearman_match_scipy_with_ties():
  rng = np.random.default_rng(1)
  a = rng.integers(0, 5, size=(4, 12)).astype(float)  # many ties
  b = rng.normal(size=(4, 12))
  np.testing.assert_allclose(metrics.rankdata(a), scipy.stats.rankdata(a, axis=1))
  ref = [scipy.stats.spearmanr(x, y).statistic for x, y in zip(a, b)]
  np.testing.assert_allclose(metrics.spearman(a, b), ref, rtol=1e-10)


def test_behavioural_consistency_matches_scipy():
  rng = np.random.default_rng(2)
  prof = rng.normal(size=(3, 8))
  mov = rng.normal(size=(10, 8))
  zu = rng.normal(size=(3, 4))
  zm = rng.normal(size=(10, 4))
  out = metrics.behavioural_consistency(prof, mov, zu, zm)
  for u in range(3):
    text = [p @ m / np.linalg.norm(p) / np.linalg.norm(m) for p in prof[[u]] for m in mov]
    beh = zm @ zu[u]
    assert out[u] == pytest.approx(scipy.stats.spearmanr(text, beh).statistic, rel=1e-10)
  # A ranker that reproduces the behavioural scores exactly has BC 1.
  assert metrics.spearman(zm @ zu[0], zm @ zu[0]) == pytest.approx(1.0)


def test_summary_ignores_nan():
  s = metrics.summary(np.array([1.0, 3.0, np.nan]))
  assert s["mean"] == 2.0 and s["n"] == 2 and s["sem"] == pytest.approx(1.0)


def _items(rng, n=40, k=3):
  y = rng.normal(size=(n, k))
  c = rng.normal(size=(n, 1))
  return np.concatenate([y, np.ones((n, 1)), c, np.ones((n, 1))], 1).astype(np.float32)


def test_ascent_without_novelty_reaches_the_ball_boundary_along_the_user():
  rng = np.random.default_rng(3)
  items = _items(rng)
  zu = rng.normal(size=6).astype(np.float32)
  za = items[4]
  out = baseline.ascend_utility(zu, za, items, lam=0.0, steps=200, lr=0.1, radius=0.5)
  free = np.array([1, 1, 1, 0, 1, 0], np.float32)
  expected = za + 0.5 * zu * free / np.linalg.norm(zu * free)  # argmax of a linear U on the ball
  np.testing.assert_allclose(out["z"][0], expected, atol=2e-3)
  np.testing.assert_array_equal(out["z"][0][[3, 5]], [1.0, 1.0])  # constant columns untouched
  assert out["utility"][0] == pytest.approx(float(zu @ expected), rel=1e-4)


def test_ascent_with_novelty_improves_utility_within_radius():
  rng = np.random.default_rng(4)
  items = _items(rng)
  zu = rng.normal(size=(3, 6)).astype(np.float32)
  za = items[[0, 1, 2]]
  out = baseline.ascend_utility(zu, za, items, lam=0.5, steps=50, lr=0.05)
  r = baseline.default_radius(items)
  assert np.all(np.linalg.norm(out["z"] - za, axis=1) <= r * (1 + 1e-5))
  assert np.all(out["utility"] > out["utility_anchor"])
  np.testing.assert_allclose(out["utility"], baseline.utilities(out["z"], zu, items, lam=0.5),
                             rtol=1e-5)
  with pytest.raises(ValueError, match="lam"):
    baseline.ascend_utility(zu, za, items, lam=-1.0)


def test_cross_consistency_matches_semantic_consistency_pairs():
  rng = np.random.default_rng(5)
  items = rng.normal(size=(20, 4))
  targets = items[[1, 4, 9]]
  pred = targets + 0.5 * rng.normal(size=targets.shape)
  out = metrics.cross_consistency(pred, targets, items)
  for i in range(3):
    for j in range(3):
      ref = metrics.semantic_consistency(pred[[i]], targets[[j]], items)["cos"][0]
      assert out["cos"][i, j] == pytest.approx(ref, rel=1e-12)
  c = out["cos"]
  assert out["matched"] == pytest.approx(np.trace(c) / 3)
  assert out["mismatched"] == pytest.approx((c.sum() - np.trace(c)) / 6)
  np.testing.assert_array_equal(out["own_rank"], [1 + np.sum(c[i] > c[i, i]) for i in range(3)])
