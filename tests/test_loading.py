"""Weight loading (GGUF, safetensors, key-checked assignment) and the GGUF tokenizer."""

import json

import gguf
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
from decoder_fixtures import (
  close_gguf,
  gguf_writer,
  make_torch_llama,
  save_torch,
  smollm2,
  torch_logits,
)
from flax import nnx

from eagle_jax import assets
from eagle_jax.models import files, llama, loading
from eagle_jax.models.tokenizer import Tokenizer

TOL = 1e-4


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
  """llama.cpp convert_hf_to_gguf.py ``LlamaModel.permute`` (HF rotate-half -> GGUF order)."""
  return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
          .swapaxes(1, 2).reshape(w.shape))


def test_unpermute_inverts_llama_cpp_permutation():
  w = np.arange(6 * 8 * 5, dtype=np.float32).reshape(6 * 8, 5)
  assert np.array_equal(loading.unpermute_rotary(llama_cpp_permute(w, 6), 6), w)
  # Hand-checked on one head of width 4: HF rows (r0, r1 | r2, r3) -> GGUF (r0, r2, r1, r3).
  h = np.arange(4, dtype=np.float32)[:, None]
  assert llama_cpp_permute(h, 1)[:, 0].tolist() == [0, 2, 1, 3]
  assert loading.unpermute_rotary(np.array([[0.0], [2.0], [1.0], [3.0]]), 1)[:, 0].tolist() == [
      0, 1, 2, 3]


def write_gguf(tmodel, path):
  """Writes a torch Llama as a float32 llama GGUF the way llama.cpp's converter lays it out."""
  c = tmodel.config
  w = gguf_writer(path, "llama", c, c.rope_parameters["rope_theta"])
  w.add_rope_dimension_count(c.hidden_size // c.num_attention_heads)
  w.add_vocab_size(c.vocab_size)
  sd = {k: v.detach().numpy().astype(np.float32) for k, v in tmodel.state_dict().items()}
  w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
  w.add_tensor("output_norm.weight", sd["model.norm.weight"])
  if not c.tie_word_embeddings:
    w.add_tensor("output.weight", sd["lm_head.weight"])
  names = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
           "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
           "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
           "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
  for i in range(c.num_hidden_layers):
    for hf, gg in names.items():
      arr = sd[f"model.layers.{i}.{hf}.weight"]
      if gg == "attn_q":
        arr = llama_cpp_permute(arr, c.num_attention_heads)
      elif gg == "attn_k":
        arr = llama_cpp_permute(arr, c.num_key_value_heads)
      w.add_tensor(f"blk.{i}.{gg}.weight", np.ascontiguousarray(arr))
  return close_gguf(w, path)


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_gguf_logits_match_torch(tmp_path, tie):
  tmodel = make_torch_llama(tie=tie)
  path = write_gguf(tmodel, tmp_path / "tiny.gguf")
  config, model = loading.load_llama_gguf(path)
  assert config.tie_embeddings == tie
  assert (config.heads, config.kv_heads, config.head_dim, config.rope_theta) == (6, 2, 8, 5000.0)
  tokens = np.random.RandomState(0).randint(0, config.vocab_size, (2, 13))
  ours, _ = model(jnp.asarray(tokens))
  assert np.abs(np.asarray(ours) - torch_logits(tmodel, tokens)).max() <= TOL


def test_params_to_hf_round_trips_torch_state(tmp_path):
  tmodel = make_torch_llama(tie=False)
  _, model = loading.load_llama_safetensors(save_torch(tmodel, tmp_path))
  back = loading.params_to_hf(model)
  for k, v in tmodel.state_dict().items():
    np.testing.assert_array_equal(back[k], v.numpy(), err_msg=k)


@pytest.fixture()
def tiny_dir(tmp_path):
  return save_torch(make_torch_llama(tie=False), tmp_path)


def _rewrite(directory, edit):
  f = directory / "model.safetensors"
  tensors = dict(safetensors.numpy.load_file(str(f)))
  edit(tensors)
  safetensors.numpy.save_file(tensors, str(f))


def test_missing_tensor_is_named(tiny_dir):
  _rewrite(tiny_dir, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
  with pytest.raises(loading.LoadingError, match=r"missing tensor 'model\.layers\.1\.mlp\.up_proj"):
    loading.load_llama_safetensors(tiny_dir)


def test_misshaped_tensor_is_named(tiny_dir):
  def edit(t):
    t["model.layers.0.self_attn.k_proj.weight"] = np.zeros((8, 48), np.float32)
  _rewrite(tiny_dir, edit)
  with pytest.raises(loading.LoadingError, match=r"k_proj\.weight' has shape \(8, 48\), expected"):
    loading.load_llama_safetensors(tiny_dir)


def test_unexpected_tensor_is_named(tiny_dir):
  def edit(t):
    t["model.layers.0.self_attn.q_norm.weight"] = np.ones((8,), np.float32)
  _rewrite(tiny_dir, edit)
  with pytest.raises(loading.LoadingError, match=r"unexpected tensor.*q_norm"):
    loading.load_llama_safetensors(tiny_dir)


def test_unsupported_config_is_rejected(tiny_dir):
  cfg = json.loads((tiny_dir / "config.json").read_text())
  cfg["attention_bias"] = True
  (tiny_dir / "config.json").write_text(json.dumps(cfg))
  with pytest.raises(loading.LoadingError, match="attention_bias"):
    loading.load_llama_safetensors(tiny_dir)
  with pytest.raises(loading.LoadingError, match="model_type 'bert'"):
    loading.config_from_hf({**cfg, "model_type": "bert"})


def test_assign_checked_names_keys_and_shapes():
  config = llama.LlamaConfig(vocab_size=11, hidden=8, intermediate=16, layers=1, heads=2,
                             kv_heads=1, head_dim=4)
  _, state = nnx.split(nnx.eval_shape(lambda: llama.Llama(config, rngs=nnx.Rngs(0))))
  arrays = {loading.path_key(p): np.full(v.get_value().shape, 0.5, np.float32)
            for p, v in nnx.to_flat_state(state)}
  assert set(arrays) == {
      "embedder.embedding", "final_norm.scale", "layers.0.attn_norm.scale",
      "layers.0.mlp_norm.scale", "layers.0.attn.wq", "layers.0.attn.wk", "layers.0.attn.wv",
      "layers.0.attn.wo", "layers.0.mlp.w_gate", "layers.0.mlp.w_up", "layers.0.mlp.w_down"}
  filled = loading.assign_checked(state, arrays, source="unit")
  leaves = [v.get_value() for _, v in nnx.to_flat_state(filled)]
  assert all(float(jnp.min(x)) == 0.5 == float(jnp.max(x)) for x in leaves)
  bad = dict(arrays)
  bad["layers.0.attn.wq"] = np.zeros((8, 2, 5), np.float32)
  with pytest.raises(loading.LoadingError, match=r"unit: tensor 'layers\.0\.attn\.wq' has shape"):
    loading.assign_checked(state, bad, source="unit")
  with pytest.raises(loading.LoadingError,
                     match=r"missing tensor\(s\) for \['final_norm\.scale'\]"):
    loading.assign_checked(state, {k: v for k, v in arrays.items() if k != "final_norm.scale"},
                           source="unit")
  with pytest.raises(loading.LoadingError, match=r"unexpected tensor\(s\) \['extra'\]"):
    loading.assign_checked(state, {**arrays, "extra": np.zeros(1)}, source="unit")


def test_gguf_file_errors(tmp_path):
  with pytest.raises(loading.LoadingError, match="not found"):
    loading.load_llama_gguf(tmp_path / "nope.gguf")


def test_tokenizer_padding_left_and_right():
  from tokenizers import Tokenizer as Backend
  from tokenizers import models

  backend = Backend(models.WordLevel({"a": 0, "b": 1, "<|im_end|>": 2}, unk_token="a"))
  tok = Tokenizer(backend)
  assert tok.eos_id == 2 and tok.pad_id == 2
  ids, mask = tok.pad([[0, 1, 1], [1]], padding_side="left")
  assert ids.tolist() == [[0, 1, 1], [2, 2, 1]]
  assert mask.tolist() == [[True, True, True], [False, False, True]]
  ids, mask = tok.pad([[0, 1, 1], [1]], padding_side="right", length=4)
  assert ids.tolist() == [[0, 1, 1, 2], [1, 2, 2, 2]]
  assert mask.tolist() == [[True, True, True, False], [True, False, False, False]]
  with pytest.raises(ValueError, match="padding_side"):
    tok.pad([[0]], padding_side="middle")
  with pytest.raises(ValueError, match="length=1"):
    tok.pad([[0, 1]], length=1)
  with pytest.raises(ValueError, match=r"messages\[0\]"):
    tok.apply_chat_template([{"content": "hi"}])


@pytest.mark.slow
def test_gguf_tokenizer_matches_transformers():
  from transformers import AutoTokenizer

  path = assets.smollm2_gguf()
  ref = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
  ours = Tokenizer.from_gguf(path)
  texts = [
      "Hello world 12345, it's  fine!\n\tok",
      "  déjà vu — naïve café 😀 3.14159",
      "def f(x):\n    return x**2  # comment",
      "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n",
      "Toy Story (1995) is an animated film about toys that come alive.",
  ]
  for text in texts:
    ids = ours.encode(text)
    assert ids == ref(text, add_special_tokens=False)["input_ids"], text
    assert ours.decode(ids, skip_special_tokens=False) == text
  assert ours.eos_id == ref.convert_tokens_to_ids("<|im_end|>") == 2
  for messages in ([{"role": "user", "content": "What is the capital of France?"}],
                   [{"role": "system", "content": "Be brief."},
                    {"role": "user", "content": "Name a movie."},
                    {"role": "assistant", "content": "Alien."},
                    {"role": "user", "content": "Another?"}]):
    expected = ref.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert ours.apply_chat_template(messages) == expected


@pytest.mark.slow
def test_smollm2_gguf_config_and_no_missing_tensors():
  config, model, _ = smollm2()
  assert config == llama.LlamaConfig(
      vocab_size=49152, hidden=576, intermediate=1536, layers=30, heads=9, kv_heads=3,
      head_dim=64, rope_theta=100000.0, rms_eps=config.rms_eps, tie_embeddings=True,
      max_len=8192)
  assert config.rms_eps == pytest.approx(1e-5)
  assert llama.param_count(model) == 134_515_008  # SmolLM2-135M: tied, 30 blocks of 3.54M


def test_gguf_tokenizer_of_an_unsupported_kind_is_a_loading_error_naming_the_file(tmp_path):
  path = tmp_path / "wordpiece.gguf"
  w = gguf.GGUFWriter(str(path), arch="llama")
  w.add_tokenizer_model("bert")
  w.add_token_list(["[UNK]", "a", "b"])
  close_gguf(w, path)
  with pytest.raises(loading.LoadingError, match=r"wordpiece\.gguf: GGUF tokenizer\.ggml\.model is 'bert'"):
    Tokenizer.from_gguf(path)


def test_checked_gguf_reader_reads_what_gguf_reads():
  """``files.open_gguf`` (bounds-checked, slicing a plain view of the map) against gguf-py's own
  ``GGUFReader`` on SmolLM2's GGUF: every metadata field's parts, types and data indices (its
  49,152-token vocabulary among them) and every tensor's name, type and bytes."""
  path = assets.smollm2_gguf()
  ours, theirs = files.open_gguf(path), gguf.GGUFReader(path)
  assert list(ours.fields) == list(theirs.fields)
  for name, field in theirs.fields.items():
    mine = ours.fields[name]
    assert (mine.types, mine.data, mine.offset) == (field.types, field.data, field.offset), name
    assert len(mine.parts) == len(field.parts), name
    for a, b in zip(mine.parts, field.parts, strict=True):
      assert a.dtype == b.dtype and np.array_equal(a, b), name
  assert len(ours.fields["tokenizer.ggml.tokens"].data) == 49152
  assert [t.name for t in ours.tensors] == [t.name for t in theirs.tensors]
  for a, b in zip(ours.tensors, theirs.tensors, strict=True):
    assert a.tensor_type == b.tensor_type and np.array_equal(a.data, b.data), a.name
