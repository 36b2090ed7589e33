"""Training job of the behavioural latent space: WALS with resume, export and report.

``run(config, workdir)`` is what ``python -m launch.wals`` and the quick-start ``launch.main`` call.
Outputs in ``workdir``:
* ``checkpoints/<sweep>/``: orbax checkpoints of the factors (``eagle_jax.checkpoint``); a rerun
  resumes from the latest one and only runs the remaining sweeps. On SIGTERM the current sweep
  finishes, is saved, and ``preemption.Preempted`` is raised (``eagle_jax/preemption.py``).
* ``embeddings.npz`` (no pickle): ``user_factors`` [U, k], ``item_factors`` [I, k], ``user_bias``
  [U], ``item_bias`` [I], ``global_mean`` [], ``user_ids`` [U] and ``item_ids`` [I] (raw MovieLens ids).
* ``report.json``: data summary, config, train/test RMSE of the predicted rating (unclipped and
  clipped to the rating scale), recall@k on held-out items (relevant = held-out rating >=
  ``eval.relevant_min_rating``), time per sweep, objective per sweep, peak resident memory.
"""

from __future__ import annotations

import json
import os
import resource
import time

import jax
import numpy as np
from absl import logging

from eagle_jax import checkpoint, checks, data, parallel, paths, preemption, training
from eagle_jax.embed import wals, wals_metrics


def peak_rss_bytes() -> int:
  """Peak resident set size of this process (Linux ``ru_maxrss`` is in KiB)."""
  return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


_TFDS_PREFIX = "tfds:"


def check_source(source, field: str, inputs: bool = True) -> None:
  """``source`` is one ``load_data`` can read (``inputs``: a folder must exist); ConfigError naming
  ``field`` otherwise."""
  if source in ("ml100k", "synthetic"):
    return
  if isinstance(source, str) and source.startswith(_TFDS_PREFIX):
    return
  if not isinstance(source, str) or not source:
    raise checks.ConfigError(f"{field}={source!r}: expected 'ml100k', 'synthetic', "
                             "'tfds:movielens/<version>-ratings' or a MovieLens folder")
  if inputs:
    checks.check_input_path(source, f"{field} (a MovieLens folder)", kind="dir")


def check_config(config, field: str = "config", inputs: bool = True) -> wals.WALSConfig:
  """Validates a WALS job config (``configs/wals_ml100k.py``; ``config.wals`` of an EAGLE run) at
  the job's entry (``inputs``: also that input paths exist). Returns the ``WALSConfig``;
  ConfigError naming ``<field>.<block>.<name>``."""
  check_source(config.data.source, f"{field}.data.source", inputs)
  checks.check_numbers(config, [
      ("data.test_fraction", dict(lo=0.0, hi=1.0, hi_open=True)),
      ("data.min_train", dict(integer=True, lo=0)),
      ("eval.recall_k", dict(integer=True, lo=1)),
      ("eval.relevant_min_rating", dict(optional=True)),
      ("eval.clip_min", {}),
      ("eval.clip_max", {}),
      ("checkpoint.max_to_keep", dict(integer=True, lo=1)),
      ("checkpoint.every", dict(integer=True, lo=1)),
  ], prefix=field)
  if config.data.source == "synthetic":
    checks.check_numbers(config, [(f"data.synthetic.{n}", dict(integer=True, lo=1))
                                  for n in ("num_users", "num_items", "num_ratings", "rank")]
                         + [("data.synthetic.seed", dict(integer=True, lo=0))], prefix=field)
  if not config.eval.clip_min < config.eval.clip_max:
    raise checks.ConfigError(f"{field}.eval.clip_min={config.eval.clip_min!r} must be below "
                             f"{field}.eval.clip_max={config.eval.clip_max!r}")
  try:
    return wals.WALSConfig.from_config(config.wals)
  except (ValueError, TypeError) as e:
    text = str(e)
    where = f"{field}.wals." if text.startswith("WALSConfig.") else f"{field}.wals: "
    raise checks.ConfigError(where + text.removeprefix("WALSConfig.")) from None


def load_data(cfg) -> data.RatingsData:
  """The ratings named by ``cfg.source`` (a job's ``config.data``).

  Sources: "ml100k" (the offline recbole copy), "synthetic" (``cfg.synthetic`` shapes
  ``data.synthetic.generate_ratings``), ``"tfds:movielens/<version>-ratings"`` (TensorFlow
  Datasets, ``data.tfds_source.load`` with ``cfg.data_dir`` and ``cfg.tfds_folder``; needs the
  ``tfds`` extra), or a MovieLens folder path (``data.load_movielens``).

  Raises:
    ValueError: the source is none of these.
  """
  source = cfg.source
  if source == "ml100k":
    return data.load_ml100k_assets()
  if source == "synthetic":
    from eagle_jax.data import synthetic  # noqa: PLC0415 (only needed for this source)
    return synthetic.generate_ratings(**dict(cfg.synthetic))
  if isinstance(source, str) and source.startswith(_TFDS_PREFIX):
    from eagle_jax.data import tfds_source  # noqa: PLC0415 (the optional tfds extra)
    return tfds_source.load(source[len(_TFDS_PREFIX):], data_dir=cfg.get("data_dir") or None,
                            folder=cfg.get("tfds_folder") or None)
  check_source(source, "config.data.source")
  return data.load_movielens(source)


def evaluate(factors: wals.WALSFactors, train: data.RatingsData, test: data.RatingsData,
             cfg) -> dict[str, float]:
  """RMSE (unclipped and clipped) on train and test, and recall@k on the held-out items."""
  clip = (cfg.clip_min, cfg.clip_max)
  out = {
      "train_rmse": wals_metrics.rmse(factors, train.user, train.item, train.rating),
      "train_rmse_clipped": wals_metrics.rmse(factors, train.user, train.item, train.rating,
                                              clip=clip)}
  if test.num_ratings:
    out["test_rmse"] = wals_metrics.rmse(factors, test.user, test.item, test.rating)
    out["test_rmse_clipped"] = wals_metrics.rmse(factors, test.user, test.item, test.rating,
                                                 clip=clip)
    recall, users = wals_metrics.recall_at_k(
        factors, train.user, train.item, test.user, test.item, test.rating, k=cfg.recall_k,
        min_rating=cfg.relevant_min_rating)
    out[f"recall@{cfg.recall_k}"] = recall
    out["recall_users"] = users
  return out


def export_npz(path: str, factors: wals.WALSFactors, ratings: data.RatingsData) -> None:
  arrays = {k: np.asarray(v) for k, v in factors.to_dict().items()}
  with paths.open_file(path, "wb") as f:  # a file object: gs://... through etils.epath too
    np.savez(f, user_ids=np.asarray(ratings.user_ids), item_ids=np.asarray(ratings.item_ids),
             **arrays)


def _rows(path: str, arrays: dict, kind: str, ids: np.ndarray, names: tuple[str, ...]
          ) -> dict[str, np.ndarray]:
  missing = {f"{kind}_ids", *names} - set(arrays)
  if missing:
    raise ValueError(f"{path}: missing arrays {sorted(missing)}")
  index = {int(i): n for n, i in enumerate(arrays[f"{kind}_ids"])}
  absent = [int(i) for i in ids if int(i) not in index]
  if absent:
    raise ValueError(f"{path}: no vectors for {kind} ids {absent[:5]} ({len(absent)} in all)")
  order = np.asarray([index[int(i)] for i in ids], np.int64)
  return {n: np.asarray(arrays[n])[order].astype(np.float32) for n in names}


def load_npz(path: str, *, item_ids: np.ndarray | None = None, user_ids: np.ndarray | None = None
             ) -> dict[str, np.ndarray]:
  """Vectors of an ``export_npz`` file, rows reordered to the given raw ids (never unpickles).

  Returns a dict with, for items (when ``item_ids`` is given), ``item_factors`` [I, k] and
  ``item_augmented`` [I, k+3] = ``[y_i, 1, c_i, 1]``, and for users ``user_factors`` [U, k] and
  ``user_augmented`` [U, k+3] = ``[x_u, b_u, 1, mu]`` (``WALSFactors.augmented``'s layout: their
  inner product is the predicted rating).

  Raises:
    ValueError: naming the file when an array or an id is missing.
  """
  checks.check_input_path(path, "WALS embeddings")
  try:
    with paths.open_file(path, "rb") as f, np.load(f, allow_pickle=False) as z:
      arrays = {k: z[k] for k in z.files}
  except (OSError, ValueError, EOFError) as e:
    raise checks.ConfigError(f"{path}: not a readable .npz file ({e})") from None
  for name, arr in arrays.items():
    checks.check_finite(arr, f"{path}: {name}")
  out = {}
  if item_ids is not None:
    r = _rows(path, arrays, "item", item_ids, ("item_factors", "item_bias"))
    ones = np.ones((len(item_ids), 1), np.float32)
    out["item_factors"] = r["item_factors"]
    out["item_augmented"] = np.concatenate(
        [r["item_factors"], ones, r["item_bias"][:, None], ones], 1)
  if user_ids is not None:
    r = _rows(path, arrays, "user", user_ids, ("user_factors", "user_bias"))
    if "global_mean" not in arrays:
      raise ValueError(f"{path}: missing arrays ['global_mean']")
    n = len(user_ids)
    out["user_factors"] = r["user_factors"]
    out["user_augmented"] = np.concatenate(
        [r["user_factors"], r["user_bias"][:, None], np.ones((n, 1), np.float32),
         np.full((n, 1), float(arrays["global_mean"]), np.float32)], 1)
  return out


def run(config, workdir: str) -> dict:
  """Trains (resuming from ``workdir``), exports and reports. Returns the report."""
  training.check_workdir(workdir)
  cfg = check_config(config)
  mesh = training.build_mesh(config.mesh)
  t0 = time.perf_counter()
  ratings = load_data(config.data)
  train, test = data.split(ratings, test_fraction=config.data.test_fraction,
                           min_train=config.data.min_train)
  logging.info("data: %s; train %d, test %d ratings", ratings.summary(), train.num_ratings,
               test.num_ratings)
  load_seconds = time.perf_counter() - t0
  t0 = time.perf_counter()
  model = wals.WALS.from_ratings(train, cfg, mesh=mesh)
  setup_seconds = time.perf_counter() - t0
  ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"),
                                 max_to_keep=config.checkpoint.max_to_keep)
  init = model.init()
  step, state, meta = ckpt.restore_or_init(
      lambda: (0, init.to_dict(), {"history": []}), target=init.to_dict(),
      shardings=parallel.replicated(mesh))
  factors = model.place(wals.WALSFactors.from_dict(state))
  history = list(meta.get("history", []))
  if step:
    logging.info("resumed from sweep %d in %s", step, ckpt.directory)

  def on_sweep(s, f, record):
    history.append(record)
    logging.info("sweep %d: %.3f s, objective %.6g", s, record["seconds"],
                 record.get("objective", float("nan")))
    stop = guard.should_stop(s)
    if s % config.checkpoint.every == 0 or s == cfg.sweeps or stop:
      ckpt.save(s, f.to_dict(), {"history": history, "config": config.to_dict()}, force=True)
    if stop:
      ckpt.wait()
      raise preemption.Preempted(s, ckpt.directory)

  try:
    with preemption.Guard() as guard:
      factors, _ = model.fit(factors, start=step, callback=on_sweep)
  finally:
    ckpt.close()
  metrics = evaluate(factors, train, test, config.eval)
  export_npz(os.path.join(workdir, "embeddings.npz"), factors, ratings)
  seconds = [h["seconds"] for h in history]
  report = {
      "data": {"source": ratings.source, "num_users": ratings.num_users,
               "num_items": ratings.num_items, "train_ratings": train.num_ratings,
               "test_ratings": test.num_ratings, "test_fraction": config.data.test_fraction},
      "config": config.to_dict(),
      "devices": jax.device_count(),
      "metrics": metrics,
      "recall_relevance": (f"held-out items rated >= {config.eval.relevant_min_rating}"
                           if config.eval.relevant_min_rating is not None else
                           "all held-out items"),
      "sweeps": len(history),
      "history": history,
      "seconds_per_sweep_first": seconds[0] if seconds else None,  # includes compilation
      "seconds_per_sweep_steady": float(np.median(seconds[1:])) if len(seconds) > 1 else None,
      "load_seconds": load_seconds,
      "setup_seconds": setup_seconds,
      "plan_bytes": model.user_plan.nbytes + model.item_plan.nbytes,
      "peak_rss_bytes": peak_rss_bytes(),
  }
  paths.write_text(os.path.join(workdir, "report.json"),
                   json.dumps(report, indent=2, default=float))
  logging.info("report: %s", json.dumps(metrics))
  return report
