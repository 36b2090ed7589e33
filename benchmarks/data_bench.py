r"""Loading speed of a MovieLens-25M-shaped ratings.csv: our columnar reader vs a Python csv loop.

  python -m benchmarks.data_bench            # 25,000,095 ratings (162,541 x 62,423), as ML-25M
  python -m benchmarks.data_bench --quick    # a tenth of that

The synthetic folder is written once into ``$EAGLE_JAX_CACHE/synthetic/`` and reused. The reference
is the obvious ``csv.reader`` loop with int/float conversion; it is timed on the first 1M rows and
scaled linearly (it is linear in rows), so the benchmark itself stays short.
"""

from __future__ import annotations

import csv
import itertools
import resource
import time
from collections.abc import Sequence

import numpy as np
from absl import app, flags

from eagle_jax import assets, data
from eagle_jax.data import synthetic

_QUICK = flags.DEFINE_bool("quick", False, "Use a tenth of the ML-25M shape.")
_REF_ROWS = 1_000_000


def _folder(quick: bool):
  scale = 10 if quick else 1
  shape = dict(num_users=162_541 // scale, num_items=62_423 // scale,
               num_ratings=25_000_095 // scale)
  folder = assets.cache_dir() / "synthetic" / (
      f"ml25m-shaped-{shape['num_users']}x{shape['num_items']}-{shape['num_ratings']}-seed0")
  if not (folder / "movies.csv").is_file():
    t = time.perf_counter()
    synthetic.write_movielens_csv(synthetic.generate_ratings(**shape, seed=0), folder)
    print(f"wrote {folder} in {time.perf_counter() - t:.1f} s")
  return folder, shape


def _python_csv_rows_per_s(path) -> float:
  t = time.perf_counter()
  with open(path, newline="") as f:
    reader = csv.reader(f)
    next(reader)
    users, items, ratings, times = [], [], [], []
    for row in itertools.islice(reader, _REF_ROWS):
      users.append(int(row[0]))
      items.append(int(row[1]))
      ratings.append(float(row[2]))
      times.append(int(row[3]))
  np.asarray(users), np.asarray(items), np.asarray(ratings, np.float32), np.asarray(times)
  return len(users) / (time.perf_counter() - t)


def main(argv: Sequence[str]) -> None:
  del argv
  folder, shape = _folder(_QUICK.value)
  t = time.perf_counter()
  d = data.load_movielens(folder)
  ours = time.perf_counter() - t
  assert d.num_ratings == shape["num_ratings"], d.summary()
  ref_rate = _python_csv_rows_per_s(folder / "ratings.csv")
  ref = shape["num_ratings"] / ref_rate
  rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
  print(f"dataset: {d.summary()}")
  print(f"eagle_jax load_movielens (ratings+movies+tags, validated ids): {ours:.1f} s, "
        f"{d.num_ratings / ours / 1e6:.2f} M rows/s, peak RSS {rss:.2f} GiB")
  print(f"python csv loop (ratings only, from {_REF_ROWS:,} rows): {ref:.1f} s extrapolated, "
        f"{ref_rate / 1e6:.2f} M rows/s")
  print(f"speed-up vs python csv: {ref / ours:.1f}x")


if __name__ == "__main__":
  app.run(main)
