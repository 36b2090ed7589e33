"""The paper's profile consistency check (PAPER_SPEC.md 1.5): does a profile locate its user in Z?

An encoder trained with a squared l2 loss maps a profile's text to its user's behavioural
embedding; trained on the training users' profiles, its mean l2 error on the held-out users'
profiles is compared with the mean l2 distance from a user to the nearest other user (the paper's
criterion: the profile must place its user closer than the nearest other user is). A second
reference is stricter and shown beside it: the error of predicting every held-out user as the
training users' mean embedding (a profile that says nothing about its user scores about this).

The encoder is the frozen sentence features of the world (MiniLM, as E_D's) with a ridge head (the
paper fine-tunes a whole encoder; with tens of users a head is what the data can fit), its penalty
chosen by the exact leave-one-out error on the training users; the head is fitted by E_D's ridge
(``encoder.ridge_weights``). The leave-one-out residuals come in closed form from one SVD
(``ridge_loo``); scikit-learn's ``RidgeCV`` does the same but is not a dependency of the package,
and the closed form is a few lines.

Target: the user vectors' columns that vary across users (``z_u = [x_u, b_u, 1, mu]`` -> the
factors and the bias; constant columns carry no information about a user).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from eagle_jax import checks
from eagle_jax.embed import encoder

# Ridge penalties tried, relative to the mean squared singular value of the centred features.
ALPHAS = tuple(float(a) for a in np.logspace(-3, 3, 13))


def ridge_loo(x: np.ndarray, y: np.ndarray, alphas: Sequence[float]) -> np.ndarray:
  """Exact leave-one-out mean squared l2 errors of ridge with an unpenalised intercept.

  The fit is a linear smoother ``y_hat = H y`` with ``H = 11'/n + U diag(s^2/(s^2+a)) U'``
  (``U, s`` of the centred ``x``), so the held-out residual of row i is ``e_i / (1 - H_ii)``.

  Args:
    x: [n, e] features.
    y: [n, d] targets.
    alphas: penalties (absolute).

  Returns:
    [len(alphas)] mean over rows of the squared l2 leave-one-out residual.
  """
  n = len(x)
  xc, yc = x - x.mean(0), y - y.mean(0)
  u, s, _ = np.linalg.svd(xc, full_matrices=False)
  uty = u.T @ yc
  out = []
  for a in alphas:
    shrink = s * s / (s * s + a)
    resid = yc - u @ (shrink[:, None] * uty)
    h = 1.0 / n + np.sum(u * u * shrink[None], 1)
    out.append(float(np.mean(np.sum((resid / (1.0 - h)[:, None]) ** 2, 1))))
  return np.asarray(out)


def nearest_user_distance(z: np.ndarray, rows: np.ndarray) -> np.ndarray:
  """[len(rows)] l2 distance from each of ``rows`` to its nearest other row of ``z`` [U, d]."""
  q = z[rows]
  d2 = np.sum(q * q, 1)[:, None] - 2 * q @ z.T + np.sum(z * z, 1)[None]
  d2[np.arange(len(rows)), rows] = np.inf
  return np.sqrt(np.maximum(d2.min(1), 0.0))


def check(encode: Callable[[Sequence[str]], np.ndarray], profiles: Mapping[int, str | None],
          z_users: np.ndarray, train_users: Sequence[int], heldout_users: Sequence[int]
          ) -> dict[str, Any]:
  """The check on a world's users.

  Args:
    encode: texts -> [n, e] sentence features.
    profiles: user index -> profile text (None or missing: no profile; the user is left out).
    z_users: [U, k] user vectors of every user (the nearest-user distances run over all of them).
    train_users: user indices the head is fitted on.
    heldout_users: user indices it is scored on.

  Returns:
    ``{"users_train", "users_heldout", "alpha", "heldout_l2", "mean_user_l2",
    "nearest_user_l2", "passed", "beats_mean_user"}``; the l2 numbers are means over held-out
    users; ``passed``: ``heldout_l2 < nearest_user_l2`` (the paper's criterion). ``None`` values
    when fewer than 3 training or 1 held-out users have a profile.
  """
  z = np.asarray(z_users, np.float64)
  checks.check_finite(z, "profile check: user vectors")
  z = z[:, np.ptp(z, 0) > 0]
  tr = np.asarray([u for u in train_users if profiles.get(int(u))], np.int64)
  te = np.asarray([u for u in heldout_users if profiles.get(int(u))], np.int64)
  out: dict[str, Any] = {"users_train": len(tr), "users_heldout": len(te), "target_dims":
                         int(z.shape[1]), "alpha": None, "heldout_l2": None,
                         "mean_user_l2": None, "nearest_user_l2": None, "passed": None,
                         "beats_mean_user": None}
  if len(tr) < 3 or len(te) < 1:
    return out
  x = np.asarray(encode([profiles[int(u)] for u in np.concatenate([tr, te])]), np.float64)
  checks.check_finite(x, "profile check: profile features")
  x_tr, x_te = x[:len(tr)], x[len(tr):]
  scale = float(np.mean(np.linalg.svd(x_tr - x_tr.mean(0), compute_uv=False) ** 2))
  alphas = np.asarray(ALPHAS) * max(scale, 1e-12)
  alpha = float(alphas[int(np.argmin(ridge_loo(x_tr, z[tr], alphas)))])
  w, b = encoder.ridge_weights(x_tr, z[tr], alpha)
  err = float(np.mean(np.linalg.norm(x_te @ w + b - z[te], axis=1)))
  mean_err = float(np.mean(np.linalg.norm(z[tr].mean(0) - z[te], axis=1)))
  nn = float(np.mean(nearest_user_distance(z, te)))
  out.update(alpha=alpha, heldout_l2=err, mean_user_l2=mean_err, nearest_user_l2=nn,
             passed=bool(err < nn), beats_mean_user=bool(err < mean_err))
  return out
