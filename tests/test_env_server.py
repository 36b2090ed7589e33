"""The OpenAI-compatible server on loopback, driven by the official ``openai`` client and ours.

Fast tests use a deterministic pure-Python ``EchoBackend`` (tests only) to check validation (400),
overload (503), batching and the response format. Slow tests use the real SmolLM2-135M-Instruct:
``LocalSampler`` rows against the decoder's own ``Sampler`` (the independent reference for per-row
seeds), the in-process server against in-process decoding (greedy and seeded, with usage and
log-probs checked against the tokenizer and the decoder's teacher-forced scores), and a
``launch.serve_env`` subprocess that is SIGKILLed mid-run and restarted while a ``CachedClient``
keeps going.
"""

from __future__ import annotations

import asyncio
import errno
import json
import os
import pathlib
import re
import signal
import socket
import subprocess
import sys
import time

import aiohttp
import numpy as np
import openai
import pytest

from eagle_jax.env import cache as cache_lib
from eagle_jax.env import client as client_lib
from eagle_jax.env import openai as openai_lib
from eagle_jax.env import server as server_lib
from eagle_jax.env.client import Completion, SamplingBackend, SamplingParams

_REPO = pathlib.Path(__file__).resolve().parents[1]


class EchoBackend(SamplingBackend):
  """Deterministic test backend; ``delay`` seconds per call; records batch sizes."""

  model_id = "echo"

  def __init__(self, delay: float = 0.0):
    self.delay = delay
    self.calls: list[int] = []
    self.seen: list[SamplingParams] = []

  async def generate(self, prompts, params, *, on_result=None):
    self.calls.append(len(prompts))
    self.seen.extend(params)
    if self.delay:
      await asyncio.sleep(self.delay)
    for i, p in enumerate(prompts):
      if p == "too long":
        raise ValueError(f"prompts[{i}]: too many tokens for this model")
    return [Completion(text=f"{json.dumps(p)}|{q.seed}|{q.max_tokens}|{q.chat}",
                       finish_reason="stop", completion_tokens=2)
            for p, q in zip(prompts, params)]


async def _serve(backend, fn, **kw):
  srv = server_lib.EnvServer(backend, **kw)
  port = await srv.start("127.0.0.1", 0)
  try:
    return await fn(f"http://127.0.0.1:{port}", srv)
  finally:
    await srv.stop()


async def _post(session, url, payload):
  data = payload if isinstance(payload, (bytes, str)) else json.dumps(payload)
  async with session.post(url, data=data, headers={"Content-Type": "application/json"}) as r:
    return r.status, await r.json()


# --------------------------------------------------------------------------------------------------
# Fast: EchoBackend.
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("payload, status, field", [
    (b"{not json", 400, None),
    ([1, 2], 400, None),
    ({"prompt": "x"}, 400, "model"),
    ({"model": "echo"}, 400, "prompt"),
    ({"model": "echo", "prompt": 3}, 400, "prompt"),
    ({"model": "echo", "prompt": "x", "max_tokens": 10**6}, 400, "max_tokens"),
    ({"model": "echo", "prompt": "x", "max_tokens": "8"}, 400, "max_tokens"),
    ({"model": "echo", "prompt": "x", "temperature": -1}, 400, "temperature"),
    ({"model": "echo", "prompt": "x", "top_p": 2.0}, 400, "top_p"),
    ({"model": "echo", "prompt": "x", "n": 3}, 400, "n"),
    ({"model": "echo", "prompt": "x", "stream": True}, 400, "stream"),
    ({"model": "echo", "prompt": "x", "stop": [1]}, 400, "stop"),
    ({"model": "gpt-9", "prompt": "x"}, 400, "model"),
    ({"model": "echo", "prompt": "x", "max_tokens": 4, "max_completion_tokens": 5}, 400,
     "max_completion_tokens"),
    ({"model": "echo", "prompt": "x", "presence_penalty": 0.5}, 400, "presence_penalty"),
    ({"model": "echo", "prompt": "x", "frequency_penalty": -1}, 400, "frequency_penalty"),
    ({"model": "echo", "prompt": "x", "logit_bias": {"50256": -100}}, 400, "logit_bias"),
    ({"model": "echo", "prompt": "x", "echo": True}, 400, "echo"),
    ({"model": "echo", "prompt": "x", "best_of": 3}, 400, "best_of"),
    ({"model": "echo", "prompt": "x", "logprobs": 0}, 400, "logprobs"),  # Echo has no log-probs
    ({"model": "echo", "prompt": "x", "temprature": 0.5}, 400, "temprature"),  # a typo
    ({"model": "echo", "prompt": "x", "messages": []}, 400, "messages"),
    ({"model": "echo", "prompt": "x", "repeat_penalty": 1.1, "repetition_penalty": 1.2}, 400,
     "repeat_penalty"),
    ({"model": "echo", "prompt": "x", "repeat_penalty": 0}, 400, "repeat_penalty"),
])
def test_server_rejects_bad_completion_requests(payload, status, field):
  async def run(url, srv):
    async with aiohttp.ClientSession() as s:
      return await _post(s, url + "/v1/completions", payload), srv.batch_sizes

  (code, body), batches = asyncio.run(_serve(EchoBackend(), run, max_tokens_limit=512))
  assert code == status
  assert body["error"]["type"] == "invalid_request_error"
  if field is None:
    assert "JSON" in body["error"]["message"]
  else:
    assert body["error"]["param"] == field and f"'{field}'" in body["error"]["message"]
  assert batches == []  # nothing reached the backend


@pytest.mark.parametrize("payload, field", [
    ({"model": "echo"}, "messages"),
    ({"model": "echo", "messages": []}, "messages"),
    ({"model": "echo", "messages": [{"role": "wizard", "content": "x"}]}, "messages[0]"),
    ({"model": "echo", "messages": [{"role": "user", "content": 5}]}, "messages[0]"),
    ({"model": "echo", "messages": [{"role": "tool", "content": "x"}]}, "messages[0]"),
    ({"model": "echo", "messages": [{"role": "user", "content": "x", "name": "bob"}]},
     "messages[0].name"),
    ({"model": "echo", "messages": [{"role": "user", "content": [
        {"type": "text", "text": "look"}, {"type": "image_url", "image_url": {"url": "x"}}]}]},
     "messages[0].content[1]"),
    ({"model": "echo", "messages": [{"role": "user", "content": "x"}], "prompt": "y"}, "prompt"),
    ({"model": "echo", "messages": [{"role": "user", "content": "x"}], "logprobs": 1},
     "logprobs"),
])
def test_server_rejects_bad_chat_requests(payload, field):
  async def run(url, srv):
    async with aiohttp.ClientSession() as s:
      return await _post(s, url + "/v1/chat/completions", payload)

  code, body = asyncio.run(_serve(EchoBackend(), run))
  assert code == 400 and body["error"]["param"] == field
  assert f"'{field}'" in body["error"]["message"]


@pytest.mark.parametrize("chat, field, value", [
    (True, "presence_penalty", 0.5),
    (True, "frequency_penalty", 1.0),
    (True, "response_format", {"type": "json_object"}),
    (True, "tools", [{"type": "function", "function": {"name": "f", "parameters": {}}}]),
    (True, "tool_choice", "auto"),
    (True, "logit_bias", {"1": 5}),
    (True, "n", 2),
    (True, "top_logprobs", 2),
    (True, "stream", True),
    (False, "logprobs", 1),
    (False, "suffix", "end"),
])
def test_official_client_gets_bad_request_naming_unsupported_fields(chat, field, value):
  backend = EchoBackend()

  async def run(url, srv):
    async with openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0) as c:
      with pytest.raises(openai.BadRequestError) as info:
        if chat:
          await c.chat.completions.create(
              model="echo", messages=[{"role": "user", "content": "hi"}], **{field: value})
        else:
          await c.completions.create(model="echo", prompt="hi", **{field: value})
      return info.value

  err = asyncio.run(_serve(backend, run))
  assert err.status_code == 400 and f"'{field}'" in err.message
  assert err.body["param"] == field
  assert backend.calls == []


def test_official_client_chat_and_completions_follow_the_api():
  backend = EchoBackend()

  async def run(url, srv):
    async with openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0) as c:
      chat = await c.chat.completions.create(
          model="echo", max_completion_tokens=5, seed=7, presence_penalty=0, n=1,
          response_format={"type": "text"},
          messages=[{"role": "developer", "content": "be brief"},
                    {"role": "user", "content": [{"type": "text", "text": "a"},
                                                 {"type": "text", "text": "b"}]}],
          extra_body={"repeat_penalty": 1.3, "top_k": -1})
      same = await c.completions.create(model="echo", prompt="p", max_tokens=3, seed=7,
                                        extra_body={"max_completion_tokens": 3})
      unseeded = [await c.completions.create(model="echo", prompt="p", max_tokens=3)
                  for _ in range(3)]
      models = await c.models.list()
    return chat, same, unseeded, [m.id async for m in models]

  chat, same, unseeded, models = asyncio.run(_serve(backend, run))
  assert models == ["echo"]
  assert chat.object == "chat.completion" and chat.model == "echo"
  expected_prompt = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "a\nb"}]
  assert chat.choices[0].message.content == f"{json.dumps(expected_prompt)}|7|5|True"
  assert chat.choices[0].finish_reason == "stop" and chat.choices[0].logprobs is None
  assert (chat.usage.prompt_tokens, chat.usage.completion_tokens, chat.usage.total_tokens) == (
      0, 2, 2)  # EchoBackend reports no prompt tokens
  first = backend.seen[0]
  assert (first.repetition_penalty, first.top_k, first.max_tokens) == (1.3, 0, 5)
  assert same.choices[0].text == '"p"|7|3|False'
  # No seed: a fresh random seed per request (three equal draws from 2**31 would be a bug).
  seeds = [int(u.choices[0].text.split("|")[1]) for u in unseeded]
  assert len(set(seeds)) == 3 and all(0 <= s < 2**31 for s in seeds)


def test_server_answers_503_when_queue_is_full():
  backend = EchoBackend(delay=0.5)

  async def run(url, srv):
    async with aiohttp.ClientSession() as s:
      payload = {"model": "echo", "prompt": "x", "max_tokens": 2}
      return await asyncio.gather(*(_post(s, url + "/v1/completions", payload)
                                    for _ in range(8)))

  results = asyncio.run(_serve(backend, run, max_batch=1, max_queue=2))
  codes = [c for c, _ in results]
  assert set(codes) == {200, 503}
  assert 2 <= codes.count(200) <= 3  # at most the queue (2) + the batch being decoded (1)
  overloaded = [b for c, b in results if c == 503]
  assert all("max_queue=2" in b["error"]["message"] for b in overloaded)


def test_server_batches_concurrent_requests_and_keeps_seeds():
  backend = EchoBackend(delay=0.2)

  async def run(url, srv):
    async with openai_lib.OpenAIClient(url, "echo", max_concurrency=16) as c:
      texts = await c.sample([f"p{i}" for i in range(12)], max_tokens=5, seed=3)
      chat = await c.sample(["hi"], max_tokens=4, chat=True)
    return texts, chat, list(srv.batch_sizes)

  texts, chat, batches = asyncio.run(_serve(backend, run, max_batch=8, batch_wait_ms=20))
  assert texts == [f'"p{i}"|{client_lib.prompt_seed(3, i)}|5|False' for i in range(12)]
  assert chat == ['[{"role": "user", "content": "hi"}]|0|4|True']
  assert sum(batches) == 13 and max(batches) == 8 and len(batches) <= 4


def test_server_isolates_a_bad_prompt_from_its_batch():
  backend = EchoBackend(delay=0.05)

  async def run(url, srv):
    async with aiohttp.ClientSession() as s:
      return await asyncio.gather(*(
          _post(s, url + "/v1/completions",
                {"model": "echo", "prompt": p, "max_tokens": 2, "seed": 0})
          for p in ["fine", "too long", "also fine"])), list(srv.batch_sizes)

  results, batches = asyncio.run(_serve(backend, run, batch_wait_ms=100))
  assert batches == [3]  # decoded together, then rerun one by one after the failure
  assert backend.calls == [3, 1, 1, 1]
  assert [c for c, _ in results] == [200, 400, 200]
  assert results[0][1]["choices"][0]["text"] == '"fine"|0|2|False'
  assert "too many tokens" in results[1][1]["error"]["message"]


def test_server_list_prompt_health_and_models():
  async def run(url, srv):
    async with aiohttp.ClientSession() as s:
      code, body = await _post(s, url + "/v1/completions",
                               {"model": "echo", "prompt": ["a", "b"], "seed": 11})
      async with s.get(url + "/health") as r:
        health = await r.json()
      async with s.get(url + "/v1/models") as r:
        models = await r.json()
      code_chat, chat = await _post(s, url + "/v1/chat/completions", {
          "model": "echo", "messages": [{"role": "user", "content": "q"}], "max_tokens": 3,
          "seed": 0})
    return code, body, health, models, code_chat, chat

  code, body, health, models, code_chat, chat = asyncio.run(_serve(EchoBackend(), run))
  assert code == 200 and body["object"] == "text_completion"
  assert [c["text"] for c in body["choices"]] == [
      '"a"|11|16|False', f'"b"|{client_lib.prompt_seed(11, 1)}|16|False']
  assert body["usage"] == {"prompt_tokens": 0, "completion_tokens": 4, "total_tokens": 4}
  assert health["status"] == "ok" and health["model"] == "echo"
  assert models["data"][0]["id"] == "echo"
  assert code_chat == 200 and chat["object"] == "chat.completion"
  assert chat["choices"][0]["message"] == {
      "role": "assistant", "content": '[{"role": "user", "content": "q"}]|0|3|True'}


def test_busy_port_fails_fast_before_the_model_loads(tmp_path):
  with socket.socket() as busy:
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    port = busy.getsockname()[1]
    with pytest.raises(OSError) as info:
      server_lib.bind_socket("127.0.0.1", port)
    assert info.value.errno == errno.EADDRINUSE
    # The GGUF exists but is not a model: had serve_env loaded it first, that would be its error.
    fake = tmp_path / "not_a_model.gguf"
    fake.write_bytes(b"not a gguf file")
    t = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "launch.serve_env", f"--port={port}", f"--gguf={fake}"],
        cwd=_REPO, capture_output=True, text=True, timeout=300)
    elapsed = time.monotonic() - t
  assert proc.returncode == 1, proc.stderr
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1 and f"--port={port}" in lines[0] and "already in use" in lines[0], lines
  assert "jax" not in proc.stderr.lower() and elapsed < 60

  async def run():  # a socket from bind_socket is what the server then listens on
    sock = server_lib.bind_socket("127.0.0.1", 0)
    srv = server_lib.EnvServer(EchoBackend())
    try:
      port = await srv.start(sock=sock)
      async with aiohttp.ClientSession() as s:
        code, body = await _post(s, f"http://127.0.0.1:{port}/v1/completions",
                                 {"model": "echo", "prompt": "x", "seed": 1})
      return port, sock.getsockname()[1], code, body
    finally:
      await srv.stop()

  port, sock_port, code, body = asyncio.run(run())
  assert port == sock_port and code == 200 and body["choices"][0]["text"] == '"x"|1|16|False'


# --------------------------------------------------------------------------------------------------
# Slow: the real SmolLM2-135M-Instruct.
# --------------------------------------------------------------------------------------------------

_PROMPTS = ["The capital of France is", "My favourite film is about",
            "A robot walks into a bar and", "Rain in the desert"]
_SERVED = "smollm2-135m-instruct"


def _spawn_server(port: int, workdir: pathlib.Path) -> tuple[subprocess.Popen, pathlib.Path]:
  """Starts ``launch.serve_env`` (no wait); its output goes to a log file in ``workdir``."""
  env = dict(os.environ)
  env.pop("XLA_FLAGS", None)
  env["JAX_COMPILATION_CACHE_DIR"] = str(workdir / "xla")  # a restart reuses the first compile
  log = workdir / f"serve_env_{time.monotonic_ns()}.log"
  with open(log, "w") as out:
    proc = subprocess.Popen(
        [sys.executable, "-m", "launch.serve_env", f"--port={port}", "--max_batch=1",
         "--warmup_tokens=8", f"--model_name={_SERVED}"],
        cwd=_REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
  return proc, log


def _wait_serving(proc: subprocess.Popen, log: pathlib.Path, timeout_s: float = 900) -> int:
  """Waits for the ``serving ... on http://HOST:PORT`` line; returns the port."""
  deadline = time.time() + timeout_s
  while time.time() < deadline:
    for line in log.read_text().splitlines():
      if line.startswith("serving "):
        return int(line.rsplit(":", 1)[1])
    if proc.poll() is not None:
      raise RuntimeError(f"serve_env exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
    time.sleep(0.1)
  raise RuntimeError(f"serve_env did not start within {timeout_s} s")


@pytest.fixture(scope="module")
def early_server(tmp_path_factory):
  """A ``serve_env`` subprocess started first, so it loads and compiles while other tests run."""
  workdir = tmp_path_factory.mktemp("serve_env")
  proc, log = _spawn_server(0, workdir)
  yield proc, log, workdir
  if proc.poll() is None:
    proc.kill()
    proc.wait()


@pytest.fixture(scope="module")
def local_sampler(early_server):
  del early_server  # only started first
  from eagle_jax.env import local

  return local.LocalSampler.from_gguf(batch_buckets=(1, 4), model_id=_SERVED)


@pytest.mark.slow
def test_local_sampler_rows_equal_single_prompt_reference(local_sampler):
  from eagle_jax.models import sampling

  params = SamplingParams(max_tokens=8, temperature=0.9, top_p=0.95)
  prompts = _PROMPTS[:3]
  per_prompt = [params.replace(seed=client_lib.prompt_seed(21, i)) for i in range(3)]
  batched = local_sampler.generate_sync(prompts, per_prompt)
  ref = [local_sampler.sampler.generate_ids(
      [local_sampler.tokenizer.encode(p)],
      sampling.SamplingParams(max_tokens=8, temperature=0.9, top_p=0.95),
      seeds=[q.seed]) for p, q in zip(prompts, per_prompt)]
  assert [c.text for c in batched] == [r.texts[0] for r in ref]
  assert [c.completion_tokens for c in batched] == [int(r.lengths[0]) for r in ref]
  assert len({c.text for c in batched}) == 3


@pytest.fixture(scope="module")
def greedy_reference(local_sampler):
  params = [SamplingParams(max_tokens=8, seed=client_lib.prompt_seed(0, i))
            for i in range(len(_PROMPTS))]
  return [c.text for c in local_sampler.generate_sync(_PROMPTS, params)]


@pytest.mark.slow
def test_local_sampler_stop_strings_cut_the_greedy_answer(local_sampler, greedy_reference):
  # One stop string for all rows (equal params keep them in one decode batch): the second word of
  # the first reference answer, with the whitespace before it.
  stop = re.findall(r"\s\S+", greedy_reference[0])[1]
  params = [SamplingParams(max_tokens=8, seed=client_lib.prompt_seed(0, i), stop=(stop,))
            for i in range(len(_PROMPTS))]
  out = local_sampler.generate_sync(_PROMPTS, params)
  expected = [ref[: ref.index(stop)] if stop in ref else ref for ref in greedy_reference]
  assert [c.text for c in out] == expected
  assert all(c.finish_reason == "stop" for c, ref in zip(out, greedy_reference) if stop in ref)
  assert out[0].text != greedy_reference[0]


@pytest.mark.slow
def test_server_greedy_equals_in_process(local_sampler, greedy_reference):
  async def run(url, srv):
    async with openai_lib.OpenAIClient(url, _SERVED, max_concurrency=4) as c:
      texts = await c.sample(_PROMPTS, max_tokens=8, temperature=0.0)
    return texts, list(srv.batch_sizes)

  texts, batches = asyncio.run(_serve(local_sampler, run, max_batch=4, batch_wait_ms=200))
  assert texts == greedy_reference
  assert batches == [4]
  assert "Paris" in texts[0]


@pytest.mark.slow
def test_official_client_against_smollm2_follows_the_api(local_sampler):
  tok = local_sampler.tokenizer
  prompt, system = _PROMPTS[1], "You are brief."
  knobs = dict(temperature=0.9, top_p=0.95)

  async def run(url, srv):
    async with openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0) as c:
      seeded = [await c.completions.create(model=_SERVED, prompt=prompt, max_tokens=8, seed=21,
                                           logprobs=0, **knobs) for _ in range(2)]
      chat = await c.chat.completions.create(
          model=_SERVED, max_completion_tokens=8, seed=21, logprobs=True, top_logprobs=0,
          messages=[{"role": "developer", "content": system},
                    {"role": "user", "content": [{"type": "text", "text": prompt}]}], **knobs)
      hot = await asyncio.gather(*(c.completions.create(
          model=_SERVED, prompt=prompt, max_tokens=8, temperature=1.5, top_p=0.95)
          for _ in range(4)))
    return seeded, chat, hot

  seeded, chat, hot = asyncio.run(_serve(local_sampler, run, max_batch=4, batch_wait_ms=200))

  # Completions: the same seed gives the same text, which is in-process decoding's text.
  params = SamplingParams(max_tokens=8, seed=21, **knobs)
  ref = local_sampler.generate_sync([prompt], [params])[0]
  text = seeded[0].choices[0].text
  assert seeded[1].choices[0].text == text == ref.text
  usage = seeded[0].usage
  prompt_ids = tok.backend.encode(prompt, add_special_tokens=False).ids
  assert usage.prompt_tokens == len(prompt_ids) and usage.completion_tokens == ref.completion_tokens
  assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
  lp = seeded[0].choices[0].logprobs
  assert len(lp.tokens) == len(lp.token_logprobs) == usage.completion_tokens
  assert lp.text_offset == [len("".join(lp.tokens[:i])) for i in range(len(lp.tokens))]

  # Chat: "developer" is the system turn and text parts are the content. The prompt is counted
  # on ChatML written out by hand and tokenized by the raw tokenizers backend.
  chatml = (f"<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n{prompt}<|im_end|>\n"
            f"<|im_start|>assistant\n")
  chat_ids = tok.backend.encode(chatml, add_special_tokens=False).ids
  messages = [{"role": "system", "content": system}, {"role": "user", "content": prompt}]
  ref_chat = local_sampler.generate_sync([messages], [params.replace(chat=True)])[0]
  answer = chat.choices[0]
  assert answer.message.role == "assistant" and answer.message.content == ref_chat.text
  assert answer.finish_reason == ref_chat.finish_reason
  assert chat.usage.prompt_tokens == len(chat_ids)
  assert chat.usage.completion_tokens == ref_chat.completion_tokens <= 8  # max_completion_tokens
  assert chat.usage.total_tokens == len(chat_ids) + chat.usage.completion_tokens
  content = answer.logprobs.content
  assert len(content) == chat.usage.completion_tokens
  eos = "<|im_end|>" if answer.finish_reason == "stop" else ""
  assert "".join(c.token for c in content) == answer.message.content + eos
  assert all(c.bytes == list(c.token.encode()) and c.top_logprobs == [] for c in content)

  # Log-probs against the decoder's teacher-forced scores of the sampled tokens (a full forward
  # pass, not the KV-cache decode that produced them).
  rows = []
  for ids in (prompt_ids, chat_ids):
    out = local_sampler.sampler.generate_ids(
        [ids], params.replace(stop_ids=tuple(tok.stop_ids)), seeds=[21])
    rows.append([t for t, m in zip(out.tokens[0].tolist(), out.mask[0].tolist()) if m])
  assert [tok.decode([t], skip_special_tokens=False) for t in rows[0]] == lp.tokens
  assert [tok.decode([t], skip_special_tokens=False) for t in rows[1]] == [c.token for c in content]
  scores = local_sampler.sampler.score([prompt_ids, chat_ids], rows)
  np.testing.assert_allclose(lp.token_logprobs, scores.per_token[0, :len(rows[0])], atol=2e-3)
  np.testing.assert_allclose([c.logprob for c in content], scores.per_token[1, :len(rows[1])],
                             atol=2e-3)

  # No seed at a high temperature: requests get their own random seeds, hence different answers.
  assert len({h.choices[0].text for h in hot}) >= 2


@pytest.mark.slow
def test_kill_server_mid_run_then_restart_loses_and_duplicates_nothing(
    early_server, greedy_reference):
  proc, log, workdir = early_server
  port = _wait_serving(proc, log)
  cache_path = workdir / "responses.jsonl"
  state = {}

  def restart():
    new, new_log = _spawn_server(port, workdir)
    state["restarted"] = new
    _wait_serving(new, new_log)

  try:
    async def run():
      inner = openai_lib.OpenAIClient(f"http://127.0.0.1:{port}", _SERVED, max_concurrency=1,
                                      timeout_s=60, max_retries=80, backoff_s=0.2,
                                      max_backoff_s=2.0)
      client = cache_lib.CachedClient(inner, cache_lib.ResponseCache(cache_path))
      task = asyncio.ensure_future(client.sample(_PROMPTS, max_tokens=8, temperature=0.0))
      while len(client.cache) < 2:
        assert not task.done(), "the run finished before the server could be killed"
        await asyncio.sleep(0.02)
      proc.send_signal(signal.SIGKILL)
      proc.wait()
      state["at_kill"] = len(client.cache)
      await asyncio.to_thread(restart)
      texts = await task
      await client.aclose()
      client.cache.close()
      return texts, inner.attempts

    texts, attempts = asyncio.run(run())
  finally:
    new = state.get("restarted")
    if new is not None and new.poll() is None:
      new.kill()
      new.wait()
  assert 2 <= state["at_kill"] < len(_PROMPTS)
  assert attempts > len(_PROMPTS)  # some requests were retried across the restart
  assert texts == greedy_reference
  lines = cache_path.read_text().splitlines()
  keys = [json.loads(line)["key"] for line in lines]
  assert len(lines) == len(_PROMPTS) and len(set(keys)) == len(_PROMPTS)
  reloaded = cache_lib.ResponseCache(cache_path)
  assert len(reloaded) == len(_PROMPTS) and reloaded.skipped_lines == 0
