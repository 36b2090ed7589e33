"""Sampling contract, response cache and the OpenAI HTTP client against small real aiohttp apps.

No model here: the HTTP peers are tiny aiohttp test apps written below (slow, failing, garbage and
well-behaved endpoints) on loopback ports, and the inner backend of the cache tests is a
deterministic pure-Python ``EchoBackend`` (tests only).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import threading
import time

import pytest
from aiohttp import web

from eagle_jax.env import cache as cache_lib
from eagle_jax.env import client as client_lib
from eagle_jax.env import openai as openai_lib
from eagle_jax.env.client import Completion, SamplingBackend, SamplingParams


class EchoBackend(SamplingBackend):
  """Deterministic test backend: answer = reversed prompt text + the prompt seed."""

  model_id = "echo"

  def __init__(self, fail_after: int | None = None):
    self.calls: list[int] = []
    self.fail_after = fail_after

  async def generate(self, prompts, params, *, on_result=None):
    self.calls.append(len(prompts))
    out = []
    for i, (p, q) in enumerate(zip(prompts, params)):
      if self.fail_after is not None and i >= self.fail_after:
        raise ConnectionError("echo backend died")
      text = json.dumps(p)[::-1][: q.max_tokens] + f"|{q.seed}"
      c = Completion(text=text, finish_reason="length", completion_tokens=q.max_tokens)
      out.append(c)
      if on_result is not None:
        on_result(i, c)
    return out


# --------------------------------------------------------------------------------------------------
# Contract.
# --------------------------------------------------------------------------------------------------


def test_prompt_seed_rule_matches_hand_computation():
  assert client_lib.prompt_seed(1234, 0) == 1234
  digest = hashlib.sha256(b"eagle_jax/1234/3").digest()
  assert client_lib.prompt_seed(1234, 3) == int.from_bytes(digest[:4], "big") & 0x7FFFFFFF
  seeds = [client_lib.prompt_seed(7, i) for i in range(200)]
  assert len(set(seeds)) == 200 and all(0 <= s < 2**31 for s in seeds)


def test_sample_gives_each_prompt_its_prompt_seed():
  backend = EchoBackend()
  texts = asyncio.run(backend.sample(["a", "a", "b"], max_tokens=50, temperature=0.5, seed=9))
  assert [t.rsplit("|", 1)[1] for t in texts] == [
      str(client_lib.prompt_seed(9, i)) for i in range(3)]
  assert texts[0] != texts[1]  # same prompt, different prompt seeds


@pytest.mark.parametrize("kwargs, field", [
    (dict(max_tokens=0), "max_tokens"),
    (dict(temperature=-1.0), "temperature"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_k=-2), "top_k"),
    (dict(repetition_penalty=0), "repetition_penalty"),
    (dict(stop=["ok", ""]), "stop"),
    (dict(seed=2**31), "seed"),
    (dict(max_tokens=True), "max_tokens"),
])
def test_sampling_params_errors_name_the_field(kwargs, field):
  with pytest.raises(ValueError, match=field):
    SamplingParams(**kwargs)


def test_sample_rejects_unknown_param_and_bad_prompts():
  backend = EchoBackend()
  with pytest.raises(ValueError, match="unknown sampling parameter.*top_q"):
    asyncio.run(backend.sample(["x"], max_tokens=4, top_q=0.5))
  with pytest.raises(ValueError, match="prompts: expected a list"):
    asyncio.run(backend.sample("x", max_tokens=4))
  with pytest.raises(ValueError, match=r"prompts\[0\]\[0\].role"):
    asyncio.run(backend.sample([[{"role": "robot", "content": "x"}]], max_tokens=4))


# --------------------------------------------------------------------------------------------------
# Response cache.
# --------------------------------------------------------------------------------------------------


def test_cache_key_is_sha256_of_canonical_json():
  params = SamplingParams(max_tokens=5, seed=3, stop=("\n",))
  expected = hashlib.sha256(json.dumps(
      {"model": "m", "prompt": "hi", "params": {
          "max_tokens": 5, "temperature": 0.0, "top_p": 1.0, "top_k": 0,
          "repetition_penalty": 1.0, "no_repeat_ngram": 0, "stop": ["\n"], "seed": 3,
          "chat": False}},
      sort_keys=True, separators=(",", ":")).encode()).hexdigest()
  assert cache_lib.cache_key("m", "hi", params) == expected
  assert cache_lib.cache_key("m", "hi", params.replace(seed=4)) != expected
  assert cache_lib.cache_key("m2", "hi", params) != expected
  assert cache_lib.cache_key("m", [{"role": "user", "content": "hi"}], params) != expected


def test_cache_survives_truncated_last_line_and_never_duplicates(tmp_path):
  path = tmp_path / "c.jsonl"
  params = SamplingParams(max_tokens=3)
  with cache_lib.ResponseCache(path) as cache:
    for i in range(3):
      k = cache_lib.cache_key("m", f"p{i}", params)
      assert cache.put(k, Completion(f"t{i}"), model="m", prompt=f"p{i}", params=params)
    assert not cache.put(k, Completion("other"), model="m", prompt="p2", params=params)
  good = path.read_bytes()
  assert good.count(b"\n") == 3
  path.write_bytes(good + b'{"key": "half-writ')  # a writer killed mid-line
  cache = cache_lib.ResponseCache(path)
  assert len(cache) == 3 and cache.skipped_lines == 1
  k3 = cache_lib.cache_key("m", "p3", params)
  assert cache.put(k3, Completion("t3"), model="m", prompt="p3", params=params)
  cache.close()
  reloaded = cache_lib.ResponseCache(path)
  assert len(reloaded) == 4 and reloaded.skipped_lines == 1
  assert reloaded.get(k3).text == "t3"
  assert reloaded.get(cache_lib.cache_key("m", "p1", params)).text == "t1"
  reloaded.close()


def test_cache_concurrent_threads_write_each_key_once(tmp_path):
  path = tmp_path / "c.jsonl"
  cache = cache_lib.ResponseCache(path)
  params = SamplingParams()

  def work(offset):
    for i in range(50):
      j = (i + offset) % 50
      cache.put(cache_lib.cache_key("m", str(j), params), Completion(str(j)), model="m",
                prompt=str(j), params=params)

  threads = [threading.Thread(target=work, args=(k * 7,)) for k in range(4)]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  cache.close()
  keys = [json.loads(line)["key"] for line in path.read_text().splitlines()]
  assert len(keys) == 50 and len(set(keys)) == 50


def test_cached_client_sends_only_misses(tmp_path):
  inner = EchoBackend()
  cached = cache_lib.CachedClient(inner, cache_lib.ResponseCache(tmp_path / "c.jsonl"))
  first = asyncio.run(cached.sample(["a", "b"], max_tokens=8, seed=1))
  assert inner.calls == [2]
  # "a" at index 0 keeps its prompt seed 1: a hit. "b" at index 0 has a new prompt seed: a miss.
  second = asyncio.run(cached.sample(["a", "b"], max_tokens=8, seed=1))
  third = asyncio.run(cached.sample(["a", "c", "c"], max_tokens=8, seed=1))
  assert second == first
  assert inner.calls == [2, 2]  # "c" twice, with two different prompt seeds
  assert third[0] == first[0]
  assert (cached.hits, cached.misses) == (3, 4)
  direct = asyncio.run(EchoBackend().sample(["a", "c", "c"], max_tokens=8, seed=1))
  assert third == direct


def test_cached_client_keeps_answers_of_an_interrupted_call(tmp_path):
  path = tmp_path / "c.jsonl"
  cached = cache_lib.CachedClient(EchoBackend(fail_after=2), cache_lib.ResponseCache(path))
  with pytest.raises(ConnectionError):
    asyncio.run(cached.sample(["a", "b", "c", "d"], max_tokens=8, seed=0))
  cached.cache.close()
  assert len(path.read_text().splitlines()) == 2
  resumed = cache_lib.CachedClient(EchoBackend(), cache_lib.ResponseCache(path))
  texts = asyncio.run(resumed.sample(["a", "b", "c", "d"], max_tokens=8, seed=0))
  assert resumed.inner.calls == [2] and resumed.hits == 2
  assert texts == asyncio.run(EchoBackend().sample(["a", "b", "c", "d"], max_tokens=8, seed=0))
  assert len(path.read_text().splitlines()) == 4


# --------------------------------------------------------------------------------------------------
# OpenAI client against small aiohttp apps.
# --------------------------------------------------------------------------------------------------


class _Peer:
  """A scripted OpenAI-ish endpoint.

  ``script(attempt, body)`` returns ``(delay_s, status, text)`` or ``(delay_s, status, text,
  headers)``; ``times`` records when each request arrived.
  """

  def __init__(self, script):
    self.script = script
    self.bodies: list[dict] = []
    self.headers: list[dict] = []
    self.times: list[float] = []

  async def handle(self, request: web.Request) -> web.StreamResponse:
    body = await request.json()
    self.times.append(time.monotonic())
    self.bodies.append(body)
    self.headers.append(dict(request.headers))
    delay, status, text, *headers = self.script(len(self.bodies), body)
    if delay:
      await asyncio.sleep(delay)
    return web.Response(status=status, text=text, content_type="application/json",
                        headers=headers[0] if headers else None)


def _ok(text: str, chat: bool = False) -> str:
  choice = {"index": 0, "finish_reason": "stop"}
  choice.update({"message": {"role": "assistant", "content": text}} if chat else {"text": text})
  return json.dumps({"choices": [choice], "usage": {"completion_tokens": 3}})


async def _with_peer(peer: _Peer, fn, models: list[str] | None = ("m",)):
  """Serves ``peer`` on loopback (``GET /v1/models`` lists ``models``; None: no such route)."""
  app = web.Application()
  app.router.add_post("/v1/completions", peer.handle)
  app.router.add_post("/v1/chat/completions", peer.handle)
  if models is not None:
    listing = {"object": "list", "data": [{"id": m, "object": "model"} for m in models]}

    async def list_models(request: web.Request) -> web.Response:
      del request
      return web.json_response(listing)

    app.router.add_get("/v1/models", list_models)
  runner = web.AppRunner(app)
  await runner.setup()
  site = web.TCPSite(runner, "127.0.0.1", 0)
  await site.start()
  url = f"http://127.0.0.1:{runner.addresses[0][1]}"
  try:
    return await fn(url)
  finally:
    await runner.cleanup()


def _client(url, **kw):
  kw = {"timeout_s": 5.0, "max_retries": 3, "backoff_s": 0.01, "max_backoff_s": 0.05, **kw}
  return openai_lib.OpenAIClient(url, "m", **kw)


def test_openai_request_bodies_endpoints_and_api_key(monkeypatch):
  monkeypatch.setenv("EAGLE_TEST_KEY", "sk-secret-123")
  peer = _Peer(lambda n, body: (0, 200, _ok(f"ans{n}", chat="messages" in body)))

  async def run(url):
    async with _client(url + "/v1", api_key_env="EAGLE_TEST_KEY") as c:
      a = await c.sample(["hello", "world"], max_tokens=7, temperature=0.3, seed=5, stop=["\n"],
                         top_k=4)
      b = await c.sample([[{"role": "system", "content": "s"}, {"role": "user", "content": "u"}]],
                         max_tokens=2, repetition_penalty=1.2, no_repeat_ngram=3)
      d = await c.sample(["chat me"], max_tokens=2, chat=True)
      return a, b, d, c.model_id

  a, b, d, model_id = asyncio.run(_with_peer(peer, run))
  assert model_id == "openai:m"
  assert sorted(a) == ["ans1", "ans2"] and b == ["ans3"] and d == ["ans4"]
  by_prompt = {body.get("prompt"): body for body in peer.bodies[:2]}
  assert by_prompt["hello"] == {"model": "m", "prompt": "hello", "max_tokens": 7,
                                "temperature": 0.3, "top_p": 1.0, "seed": 5, "n": 1,
                                "stop": ["\n"], "top_k": 4}
  assert by_prompt["world"]["seed"] == client_lib.prompt_seed(5, 1)
  assert peer.bodies[2] == {"model": "m", "max_tokens": 2, "temperature": 0.0, "top_p": 1.0,
                            "seed": 0, "n": 1, "repetition_penalty": 1.2, "no_repeat_ngram": 3,
                            "messages": [{"role": "system", "content": "s"},
                                         {"role": "user", "content": "u"}]}
  assert peer.bodies[3]["messages"] == [{"role": "user", "content": "chat me"}]
  assert all(h["Authorization"] == "Bearer sk-secret-123" for h in peer.headers)


def test_openai_preflight_names_the_model_and_what_is_served():
  peer = _Peer(lambda n, body: (0, 200, _ok("never")))

  async def run(url):
    async with _client(url) as c:
      with pytest.raises(openai_lib.UnknownModelError) as info:
        await c.sample(["p"], max_tokens=3)
      return info.value

  err = asyncio.run(_with_peer(peer, run, models=["llama-3-8b", "qwen2"]))
  assert "'m'" in str(err) and "llama-3-8b" in str(err) and "qwen2" in str(err)
  assert err.model == "m" and err.served == ["llama-3-8b", "qwen2"]
  assert peer.bodies == []  # refused before any completion request

  async def run_checked(url):
    async with _client(url) as c:
      served = await c.check_model()
      return served, await c.sample(["p"], max_tokens=3)

  assert asyncio.run(_with_peer(peer, run_checked, models=["x", "m"])) == (["x", "m"], ["never"])

  async def run_unchecked(url):
    async with _client(url) as c:
      return await c.sample(["p"], max_tokens=3)

  # A server without /v1/models is used unchecked.
  assert asyncio.run(_with_peer(peer, run_unchecked, models=None)) == ["never"]


def test_openai_slow_endpoint_times_out_then_retries_until_success():
  # The first two attempts take 1.5 s (> timeout 0.3 s); the third answers at once.
  peer = _Peer(lambda n, body: (1.5 if n <= 2 else 0, 200, _ok("late but fine")))

  async def run(url):
    async with _client(url, timeout_s=0.3) as c:
      return await c.sample(["p"], max_tokens=3), c.attempts

  texts, attempts = asyncio.run(_with_peer(peer, run))
  assert texts == ["late but fine"] and attempts == 3 and len(peer.bodies) == 3


def test_openai_timeouts_exhaust_retries_with_a_clear_error():
  peer = _Peer(lambda n, body: (1.0, 200, _ok("never")))

  async def run(url):
    async with _client(url, timeout_s=0.2, max_retries=2) as c:
      with pytest.raises(openai_lib.RequestError) as info:
        await c.sample(["p"], max_tokens=3)
      return url, info.value

  url, err = asyncio.run(_with_peer(peer, run))
  assert err.attempts == 3 and len(peer.bodies) == 3
  assert f"{url}/v1/completions" in str(err) and "3 attempts" in str(err)
  assert "timed out" in str(err)


def test_openai_retries_429_and_5xx_but_not_400_and_masks_the_key(monkeypatch, caplog):
  monkeypatch.setenv("EAGLE_TEST_KEY", "sk-secret-456")
  statuses = {1: 429, 2: 503, 3: 500}
  busy = '{"error": {"message": "busy; your key sk-secret-456"}}'
  peer = _Peer(lambda n, body: (0, statuses.get(n, 200), _ok("ok") if n > 3 else busy))

  async def run(url):
    async with _client(url, api_key_env="EAGLE_TEST_KEY") as c:
      return await c.sample(["p"], max_tokens=3), c.attempts

  with caplog.at_level(logging.WARNING):
    assert asyncio.run(_with_peer(peer, run)) == (["ok"], 4)
  assert "retry 3/3" in caplog.text and "HTTP 429" in caplog.text
  assert "sk-secret-456" not in caplog.text and "***" in caplog.text

  bad = _Peer(lambda n, body: (0, 400, '{"error": "bad max_tokens; key sk-secret-456"}'))

  async def run_bad(url):
    async with _client(url, api_key_env="EAGLE_TEST_KEY") as c:
      with pytest.raises(openai_lib.RequestError) as info:
        await c.sample(["p"], max_tokens=3)
      return info.value

  err = asyncio.run(_with_peer(bad, run_bad))
  assert err.status == 400 and err.attempts == 1 and len(bad.bodies) == 1
  assert "bad max_tokens" in str(err)
  assert "sk-secret-456" not in str(err) and "***" in str(err)
  assert "sk-secret-456" not in repr(err.__cause__) + repr(err.__context__)

  down = _Peer(lambda n, body: (0, 502, "upstream gone"))

  async def run_down(url):
    async with _client(url, max_retries=2) as c:
      with pytest.raises(openai_lib.RequestError) as info:
        await c.sample(["p"], max_tokens=3)
      return info.value

  err = asyncio.run(_with_peer(down, run_down))
  assert err.status == 502 and err.attempts == 3 and "upstream gone" in str(err)


def test_openai_backoff_honours_retry_after_up_to_the_cap():
  # Attempt 1: 429 asking for 0.6 s (the own backoff would be <= 0.01 s); attempt 2: 503 asking
  # for 30 s, capped by max_backoff_s=0.8; attempt 3: success.
  answers = {1: (0, 429, "slow down", {"Retry-After": "0.6"}),
             2: (0, 503, "later", {"Retry-After": "30"})}
  peer = _Peer(lambda n, body: answers.get(n, (0, 200, _ok("ok"))))

  async def run(url):
    async with _client(url, backoff_s=0.01, max_backoff_s=0.8) as c:
      return await c.sample(["p"], max_tokens=3)

  assert asyncio.run(_with_peer(peer, run)) == ["ok"]
  gaps = [b - a for a, b in zip(peer.times, peer.times[1:])]
  assert len(gaps) == 2
  assert 0.6 <= gaps[0] < 3.0
  assert 0.8 <= gaps[1] < 5.0
  assert openai_lib.retry_after_s({"retry-after-ms": "250"}) == 0.25
  assert openai_lib.retry_after_s({"Retry-After": "soon"}) is None
  date = time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(time.time() + 100))
  assert 95 <= openai_lib.retry_after_s({"Retry-After": date}) <= 101


@pytest.mark.parametrize("text, match", [
    ("<html>Bad Gateway</html>", "not JSON"),
    ('{"choices": []}', "choices"),
    ('{"choices": [{"index": 0}]}', r"choices\[0\].text"),
    ('[1, 2]', "JSON object"),
])
def test_openai_malformed_responses_raise_clear_errors(text, match):
  peer = _Peer(lambda n, body: (0, 200, text))

  async def run(url):
    async with _client(url) as c:
      with pytest.raises(client_lib.MalformedResponseError, match=match) as info:
        await c.sample(["p"], max_tokens=3)
      return info.value

  err = asyncio.run(_with_peer(peer, run))
  assert "malformed response" in str(err) and len(peer.bodies) == 1


def test_openai_malformed_chat_response_names_the_field():
  peer = _Peer(lambda n, body: (0, 200, '{"choices": [{"message": {"role": "assistant"}}]}'))

  async def run(url):
    async with _client(url) as c:
      await c.sample(["p"], max_tokens=3, chat=True)

  with pytest.raises(client_lib.MalformedResponseError, match=r"choices\[0\].message.content"):
    asyncio.run(_with_peer(peer, run))


def test_openai_connection_refused_is_retried_then_reported():
  import socket

  with socket.socket() as s:  # a port with nobody listening
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]

  async def run():
    async with _client(f"http://127.0.0.1:{port}", max_retries=2) as c:
      with pytest.raises(openai_lib.RequestError, match="connection error") as info:
        await c.sample(["p"], max_tokens=3)
      return info.value

  err = asyncio.run(run())
  assert err.attempts == 3 and err.status is None and str(port) in err.url


def test_openai_concurrency_limit_is_respected():
  state = {"now": 0, "peak": 0}

  async def handle(request):
    state["now"] += 1
    state["peak"] = max(state["peak"], state["now"])
    await asyncio.sleep(0.05)
    state["now"] -= 1
    return web.Response(text=_ok("x"), content_type="application/json")

  async def run():
    app = web.Application()
    app.router.add_post("/v1/completions", handle)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    try:
      async with _client(f"http://127.0.0.1:{runner.addresses[0][1]}", max_concurrency=3) as c:
        return await c.sample([f"p{i}" for i in range(12)], max_tokens=2)
    finally:
      await runner.cleanup()

  assert asyncio.run(run()) == ["x"] * 12
  assert state["peak"] == 3


def test_openai_constructor_validation(monkeypatch):
  with pytest.raises(ValueError, match="base_url"):
    openai_lib.OpenAIClient("localhost:8000", "m")
  with pytest.raises(ValueError, match="model"):
    openai_lib.OpenAIClient("http://x", "")
  with pytest.raises(ValueError, match="default_chat"):
    openai_lib.OpenAIClient("http://x", "m", default_chat="yes")
  with pytest.raises(ValueError, match="max_concurrency"):
    openai_lib.OpenAIClient("http://x", "m", max_concurrency=0)
  with pytest.raises(ValueError, match="timeout_s"):
    openai_lib.OpenAIClient("http://x", "m", timeout_s=0)
  with pytest.raises(ValueError, match="max_retries"):
    openai_lib.OpenAIClient("http://x", "m", max_retries=-1)
  monkeypatch.setenv("EAGLE_TEST_KEY", "sk-secret-789")
  c = openai_lib.OpenAIClient("http://x:1/v1/", "served", api_key_env="EAGLE_TEST_KEY")
  assert c.base_url == "http://x:1" and c.model_id == "openai:served"
  assert "sk-secret-789" not in repr(c)
