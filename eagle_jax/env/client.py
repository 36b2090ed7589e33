"""The sampling contract between EAGLE and its environment LLM.

EAGLE treats a frozen LLM as its environment: it writes movie descriptions, proposes actions and
applies them. Every backend (the in-process JAX sampler in ``local.py``, any OpenAI-compatible
server through ``openai.py``, the on-disk cache in ``cache.py``) implements one protocol::

    class SamplingClient(Protocol):
      async def sample(self, prompts, *, max_tokens, temperature, seed, **params) -> list[str]

``**params`` are the other fields of ``SamplingParams`` (``top_p``, ``top_k``,
``repetition_penalty``, ``no_repeat_ngram``, ``stop``, ``chat``); an unknown name is a ValueError.

Seeds (the response cache and resume-determinism of the RL trainer rely on this rule):

* ``sample(prompts, seed=s)`` samples prompt ``i`` with its own **prompt seed**
  ``prompt_seed(s, i)``: ``s`` itself for ``i == 0`` and, for ``i > 0``, the first 4 bytes
  (big-endian) of ``sha256(f"eagle_jax/{s}/{i}")`` masked to 31 bits. Five copies of one prompt
  in one call therefore give five independent samples, and a call with a single prompt uses ``s``
  as-is.
* A prompt's answer depends only on ``(model, prompt, SamplingParams)`` where
  ``SamplingParams.seed`` is the prompt seed: never on which other prompts share a decode batch or
  on the prompt's position in it. ``LocalSampler`` guarantees this by giving every batch row its own
  PRNG key; remote servers are asked for it through the per-request OpenAI ``seed`` field (vLLM
  honours it; reproducibility across server versions is not promised, hence the cache).
* Over HTTP every request carries one prompt and its prompt seed. A server request whose
  ``prompt`` is a list applies the same rule, so list element ``j`` gets ``prompt_seed(seed, j)``.

Prompts are either a string (``chat=False``: raw text continued as is; ``chat=True``: wrapped as one
user turn and rendered with the model's chat template) or a list of ``{"role", "content"}`` messages
(always rendered with the chat template).

Backends subclass ``SamplingBackend``: they implement ``generate(prompts, params, on_result=None)``
over fully resolved per-prompt ``SamplingParams`` and inherit ``sample``. ``on_result(i, completion)``
is called as soon as prompt ``i`` is answered (before the whole call returns), which is how the
response cache keeps every answer of a call that is later interrupted.
"""

from __future__ import annotations

import abc
import dataclasses
import hashlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

from eagle_jax.models.sampling_params import MAX_SEED as _MAX_SEED
from eagle_jax.models.sampling_params import SamplingParams
from eagle_jax.models.sampling_params import check_int as _check_int

Message = Mapping[str, str]
Prompt = str | Sequence[Message]
# Called as on_result(i, completion) as soon as prompt i of a ``generate`` call is answered.
ResultCallback = Callable[[int, "Completion"], None]

_ROLES = ("system", "user", "assistant")
FINISH_REASONS = ("stop", "length")


class SamplingError(RuntimeError):
  """An environment LLM call failed (after retries where retrying made sense)."""


class MalformedResponseError(SamplingError):
  """A server answered with something that is not a valid completion response."""


@dataclasses.dataclass(frozen=True)
class Completion:
  """One answer.

  Attributes:
    text: the generated text (stop token and stop string excluded).
    finish_reason: "stop" (stop token or stop string) or "length" (hit max_tokens).
    completion_tokens: generated tokens, when the backend knows.
  """

  text: str
  finish_reason: str = "length"
  completion_tokens: int | None = None


def prompt_seed(seed: int, index: int) -> int:
  """The prompt seed of prompt ``index`` in a call with seed ``seed`` (module docstring)."""
  _check_int("seed", seed, 0, _MAX_SEED)
  _check_int("index", index, 0)
  if index == 0:
    return seed
  digest = hashlib.sha256(f"eagle_jax/{seed}/{index}".encode()).digest()
  return int.from_bytes(digest[:4], "big") & _MAX_SEED


def canonical_prompt(prompt: Prompt, name: str = "prompt") -> str | list[dict[str, str]]:
  """Validates a prompt; returns it as a str or a list of plain ``{"role", "content"}`` dicts."""
  if isinstance(prompt, str):
    return prompt
  if not isinstance(prompt, Sequence) or not prompt:
    raise ValueError(
        f"{name}: expected a str or a non-empty list of messages, got {type(prompt).__name__}")
  out = []
  for j, m in enumerate(prompt):
    if not isinstance(m, Mapping) or set(m) != {"role", "content"}:
      raise ValueError(f"{name}[{j}]: expected a message with exactly 'role' and 'content', got {m!r}")
    if m["role"] not in _ROLES:
      raise ValueError(f"{name}[{j}].role: expected one of {_ROLES}, got {m['role']!r}")
    if not isinstance(m["content"], str):
      raise ValueError(f"{name}[{j}].content: expected a str, got {type(m['content']).__name__}")
    out.append({"role": m["role"], "content": m["content"]})
  return out


def is_chat(prompt: Prompt, params: SamplingParams) -> bool:
  """Whether the chat template applies (message lists always use it)."""
  return params.chat or not isinstance(prompt, str)


def make_params(
    n: int,
    *,
    max_tokens: int,
    temperature: float,
    seed: int,
    default_chat: bool,
    params: Mapping[str, Any],
) -> list[SamplingParams]:
  """Per-prompt ``SamplingParams`` for a ``sample`` call of ``n`` prompts."""
  allowed = {f.name for f in dataclasses.fields(SamplingParams)} - {"max_tokens", "temperature",
                                                                   "seed"}
  unknown = sorted(set(params) - allowed)
  if unknown:
    raise ValueError(f"sample: unknown sampling parameter(s) {unknown}; expected {sorted(allowed)}")
  kwargs = {"chat": default_chat, **params}
  base = SamplingParams(max_tokens=max_tokens, temperature=temperature, seed=seed, **kwargs)
  return [base.replace(seed=prompt_seed(seed, i)) for i in range(n)]


@runtime_checkable
class SamplingClient(Protocol):
  """What EAGLE needs from its environment LLM (module docstring for seeds and prompts)."""

  async def sample(
      self,
      prompts: Sequence[Prompt],
      *,
      max_tokens: int,
      temperature: float,
      seed: int,
      **params: Any,
  ) -> list[str]:
    ...


class SamplingBackend(abc.ABC):
  """Base of every backend: ``generate`` over resolved per-prompt params; ``sample`` on top.

  Attributes:
    model_id: names the model in cache keys and OpenAI ``model`` fields.
    default_chat: ``chat`` for ``sample`` calls that do not pass it.
  """

  model_id: str = ""
  default_chat: bool = False

  @abc.abstractmethod
  async def generate(
      self,
      prompts: Sequence[Prompt],
      params: Sequence[SamplingParams],
      *,
      on_result: ResultCallback | None = None,
  ) -> list[Completion]:
    """One completion per prompt; ``params[i]`` (including its prompt seed) applies to prompt i.

    Args:
      prompts: N prompts (str or message lists, already validated by ``canonical_prompt``).
      params: N per-prompt parameters.
      on_result: called once per prompt as soon as its answer is known.

    Returns:
      N completions in prompt order.
    """

  async def sample(
      self,
      prompts: Sequence[Prompt],
      *,
      max_tokens: int,
      temperature: float = 0.0,
      seed: int = 0,
      **params: Any,
  ) -> list[str]:
    """Texts for ``prompts``; prompt i uses prompt seed ``prompt_seed(seed, i)``."""
    if isinstance(prompts, str) or not isinstance(prompts, Sequence):
      raise ValueError(f"prompts: expected a list of prompts, got {type(prompts).__name__}")
    if not prompts:
      return []
    prompts = [canonical_prompt(p, f"prompts[{i}]") for i, p in enumerate(prompts)]
    per_prompt = make_params(len(prompts), max_tokens=max_tokens, temperature=temperature,
                             seed=seed, default_chat=self.default_chat, params=params)
    return [c.text for c in await self.generate(prompts, per_prompt)]

  async def aclose(self) -> None:  # noqa: B027 (optional hook, no-op by default)
    """Releases connections or threads (no-op by default)."""

  async def __aenter__(self):
    return self

  async def __aexit__(self, *exc) -> None:
    await self.aclose()


async def sample_one(client: SamplingClient, prompt: Prompt, params: SamplingParams) -> str:
  """One prompt through any ``SamplingClient`` with every field of ``params`` (its seed is used
  as-is: a one-prompt call's prompt seed is the call's seed)."""
  d = params.to_dict()
  d["stop"] = tuple(d["stop"])
  max_tokens, temperature, seed = d.pop("max_tokens"), d.pop("temperature"), d.pop("seed")
  out = await client.sample([prompt], max_tokens=max_tokens, temperature=temperature, seed=seed,
                            **d)
  return out[0]


def check_generate_args(prompts: Sequence[Prompt], params: Sequence[SamplingParams]) -> None:
  """Common validation of ``generate`` arguments."""
  if len(prompts) != len(params):
    raise ValueError(f"generate: {len(prompts)} prompts but {len(params)} params")
  for i, p in enumerate(params):
    if not isinstance(p, SamplingParams):
      raise ValueError(f"params[{i}]: expected SamplingParams, got {type(p).__name__}")
