"""WALS: parity with a numpy per-row closed form, monotone objective, sharding, bad input, quality."""

import json
import os
import types

import jax
import numpy as np
import pytest

from eagle_jax import parallel
from eagle_jax.embed import cholesky, wals, wals_metrics, wals_plan, wals_train


def _random_problem(num_users=37, num_items=29, num_ratings=400, seed=0):
  rng = np.random.default_rng(seed)
  key = rng.choice(num_users * num_items, num_ratings, replace=False)
  user, item = (key // num_items).astype(np.int32), (key % num_items).astype(np.int32)
  rating = rng.integers(1, 11, num_ratings).astype(np.float32) / 2.0
  return user, item, rating


def _numpy_half(rows, cols, vals, num_rows, other_f, other_b, mu, cfg):
  """Reference half-sweep: one np.linalg.solve per row, float64."""
  n, k = other_f.shape
  d = k + 1 if cfg.use_bias else k
  phi = np.concatenate([other_f, np.ones((n, 1))], 1) if cfg.use_bias else other_f
  gram = other_f.T @ other_f
  reg = np.full(d, cfg.reg)
  if cfg.use_bias:
    reg[k] = cfg.bias_weight
  out = np.zeros((num_rows, d))
  for r in range(num_rows):
    sel = rows == r
    p = phi[cols[sel]]
    t = vals[sel] - mu - (other_b[cols[sel]] if cfg.use_bias else 0.0)
    lam = max(sel.sum(), 1) ** cfg.reg_exponent
    a = cfg.observed_weight * p.T @ p + lam * np.diag(reg)
    a[:k, :k] += cfg.unobserved_weight * gram
    out[r] = np.linalg.solve(a, cfg.observed_weight * p.T @ t)
  if cfg.use_bias:
    return out[:, :k], out[:, k]
  return out, np.zeros(num_rows)


def _numpy_objective(f, user, item, rating, num_users, num_items, cfg):
  x, y = np.asarray(f.user_factors, np.float64), np.asarray(f.item_factors, np.float64)
  b, c = np.asarray(f.user_bias, np.float64), np.asarray(f.item_bias, np.float64)
  mu = float(f.global_mean)
  err = rating - mu - b[user] - c[item] - np.sum(x[user] * y[item], axis=1)
  full = x @ y.T
  lu = cfg.reg * np.maximum(np.bincount(user, minlength=num_users), 1) ** cfg.reg_exponent
  li = cfg.reg * np.maximum(np.bincount(item, minlength=num_items), 1) ** cfg.reg_exponent
  beta = cfg.bias_weight / cfg.reg
  return (cfg.observed_weight * np.sum(err ** 2) + cfg.unobserved_weight * np.sum(full ** 2)
          + np.sum(lu * (np.sum(x * x, 1) + beta * b * b))
          + np.sum(li * (np.sum(y * y, 1) + beta * c * c)))


_SMALL_BLOCKS = dict(segment_length=4, block_segments=8, block_rows=8)


@pytest.mark.parametrize("kwargs", [
    dict(use_bias=True, center=True, unobserved_weight=0.05, reg_exponent=0.5, rank=4, reg=0.3,
         bias_reg=0.7, observed_weight=2.0),
    dict(use_bias=False, center=False, unobserved_weight=0.0, reg_exponent=0.0, rank=6, reg=0.1),
])
def test_one_sweep_matches_numpy_closed_form(kwargs):
  user, item, rating = _random_problem()
  cfg = wals.WALSConfig(**kwargs, **_SMALL_BLOCKS)
  model = wals.WALS(user, item, rating, num_users=37, num_items=29, config=cfg)
  f0 = model.init()
  f1 = model.sweep(f0)
  mu = float(f0.global_mean)
  assert mu == pytest.approx(float(np.mean(rating)) if cfg.center else 0.0, rel=1e-6)
  x, b = _numpy_half(user, item, rating, 37, np.asarray(f0.item_factors, np.float64),
                     np.asarray(f0.item_bias, np.float64), mu, cfg)
  y, c = _numpy_half(item, user, rating, 29, x, b, mu, cfg)
  np.testing.assert_allclose(np.asarray(f1.user_factors), x, atol=1e-4)
  np.testing.assert_allclose(np.asarray(f1.user_bias), b, atol=1e-4)
  np.testing.assert_allclose(np.asarray(f1.item_factors), y, atol=1e-4)
  np.testing.assert_allclose(np.asarray(f1.item_bias), c, atol=1e-4)


def test_objective_decreases_monotonically_and_matches_numpy():
  user, item, rating = _random_problem(seed=1)
  cfg = wals.WALSConfig(rank=5, reg=0.2, unobserved_weight=0.02, reg_exponent=1.0, sweeps=8,
                        **_SMALL_BLOCKS)
  model = wals.WALS(user, item, rating, num_users=37, num_items=29, config=cfg)
  f = model.init()
  values = [_numpy_objective(f, user, item, rating, 37, 29, cfg)]
  for _ in range(cfg.sweeps):
    f = model.sweep(f)
    ref = _numpy_objective(f, user, item, rating, 37, 29, cfg)
    assert model.objective(f) == pytest.approx(ref, rel=1e-5)
    values.append(ref)
  assert np.all(np.diff(values) <= 1e-6 * values[0]), values
  assert values[-1] < 0.7 * values[0]


def test_same_result_on_one_and_eight_devices():
  assert jax.device_count() == 8, "tests/conftest.py forces 8 host devices"
  user, item, rating = _random_problem(60, 45, 900, seed=2)
  cfg = wals.WALSConfig(rank=6, reg=0.1, unobserved_weight=0.01, sweeps=3, **_SMALL_BLOCKS)
  out = []
  for devices in (jax.devices()[:1], jax.devices()):
    mesh = parallel.make_mesh({"data": -1}, devices=devices)
    model = wals.WALS(user, item, rating, num_users=60, num_items=45, config=cfg, mesh=mesh)
    assert model.user_plan.cols.shape[0] % len(devices) == 0
    out.append(model.fit(track_objective=False)[0])
  for name in ("user_factors", "item_factors", "user_bias", "item_bias"):
    np.testing.assert_allclose(np.asarray(getattr(out[0], name)),
                               np.asarray(getattr(out[1], name)), atol=1e-5)


def test_plan_holds_every_entry_once():
  user, item, rating = _random_problem(50, 40, 700, seed=3)
  user[:30] = 7  # one long row spanning several segments
  keys = np.unique(user.astype(np.int64) * 40 + item, return_index=True)[1]
  user, item, rating = user[keys], item[keys], rating[keys]
  plan = wals_plan.build_plan(user, item, rating, 50, 40, segment_length=3, block_segments=4,
                              block_rows=5, block_multiple=4)
  assert plan.cols.shape[0] % 4 == 0
  nb, s, _ = plan.cols.shape
  got = {}
  for bi in range(nb):
    for si in range(s):
      slot = plan.seg_row[bi, si]
      for ci, v in zip(plan.cols[bi, si], plan.vals[bi, si]):
        if ci < 40:
          r = int(plan.rows[bi, slot])
          assert (r, int(ci)) not in got
          got[(r, int(ci))] = float(v)
  assert got == {(int(u), int(i)): float(r) for u, i, r in zip(user, item, rating)}
  real = plan.rows[plan.rows < 50]
  assert sorted(real.tolist()) == list(range(50))
  np.testing.assert_array_equal(plan.counts[plan.rows < 50][np.argsort(real)],
                                np.bincount(user, minlength=50))


def test_cholesky_solve_matches_numpy():
  rng = np.random.default_rng(0)
  for d in (1, 7, 17, 33):
    m = rng.normal(size=(3, d, 2 * d)).astype(np.float32)
    a = m @ m.transpose(0, 2, 1) + 0.5 * np.eye(d, dtype=np.float32)
    b = rng.normal(size=(3, d)).astype(np.float32)
    x = np.asarray(jax.jit(cholesky.cholesky_solve)(a, b))
    ref = np.linalg.solve(a.astype(np.float64), b.astype(np.float64)[..., None])[..., 0]
    np.testing.assert_allclose(x, ref, rtol=2e-4, atol=2e-4)


def test_user_and_item_without_ratings_get_the_prior_mean():
  user, item, rating = _random_problem(20, 15, 120, seed=4)
  keep = (user != 3) & (item != 5)
  cfg = wals.WALSConfig(rank=3, reg=0.1, unobserved_weight=0.1, reg_exponent=1.0, sweeps=3)
  model = wals.WALS(user[keep], item[keep], rating[keep], num_users=20, num_items=15,
                    config=cfg)
  f, _ = model.fit()
  for arr in f.to_dict().values():
    assert np.all(np.isfinite(np.asarray(arr)))
  np.testing.assert_array_equal(np.asarray(f.user_factors)[3], 0.0)
  assert float(f.user_bias[3]) == 0.0 and float(f.item_bias[5]) == 0.0
  np.testing.assert_array_equal(np.asarray(f.item_factors)[5], 0.0)
  # Its prediction is the global mean plus the item's bias.
  pred = wals_metrics.predict(f, np.array([3]), np.array([0]))
  assert pred[0] == pytest.approx(float(f.global_mean) + float(f.item_bias[0]), abs=1e-6)


@pytest.mark.parametrize("change, match", [
    (lambda u, i, r: (u[:0], i[:0], r[:0], 10, 10, 2), "empty matrix"),
    (lambda u, i, r: (u, i, r, 0, 10, 2), "empty matrix"),
    (lambda u, i, r: (u, i, np.where(np.arange(r.size) == 4, np.nan, r), 10, 10, 2),
     "rating must be finite"),
    (lambda u, i, r: (u, i, r, 10, 10, 11), "rank=11 exceeds"),
    (lambda u, i, r: (u + 5, i, r, 10, 10, 2), r"user indices must be in \[0, 10\)"),
    (lambda u, i, r: (np.concatenate([u, u[:1]]), np.concatenate([i, i[:1]]),
                      np.concatenate([r, r[:1]]), 10, 10, 2), "duplicates"),
    (lambda u, i, r: (u.astype(np.float32), i, r, 10, 10, 2), "integer indices"),
])
def test_bad_input_raises_clear_errors(change, match):
  user, item, rating = _random_problem(10, 10, 30, seed=5)
  u, i, r, nu, ni, rank = change(user, item, rating)
  with pytest.raises(ValueError, match=match):
    wals.WALS(u, i, r, num_users=nu, num_items=ni, config=wals.WALSConfig(rank=rank))


@pytest.mark.parametrize("field, value", [("reg", 0.0), ("rank", 0), ("unobserved_weight", -1.0),
                                          ("reg", float("nan"))])
def test_bad_config_names_the_field(field, value):
  with pytest.raises(ValueError, match=f"WALSConfig.{field}"):
    wals.WALSConfig(**{field: value})
  with pytest.raises(ValueError, match="unknown fields"):
    wals.WALSConfig.from_config({"rnak": 3})


def test_metrics_against_hand_computed_values():
  f = wals.WALSFactors(
      user_factors=np.array([[1.0, 0.0], [0.0, 1.0]], np.float32),
      item_factors=np.array([[2.0, 0.0], [0.0, 3.0], [1.0, 1.0], [0.5, 0.0]], np.float32),
      user_bias=np.array([0.5, -0.5], np.float32), item_bias=np.array([0, 0, 0, 1.0], np.float32),
      global_mean=np.float32(3.0))
  # predictions: user0 -> [5.5, 3.5, 4.5, 5.0]; user1 -> [2.5, 5.5, 3.5, 3.5]
  np.testing.assert_allclose(wals_metrics.predict(f, np.array([0, 1, 1]), np.array([0, 1, 3])),
                             [5.5, 5.5, 3.5])
  assert wals_metrics.rmse(f, np.array([0, 1]), np.array([0, 1]), np.array([5.0, 4.5])) == (
      pytest.approx(np.sqrt((0.25 + 1.0) / 2)))
  assert wals_metrics.rmse(f, np.array([0]), np.array([0]), np.array([5.0]), clip=(1, 5)) == 0.0
  # user0 trained on item0; ranking of the rest by <x,y>+c: item3 (1.5), item2 (1), item1 (0).
  # user1 trained on item1; ranking: item2 (1), item3 (1), item0 (0) -> ties by argpartition.
  recall, users = wals_metrics.recall_at_k(
      f, np.array([0, 1]), np.array([0, 1]), np.array([0, 0, 1]), np.array([2, 1, 0]),
      np.array([5.0, 4.0, 4.0]), k=1, min_rating=4.0)
  # user0: relevant {2, 1}, top-1 = {3} -> 0; user1: relevant {0}, top-1 in {2, 3} -> 0.
  assert (recall, users) == (0.0, 2)
  recall, _ = wals_metrics.recall_at_k(
      f, np.array([0, 1]), np.array([0, 1]), np.array([0, 0, 1]), np.array([2, 3, 0]),
      np.array([5.0, 4.0, 4.0]), k=2, min_rating=4.0)
  assert recall == pytest.approx(0.5)  # user0 finds both of {2, 3}; user1 none of {0}


@pytest.mark.slow
def test_ml100k_time_split_quality_and_launch(tmp_path):
  """End to end on the real ML-100K: launch, checkpoint, export, report, resume."""
  from configs import wals_ml100k
  from eagle_jax import data
  from eagle_jax.embed import wals_train as launch_wals

  config = wals_ml100k.get_config()
  report = launch_wals.run(config, str(tmp_path))
  metrics = report["metrics"]
  ratings = data.load_ml100k_assets()
  train, test = data.split(ratings, test_fraction=0.2, min_train=1)
  # Independent baseline: per-item mean of the training ratings (global mean for unseen items).
  sums = np.bincount(train.item, train.rating, minlength=ratings.num_items)
  cnt = np.bincount(train.item, minlength=ratings.num_items)
  item_mean = np.where(cnt > 0, sums / np.maximum(cnt, 1), train.rating.mean())
  baseline = float(np.sqrt(np.mean((item_mean[test.item] - test.rating) ** 2)))
  assert metrics["test_rmse"] < baseline - 0.03, (metrics, baseline)
  assert metrics["test_rmse"] <= 0.975, metrics
  assert metrics["train_rmse"] < metrics["test_rmse"]
  assert 0.0 < metrics["recall@10"] < 1.0 and metrics["recall_users"] > 500
  hist = report["history"]
  assert len(hist) == config.wals.sweeps
  objective = [h["objective"] for h in hist]
  assert all(b <= a * (1 + 1e-6) for a, b in zip(objective, objective[1:])), objective
  # The export holds the factors of the last checkpoint, and recomputes the reported RMSE.
  with np.load(tmp_path / "embeddings.npz", allow_pickle=False) as z:
    exported = {k: z[k] for k in z.files}
  np.testing.assert_array_equal(exported["user_ids"], ratings.user_ids)
  f = wals.WALSFactors.from_dict(exported)
  assert wals_metrics.rmse(f, test.user, test.item, test.rating) == pytest.approx(
      metrics["test_rmse"], rel=1e-6)
  from eagle_jax import checkpoint
  step, state, _ = checkpoint.Checkpointer(tmp_path / "checkpoints").restore()
  assert step == config.wals.sweeps
  np.testing.assert_array_equal(np.asarray(state["item_factors"]), exported["item_factors"])
  saved = json.loads((tmp_path / "report.json").read_text())
  assert saved["metrics"]["test_rmse"] == pytest.approx(metrics["test_rmse"])
  assert saved["peak_rss_bytes"] > 0
  # A rerun resumes from the last checkpoint: no new sweeps, same metrics.
  mtime = os.path.getmtime(tmp_path / "checkpoints" / str(step))
  again = launch_wals.run(config, str(tmp_path))
  assert len(again["history"]) == config.wals.sweeps
  assert again["metrics"]["test_rmse"] == pytest.approx(metrics["test_rmse"], rel=1e-6)
  assert os.path.getmtime(tmp_path / "checkpoints" / str(step)) == mtime


def test_load_npz_reorders_and_augments_like_walsfactors(tmp_path):
  rng = np.random.default_rng(0)
  factors = wals.WALSFactors.from_dict({
      "user_factors": rng.normal(size=(5, 3)), "item_factors": rng.normal(size=(4, 3)),
      "user_bias": rng.normal(size=5), "item_bias": rng.normal(size=4),
      "global_mean": np.float32(3.5)})
  ratings = types.SimpleNamespace(user_ids=np.array([10, 11, 12, 13, 14]),
                                  item_ids=np.array([7, 8, 9, 6]))
  wals_train.export_npz(str(tmp_path / "e.npz"), factors, ratings)
  out = wals_train.load_npz(str(tmp_path / "e.npz"), item_ids=np.array([6, 9, 7]),
                            user_ids=np.array([14, 10]))
  zu, zi = (np.asarray(x) for x in factors.augmented())
  np.testing.assert_allclose(out["item_augmented"], zi[[3, 2, 0]], rtol=1e-6)
  np.testing.assert_allclose(out["user_augmented"], zu[[4, 0]], rtol=1e-6)
  # Their inner product is the predicted rating mu + b_u + c_i + <x_u, y_i>.
  x = factors
  want = (3.5 + np.asarray(x.user_bias)[4] + np.asarray(x.item_bias)[3]
          + np.asarray(x.user_factors)[4] @ np.asarray(x.item_factors)[3])
  assert out["user_augmented"][0] @ out["item_augmented"][0] == pytest.approx(want, rel=1e-5)
  with pytest.raises(ValueError, match="no vectors for item ids \\[99\\]"):
    wals_train.load_npz(str(tmp_path / "e.npz"), item_ids=np.array([99]))
