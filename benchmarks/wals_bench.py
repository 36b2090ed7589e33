"""WALS speed and quality against a numpy per-row reference and `implicit`'s CPU ALS.

  python -m benchmarks.wals_bench [--quick] [--skip_25m] [--rank=8] [--sweeps=15]

1. ML-100K (offline recbole copy), per-user time split, the hyperparameters of
   ``configs/wals_ml100k.py`` (rank and sweeps overridable): our jitted WALS vs
   * a plain numpy implementation of the same objective (one ``np.linalg.solve`` per row, float64),
     from the same initial factors: time per sweep and test RMSE (quality parity);
   * ``implicit.als.AlternatingLeastSquares`` (CPU, Cholesky-free conjugate-gradient ALS of the
     implicit-feedback objective, so compared on speed only) at the same rank and iterations.
   Threads: JAX/XLA uses its default intra-op pool (all cores), implicit ``num_threads`` = all cores,
   BLAS limited to 1 thread for numpy and implicit (threadpoolctl), as implicit recommends.
2. One sweep on a synthetic MovieLens-25M-shaped instance (162,541 x 62,423, 25,000,095 ratings,
   rank 64) in a subprocess, so its peak memory is its own: time of the first sweep (with
   compilation) and of a second one, and peak RSS.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import numpy as np


def _numpy_sweep(user, item, rating, nu, ni, x, y, b, c, mu, cfg):
  """Reference sweep: users then items, one float64 np.linalg.solve per row."""

  def half(rows, cols, num_rows, other_f, other_b, order, starts, counts):
    n, k = other_f.shape
    d = k + 1 if cfg.use_bias else k
    phi = np.concatenate([other_f, np.ones((n, 1))], 1) if cfg.use_bias else other_f
    base = np.zeros((d, d))
    base[:k, :k] = cfg.unobserved_weight * other_f.T @ other_f
    reg = np.full(d, cfg.reg)
    if cfg.use_bias:
      reg[k] = cfg.bias_weight
    out = np.zeros((num_rows, d))
    for r in range(num_rows):
      sel = order[starts[r]:starts[r] + counts[r]]
      p = phi[cols[sel]]
      t = rating[sel] - mu - (other_b[cols[sel]] if cfg.use_bias else 0.0)
      a = cfg.observed_weight * p.T @ p + base + max(counts[r], 1) ** cfg.reg_exponent * np.diag(
          reg)
      out[r] = np.linalg.solve(a, cfg.observed_weight * p.T @ t)
    return (out[:, :k], out[:, k]) if cfg.use_bias else (out, np.zeros(num_rows))

  def index(rows, num_rows):
    order = np.argsort(rows, kind="stable")
    counts = np.bincount(rows, minlength=num_rows)
    return order, np.concatenate([[0], np.cumsum(counts)[:-1]]), counts

  x, b = half(user, item, nu, y, c, *index(user, nu))
  y, c = half(item, user, ni, x, b, *index(item, ni))
  return x, y, b, c


def _ml100k(args) -> dict:
  import jax
  import scipy.sparse
  from threadpoolctl import threadpool_limits

  from configs import wals_ml100k
  from eagle_jax import data, parallel
  from eagle_jax.embed import wals, wals_metrics

  config = wals_ml100k.get_config()
  fields = dict(config.wals)
  fields.update(rank=args.rank or fields["rank"], sweeps=args.sweeps or fields["sweeps"])
  if args.quick:
    fields["sweeps"] = min(fields["sweeps"], 5)
  cfg = wals.WALSConfig(**fields)
  ratings = data.load_ml100k_assets()
  train, test = data.split(ratings, test_fraction=0.2, min_train=1)
  mesh = parallel.make_mesh({"data": 1}, devices=jax.devices()[:1])
  model = wals.WALS.from_ratings(train, cfg, mesh=mesh)
  f0 = model.init()
  ours, hist = model.fit(f0, track_objective=False)
  steady = [h["seconds"] for h in hist[1:]]
  t_ours = float(np.median(steady)) if steady else hist[0]["seconds"]
  # numpy reference, same initial factors and sweeps.
  x = np.zeros((train.num_users, cfg.rank))
  y = np.asarray(f0.item_factors, np.float64)
  b, c = np.zeros(train.num_users), np.zeros(train.num_items)
  mu = float(f0.global_mean)
  times = []
  with threadpool_limits(1, "blas"):
    for _ in range(cfg.sweeps):
      t0 = time.perf_counter()
      x, y, b, c = _numpy_sweep(train.user, train.item, train.rating.astype(np.float64),
                                train.num_users, train.num_items, x, y, b, c, mu, cfg)
      times.append(time.perf_counter() - t0)
  ref = wals.WALSFactors(user_factors=x.astype(np.float32), item_factors=y.astype(np.float32),
                         user_bias=b.astype(np.float32), item_bias=c.astype(np.float32),
                         global_mean=np.float32(mu))
  t_numpy = float(np.median(times))
  # implicit's CPU ALS at the same rank and iterations.
  from implicit.als import AlternatingLeastSquares
  csr = scipy.sparse.csr_matrix((train.rating, (train.user, train.item)),
                                shape=(train.num_users, train.num_items))
  threads = os.cpu_count() or 1
  with threadpool_limits(1, "blas"):
    warm = AlternatingLeastSquares(factors=cfg.rank, regularization=cfg.reg, iterations=1,
                                   use_gpu=False, num_threads=threads, random_state=0)
    warm.fit(csr, show_progress=False)
    als = AlternatingLeastSquares(factors=cfg.rank, regularization=cfg.reg,
                                  iterations=cfg.sweeps, use_gpu=False, num_threads=threads,
                                  random_state=0)
    t0 = time.perf_counter()
    als.fit(csr, show_progress=False)
    t_implicit = (time.perf_counter() - t0) / cfg.sweeps
  rmse = lambda f: wals_metrics.rmse(f, test.user, test.item, test.rating)
  return {
      "rank": cfg.rank, "sweeps": cfg.sweeps, "cores": threads,
      "ours_first_sweep_s": hist[0]["seconds"], "ours_sweep_s": t_ours,
      "numpy_sweep_s": t_numpy, "implicit_sweep_s": t_implicit,
      "speedup_vs_numpy": t_numpy / t_ours, "ours_over_implicit": t_ours / t_implicit,
      "ours_test_rmse": rmse(ours), "numpy_test_rmse": rmse(ref),
      "max_factor_diff": float(max(
          np.abs(np.asarray(ours.user_factors) - ref.user_factors).max(),
          np.abs(np.asarray(ours.item_factors) - ref.item_factors).max())),
  }


def _child_25m(args) -> dict:
  """Runs in its own process: synthetic 25M-shaped data, then sweeps at rank 64."""
  import jax

  from eagle_jax import parallel
  from eagle_jax.data import synthetic
  from eagle_jax.embed import wals

  t0 = time.perf_counter()
  shape = dict(num_users=162_541, num_items=62_423, num_ratings=25_000_095)
  if args.quick:
    shape = dict(num_users=16_254, num_items=6_242, num_ratings=2_500_000)
  ratings = synthetic.generate_ratings(**shape, rank=16, seed=0)
  gen_s = time.perf_counter() - t0
  rss_after_data = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
  cfg = wals.WALSConfig(rank=64, reg=0.05, reg_exponent=1.0, unobserved_weight=0.0, sweeps=2)
  t0 = time.perf_counter()
  model = wals.WALS.from_ratings(ratings, cfg, mesh=parallel.make_mesh())
  setup_s = time.perf_counter() - t0
  _, hist = model.fit(track_objective=False)
  return {"shape": shape, "rank": cfg.rank, "devices": jax.device_count(),
          "generate_s": gen_s, "setup_s": setup_s,
          "first_sweep_s": hist[0]["seconds"], "second_sweep_s": hist[1]["seconds"],
          "padded_entries": model.user_plan.padded_entries + model.item_plan.padded_entries,
          "rss_after_data_bytes": int(rss_after_data),
          "peak_rss_bytes": int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--quick", action="store_true", help="fewer sweeps, a 10x smaller 25M run")
  parser.add_argument("--skip_25m", action="store_true", help="skip the 25M-shaped sweep")
  parser.add_argument("--rank", type=int, default=0, help="rank (default: the config's)")
  parser.add_argument("--sweeps", type=int, default=0, help="sweeps (default: the config's)")
  parser.add_argument("--child_25m", action="store_true", help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.child_25m:
    print(json.dumps(_child_25m(args)))
    return
  r = _ml100k(args)
  print(f"ML-100K time split, rank {r['rank']}, {r['sweeps']} sweeps, {r['cores']} cores")
  print(f"  ours (jit, 1 device): {1e3 * r['ours_sweep_s']:.1f} ms/sweep "
        f"(first sweep with compilation {r['ours_first_sweep_s']:.2f} s)")
  print(f"  numpy per-row solve:  {1e3 * r['numpy_sweep_s']:.1f} ms/sweep -> ours is "
        f"{r['speedup_vs_numpy']:.1f}x faster (target >= 5x)")
  print(f"  implicit CPU ALS:     {1e3 * r['implicit_sweep_s']:.1f} ms/sweep -> ours takes "
        f"{r['ours_over_implicit']:.2f}x its time (target <= 1.5x)")
  print(f"  test RMSE ours {r['ours_test_rmse']:.4f} vs numpy {r['numpy_test_rmse']:.4f}; "
        f"max |factor difference| {r['max_factor_diff']:.2e}")
  if args.skip_25m:
    return
  cmd = [sys.executable, "-m", "benchmarks.wals_bench", "--child_25m"] + (
      ["--quick"] if args.quick else [])
  out = subprocess.run(cmd, capture_output=True, text=True, check=False)
  if out.returncode:
    print(f"25M-shaped run failed (exit {out.returncode}):\n{out.stderr[-3000:]}")
    sys.exit(1)
  c = json.loads(out.stdout.strip().splitlines()[-1])
  s = c["shape"]
  gib = 1 << 30
  print(f"Synthetic {s['num_users']:,} x {s['num_items']:,}, {s['num_ratings']:,} ratings, rank "
        f"{c['rank']}, {c['devices']} device(s):")
  print(f"  generate {c['generate_s']:.1f} s, layout {c['setup_s']:.1f} s, first sweep "
        f"{c['first_sweep_s']:.1f} s (with compilation), second sweep {c['second_sweep_s']:.1f} s")
  print(f"  peak RSS {c['peak_rss_bytes'] / gib:.2f} GiB (after data generation "
        f"{c['rss_after_data_bytes'] / gib:.2f} GiB; target <= 12 GiB)")


if __name__ == "__main__":
  main()
