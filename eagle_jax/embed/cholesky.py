"""Batched symmetric positive definite solves by blocked Cholesky, written in XLA ops.

WALS solves one small ``[d, d]`` system per row. ``jnp.linalg.cholesky`` on CPU calls a LAPACK
kernel that splits its batch over XLA's intra-op thread pool and blocks on it; with several in
flight the pool deadlocks. These kernels run as unrolled vector steps and batched matmuls instead,
so they compile to GEMMs on every backend and nothing blocks.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

_PANEL = 16  # Block size of the blocked Cholesky factorisation.


def _cholesky_small(a: jax.Array) -> jax.Array:
  """[B, n, n] -> lower Cholesky factor, n <= _PANEL, unrolled right-looking updates."""
  n = a.shape[-1]
  cols = []
  for j in range(n):
    col = a[:, j:, j] / jnp.sqrt(a[:, j, j])[:, None]  # [B, n-j], col[:, 0] is the pivot
    cols.append(jnp.pad(col, ((0, 0), (j, 0))))
    if j + 1 < n:
      c = col[:, 1:]
      a = a.at[:, j + 1:, j + 1:].add(-c[:, :, None] * c[:, None, :])
  return jnp.stack(cols, axis=2)


def _lower_inverse(low: jax.Array) -> jax.Array:
  """[B, n, n] lower triangular -> its inverse, by unrolled forward substitution."""
  batch, n = low.shape[0], low.shape[-1]
  eye = jnp.eye(n, dtype=low.dtype)
  rows = []
  for i in range(n):
    r = jnp.broadcast_to(eye[i], (batch, n))
    if i:
      r = r - jnp.einsum("bk,bkj->bj", low[:, i, :i], jnp.stack(rows, axis=1))
    rows.append(r / low[:, i, i][:, None])
  return jnp.stack(rows, axis=1)


def cholesky_solve(a: jax.Array, b: jax.Array) -> jax.Array:
  """Solves ``a x = b`` for symmetric positive definite ``a`` by blocked Cholesky, in XLA ops.

  ``jnp.linalg.cholesky`` on CPU calls a LAPACK kernel that splits its batch over XLA's intra-op
  thread pool and blocks on it; with several in flight the pool deadlocks (observed with jax 0.10.2
  on 2 cores). This factorisation works on ``_PANEL``-wide panels: each diagonal panel is factored
  and inverted with unrolled vector steps, the off-diagonal panels and trailing updates are batched
  matmuls, so the O(d^3) work runs as GEMMs on every backend and nothing blocks.

  Args:
    a: [B, d, d] float32 symmetric positive definite.
    b: [B, d] float32.

  Returns:
    [B, d] float32 ``x``.
  """
  hi = jax.lax.Precision.HIGHEST
  d = a.shape[-1]
  bounds = [(k0, min(k0 + _PANEL, d)) for k0 in range(0, d, _PANEL)]
  inv_diag, panels = [], []
  for k0, k1 in bounds:
    inv = _lower_inverse(_cholesky_small(a[:, k0:k1, k0:k1]))
    inv_diag.append(inv)
    if k1 < d:
      l21 = jnp.einsum("bij,bkj->bik", a[:, k1:, k0:k1], inv, precision=hi)  # A21 L11^-T
      panels.append(l21)
      a = a.at[:, k1:, k1:].add(-jnp.einsum("bik,bjk->bij", l21, l21, precision=hi))
  ys = []  # forward: L y = b
  for j, (k0, k1) in enumerate(bounds):
    r = b[:, k0:k1]
    for i in range(j):
      off = bounds[i][1]
      r = r - jnp.einsum("bpq,bq->bp", panels[i][:, k0 - off:k1 - off], ys[i], precision=hi)
    ys.append(jnp.einsum("bpq,bq->bp", inv_diag[j], r, precision=hi))
  xs = [None] * len(bounds)  # backward: L^T x = y
  for j in reversed(range(len(bounds))):
    r = ys[j]
    if j + 1 < len(bounds):
      r = r - jnp.einsum("bpq,bp->bq", panels[j], jnp.concatenate(xs[j + 1:], axis=1),
                         precision=hi)
    xs[j] = jnp.einsum("bqp,bq->bp", inv_diag[j], r, precision=hi)
  return jnp.concatenate(xs, axis=1)
