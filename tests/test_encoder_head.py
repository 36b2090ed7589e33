"""E_D regression head, metrics and the ridge baseline against independent computations."""

import numpy as np
import pytest

from eagle_jax.embed import encoder


def test_r2_and_recall_hand_computed():
  y = np.array([[0.0, 0.0], [2.0, 0.0], [4.0, 6.0]])
  pred = np.array([[1.0, 0.0], [2.0, 0.0], [4.0, 5.0]])
  # SS_res = 1 + 0 + 1 = 2; means (2, 2): SS_tot = (4+4) + (0+4) + (4+16) = 32.
  assert encoder.r2_score(y, pred) == pytest.approx(1 - 2 / 32)
  items = np.array([[0.0, 0.0], [1.0, 0.0], [10.0, 0.0]])
  pred = np.array([[0.9, 0.0], [0.9, 0.0]])  # nearest: item 1, then item 0
  assert encoder.nn_recall_at_k(pred, np.array([1, 0]), items, k=1) == 0.5
  assert encoder.nn_recall_at_k(pred, np.array([1, 0]), items, k=2) == 1.0


def test_ridge_equals_augmented_least_squares():
  rng = np.random.default_rng(0)
  x, y = rng.normal(size=(50, 4)), rng.normal(size=(50, 3))
  xt = rng.normal(size=(7, 4))
  # Independent: ridge with an unpenalised intercept as a least-squares problem on stacked rows.
  reg = 2.0
  a = np.vstack([np.hstack([x, np.ones((50, 1))]), np.hstack([np.sqrt(reg) * np.eye(4),
                                                                np.zeros((4, 1))])])
  b = np.vstack([y, np.zeros((4, 3))])
  coef = np.linalg.lstsq(a, b, rcond=None)[0]
  expected = np.hstack([xt, np.ones((7, 1))]) @ coef
  np.testing.assert_allclose(encoder.ridge_fit_predict(x, y, xt, reg), expected, atol=1e-10)


def test_head_learns_a_nonlinear_map_on_held_out_rows():
  rng = np.random.default_rng(1)
  w = rng.normal(size=(16, 4))
  x = rng.normal(size=(1200, 16)).astype(np.float32)
  y = (np.abs(x @ w) / 4).astype(np.float32)  # symmetric: a linear map explains ~nothing
  head, losses = encoder.fit_head(x[:1000], y[:1000], encoder.HeadConfig(steps=800, dropout=0.0))
  assert losses[-1] < 0.25 * losses[0]
  r2 = encoder.r2_score(y[1000:], encoder.predict(head, x[1000:]))
  linear = encoder.r2_score(y[1000:], encoder.ridge_fit_predict(x[:1000], y[:1000], x[1000:]))
  assert r2 > 0.8 and linear < 0.1, (r2, linear)


def test_genre_features_and_errors():
  feats, vocab = encoder.genre_features([("Drama", "War"), (), ("Comedy",)])
  assert vocab == ["Comedy", "Drama", "War"]
  np.testing.assert_array_equal(feats, [[0, 1, 1], [0, 0, 0], [1, 0, 0]])
  with pytest.raises(ValueError, match="same, non-zero"):
    encoder.fit_head(np.zeros((3, 2)), np.zeros((4, 2)), encoder.HeadConfig())


def test_head_prediction_of_a_row_does_not_depend_on_the_other_rows():
  rng = np.random.default_rng(3)
  head = encoder.RegressionHead(24, 5, 32, dropout=0.1, rngs=__import__("flax").nnx.Rngs(0))
  x = rng.normal(size=(600, 24)).astype(np.float32)
  full = encoder.predict(head, x)  # 3 calls, the last one padded
  assert full.shape == (600, 5)
  for idx in ([0], [599], rng.choice(600, 37, replace=False)):
    np.testing.assert_array_equal(encoder.predict(head, x[idx]), full[idx])
  # The same numbers as the head applied directly (evaluation mode: no dropout).
  np.testing.assert_allclose(full, np.asarray(head(x)), rtol=1e-5, atol=1e-6)
  assert encoder.predict(head, x[:0]).shape == (0, 5)


def test_length_grouped_batches_cover_rows_and_gather_the_long_ones():
  """``epoch_batches``: every kept row once per epoch in both modes; with grouping, 8 long rows
  among 312 short ones fill one batch of 8 (a shuffled batch holds one with high probability)."""
  rows = np.arange(320)
  lengths = np.full(320, 40)
  long_rows = np.array([3, 50, 77, 120, 121, 200, 260, 301])
  lengths[long_rows] = 900
  for group in (0, 50):
    batches = encoder.epoch_batches(np.random.default_rng(0), rows, 8, lengths, group)
    assert batches.shape == (40, 8)
    np.testing.assert_array_equal(np.sort(batches.ravel()), rows)  # a permutation of the rows
    holding = [b for b in batches if np.isin(b, long_rows).any()]
    if group:
      assert len(holding) == 1 and set(holding[0]) == set(long_rows)
    else:
      assert len(holding) > 1
  # Remainders are dropped before grouping; batch order is shuffled, not longest-first.
  b = encoder.epoch_batches(np.random.default_rng(1), np.arange(21), 4, np.arange(21.0), 50)
  assert b.shape == (5, 4) and len(np.unique(b)) == 20
  np.testing.assert_array_equal(np.diff(b, axis=1) < 0, True)  # each batch sorted longest first
  assert not np.all(np.diff(b[:, 0]) < 0)  # the batches themselves are not in length order
  # With group_by_length = 0 the batches are the plain permutation (the previous behaviour).
  plain = encoder.epoch_batches(np.random.default_rng(2), rows, 8)
  np.testing.assert_array_equal(plain.ravel(), np.random.default_rng(2).permutation(rows))
