"""OpenAI-compatible sampling client (vLLM, llama.cpp, JetStream's front end, ``serve_env.py``).

Built on the official ``openai`` package (``openai.AsyncOpenAI``). Each prompt is one request
(``completions.create`` with ``prompt`` for ``chat=False`` string prompts, ``chat.completions.create``
with ``messages`` otherwise) carrying its prompt seed in ``seed`` (see ``client.py``). One request
per prompt lets the server batch across all callers (continuous batching in vLLM, the batching loop
in ``server.py``) and makes retries and caching per prompt. Knobs outside the OpenAI API
(``top_k``, ``repetition_penalty``, ``no_repeat_ngram``) go in ``extra_body``, only when set.

Robustness:

* at most ``max_concurrency`` requests in flight (an ``asyncio.Semaphore``);
* a per-request timeout of ``timeout_s`` seconds (connect + send + receive);
* retries on connection errors, timeouts, HTTP 429 and 5xx, with exponential backoff and jitter:
  before retry ``k`` (k = 1, 2, ...) the client sleeps ``u * min(max_backoff_s,
  backoff_s * 2**(k-1))`` with ``u`` uniform in [0.5, 1]; a ``Retry-After`` header (seconds or an
  HTTP date; or ``retry-after-ms``) raises the wait, capped at ``max_backoff_s``. The ``openai``
  package's own retries are off (``max_retries=0``) so that this loop alone counts attempts;
* no retry on other 4xx (the request itself is wrong): ``RequestError`` at once;
* after the last retry, ``RequestError`` naming the URL, the attempts, the last status and an
  excerpt of the body;
* a 200 answer that is not JSON or lacks ``choices[0].text`` / ``choices[0].message.content`` is a
  ``MalformedResponseError`` (not retried: a server that answers garbage will keep doing so).

Preflight: before its first request the client GETs ``/v1/models`` (``check_model``) and raises
``UnknownModelError`` naming the model and listing what the server serves if the name is absent
(vLLM answers an unknown name with a bare 404 on every request). A server without that route (404)
is used unchecked, with a warning.

The API key is read from the environment variable ``api_key_env`` when the client is created and
sent only as ``Authorization: Bearer`` (the placeholder ``EMPTY`` when unset, as vLLM's docs do);
it is never logged, and any occurrence of it in an error message is replaced by ``***``.

``model_id`` (the response-cache key) is ``"openai:<served model name>"``: the model that answers.
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import os
import random
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

import openai
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
_NO_KEY = "EMPTY"


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


class UnknownModelError(SamplingError):
  """The server does not serve the requested model name.

  Attributes:
    model: the name asked for.
    served: the names the server lists under ``/v1/models``.
  """

  def __init__(self, message: str, *, model: str, served: list[str]):
    super().__init__(message)
    self.model = model
    self.served = served


class _Retryable(Exception):
  def __init__(self, reason: str, status: int | None = None, retry_after: float | None = None):
    super().__init__(reason)
    self.status = status
    self.retry_after = retry_after


def retry_after_s(headers: Mapping[str, str]) -> float | None:
  """Seconds asked for by ``retry-after-ms`` or ``Retry-After`` (seconds or HTTP date), if any."""
  lower = {k.lower(): v for k, v in headers.items()}
  try:
    if "retry-after-ms" in lower:
      return max(0.0, float(lower["retry-after-ms"]) / 1000.0)
  except ValueError:
    pass
  value = lower.get("retry-after")
  if value is None:
    return None
  try:
    return max(0.0, float(value))
  except ValueError:
    pass
  try:
    when = email.utils.parsedate_to_datetime(value)
  except (TypeError, ValueError):
    return None
  return max(0.0, when.timestamp() - time.time())


def request_body(prompt: Prompt, params: SamplingParams) -> tuple[bool, dict[str, Any]]:
  """(is chat, keyword arguments of ``create`` without ``model``) of the request for one prompt."""
  kwargs: dict[str, Any] = {
      "max_tokens": params.max_tokens,
      "temperature": params.temperature,
      "top_p": params.top_p,
      "seed": params.seed,
      "n": 1,
  }
  if params.stop:
    kwargs["stop"] = list(params.stop)
  # Non-OpenAI knobs (vLLM accepts top_k and repetition_penalty) only when they are on.
  extra: dict[str, Any] = {}
  if params.top_k:
    extra["top_k"] = params.top_k
  if params.repetition_penalty != 1.0:
    extra["repetition_penalty"] = params.repetition_penalty
  if params.no_repeat_ngram:
    extra["no_repeat_ngram"] = params.no_repeat_ngram
  if extra:
    kwargs["extra_body"] = extra
  chat = client_lib.is_chat(prompt, params)
  if chat:
    kwargs["messages"] = ([{"role": "user", "content": prompt}] if isinstance(prompt, str)
                          else client_lib.canonical_prompt(prompt))
  else:
    kwargs["prompt"] = prompt
  return chat, kwargs


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
  """Async ``SamplingBackend`` over an OpenAI-compatible server.

  Args:
    base_url: server root, e.g. ``http://127.0.0.1:8000`` (a trailing ``/v1`` is accepted).
    model: the served model name (request ``model`` field); ``model_id`` is ``openai:<model>``.
    api_key_env: environment variable holding the API key.
    max_concurrency: most requests in flight.
    timeout_s: per-request timeout in seconds.
    max_retries: retries after the first attempt (0: none).
    backoff_s: first backoff in seconds (doubles each retry).
    max_backoff_s: cap of one backoff (and of a ``Retry-After`` wait).
    default_chat: ``chat`` for ``sample`` calls that do not pass it (string prompts go to chat
      completions when true, to completions when false; message lists always go to chat).
    preflight: run ``check_model`` before the first request.

  Attributes:
    attempts: HTTP attempts of completion requests so far (monitoring, tests).
  """

  def __init__(
      self,
      base_url: str,
      model: str,
      *,
      api_key_env: str = "OPENAI_API_KEY",
      max_concurrency: int = 8,
      timeout_s: float = 120.0,
      max_retries: int = 4,
      backoff_s: float = 0.5,
      max_backoff_s: float = 8.0,
      default_chat: bool = False,
      preflight: bool = True,
  ):
    if not isinstance(base_url, str) or not base_url.startswith(("http://", "https://")):
      raise ValueError(f"base_url: expected an http(s):// URL, got {base_url!r}")
    if not isinstance(model, str) or not model:
      raise ValueError(f"model: expected a non-empty str, got {model!r}")
    if not isinstance(api_key_env, str) or not api_key_env:
      raise ValueError(f"api_key_env: expected an environment variable name, got {api_key_env!r}")
    if isinstance(max_concurrency, bool) or not isinstance(max_concurrency, int) or (
        max_concurrency < 1):
      raise ValueError(f"max_concurrency: expected an int >= 1, got {max_concurrency!r}")
    if isinstance(timeout_s, bool) or not isinstance(timeout_s, (int, float)) or not timeout_s > 0:
      raise ValueError(f"timeout_s: expected a number > 0, got {timeout_s!r}")
    if isinstance(max_retries, bool) or not isinstance(max_retries, int) or max_retries < 0:
      raise ValueError(f"max_retries: expected an int >= 0, got {max_retries!r}")
    for name, value in (("backoff_s", backoff_s), ("max_backoff_s", max_backoff_s)):
      if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
        raise ValueError(f"{name}: expected a number >= 0, got {value!r}")
    if not isinstance(default_chat, bool):
      raise ValueError(f"default_chat: expected a bool, got {default_chat!r}")
    root = base_url.rstrip("/")
    self.base_url = root[: -len("/v1")] if root.endswith("/v1") else root
    self.model = model
    self.model_id = f"openai:{model}"
    self.default_chat = default_chat
    self.max_concurrency = max_concurrency
    self.timeout_s = float(timeout_s)
    self.max_retries = max_retries
    self.backoff_s = float(backoff_s)
    self.max_backoff_s = float(max_backoff_s)
    self.preflight = bool(preflight)
    self._api_key = os.environ.get(api_key_env) or None
    self._client: openai.AsyncOpenAI | None = None
    self._semaphore: asyncio.Semaphore | None = None
    self._check_lock: asyncio.Lock | None = None
    self._loop: asyncio.AbstractEventLoop | None = None
    self._model_checked = False
    self.attempts = 0

  def __repr__(self) -> str:  # never shows the key
    return f"OpenAIClient(base_url={self.base_url!r}, model={self.model!r})"

  def _ensure_client(self) -> openai.AsyncOpenAI:
    loop = asyncio.get_running_loop()
    if self._client is None or self._loop is not loop:
      # Connections belong to the loop that opened them: a new loop gets a new client.
      self._client = openai.AsyncOpenAI(
          base_url=self.base_url + "/v1", api_key=self._api_key or _NO_KEY,
          timeout=self.timeout_s, max_retries=0)
      self._semaphore = asyncio.Semaphore(self.max_concurrency)
      self._check_lock = asyncio.Lock()
      self._loop = loop
    return self._client

  def _scrub(self, text: str) -> str:
    if self._api_key:
      text = text.replace(self._api_key, "***")
    return text[:_EXCERPT]

  async def _attempt(self, fn: Callable[[openai.AsyncOpenAI], Awaitable[Any]],
                     method: str, url: str, attempt: int) -> str:
    """One HTTP exchange; the body text of a 2xx answer, else ``_Retryable`` / ``RequestError``."""
    client = self._ensure_client()
    try:
      raw = await asyncio.wait_for(fn(client), self.timeout_s)
    except (asyncio.TimeoutError, openai.APITimeoutError):
      raise _Retryable(f"timed out after {self.timeout_s:g} s") from None
    except openai.APIConnectionError as e:
      cause = type(e.__cause__).__name__ if e.__cause__ is not None else type(e).__name__
      raise _Retryable(f"connection error: {cause}: {self._scrub(str(e))}") from None
    except openai.APIStatusError as e:
      status = e.status_code
      try:
        text = e.response.text
      except Exception:  # noqa: BLE001 (a body that cannot be read is reported as such)
        text = "<unreadable body>"
      if status == 429 or status >= 500:
        raise _Retryable(f"HTTP {status}: {self._scrub(text)!r}", status,
                         retry_after_s(e.response.headers)) from None
      raise RequestError(f"{method} {url}: HTTP {status} (not retried): {self._scrub(text)!r}",
                         url=url, status=status, attempts=attempt + 1) from None
    return raw.text

  async def _with_retries(self, fn: Callable[[openai.AsyncOpenAI], Awaitable[Any]],
                          method: str, url: str, *, count: bool) -> Any:
    """The decoded JSON of a 2xx answer to ``fn(client)``, retrying as the module docstring says."""
    self._ensure_client()
    last: _Retryable | None = None
    for attempt in range(self.max_retries + 1):
      if attempt:
        wait = min(self.max_backoff_s, self.backoff_s * 2 ** (attempt - 1))
        wait *= random.uniform(0.5, 1.0)
        if last is not None and last.retry_after is not None:
          wait = max(wait, min(last.retry_after, self.max_backoff_s))
        logging.warning("%s %s: %s; retry %d/%d in %.2f s", method, url, last, attempt,
                        self.max_retries, wait)
        await asyncio.sleep(wait)
      assert self._semaphore is not None
      async with self._semaphore:
        if count:
          self.attempts += 1
        try:
          text = await self._attempt(fn, method, url, attempt)
        except _Retryable as e:
          last = e
          continue
      try:
        return json.loads(text)
      except ValueError as e:
        raise MalformedResponseError(
            f"{url}: malformed response: not JSON ({e}); body starts {self._scrub(text)[:80]!r}"
        ) from None
    assert last is not None
    raise RequestError(
        f"{method} {url}: failed after {self.max_retries + 1} attempts; last error: {last}",
        url=url, status=last.status, attempts=self.max_retries + 1)

  async def check_model(self) -> list[str]:
    """GETs ``/v1/models``; returns the served names, ``UnknownModelError`` if ours is absent."""
    url = self.base_url + "/v1/models"
    data = await self._with_retries(lambda c: c.models.with_raw_response.list(), "GET", url,
                                    count=False)
    entries = data.get("data") if isinstance(data, dict) else None
    if not isinstance(entries, list) or not all(
        isinstance(m, dict) and isinstance(m.get("id"), str) for m in entries):
      raise MalformedResponseError(f"{url}: malformed response: expected 'data': [{{'id': ...}}]")
    served = [m["id"] for m in entries]
    if self.model not in served:
      raise UnknownModelError(
          f"{url}: the server does not serve model {self.model!r}; it serves {served} "
          f"(pass one of these as the model name)", model=self.model, served=served)
    self._model_checked = True
    return served

  async def _ensure_checked(self) -> None:
    if self._model_checked or not self.preflight:
      return
    self._ensure_client()
    assert self._check_lock is not None
    async with self._check_lock:
      if self._model_checked:
        return
      try:
        await self.check_model()
      except RequestError as e:
        if e.status != 404:
          raise
        logging.warning("%s: no /v1/models route; model name %r not checked", self.base_url,
                        self.model)
        self._model_checked = True

  async def _request(self, prompt: Prompt, params: SamplingParams) -> Completion:
    chat, kwargs = request_body(prompt, params)
    if chat:
      url = self.base_url + "/v1/chat/completions"
      fn = lambda c: c.chat.completions.with_raw_response.create(model=self.model, **kwargs)
    else:
      url = self.base_url + "/v1/completions"
      fn = lambda c: c.completions.with_raw_response.create(model=self.model, **kwargs)
    data = await self._with_retries(fn, "POST", url, count=True)
    return parse_response(data, chat, url)

  async def generate(
      self,
      prompts: Sequence[Prompt],
      params: Sequence[SamplingParams],
      *,
      on_result: ResultCallback | None = None,
  ) -> list[Completion]:
    client_lib.check_generate_args(prompts, params)
    if not prompts:
      return []
    await self._ensure_checked()

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
    client, self._client = self._client, None
    if client is not None and self._loop is asyncio.get_running_loop():
      await client.close()
