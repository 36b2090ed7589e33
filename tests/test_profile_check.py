"""The profile consistency check (env/profile_check.py) against direct refits and scipy distances."""

import numpy as np
import pytest
from scipy.spatial.distance import cdist

from eagle_jax.embed import encoder
from eagle_jax.env import profile_check


def _loo_direct(x, y, alpha):
  """Mean squared l2 leave-one-out error by n separate ridge fits (encoder.ridge_weights)."""
  errs = []
  for i in range(len(x)):
    keep = np.arange(len(x)) != i
    w, b = encoder.ridge_weights(x[keep], y[keep], alpha)
    errs.append(np.sum((x[i] @ w + b - y[i]) ** 2))
  return np.mean(errs)


@pytest.mark.parametrize("n,e", [(12, 30), (40, 5)])
def test_ridge_loo_equals_refits(n, e):
  rng = np.random.default_rng(n)
  x, y = rng.normal(size=(n, e)), rng.normal(size=(n, 4))
  alphas = [0.01, 1.0, 50.0]
  np.testing.assert_allclose(profile_check.ridge_loo(x, y, alphas),
                             [_loo_direct(x, y, a) for a in alphas], rtol=1e-8)


def test_nearest_user_distance_matches_cdist():
  z = np.random.default_rng(0).normal(size=(50, 3))
  rows = np.array([0, 7, 49])
  d = cdist(z[rows], z)
  d[np.arange(3), rows] = np.inf
  np.testing.assert_allclose(profile_check.nearest_user_distance(z, rows), d.min(1), rtol=1e-9)


def _world(seed=0, users=300):
  rng = np.random.default_rng(seed)
  z = rng.normal(size=(users, 6))
  # The augmented layout's constant columns (1 and mu) must be dropped, not fitted.
  return np.concatenate([z, np.ones((users, 1)), np.full((users, 1), 3.5)], 1)


def test_informative_profiles_pass_and_uninformative_fail():
  z = _world()
  profiles = {u: f"user {u}" for u in range(len(z))}
  proj = np.random.default_rng(1).normal(size=(6, 20))

  def informative(texts):
    idx = [int(t.split()[1]) for t in texts]
    return z[idx, :6] @ proj + 0.01 * np.random.default_rng(2).normal(size=(len(idx), 20))

  def uninformative(texts):
    return np.random.default_rng(len(texts)).normal(size=(len(texts), 20))

  train, held = range(0, 200), range(200, 300)
  good = profile_check.check(informative, profiles, z, train, held)
  bad = profile_check.check(uninformative, profiles, z, train, held)
  assert good["target_dims"] == 6 and good["users_train"] == 200 and good["users_heldout"] == 100
  # Hand references: the nearest-user distance and the mean-user error from numpy directly.
  d = cdist(z[200:, :6], z[:, :6])
  d[np.arange(100), np.arange(200, 300)] = np.inf
  assert good["nearest_user_l2"] == pytest.approx(d.min(1).mean(), rel=1e-9)
  mean_err = np.linalg.norm(z[200:, :6] - z[:200, :6].mean(0), axis=1).mean()
  assert good["mean_user_l2"] == pytest.approx(mean_err, rel=1e-9)
  assert good["passed"] and good["beats_mean_user"] and good["heldout_l2"] < 0.2
  assert not bad["passed"] and bad["heldout_l2"] > 0.95 * bad["mean_user_l2"]


def test_users_without_profiles_are_left_out():
  z = _world(users=40)
  profiles = {u: (f"user {u}" if u % 4 else None) for u in range(40)}
  enc = lambda texts: np.random.default_rng(0).normal(size=(len(texts), 8))  # noqa: E731
  out = profile_check.check(enc, profiles, z, range(30), range(30, 40))
  assert out["users_train"] == 22 and out["users_heldout"] == 8
  none = profile_check.check(enc, profiles, z, [0, 4, 1], range(30, 40))
  assert none["users_train"] == 1 and none["passed"] is None and none["heldout_l2"] is None
