"""Llama decoder: parity with PyTorch transformers, KV cache, padding, sharding, real SmolLM2."""

import copy

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch
import transformers
from decoder_fixtures import (
  cached_chunk_logits,
  make_torch_llama,
  save_torch,
  smollm2,
  torch_logits,
)
from flax import nnx
from transformers import masking_utils

from eagle_jax import parallel
from eagle_jax.models import llama, loading

TOL = 1e-4


@pytest.fixture(scope="module", params=[False, True], ids=["untied", "tied"])
def pair(request, tmp_path_factory):
  tmodel = make_torch_llama(tie=request.param)
  path = save_torch(tmodel, tmp_path_factory.mktemp("llama"))
  config, model = loading.load_llama_safetensors(path)
  return tmodel, config, model


def test_config_read_from_hf(pair):
  tmodel, config, _ = pair
  tc = tmodel.config
  assert (config.vocab_size, config.hidden, config.intermediate, config.layers) == (
      tc.vocab_size, tc.hidden_size, tc.intermediate_size, tc.num_hidden_layers)
  assert (config.heads, config.kv_heads, config.head_dim) == (6, 2, 8)
  assert config.rope_theta == 5000.0 and config.tie_embeddings == tc.tie_word_embeddings


def test_logits_match_torch(pair):
  tmodel, config, model = pair
  tokens = np.random.RandomState(0).randint(0, config.vocab_size, (3, 21))
  ours, cache = model(jnp.asarray(tokens))
  assert cache is None
  ref = torch_logits(tmodel, tokens)
  assert np.abs(np.asarray(ours) - ref).max() <= TOL
  assert np.abs(ref).max() > 1.0  # the comparison is not between near-zero logits


def test_long_prefill_in_causal_blocks_matches_torch(pair):
  """T = 200 > attention.CAUSAL_BLOCK: the cache-free pass and a prefill into an empty cache of
  exactly T slots both run attention in causal blocks; left padding on one row."""
  tmodel, config, model = pair
  tokens = np.random.RandomState(6).randint(0, config.vocab_size, (2, 200))
  mask = np.ones(tokens.shape, bool)
  mask[1, :30] = False
  ref = torch_logits(tmodel, tokens, mask)
  ours, _ = model(jnp.asarray(tokens), attention_mask=jnp.asarray(mask))
  assert np.abs(np.asarray(ours) - ref)[mask].max() <= TOL
  chunked, _ = cached_chunk_logits(model, config, tokens, mask, cuts=((0, 200),), length=200)
  assert np.abs(chunked - ref)[mask].max() <= TOL


def test_llama3_rope_scaling_matches_torch(tmp_path):
  """Llama 3's frequency-dependent RoPE scaling (``rope_type="llama3"``, as in Llama 3.2's
  config.json), with an original context of 64 so the kept, interpolated and divided frequency
  bands are all present, against transformers over 60 positions; and the scaling matters."""
  rope = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
              original_max_position_embeddings=64)
  tmodel = make_torch_llama(rope_scaling=rope)
  config, model = loading.load_llama_safetensors(save_torch(tmodel, tmp_path))
  assert config.rope_llama3 == (8.0, 1.0, 4.0, 64)
  tokens = np.random.RandomState(5).randint(0, config.vocab_size, (2, 60))
  ref = torch_logits(tmodel, tokens)
  ours, _ = model(jnp.asarray(tokens))
  assert np.abs(np.asarray(ours) - ref).max() <= TOL
  # The three bands: with head_dim 8 and theta 5000 the wavelengths straddle 64/4 and 64/1.
  inv = 1.0 / (5000.0 ** (np.arange(0, 8, 2) / 8))
  wavelen = 2 * np.pi / inv
  assert (wavelen < 16).any() and (wavelen > 64).any() and ((wavelen >= 16) & (wavelen <= 64)).any()
  plain = llama.Llama(config.replace(rope_llama3=None), rngs=nnx.Rngs(0))
  nnx.update(plain, nnx.state(model))
  assert np.abs(np.asarray(plain(jnp.asarray(tokens))[0]) - ref).max() > 1e-2


def test_left_padded_batch_matches_torch(pair):
  tmodel, config, model = pair
  rng = np.random.RandomState(1)
  tokens = rng.randint(0, config.vocab_size, (3, 12))
  mask = np.ones((3, 12), bool)
  mask[0, :5] = False  # left padding
  mask[2, :1] = False
  ours, _ = model(jnp.asarray(tokens), attention_mask=jnp.asarray(mask))
  ref = torch_logits(tmodel, tokens, mask)
  diff = np.abs(np.asarray(ours) - ref)[mask]
  assert diff.max() <= TOL
  # Each padded row equals the same row run alone without its padding.
  alone = torch_logits(tmodel, tokens[0:1, 5:])
  assert np.abs(np.asarray(ours)[0, 5:] - alone[0]).max() <= TOL


def test_input_embeddings_match_torch_inputs_embeds(pair):
  tmodel, config, model = pair
  emb = np.random.RandomState(2).normal(size=(2, 9, config.hidden)).astype(np.float32)
  ours, _ = model(None, input_embeddings=jnp.asarray(emb))
  with torch.no_grad():
    ref = tmodel(inputs_embeds=torch.from_numpy(emb)).logits.numpy()
  assert np.abs(np.asarray(ours) - ref).max() <= TOL
  hidden, _ = model.hidden_states(None, input_embeddings=jnp.asarray(emb))
  with torch.no_grad():
    ref_h = tmodel.model(inputs_embeds=torch.from_numpy(emb)).last_hidden_state.numpy()
  assert hidden.shape == (2, 9, config.hidden)
  assert np.abs(np.asarray(hidden) - ref_h).max() <= TOL


def test_kv_cache_chunks_match_torch_full_pass(pair):
  tmodel, config, model = pair
  rng = np.random.RandomState(3)
  tokens = rng.randint(0, config.vocab_size, (2, 14))
  mask = np.ones_like(tokens, bool)
  mask[1, :3] = False
  ref = torch_logits(tmodel, tokens, mask)
  ours, cache = cached_chunk_logits(model, config, tokens, mask)
  assert int(cache.index) == 14
  np.testing.assert_array_equal(np.asarray(cache.positions_next), mask.sum(1))
  assert np.abs(ours - ref)[mask].max() <= TOL


def test_bf16_compute_close_to_float32_reference(pair):
  tmodel, config, model = pair
  bf16 = nnx.merge(*_with_config(model, config.replace(dtype=jnp.bfloat16)))
  tokens = np.random.RandomState(4).randint(0, config.vocab_size, (2, 10))
  ours, _ = bf16(jnp.asarray(tokens))
  ref = torch_logits(tmodel, tokens)
  assert ours.dtype == jnp.float32
  err = np.abs(np.asarray(ours) - ref).max() / np.abs(ref).max()
  assert 0 < err < 0.05  # bf16 really changes the numbers, but only by bf16 rounding


def _bf16(x: torch.Tensor) -> torch.Tensor:
  return x.to(torch.bfloat16).to(torch.float32)


def _bf16_operand_attention(module, query, key, value, attention_mask, scaling, dropout=0.0,
                            **kwargs):
  """HF eager attention in float32 with q, k, v and the probabilities rounded to bf16."""
  del dropout, kwargs
  groups = module.num_key_value_groups
  key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
  scores = torch.matmul(_bf16(query), _bf16(key).transpose(2, 3)) * scaling
  if attention_mask is not None:
    scores = scores + attention_mask[:, :, :, : key.shape[-2]]
  probs = torch.softmax(scores, dim=-1, dtype=torch.float32)
  return torch.matmul(_bf16(probs), _bf16(value)).transpose(1, 2).contiguous(), probs


def _torch_mixed(tmodel):
  """A float32 PyTorch copy of ``tmodel`` computing what ``matmul_dtype=bfloat16`` promises:
  bf16-rounded weights, every Linear's input and attention's q, k, v and probabilities rounded to
  bf16, everything else (norms, RoPE, softmax, residuals, accumulation) float32."""
  transformers.AttentionInterface.register("bf16_operands", _bf16_operand_attention)
  masking_utils.AttentionMaskInterface.register("bf16_operands", masking_utils.eager_mask)
  ref = copy.deepcopy(tmodel)
  with torch.no_grad():
    for p in ref.parameters():
      p.copy_(_bf16(p))
  ref.set_attn_implementation("bf16_operands")
  for m in ref.modules():
    if isinstance(m, torch.nn.Linear):
      m.register_forward_pre_hook(lambda _, args: (_bf16(args[0]),))
  return ref


def test_mixed_precision_matches_torch_with_bf16_operands(pair):
  tmodel, config, model = pair
  mixed_config = config.replace(param_dtype=jnp.bfloat16, matmul_dtype=jnp.bfloat16)
  graphdef, state = _with_config(model, mixed_config)
  mixed = nnx.merge(graphdef, jax.tree.map(lambda x: x.astype(jnp.bfloat16), state))
  tokens = np.random.RandomState(5).randint(0, config.vocab_size, (3, 17))
  ours, _ = mixed(jnp.asarray(tokens))
  assert ours.dtype == jnp.float32
  ours = np.asarray(ours)
  emulated, exact = torch_logits(_torch_mixed(tmodel), tokens), torch_logits(tmodel, tokens)
  scale = np.abs(exact).max()
  to_emulated = np.abs(ours - emulated).max() / scale
  to_float32 = np.abs(ours - exact).max() / scale
  assert to_emulated < 1e-4  # the same roundings, summed in another order
  assert to_float32 > 1e-3  # and bf16 operands do change the logits
  # Through the KV cache in chunks (the decode path): the cached keys and values are the same.
  mask = np.ones(tokens.shape, bool)
  cuts = ((0, 6), (6, 7), (7, 8), (8, 17))
  chunked, cache = cached_chunk_logits(mixed, mixed_config, tokens, mask, cuts=cuts)
  assert np.abs(chunked - emulated).max() / scale < 1e-4
  # A decode-only cache stores the keys and values as their bf16 bits, which every read rounds
  # to anyway: the same logits to the bit, and the same values in the cache.
  assert llama.decode_cache_dtype(mixed_config) == jnp.uint16
  bits, bits_cache = cached_chunk_logits(mixed, mixed_config, tokens, mask, cuts=cuts,
                                         dtype=llama.decode_cache_dtype(mixed_config))
  assert bits_cache.k.dtype == jnp.uint16
  np.testing.assert_array_equal(bits, chunked)
  for ours_kv, ref_kv in ((bits_cache.k, cache.k), (bits_cache.v, cache.v)):
    as_bf16 = np.asarray(ours_kv).view(ml_dtypes.bfloat16).astype(np.float32)
    np.testing.assert_array_equal(as_bf16, np.asarray(ref_kv).astype(ml_dtypes.bfloat16)
                                  .astype(np.float32))
  assert llama.decode_cache_dtype(config) == jnp.float32  # float32 operands: stored as they are


def _with_config(model, config):
  """(graphdef, state) of a model with the same parameters under another config."""
  new = nnx.eval_shape(lambda: llama.Llama(config, rngs=nnx.Rngs(0)))
  graphdef, _ = nnx.split(new)
  return graphdef, nnx.state(model)


def test_gemma_switches_match_torch_gemma(tmp_path):
  torch.manual_seed(0)
  cfg = transformers.GemmaConfig(
      vocab_size=89, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
      num_attention_heads=4, num_key_value_heads=2, head_dim=12, rope_theta=10000.0,
      rms_norm_eps=1e-6, max_position_embeddings=64)
  tmodel = transformers.GemmaForCausalLM(cfg).eval()
  with torch.no_grad():
    for p in tmodel.parameters():
      p.normal_(0.0, 0.2)
  tmodel.save_pretrained(str(tmp_path), safe_serialization=True)
  config, model = loading.load_llama_safetensors(tmp_path)
  assert config.scale_embeddings and config.norm_offset == 1.0
  assert config.activation == "gelu_tanh" and config.head_dim == 12
  tokens = np.random.RandomState(0).randint(0, 89, (2, 11))
  ours, _ = model(jnp.asarray(tokens))
  ref = torch_logits(tmodel, tokens)
  assert np.abs(np.asarray(ours) - ref).max() <= TOL


def test_config_rejects_bad_values():
  with pytest.raises(ValueError, match="kv_heads"):
    llama.LlamaConfig(vocab_size=10, hidden=8, intermediate=8, layers=1, heads=3, kv_heads=2,
                      head_dim=4)
  with pytest.raises(ValueError, match="head_dim"):
    llama.LlamaConfig(vocab_size=10, hidden=8, intermediate=8, layers=1, heads=2, kv_heads=2,
                      head_dim=3)
  with pytest.raises(ValueError, match="activation"):
    llama.LlamaConfig(vocab_size=10, hidden=8, intermediate=8, layers=1, heads=2, kv_heads=2,
                      head_dim=4, activation="relu")


def test_sharded_forward_matches_single_device(tmp_path):
  assert jax.device_count() == 8, "tests/conftest.py forces 8 host devices"
  tmodel = make_torch_llama(vocab_size=128, hidden_size=64, intermediate_size=128,
                            num_attention_heads=8, num_key_value_heads=4)
  path = save_torch(tmodel, tmp_path)
  config, single = loading.load_llama_safetensors(path)
  mesh = parallel.make_mesh({"fsdp": 2, "tensor": 4})
  _, sharded = loading.load_llama_safetensors(path, mesh=mesh)
  wq = sharded.layers[0].attn.wq[...]
  assert wq.sharding.spec == jax.P("fsdp", "tensor", None)
  assert len(wq.addressable_shards) == 8 and wq.addressable_shards[0].data.shape == (32, 2, 8)
  rng = np.random.RandomState(0)
  tokens = rng.randint(0, 128, (4, 16))
  mask = np.ones_like(tokens, bool)
  mask[1, :6] = False

  def forward(model, tokens, mask):
    return model(tokens, attention_mask=mask)[0]

  expected = np.asarray(nnx.jit(forward)(single, jnp.asarray(tokens), jnp.asarray(mask)))
  batch = parallel.named_sharding(mesh, ("batch", "length"))
  with jax.set_mesh(mesh):
    got = nnx.jit(forward)(sharded, jax.device_put(tokens, batch), jax.device_put(mask, batch))
  assert np.abs(np.asarray(got) - expected).max() <= 1e-5
  assert np.abs(expected - torch_logits(tmodel, tokens, mask))[mask].max() <= TOL


def test_init_sharded_places_params_on_mesh():
  config = llama.LlamaConfig(vocab_size=64, hidden=32, intermediate=64, layers=1, heads=4,
                             kv_heads=4, head_dim=8)
  mesh = parallel.make_mesh({"fsdp": 2, "tensor": 4})
  model = loading.init_sharded(config, mesh, seed=0)
  eager = llama.Llama(config, rngs=nnx.Rngs(0))
  emb = model.embedder.embedding[...]
  assert emb.sharding.spec == jax.P("tensor", "fsdp")
  np.testing.assert_allclose(np.asarray(emb), np.asarray(eager.embedder.embedding[...]), atol=1e-7)
  assert float(np.std(np.asarray(emb))) == pytest.approx(0.02, rel=0.2)


PARAGRAPH = (
    "The city of Paris is the capital of France. It is known for the Eiffel Tower, which was "
    "built for the World's Fair in 1889. Millions of tourists visit the city every year to see "
    "its museums, walk along the river Seine and enjoy French food.")


@pytest.mark.slow
def test_smollm2_nll_far_below_uniform():
  config, model, tok = smollm2()
  assert (config.layers, config.hidden, config.heads, config.kv_heads) == (30, 576, 9, 3)
  ids = np.asarray([tok.encode(PARAGRAPH)], np.int32)
  logits, _ = jax.jit(lambda m, t: m(t))(model, jnp.asarray(ids))
  logp = jax.nn.log_softmax(logits[0, :-1], axis=-1)
  nll = -float(jnp.mean(jnp.take_along_axis(logp, jnp.asarray(ids[0, 1:, None]), axis=-1)))
  uniform = float(np.log(config.vocab_size))
  assert uniform == pytest.approx(10.80, abs=0.01)
  assert nll < 4.0, nll  # measured about 2-3.5 nats; a broken q/k permutation gives > 7
