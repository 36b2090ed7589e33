"""A long list of environment requests with a bounded number in flight.

``generate_bounded(client, prompts, params, max_in_flight)`` returns what one
``client.generate(prompts, params)`` call would (answers in prompt order; a prompt's answer depends
only on its model, text and ``SamplingParams``, see ``env.client``), but sends the requests as
sub-calls of at most ``call_size`` prompts, from at most ``max_in_flight // call_size`` workers, so
that no more than ``max_in_flight`` requests (and their coroutines, prompts and answers) are
outstanding at once. Why: one ``asyncio.gather`` over the ~10M transitions of a paper-scale
labelling would hold every request in memory together and flood a server; a backend that batches
(the local sampler, ``BatchingClient``) still sees ``max_in_flight`` requests to merge.
``max_in_flight=0`` keeps the single call.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from eagle_jax.env.client import Completion, Prompt, SamplingParams

# Largest sub-call: requests of one worker's ``generate`` call.
MAX_CALL = 256


def plan(n: int, max_in_flight: int) -> tuple[int, int]:
  """(call_size, workers) for ``n`` requests with at most ``max_in_flight`` in flight."""
  if max_in_flight <= 0 or n <= max_in_flight:
    return max(n, 1), 1
  call = min(MAX_CALL, max_in_flight)
  return call, max(1, max_in_flight // call)


async def generate_bounded(client, prompts: Sequence[Prompt], params: Sequence[SamplingParams],
                           max_in_flight: int) -> list[Completion]:
  """``client.generate(prompts, params)`` with at most ``max_in_flight`` requests outstanding.

  Args:
    client: a ``SamplingBackend`` (any object with an async ``generate(prompts, params)``).
    prompts: N prompts.
    params: N per-prompt parameters.
    max_in_flight: most requests outstanding at once (0: all N in one call).

  Returns:
    N completions in prompt order.
  """
  n = len(prompts)
  if len(params) != n:
    raise ValueError(f"generate_bounded: {n} prompts but {len(params)} params")
  call, workers = plan(n, int(max_in_flight))
  if workers == 1 and call >= n:
    return list(await client.generate(list(prompts), list(params)))
  out: list[Completion | None] = [None] * n
  starts = iter(range(0, n, call))

  async def worker() -> None:
    for s in starts:  # a shared iterator: each sub-call is taken by exactly one worker
      e = min(s + call, n)
      out[s:e] = await client.generate(list(prompts[s:e]), list(params[s:e]))

  await asyncio.gather(*(worker() for _ in range(workers)))
  return out  # type: ignore[return-value]
