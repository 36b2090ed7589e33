"""KV-cache sampler and continuation scoring against PyTorch transformers (generate, processors)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from decoder_fixtures import make_torch_llama, save_torch, smollm2, smollm2_sampler

from eagle_jax.models import loading, sampling
from eagle_jax.models import logits as logits_lib

NEW = 10


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  tmodel = make_torch_llama(tie=False, seed=3)
  _, model = loading.load_llama_safetensors(save_torch(tmodel, tmp_path_factory.mktemp("s")))
  return tmodel, sampling.Sampler(model)


PROMPTS = [[5, 17, 3, 88, 40, 2, 9], [61], [7, 7, 30, 12], [90, 1, 45, 45, 45, 2, 8, 64, 11, 3, 19,
                                                            50, 70, 33, 21, 4, 60]]


def torch_generate(tmodel, prompt, **kwargs):
  ids = torch.tensor([prompt])
  with torch.no_grad():
    out = tmodel.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW,
                          min_new_tokens=NEW, do_sample=False, pad_token_id=0,
                          eos_token_id=None, **kwargs)
  return out[0, len(prompt):].tolist()


def torch_logprobs(tmodel, prompt, continuation):
  ids = torch.tensor([list(prompt) + list(continuation)])
  with torch.no_grad():
    logp = torch.log_softmax(tmodel(ids).logits[0].double(), dim=-1).numpy()
  n = len(prompt)
  return np.array([logp[n - 1 + j, t] for j, t in enumerate(continuation)])


def test_greedy_batch_with_left_padding_equals_torch_generate(tiny):
  tmodel, sampler = tiny
  res = sampler.generate_ids(PROMPTS, sampling.SamplingParams(max_tokens=NEW, stop_ids=()))
  assert res.tokens.shape == (4, NEW) and res.mask.all()
  for i, prompt in enumerate(PROMPTS):
    expected = torch_generate(tmodel, prompt)
    assert res.tokens[i].tolist() == expected, i
    np.testing.assert_allclose(res.logprobs[i], torch_logprobs(tmodel, prompt, expected),
                               atol=1e-4)
  np.testing.assert_allclose(res.total_logprob, res.logprobs.sum(1), rtol=1e-6)


def test_repetition_penalty_and_no_repeat_ngram_equal_torch_generate(tiny):
  tmodel, sampler = tiny
  params = sampling.SamplingParams(max_tokens=NEW, repetition_penalty=1.8,
                                   no_repeat_ngram=2, stop_ids=())
  res = sampler.generate_ids(PROMPTS, params)
  plain = sampler.generate_ids(PROMPTS, sampling.SamplingParams(max_tokens=NEW, stop_ids=()))
  assert not np.array_equal(res.tokens, plain.tokens)  # the options change the output here
  for i, prompt in enumerate(PROMPTS):
    expected = torch_generate(tmodel, prompt, repetition_penalty=1.8, no_repeat_ngram_size=2)
    assert res.tokens[i].tolist() == expected, i


def test_stop_token_ends_row(tiny):
  tmodel, sampler = tiny
  expected = torch_generate(tmodel, PROMPTS[0])
  k = next(j for j in range(1, NEW) if expected[j] not in expected[:j])
  res = sampler.generate_ids(
      PROMPTS[:2], sampling.SamplingParams(max_tokens=NEW, stop_ids=(expected[k],)))
  assert res.lengths[0] == k + 1
  assert res.tokens[0, : k + 1].tolist() == expected[: k + 1]
  assert res.mask[0].tolist() == [True] * (k + 1) + [False] * (NEW - k - 1)
  assert np.all(res.logprobs[0, k + 1:] == 0) and np.all(res.tokens[0, k + 1:] == sampler.pad_id)
  other = torch_generate(tmodel, PROMPTS[1])
  stop_at = other.index(expected[k]) + 1 if expected[k] in other else NEW
  assert res.lengths[1] == stop_at and res.tokens[1, :stop_at].tolist() == other[:stop_at]


def test_score_matches_torch(tiny):
  tmodel, sampler = tiny
  conts = [[4, 4, 9], [], [60, 2, 5, 1, 70, 33, 8, 12, 9], [3]]
  res = sampler.score(PROMPTS, conts)
  assert res.per_token.shape == (4, 9)
  for i, (p, c) in enumerate(zip(PROMPTS, conts)):
    ref = torch_logprobs(tmodel, p, c)
    np.testing.assert_allclose(res.per_token[i, : len(c)], ref, atol=1e-4)
    assert res.mask[i].sum() == len(c) and np.all(res.per_token[i, len(c):] == 0)
    assert res.total[i] == pytest.approx(ref.sum(), abs=5e-4)


def _hf_process(logits, input_ids, *, penalty=1.0, ngram=0, temperature=1.0, top_k=0, top_p=1.0):
  procs = transformers.LogitsProcessorList()
  if penalty != 1.0:
    procs.append(transformers.RepetitionPenaltyLogitsProcessor(penalty))
  if ngram:
    procs.append(transformers.NoRepeatNGramLogitsProcessor(ngram))
  if temperature != 1.0:
    procs.append(transformers.TemperatureLogitsWarper(temperature))
  if top_k:
    procs.append(transformers.TopKLogitsWarper(top_k))
  if top_p < 1.0:
    procs.append(transformers.TopPLogitsWarper(top_p))
  return procs(torch.tensor(input_ids), torch.tensor(logits)).numpy()


@pytest.mark.parametrize("opts", [
    dict(penalty=1.3),
    dict(ngram=2),
    dict(ngram=3, penalty=0.8),
    dict(temperature=0.7, top_k=5),
    dict(temperature=1.3, top_p=0.8),
    dict(temperature=0.9, top_k=20, top_p=0.5, penalty=1.2),
])
def test_process_logits_matches_transformers_processors(opts):
  rng = np.random.RandomState(0)
  b, v, length = 3, 40, 30
  logits = (rng.normal(size=(b, v)) * 3).astype(np.float32)
  ids = rng.randint(0, 12, (b, length))  # a small alphabet so n-grams repeat
  presence = np.zeros((b, v), bool)
  presence[np.arange(b)[:, None], ids] = True
  mode = logits_lib.Mode(greedy=False, top_k=opts.get("top_k", 0) > 0,
                        top_p=opts.get("top_p", 1.0) < 1, penalty=opts.get("penalty", 1.0) != 1,
                        ngram=opts.get("ngram", 0))
  knobs = logits_lib.Knobs(
      temperature=jnp.float32(opts.get("temperature", 1.0)), top_k=jnp.int32(opts.get("top_k", 0)),
      top_p=jnp.float32(opts.get("top_p", 1.0)), penalty=jnp.float32(opts.get("penalty", 1.0)),
      stop_ids=jnp.zeros((1,), jnp.int32), max_new=jnp.int32(1))
  banned = None
  if mode.ngram:
    banned = logits_lib.ngram_bans(jnp.asarray(ids, jnp.int32), jnp.ones((b, length), bool),
                                  jnp.int32(length), mode.ngram, v)
  ours = np.asarray(logits_lib.process_logits(jnp.asarray(logits), mode, knobs,
                                            jnp.asarray(presence), banned))
  ref = _hf_process(logits, ids, **opts)
  kept = np.isfinite(ref)
  changed = ~kept.all() or not np.allclose(ref, logits)
  assert kept.sum() > 0 and changed  # the options do something here
  np.testing.assert_array_equal(ours > -1e29, kept)
  np.testing.assert_allclose(ours[kept], ref[kept], rtol=1e-5, atol=1e-5)


def _truncate(logits: np.ndarray, opts: dict) -> np.ndarray:
  """``process_logits`` (jitted) with the temperature / top-k / top-p of ``opts`` on [B, V]."""
  mode = logits_lib.Mode(greedy=False, top_k="top_k" in opts, top_p="top_p" in opts,
                        penalty=False, ngram=0)
  knobs = logits_lib.Knobs(
      temperature=jnp.float32(opts.get("temperature", 1.0)), top_k=jnp.int32(opts.get("top_k", 0)),
      top_p=jnp.float32(opts.get("top_p", 1.0)), penalty=jnp.float32(1.0),
      stop_ids=jnp.zeros((1,), jnp.int32), max_new=jnp.int32(1))
  return np.asarray(jax.jit(logits_lib.process_logits, static_argnums=1)(
      jnp.asarray(logits), mode, knobs, None, None))


def _assert_truncation_matches_transformers(logits: np.ndarray, opts: dict) -> None:
  """``_truncate`` on ``logits`` [B, V] keeps exactly transformers' tokens, with their values, and
  cuts some but not all."""
  ours = _truncate(logits, opts)
  ref = _hf_process(logits, np.zeros((logits.shape[0], 1), np.int64), **opts)
  kept = np.isfinite(ref)
  assert 0 < kept.sum() < kept.size
  np.testing.assert_array_equal(ours > -1e29, kept)
  np.testing.assert_allclose(ours[kept], ref[kept], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("opts", [dict(top_p=0.9), dict(top_k=50), dict(top_k=300),
                                  dict(top_k=100, top_p=0.6), dict(temperature=0.7, top_p=0.95)])
@pytest.mark.parametrize("scale", [8.0, 1.0], ids=["peaked", "flat"])
def test_top_k_top_p_on_a_large_vocabulary_match_transformers(opts, scale):
  """V = 3000 > SORT_HEADS[0] (< SORT_HEADS[1]): peaked rows are decided by the sorted head, flat
  rows (whose head holds less than top_p of the mass) and k > head take the full sort; both as
  transformers."""
  rng = np.random.RandomState(1)
  b, v = 4, 3000
  logits = (rng.normal(size=(b, v)) * scale).astype(np.float32)
  head = np.sort(logits / opts.get("temperature", 1.0), axis=-1)[:, ::-1]
  mass = np.exp(head - np.logaddexp.reduce(head, axis=-1, keepdims=True))[:, :256].sum(-1)
  if "top_p" in opts and "top_k" not in opts:
    assert (mass.min() > opts["top_p"]) == (scale == 8.0)  # which path each case exercises
  _assert_truncation_matches_transformers(logits, opts)


@pytest.mark.parametrize("scale,tier", [(8.0, 0), (3.0, 1), (1.0, 2)])
def test_top_p_takes_the_shortest_deciding_head_and_matches_transformers(scale, tier):
  """V = 20000 (both heads shorter): rows whose 256 largest tokens hold top_p of the mass use that
  head; rows that need more use the 4096 head; flat rows the full sort. Every path keeps
  transformers' tokens, and the case's path is the one expected from numpy's masses."""
  rng = np.random.RandomState(2)
  b, v, top_p = 4, 20000, 0.9
  logits = (rng.normal(size=(b, v)) * scale).astype(np.float32)
  probs = np.exp(logits - np.logaddexp.reduce(logits, axis=-1, keepdims=True))
  desc = np.sort(probs, axis=-1)[:, ::-1]
  masses = [desc[:, :h].sum(-1).min() for h in logits_lib.SORT_HEADS]
  assert logits_lib.SORT_HEADS == (256, 4096)
  assert tier == next((i for i, m in enumerate(masses) if m >= top_p + 1e-4), 2)
  _assert_truncation_matches_transformers(logits, dict(top_p=top_p))


def test_sampling_distribution_matches_torch_softmax(tiny):
  tmodel, sampler = tiny
  prompt = PROMPTS[0]
  n = 4096
  params = sampling.SamplingParams(max_tokens=1, temperature=0.7, top_k=6, stop_ids=())
  res = sampler.generate_ids([prompt] * n, params, seed=1)
  with torch.no_grad():
    last = tmodel(torch.tensor([prompt])).logits[:, -1].float().numpy()
  ref = _hf_process(last, [prompt], temperature=0.7, top_k=6)[0]
  probs = np.exp(ref - ref.max())
  probs /= probs.sum()
  freq = np.bincount(res.tokens[:, 0], minlength=probs.size) / n
  assert set(np.flatnonzero(freq)) <= set(np.flatnonzero(probs))
  assert 0.5 * np.abs(freq - probs).sum() < 0.04
  # The reported log-probs are those of the untempered model distribution.
  raw = torch.log_softmax(torch.tensor(last[0]), -1).numpy()
  np.testing.assert_allclose(res.logprobs[:, 0], raw[res.tokens[:, 0]], atol=1e-4)


def test_sampling_is_deterministic_per_seed(tiny):
  _, sampler = tiny
  params = sampling.SamplingParams(max_tokens=NEW, temperature=1.0, top_p=0.95, stop_ids=())
  a = sampler.generate_ids(PROMPTS, params, seed=7)
  b = sampler.generate_ids(PROMPTS, params, seed=7)
  c = sampler.generate_ids(PROMPTS, params, seed=8)
  np.testing.assert_array_equal(a.tokens, b.tokens)
  assert not np.array_equal(a.tokens, c.tokens)


def test_bad_arguments_raise(tiny):
  _, sampler = tiny
  with pytest.raises(ValueError, match="top_p"):
    sampling.SamplingParams(top_p=0.0)
  with pytest.raises(ValueError, match="max_tokens"):
    sampling.SamplingParams(max_tokens=0)
  with pytest.raises(ValueError, match="temperature"):
    sampling.SamplingParams(temperature=-1.0)
  with pytest.raises(ValueError, match=r"prompts\[1\]: token ids must be in \[0, 97\)"):
    sampler.generate_ids([[1], [97]])
  with pytest.raises(ValueError, match=r"prompts\[0\] is empty"):
    sampler.generate_ids([[]])
  with pytest.raises(ValueError, match="2 prompts but 1 continuations"):
    sampler.score([[1], [2]], [[3]])
  with pytest.raises(ValueError, match="tokenizer"):
    sampler.generate(["hi"])


def test_bucket_sizes():
  assert [sampling.bucket(n) for n in (1, 16, 17, 24, 25, 33, 49, 65, 100)] == [
      16, 16, 24, 24, 32, 48, 64, 96, 128]


@pytest.mark.slow
def test_smollm2_answers_capital_of_france():
  sampler = smollm2_sampler()
  res = sampler.generate(["What is the capital of France?"],
                         sampling.SamplingParams(max_tokens=24), chat=True)
  assert "Paris" in res.texts[0], res.texts[0]
  assert res.tokens[0, res.lengths[0] - 1] == sampler.tokenizer.eos_id  # stopped on <|im_end|>
  assert res.lengths[0] < 24


@pytest.mark.slow
def test_smollm2_cached_greedy_equals_uncached_argmax_loop():
  _, model, tok = smollm2()
  sampler = smollm2_sampler()
  prompts = [tok.apply_chat_template([{"role": "user", "content": q}], tokenize=True)
             for q in ("Name a famous painter.", "Say hello.")]
  new = 6
  res = sampler.generate_ids(prompts, sampling.SamplingParams(max_tokens=new, stop_ids=()))
  length = max(len(p) for p in prompts) + new
  forward = jax.jit(lambda m, t: m(t)[0])
  for i, prompt in enumerate(prompts):
    buf = np.zeros((1, length), np.int32)  # right padding never affects earlier positions
    buf[0, : len(prompt)] = prompt
    cur = len(prompt)
    for _ in range(new):
      logits = forward(model, jnp.asarray(buf))
      buf[0, cur] = int(jnp.argmax(logits[0, cur - 1]))
      cur += 1
    assert res.tokens[i].tolist() == buf[0, len(prompt): cur].tolist(), i


def test_sharded_sampler_equals_torch_generate(tmp_path):
  from eagle_jax import parallel

  tmodel = make_torch_llama(tie=False, seed=3)
  mesh = parallel.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  _, model = loading.load_llama_safetensors(save_torch(tmodel, tmp_path), mesh=mesh)
  assert model.layers[0].mlp.w_up[...].sharding.spec == jax.P("fsdp", "tensor")
  sampler = sampling.Sampler(model, mesh=mesh)
  res = sampler.generate_ids(PROMPTS, sampling.SamplingParams(max_tokens=NEW, stop_ids=()))
  for i, prompt in enumerate(PROMPTS):
    assert res.tokens[i].tolist() == torch_generate(tmodel, prompt), i


def test_set_model_swaps_parameters(tmp_path):
  first = make_torch_llama(tie=False, seed=3)
  second = make_torch_llama(tie=False, seed=4)
  _, model_a = loading.load_llama_safetensors(save_torch(first, tmp_path / "a"))
  _, model_b = loading.load_llama_safetensors(save_torch(second, tmp_path / "b"))
  sampler = sampling.Sampler(model_a)
  params = sampling.SamplingParams(max_tokens=NEW, stop_ids=())
  assert sampler.generate_ids(PROMPTS[:1], params).tokens[0].tolist() == torch_generate(
      first, PROMPTS[0])
  sampler.set_model(model_b)
  assert sampler.generate_ids(PROMPTS[:1], params).tokens[0].tolist() == torch_generate(
      second, PROMPTS[0])
  _, tied_model = loading.load_llama_safetensors(
      save_torch(make_torch_llama(tie=True, seed=4), tmp_path / "c"))
  with pytest.raises(ValueError, match="set_model"):
    sampler.set_model(tied_model)


def test_row_samples_do_not_depend_on_batch_neighbours(tiny):
  """With per-row seeds, a row sampled alone equals the same row inside a larger batch."""
  _, sampler = tiny
  params = sampling.SamplingParams(max_tokens=6, temperature=1.0, stop_ids=())
  batch = sampler.generate_ids(PROMPTS, params, seeds=[11 + i for i in range(len(PROMPTS))])
  for i, prompt in enumerate(PROMPTS):
    alone = sampler.generate_ids([prompt], params, seeds=[11 + i])
    np.testing.assert_array_equal(alone.tokens[0], batch.tokens[i])
  other = sampler.generate_ids(PROMPTS, params, seeds=[21 + i for i in range(len(PROMPTS))])
  assert not np.array_equal(other.tokens, batch.tokens)
  with pytest.raises(ValueError, match="seeds: expected one per prompt"):
    sampler.generate_ids(PROMPTS, params, seeds=[1])


def test_draw_follows_the_softmax_and_never_draws_a_zero_probability_token():
  """``logits.draw`` (inverse transform sampling) against the exact softmax: 100,000 draws over a
  vocabulary that is not a multiple of the block, with banned tokens (a whole block of them, and
  the tail) pass a chi-square test and never hit a banned token; one-hot rows (first token, last
  token, both sides of a block boundary) always give their token; a row's draw depends on its
  own key and step only."""
  scipy_stats = pytest.importorskip("scipy.stats")
  v, rows, steps = 1000, 20000, 5
  block = logits_lib.DRAW_BLOCK
  rng = np.random.default_rng(0)
  scores = (0.5 * rng.normal(size=v)).astype(np.float32)
  scores[rng.random(v) < 0.2] = logits_lib.NEG_INF
  scores[block:2 * block] = logits_lib.NEG_INF
  scores[-7:] = logits_lib.NEG_INF
  keys = jax.random.split(jax.random.key(4), rows)
  draw = jax.jit(logits_lib.draw)
  tokens = np.concatenate([
      np.asarray(draw(jnp.broadcast_to(scores, (rows, v)), keys, jnp.full((rows,), s, jnp.int32)))
      for s in range(steps)])
  probs = np.exp(scores.astype(np.float64) - scores.max())
  probs /= probs.sum()
  counts = np.bincount(tokens, minlength=v)
  assert counts[probs == 0].sum() == 0
  live = probs > 0
  assert scipy_stats.chisquare(counts[live], probs[live] * tokens.size).pvalue > 1e-3
  for hot in (0, block - 1, block, v - 1):
    one = np.full((4, v), logits_lib.NEG_INF, np.float32)
    one[:, hot] = 3.0
    out = draw(jnp.asarray(one), keys[:4], jnp.arange(4, dtype=jnp.int32))
    np.testing.assert_array_equal(np.asarray(out), hot)
  pair = np.stack([scores, scores[::-1]])
  batch = np.asarray(draw(jnp.asarray(pair), keys[:2], jnp.array([3, 9], jnp.int32)))
  for i, step in enumerate((3, 9)):
    alone = draw(jnp.asarray(pair[i:i + 1]), keys[i:i + 1], jnp.array([step], jnp.int32))
    assert int(alone[0]) == batch[i]


def test_top_p_decides_each_row_alone_and_matches_transformers():
  """Rows of one batch needing each path (the 256 head, the 4096 head, the full sort; V = 20000):
  every row keeps transformers' tokens, and a row's truncation equals that row's alone (batch of
  one), bit for bit, whatever its neighbours need."""
  rng = np.random.RandomState(4)
  v, top_p = 20000, 0.9
  scales = np.array([8.0, 3.0, 1.0, 8.0, 3.0])[:, None]
  logits = (rng.normal(size=(5, v)) * scales).astype(np.float32)
  desc = np.sort(np.exp(logits.astype(np.float64)
                        - np.logaddexp.reduce(logits, -1, keepdims=True)), -1)[:, ::-1]
  tiers = [next((i for i, h in enumerate(logits_lib.SORT_HEADS) if desc[r, :h].sum()
                 >= top_p + 1e-4), 2) for r in range(5)]
  assert tiers == [0, 1, 2, 0, 1]  # the batch mixes all three paths
  # No token's mass before it lies within float32 summation error of top_p (seed 3 has one 1.5e-7
  # away, where float32 sums in any order may round either way): exact agreement is expected.
  assert np.abs(np.cumsum(desc, -1) - desc - top_p).min() > 1e-6
  _assert_truncation_matches_transformers(logits, dict(top_p=top_p))
  batch = _truncate(logits, dict(top_p=top_p))
  for r in range(5):
    np.testing.assert_array_equal(batch[r:r + 1], _truncate(logits[r:r + 1], dict(top_p=top_p)))
