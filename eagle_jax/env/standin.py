"""A deterministic stand-in for the environment LLM: a load instrument, not a model.

``StandInBackend`` answers every prompt with text assembled from a fixed vocabulary by a generator
seeded with ``sha256`` of the prompt and its ``SamplingParams``: a pure function of (prompt,
params), so of the state and action texts of a transition. It knows nothing about movies; it
exists so that the real pipeline (``ContentGapEnv``, the response cache, labelling, rollouts,
features) can be run at paper scale on a machine without a served model, to measure the
pipeline's own memory and time per environment call (``benchmarks/scale_bench.py``). Its answers
are two short sentences, so they parse as plots (``prompts.clean_paragraph``).

It implements ``env.client.SamplingBackend``; ``busy_s`` is the time spent inside its own
``generate`` (subtracted from a run's wall time to get the pipeline's overhead per call).
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Sequence

import numpy as np

from eagle_jax.env import client as client_lib
from eagle_jax.env.client import Completion, Prompt, ResultCallback, SamplingBackend, SamplingParams

# A fixed vocabulary: answers are drawn from it word by word.
VOCAB = tuple("""
a an the hero heroine city river storm night village robot detective family secret war letter
ship island forest king queen child mother father friend stranger journey memory song fire winter
summer train dream mirror garden desert ocean planet machine music dancer painter soldier thief
doctor teacher crowd festival border mountain market tower bridge castle ghost wolf horse bird
discovers loses finds builds escapes follows betrays rescues hides remembers returns questions
chases paints sings fights dreams searches guards crosses opens breaks keeps steals wins burns
quietly suddenly slowly bravely finally together alone again never always beneath beyond within
old young silent bright dark hidden strange lonely golden broken distant forgotten ancient gentle
""".split())


def answer(prompt: Prompt, params: SamplingParams, words: int = 28) -> str:
  """The stand-in's answer to one prompt: ``words`` vocabulary words in two sentences, a pure
  function of the prompt and ``params`` (its seed included)."""
  blob = json.dumps({"prompt": client_lib.canonical_prompt(prompt), "params": params.to_dict()},
                    sort_keys=True, separators=(",", ":"), ensure_ascii=False)
  seed = int.from_bytes(hashlib.sha256(blob.encode("utf-8")).digest()[:8], "big")
  idx = np.random.default_rng(seed).integers(0, len(VOCAB), size=words)
  w = [VOCAB[i] for i in idx]
  half = words // 2
  first = " ".join(w[:half])
  second = " ".join(w[half:])
  return f"{first[0].upper()}{first[1:]}. {second[0].upper()}{second[1:]}."


class StandInBackend(SamplingBackend):
  """``SamplingBackend`` answering with ``answer`` (module docstring): not a model.

  Args:
    words: words per answer.
    model_id: its name in the response cache's keys.

  Attributes:
    calls: prompts answered.
    busy_s: seconds spent inside ``generate``.
  """

  def __init__(self, words: int = 28, model_id: str = "standin:v1"):
    self.words = int(words)
    self.model_id = model_id
    self.default_chat = True
    self.calls = 0
    self.busy_s = 0.0

  async def generate(self, prompts: Sequence[Prompt], params: Sequence[SamplingParams], *,
                     on_result: ResultCallback | None = None) -> list[Completion]:
    client_lib.check_generate_args(prompts, params)
    t0 = time.perf_counter()
    out = [Completion(answer(p, sp, self.words), "stop", self.words)
           for p, sp in zip(prompts, params)]
    self.calls += len(out)
    self.busy_s += time.perf_counter() - t0
    if on_result is not None:  # the caller's work (e.g. the cache's appends), not the stand-in's
      for i, c in enumerate(out):
        on_result(i, c)
    return out
