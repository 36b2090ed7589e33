"""Continuous batching (``models/continuous.py``) answers each request as a batch of one would.

The reference is ``Sampler.generate_ids`` on the request alone (itself checked against PyTorch
``generate`` in ``test_sampling.py``). Few slots and short chunks force requests to join rows that
are mid-decode, rows to leave early (mixed token budgets, stop ids) and the cache to shift.
"""


import numpy as np
import pytest
from decoder_fixtures import make_torch_llama, save_torch, smollm2_sampler

from eagle_jax.env import local
from eagle_jax.models import continuous, loading, sampling

MODES = {
    "greedy": sampling.SamplingParams(max_tokens=12, stop_ids=()),
    "history": sampling.SamplingParams(max_tokens=12, repetition_penalty=1.6, no_repeat_ngram=2,
                                       stop_ids=()),
    "sampled": sampling.SamplingParams(max_tokens=12, temperature=0.9, top_k=20, top_p=0.9,
                                       stop_ids=()),
}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  _, model = loading.load_llama_safetensors(
      save_torch(make_torch_llama(tie=False, seed=3), tmp_path_factory.mktemp("c")))
  return sampling.Sampler(model)


def workload(seed: int, n: int = 11) -> list[list[int]]:
  """Prompts of 3..40 tokens; rows 0-4 share a 24-token prefix (vocabulary 97)."""
  rng = np.random.default_rng(seed)
  head = [10] + rng.integers(1, 97, 23).tolist()
  rows = [head + rng.integers(1, 97, 1 + 3 * i).tolist() for i in range(5)]
  return rows + [rng.integers(1, 97, int(rng.integers(3, 40))).tolist() for _ in range(n - 5)]


def hold_for_arrival(batcher, after_chunks: int = 0) -> None:
  """Makes the race these tests are about deterministic: the first time the worker looks for
  requests to admit after ``after_chunks`` decode chunks, it waits until one is queued. Without it
  a loaded machine can let the running decode finish before the test thread (or the HTTP server)
  gets to submit, and the test would measure the scheduler of the operating system."""
  take, armed = batcher._take, [True]

  def gated(*args):
    if armed[0] and batcher.chunks > after_chunks:
      armed[0] = False
      with batcher._cv:
        assert batcher._cv.wait_for(lambda: batcher._queue, timeout=600)
    return take(*args)

  batcher._take = gated


def one_by_one(sampler, rows, params, budgets, seeds):
  out = []
  for r, n, s in zip(rows, budgets, seeds):
    g = sampler.generate_ids([r], params.replace(max_tokens=n), seeds=[s])
    out.append((g.tokens[0][g.mask[0]].tolist(), g.logprobs[0][g.mask[0]]))
  return out


@pytest.mark.parametrize("mode", sorted(MODES))
@pytest.mark.parametrize("share", [False, True])
def test_equals_batch_of_one_tiny(tiny, mode, share):
  rows = workload(1)
  budgets = [12, 3, 9, 1, 12, 7, 5, 12, 2, 10, 6]
  seeds = [100 + 7 * i for i in range(len(rows))]
  # A stop id row 0 emits as its third token, so rows end early on it too.
  probe = one_by_one(tiny, rows[:1], MODES[mode], [12], seeds[:1])[0][0]
  params = MODES[mode].replace(stop_ids=(probe[2],))
  # With sharing, suffixes over 16 tokens make prefixes of their own (rows 0-4 share one), and
  # the rows' own cache is narrow enough to shift.
  batcher = continuous.ContinuousBatcher(tiny, slots=4, chunk=3, share_prefix=share,
                                         suffix_cap=16)
  try:
    # Queued under the worker's lock, so it sees all of them at once and admits them the same
    # way in both rounds whatever the machine's load (the compile counts below compare rounds).
    with batcher._cv:
      futures = [batcher.submit(r, params.replace(max_tokens=n), s)
                 for r, n, s in zip(rows, budgets, seeds)]
    got = [f.result(timeout=600) for f in futures]
    counts = batcher.compile_counts()
    # The same shapes again (other seeds): nothing compiles. Programs are bounded by the
    # admission buckets (1, 2, 4) x prompt buckets for prefills and inserts, one decode per mode.
    with batcher._cv:
      again = [batcher.submit(r, params.replace(max_tokens=n), s + 1)
               for r, n, s in zip(rows, budgets, seeds)]
    [f.result(timeout=600) for f in again]
    after = batcher.compile_counts()
    if mode != "sampled":  # other seeds change nothing greedy: the same admissions
      assert after == counts
    widths = len({sampling.bucket(len(r)) for r in rows}) + (3 if share else 0)
    # One decode program per mode, and with sharing one per shape of the prefixes the rows read
    # (G prefixes x R seats, each gathered by a view program) and one for rows that read none.
    assert after["compact"] == 1, after
    assert after["decode"] <= (after["view"] + 1 if share else 1), after
    assert after["prefill"] <= 3 * widths and after["insert"] <= 3 * widths, after
  finally:
    batcher.close()
  want = one_by_one(tiny, rows, params, budgets, seeds)
  for i, (answer, (tokens, logprobs)) in enumerate(zip(got, want)):
    assert answer.tokens == tokens, i
    np.testing.assert_allclose(answer.logprobs, logprobs, atol=1e-5)
    assert len(tokens) <= budgets[i]
  assert any(len(t) < n for (t, _), n in zip(want, budgets))  # a stop id ended some row early
  assert batcher.admissions > 2 and batcher.compactions > 0


def test_late_short_request_does_not_wait_for_long_one(tiny):
  """A request sent while a long one decodes joins at the next chunk and is answered first."""
  params = MODES["greedy"]
  batcher = continuous.ContinuousBatcher(tiny, slots=2, chunk=2)
  hold_for_arrival(batcher)
  try:
    rows = workload(2)
    finished = []  # futures in the order the worker completes them
    long = batcher.submit(rows[0], params.replace(max_tokens=32), 1)
    long.add_done_callback(finished.append)  # cannot be done: the worker waits for the next one
    while batcher.chunks == 0:  # the long row is decoding
      pass
    with batcher._cv:  # the worker cannot admit (let alone finish) it before the callback is on
      short = batcher.submit(rows[1], params.replace(max_tokens=2), 2)
      short.add_done_callback(finished.append)
    assert len(long.result(timeout=600).tokens) == 32
    # Order of completion, not what is done when the test thread wakes: on a loaded machine the
    # long row can also be done by then.
    assert finished == [short, long]
    assert batcher.chunks < 17  # the short request did not add chunks of its own
    want = one_by_one(tiny, rows[:2], params, [32, 2], [1, 2])
    assert long.result().tokens == want[0][0] and short.result().tokens == want[1][0]
  finally:
    batcher.close()


def test_groups_and_errors(tiny):
  batcher = continuous.ContinuousBatcher(tiny, slots=4, chunk=4)
  try:
    rows = workload(3)
    a = [batcher.submit(r, MODES["greedy"], 1) for r in rows[:3]]
    b = [batcher.submit(r, MODES["sampled"], 2) for r in rows[3:6]]
    want_a = one_by_one(tiny, rows[:3], MODES["greedy"], [12] * 3, [1] * 3)
    want_b = one_by_one(tiny, rows[3:6], MODES["sampled"], [12] * 3, [2] * 3)
    assert [f.result(timeout=600).tokens for f in a] == [t for t, _ in want_a]
    assert [f.result(timeout=600).tokens for f in b] == [t for t, _ in want_b]
    with pytest.raises(ValueError, match="stop_ids"):
      batcher.submit(rows[0], MODES["greedy"].replace(stop_ids=None), 0)
    with pytest.raises(ValueError, match="token ids"):
      batcher.submit([97], MODES["greedy"], 0)
  finally:
    batcher.close()
  with pytest.raises(RuntimeError, match="closed"):
    batcher.submit(rows[0], MODES["greedy"], 0)


@pytest.mark.slow
def test_local_sampler_continuous_equals_batch_of_one_smollm2():
  """Real SmolLM2 behind ``LocalSampler(continuous=True)``: chat transition prompts (two states,
  four actions each) with mixed budgets, four slots, prefix sharing; each answer equals the
  sampler's batch of one on that prompt. Greedy runs as top-k 1 (one compiled program)."""
  sampler = smollm2_sampler()
  backend = local.LocalSampler(sampler, continuous=True, slots=4, chunk=4, share_prefix=True)
  states = ["Plot: A lighthouse keeper finds a map in a bottle and sails to an island.",
            "Plot: Two rival chefs in Lyon must cook together for a wedding."]
  actions = ["Make it a comedy.", "Set it in space.", "Add a talking dog.", "Make it a musical."]
  messages = [[{"role": "user", "content": f"{s}\n\nChange: {a}\n\nRewrite the plot."}]
              for s in states for a in actions]
  base = sampling.SamplingParams(max_tokens=12, temperature=1.0, top_k=1)
  params = [base.replace(seed=i, max_tokens=4 + (5 * i) % 9) for i in range(len(messages))]
  try:
    answers = backend.generate_sync(messages, params)
  finally:
    backend.batcher.close()
  tok = sampler.tokenizer
  for i, (m, q, answer) in enumerate(zip(messages, params, answers)):
    ids = list(tok.apply_chat_template(m, tokenize=True))
    g = sampler.generate_ids([ids], q.replace(stop_ids=tok.stop_ids), seeds=[q.seed])
    want = g.tokens[0][g.mask[0]].tolist()
    assert answer.tokens == tuple(tok.decode([t], skip_special_tokens=False) for t in want), i
    np.testing.assert_allclose(answer.token_logprobs, g.logprobs[0][g.mask[0]], atol=1e-4)
  assert backend.batcher.admissions > 1


def test_server_request_joins_a_running_decode(tmp_path):
  """``EnvServer`` over ``LocalSampler(continuous=True)`` (a tiny random Llama with SmolLM2's
  tokenizer): a short request sent while a long one decodes is answered first, and both answers
  are the in-process batch of one."""
  import asyncio

  import tokenizers
  from decoder_fixtures import tiny_agent_decoder

  from eagle_jax.env import openai as openai_lib
  from eagle_jax.env import server as server_lib
  from eagle_jax.env.client import SamplingParams
  from eagle_jax.models.tokenizer import Tokenizer

  folder = tiny_agent_decoder(tmp_path / "d")
  _, model = loading.load_llama_safetensors(folder)
  tok = Tokenizer(tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json")))
  sampler = sampling.Sampler(model, tok)
  backend = local.LocalSampler(sampler, continuous=True, slots=2, chunk=2, model_id="tiny")
  long_p, short_p = "A lighthouse keeper finds a map", "Two rival chefs"
  long_q = SamplingParams(max_tokens=48, seed=3)
  short_q = SamplingParams(max_tokens=3, seed=4)

  async def go():
    srv = server_lib.EnvServer(backend, max_batch=1, batch_wait_ms=0.0)
    port = await srv.start("127.0.0.1", 0)
    try:
      async with openai_lib.OpenAIClient(f"http://127.0.0.1:{port}", "tiny",
                                         timeout_s=600) as client:
        await client.generate([short_p], [short_q])  # compiles, untimed
        chunks = backend.batcher.chunks
        hold_for_arrival(backend.batcher, chunks)
        finished = []  # tasks in the order they complete (callbacks are queued in that order)
        long = asyncio.ensure_future(client.generate([long_p], [long_q]))
        long.add_done_callback(finished.append)
        while backend.batcher.chunks == chunks:  # the long request is decoding
          await asyncio.sleep(0.001)
        short = asyncio.ensure_future(client.generate([short_p], [short_q]))
        short.add_done_callback(finished.append)
        answers = (await long)[0], (await short)[0]
        await asyncio.sleep(0)  # the done callbacks run
        assert finished == [short, long]
        return answers
    finally:
      await srv.stop()
      backend.batcher.close()

  long_a, short_a = asyncio.run(go())
  for prompt, q, answer in ((long_p, long_q, long_a), (short_p, short_q, short_a)):
    g = sampler.generate_ids([tok.encode_prompt(prompt)], q.replace(stop_ids=tok.stop_ids),
                             seeds=[q.seed])
    assert answer.completion_tokens == int(g.lengths[0])
    assert answer.text == tok.decode([t for t in g.tokens[0][g.mask[0]] if t not in tok.stop_ids])
