"""Prefix-shared decoding (``models/prefix.py``) gives the tokens of unshared decoding.

The reference is the sampler's unshared decode (itself checked against PyTorch ``generate`` in
``test_sampling.py``) and, for greedy decoding on the tiny model, PyTorch ``generate`` directly.
Float sums run over different shapes in the two layouts, so a near-tie could in principle flip a
token; none did in these tests (every comparison below is exact on tokens), and log-probs agree
to 1e-5 on the tiny model.
"""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from decoder_fixtures import make_torch_llama, save_torch, smollm2_sampler
from flax import nnx

from eagle_jax import assets
from eagle_jax.env import local
from eagle_jax.models import attention, loading, prefix, sampling
from eagle_jax.models.attention import attend_shared_prefix
from eagle_jax.models.llama import LlamaConfig

NEW = 12
GREEDY = sampling.SamplingParams(max_tokens=NEW, stop_ids=())
SAMPLED = sampling.SamplingParams(max_tokens=NEW, temperature=0.9, top_k=20, stop_ids=())
HISTORY = sampling.SamplingParams(max_tokens=NEW, repetition_penalty=1.6, no_repeat_ngram=2,
                                  stop_ids=())


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  tmodel = make_torch_llama(tie=False, seed=3)
  _, model = loading.load_llama_safetensors(save_torch(tmodel, tmp_path_factory.mktemp("p")))
  return tmodel, sampling.Sampler(model)


def batch(seed: int, long: int = 40, short: int = 24) -> list[list[int]]:
  """Rows 0-3 share ``long`` tokens (rows 0 and 3 are the same prompt), rows 4-5 share ``short``
  tokens, rows 6-7 share nothing; the first tokens keep the groups apart (vocabulary 97)."""
  rng = np.random.default_rng(seed)
  a = [10] + rng.integers(1, 97, long - 1).tolist()
  b = [20] + rng.integers(1, 97, short - 1).tolist()
  suffix = lambda first, n: [first] + rng.integers(1, 97, n - 1).tolist()
  s0 = suffix(1, 3)
  return [a + s0, a + suffix(2, 7), a + suffix(3, 12), a + s0, b + [7], b + suffix(8, 5),
          suffix(30, 9), suffix(40, 14)]


def torch_greedy(tmodel, prompt):
  ids = torch.tensor([prompt])
  with torch.no_grad():
    out = tmodel.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW,
                          min_new_tokens=NEW, do_sample=False, pad_token_id=0, eos_token_id=None)
  return out[0, len(prompt):].tolist()


def test_plan_groups_by_shared_prefix():
  rows = batch(0)
  plan = prefix.plan(rows, min_shared=16, min_bucket=16, pad_id=0, bucket=sampling.bucket)
  assert plan.groups == ((0, 1, 2, 3), (4, 5)) and plan.prefix_lengths == (40, 24)
  # G = 2 prefixes in [2, 48] (prefix bucket of 40), B = 8 suffixes in [8, 16]; unshared [8, 64].
  assert (plan.cost, plan.unshared_cost) == (2 * 48 + 8 * 16, 8 * 64)
  inputs = plan.inputs
  assert inputs.prefix_tokens.shape == (2, 48) and inputs.suffix_tokens.shape == (8, 16)
  assert inputs.row_prefix[:6].tolist() == [0, 0, 0, 0, 1, 1]
  assert inputs.row_shared.tolist() == [True] * 6 + [False] * 2
  for i, row in enumerate(rows):  # prefix + suffix give back every prompt
    k = inputs.row_prefix[i]
    head = inputs.prefix_tokens[k][inputs.prefix_mask[k]].tolist() if inputs.row_shared[i] else []
    assert head + inputs.suffix_tokens[i][inputs.suffix_mask[i]].tolist() == row, i


def test_plan_rules():
  system = list(range(1, 21))  # 20 tokens behind every prompt
  state = lambda s: system + [50 + s] * 60
  rows = [state(s) + [90 + a, 3, 4] for s in range(2) for a in range(3)]
  plan = prefix.plan(rows, min_shared=16, min_bucket=16, pad_id=0, bucket=sampling.bucket)
  # Two states fork separately (80 shared tokens each), not once at the 20-token system prompt.
  assert plan.groups == ((0, 1, 2), (3, 4, 5)) and plan.prefix_lengths == (80, 80)
  # The same prompt twice keeps one suffix token; too short a common prefix is not shared.
  same = prefix.plan([rows[0], rows[0]], min_shared=16, min_bucket=16, pad_id=0,
                     bucket=sampling.bucket)
  assert same.prefix_lengths == (len(rows[0]) - 1,)
  assert prefix.plan([system + [1] * 40, system[:15] + [2] * 40], min_shared=16, min_bucket=16,
                     pad_id=0, bucket=sampling.bucket) is None
  # Sharing only when it saves prefill slots: beside an unrelated 60-token row (suffix bucket 64,
  # as unshared), 17 shared tokens would add a prefix pass: 24 + 3 * 64 > 3 * 64.
  pair = [system[:17] + [1] * 40, system[:17] + [2] * 40, [60] * 60]
  assert prefix.plan(pair, min_shared=16, min_bucket=16, pad_id=0, bucket=sampling.bucket) is None
  sliding = LlamaConfig(vocab_size=8, hidden=8, intermediate=8, layers=2, heads=2, kv_heads=1,
                        head_dim=4, layer_types=("sliding_attention", "full_attention"),
                        sliding_window=4)
  assert prefix.supports(sliding.replace(layer_types=None)) and not prefix.supports(sliding)


def lone_row_batch() -> list[list[int]]:
  """Two states of 3 actions and a third state's lone action (a batch cut inside a state's K),
  every prompt 83 tokens behind a 20-token system prompt."""
  system = list(range(1, 21))
  state = lambda s: system + [50 + s] * 60
  return [state(s) + [90 + a, 3, 4] for s in range(2) for a in range(3)] + [state(2) + [93, 3, 4]]


def test_plan_gives_a_lone_long_row_its_own_prefix():
  rows = lone_row_batch()
  plan = prefix.plan(rows, min_shared=16, min_bucket=16, pad_id=0, bucket=sampling.bucket)
  assert plan.groups == ((0, 1, 2), (3, 4, 5), (6,)) and plan.prefix_lengths == (80, 80, 80)
  # 3 prefixes of 80 tokens in [3, 96] and 7 suffixes of 3 in [7, 16]. Leaving the lone row
  # unshared would push its 83 tokens into every suffix ([7, 96]: 2 * 96 + 7 * 96); the best
  # such plan forks once at the system prompt: [1, 24] + [7, 64]. Unshared: [7, 96].
  assert (plan.cost, plan.unshared_cost) == (3 * 96 + 7 * 16, 7 * 96)
  assert 3 * 96 + 7 * 16 < 24 + 7 * 64
  assert plan.inputs.row_shared.tolist() == [True] * 7
  for i, row in enumerate(rows):
    k = plan.inputs.row_prefix[i]
    head = plan.inputs.prefix_tokens[k][plan.inputs.prefix_mask[k]].tolist()
    assert head + plan.inputs.suffix_tokens[i][plan.inputs.suffix_mask[i]].tolist() == row, i
  # A short lone row stays unshared (its own prefix would cost a prefix row for nothing).
  short = prefix.plan(rows[:6] + [[7, 8, 9]], min_shared=16, min_bucket=16, pad_id=0,
                      bucket=sampling.bucket)
  assert short.groups == ((0, 1, 2), (3, 4, 5)) and not short.inputs.row_shared[6]


def test_lone_row_prefix_decodes_like_pytorch(tiny):
  tmodel, sampler = tiny
  rows = lone_row_batch()
  res = sampler.generate_ids(rows, GREEDY, share_prefix=True)
  assert sampler.last_plan.groups[-1] == (6,)
  for i, row in enumerate(rows):
    assert res.tokens[i].tolist() == torch_greedy(tmodel, row), i


@pytest.mark.parametrize("params", [GREEDY, SAMPLED, HISTORY], ids=["greedy", "sampled",
                                                                     "penalty_ngram"])
def test_shared_equals_unshared_tiny(tiny, params):
  tmodel, sampler = tiny
  rows = batch(1)
  seeds = [100 + i for i in range(len(rows))]
  plain = sampler.generate_ids(rows, params, seeds=seeds)
  assert sampler.last_plan is None
  shared = sampler.generate_ids(rows, params, seeds=seeds, share_prefix=True)
  assert sampler.last_plan.groups == ((0, 1, 2, 3), (4, 5))
  np.testing.assert_array_equal(shared.tokens, plain.tokens)
  np.testing.assert_array_equal(shared.mask, plain.mask)
  np.testing.assert_allclose(shared.logprobs, plain.logprobs, atol=1e-5)
  sampler.copy_prefix = True  # the decode on per-row copies of the prefix (continuous layout)
  try:
    copied = sampler.generate_ids(rows, params, seeds=seeds, share_prefix=True)
  finally:
    sampler.copy_prefix = False
  np.testing.assert_array_equal(copied.tokens, plain.tokens)
  np.testing.assert_allclose(copied.logprobs, plain.logprobs, atol=1e-5)
  if params is GREEDY:
    for i, row in enumerate(rows):
      assert shared.tokens[i].tolist() == torch_greedy(tmodel, row), i
  if params is SAMPLED:  # fold-in keys (``seed=``) too; the same compiled program
    plain = sampler.generate_ids(rows, params, seed=7)
    shared = sampler.generate_ids(rows, params, seed=7, share_prefix=True)
    np.testing.assert_array_equal(shared.tokens, plain.tokens)
    np.testing.assert_allclose(shared.logprobs, plain.logprobs, atol=1e-5)
    assert not np.array_equal(shared.tokens, sampler.generate_ids(rows, GREEDY).tokens)


def test_padded_prefix_batch_and_one_token_suffixes(tiny):
  """Five prefixes (bucketed to 6: one all-padding prefix row), three rows each, two of them the
  same prompt with a one-token suffix; greedy against PyTorch."""
  tmodel, sampler = tiny
  rng = np.random.default_rng(6)
  rows = []
  for g in range(5):
    head = [g + 1] + rng.integers(1, 97, 17 + 5 * g).tolist()
    rows += [head + rng.integers(1, 97, n).tolist() for n in (1 + g, 3, 2)]
  rows[1] = rows[0]
  res = sampler.generate_ids(rows, GREEDY, share_prefix=True)
  plan = sampler.last_plan
  assert plan.prefix_lengths == (18, 23, 28, 33, 38) and len(rows[0]) == 19
  assert plan.inputs.prefix_tokens.shape[0] == 6 and not plan.inputs.prefix_mask[5].any()
  for i, row in enumerate(rows):
    assert res.tokens[i].tolist() == torch_greedy(tmodel, row), i


def test_same_buckets_do_not_recompile(tiny):
  _, sampler = tiny
  sampler.generate_ids(batch(2), GREEDY, share_prefix=True)
  compiled = sampler.compile_count()
  assert compiled >= 1
  shapes = [x.shape for x in sampler.last_plan.inputs]
  # New contents, and shorter prefixes in the same buckets (48 prefix, 16 suffix slots).
  for rows in (batch(3), batch(4, long=35, short=20)):
    sampler.generate_ids(rows, GREEDY, share_prefix=True)
    assert [x.shape for x in sampler.last_plan.inputs] == shapes
    assert sampler.compile_count() == compiled


def test_sharded_sampler_shares_by_default(tmp_path):
  """A sampler on a mesh built with ``share_prefix=True`` forks (2 prefixes over a 2x2 batch
  sharding) and still decodes PyTorch's greedy tokens."""
  from eagle_jax import parallel

  tmodel = make_torch_llama(tie=False, seed=3)
  mesh = parallel.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  _, model = loading.load_llama_safetensors(save_torch(tmodel, tmp_path), mesh=mesh)
  sampler = sampling.Sampler(model, mesh=mesh, share_prefix=True)
  rows = batch(5)
  res = sampler.generate_ids(rows, GREEDY)
  assert sampler.last_plan.groups == ((0, 1, 2, 3), (4, 5))
  for i, row in enumerate(rows):
    assert res.tokens[i].tolist() == torch_greedy(tmodel, row), i
  sampler.generate_ids(rows, GREEDY, share_prefix=False)
  assert sampler.last_plan is None


STATE = ("The user is a 34-year-old film enthusiast who watched The Matrix, Inception, Interstellar,"
         " Blade Runner 2049 and Arrival last month, rated the first three highly and the last two"
         " with three stars. They prefer fast-paced science fiction with strong visuals, dislike"
         " slow dramas and musicals, and watch late in the evening on weekends. Lately they have"
         " explored older classics such as 2001: A Space Odyssey and Solaris, but found the pacing"
         " slow.")
ACTIONS = ["Dune (2021)", "The Godfather", "La La Land", "Tenet", "Alien (1979)", "Moon (2009)",
           "Mad Max: Fury Road", "Ex Machina"]


@pytest.mark.slow
def test_shared_equals_unshared_smollm2():
  """Eight transition-like chat prompts (one state, eight actions) on the real SmolLM2.

  Greedy decoding runs as top-k sampling with k = 1 (the argmax, whatever the key), so the greedy
  and the seeded comparison share one compiled program per path: a SmolLM2 decode compile takes
  ~30 s on 2 busy cores. The greedy program itself (argmax instead of a draw after the same
  prefill) is compared on the tiny model above.
  """
  sampler = smollm2_sampler()
  tok = sampler.tokenizer
  messages = [[{"role": "system", "content": "You simulate a movie viewer. Answer briefly."},
               {"role": "user", "content": f"{STATE}\nAction: recommend {a}. How does the user"
                                           " react?"}] for a in ACTIONS]
  rows = [list(tok.apply_chat_template(m, tokenize=True)) for m in messages]
  greedy = sampling.SamplingParams(max_tokens=16, temperature=1.0, top_k=1, stop_ids=tok.stop_ids)
  seeds = [7 * i + 1 for i in range(8)]
  plain = sampler.generate_ids(rows, greedy, seeds=seeds)
  shared = sampler.generate_ids(rows, greedy, seeds=seeds[::-1], share_prefix=True)
  assert sampler.last_plan.groups == (tuple(range(8)),)
  assert sampler.last_plan.prefix_lengths[0] > 100
  np.testing.assert_array_equal(shared.tokens, plain.tokens)
  np.testing.assert_allclose(shared.logprobs, plain.logprobs, atol=1e-4)
  compiled = sampler.compile_count()

  # Seeded sampling; the shared side through LocalSampler(share_prefix=True), which reorders the
  # rows (per-row seeds make that irrelevant) and renders the same chat prompts.
  sampled = greedy.replace(temperature=0.8, top_k=40)
  plain = sampler.generate_ids(rows, sampled, seeds=seeds)
  backend = local.LocalSampler(sampler, share_prefix=True)
  answers = backend.generate_sync(
      messages, [sampled.replace(seed=s, stop_ids=None) for s in seeds])
  assert sampler.last_plan is not None and sampler.last_plan.groups == (tuple(range(8)),)
  for i, answer in enumerate(answers):
    ids = plain.tokens[i][plain.mask[i]].tolist()
    assert answer.tokens == tuple(tok.decode([t], skip_special_tokens=False) for t in ids), i
    np.testing.assert_allclose(answer.token_logprobs, plain.logprobs[i][plain.mask[i]], atol=1e-4)
  assert len({a.text for a in answers}) > 1
  assert sampler.compile_count() == compiled


@pytest.mark.slow
def test_shared_equals_unshared_smollm2_mixed_precision_up_to_bf16_ties():
  """The same on SmolLM2 in "mixed" precision (bf16 weights and matmul operands). Both paths
  attend to the same bf16 keys and values, but the float32 activations that are rounded to bf16
  before each matmul differ by reassociation between the two layouts, and a flipped rounding moves
  a log-prob by up to a few hundredths of a nat, not float32's 1e-5. So rows agree token for
  token until, at most, a tie at that resolution: there both chosen tokens have (nearly) the same
  log-prob, and every row that diverges is counted."""
  tok = smollm2_sampler().tokenizer
  _, model = loading.load_llama_gguf(assets.smollm2_gguf(), **loading.precision_dtypes("mixed"))
  sampler = sampling.Sampler(model, tok)
  rows = [list(tok.apply_chat_template(
      [{"role": "user", "content": f"{STATE}\nAction: recommend {a}. How does the user react?"}],
      tokenize=True)) for a in ACTIONS]
  greedy = sampling.SamplingParams(max_tokens=24, temperature=0.0, stop_ids=tok.stop_ids)
  plain = sampler.generate_ids(rows, greedy)
  shared = sampler.generate_ids(rows, greedy, share_prefix=True)
  assert sampler.last_plan.groups == (tuple(range(8)),)
  assert plain.lengths.min() > 4
  diverged = 0
  for i in range(len(rows)):
    differ = np.flatnonzero(plain.tokens[i] != shared.tokens[i])
    upto = differ[0] if len(differ) else int(plain.lengths[i])
    np.testing.assert_allclose(shared.logprobs[i, :upto], plain.logprobs[i, :upto], atol=0.1)
    if len(differ):  # a tie: the two paths' top tokens are (nearly) equally likely
      diverged += 1
      assert abs(plain.logprobs[i, upto] - shared.logprobs[i, upto]) < 0.1, i
  # One of 8 rows parted in 24 tokens when written; where every row parts, something is off.
  assert diverged <= len(rows) // 2, diverged


def _softmax_attention(q, k, v, allowed, scale):
  """NumPy reference: q [T, H, hd], k/v [S, KVH, hd], allowed [T, S] -> [T, H, hd]."""
  h, kvh = q.shape[1], k.shape[1]
  out = np.zeros_like(q)
  for head in range(h):
    kk, vv = k[:, head // (h // kvh)], v[:, head // (h // kvh)]
    s = np.where(allowed, q[:, head] @ kk.T * scale, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    out[:, head] = (p / p.sum(-1, keepdims=True)) @ vv
  return out


def test_attend_shared_prefix_equals_attention_over_prefix_and_own_slots():
  """Uneven groups (3 rows, 1 row, an all-padding prefix), empty seats and a row without prefix,
  against NumPy softmax attention over each row's real prefix tokens followed by its own slots."""
  rng = np.random.default_rng(0)
  b, t, s, h, kvh, hd, g, pp = 5, 2, 6, 4, 2, 8, 3, 7
  q = rng.normal(size=(b, t, h, hd)).astype(np.float32)
  k, v = (rng.normal(size=(b, kvh, s, hd)).astype(np.float32) for _ in range(2))
  pk, pv = (rng.normal(size=(g, kvh, pp, hd)).astype(np.float32) for _ in range(2))
  key_mask = np.ones((b, s), bool)
  key_mask[:, :2] = False  # left padding of the own slots
  key_mask[1, 2] = False
  query_slots = np.array([4, 5], np.int32)
  pmask = np.zeros((g, pp), bool)
  pmask[0, 2:] = True
  pmask[1, 4:] = True  # prefix 2: all padding (a bucketed group count)
  row_prefix = np.array([0, 1, 0, 0, 0], np.int32)
  row_shared = np.array([True, True, True, False, True])
  seats = np.array([[0, 2, 4], [1, b, b], [b, b, b]], np.int32)
  row_seat = np.array([0, 3, 1, 9, 2], np.int32)
  out = np.asarray(attend_shared_prefix(q, k, v, key_mask, query_slots, pk, pv,
                                        pmask[row_prefix] & row_shared[:, None], seats, row_seat,
                                        0.3))
  for i in range(b):
    own_ok = key_mask[i][None, :] & (np.arange(s)[None, :] <= query_slots[:, None])
    pre = pmask[row_prefix[i]] if row_shared[i] else np.zeros(pp, bool)
    kk = np.concatenate([pk[row_prefix[i]].transpose(1, 0, 2), k[i].transpose(1, 0, 2)])
    vv = np.concatenate([pv[row_prefix[i]].transpose(1, 0, 2), v[i].transpose(1, 0, 2)])
    allowed = np.concatenate([np.broadcast_to(pre, (t, pp)), own_ok], axis=1)
    np.testing.assert_allclose(out[i], _softmax_attention(q[i], kk, vv, allowed, 0.3),
                               rtol=1e-5, atol=1e-5, err_msg=f"row {i}")


@pytest.mark.parametrize("window", [None, 50])
def test_prefill_from_slot_0_runs_in_causal_blocks_equal_to_numpy(window):
  """T = S = 300 queries and key slots (blocks of 128, 128 and 44), left padding, GQA, and a
  sliding window, against NumPy softmax attention over every visible slot."""
  rng = np.random.default_rng(1)
  b, t, h, kvh, hd = 2, 300, 4, 2, 8
  assert t > 2 * attention.CAUSAL_BLOCK and t % attention.CAUSAL_BLOCK
  q = rng.normal(size=(b, t, h, hd)).astype(np.float32)
  k, v = (rng.normal(size=(b, kvh, t, hd)).astype(np.float32) for _ in range(2))
  key_mask = np.ones((b, t), bool)
  key_mask[1, :37] = False  # left padding
  slots = np.arange(t)
  out = np.asarray(attention.attend(q, k, v, key_mask, slots.astype(np.int32), 0.3, window))
  for i in range(b):
    allowed = key_mask[i][None, :] & (slots[None, :] <= slots[:, None])
    if window is not None:
      allowed &= slots[None, :] > slots[:, None] - window
    want = _softmax_attention(q[i], k[i].transpose(1, 0, 2), v[i].transpose(1, 0, 2),
                              allowed, 0.3)
    real = key_mask[i]  # padding queries see nothing real; their output is not used
    np.testing.assert_allclose(out[i][real], want[real], rtol=1e-5, atol=1e-5, err_msg=f"row {i}")


def test_shared_decode_keeps_only_suffix_and_decode_slots_per_row(tiny):
  """The plan seats each group's rows once; the rows' own cache is ``Ps + N`` slots wide."""
  _, sampler = tiny
  rows = batch(1)
  plan = prefix.plan(rows, min_shared=sampler.min_shared, min_bucket=sampler.min_bucket,
                     pad_id=sampler.pad_id, bucket=sampling.bucket)
  seats = plan.inputs.seats
  assert seats.shape == (2, 4)
  assert [sorted(x for x in r if x < len(rows)) for r in seats.tolist()] == [[0, 1, 2, 3], [4, 5]]
  model = nnx.merge(sampler.graphdef, sampler.state)
  inputs = prefix.SharedInputs(*map(jnp.asarray, plan.inputs))
  _, cache, shared = prefix.shared_prefill(model, inputs, 16)
  assert cache.k.shape[3] == plan.inputs.suffix_tokens.shape[1] + 16
  assert shared.k.shape[1:3] == (2, model.config.kv_heads)


def _state_rows(states: int, k: int, template: int = 30, state_len: int = 100) -> list[list[int]]:
  """``states`` groups of ``k`` rows: a common template, a state of ``state_len`` tokens, one
  action token; sorted by token ids, as ``LocalSampler`` orders a call's rows."""
  rng = np.random.default_rng(0)
  common = rng.integers(1, 97, template).tolist()
  texts = [[s // 7 + 1, s % 7 + 1] + rng.integers(1, 97, state_len).tolist() for s in range(states)]
  return sorted(common + texts[s] + [a] for s in range(states) for a in range(k))


def test_shared_cuts_end_chunks_between_prefix_groups():
  # 40 states x 5 actions in chunks of <= 64 rows: 12 whole states a chunk, none split.
  assert local.shared_cuts(_state_rows(40, 5), 64) == [60, 120, 180, 200]
  # Groups of 50: each chunk is one group; groups larger than a chunk are cut at the chunk size.
  assert local.shared_cuts(_state_rows(4, 50), 64) == [50, 100, 150, 200]
  assert local.shared_cuts(_state_rows(2, 100), 64) == [64, 100, 164, 200]
  # Fewer rows than a chunk: one chunk; identical rows: full chunks.
  assert local.shared_cuts(_state_rows(3, 5), 64) == [15]
  assert local.shared_cuts([[1, 2]] * 130, 64) == [64, 128, 130]
  for states, k, step in [(13, 7, 16), (9, 3, 8), (30, 5, 32)]:
    rows = _state_rows(states, k)
    cuts = local.shared_cuts(rows, step)
    sizes = np.diff([0, *cuts])
    assert cuts[-1] == len(rows) and (sizes >= 1).all() and (sizes <= step).all()
    if k <= step // 2:  # every state fits in the half-chunk window: none is split
      assert all(rows[e - 1][:132] != rows[e][:132] for e in cuts[:-1])


def test_local_sampler_chunks_keep_each_state_in_one_decode(tmp_path):
  """A call of 6 states x 5 actions in decode batches of at most 16 rows: each chunk holds whole
  states (one prefix each, no state prefilled twice), and every answer is the prompt's greedy
  decode alone."""
  import tokenizers
  from decoder_fixtures import tiny_agent_decoder

  from eagle_jax.models.tokenizer import Tokenizer

  folder = tiny_agent_decoder(tmp_path / "d")
  _, model = loading.load_llama_safetensors(folder)
  tok = Tokenizer(tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json")))
  sampler = sampling.Sampler(model, tok)
  backend = local.LocalSampler(sampler, batch_buckets=(8, 16), share_prefix=True)
  states = [f"State {s}: " + " ".join(f"w{s}x{j}" for j in range(40)) for s in range(6)]
  prompts = [f"{x}\nAction: do thing {a}." for x in states for a in range(5)]
  plans = []
  generate_ids = sampler.generate_ids

  def recording(ids, *args, **kwargs):
    out = generate_ids(ids, *args, **kwargs)
    plans.append([{prefix_state(ids[i]) for i in g} for g in sampler.last_plan.groups])
    return out

  def prefix_state(ids):
    return next(s for s, x in enumerate(states) if tok.decode(ids).startswith(x))

  sampler.generate_ids = recording
  params = sampling.SamplingParams(max_tokens=4)
  answers = backend.generate_sync(prompts, [params.replace(seed=i) for i in range(len(prompts))])
  sampler.generate_ids = generate_ids
  # 30 rows in chunks of <= 16 at state boundaries: 15 + 15 (not 16 + 14).
  assert [len(p) for p in plans] == [3, 3]
  groups = [g for p in plans for g in p]
  assert all(len(g) == 1 for g in groups)
  assert sorted(s for g in groups for s in g) == list(range(6))
  for prompt, answer in zip(prompts, answers):
    alone = sampler.generate_ids([tok.encode(prompt)], params.replace(stop_ids=()),
                                 share_prefix=False)
    assert answer.text == alone.texts[0], prompt
  # 4 states x 3 actions padded to 16 rows: the 4 copies are spread over the states (one each),
  # so no group's seats grow to 7 rows.
  backend.generate_sync([prompts[5 * s + a] for s in range(4) for a in range(3)], [params] * 12)
  assert sorted(len(g) for g in sampler.last_plan.groups) == [4, 4, 4, 4]
