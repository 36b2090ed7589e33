"""Single-instance G-optimal design solvers on one action set ``z: [K, d]``; ``design`` batches them.

The criterion, with ``V(pi) = sum_a pi_a z_a z_a^T + ridge * I``, is ``g(pi) = max_a z_a^T V(pi)^{-1} z_a``.

Maths used here:

* **Kiefer-Wolfowitz.** With ``ridge = 0`` and the actions spanning a subspace of dimension r,
  ``g(pi) >= r`` for every ``pi`` on the simplex (because ``sum_a pi_a z_a^T V^+ z_a = tr(V^+ V) = r``),
  with equality exactly at the maximisers of the D-optimal criterion ``log det V(pi)`` restricted to the
  span. So ``g(pi) / r - 1`` is a certificate of (sub)optimality that needs no reference solver, and the
  solver stops when ``g(pi) <= (1 + eps) r``.
* **Working in the span.** Rank-deficient inputs (K < d, duplicated, collinear or zero rows) are handled
  by an orthonormal basis Q of the row span of z. It comes from the eigenvectors of the d x d Gram matrix
  ``z^T z``; the rank decision uses the column norms of ``z Q`` (the singular values, recomputed from z
  so that they are accurate to the precision of z rather than of its square), with a relative tolerance
  ``rank_rtol`` (default ``10 * max(K, d) * finfo(dtype).eps``). Kept directions are then whitened
  (``y = z q_i / s_i``; leverages are invariant under invertible maps of the span, and the whitened
  problem is far better conditioned), dropped directions are zeroed and get a unit diagonal in V so that
  all matrices keep the fixed size d x d (a jit-friendly "fixed basis plus mask"). With ``ridge > 0``
  the coordinates are ``z Q`` without whitening, which keeps ``ridge * I`` exact on the span.
* **Frank-Wolfe with away steps** (Fedorov-Wynn / Wolfe-Atwood, Todd & Yildirim 2007) on the concave
  ``f(pi) = log det V(pi)``, whose gradient is the leverage vector ``g_a = z_a^T V^{-1} z_a``. Each step
  moves towards the vertex of largest leverage or away from the support point of smallest leverage,
  whichever violates optimality more, ``pi <- (1 - gamma) pi + gamma e_j``, with the exact line search
  ``gamma = (g_j / r - 1) / (g_j - 1)``, clipped for away steps at ``-pi_j / (1 - pi_j)`` (a drop step,
  which removes j from the support). Away steps give linear convergence (Ahipasaoglu, Sun & Todd 2008)
  and keep the support small. The start is Kumar-Yildirim's core set, in its deterministic symmetric
  form: r greedy steps, each taking the action with the largest component orthogonal to the span of the
  actions already taken, with uniform weight on them; it is full rank from the first step.
* **Rank-one updates.** The step changes V by a scaled rank-one term, so V^{-1} follows from
  Sherman-Morrison and every leverage from ``g_a <- (g_a - c (z_a^T u)^2 / (1 + c g_j)) / (1 - gamma)``
  with ``u = V^{-1} z_j``, ``c = gamma / (1 - gamma)``: O(K d) per step instead of O(K d^2). Every
  ``refresh_every`` steps V is rebuilt from pi, inverted by Cholesky and all leverages recomputed, which
  bounds drift in float32; the stopping test and the returned ``g_value`` always use freshly recomputed
  values.
* **ridge > 0** solves the regularised D-optimal problem ``max log det(V(pi))``. The update is no longer
  rank-one, so each step rebuilds V; the exact line search maximises
  ``log det(V + gamma D) = const + sum_i log(1 + gamma mu_i)`` by bisection on its derivative, with mu the
  eigenvalues of ``L^{-1} D L^{-T}``. The stop is the Frank-Wolfe duality gap
  ``max_a g_a <= (1 + eps) sum_a pi_a g_a`` (for ridge = 0 the right side is exactly (1 + eps) r).

The paper's own solver (App. C / E.1) is random-subset rejection sampling: draw m actions uniformly
without replacement, put weight 1/m on them, accept when ``g <= C r`` (``C = 1``, the sup taken over all
K candidates as in Definition 1). It is ``method="rejection"``; when no draw is accepted within
``max_iters`` draws (the paper leaves this case open) the best draw found is returned with
``converged=False``. If r > m no subset can span the actions, so one draw is made and g is +inf.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

_HI = lax.Precision.HIGHEST


class Design(NamedTuple):
  """A design over the K actions of each state (leading batch dims ``...``).

  Attributes:
    weights: [..., K] float, on the probability simplex.
    g_value: [...] float, ``max_a z_a^T V(weights)^+ z_a`` over all K actions (``+inf`` when the
      support does not span the actions); recomputed exactly at the end, never a tracked value.
    iterations: [...] int32, Frank-Wolfe steps taken (or subsets drawn for ``method="rejection"``).
    converged: [...] bool, whether the stopping rule holds at the returned weights.
    rank: [...] int32, numerical rank r of the actions (the optimal ``g_value`` is r when ridge = 0).
  """

  weights: jax.Array
  g_value: jax.Array
  iterations: jax.Array
  converged: jax.Array
  rank: jax.Array


# ---------------------------------------------------------------------------------------------------
# Single-instance kernels (vmapped over the batch).


def span_coordinates(z: jax.Array, rtol: float, whiten: bool):
  """Coordinates of the actions in an orthonormal basis of their span.

  Args:
    z: [K, d] action embeddings.
    rtol: relative tolerance on singular values for the rank decision.
    whiten: scale each kept coordinate to unit norm over the K actions.

  Returns:
    y: [K, d] coordinates; dropped directions are exactly zero.
    mask: [d] 1.0 for kept directions, 0.0 for dropped ones.
    r: [] int32 numerical rank.
  """
  gram = jnp.matmul(z.T, z, precision=_HI)
  _, q = jnp.linalg.eigh(gram)
  y = jnp.matmul(z, q, precision=_HI)
  s = jnp.sqrt(jnp.sum(y * y, axis=0))  # [d] singular values, recomputed from z.
  smax = jnp.max(s)
  keep = (s > rtol * smax) & (smax > 0)
  mask = keep.astype(z.dtype)
  scale = jnp.where(keep, s, 1.0) if whiten else jnp.ones_like(s)
  y = jnp.where(keep, y / scale, 0.0)
  return y, mask, jnp.sum(keep).astype(jnp.int32)


def _kumar_yildirim(y: jax.Array, r: jax.Array) -> jax.Array:
  """Kumar-Yildirim core set (symmetric, greedy-residual form): uniform weights on r actions.

  Args:
    y: [K, d] span coordinates. r: [] rank.

  Returns:
    [K] weights: 1/r on r linearly independent actions (uniform over all K when r = 0).
  """
  k, d = y.shape
  tiny = jnp.finfo(y.dtype).tiny

  def body(j, carry):
    res, chosen = carry
    nrm = jnp.where(chosen, -1.0, jnp.sum(res * res, axis=-1))
    a = jnp.argmax(nrm)
    take = j < r
    q = res[a] / jnp.sqrt(jnp.maximum(nrm[a], tiny))
    proj = jnp.matmul(res, q, precision=_HI)
    res = jnp.where(take, res - proj[:, None] * q[None, :], res)
    chosen = chosen.at[a].set(chosen[a] | take)
    return res, chosen

  _, chosen = lax.fori_loop(0, d, body, (y, jnp.zeros((k,), bool)))
  n = jnp.sum(chosen)
  return jnp.where(n > 0, chosen / jnp.maximum(n, 1), 1.0 / k).astype(y.dtype)


def _moment(y: jax.Array, pi: jax.Array, extra: jax.Array) -> jax.Array:
  """V = sum_a pi_a y_a y_a^T + diag(extra): [d, d]."""
  return jnp.matmul((y * pi[:, None]).T, y, precision=_HI) + jnp.diag(extra)


def _inverse_and_leverages(y: jax.Array, pi: jax.Array, extra: jax.Array):
  """Exact V^{-1} [d, d] (Cholesky) and leverages g [K] = diag(y V^{-1} y^T)."""
  v = _moment(y, pi, extra)
  chol = jnp.linalg.cholesky(v)
  eye = jnp.eye(v.shape[0], dtype=v.dtype)
  vinv = jax.scipy.linalg.cho_solve((chol, True), eye)
  vinv = 0.5 * (vinv + vinv.T)
  g = jnp.sum(jnp.matmul(y, vinv, precision=_HI) * y, axis=-1)
  return vinv, g


def _select_step(pi: jax.Array, g: jax.Array, mean_g: jax.Array):
  """Frank-Wolfe vertex choice: toward the largest leverage or away from the smallest on support."""
  jp = jnp.argmax(g)
  jm = jnp.argmin(jnp.where(pi > 0, g, jnp.inf))
  toward = (g[jp] - mean_g) >= (mean_g - g[jm])
  j = jnp.where(toward, jp, jm)
  return j, toward


def _rank_one_step(y, r, pi, vinv, g, active):
  """One Frank-Wolfe / away step with exact line search and Sherman-Morrison updates (ridge = 0)."""
  dtype = y.dtype
  rf = r.astype(dtype)
  j, toward = _select_step(pi, g, rf)
  kappa = g[j]
  pj = pi[j]
  tiny = jnp.finfo(dtype).tiny
  gamma_star = (kappa / rf - 1.0) / jnp.where(jnp.abs(kappa - 1.0) > tiny, kappa - 1.0, 1.0)
  gamma_min = -pj / jnp.maximum(1.0 - pj, tiny)
  drop = (~toward) & ((kappa <= 1.0) | (gamma_star <= gamma_min))
  gamma = jnp.where(toward, jnp.clip(gamma_star, 0.0, 1.0), jnp.where(drop, gamma_min, gamma_star))
  gamma = jnp.where(active, gamma, 0.0)
  drop = drop & active

  c = gamma / (1.0 - gamma)
  denom = 1.0 + c * kappa
  coef = c / jnp.where(jnp.abs(denom) > tiny, denom, tiny)
  u = jnp.matmul(vinv, y[j], precision=_HI)
  yu = jnp.matmul(y, u, precision=_HI)
  vinv = (vinv - coef * jnp.outer(u, u)) / (1.0 - gamma)
  g = (g - coef * yu * yu) / (1.0 - gamma)
  pi = (1.0 - gamma) * pi
  pi = pi.at[j].add(gamma)
  pi = pi.at[j].set(jnp.where(drop, 0.0, jnp.maximum(pi[j], 0.0)))
  return pi, vinv, g, (gamma != 0).astype(jnp.int32)


def _exact_step(y, extra, ridge_diag, pi, g, active):
  """One Frank-Wolfe / away step with ridge > 0: exact line search by bisection, exact rebuild."""
  dtype = y.dtype
  mean_g = jnp.sum(pi * g)
  j, toward = _select_step(pi, g, mean_g)
  pj = pi[j]
  tiny = jnp.finfo(dtype).tiny
  v = _moment(y, pi, extra)
  # d/dgamma of V(pi + gamma (e_j - pi)) restricted to the kept block; the unit diagonal of dropped
  # directions (extra - ridge_diag) is constant.
  direction = jnp.outer(y[j], y[j]) + jnp.diag(ridge_diag) - (v - jnp.diag(extra - ridge_diag))
  chol = jnp.linalg.cholesky(v)
  half = jax.scipy.linalg.solve_triangular(chol, direction, lower=True)
  w = jax.scipy.linalg.solve_triangular(chol, half.T, lower=True)
  mu = jnp.linalg.eigvalsh(0.5 * (w + w.T))

  def slope(gam):
    return jnp.sum(mu / jnp.maximum(1.0 + gam * mu, tiny))

  lo = jnp.where(toward, 0.0, -pj / jnp.maximum(1.0 - pj, tiny))
  hi = jnp.where(toward, 1.0, 0.0)

  def bisect(_, bounds):
    a, b = bounds
    mid = 0.5 * (a + b)
    up = slope(mid) > 0
    return jnp.where(up, mid, a), jnp.where(up, b, mid)

  a, b = lax.fori_loop(0, 40, bisect, (lo, hi))
  gamma = jnp.where(slope(hi) >= 0, hi, jnp.where(slope(lo) <= 0, lo, 0.5 * (a + b)))
  gamma = jnp.where(active, gamma, 0.0)
  drop = active & (~toward) & (gamma <= lo)
  pi = (1.0 - gamma) * pi
  pi = pi.at[j].add(gamma)
  pi = pi.at[j].set(jnp.where(drop, 0.0, jnp.maximum(pi[j], 0.0)))
  vinv, g = _inverse_and_leverages(y, pi, extra)
  return pi, vinv, g, (gamma != 0).astype(jnp.int32)


def frank_wolfe_single(z, *, eps, max_iters, ridge, rtol, refresh_every):
  """Solves one instance. z: [K, d]. Returns a Design of scalars and [K] weights."""
  dtype = z.dtype
  y, mask, r = span_coordinates(z, rtol, whiten=ridge == 0)
  ridge_diag = ridge * mask
  extra = (1.0 - mask) + ridge_diag
  rf = r.astype(dtype)
  pi0 = _kumar_yildirim(y, r)
  vinv0, g0 = _inverse_and_leverages(y, pi0, extra)

  def target(pi, g):
    return (1.0 + eps) * (rf if ridge == 0 else jnp.sum(pi * g))

  def inner(_, state):
    pi, vinv, g, it = state
    active = (jnp.max(g) > target(pi, g)) & (it < max_iters)
    if ridge == 0:
      pi, vinv, g, took = _rank_one_step(y, r, pi, vinv, g, active)
    else:
      pi, vinv, g, took = _exact_step(y, extra, ridge_diag, pi, g, active)
    return pi, vinv, g, it + took

  def epoch(state):
    pi, vinv, g, it, _ = state
    pi, vinv, g, it = lax.fori_loop(0, refresh_every, inner, (pi, vinv, g, it))
    pi = pi / jnp.sum(pi)
    vinv, g = _inverse_and_leverages(y, pi, extra)
    return pi, vinv, g, it, jnp.max(g) <= target(pi, g)

  def not_done(state):
    _, _, _, it, done = state
    return (~done) & (it < max_iters)

  state = (pi0, vinv0, g0, jnp.int32(0), jnp.max(g0) <= target(pi0, g0))
  pi, _, g, it, done = lax.while_loop(not_done, epoch, state)
  return Design(pi, jnp.max(g), it, done, r)


def value_in_span(y, mask, r, pi, ridge):
  """g(pi) in span coordinates; +inf when ridge = 0 and the support does not span the actions."""
  dtype = y.dtype
  extra = (1.0 - mask) + ridge * mask
  _, g = _inverse_and_leverages(y, pi, extra)
  value = jnp.max(g)
  if ridge == 0:
    kept = jnp.linalg.eigvalsh(_moment(y, pi, jnp.zeros_like(mask)))
    tol = 10.0 * y.shape[-1] * jnp.finfo(dtype).eps * jnp.max(kept)
    covers = jnp.sum(kept > tol) >= r
    value = jnp.where(covers, value, jnp.inf)
  return value


def rejection_single(z, key, *, m, c_factor, max_iters, rtol):
  """The paper's random m-subset rejection sampler for one instance. z: [K, d]."""
  k = z.shape[0]
  dtype = z.dtype
  y, mask, r = span_coordinates(z, rtol, whiten=True)
  bound = c_factor * r.astype(dtype)

  def draw(key):
    _, idx = lax.top_k(jax.random.gumbel(key, (k,), dtype=dtype), m)
    pi = jnp.zeros((k,), dtype).at[idx].set(1.0 / m)
    return pi, value_in_span(y, mask, r, pi, 0.0)

  def body(state):
    key, best_pi, best_g, it = state
    key, sub = jax.random.split(key)
    pi, g = draw(sub)
    better = (g < best_g) | (it == 0)  # The first draw always replaces the placeholder.
    return key, jnp.where(better, pi, best_pi), jnp.where(better, g, best_g), it + 1

  def cond(state):
    _, _, best_g, it = state
    # With r > m no m-subset spans the actions: one draw shows it (g = inf), more cannot help.
    return (best_g > bound) & (it < max_iters) & ((it == 0) | (r <= m))

  init = (key, jnp.full((k,), 1.0 / k, dtype), jnp.array(jnp.inf, dtype), jnp.int32(0))
  _, pi, g, it = lax.while_loop(cond, body, init)
  return Design(pi, g, it, g <= bound, r)
