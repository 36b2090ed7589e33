"""ELM adapter: MLP against numpy, soft-token injection, sharding axes, and embedding-prompt decoding."""

import math

import jax.numpy as jnp
import numpy as np
import pytest
from decoder_fixtures import make_torch_llama, save_torch

from eagle_jax import training
from eagle_jax.elm import adapter as adapter_lib
from eagle_jax.models import loading, sampling


def _np_gelu(x):
  return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))


def test_adapter_matches_numpy_mlp_per_domain():
  from flax import nnx

  a = adapter_lib.Adapter(5, 12, 7, n_tokens=3, num_domains=2, rngs=nnx.Rngs(1))
  # Non-zero biases so they are checked too.
  a.b1[...] = jnp.linspace(-1, 1, 14).reshape(2, 7)
  a.b2[...] = jnp.linspace(-0.5, 0.5, 72).reshape(2, 3, 12)
  rng = np.random.default_rng(0)
  z = rng.normal(size=(4, 2, 5)).astype(np.float32)
  dom = np.array([[0, 1], [1, 1], [0, 0], [1, 0]], np.int32)
  out = np.asarray(a(jnp.asarray(z), jnp.asarray(dom)))
  assert out.shape == (4, 2, 3, 12)
  w1, b1, w2, b2 = (np.asarray(v[...], np.float64) for v in (a.w1, a.b1, a.w2, a.b2))
  for i in range(4):
    for s in range(2):
      d = dom[i, s]
      h = _np_gelu(z[i, s] @ w1[d] + b1[d])
      ref = np.einsum("h,hnD->nD", h, w2[d]) + b2[d]
      np.testing.assert_allclose(out[i, s], ref, rtol=1e-5, atol=1e-6)


def test_inject_replaces_exactly_the_placeholder_positions():
  rng = np.random.default_rng(1)
  b, t, s, n, d = 3, 9, 2, 2, 4
  tok = rng.normal(size=(b, t, d)).astype(np.float32)
  soft = rng.normal(size=(b, s, n, d)).astype(np.float32)
  slot = np.full((b, t), -1, np.int32)
  slot[0, [2, 3]] = [0, 1]  # slot 0, two tokens
  slot[1, [0, 5, 6, 8]] = [0, 1, 2, 3]  # two slots
  # row 2: no placeholders at all
  out = np.asarray(adapter_lib.inject_soft_tokens(jnp.asarray(tok), jnp.asarray(soft),
                                                  jnp.asarray(slot)))
  ref = tok.copy()
  for i in range(b):
    for j in range(t):
      if slot[i, j] >= 0:
        ref[i, j] = soft[i, slot[i, j] // n, slot[i, j] % n]
  np.testing.assert_array_equal(out, ref)
  changed = np.any(out != tok, axis=-1)
  np.testing.assert_array_equal(changed, slot >= 0)


def test_inject_rejects_bad_shapes():
  with pytest.raises(ValueError, match="slot_index"):
    adapter_lib.inject_soft_tokens(jnp.zeros((2, 5, 4)), jnp.zeros((2, 1, 1, 4)),
                                   jnp.zeros((2, 4), jnp.int32))


def test_adapter_params_carry_logical_axes_on_a_mesh():
  mesh = training.build_mesh({"data": 2, "tensor": 4})
  fm = training.FunctionalModel(lambda r: adapter_lib.Adapter(6, 16, 8, 1, rngs=r), mesh=mesh)
  spec = fm.shardings["w1"].spec
  assert tuple(spec) == (None, None, "tensor")  # ("domain", "latent", "mlp")
  assert tuple(fm.shardings["w2"].spec)[1] == "tensor"
  params = fm.init()
  assert params["w2"].sharding.spec == fm.shardings["w2"].spec


def test_standardisation_constant_columns_map_to_zero():
  table = np.array([[1.0, 2.0, 1.0], [1.0, 4.0, 1.0], [1.0, 6.0, 1.0]])
  mean, scale = adapter_lib.standardisation(table)
  z = (table - mean) / scale
  np.testing.assert_allclose(z[:, 0], 0)
  np.testing.assert_allclose(z[:, 1], [-1.2247449, 0, 1.2247449], rtol=1e-6)


@pytest.fixture(scope="module")
def tiny_sampler(tmp_path_factory):
  tmodel = make_torch_llama(tie=True, seed=5)
  _, model = loading.load_llama_safetensors(save_torch(tmodel, tmp_path_factory.mktemp("e")))
  return model, sampling.Sampler(model)


def test_generate_embeddings_equals_generate_ids_on_token_embeddings(tiny_sampler):
  model, sampler = tiny_sampler
  prompts = [[5, 17, 3, 88, 40], [61, 2], [7, 7, 30, 12, 9, 9, 1]]
  params = sampling.SamplingParams(max_tokens=6, repetition_penalty=1.3, no_repeat_ngram=2)
  ref = sampler.generate_ids(prompts, params)
  p = sampling.bucket(max(map(len, prompts)), sampler.min_bucket)
  tokens, mask = sampler._pad(prompts, p)  # noqa: SLF001 (the same left padding)
  emb = model.embed(jnp.asarray(tokens))
  out = sampler.generate_embeddings(emb, mask, params, tokens=tokens)
  np.testing.assert_array_equal(out.tokens, ref.tokens)
  np.testing.assert_allclose(out.logprobs, ref.logprobs, rtol=1e-5, atol=1e-5)


def test_generate_embeddings_soft_token_changes_only_its_row(tiny_sampler):
  model, sampler = tiny_sampler
  prompts = [[5, 17, 3, 88, 40, 2, 9, 11], [61, 2], [7, 7, 30]]
  p = sampling.bucket(max(map(len, prompts)), sampler.min_bucket)
  tokens, mask = sampler._pad(prompts, p)  # noqa: SLF001
  emb = np.asarray(model.embed(jnp.asarray(tokens)))
  # The same settings and buckets as the test above: the compiled decode is reused.
  params = sampling.SamplingParams(max_tokens=6, repetition_penalty=1.3, no_repeat_ngram=2)
  base = sampler.generate_embeddings(emb, mask, params, tokens=tokens)
  emb2 = emb.copy()
  emb2[0, -4] = 3.0 * np.random.default_rng(0).normal(size=emb.shape[-1])  # a "soft token"
  moved = sampler.generate_embeddings(emb2, mask, params, tokens=tokens)
  assert not np.array_equal(base.logprobs[0], moved.logprobs[0])
  np.testing.assert_array_equal(base.tokens[1:], moved.tokens[1:])
  np.testing.assert_allclose(base.logprobs[1:], moved.logprobs[1:], rtol=1e-6, atol=1e-6)
  with pytest.raises(ValueError, match="left-padded"):
    sampler.generate_embeddings(emb, np.fliplr(mask), params)
