"""BERT encoder, safetensors loader and sentence encoder against PyTorch transformers' BertModel.

References are independent of eagle_jax: transformers' PyTorch ``BertModel`` (same weights) for
hidden states, sentence-transformers' pooling written out by hand in torch (masked mean,
``F.normalize``) for sentence embeddings, and ``transformers.AutoTokenizer`` for token ids.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from safetensors.numpy import load_file, save_file

from eagle_jax import assets, parallel
from eagle_jax.models import bert, text_encoder

SMALL = dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
             intermediate_size=37, max_position_embeddings=40, type_vocab_size=3)

TEXTS = [
    "A lone astronaut is stranded on a failing space station and must pilot a damaged capsule "
    "back to Earth before her oxygen runs out.",
    "In the far future, a starship crew travels through a wormhole to find a habitable planet "
    "while an alien intelligence watches them.",
    "Mash three ripe bananas, stir in melted butter, sugar, an egg and flour, then bake the "
    "loaf at 175 degrees for an hour.",
    "Short one.",
    "",
]


def _torch_sentence_embedding(hidden: torch.Tensor, mask: torch.Tensor) -> np.ndarray:
  """sentence-transformers' Pooling(mean) + Normalize, written out in torch."""
  m = mask.unsqueeze(-1).float()
  pooled = (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)
  return torch.nn.functional.normalize(pooled, p=2, dim=1).numpy()


@pytest.fixture(scope="module")
def small_checkpoint(tmp_path_factory):
  """A random BertModel saved by transformers as safetensors, and the torch model."""
  torch.manual_seed(0)
  cfg = transformers.BertConfig(**SMALL)
  model = transformers.BertModel(cfg).eval()
  path = tmp_path_factory.mktemp("small_bert")
  model.save_pretrained(str(path), safe_serialization=True)
  return path, model


@pytest.fixture(scope="module")
def minilm_torch():
  return transformers.BertModel.from_pretrained(str(assets.minilm_dir())).eval()


@pytest.fixture(scope="module")
def minilm_encoder():
  return text_encoder.SentenceEncoder.from_pretrained(batch_size=4)


def _small_inputs(rng, b=4, t=13):
  ids = rng.integers(0, SMALL["vocab_size"], (b, t))
  mask = np.ones((b, t), np.int64)
  mask[1, 9:] = 0
  mask[2, 2:] = 0
  types = rng.integers(0, SMALL["type_vocab_size"], (b, t))
  return ids, mask, types


def test_small_random_parity_with_torch(small_checkpoint):
  path, ref_model = small_checkpoint
  model = bert.load_bert(path)
  ids, mask, types = _small_inputs(np.random.default_rng(0))
  with torch.no_grad():
    ref = ref_model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                    token_type_ids=torch.tensor(types)).last_hidden_state
  out = model(jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(types))
  np.testing.assert_allclose(np.asarray(out), ref.numpy(), atol=1e-4, rtol=0)
  emb = model.embed(jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(types))
  np.testing.assert_allclose(np.asarray(emb), _torch_sentence_embedding(ref, torch.tensor(mask)),
                             atol=1e-5, rtol=0)


def test_tanh_gelu_parity_with_torch(tmp_path):
  torch.manual_seed(1)
  ref_model = transformers.BertModel(
      transformers.BertConfig(**SMALL, hidden_act="gelu_new")).eval()
  ref_model.save_pretrained(str(tmp_path), safe_serialization=True)
  model = bert.load_bert(tmp_path)
  ids, mask, _ = _small_inputs(np.random.default_rng(1))
  with torch.no_grad():
    ref = ref_model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask))
  out = model(jnp.asarray(ids), jnp.asarray(mask))
  np.testing.assert_allclose(np.asarray(out), ref.last_hidden_state.numpy(), atol=1e-4, rtol=0)


def test_minilm_parity_with_torch(minilm_torch):
  tok = transformers.AutoTokenizer.from_pretrained(str(assets.minilm_dir()))
  batch = tok(TEXTS, padding=True, truncation=True, max_length=256, return_tensors="pt")
  with torch.no_grad():
    ref = minilm_torch(**batch).last_hidden_state
  model = bert.load_bert(assets.minilm_dir())
  args = [jnp.asarray(batch[k].numpy()) for k in ("input_ids", "attention_mask", "token_type_ids")]
  out = np.asarray(model(*args))
  real = batch["attention_mask"].numpy().astype(bool)
  np.testing.assert_allclose(out[real], ref.numpy()[real], atol=1e-4, rtol=0)
  # Padded query positions (the "" text has 2 real tokens and ~30 pads) are conventions that every
  # consumer discards; they are ill-conditioned: torch f32 itself is 5e-5 off its own float64 run
  # there (measured), and ours 2e-4. Checked to 1e-3.
  np.testing.assert_allclose(out[~real], ref.numpy()[~real], atol=1e-3, rtol=0)
  emb = np.asarray(model.embed(*args))
  ref_emb = _torch_sentence_embedding(ref, batch["attention_mask"])
  np.testing.assert_allclose(emb, ref_emb, atol=1e-5, rtol=0)


def test_tokenizer_matches_autotokenizer(minilm_encoder):
  tok = transformers.AutoTokenizer.from_pretrained(str(assets.minilm_dir()))
  long_text = " ".join(["Interstellar travel"] * 300)  # ~600 word pieces: truncated at 256
  texts = TEXTS + [long_text, "Ünïcödé accents, CAPITALS and numbers 12345!"]
  ref = tok(texts, padding=True, truncation=True, max_length=256, return_tensors="np")
  ids, mask = minilm_encoder.tokenize(texts)
  assert ref["input_ids"].shape[1] == 256
  assert ids.shape == (len(texts), 256)  # the 256 bucket holds the truncated long text exactly
  np.testing.assert_array_equal(ids, ref["input_ids"])
  np.testing.assert_array_equal(mask, ref["attention_mask"])
  ids_short, mask_short = minilm_encoder.tokenize(TEXTS)  # padded to a bucket, not to 256
  ref_short = tok(TEXTS, padding=True, return_tensors="np")
  t_ref = ref_short["input_ids"].shape[1]
  assert ids_short.shape[1] == minilm_encoder.bucket_length(t_ref) >= t_ref
  np.testing.assert_array_equal(ids_short[:, :t_ref], ref_short["input_ids"])
  np.testing.assert_array_equal(mask_short[:, :t_ref], ref_short["attention_mask"])
  assert not ids_short[:, t_ref:].any() and not mask_short[:, t_ref:].any()


@pytest.mark.parametrize("batch_size, micro_batch", [(3, 16), (8, 2)])
def test_encode_matches_reference_in_input_order(minilm_encoder, minilm_torch, batch_size,
                                                 micro_batch):
  enc = text_encoder.SentenceEncoder(minilm_encoder.model, minilm_encoder.tokenizer,
                                     batch_size=batch_size, micro_batch=micro_batch)
  tok = transformers.AutoTokenizer.from_pretrained(str(assets.minilm_dir()))
  texts = TEXTS + [f"Sentence number {i} about a {w} film." for i, w in
                   enumerate(["heist", "war", "romantic comedy", "documentary"])]
  # 9 sentences: several batches, sorting by length and a padded last batch (batch_size 3), or
  # calls of 2 rows, each padded to its own length bucket (batch_size 8, micro_batch 2).
  emb = enc.encode(texts)
  ref = []
  for text in texts:  # one sentence at a time: no padding at all in the reference
    batch = tok([text], return_tensors="pt")
    with torch.no_grad():
      hidden = minilm_torch(**batch).last_hidden_state
    ref.append(_torch_sentence_embedding(hidden, batch["attention_mask"])[0])
  assert emb.shape == (len(texts), 384) and emb.dtype == np.float32
  np.testing.assert_allclose(emb, np.stack(ref), atol=2e-5, rtol=0)
  assert enc.encode([]).shape == (0, 384)


def test_semantic_sanity(minilm_encoder):
  space, scifi, bread = minilm_encoder.encode(TEXTS[:3])
  assert float(space @ scifi) > float(space @ bread) + 0.2
  assert float(scifi @ bread) < 0.2


def test_sharded_forward_equals_single_device(tmp_path):
  assert jax.device_count() == 8, "conftest forces 8 host devices"
  torch.manual_seed(2)
  transformers.BertModel(transformers.BertConfig(
      vocab_size=101, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
      intermediate_size=128, max_position_embeddings=32)).save_pretrained(str(tmp_path))
  model = bert.load_bert(tmp_path)
  rng = np.random.default_rng(2)
  ids = jnp.asarray(rng.integers(0, 101, (8, 16)), jnp.int32)
  mask = np.ones((8, 16), np.int32)
  mask[3, 5:] = 0
  mask = jnp.asarray(mask)
  graphdef, state = nnx.split(model)
  single = np.asarray(jax.jit(lambda s, i, m: nnx.merge(graphdef, s)(i, m))(state, ids, mask))
  mesh = parallel.make_mesh({"fsdp": 2, "tensor": 4})
  graphdef, state = nnx.split(model)
  sharded = nnx.merge(graphdef, state)
  parallel.shard_module(sharded, mesh)
  q = sharded.layers[0].query.kernel[...]
  assert q.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor", None)
  assert len(q.addressable_shards) == 8 and q.addressable_shards[0].data.shape == (32, 1, 16)
  # 101 rows do not divide over 4 tensor shards: that dimension is replicated, embed is split.
  emb_spec = sharded.embeddings.word_embeddings.embedding[...].sharding.spec
  assert emb_spec == jax.sharding.PartitionSpec(None, "fsdp")
  g2, s2 = nnx.split(sharded)
  tokens = parallel.named_sharding(mesh, ("batch", "length"))
  with jax.set_mesh(mesh):
    out = jax.jit(lambda s, i, m: nnx.merge(g2, s)(i, m))(
        s2, jax.device_put(ids, tokens), jax.device_put(mask, tokens))
  assert len(out.sharding.device_set) == 8
  np.testing.assert_allclose(np.asarray(out), single, atol=1e-5, rtol=0)


@pytest.mark.slow
def test_sharded_sentence_encoder_equals_single_device(minilm_encoder):
  mesh = parallel.make_mesh({"fsdp": 2, "tensor": 4})
  enc = text_encoder.SentenceEncoder.from_pretrained(batch_size=4, mesh=mesh)
  ffn = enc.model.layers[0].intermediate.kernel[...]
  assert ffn.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")
  np.testing.assert_allclose(enc.encode(TEXTS), minilm_encoder.encode(TEXTS), atol=1e-5, rtol=0)


def test_bfloat16_compute_close_to_float32(small_checkpoint):
  path, _ = small_checkpoint
  f32 = bert.load_bert(path)
  bf16 = bert.load_bert(path, dtype=jnp.bfloat16)
  ids, mask, _ = _small_inputs(np.random.default_rng(3))
  a = np.asarray(f32.embed(jnp.asarray(ids), jnp.asarray(mask)))
  b = np.asarray(bf16.embed(jnp.asarray(ids), jnp.asarray(mask)))
  assert bf16.layers[0].query.kernel[...].dtype == jnp.float32  # params stay f32
  cos = (a * b).sum(-1)
  assert cos.min() > 0.999 and np.abs(a - b).max() > 0  # close, but really computed in bf16


def test_bert_prefix_is_stripped(small_checkpoint, tmp_path):
  path, _ = small_checkpoint
  tensors = load_file(str(path / "model.safetensors"))
  save_file({f"bert.{k}": v for k, v in tensors.items()}, str(tmp_path / "model.safetensors"))
  (tmp_path / "config.json").write_text((path / "config.json").read_text())
  ids, mask, _ = _small_inputs(np.random.default_rng(4))
  a = bert.load_bert(path)(jnp.asarray(ids), jnp.asarray(mask))
  b = bert.load_bert(tmp_path)(jnp.asarray(ids), jnp.asarray(mask))
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("edit, message", [
    ("drop", "missing tensor"),
    ("reshape", "has shape"),
    ("extra", "unexpected tensor"),
])
def test_loader_rejects_bad_tensors(small_checkpoint, tmp_path, edit, message):
  path, _ = small_checkpoint
  tensors = dict(load_file(str(path / "model.safetensors")))
  name = "encoder.layer.1.attention.self.key.weight"
  if edit == "drop":
    del tensors[name]
  elif edit == "reshape":
    tensors[name] = tensors[name][:, :-1].copy()
  else:
    name = "encoder.layer.2.output.dense.weight"
    tensors[name] = np.zeros((4, 4), np.float32)
  save_file(tensors, str(tmp_path / "model.safetensors"))
  (tmp_path / "config.json").write_text((path / "config.json").read_text())
  with pytest.raises(ValueError, match=message) as err:
    bert.load_bert(tmp_path)
  assert name in str(err.value) and "model.safetensors" in str(err.value)


@pytest.mark.parametrize("field, value, message", [
    ("hidden_size", 30, "multiple of num_attention_heads"),
    ("hidden_act", "relu", "hidden_act"),
    ("position_embedding_type", "relative_key", "position_embedding_type"),
    ("num_hidden_layers", 0, "num_hidden_layers"),
    ("vocab_size", None, "missing required field"),
])
def test_config_validation(tmp_path, field, value, message):
  d = dict(SMALL, model_type="bert")
  if value is None:
    del d[field]
  else:
    d[field] = value
  (tmp_path / "config.json").write_text(json.dumps(d))
  with pytest.raises(ValueError, match=message) as err:
    bert.BertConfig.from_json(tmp_path / "config.json")
  assert "config.json" in str(err.value)


def test_input_validation(minilm_encoder):
  with pytest.raises(ValueError, match="single string"):
    minilm_encoder.encode("just one text")
  with pytest.raises(ValueError, match="item 1 is int"):
    minilm_encoder.encode(["ok", 3])
  with pytest.raises(ValueError, match="batch_size"):
    minilm_encoder.encode(["ok"], batch_size=0)
  with pytest.raises(ValueError, match="micro_batch"):
    text_encoder.SentenceEncoder(minilm_encoder.model, minilm_encoder.tokenizer, micro_batch=0)
  model = minilm_encoder.model
  too_long = jnp.zeros((1, model.config.max_position_embeddings + 1), jnp.int32)
  with pytest.raises(ValueError, match="max_position_embeddings"):
    model(too_long)
  with pytest.raises(ValueError, match="attention_mask"):
    model(jnp.zeros((2, 5), jnp.int32), jnp.ones((2, 4), jnp.int32))


def test_encode_compiles_once_per_bucket(minilm_encoder):
  compiled = text_encoder._embed._cache_size
  before = compiled()
  calls = (["a b c d", "the cat sat on the mat by the old red door", "x"],
           ["one two three four five six seven eight nine ten eleven", "y", "z", "w"],
           ["hello world", "a space opera about a crew lost in the deep dark space", "bread"])
  buckets = {minilm_encoder.bucket_length(minilm_encoder.tokenize([t])[1].sum())
             for texts in calls for t in texts}
  for texts in calls:
    minilm_encoder.encode(texts)
  assert compiled() - before <= len(buckets)
  grown = compiled()
  for texts in calls:
    minilm_encoder.encode(texts[::-1])
  assert compiled() == grown
  # Other encoders of the same architecture (other weights: E_D's fine-tuned copy) reuse them,
  # whether their parameters are fresh arrays, committed to the device as orbax restores them,
  # or host arrays (E_D keeps its best epoch's parameters so).
  device = jax.devices()[0]
  for commit in (lambda x: x, lambda x: jax.device_put(x, device), np.asarray):
    model = text_encoder.SentenceEncoder.from_pretrained().model
    nnx.update(model, jax.tree.map(lambda x, c=commit: c(x * 1.01), nnx.state(model, nnx.Param)))
    other = text_encoder.SentenceEncoder(model, minilm_encoder.tokenizer,
                                         max_length=minilm_encoder.max_length,
                                         batch_size=minilm_encoder.batch_size)
    for texts in calls:
      assert not np.allclose(other.encode(texts), minilm_encoder.encode(texts))
    assert compiled() == grown


def test_a_sentence_embedding_does_not_depend_on_what_it_is_encoded_with(minilm_encoder):
  rng = np.random.default_rng(0)
  words = "the a film about love war space time heist family comedy dark twist hero city".split()
  texts = [" ".join(rng.choice(words, rng.integers(2, 30))) for _ in range(40)]
  alone = np.stack([minilm_encoder.encode([t])[0] for t in texts[:6]])
  for _ in range(3):
    idx = rng.permutation(len(texts))[: rng.integers(8, len(texts))]
    batch = [texts[i] for i in idx] + texts[:6]
    np.testing.assert_array_equal(minilm_encoder.encode(batch)[-6:], alone)
