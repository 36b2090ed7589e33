"""The OpenAI-compatible server on loopback, driven by the real client.

Fast tests use a deterministic pure-Python ``EchoBackend`` (tests only) to check validation (400),
overload (503), batching and the response format. Slow tests use the real SmolLM2-135M-Instruct:
``LocalSampler`` rows against the decoder's own ``Sampler`` (the independent reference for per-row
seeds), the in-process server against in-process decoding (greedy), and a ``launch.serve_env``
subprocess that is SIGKILLed mid-run and restarted while a ``CachedClient`` keeps going.
"""

from __future__ import annotations

import asyncio
import json
import os
import pathlib
import re
import signal
import subprocess
import sys
import time

import aiohttp
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

  async def generate(self, prompts, params, *, on_result=None):
    self.calls.append(len(prompts))
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
])
def test_server_rejects_bad_chat_requests(payload, field):
  async def run(url, srv):
    async with aiohttp.ClientSession() as s:
      return await _post(s, url + "/v1/chat/completions", payload)

  code, body = asyncio.run(_serve(EchoBackend(), run))
  assert code == 400 and body["error"]["param"] == field


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
          _post(s, url + "/v1/completions", {"model": "echo", "prompt": p, "max_tokens": 2})
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
          "model": "echo", "messages": [{"role": "user", "content": "q"}], "max_tokens": 3})
    return code, body, health, models, code_chat, chat

  code, body, health, models, code_chat, chat = asyncio.run(_serve(EchoBackend(), run))
  assert code == 200 and body["object"] == "text_completion"
  assert [c["text"] for c in body["choices"]] == [
      '"a"|11|16|False', f'"b"|{client_lib.prompt_seed(11, 1)}|16|False']
  assert body["usage"]["completion_tokens"] == 4
  assert health["status"] == "ok" and health["model"] == "echo"
  assert models["data"][0]["id"] == "echo"
  assert code_chat == 200 and chat["object"] == "chat.completion"
  assert chat["choices"][0]["message"] == {
      "role": "assistant", "content": '[{"role": "user", "content": "q"}]|0|3|True'}


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
      sampling.SamplingParams(max_new_tokens=8, temperature=0.9, top_p=0.95),
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
