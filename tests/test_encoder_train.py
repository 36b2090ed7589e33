"""E_D training job end to end on ML-100K, checked against independent recomputation.

References: PyTorch transformers' ``BertModel`` (mean pooling + l2 normalisation written out in
torch) for the sentence embeddings, the saved head's parameters read back from orbax and applied in
numpy, numpy R^2 / nearest-neighbour ranks, and ridge regression solved as an augmented least-squares
problem with ``np.linalg.lstsq`` (not the closed form the code uses).
"""

import json

import numpy as np
import pytest
import torch
import transformers

from configs import encoder_ml100k
from eagle_jax import assets, checkpoint, data
from eagle_jax.embed import encoder, encoder_train


def _gelu_tanh(x):
  return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))


def _torch_embed(texts):
  tok = transformers.AutoTokenizer.from_pretrained(str(assets.minilm_dir()))
  model = transformers.BertModel.from_pretrained(str(assets.minilm_dir())).eval()
  out = []
  for i in range(0, len(texts), 64):
    batch = tok(texts[i:i + 64], padding=True, truncation=True, max_length=256,
                return_tensors="pt")
    with torch.no_grad():
      h = model(**batch).last_hidden_state
    m = batch["attention_mask"].unsqueeze(-1).float()
    pooled = (h * m).sum(1) / m.sum(1).clamp(min=1e-9)
    out.append(torch.nn.functional.normalize(pooled, p=2, dim=1).numpy())
  return np.concatenate(out)


def _r2(y, p):
  return 1 - ((y - p) ** 2).sum() / ((y - y.mean(0)) ** 2).sum()


def _recall(pred, own, table, k):
  d = ((pred[:, None, :] - table[None]) ** 2).sum(-1)
  ranks = np.array([(d[r] < d[r, own[r]]).sum() for r in range(len(own))])
  return float(np.mean(ranks < k))


def _ridge_lstsq(x, y, x_test, reg):
  """min ||[x 1] [w; b] - y||^2 + reg ||w||^2 as one least-squares problem."""
  n, f = x.shape
  a = np.block([[x, np.ones((n, 1))], [np.sqrt(reg) * np.eye(f), np.zeros((f, 1))]])
  b = np.vstack([y, np.zeros((f, y.shape[1]))])
  coef = np.linalg.lstsq(a, b, rcond=None)[0]
  return x_test @ coef[:f] + coef[f]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  root = tmp_path_factory.mktemp("encoder")
  desc = root / "descriptions.jsonl"
  ratings = data.load_ml100k_assets()
  recs = [
      {"movie_id": int(ratings.item_ids[0]), "ok": True,
       "text": "Plot: Toys come alive when their owner leaves the room.\nReasons to like it:\n"
               "- Funny and warm."},
      {"movie_id": int(ratings.item_ids[49]), "ok": True,
       "text": "Plot: A farm boy joins a rebellion against a galactic empire."},
      {"movie_id": int(ratings.item_ids[1]), "ok": False, "text": None},  # skipped
  ]
  desc.write_text("".join(json.dumps(r) + "\n" for r in recs))
  config = encoder_ml100k.get_config("rating")
  config.descriptions = str(desc)
  config.wals.wals.sweeps = 3
  config.head.steps = 300
  config.head.hidden = 64
  workdir = root / "run"
  report = encoder_train.run(config, str(workdir))
  return config, workdir, report, ratings


@pytest.mark.slow
def test_report_fields_and_sane_values(trained):
  config, workdir, report, ratings = trained
  assert report["data"]["rows"] == ratings.num_items + 2
  assert report["data"]["description_rows"] == 2
  assert report["data"]["heldout_items"] == round(0.2 * ratings.num_items)
  assert report["target"] == "augmented" and report["target_dim"] == config.wals.wals.rank + 3
  m = report["metrics"]
  for name in ("head", "genre_ridge", "minilm_ridge"):
    assert -1.0 < m["metadata"][name]["r2"] < 1.0
    assert 0.0 <= m["metadata"][name]["recall@10"] <= 1.0
  assert m["heldout_r2"] == m["metadata"]["head"]["r2"]
  assert m["beats_genre_baseline"] == (m["heldout_r2"] > m["genre_baseline_r2"])
  # Fitted on these movies: the head must do better on them than on held-out ones.
  assert m["train_metadata"]["head"]["r2"] > m["heldout_r2"]
  assert report["losses"][-1] < report["losses"][0]
  on_disk = json.loads((workdir / "report.json").read_text())
  assert on_disk["metrics"]["heldout_r2"] == pytest.approx(m["heldout_r2"])


@pytest.mark.slow
def test_heldout_metrics_recomputed_independently_from_saved_head(trained):
  config, workdir, report, ratings = trained
  split = np.load(workdir / "split.npz", allow_pickle=False)
  texts = [json.loads(x) for x in (workdir / "texts.jsonl").read_text().splitlines()]
  # Held-out items: the documented rule, recomputed.
  perm = np.random.default_rng(config.split_seed).permutation(ratings.num_items)
  held_item = np.zeros(ratings.num_items, bool)
  held_item[perm[:round(0.2 * ratings.num_items)]] = True
  np.testing.assert_array_equal(split["heldout_item"], held_item)
  # Rows: metadata text of every movie in item order, then the two descriptions.
  assert texts[0] == f"{ratings.titles[0]}. Genres: {', '.join(ratings.genres[0])}."
  assert texts[-1].startswith(texts[49] + "\nPlot: A farm boy")
  # Targets: augmented WALS item vectors [y_i, 1, c_i, 1] from the npz.
  z = np.load(workdir / "wals" / "embeddings.npz", allow_pickle=False)
  assert z["item_ids"].tolist() == ratings.item_ids.tolist()
  ones = np.ones((ratings.num_items, 1))
  table = np.concatenate([z["item_factors"], ones, z["item_bias"][:, None], ones], 1)
  # Saved head, read back raw from orbax and applied in numpy to PyTorch embeddings.
  with checkpoint.Checkpointer(workdir / "checkpoints") as ckpt:
    step, state, meta = ckpt.restore()
  assert step == config.head.steps and meta["target"] == "augmented"
  p = state["head"]
  rows = np.flatnonzero(split["heldout_row"] & (split["kind"] == "metadata"))
  x = _torch_embed([texts[r] for r in rows])
  h = _gelu_tanh(x @ np.asarray(p["hidden"]["kernel"]) + np.asarray(p["hidden"]["bias"]))
  pred = (h @ np.asarray(p["out"]["kernel"]) + np.asarray(p["out"]["bias"]))
  pred = pred * float(state["y_scale"]) + np.asarray(state["y_mean"])
  items = split["item_of_row"][rows]
  y = table[items]
  m = report["metrics"]["metadata"]
  assert _r2(y, pred) == pytest.approx(m["head"]["r2"], abs=2e-4)
  assert _recall(pred, items, table, 10) == pytest.approx(m["head"]["recall@10"], abs=0.01)
  # The genre-only baseline, fitted on the training movies by least squares.
  vocab = sorted({g for gs in ratings.genres for g in gs})
  gx = np.zeros((ratings.num_items, len(vocab)))
  for i, gs in enumerate(ratings.genres):
    for g in gs:
      gx[i, vocab.index(g)] = 1
  gpred = _ridge_lstsq(gx[~held_item], table[~held_item], gx[items], config.ridge_reg)
  assert _r2(y, gpred) == pytest.approx(m["genre_ridge"]["r2"], abs=1e-4)
  assert gx.sum() == sum(len(g) for g in ratings.genres)
  # load_head gives the same predictions through the library path.
  predict, _ = encoder_train.load_head(str(workdir / "checkpoints"))
  np.testing.assert_allclose(predict(x), pred, atol=1e-4)
  assert encoder.r2_score(y, predict(x)) == pytest.approx(_r2(y, pred), abs=1e-4)


def test_bad_config_values_are_named(tmp_path):
  with pytest.raises(ValueError, match="heldout_fraction"):
    encoder_train.heldout_mask(10, 1.5, 0)
  np.savez(tmp_path / "e.npz", item_ids=np.array([1, 2]), item_factors=np.ones((2, 3)))
  with pytest.raises(ValueError, match="item_bias"):
    encoder_train.load_targets(str(tmp_path / "e.npz"), np.array([1, 2]), "augmented")
  with pytest.raises(ValueError, match="config.target"):
    encoder_train.load_targets(str(tmp_path / "e.npz"), np.array([1, 2]), "both")


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory):
  config = encoder_ml100k.get_config()  # "implicit": fine-tuned MiniLM onto implicit WALS vectors
  config.wals.wals.sweeps = 3
  config.finetune.epochs = 1
  workdir = tmp_path_factory.mktemp("encoder_ft") / "run"
  report = encoder_train.run(config, str(workdir))
  return config, workdir, report, data.load_ml100k_assets()


@pytest.mark.slow
def test_finetuned_encoder_restores_its_best_validation_epoch(finetuned):
  config, workdir, report, ratings = finetuned
  split = np.load(workdir / "split.npz", allow_pickle=False)
  held, val = split["heldout_item"], split["validation_item"]
  # Validation movies: the documented rule (10% of the non-held-out movies), recomputed.
  others = np.flatnonzero(~held)
  expected = np.zeros(ratings.num_items, bool)
  expected[np.random.default_rng(config.split_seed + 1).permutation(others)[
      :round(config.finetune.validation_fraction * len(others))]] = True
  np.testing.assert_array_equal(val, expected)
  assert report["kind"] == "finetuned" and report["validation_items"] == expected.sum()
  texts = [json.loads(x) for x in (workdir / "texts.jsonl").read_text().splitlines()]
  z = np.load(workdir / "wals" / "embeddings.npz", allow_pickle=False)
  ones = np.ones((ratings.num_items, 1))
  table = np.concatenate([z["item_factors"], ones, z["item_bias"][:, None], ones], 1)
  item_of_row = split["item_of_row"]
  fit_rows = np.flatnonzero(~held[item_of_row] & ~val[item_of_row])
  val_rows = np.flatnonzero(val[item_of_row])
  y = table[item_of_row]
  # Epoch 0 is the warm start: ridge on frozen embeddings (PyTorch, lstsq) scores the same R^2.
  x = _torch_embed(texts)
  ridge = _ridge_lstsq(x[fit_rows], y[fit_rows], x[val_rows], config.finetune.ridge_reg)
  history = report["losses"]
  assert [h["epoch"] for h in history] == [0, 1]
  assert _r2(y[val_rows], ridge) == pytest.approx(history[0]["val_r2"], abs=2e-3)
  # The restored E_D is the best validation epoch, and scores the reported held-out R^2.
  ed, meta = encoder_train.load_encoder(str(workdir / "checkpoints"))
  assert meta["kind"] == "finetuned"
  pred_val = ed([texts[r] for r in val_rows])
  best = max(history, key=lambda h: h["val_r2"])
  assert _r2(y[val_rows], pred_val) == pytest.approx(best["val_r2"], abs=1e-3)
  if best["epoch"] > 0:  # the encoder itself changed, not just the head
    assert np.abs(pred_val - ridge).max() > 1e-2
  rows = np.flatnonzero(split["heldout_row"] & (split["kind"] == "metadata"))
  pred = ed([texts[r] for r in rows])
  assert _r2(y[rows], pred) == pytest.approx(report["metrics"]["heldout_r2"], abs=1e-4)
  # A frozen-head loader refuses it by name.
  with pytest.raises(ValueError, match="fine-tuned"):
    encoder_train.load_head(str(workdir / "checkpoints"))


@pytest.mark.slow
def test_embedding_under_a_progress_bar_equals_one_encode_call():
  from eagle_jax.models.text_encoder import SentenceEncoder

  sent = SentenceEncoder.from_pretrained()
  rng = np.random.default_rng(3)
  words = "a dark quiet comedy about love war space robots family city night sea".split()
  texts = [" ".join(rng.choice(words, size=int(n))) for n in rng.integers(1, 60, size=150)]
  # Chunks of two device calls: the bar's chunks cut the same calls as one encode over all texts.
  chunked = encoder_train.encode_with_progress(sent, texts, "test", chunk_calls=2)
  np.testing.assert_array_equal(chunked, sent.encode(texts))
  np.testing.assert_allclose(chunked, _torch_embed(texts), atol=2e-5, rtol=0)
