"""Merging concurrent one-prompt calls into one backend call (what lets a local decoder batch).

``asyncio.gather`` over many one-prompt ``sample`` calls (action requests, transitions) becomes one
``generate`` of the inner backend, which the local sampler splits into decode batches of equal
sampling parameters. Each prompt keeps its own ``SamplingParams`` (and prompt seed), so answers are
unchanged by merging.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from eagle_jax.env import client as client_lib
from eagle_jax.env.client import Completion, SamplingBackend


class BatchingClient(SamplingBackend):
  """Merges ``generate`` calls started in the same event-loop tick into one inner ``generate``.

  ``asyncio.gather`` over many one-prompt ``sample`` calls thus becomes one call of the inner
  backend (which the local sampler splits into decode batches of equal sampling parameters). Each
  prompt keeps its own ``SamplingParams`` (and prompt seed), so answers are unchanged by merging.

  Attributes:
    inner: the wrapped backend.
    inner_calls: number of merged calls sent to ``inner``.
    on_answer: if set, called with 1 each time a prompt is answered (progress bars of long phases).
  """

  def __init__(self, inner: SamplingBackend):
    if not isinstance(inner, SamplingBackend):
      raise ValueError(f"inner: expected a SamplingBackend, got {type(inner).__name__}")
    self.inner = inner
    self.model_id = inner.model_id
    self.default_chat = inner.default_chat
    self.inner_calls = 0
    self.on_answer: Callable[[int], None] | None = None
    self._pending: list[tuple[list, list, Any, asyncio.Future]] = []
    self._scheduled = False
    self._tasks: set[asyncio.Task] = set()

  async def generate(self, prompts, params, *, on_result=None) -> list[Completion]:
    client_lib.check_generate_args(prompts, params)
    loop = asyncio.get_running_loop()
    fut = loop.create_future()
    self._pending.append((list(prompts), list(params), on_result, fut))
    if not self._scheduled:
      self._scheduled = True
      loop.call_soon(self._flush)
    return await fut

  def _flush(self) -> None:
    self._scheduled = False
    batch, self._pending = self._pending, []
    task = asyncio.get_running_loop().create_task(self._run(batch))
    self._tasks.add(task)
    task.add_done_callback(self._tasks.discard)

  async def _run(self, batch) -> None:
    prompts = [p for b in batch for p in b[0]]
    params = [q for b in batch for q in b[1]]
    owner = [(j, i) for j, b in enumerate(batch) for i in range(len(b[0]))]

    def on_result(n: int, completion: Completion) -> None:
      j, i = owner[n]
      if self.on_answer is not None:
        self.on_answer(1)
      if batch[j][2] is not None:
        batch[j][2](i, completion)

    self.inner_calls += 1
    try:
      answers = await self.inner.generate(prompts, params, on_result=on_result)
    except Exception as e:  # noqa: BLE001 (handed to every waiting caller)
      for b in batch:
        if not b[3].done():
          b[3].set_exception(e)
      return
    start = 0
    for b in batch:
      n = len(b[0])
      if not b[3].done():
        b[3].set_result(list(answers[start:start + n]))
      start += n

  async def aclose(self) -> None:
    await self.inner.aclose()


def batching(client) -> Any:
  """``client`` wrapped in a ``BatchingClient`` when it is a backend that is not one already."""
  if isinstance(client, SamplingBackend) and not isinstance(client, BatchingClient):
    return BatchingClient(client)
  return client
