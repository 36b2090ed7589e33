"""Frozen text features of the agent: memoisation and the decoder pooler against PyTorch."""

import decoder_fixtures
import numpy as np
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


def test_decoder_pooler_row_does_not_depend_on_the_texts_pooled_with_it(tmp_path):
  tmodel = decoder_fixtures.make_torch_llama()
  _, model = loading.load_llama_safetensors(decoder_fixtures.save_torch(tmodel, tmp_path))
  pooler = DecoderPooler(model, _CharTokenizer(), batch=4)
  rng = np.random.default_rng(0)
  texts = ["".join(rng.choice(list("abcdefgh "), rng.integers(1, 50))) for _ in range(12)]
  alone = np.stack([pooler([t])[0] for t in texts[:3]])
  for _ in range(3):
    others = [texts[i] for i in rng.permutation(12)[: rng.integers(3, 12)]]
    np.testing.assert_array_equal(pooler(others + texts[:3])[-3:], alone)
