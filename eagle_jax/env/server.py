"""OpenAI-compatible HTTP server over any ``SamplingBackend``, batching concurrent requests.

Routes: ``POST /v1/completions``, ``POST /v1/chat/completions``, ``GET /v1/models``, ``GET /health``.

Batching: each request's prompts go into one bounded ``asyncio.Queue`` (``max_queue`` prompts).
A single batching task takes the first waiting prompt, then keeps collecting until it has
``max_batch`` prompts or ``batch_wait_ms`` have passed since the first one, and sends the batch to
the backend as **one** ``generate`` call (``LocalSampler`` then decodes rows with equal sampling
parameters together). While the backend works, new requests queue up, so under load every batch is
full without any waiting; the wait window only delays a lone request on an idle server. This is what
makes 8 concurrent client streams several times faster than serial requests. A backend with
``continuous = True`` (``LocalSampler(continuous=True)``) gets each batch at once, without waiting
for the previous one's answers: its batcher admits the prompts at its next decode-chunk boundary.

Backend errors: if a batch fails, its prompts are rerun one by one so that one bad prompt does not
fail its neighbours; a ``ValueError`` from the backend (e.g. prompt + max_tokens longer than the
model) is a 400 for that request, anything else a 500 (which clients retry).

Overload: a request whose prompts do not all fit in the queue is answered at once with 503 (JSON
error, ``Retry-After: 1``), which the client's retry with backoff handles.

Request fields and their validation: ``api_request`` (anything it does not support is a 400 naming
the field).

``usage`` reports ``prompt_tokens`` (0 if the backend does not report them), ``completion_tokens``
and ``total_tokens``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import socket
import time
import uuid
from collections.abc import Mapping
from typing import Any

from absl import logging
from aiohttp import web

from eagle_jax.env.api_request import BadRequest, ParsedRequest, parse_request
from eagle_jax.env.client import Completion, Prompt, SamplingBackend, SamplingParams


def _error(status: int, message: str, kind: str, param: str | None = None,
           headers: Mapping[str, str] | None = None) -> web.Response:
  body = {"error": {"message": message, "type": kind, "param": param, "code": status}}
  return web.json_response(body, status=status, headers=headers)


def bind_socket(host: str, port: int) -> socket.socket:
  """A TCP socket bound to ``(host, port)`` (not listening yet), for ``EnvServer.start(sock=)``.

  Binding first claims the port before the model loads, so a busy port fails in a second.

  Raises:
    OSError: the port is taken (``errno.EADDRINUSE``) or the host cannot be bound.
  """
  infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
  family, kind, proto, _, addr = infos[0]
  sock = socket.socket(family, kind, proto)
  try:
    # As aiohttp does: a restart may reuse a port with connections in TIME_WAIT, but two listeners
    # never share one.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(addr)
  except BaseException:
    sock.close()
    raise
  sock.setblocking(False)
  return sock


def _logprobs_json(answer: Completion, chat: bool) -> dict[str, Any] | None:
  """OpenAI ``logprobs`` of one choice from a completion with ``tokens`` and ``token_logprobs``."""
  tokens = getattr(answer, "tokens", None)
  logps = getattr(answer, "token_logprobs", None)
  if tokens is None or logps is None:
    return None
  if chat:
    return {"content": [{"token": t, "logprob": float(lp), "bytes": list(t.encode("utf-8")),
                         "top_logprobs": []} for t, lp in zip(tokens, logps)], "refusal": None}
  offsets, at = [], 0
  for t in tokens:
    offsets.append(at)
    at += len(t)
  return {"tokens": list(tokens), "token_logprobs": [float(lp) for lp in logps],
          "top_logprobs": None, "text_offset": offsets}


@dataclasses.dataclass
class _Item:
  prompt: Prompt
  params: SamplingParams
  future: asyncio.Future


class EnvServer:
  """The HTTP front end.

  Args:
    backend: any ``SamplingBackend`` (``LocalSampler`` in ``launch/serve_env.py``).
    model: served model name (default ``backend.model_id``).
    max_batch: most prompts per backend call.
    max_queue: most prompts waiting (beyond it: 503).
    batch_wait_ms: how long an idle server waits for more prompts after the first one.
    max_tokens_limit: largest accepted ``max_tokens``.
  """

  def __init__(
      self,
      backend: SamplingBackend,
      *,
      model: str | None = None,
      max_batch: int = 8,
      max_queue: int = 64,
      batch_wait_ms: float = 5.0,
      max_tokens_limit: int = 1024,
  ):
    for name, value in (("max_batch", max_batch), ("max_queue", max_queue),
                        ("max_tokens_limit", max_tokens_limit)):
      if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}: expected an int >= 1, got {value!r}")
    if batch_wait_ms < 0:
      raise ValueError(f"batch_wait_ms: expected >= 0, got {batch_wait_ms}")
    self.backend = backend
    self.model = model or backend.model_id
    if not self.model:
      raise ValueError("model: the backend has no model_id; pass model=")
    self.max_batch = max_batch
    self.max_queue = max_queue
    self.batch_wait_s = batch_wait_ms / 1000.0
    self.max_tokens_limit = max_tokens_limit
    self.batch_sizes: list[int] = []  # prompts per backend call (monitoring, tests)
    self._queue: asyncio.Queue[_Item] | None = None
    self._worker: asyncio.Task | None = None
    self._tasks: set[asyncio.Task] = set()  # batches handed to a continuous backend
    self._runner: web.AppRunner | None = None
    self.port: int | None = None

  # ----------------------------------------------------------------------------------------------
  # Batching.
  # ----------------------------------------------------------------------------------------------

  async def _batch_loop(self) -> None:
    assert self._queue is not None
    loop = asyncio.get_running_loop()
    while True:
      batch = [await self._queue.get()]
      deadline = loop.time() + self.batch_wait_s
      while len(batch) < self.max_batch:
        try:
          batch.append(self._queue.get_nowait())
          continue
        except asyncio.QueueEmpty:
          pass
        remaining = deadline - loop.time()
        if remaining <= 0:
          break
        try:
          batch.append(await asyncio.wait_for(self._queue.get(), remaining))
        except asyncio.TimeoutError:
          break
      batch = [it for it in batch if not it.future.done()]  # callers that went away
      if not batch:
        continue
      self.batch_sizes.append(len(batch))
      if getattr(self.backend, "continuous", False):
        # A continuously batching backend admits these prompts at its next chunk boundary while
        # earlier ones decode: hand them over now, do not wait for the earlier answers.
        task = loop.create_task(self._dispatch(batch))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
      else:
        await self._dispatch(batch)

  async def _dispatch(self, batch: list[_Item]) -> None:
    try:
      answers = await self.backend.generate([it.prompt for it in batch],
                                            [it.params for it in batch])
    except Exception:  # noqa: BLE001
      # One bad prompt (e.g. too long for the model) must not fail its batch neighbours:
      # rerun one by one so each caller gets its own answer or its own error.
      logging.warning("backend.generate failed for a batch of %d; retrying one by one",
                      len(batch))
      for it in batch:
        await self._run_one(it)
      return
    for it, answer in zip(batch, answers):
      if not it.future.done():
        it.future.set_result(answer)

  async def _run_one(self, it: _Item) -> None:
    if it.future.done():
      return
    try:
      (answer,) = await self.backend.generate([it.prompt], [it.params])
    except Exception as e:  # noqa: BLE001 (handed to the caller)
      if not it.future.done():
        it.future.set_exception(e)
      return
    if not it.future.done():
      it.future.set_result(answer)

  # ----------------------------------------------------------------------------------------------
  # Handlers.
  # ----------------------------------------------------------------------------------------------

  async def _complete(self, request: web.Request, chat: bool) -> web.Response:
    try:
      body = json.loads(await request.read())
    except ValueError as e:
      return _error(400, f"request body: invalid JSON ({e})", "invalid_request_error")
    try:
      parsed = parse_request(
          body, chat=chat, model=self.model, max_tokens_limit=self.max_tokens_limit,
          logprobs_supported=bool(getattr(self.backend, "reports_logprobs", False)))
    except BadRequest as e:
      return _error(400, str(e), "invalid_request_error", e.param)
    queue = self._queue
    assert queue is not None
    n = len(parsed.prompts)
    if n > self.max_queue - queue.qsize():
      return _error(503, f"server overloaded: {queue.qsize()} prompts queued (max_queue="
                    f"{self.max_queue}); retry later", "overloaded", headers={"Retry-After": "1"})
    loop = asyncio.get_running_loop()
    items = [_Item(p, q, loop.create_future()) for p, q in zip(parsed.prompts, parsed.params)]
    for it in items:
      queue.put_nowait(it)
    try:
      answers: list[Completion] = await asyncio.gather(*(it.future for it in items))
    except asyncio.CancelledError:
      for it in items:
        it.future.cancel()
      raise
    except ValueError as e:  # the backend refused this prompt (e.g. longer than the model)
      return _error(400, str(e), "invalid_request_error", "prompt")
    except Exception as e:  # noqa: BLE001
      logging.exception("backend error")
      return _error(500, f"backend error: {type(e).__name__}: {e}", "server_error")
    return web.json_response(self._response(parsed, answers))

  def _response(self, parsed: ParsedRequest, answers: list[Completion]) -> dict[str, Any]:
    choices = []
    for i, a in enumerate(answers):
      choice: dict[str, Any] = {"index": i, "finish_reason": a.finish_reason, "logprobs": None}
      if parsed.chat:
        choice["message"] = {"role": "assistant", "content": a.text}
      else:
        choice["text"] = a.text
      if parsed.logprobs:
        choice["logprobs"] = _logprobs_json(a, parsed.chat)
      choices.append(choice)
    completion_tokens = sum(a.completion_tokens or 0 for a in answers)
    prompt_tokens = sum(getattr(a, "prompt_tokens", None) or 0 for a in answers)
    return {
        "id": f"{'chatcmpl' if parsed.chat else 'cmpl'}-{uuid.uuid4().hex[:24]}",
        "object": "chat.completion" if parsed.chat else "text_completion",
        "created": int(time.time()),
        "model": self.model,
        "choices": choices,
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                  "total_tokens": prompt_tokens + completion_tokens},
    }

  async def _completions(self, request: web.Request) -> web.Response:
    return await self._complete(request, chat=False)

  async def _chat(self, request: web.Request) -> web.Response:
    return await self._complete(request, chat=True)

  async def _health(self, request: web.Request) -> web.Response:
    del request
    queued = self._queue.qsize() if self._queue is not None else 0
    return web.json_response({"status": "ok", "model": self.model, "queued": queued,
                              "max_queue": self.max_queue, "max_batch": self.max_batch})

  async def _models(self, request: web.Request) -> web.Response:
    del request
    return web.json_response({"object": "list", "data": [
        {"id": self.model, "object": "model", "owned_by": "eagle_jax"}]})

  def app(self) -> web.Application:
    """The aiohttp application (the batching task starts and stops with it)."""
    app = web.Application()
    app.router.add_post("/v1/completions", self._completions)
    app.router.add_post("/v1/chat/completions", self._chat)
    app.router.add_get("/v1/models", self._models)
    app.router.add_get("/health", self._health)

    async def lifecycle(app: web.Application):
      del app
      self._queue = asyncio.Queue(maxsize=self.max_queue)
      self._worker = asyncio.create_task(self._batch_loop())
      yield
      for task in [self._worker, *self._tasks]:
        task.cancel()
        try:
          await task
        except asyncio.CancelledError:
          pass

    app.cleanup_ctx.append(lifecycle)
    return app

  async def start(self, host: str = "127.0.0.1", port: int = 0, *,
                  sock: socket.socket | None = None) -> int:
    """Starts serving on the running loop; returns the bound port (``port=0``: a free one).

    Args:
      host, port: where to listen (ignored when ``sock`` is given).
      sock: a socket from ``bind_socket`` to listen on instead.
    """
    self._runner = web.AppRunner(self.app(), access_log=None)
    await self._runner.setup()
    if sock is not None:
      site: web.BaseSite = web.SockSite(self._runner, sock)
    else:
      site = web.TCPSite(self._runner, host, port)
    await site.start()
    self.port = self._runner.addresses[0][1]
    return self.port

  async def stop(self) -> None:
    if self._runner is not None:
      await self._runner.cleanup()
      self._runner = None
