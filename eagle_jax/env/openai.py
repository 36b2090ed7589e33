"""OpenAI-compatible HTTP sampling client (vLLM, JetStream's OpenAI front end, ``serve_env.py``).

Each prompt is one HTTP request (``POST {base_url}/v1/completions`` with ``prompt`` for
``chat=False`` string prompts, ``POST {base_url}/v1/chat/completions`` with ``messages``
otherwise), carrying its prompt seed in ``seed`` (see ``client.py``). One request per prompt lets
the server batch across all callers (continuous batching in vLLM, the batching loop in
``server.py``) and makes retries and caching per prompt.

Robustness:

* at most ``max_concurrency`` requests in flight (an ``asyncio.Semaphore``);
* a per-request timeout of ``timeout_s`` seconds (connect + send + receive);
* retries on connection errors, timeouts, HTTP 429 and 5xx, with exponential backoff and jitter:
  before retry ``k`` (k = 1, 2, ...) the client sleeps ``u * min(max_backoff_s,
  backoff_s * 2**(k-1))`` with ``u`` uniform in [0.5, 1] (a ``Retry-After`` header in seconds
  raises the wait, capped at ``max_backoff_s``);
* no retry on other 4xx (the request itself is wrong): ``RequestError`` at once;
* after the last retry, ``RequestError`` naming the URL, the attempts, the last status and an
  excerpt of the body;
* a 200 answer that is not JSON or lacks ``choices[0].text`` / ``choices[0].message.content`` is a
  ``MalformedResponseError`` (not retried: a server that answers garbage will keep doing so).

The API key is read from the environment variable ``api_key_env`` when the client is created, sent
only as ``Authorization: Bearer``, and never logged or put in exceptions (the body excerpt in an
error has any occurrence of the key replaced by ``***``).
"""

from __future__ import annotations

import asyncio
import json
import os
import random
from collections.abc import Sequence
from typing import Any

import aiohttp
from absl import logging

from eagle_jax.env import client as client_lib
from eagle_jax.env.client import (
    Completion,
    MalformedResponseError,
    Prompt,
    ResultCallback,
    SamplingBackend,
    SamplingError,
    SamplingParams,
)

_EXCERPT = 300


class RequestError(SamplingError):
  """A request failed for good (non-retryable status, or retries exhausted).

  Attributes:
    url: the endpoint.
    status: last HTTP status (None for connection errors and timeouts).
    attempts: how many times the request was sent.
  """

  def __init__(self, message: str, *, url: str, status: int | None, attempts: int):
    super().__init__(message)
    self.url = url
    self.status = status
    self.attempts = attempts


class _Retryable(Exception):
  def __init__(self, reason: str, status: int | None = None, retry_after: float | None = None):
    super().__init__(reason)
    self.status = status
    self.retry_after = retry_after


def request_body(model: str, prompt: Prompt, params: SamplingParams) -> tuple[str, dict[str, Any]]:
  """(endpoint path, JSON body) of the request for one prompt."""
  body: dict[str, Any] = {
      "model": model,
      "max_tokens": params.max_tokens,
      "temperature": params.temperature,
      "top_p": params.top_p,
      "seed": params.seed,
      "n": 1,
  }
  if params.stop:
    body["stop"] = list(params.stop)
  # Non-OpenAI knobs (vLLM accepts top_k and repetition_penalty) only when they are on.
  if params.top_k:
    body["top_k"] = params.top_k
  if params.repetition_penalty != 1.0:
    body["repetition_penalty"] = params.repetition_penalty
  if params.no_repeat_ngram:
    body["no_repeat_ngram"] = params.no_repeat_ngram
  if client_lib.is_chat(prompt, params):
    messages = ([{"role": "user", "content": prompt}] if isinstance(prompt, str)
                else client_lib.canonical_prompt(prompt))
    body["messages"] = messages
    return "/v1/chat/completions", body
  body["prompt"] = prompt
  return "/v1/completions", body


def parse_response(data: Any, chat: bool, url: str) -> Completion:
  """A ``Completion`` from a decoded JSON answer; ``MalformedResponseError`` if it is not one."""
  where = f"{url}: malformed response"
  if not isinstance(data, dict):
    raise MalformedResponseError(f"{where}: expected a JSON object, got {type(data).__name__}")
  choices = data.get("choices")
  if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
    raise MalformedResponseError(f"{where}: missing or empty 'choices' list")
  choice = choices[0]
  if chat:
    message = choice.get("message")
    text = message.get("content") if isinstance(message, dict) else None
    field = "choices[0].message.content"
  else:
    text = choice.get("text")
    field = "choices[0].text"
  if not isinstance(text, str):
    raise MalformedResponseError(f"{where}: '{field}' is missing or not a string")
  finish = choice.get("finish_reason")
  finish = finish if finish in client_lib.FINISH_REASONS else "length"
  usage = data.get("usage")
  tokens = usage.get("completion_tokens") if isinstance(usage, dict) else None
  tokens = tokens if isinstance(tokens, int) and not isinstance(tokens, bool) else None
  return Completion(text=text, finish_reason=finish, completion_tokens=tokens)


class OpenAIClient(SamplingBackend):
  """Async client for an OpenAI-compatible server.

  Args:
    base_url: server root, e.g. ``http://127.0.0.1:8000`` (``/v1/...`` is appended).
    model: the served model name (request ``model`` field and cache model id).
    api_key_env: environment variable holding the API key (unset or empty: no auth header).
    mode: "completions" or "chat": the endpoint for string prompts when ``sample`` is called
      without ``chat=...`` (message-list prompts always go to chat completions).
    max_concurrency: most requests in flight.
    timeout_s: per-request timeout in seconds.
    max_retries: retries after the first attempt (0: none).
    backoff_s: first backoff in seconds (doubles each retry).
    max_backoff_s: cap of one backoff.
  """

  def __init__(
      self,
      base_url: str,
      model: str,
      *,
      api_key_env: str = "OPENAI_API_KEY",
      mode: str = "completions",
      max_concurrency: int = 8,
      timeout_s: float = 120.0,
      max_retries: int = 5,
      backoff_s: float = 0.5,
      max_backoff_s: float = 8.0,
  ):
    if not isinstance(base_url, str) or not base_url.startswith(("http://", "https://")):
      raise ValueError(f"base_url: expected an http(s):// URL, got {base_url!r}")
    if not isinstance(model, str) or not model:
      raise ValueError(f"model: expected a non-empty str, got {model!r}")
    if mode not in ("completions", "chat"):
      raise ValueError(f"mode: expected 'completions' or 'chat', got {mode!r}")
    if not isinstance(max_concurrency, int) or max_concurrency < 1:
      raise ValueError(f"max_concurrency: expected an int >= 1, got {max_concurrency!r}")
    if not timeout_s > 0:
      raise ValueError(f"timeout_s: expected > 0, got {timeout_s!r}")
    if not isinstance(max_retries, int) or max_retries < 0:
      raise ValueError(f"max_retries: expected an int >= 0, got {max_retries!r}")
    if backoff_s < 0 or max_backoff_s < 0:
      raise ValueError(f"backoff_s, max_backoff_s: expected >= 0, got {backoff_s}, {max_backoff_s}")
    self.base_url = base_url.rstrip("/")
    self.model_id = model
    self.default_chat = mode == "chat"
    self.max_concurrency = max_concurrency
    self.timeout_s = float(timeout_s)
    self.max_retries = max_retries
    self.backoff_s = float(backoff_s)
    self.max_backoff_s = float(max_backoff_s)
    self._api_key = os.environ.get(api_key_env) or None
    self._session: aiohttp.ClientSession | None = None
    self._semaphore: asyncio.Semaphore | None = None
    self._loop: asyncio.AbstractEventLoop | None = None
    self.attempts = 0  # total HTTP attempts (for monitoring and tests)

  def __repr__(self) -> str:  # never shows the key
    return f"OpenAIClient(base_url={self.base_url!r}, model={self.model_id!r})"

  def _ensure_session(self) -> aiohttp.ClientSession:
    loop = asyncio.get_running_loop()
    if self._session is None or self._session.closed or self._loop is not loop:
      headers = {"Content-Type": "application/json"}
      if self._api_key:
        headers["Authorization"] = f"Bearer {self._api_key}"
      connector = aiohttp.TCPConnector(limit=self.max_concurrency)
      self._session = aiohttp.ClientSession(headers=headers, connector=connector)
      self._semaphore = asyncio.Semaphore(self.max_concurrency)
      self._loop = loop
    return self._session

  def _scrub(self, text: str) -> str:
    if self._api_key:
      text = text.replace(self._api_key, "***")
    return text[:_EXCERPT]

  async def _attempt(self, session: aiohttp.ClientSession, url: str, body: dict,
                     chat: bool) -> Completion:
    timeout = aiohttp.ClientTimeout(total=self.timeout_s)
    try:
      async with session.post(url, json=body, timeout=timeout) as resp:
        raw = await resp.read()
        status = resp.status
        retry_after = resp.headers.get("Retry-After")
    except asyncio.TimeoutError as e:
      raise _Retryable(f"timed out after {self.timeout_s:g} s") from e
    except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError) as e:
      raise _Retryable(f"connection error: {type(e).__name__}: {self._scrub(str(e))}") from e
    text = raw.decode("utf-8", errors="replace")
    if status == 429 or status >= 500:
      wait = None
      try:
        wait = float(retry_after) if retry_after is not None else None
      except ValueError:
        pass
      raise _Retryable(f"HTTP {status}: {self._scrub(text)!r}", status, wait)
    if status != 200:
      raise RequestError(
          f"POST {url}: HTTP {status} (not retried): {self._scrub(text)!r}",
          url=url, status=status, attempts=1)
    try:
      data = json.loads(text)
    except ValueError as e:
      raise MalformedResponseError(
          f"{url}: malformed response: not JSON ({e}); body starts {self._scrub(text)[:80]!r}"
      ) from None
    return parse_response(data, chat, url)

  async def _request(self, prompt: Prompt, params: SamplingParams) -> Completion:
    session = self._ensure_session()
    path, body = request_body(self.model_id, prompt, params)
    url = self.base_url + path
    chat = path.endswith("chat/completions")
    last: _Retryable | None = None
    for attempt in range(self.max_retries + 1):
      if attempt:
        wait = min(self.max_backoff_s, self.backoff_s * 2 ** (attempt - 1))
        wait *= random.uniform(0.5, 1.0)
        if last is not None and last.retry_after is not None:
          wait = max(wait, min(last.retry_after, self.max_backoff_s))
        logging.warning("POST %s: %s; retry %d/%d in %.2f s", url, last, attempt,
                        self.max_retries, wait)
        await asyncio.sleep(wait)
      assert self._semaphore is not None
      async with self._semaphore:
        self.attempts += 1
        try:
          return await self._attempt(session, url, body, chat)
        except _Retryable as e:
          last = e
        except RequestError as e:
          e.attempts = attempt + 1
          raise
    assert last is not None
    raise RequestError(
        f"POST {url}: failed after {self.max_retries + 1} attempts; last error: {last}",
        url=url, status=last.status, attempts=self.max_retries + 1)

  async def generate(
      self,
      prompts: Sequence[Prompt],
      params: Sequence[SamplingParams],
      *,
      on_result: ResultCallback | None = None,
  ) -> list[Completion]:
    client_lib.check_generate_args(prompts, params)

    async def one(i: int) -> Completion:
      c = await self._request(prompts[i], params[i])
      if on_result is not None:
        on_result(i, c)
      return c

    tasks = [asyncio.ensure_future(one(i)) for i in range(len(prompts))]
    try:
      return list(await asyncio.gather(*tasks))
    except BaseException:
      for t in tasks:
        t.cancel()
      await asyncio.gather(*tasks, return_exceptions=True)
      raise

  async def aclose(self) -> None:
    if self._session is not None and not self._session.closed:
      await self._session.close()
    self._session = None
