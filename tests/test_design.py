"""Tests for eagle_jax.design against cvxpy (Clarabel), numpy float64 and hand-computed designs.

References are independent of the code under test: the D-optimal log-det optimum from cvxpy on an
orthonormal basis of the span computed by numpy's float64 SVD, g(pi) from numpy's float64 inverse, and
designs whose optimum is known in closed form.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import cvxpy as cp
import jax
import numpy as np
import pytest

from eagle_jax import design, parallel


def _span_basis(z: np.ndarray, rtol: float = 1e-5):
  """Float64 coordinates of z in an orthonormal basis of its row span, and the rank."""
  z = np.asarray(z, np.float64)
  _, s, vt = np.linalg.svd(z, full_matrices=False)
  r = int((s > rtol * s.max()).sum()) if s.max() > 0 else 0
  return z @ vt[:r].T, r


def _np_g(y: np.ndarray, w: np.ndarray, ridge: float = 0.0) -> float:
  v = y.T @ (np.asarray(w, np.float64)[:, None] * y) + ridge * np.eye(y.shape[1])
  return float(np.max(np.sum((y @ np.linalg.inv(v)) * y, axis=-1)))


def _np_logdet(y: np.ndarray, w: np.ndarray, ridge: float = 0.0) -> float:
  v = y.T @ (np.asarray(w, np.float64)[:, None] * y) + ridge * np.eye(y.shape[1])
  return float(np.linalg.slogdet(v)[1])


def _cvxpy_logdet(y: np.ndarray, ridge: float = 0.0) -> float:
  """max over the simplex of log det(sum_a w_a y_a y_a^T + ridge I), by Clarabel."""
  k, r = y.shape
  w = cp.Variable(k, nonneg=True)
  v = y.T @ cp.multiply(cp.reshape(w, (k, 1), order="C"), y) + ridge * np.eye(r)
  prob = cp.Problem(cp.Maximize(cp.log_det((v + v.T) / 2)), [cp.sum(w) == 1])
  prob.solve(solver=cp.CLARABEL)
  assert prob.status == cp.OPTIMAL
  return float(prob.value)


def _check_against_cvxpy(z: np.ndarray, out, eps: float) -> None:
  """Quality checks of one solved instance against independent float64 / cvxpy references."""
  y, r = _span_basis(z)
  w = np.asarray(out.weights, np.float64)
  assert int(out.rank) == r
  assert bool(out.converged)
  assert w.min() >= 0 and abs(w.sum() - 1) < 1e-5
  g = _np_g(y, w)
  assert g <= (1 + eps) * r * (1 + 1e-5)  # stopping rule, checked in float64
  assert g >= r - 1e-6  # Kiefer-Wolfowitz: no design beats r
  np.testing.assert_allclose(float(out.g_value), g, rtol=1e-4)
  ld, ld_star = _np_logdet(y, w), _cvxpy_logdet(y)
  assert ld <= ld_star + 1e-5 * max(1.0, abs(ld_star))
  assert ld_star - ld <= 1e-3 * max(1.0, abs(ld_star))
  assert int((w > 0).sum()) <= r * (r + 1) // 2


def test_full_rank_batch_matches_cvxpy():
  rng = np.random.default_rng(0)
  z = rng.standard_normal((3, 40, 6)).astype(np.float32)
  z[1] *= np.linspace(0.2, 3.0, 6)  # anisotropic actions
  out = design.g_optimal_design(z, eps=1e-3)
  assert out.weights.shape == (3, 40) and out.g_value.shape == (3,)
  for i in range(3):
    _check_against_cvxpy(z[i], jax.tree.map(lambda x, i=i: x[i], out), 1e-3)


def _rank_deficient_cases(rng) -> np.ndarray:
  """Four [30, 8] instances: duplicated rows, zero rows, collinear actions, a low-rank product."""
  base = rng.standard_normal((12, 8))
  dup = np.concatenate([base, base, base[:6]])  # every action repeated; rank 8
  zero = rng.standard_normal((30, 8))
  zero[::2] = 0.0  # half the actions are zero; rank 8
  dirs = rng.standard_normal((3, 8))
  collinear = rng.standard_normal((30, 1)) * dirs[np.arange(30) % 3]  # on 3 lines; rank 3
  low = rng.standard_normal((30, 5)) @ rng.standard_normal((5, 8))  # rank 5
  return np.stack([dup, zero, collinear, low]).astype(np.float32)


def test_rank_deficient_batch_matches_cvxpy():
  z = _rank_deficient_cases(np.random.default_rng(1))
  out = design.g_optimal_design(z, eps=1e-3)
  np.testing.assert_array_equal(np.asarray(out.rank), [8, 8, 3, 5])
  for i in range(z.shape[0]):
    _check_against_cvxpy(z[i], jax.tree.map(lambda x, i=i: x[i], out), 1e-3)
  # Zero actions carry no information and must get no weight.
  assert float(np.asarray(out.weights)[1, ::2].max()) == 0.0


def test_fewer_actions_than_dims_is_uniform():
  # K < d in general position: every action is needed, so the optimum is uniform with g = K.
  z = np.random.default_rng(2).standard_normal((5, 12)).astype(np.float32)
  out = design.g_optimal_design(z)
  assert int(out.rank) == 5
  np.testing.assert_allclose(np.asarray(out.weights), np.full(5, 0.2), atol=1e-6)
  np.testing.assert_allclose(float(out.g_value), 5.0, rtol=1e-5)


def test_rank_one_puts_all_weight_on_longest_action():
  # All actions on one line: the optimum is the point of largest |coordinate| with g = 1.
  rng = np.random.default_rng(3)
  t = rng.standard_normal(20)
  z = (t[:, None] * rng.standard_normal((1, 4))).astype(np.float32)
  out = design.g_optimal_design(z)
  assert int(out.rank) == 1
  expected = np.zeros(20)
  expected[np.argmax(np.abs(t))] = 1.0
  np.testing.assert_allclose(np.asarray(out.weights), expected, atol=1e-6)
  np.testing.assert_allclose(float(out.g_value), 1.0, rtol=1e-5)


def test_all_zero_actions():
  out = design.g_optimal_design(np.zeros((2, 7, 3), np.float32))
  np.testing.assert_array_equal(np.asarray(out.rank), [0, 0])
  np.testing.assert_allclose(np.asarray(out.weights), np.full((2, 7), 1 / 7), rtol=1e-6)
  np.testing.assert_array_equal(np.asarray(out.g_value), [0.0, 0.0])
  assert bool(np.all(np.asarray(out.converged)))


def test_design_value_and_certificate_on_random_weights():
  rng = np.random.default_rng(4)
  z = _rank_deficient_cases(rng)
  w = rng.dirichlet(np.ones(30), size=4).astype(np.float32)
  got = np.asarray(design.design_value(z, w))
  for i in range(4):
    y, r = _span_basis(z[i])
    ref = _np_g(y, w[i])
    np.testing.assert_allclose(got[i], ref, rtol=1e-4)
    assert ref >= r - 1e-6 and got[i] >= r * (1 - 1e-5)  # Kiefer-Wolfowitz lower bound
  # A support that misses a direction of the span has infinite g.
  w_bad = np.zeros((4, 30), np.float32)
  w_bad[:, 0] = 1.0
  assert np.all(np.isinf(np.asarray(design.design_value(z, w_bad))[[0, 1, 3]]))


def test_support_size_bound_when_many_actions():
  z = np.random.default_rng(5).standard_normal((400, 5)).astype(np.float32)
  out = design.g_optimal_design(z, eps=1e-3)
  assert bool(out.converged)
  support = int((np.asarray(out.weights) > 0).sum())
  assert support <= 5 * 6 // 2
  y, r = _span_basis(z)
  assert _np_g(y, np.asarray(out.weights)) <= (1 + 1e-3) * r * (1 + 1e-5)


def test_ridge_matches_cvxpy():
  rng = np.random.default_rng(6)
  z = rng.standard_normal((2, 30, 5)).astype(np.float32)
  ridge, eps = 0.5, 1e-4
  out = design.g_optimal_design(z, ridge=ridge, eps=eps)
  for i in range(2):
    y = z[i].astype(np.float64)
    w = np.asarray(out.weights[i], np.float64)
    v = y.T @ (w[:, None] * y) + ridge * np.eye(5)
    lev = np.sum((y @ np.linalg.inv(v)) * y, axis=-1)
    assert bool(out.converged[i])
    np.testing.assert_allclose(float(out.g_value[i]), lev.max(), rtol=1e-4)
    assert lev.max() <= (1 + eps) * (w @ lev) * (1 + 1e-5)  # Frank-Wolfe duality gap
    ld, ld_star = _np_logdet(y, w, ridge), _cvxpy_logdet(y, ridge)
    assert abs(ld - ld_star) <= 1e-4 * max(1.0, abs(ld_star))
  np.testing.assert_allclose(
      np.asarray(design.design_value(z, out.weights, ridge=ridge)), np.asarray(out.g_value),
      rtol=1e-4)


def test_batched_equals_one_by_one():
  z = np.random.default_rng(7).standard_normal((2, 2, 30, 6)).astype(np.float32)
  out = design.g_optimal_design(z)
  assert out.weights.shape == (2, 2, 30) and out.iterations.shape == (2, 2)
  for i in range(2):
    for j in range(2):
      one = design.g_optimal_design(z[i, j])
      np.testing.assert_allclose(np.asarray(out.weights[i, j]), np.asarray(one.weights), atol=1e-6)
      np.testing.assert_allclose(float(out.g_value[i, j]), float(one.g_value), rtol=1e-6)
      assert int(out.iterations[i, j]) == int(one.iterations)


def test_sharded_equals_unsharded():
  assert jax.device_count() == 8, "tests/conftest.py forces 8 host devices"
  mesh = parallel.make_mesh({"data": 2, "fsdp": 4})
  z = np.random.default_rng(8).standard_normal((10, 30, 6)).astype(np.float32)  # 10: padded to 16
  ref = design.g_optimal_design(z)
  with jax.set_mesh(mesh):
    out = design.g_optimal_design(z, mesh=mesh)
  np.testing.assert_allclose(np.asarray(out.weights), np.asarray(ref.weights), atol=1e-6)
  np.testing.assert_allclose(np.asarray(out.g_value), np.asarray(ref.g_value), rtol=1e-6)
  np.testing.assert_array_equal(np.asarray(out.iterations), np.asarray(ref.iterations))
  np.testing.assert_array_equal(np.asarray(out.rank), np.asarray(ref.rank))
  # The paper's rejection sampler too: per-instance keys travel with their instance.
  zr = np.stack([_basis_plus_short_actions()] * 10)
  kw = dict(method="rejection", key=jax.random.key(5), m=3, max_iters=50)
  ref = design.g_optimal_design(zr, **kw)
  with jax.set_mesh(mesh):
    out = design.g_optimal_design(zr, mesh=mesh, **kw)
  np.testing.assert_array_equal(np.asarray(out.weights), np.asarray(ref.weights))
  np.testing.assert_array_equal(np.asarray(out.iterations), np.asarray(ref.iterations))


def test_iteration_budget_reports_unconverged_exact_g():
  z = np.random.default_rng(13).standard_normal((40, 6)).astype(np.float32)
  out = design.g_optimal_design(z, eps=1e-3, max_iters=3)
  assert int(out.iterations) == 3 and not bool(out.converged)
  y, r = _span_basis(z)
  g = _np_g(y, np.asarray(out.weights))
  np.testing.assert_allclose(float(out.g_value), g, rtol=1e-4)
  assert g > (1 + 1e-3) * r


def test_float64_with_x64_reaches_tight_tolerance():
  # jax_enable_x64 is process-global, so this runs in a fresh interpreter.
  code = textwrap.dedent("""
      import jax, numpy as np
      from eagle_jax import design
      z = np.random.default_rng(14).standard_normal((60, 5))
      out = design.g_optimal_design(z, eps=1e-9)
      w = np.asarray(out.weights)
      v = z.T @ (w[:, None] * z)
      g = np.max(np.sum((z @ np.linalg.inv(v)) * z, axis=-1))
      print(out.weights.dtype, bool(out.converged), repr(float(g)), repr(float(out.g_value)))
  """)
  env = dict(os.environ, JAX_ENABLE_X64="1", JAX_PLATFORMS="cpu")
  res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                       timeout=300, check=True)
  dtype, converged, g, g_value = res.stdout.split()
  assert dtype == "float64" and converged == "True"
  assert 5.0 - 1e-9 <= float(g) <= 5.0 * (1 + 1e-9) + 1e-12
  assert abs(float(g_value) - float(g)) <= 1e-9


def test_traced_call_matches_eager():
  z = np.random.default_rng(9).standard_normal((3, 30, 6)).astype(np.float32)
  jitted = jax.jit(lambda x: design.g_optimal_design(x).weights)(z)
  np.testing.assert_allclose(np.asarray(jitted), np.asarray(design.g_optimal_design(z).weights),
                             atol=1e-6)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_input_raises(bad):
  z = np.ones((2, 5, 3), np.float32)
  z[1, 2, 0] = bad
  with pytest.raises(ValueError, match="NaN or Inf"):
    design.g_optimal_design(z)
  with pytest.raises(ValueError, match="NaN or Inf"):
    design.design_value(z, np.full((2, 5), 0.2))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(eps=0.0), "eps"),
        (dict(eps=-1.0), "eps"),
        (dict(max_iters=0), "max_iters"),
        (dict(max_iters=1.5), "max_iters"),
        (dict(ridge=-0.1), "ridge"),
        (dict(method="simplex"), "method"),
        (dict(method="rejection"), "key"),
        (dict(method="rejection", key=jax.random.key(0), m=6), "m"),
        (dict(refresh_every=0), "refresh_every"),
        (dict(rank_rtol=0.0), "rank_rtol"),
    ],
)
def test_bad_options_raise(kwargs, match):
  with pytest.raises(ValueError, match=match):
    design.g_optimal_design(np.ones((5, 3), np.float32), **kwargs)


def test_bad_shapes_raise():
  with pytest.raises(ValueError, match=r"\[..., K, d\]"):
    design.g_optimal_design(np.ones(4, np.float32))
  with pytest.raises(ValueError, match="weights"):
    design.design_value(np.ones((5, 3), np.float32), np.ones(4))
  with pytest.raises(ValueError, match="weights"):
    design.design_value(np.ones((5, 3), np.float32), -np.ones(5))


def _basis_plus_short_actions() -> np.ndarray:
  """e_1..e_3 and six shorter actions +-0.5 e_i: the uniform design on {e_i} is exactly optimal."""
  return np.concatenate([np.eye(3), 0.5 * np.eye(3), -0.5 * np.eye(3)]).astype(np.float32)


def test_rejection_finds_the_accepting_subset():
  z = np.stack([_basis_plus_short_actions()] * 3)
  out = design.g_optimal_design(z, method="rejection", key=jax.random.key(0), m=3, max_iters=3000)
  # Only {e_1, e_2, e_3} has g <= 1 * 3 (any other 3-subset misses a direction or is shorter).
  np.testing.assert_allclose(np.asarray(out.weights)[:, :3], np.full((3, 3), 1 / 3), rtol=1e-6)
  np.testing.assert_array_equal(np.asarray(out.weights)[:, 3:], 0.0)
  np.testing.assert_allclose(np.asarray(out.g_value), 3.0, rtol=1e-5)
  assert bool(np.all(np.asarray(out.converged)))
  its = np.asarray(out.iterations)
  assert np.all((its >= 1) & (its <= 3000)) and len(set(its.tolist())) > 1  # independent draws


def test_rejection_budget_and_rank_above_m():
  z = _basis_plus_short_actions()
  out = design.g_optimal_design(z, method="rejection", key=jax.random.key(1), m=3, max_iters=1)
  assert int(out.iterations) == 1
  w = np.asarray(out.weights, np.float64)
  np.testing.assert_allclose(np.sort(w)[-3:], 1 / 3, rtol=1e-6)
  accepted = set(np.flatnonzero(w)) == {0, 1, 2}
  assert bool(out.converged) == accepted
  if not accepted:
    assert float(out.g_value) > 3.0
  # Rank 12 > m = 10: no subset spans the actions; one draw, g = inf, not converged.
  z12 = np.random.default_rng(10).standard_normal((40, 12)).astype(np.float32)
  out = design.g_optimal_design(z12, method="rejection", key=jax.random.key(2), m=10)
  assert int(out.iterations) == 1 and np.isinf(float(out.g_value)) and not bool(out.converged)


def test_rejection_with_loose_factor_accepts_and_reports_true_g():
  z = np.random.default_rng(11).standard_normal((2, 40, 4)).astype(np.float32)
  out = design.g_optimal_design(z, method="rejection", key=jax.random.key(3), m=10, C=3.0)
  for i in range(2):
    w = np.asarray(out.weights[i], np.float64)
    assert np.count_nonzero(w) == 10 and np.allclose(w[w > 0], 0.1)
    g = _np_g(z[i].astype(np.float64), w)
    np.testing.assert_allclose(float(out.g_value[i]), g, rtol=1e-4)
    assert bool(out.converged[i]) == (g <= 3.0 * 4 * (1 + 1e-6))
    assert bool(out.converged[i])


def test_sample_exploratory_actions_frequencies():
  # m = 1 is a single categorical draw with probabilities equal to the weights.
  n, k = 20_000, 6
  p = np.array([0.4, 0.3, 0.2, 0.1, 0.0, 0.0], np.float32)
  d = design.Design(np.tile(p, (n, 1)), np.zeros(n), np.zeros(n, np.int32), np.ones(n, bool),
                    np.ones(n, np.int32))
  z = np.zeros((n, k, 2), np.float32)
  idx = np.asarray(design.sample_exploratory_actions(jax.random.key(0), z, d, m=1))
  assert idx.shape == (n, 1) and idx.dtype == np.int32
  freq = np.bincount(idx[:, 0], minlength=k) / n
  np.testing.assert_allclose(freq, p, atol=4 * np.sqrt(0.25 / n))
  # m = 2 without replacement: P(action 3 in the set) = sum over first draws (hand-computed).
  idx2 = np.asarray(design.sample_exploratory_actions(jax.random.key(1), z, d, m=2))
  assert np.all(idx2[:, 0] != idx2[:, 1])
  p3 = 0.1 + sum(pi * 0.1 / (1 - pi) for pi in (0.4, 0.3, 0.2))
  np.testing.assert_allclose(np.mean(np.any(idx2 == 3, axis=1)), p3, atol=4 * np.sqrt(0.25 / n))
  assert not np.any(idx2 >= 4)  # zero-weight actions are never needed here


def test_sample_fills_from_zero_weight_actions_when_support_is_small():
  z = np.random.default_rng(12).standard_normal((4, 30, 3)).astype(np.float32)
  d = design.g_optimal_design(z)
  support = np.asarray(d.weights) > 0
  m = int(support.sum(-1).max()) + 2
  idx = np.asarray(design.sample_exploratory_actions(jax.random.key(4), z, d, m=m))
  for i in range(4):
    assert len(set(idx[i].tolist())) == m  # distinct
    assert set(np.flatnonzero(support[i])) <= set(idx[i].tolist())  # whole support included
  with pytest.raises(ValueError, match="m"):
    design.sample_exploratory_actions(jax.random.key(0), z, d, m=31)
  with pytest.raises(ValueError, match="design"):
    design.sample_exploratory_actions(jax.random.key(0), z[:, :20], d, m=3)
