"""Training job of the encoder E_D (text -> Z): MiniLM or a decoder + a head onto WALS item vectors.

``run(config, workdir)`` is what ``python -m launch.train_encoder`` calls.

Target. E_D must map a description into the space where EAGLE's utility and the user vectors live,
so the regression target of movie ``i`` is its **augmented** WALS item vector
``z_i = [y_i, 1, c_i, 1]`` (``WALSFactors.augmented``, [I, k+3]; ``<z_u, z_i>`` is the predicted
rating): the factors and the item bias both matter for a user's utility. The two constant columns
have zero variance; they add nothing to the pooled R^2 (nor to nearest-neighbour distances) and
the head learns them trivially. ``config.target = "factors"`` uses the raw ``y_i`` [I, k] instead.

Training rows. The environment LLM describes only a small subset of movies on a CPU (24 by
default), far too few rows to fit a 384 -> d head. So E_D is trained on a **metadata text for all
movies** ("Title (year). Genres: A, B, C." plus tags when the data has them) **plus the LLM
description** for every described movie (``config.description_rows``: the metadata line followed
by ``Description.render()``; or the rendered description alone, or the plot alone, as a world's
states show them to E_D): one or two rows per movie, all with the movie's vector as target.

Model. ``config.finetune.epochs > 0`` (the default): a fresh MiniLM and a linear head, warm-started
at the ridge solution on the frozen embeddings, are fine-tuned end to end (``encoder.finetune``);
after every epoch the pooled R^2 on the *validation* movies (``validation_fraction`` of the
non-held-out movies, seed ``split_seed + 1``) is measured and the best epoch is kept (epoch 0 = the
ridge warm start), so no choice ever reads the held-out movies. ``epochs = 0``: the frozen MiniLM
embedding and an MLP head (``encoder.fit_head``). ``config.backbone = "decoder"`` (the accelerator
configs' E_D) replaces MiniLM by a Llama-family decoder, mean-pooled, with a linear head, LoRA or
full fine-tuning (``decoder_encoder``, ``config.decoder``), trained on the same rows, targets and
split with the same ridge warm start and validation-epoch choice (the validation movies of
``finetune.validation_fraction``); the MiniLM embedding then serves the baseline only.

Split. A deterministic ``heldout_fraction`` (default 20%) of movies (a permutation seeded by
``config.split_seed``) is held out with all its rows; E_D and both baselines are fitted on the
other movies only. Reported for the held-out movies:

* R^2 (pooled over dimensions, ``encoder.r2_score``) and nearest-neighbour recall@k among all
  items' vectors (``encoder.nn_recall_at_k``), on the metadata rows (every held-out movie) and on
  the description rows (held-out described movies, if any);
* the same for the genre-only ridge baseline (multi-hot genres -> vector, ``ridge_fit_predict``)
  and a MiniLM ridge baseline (the frozen embedding -> vector, linear), which isolates what the MLP
  head adds.

Targets are standardised for training by a per-column mean and one global scale (the root mean
square of the centred targets), so the pooled loss keeps the variance weighting of the pooled R^2;
predictions are mapped back. The parameters (the head, or the whole fine-tuned regressor, MiniLM
included; for the decoder its adapters and head, or every weight with full fine-tuning), the mean
and the scale are saved with orbax (``eagle_jax.checkpoint``) under
``workdir/checkpoints/<steps or epochs>``, with ``kind`` ("head", "finetuned" or "decoder") in the
metadata; ``load_encoder`` restores any of them as ``texts -> [N, d]`` (a LoRA decoder's base is
reloaded from its source). ``report.json`` holds the metrics and, for
fine-tuning, the per-epoch validation R^2.

Progress. Embedding the rows with MiniLM (and, after fine-tuning, with the tuned MiniLM) and the
training loops show ``training.Progress`` bars with an ETA; ``encode_with_progress`` feeds the
encoder the same device calls as one ``encode`` over all rows, so the bars change no result.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import nnx

from eagle_jax import assets, checkpoint, checks, paths, training
from eagle_jax.data import records
from eagle_jax.embed import decoder_encoder, encoder, wals_train


def metadata_text(title: str, genres: Sequence[str], tags: Sequence[str] = ()) -> str:
  """"Title (year). Genres: A, B." (+ " Tags: ..." when there are tags)."""
  text = f"{title}. Genres: {', '.join(genres) if genres else 'unknown'}."
  if tags:
    text += f" Tags: {', '.join(tags[:8])}."
  return text


TARGETS = ("augmented", "factors")
DESCRIPTION_ROWS = ("with_metadata", "text", "plot")
BACKBONES = ("minilm", "decoder")
FINETUNE_PRECISIONS = ("float32", "mixed")  # MiniLM's dense products while fine-tuning


def description_paths(config) -> list[str]:
  """The non-empty description files of ``config.descriptions`` (one path or a list)."""
  paths = config.descriptions
  return [p for p in ([paths] if isinstance(paths, str) else list(paths)) if p]


def check_config(config, field: str = "config", inputs: bool = True) -> None:
  """Validates an E_D job config (``configs/encoder_ml100k.py``; ``config.encoder`` of an EAGLE
  run) at the job's entry (``inputs``: input paths too); ConfigError naming ``<field>.<name>``."""
  checks.check_choice(config, "target", TARGETS, field)
  if config.get("description_rows", "with_metadata") not in DESCRIPTION_ROWS:
    raise checks.ConfigError(f"{field}.description_rows: expected one of {DESCRIPTION_ROWS}, got "
                             f"{config.description_rows!r}")
  if _backbone(config, field) == "decoder":
    dec = decoder_encoder.DecoderEncoderConfig.from_config(config.decoder, f"{field}.decoder")
    if inputs and dec.shapes and not dec.source:
      raise checks.ConfigError(f"{field}.decoder.source: a run needs the weights of the "
                               f"{dec.shapes!r} decoder its shapes name (a safetensors folder)")
    if inputs and os.path.isdir(dec.source):
      checks.check_input_path(os.path.join(dec.source, "config.json"), f"{field}.decoder.source")
    elif inputs and dec.source and not assets.is_gguf_asset(dec.source):
      checks.check_input_path(dec.source, f"{field}.decoder.source")
  checks.check_numbers(config, [
      ("heldout_fraction", dict(lo=0.0, hi=1.0, lo_open=True, hi_open=True)),
      ("split_seed", dict(integer=True, lo=0)),
      ("recall_k", dict(integer=True, lo=1)),
      ("ridge_reg", dict(lo=0.0)),
      ("head.hidden", dict(integer=True, lo=1)),
      ("head.dropout", dict(lo=0.0, hi=1.0, hi_open=True)),
      ("head.learning_rate", dict(lo=0.0, lo_open=True)),
      ("head.weight_decay", dict(lo=0.0)),
      ("head.steps", dict(integer=True, lo=1)),
      ("head.batch_size", dict(integer=True, lo=1)),
      ("head.seed", dict(integer=True, lo=0)),
      ("finetune.epochs", dict(integer=True, lo=0)),
      ("finetune.validation_fraction", dict(lo=0.0, hi=1.0, lo_open=True, hi_open=True)),
      ("finetune.learning_rate", dict(lo=0.0, lo_open=True)),
      ("finetune.weight_decay", dict(lo=0.0)),
      ("finetune.batch_size", dict(integer=True, lo=1)),
      ("finetune.ridge_reg", dict(lo=0.0)),
      ("finetune.seed", dict(integer=True, lo=0)),
      ("finetune.group_by_length", dict(integer=True, lo=0)),
  ], field)
  precision = config.finetune.get("precision", "float32")
  if precision not in FINETUNE_PRECISIONS:
    raise checks.ConfigError(f"{field}.finetune.precision={precision!r}: expected one of "
                             f"{FINETUNE_PRECISIONS}")
  if precision != "float32" and _backbone(config, field) != "minilm":
    raise checks.ConfigError(f"{field}.finetune.precision={precision!r} applies to the MiniLM "
                             f"backbone; {field}.backbone is {config.backbone!r}")
  if not config.embeddings:
    wals_train.check_config(config.wals, f"{field}.wals", inputs)
  if not inputs:
    return
  if config.embeddings:
    checks.check_input_path(config.embeddings, f"{field}.embeddings")
  for path in description_paths(config):
    checks.check_input_path(path, f"{field}.descriptions")
  if config.minilm:
    checks.check_input_path(config.minilm, f"{field}.minilm", kind="dir")


def _backbone(config, field: str = "config") -> str:
  """``config.backbone`` ("minilm" when absent, as in configs written before the field)."""
  backbone = config.get("backbone", "minilm")
  if backbone not in BACKBONES:
    raise checks.ConfigError(f"{field}.backbone={backbone!r}: expected one of {BACKBONES}")
  return backbone


def load_targets(path: str, item_ids: np.ndarray, target: str) -> np.ndarray:
  """Item vectors [I, d] from a WALS ``embeddings.npz``, in the order of ``item_ids``.

  Args:
    path: ``embeddings.npz`` written by ``wals_train`` (read with ``allow_pickle=False``).
    item_ids: [I] raw item ids of the ratings data.
    target: "augmented" ([y_i, 1, c_i, 1]) or "factors" (y_i).
  """
  if target not in TARGETS:
    raise ValueError(f"config.target: expected one of {TARGETS}, got {target!r}")
  return wals_train.load_npz(path, item_ids=item_ids)[
      "item_augmented" if target == "augmented" else "item_factors"]


def _subset_mask(size: int, candidates: np.ndarray, n: int, seed: int) -> np.ndarray:
  """[size] bool: the first ``n`` of ``candidates`` in a random permutation seeded by ``seed``."""
  mask = np.zeros(size, bool)
  mask[np.random.default_rng(seed).permutation(candidates)[:n]] = True
  return mask


def heldout_mask(num_items: int, fraction: float, seed: int) -> np.ndarray:
  """[I] bool: a deterministic ``fraction`` of items (random permutation with ``seed``)."""
  if not 0.0 < fraction < 1.0:
    raise ValueError(f"config.heldout_fraction: expected in (0, 1), got {fraction}")
  return _subset_mask(num_items, np.arange(num_items), int(round(fraction * num_items)), seed)


def _metrics(pred: np.ndarray, y: np.ndarray, index: np.ndarray, table: np.ndarray,
             k: int) -> dict[str, float]:
  if len(index) == 0:
    return {"r2": None, f"recall@{k}": None, "rows": 0}
  # R^2 needs two rows (one row has no variance to explain).
  return {"r2": encoder.r2_score(y, pred) if len(index) > 1 else None,
          f"recall@{k}": encoder.nn_recall_at_k(pred, index, table, k), "rows": int(len(index))}


def validation_mask(heldout: np.ndarray, fraction: float, seed: int) -> np.ndarray:
  """[I] bool: a deterministic ``fraction`` of the *non-held-out* items, for choosing epochs."""
  if not 0.0 < fraction < 1.0:
    raise ValueError(f"config.finetune.validation_fraction: expected in (0, 1), got {fraction}")
  candidates = np.flatnonzero(~heldout)
  n = max(1, int(round(fraction * len(candidates))))
  return _subset_mask(heldout.shape[0], candidates, n, seed)


def _sentence_encoder(minilm: str, precision: str = "float32"):
  """MiniLM (``minilm`` or the asset) whose dense products run in ``precision``: "float32", or
  "mixed" (bf16 operands summed in float32, forward and backward; ``models/mixed_matmul.py``)."""
  from eagle_jax.models.text_encoder import SentenceEncoder  # noqa: PLC0415 (heavy import)

  return SentenceEncoder.from_pretrained(
      minilm or None, matmul_dtype=jnp.bfloat16 if precision == "mixed" else None)


def encode_with_progress(sent, texts: Sequence[str], desc: str, chunk_calls: int = 16
                         ) -> np.ndarray:
  """``sent.encode(texts)`` ([N] texts -> [N, e] float32) under a ``training.Progress`` bar.

  A text's embedding does not depend on the texts it is encoded with (``SentenceEncoder``), so
  the texts are handed over in chunks of ``chunk_calls`` device calls, sorted by token count so
  that each chunk's calls are full, and the bar advances between chunks.
  """
  texts = list(texts)
  if not texts:
    return sent.encode(texts)
  lengths = np.array([len(e.ids) for e in sent.tokenizer.encode_batch_fast(texts)])
  order = np.argsort(-lengths, kind="stable")
  step = sent.batch_size if sent.micro_batch is None else min(sent.batch_size, sent.micro_batch)
  chunk = step * max(1, chunk_calls)
  out = np.zeros((len(texts), sent.dim), np.float32)
  progress = training.Progress(len(texts), desc=desc)
  try:
    for start in range(0, len(texts), chunk):
      idx = order[start:start + chunk]
      out[idx] = sent.encode([texts[i] for i in idx])
      progress.update(len(idx))
  finally:
    progress.close()
  return out


def _finetune(config, texts, x, y_std, fit_rows, val_rows, cfg: encoder.FinetuneConfig):
  """Fine-tunes a fresh MiniLM + linear head; returns ``(predict_texts, state, history)``."""
  sent = _sentence_encoder(config.minilm, cfg.precision)  # its own copy: the caller's stays frozen
  w, b = encoder.ridge_weights(x[fit_rows], y_std[fit_rows], cfg.ridge_reg)
  model = encoder.TextRegressor(sent.model, w, b)
  best, history = encoder.finetune(model, sent.tokenize, texts, y_std, np.flatnonzero(fit_rows),
                                   np.flatnonzero(val_rows), cfg)
  params = nnx.state(model, nnx.Param)
  nnx.replace_by_pure_dict(params, best)
  nnx.update(model, params)
  logging.info("E_D fine-tuning: %s", history)
  return _text_predictor(model, sent), {"regressor": best}, history


def _text_predictor(model: encoder.TextRegressor, sent) -> Callable[..., np.ndarray]:
  """``texts -> [N, d]`` (standardised) of a fine-tuned regressor.

  The embedding runs through a ``SentenceEncoder`` over the tuned MiniLM, whose calls (one length
  bucket each, a fixed row count) make a text's row independent of which other texts share its
  call; the linear head is applied in float64 in calls of fixed shape (``encoder.fixed_rows``). So
  E_D of a text does not depend on how a run happened to group its requests (a resumed run equals
  an uninterrupted one). ``predict(texts, progress="name")`` shows a progress bar
  (``encode_with_progress``)."""
  from eagle_jax.models.text_encoder import SentenceEncoder  # noqa: PLC0415 (heavy import)

  tuned = SentenceEncoder(model.bert, sent.tokenizer, max_length=sent.max_length,
                          batch_size=sent.batch_size, length_buckets=sent.length_buckets)
  w = np.asarray(model.w[...], np.float64)
  b = np.asarray(model.b[...], np.float64)

  def predict(texts: Sequence[str], progress: str | None = None) -> np.ndarray:
    x = (tuned.encode(list(texts)) if progress is None
         else encode_with_progress(tuned, texts, progress))
    return encoder.fixed_rows(lambda v: v @ w + b, x.astype(np.float64)).astype(np.float32)

  return predict


def save_encoder(directory: str, step: int, state: Mapping[str, Any], y_mean: np.ndarray,
                 y_scale: float, metadata: Mapping[str, Any]) -> None:
  """Saves E_D as ``step`` (training steps or epochs): ``state`` (``{"head": ...}`` or
  ``{"regressor": ...}``), the target mean and scale."""
  state = {**state, "y_mean": np.asarray(y_mean, np.float32),
           "y_scale": np.asarray(y_scale, np.float32)}
  with checkpoint.Checkpointer(directory, max_to_keep=1) as ckpt:
    ckpt.save(step, state, dict(metadata), force=True)


def _metadata(ckpt: checkpoint.Checkpointer) -> dict[str, Any]:
  if ckpt.latest_step() is None:
    raise ValueError(f"{ckpt.directory!r} holds no E_D checkpoint")
  return ckpt.metadata()


def load_head(directory: str) -> tuple[Callable[[np.ndarray], np.ndarray], dict[str, Any]]:
  """Restores a frozen-encoder E_D's head: ``(predict, metadata)``, ``predict: [N, e] -> [N, d]``.

  Raises ``ValueError`` for a fine-tuned E_D (its encoder changed: use ``load_encoder``).
  """
  with checkpoint.Checkpointer(directory, max_to_keep=1) as ckpt:
    meta = _metadata(ckpt)
    if meta.get("kind", "head") != "head":
      raise ValueError(f"E_D in {directory!r} is {meta['kind']!r}: its MiniLM is fine-tuned, so "
                       "it maps texts, not frozen features (use encoder_train.load_encoder)")
    _, state, _ = ckpt.restore()
  return _head_predictor(state, meta), meta


def _head_predictor(state: Mapping[str, Any], meta: Mapping[str, Any]
                    ) -> Callable[[np.ndarray], np.ndarray]:
  """``[N, e] -> [N, d]`` of a restored frozen-encoder E_D (``state["head"]``, mean, scale)."""
  h = meta["head_config"]
  head = encoder.RegressionHead(int(meta["in_dim"]), int(meta["out_dim"]), int(h["hidden"]),
                                dropout=float(h["dropout"]), rngs=nnx.Rngs(0))
  state_params = nnx.state(head, nnx.Param)
  nnx.replace_by_pure_dict(state_params, jax.tree.map(np.asarray, state["head"]))
  nnx.update(head, state_params)
  head.eval()
  mean, scale = np.asarray(state["y_mean"]), float(np.asarray(state["y_scale"]))

  def predict(x: np.ndarray) -> np.ndarray:
    return encoder.predict(head, np.asarray(x, np.float32)) * scale + mean

  return predict


def load_encoder(directory: str, *, frozen_encode: Callable[[Sequence[str]], np.ndarray] | None
                 = None, minilm: str | None = None
                 ) -> tuple[Callable[[Sequence[str]], np.ndarray], dict[str, Any]]:
  """Restores E_D as ``texts -> [N, d]`` (any kind), with its metadata.

  Args:
    directory: the ``checkpoints`` folder of an E_D run.
    frozen_encode: the frozen MiniLM ``texts -> [N, e]`` to reuse for a frozen-encoder E_D (e.g. a
      memo shared with the policy); default: load MiniLM.
    minilm: MiniLM folder for a fine-tuned E_D's architecture and tokenizer (default: the one it
      was trained from). A decoder E_D reads neither: its base comes from its saved source.
  """
  with checkpoint.Checkpointer(directory, max_to_keep=1) as ckpt:
    meta = _metadata(ckpt)
    if meta.get("kind", "head") == "head":
      predict = _head_predictor(ckpt.restore()[1], meta)
      encode = frozen_encode or _sentence_encoder(meta.get("minilm", "")).encode
      return (lambda ts: predict(np.asarray(encode(list(ts)), np.float32))), meta
    if meta["kind"] == "decoder":
      predict, state = decoder_encoder.restore(ckpt, meta)
      mean, scale = np.asarray(state["y_mean"]), float(np.asarray(state["y_scale"]))
      return (lambda texts: predict(texts) * scale + mean), meta
    sent = _sentence_encoder(meta.get("minilm", "") if minilm is None else minilm,
                             meta["head_config"].get("precision", "float32"))
    model = encoder.TextRegressor(sent.model, np.zeros((int(meta["in_dim"]), int(meta["out_dim"]))),
                                  np.zeros(int(meta["out_dim"])))
    params = nnx.state(model, nnx.Param)
    target = {"regressor": jax.tree.map(np.asarray, nnx.to_pure_dict(params)),
              "y_mean": np.zeros(int(meta["out_dim"]), np.float32),
              "y_scale": np.zeros((), np.float32)}
    _, state, _ = ckpt.restore(target=target)
  nnx.replace_by_pure_dict(params, state["regressor"])
  nnx.update(model, params)
  mean, scale = np.asarray(state["y_mean"]), float(np.asarray(state["y_scale"]))
  predict = _text_predictor(model, sent)
  return (lambda texts: predict(texts) * scale + mean), meta


def run(config, workdir: str, *, encode: Callable[[Sequence[str]], np.ndarray] | None = None
        ) -> dict[str, Any]:
  """Trains E_D's head and writes ``report.json`` and the orbax checkpoint in ``workdir``.

  Args:
    config: see ``configs/encoder_ml100k.py``.
    workdir: output folder.
    encode: texts -> [N, e] sentence embeddings (default: MiniLM ``SentenceEncoder``).

  Returns:
    The report.
  """
  training.check_workdir(workdir)
  check_config(config)
  t_start = time.perf_counter()
  ratings = wals_train.load_data(config.wals.data)
  emb_path = config.embeddings
  if not emb_path:
    emb_path = os.path.join(workdir, "wals", "embeddings.npz")
    if not paths.exists(emb_path):
      logging.info("no embeddings given: training WALS into %s", os.path.dirname(emb_path))
      wals_train.run(config.wals, os.path.dirname(emb_path))
  y_items = load_targets(emb_path, np.asarray(ratings.item_ids), config.target)
  num_items = ratings.num_items

  # Rows: metadata text for every movie, plus the LLM description where there is one.
  texts, item_of_row, kind = [], [], []
  for i in range(num_items):
    texts.append(metadata_text(ratings.titles[i], ratings.genres[i], ratings.tags[i]))
    item_of_row.append(i)
    kind.append("metadata")
  index_of_id = {int(m): i for i, m in enumerate(ratings.item_ids)}
  described, rows_as = 0, config.get("description_rows", "with_metadata")
  for path in description_paths(config):
    for rec in records.read_jsonl(path, key="movie_id"):
      if not rec.get("ok") or int(rec["movie_id"]) not in index_of_id:
        continue
      i = index_of_id[int(rec["movie_id"])]
      texts.append(texts[i] + "\n" + rec["text"] if rows_as == "with_metadata" else
                   rec[rows_as])  # "text" or "plot"
      item_of_row.append(i)
      kind.append("description")
      described += 1
  item_of_row = np.asarray(item_of_row)
  kind = np.asarray(kind)
  logging.info("%d rows: %d metadata, %d descriptions", len(texts), num_items, described)

  t0 = time.perf_counter()
  if encode is None:
    x = encode_with_progress(_sentence_encoder(config.minilm), texts, "E_D embed rows")
  else:
    x = np.asarray(encode(texts), np.float32)
  encode_seconds = time.perf_counter() - t0

  held_item = heldout_mask(num_items, config.heldout_fraction, config.split_seed)
  held = held_item[item_of_row]
  y = y_items[item_of_row]
  y_mean = y[~held].mean(0)
  y_scale = float(np.sqrt(np.mean((y[~held] - y_mean) ** 2))) or 1.0
  y_std = ((y - y_mean) / y_scale).astype(np.float32)
  ft_cfg = encoder.FinetuneConfig(**dict(config.finetune))
  ckpt_dir = os.path.join(workdir, "checkpoints")
  meta = {"in_dim": int(x.shape[1]), "out_dim": int(y.shape[1]), "target": config.target,
          "embeddings": emb_path, "config": config.to_dict(), "minilm": config.minilm}
  t0 = time.perf_counter()
  if _backbone(config) == "decoder":
    dec_cfg = decoder_encoder.DecoderEncoderConfig.from_config(config.decoder)
    val_item = validation_mask(held_item, ft_cfg.validation_fraction, config.split_seed + 1)
    val = val_item[item_of_row]
    predict_texts, state, losses = decoder_encoder.finetune(
        dec_cfg, texts, y_std, np.flatnonzero(~held & ~val), np.flatnonzero(val))
    pred = predict_texts(texts) * y_scale + y_mean
    meta.update(kind="decoder", decoder=dataclasses.asdict(dec_cfg),
                validation_items=int(val_item.sum()))
    save_step = dec_cfg.epochs
  elif ft_cfg.epochs > 0:
    val_item = validation_mask(held_item, ft_cfg.validation_fraction, config.split_seed + 1)
    val = val_item[item_of_row]
    predict_texts, state, history = _finetune(config, texts, x, y_std, ~held & ~val, val, ft_cfg)
    pred = predict_texts(texts, progress="E_D predict rows") * y_scale + y_mean
    losses = history
    meta.update(kind="finetuned", head_config=dict(config.finetune),
                validation_items=int(val_item.sum()))
    save_step = ft_cfg.epochs
  else:
    val_item = np.zeros(num_items, bool)
    head_cfg = encoder.HeadConfig(**dict(config.head))
    head, losses = encoder.fit_head(x[~held], y_std[~held], head_cfg)
    pred = encoder.predict(head, x) * y_scale + y_mean
    state = {"head": nnx.to_pure_dict(nnx.state(head, nnx.Param))}
    meta.update(kind="head", head_config=dict(config.head))
    save_step = config.head.steps
  train_seconds = time.perf_counter() - t0
  save_encoder(ckpt_dir, save_step, state, y_mean, y_scale, meta)

  k = config.recall_k
  genre_x, _ = encoder.genre_features(ratings.genres)
  genre_pred = encoder.ridge_fit_predict(genre_x[~held_item], y_items[~held_item], genre_x,
                                         config.ridge_reg)
  text_pred = encoder.ridge_fit_predict(x[~held], y[~held], x, config.ridge_reg)
  metrics: dict[str, Any] = {}
  for name, rows in (("metadata", held & (kind == "metadata")),
                     ("description", held & (kind == "description")),
                     ("train_metadata", ~held & (kind == "metadata"))):
    r = np.flatnonzero(rows)
    items = item_of_row[r]
    metrics[name] = {
        "head": _metrics(pred[r], y[r], items, y_items, k),
        "minilm_ridge": _metrics(text_pred[r], y[r], items, y_items, k),
        "genre_ridge": _metrics(genre_pred[items], y[r], items, y_items, k)}
  metrics["heldout_r2"] = metrics["metadata"]["head"]["r2"]
  metrics["genre_baseline_r2"] = metrics["metadata"]["genre_ridge"]["r2"]
  metrics["beats_genre_baseline"] = bool(metrics["heldout_r2"] > metrics["genre_baseline_r2"])

  with paths.open_file(os.path.join(workdir, "split.npz"), "wb") as f:
    np.savez(f, item_of_row=item_of_row, heldout_row=held, kind=kind, heldout_item=held_item,
             validation_item=val_item)
  paths.write_text(os.path.join(workdir, "texts.jsonl"),
                   "".join(json.dumps(t, ensure_ascii=False) + "\n" for t in texts))
  report = {
      "data": {"source": ratings.source, "num_items": num_items, "rows": len(texts),
               "description_rows": described, "heldout_items": int(held_item.sum()),
               "heldout_fraction": config.heldout_fraction},
      "target": config.target, "target_dim": int(y.shape[1]), "embeddings": emb_path,
      "kind": meta["kind"], "validation_items": int(val_item.sum()),
      "metrics": metrics, "losses": losses, "checkpoint": ckpt_dir,
      "seconds": {"encode": encode_seconds, "train": train_seconds,
                  "total": time.perf_counter() - t_start},
      "config": config.to_dict()}
  paths.write_text(os.path.join(workdir, "report.json"), json.dumps(report, indent=2))
  logging.info("E_D held-out R^2 %.4f (genre ridge %.4f)", metrics["heldout_r2"],
               metrics["genre_baseline_r2"])
  return report

