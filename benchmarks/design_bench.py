r"""G-optimal design speed: our jitted batched Frank-Wolfe vs cvxpy (Clarabel) and numpy Frank-Wolfe.

  python -m benchmarks.design_bench            # batch 256 of K=100, d=32 and of K=1000, d=64
  python -m benchmarks.design_bench --quick    # smaller reference samples, batch 64

Instances are i.i.d. standard normal action embeddings (full rank). All solvers stop at the same rule,
``g(pi) <= (1 + eps) d`` with eps = 1e-2 (cvxpy solves the D-optimal log-det problem to its own
tolerance, which by Kiefer-Wolfowitz has the same optimum). References, each solved one instance at a
time on the host:

* cvxpy + Clarabel, ``max log det(Z^T diag(w) Z)`` over the simplex (timing includes cvxpy's
  canonicalisation, as a user would pay it). It is slow (seconds to minutes per instance), so it is
  timed on a sample of the batch and reported per instance;
* numpy Frank-Wolfe, "plain": the textbook Fedorov-Wynn algorithm (uniform start, toward steps only,
  exact line search, V re-inverted every step), the background algorithm of PAPER_SPEC section 2.5;
* numpy Frank-Wolfe, "same algorithm": our algorithm line by line in numpy (Kumar-Yildirim start,
  away steps, Sherman-Morrison updates with a refresh every 50 steps), to separate the gain of the
  algorithm from the gain of jit + batching.

Ratios are throughputs (instances per second) of ours over each reference; > 1 means ours is faster.
Our first call (trace + compile) is reported separately and excluded from the throughput. The machine
may be shared, so numbers are noisy.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import jax
import numpy as np
from absl import app, flags

from eagle_jax import design

_QUICK = flags.DEFINE_bool("quick", False, "Smaller batch and smaller reference samples.")
_EPS = 1e-2


def _leverages(z: np.ndarray, vinv: np.ndarray) -> np.ndarray:
  return np.sum((z @ vinv) * z, axis=-1)


def numpy_fw_plain(z: np.ndarray, eps: float, max_iters: int = 100_000):
  """Textbook Fedorov-Wynn: uniform start, toward steps, exact line search. z: [K, d] float64."""
  k, d = z.shape
  pi = np.full(k, 1.0 / k)
  for it in range(max_iters + 1):
    g = _leverages(z, np.linalg.inv(z.T @ (pi[:, None] * z)))
    j = int(np.argmax(g))
    if g[j] <= (1 + eps) * d or it == max_iters:
      return pi, float(g[j]), it
    gamma = (g[j] / d - 1.0) / (g[j] - 1.0)
    pi *= 1.0 - gamma
    pi[j] += gamma
  raise AssertionError("unreachable")


def numpy_fw_same(z: np.ndarray, eps: float, max_iters: int = 100_000, refresh_every: int = 50):
  """Our algorithm in numpy: KY start, away steps, Sherman-Morrison. z: [K, d] float64, full rank."""
  k, d = z.shape
  res, chosen = z.copy(), []
  for _ in range(d):
    nrm = np.einsum("kd,kd->k", res, res)
    nrm[chosen] = -1.0
    a = int(np.argmax(nrm))
    q = res[a] / np.sqrt(nrm[a])
    res -= np.outer(res @ q, q)
    chosen.append(a)
  pi = np.zeros(k)
  pi[chosen] = 1.0 / d

  def refresh(pi):
    vinv = np.linalg.inv(z.T @ (pi[:, None] * z))
    return vinv, _leverages(z, vinv)

  vinv, g = refresh(pi)
  it = 0
  while it < max_iters:
    if it % refresh_every == 0:
      vinv, g = refresh(pi)
    jp = int(np.argmax(g))
    if g[jp] <= (1 + eps) * d:
      vinv, g = refresh(pi)
      if g.max() <= (1 + eps) * d:
        break
      jp = int(np.argmax(g))
    gm = np.where(pi > 0, g, np.inf)
    jm = int(np.argmin(gm))
    toward = g[jp] - d >= d - g[jm]
    j = jp if toward else jm
    kappa = g[j]
    gamma = (kappa / d - 1.0) / (kappa - 1.0) if kappa != 1.0 else -np.inf
    drop = False
    if not toward:
      gmin = -pi[j] / (1.0 - pi[j])
      if kappa <= 1.0 or gamma <= gmin:
        gamma, drop = gmin, True
    c = gamma / (1.0 - gamma)
    coef = c / (1.0 + c * kappa)
    u = vinv @ z[j]
    zu = z @ u
    vinv = (vinv - coef * np.outer(u, u)) / (1.0 - gamma)
    g = (g - coef * zu * zu) / (1.0 - gamma)
    pi *= 1.0 - gamma
    pi[j] = 0.0 if drop else pi[j] + gamma
    it += 1
  _, g = refresh(pi)
  return pi, float(g.max()), it


def cvxpy_design(z: np.ndarray):
  """D-optimal design by cvxpy + Clarabel. z: [K, d]. Returns (weights, log det optimum)."""
  import cvxpy as cp  # noqa: PLC0415  (bench extra only)

  k, _ = z.shape
  w = cp.Variable(k, nonneg=True)
  v = z.T @ cp.multiply(cp.reshape(w, (k, 1), order="C"), z)
  prob = cp.Problem(cp.Maximize(cp.log_det((v + v.T) / 2)), [cp.sum(w) == 1])
  prob.solve(solver=cp.CLARABEL)
  return np.clip(np.asarray(w.value), 0.0, None), float(prob.value)


def _g(z: np.ndarray, w: np.ndarray) -> float:
  w = w / w.sum()
  return float(_leverages(z, np.linalg.inv(z.T @ (w[:, None] * z))).max())


def _logdet(z: np.ndarray, w: np.ndarray) -> float:
  return float(np.linalg.slogdet(z.T @ (w[:, None] * z))[1])


def _time_ref(fn, zs):
  t = time.perf_counter()
  outs = [fn(z) for z in zs]
  return (time.perf_counter() - t) / len(zs), outs


def run_case(k: int, d: int, batch: int, n_cvx: int, n_plain: int, n_same: int) -> None:
  rng = np.random.default_rng(k * 1000 + d)
  z64 = rng.standard_normal((batch, k, d))
  z = z64.astype(np.float32)
  print(f"\n=== K={k}, d={d}, batch={batch}, eps={_EPS} ===")

  t = time.perf_counter()
  out = jax.block_until_ready(design.g_optimal_design(z, eps=_EPS))
  first = time.perf_counter() - t
  times = []
  for _ in range(3):
    t = time.perf_counter()
    out = jax.block_until_ready(design.g_optimal_design(z, eps=_EPS))
    times.append(time.perf_counter() - t)
  ours = min(times) / batch
  w = np.asarray(out.weights, np.float64)
  g_ours = np.array([_g(z64[i], w[i]) for i in range(batch)])
  supp = (w > 0).sum(-1)
  its = np.asarray(out.iterations)
  print(f"ours (jit, batched)    first call {first:.2f} s (trace+compile+run), so compile about "
        f"{max(first - min(times), 0.0):.2f} s; steady {ours * 1e3:.3f} ms/instance "
        f"({min(times):.3f} s per batch of {batch}, best of 3)")
  print(f"  converged {int(np.asarray(out.converged).sum())}/{batch}, mean g/d {g_ours.mean() / d:.5f}"
        f" (max {g_ours.max() / d:.5f}), iterations mean {its.mean():.0f} max {its.max()}, "
        f"support mean {supp.mean():.1f} max {supp.max()} (d(d+1)/2 = {d * (d + 1) // 2})")

  rows = []
  if n_plain:
    per, outs = _time_ref(lambda x: numpy_fw_plain(x, _EPS), z64[:n_plain])
    sup = [int((o[0] > 0).sum()) for o in outs]
    rows.append(("numpy FW plain", per, n_plain, np.mean([o[1] for o in outs]) / d,
                 np.mean([o[2] for o in outs]), np.mean(sup)))
  if n_same:
    per, outs = _time_ref(lambda x: numpy_fw_same(x, _EPS), z64[:n_same])
    sup = [int((o[0] > 0).sum()) for o in outs]
    rows.append(("numpy FW same algo", per, n_same, np.mean([o[1] for o in outs]) / d,
                 np.mean([o[2] for o in outs]), np.mean(sup)))
  if n_cvx:
    per, outs = _time_ref(cvxpy_design, z64[:n_cvx])
    gaps = [(o[1] - _logdet(z64[i], w[i])) / max(1.0, abs(o[1])) for i, o in enumerate(outs)]
    sup = [int((o[0] > 1e-6).sum()) for o in outs]
    rows.append(("cvxpy Clarabel", per, n_cvx,
                 np.mean([_g(z64[i], o[0]) for i, o in enumerate(outs)]) / d, float("nan"),
                 np.mean(sup)))
    print(f"  ours vs cvxpy log det: relative gap mean {np.mean(gaps):.2e} max {np.max(gaps):.2e} "
          f"(positive = cvxpy higher) on {n_cvx} instances")
  for name, per, n, gd, it, sp in rows:
    print(f"{name:22s} {per * 1e3:10.2f} ms/instance (on {n} instances), mean g/d {gd:.5f}, "
          f"iterations {it:.0f}, support {sp:.1f};  ours is {per / ours:8.1f}x its throughput")


def main(argv: Sequence[str]) -> None:
  del argv
  quick = _QUICK.value
  print(f"jax {jax.__version__} on {jax.devices()[0].platform}, {jax.device_count()} device(s)")
  if quick:
    run_case(100, 32, batch=64, n_cvx=2, n_plain=16, n_same=16)
    run_case(1000, 64, batch=64, n_cvx=0, n_plain=1, n_same=4)
    print("\n(quick: cvxpy skipped at K=1000, d=64; it takes about 100 s per instance here)")
  else:
    run_case(100, 32, batch=256, n_cvx=16, n_plain=64, n_same=64)
    run_case(1000, 64, batch=256, n_cvx=1, n_plain=2, n_same=16)


if __name__ == "__main__":
  app.run(main)
