"""Frozen text features of the agent: memoisation and the decoder pooler against PyTorch."""

import decoder_fixtures
import numpy as np
import pytest
import torch

from eagle_jax.agent.features import DecoderPooler, TextFeatures
from eagle_jax.models import loading


class _CharTokenizer:
  def encode(self, text):
    return [1 + (ord(c) % 90) for c in text]


def test_decoder_pooler_equals_pytorch_mean_pooled_hidden_states(tmp_path):
  tmodel = decoder_fixtures.make_torch_llama()
  _, model = loading.load_llama_safetensors(decoder_fixtures.save_torch(tmodel, tmp_path))
  texts = ["a short one", "a noticeably longer text with many more characters in it", "mid size",
           "x" * 40, "y"]
  pooler = DecoderPooler(model, _CharTokenizer(), batch=2)  # 3 calls, mixed lengths, padded rows
  got = pooler(texts)
  for text, row in zip(texts, got):
    ids = torch.tensor([_CharTokenizer().encode(text)])
    with torch.no_grad():
      hidden = tmodel.model(input_ids=ids).last_hidden_state[0].numpy()
    np.testing.assert_allclose(row, hidden.mean(0), rtol=1e-4, atol=1e-4)


def test_text_features_encode_each_text_once():
  calls = []

  def encode(texts):
    calls.append(list(texts))
    return np.array([[len(t), t.count("a")] for t in texts], np.float32)

  f = TextFeatures(encode, 2)
  out = f(["aa", "b", "aa"])
  np.testing.assert_array_equal(out, [[2, 2], [1, 0], [2, 2]])
  np.testing.assert_array_equal(f(["b", "ccc"]), [[1, 0], [3, 0]])
  assert calls == [["aa", "b"], ["ccc"]] and f.encoded == 3 and len(f) == 3


def test_text_features_saved_rows_are_read_back_bit_exactly_without_encoding(tmp_path):
  rng = np.random.default_rng(0)
  table = {t: rng.normal(size=3).astype(np.float32) for t in ["a", "bb", "ünïcode ☃", ""]}
  first = TextFeatures(lambda ts: np.stack([table[t] for t in ts]), 3)
  first(list(table))
  path = tmp_path / "f.npz"
  first.save(path, ["bb", "ünïcode ☃", ""])

  def refuse(texts):
    raise AssertionError(f"encoded {texts}")

  second = TextFeatures(refuse, 3)
  assert second.load(path) == 3
  got = second(["", "ünïcode ☃", "bb"])
  np.testing.assert_array_equal(got, np.stack([table[""], table["ünïcode ☃"], table["bb"]]))
  assert "a" not in second and second.encoded == 0


def test_text_features_load_names_the_file_on_bad_input(tmp_path):
  f = TextFeatures(lambda ts: np.zeros((len(ts), 2), np.float32), 2)
  wrong_width = tmp_path / "w.npz"
  np.savez(wrong_width, texts=np.array(["a"]), rows=np.zeros((1, 3), np.float32))
  nonfinite = tmp_path / "n.npz"
  np.savez(nonfinite, texts=np.array(["a"]), rows=np.array([[0.0, np.nan]], np.float32))
  pickled = tmp_path / "p.npz"
  np.savez(pickled, texts=np.array([{"x": 1}], dtype=object), rows=np.zeros((1, 2)))
  garbage = tmp_path / "g.npz"
  garbage.write_bytes(b"not a zip")
  for path, words in [(wrong_width, "expected (1, 2)"), (nonfinite, "non-finite"),
                      (pickled, "not a saved feature file"), (garbage, "not a saved feature file")]:
    with pytest.raises(ValueError, match=str(path.name)) as e:
      f.load(path)
    assert words in str(e.value)
  assert len(f) == 0
