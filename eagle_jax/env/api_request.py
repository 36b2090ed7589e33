"""Parsing and validation of OpenAI completions / chat-completions request bodies (``server``).

Request fields (anything else is refused, see below):

* ``model`` (must be the served name), ``prompt`` (a string or a list of strings; list element
  ``j`` gets prompt seed ``prompt_seed(seed, j)``) or ``messages`` (roles ``system``, ``user``,
  ``assistant``, and ``developer`` treated as ``system``; ``content`` a string or a list of
  ``{"type": "text", "text": ...}`` parts, joined with newlines as vLLM does);
* ``max_tokens`` or ``max_completion_tokens`` (default 16 as in the OpenAI completions API; both
  given and different is a 400), ``temperature`` (default 1.0), ``top_p``, ``stop``;
* ``seed``: absent or null draws a fresh random seed per request (so unseeded requests at
  temperature > 0 differ, as in the OpenAI API);
* extensions: ``top_k`` (-1 or 0: off), ``repetition_penalty`` (alias ``repeat_penalty``, as
  llama.cpp names it), ``no_repeat_ngram``;
* ``logprobs``: chat ``true`` with ``top_logprobs`` absent or 0; completions ``0``. The answer then
  carries the model's log-prob of every generated token (stop token included; log-softmax of the
  raw logits, before temperature and truncation, as vLLM reports by default) in the OpenAI format,
  if the backend reports them (``LocalSampler`` does); else 400. Top alternatives are not computed,
  so ``top_logprobs > 0`` and completions ``logprobs >= 1`` are refused;
* ``user`` is accepted and ignored (metadata).

Fields set to null count as absent. Fields that only have a no-op value here are accepted with that
value (``n: 1``, ``stream: false``, ``presence_penalty``/``frequency_penalty: 0``,
``logit_bias: {}``, ``response_format: {"type": "text"}``, ``tools: []``, ``tool_choice: "none"``,
``echo: false``, ``best_of: 1``, ``suffix: ""``); any other value, and every other field, is a 400
naming the field instead of being silently dropped. Errors are OpenAI-style
``{"error": {"message", "type", "param", "code"}}`` with ``param`` the field.
"""

from __future__ import annotations

import dataclasses
import json
import secrets
from collections.abc import Mapping
from typing import Any

from eagle_jax.env import client as client_lib
from eagle_jax.env.client import Prompt, SamplingParams
from eagle_jax.models.sampling_params import MAX_SEED

_ROLES = ("system", "user", "assistant", "developer")

_COMMON = frozenset({
    "model", "max_tokens", "max_completion_tokens", "temperature", "top_p", "seed", "stop",
    "top_k", "repetition_penalty", "repeat_penalty", "no_repeat_ngram", "logprobs", "user"})
_SUPPORTED = {True: _COMMON | {"messages", "top_logprobs"}, False: _COMMON | {"prompt"}}
# Fields accepted only with their no-op value (chat-only / completions-only ones are refused on the
# other endpoint as unsupported).
_NOOP: dict[str, tuple[Any, tuple[bool, ...]]] = {
    "n": (1, (True, False)),
    "stream": (False, (True, False)),
    "presence_penalty": (0, (True, False)),
    "frequency_penalty": (0, (True, False)),
    "logit_bias": ({}, (True, False)),
    "response_format": ({"type": "text"}, (True,)),
    "tools": ([], (True,)),
    "tool_choice": ("none", (True,)),
    "echo": (False, (False,)),
    "best_of": (1, (False,)),
    "suffix": ("", (False,)),
}


class BadRequest(ValueError):
  """A request failed validation; ``param`` names the offending field."""

  def __init__(self, message: str, param: str | None = None):
    super().__init__(message)
    self.param = param


def _get_int(body: Mapping, name: str, default: int | None, lo: int, hi: int | None = None) -> int:
  value = body.get(name, default)
  if value is None:
    raise BadRequest(f"'{name}' is required", name)
  if isinstance(value, bool) or not isinstance(value, int):
    raise BadRequest(f"'{name}' must be an integer, got {json.dumps(value)}", name)
  if value < lo or (hi is not None and value > hi):
    rng = f"between {lo} and {hi}" if hi is not None else f">= {lo}"
    raise BadRequest(f"'{name}' must be {rng}, got {value}", name)
  return value


def _get_float(body: Mapping, name: str, default: float) -> float:
  value = body.get(name, default)
  if value is None:
    return default
  if isinstance(value, bool) or not isinstance(value, (int, float)):
    raise BadRequest(f"'{name}' must be a number, got {json.dumps(value)}", name)
  return float(value)


def _same(a: Any, b: Any) -> bool:
  """JSON equality where booleans are not numbers."""
  if isinstance(a, bool) or isinstance(b, bool):
    return a is b
  return a == b


def _check_fields(body: Mapping[str, Any], chat: bool) -> None:
  """400 for every field this server does not support (module docstring)."""
  for name, value in body.items():
    if name in _SUPPORTED[chat]:
      continue
    noop = _NOOP.get(name)
    if noop is not None and chat in noop[1]:
      if not _same(value, noop[0]):
        raise BadRequest(f"'{name}': only {json.dumps(noop[0])} is supported, got "
                         f"{json.dumps(value)}", name)
      continue
    endpoint = "chat completions" if chat else "completions"
    raise BadRequest(f"'{name}': not supported by this server's {endpoint} endpoint", name)


def _messages(messages: Any) -> list[dict[str, str]]:
  if messages is None:
    raise BadRequest("'messages' is required", "messages")
  if not isinstance(messages, list) or not messages:
    raise BadRequest("'messages' must be a non-empty list", "messages")
  out = []
  for j, m in enumerate(messages):
    where = f"messages[{j}]"
    if not isinstance(m, dict) or m.get("role") not in _ROLES or "content" not in m:
      raise BadRequest(
          f"'{where}' must be an object with 'role' in {list(_ROLES)} and a 'content'", where)
    extra = sorted(k for k, v in m.items() if k not in ("role", "content") and v is not None)
    if extra:
      raise BadRequest(f"'{where}.{extra[0]}': not supported by this server", f"{where}.{extra[0]}")
    content = m["content"]
    if isinstance(content, list) and content:
      texts = []
      for k, part in enumerate(content):
        pw = f"{where}.content[{k}]"
        if not isinstance(part, dict) or part.get("type") != "text":
          kind = part.get("type") if isinstance(part, dict) else type(part).__name__
          raise BadRequest(f"'{pw}': only parts {{'type': 'text', 'text': ...}} are supported, "
                           f"got type {kind!r}", pw)
        if not isinstance(part.get("text"), str) or set(part) - {"type", "text"}:
          raise BadRequest(f"'{pw}' must be exactly {{'type': 'text', 'text': <string>}}", pw)
        texts.append(part["text"])
      content = "\n".join(texts)
    if not isinstance(content, str):
      raise BadRequest(
          f"'{where}' must be an object with 'role' in {list(_ROLES)} and a 'content' that is a "
          f"string or a non-empty list of text parts", where)
    role = "system" if m["role"] == "developer" else m["role"]
    out.append({"role": role, "content": content})
  return out


def _logprobs(body: Mapping[str, Any], chat: bool, supported: bool) -> bool:
  value = body.get("logprobs")
  if chat:
    if value is not None and not isinstance(value, bool):
      raise BadRequest(f"'logprobs' must be a boolean, got {json.dumps(value)}", "logprobs")
    top = body.get("top_logprobs")
    if top is not None and not _same(top, 0):
      raise BadRequest(f"'top_logprobs': only 0 is supported (top alternatives are not "
                       f"computed), got {json.dumps(top)}", "top_logprobs")
    wanted = bool(value)
  else:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
      raise BadRequest(f"'logprobs' must be an integer, got {json.dumps(value)}", "logprobs")
    if value is not None and value != 0:
      raise BadRequest(f"'logprobs': only 0 is supported (log-probs of the sampled tokens; top "
                       f"alternatives are not computed), got {value}", "logprobs")
    wanted = value is not None
  if wanted and not supported:
    raise BadRequest("'logprobs': this server's backend does not report log-probs", "logprobs")
  return wanted


@dataclasses.dataclass(frozen=True)
class ParsedRequest:
  """A validated request: its prompts (each with resolved per-prompt params).

  Attributes:
    prompts: the prompts (one for chat; list elements for completions).
    params: per-prompt params (prompt seeds from one request seed).
    chat: whether this is a chat completions request.
    logprobs: whether the answer reports per-token log-probs.
  """

  prompts: list[Prompt]
  params: list[SamplingParams]
  chat: bool
  logprobs: bool = False


def parse_request(body: Any, *, chat: bool, model: str, max_tokens_limit: int,
                  logprobs_supported: bool = False) -> ParsedRequest:
  """Validates a decoded completions / chat-completions body; raises ``BadRequest``."""
  if not isinstance(body, dict):
    raise BadRequest(f"request body must be a JSON object, got {type(body).__name__}")
  body = {k: v for k, v in body.items() if v is not None}
  if "model" not in body:
    raise BadRequest("'model' is required", "model")
  if body["model"] != model:
    raise BadRequest(f"'model': unknown model {body['model']!r}; this server serves {model!r}",
                     "model")
  _check_fields(body, chat)
  if chat:
    prompts: list[Prompt] = [_messages(body.get("messages"))]
  else:
    prompt = body.get("prompt")
    if prompt is None:
      raise BadRequest("'prompt' is required", "prompt")
    if isinstance(prompt, str):
      prompts = [prompt]
    elif isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
      prompts = list(prompt)
    else:
      raise BadRequest("'prompt' must be a string or a non-empty list of strings", "prompt")
  logprobs = _logprobs(body, chat, logprobs_supported)
  stop = body.get("stop", ())
  if isinstance(stop, str):
    stop = (stop,)
  elif not (isinstance(stop, (list, tuple)) and all(isinstance(s, str) and s for s in stop)):
    raise BadRequest("'stop' must be a string or a list of non-empty strings", "stop")
  if "max_tokens" in body and "max_completion_tokens" in body and not _same(
      body["max_tokens"], body["max_completion_tokens"]):
    raise BadRequest(
        f"'max_tokens' ({json.dumps(body['max_tokens'])}) and 'max_completion_tokens' "
        f"({json.dumps(body['max_completion_tokens'])}) differ; give one of them",
        "max_completion_tokens")
  budget = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
  if "repeat_penalty" in body and "repetition_penalty" in body and not _same(
      body["repeat_penalty"], body["repetition_penalty"]):
    raise BadRequest("'repeat_penalty' (llama.cpp's name) and 'repetition_penalty' differ; give "
                     "one of them", "repeat_penalty")
  penalty = "repeat_penalty" if "repeat_penalty" in body else "repetition_penalty"
  top_k = body.get("top_k", 0)
  if _same(top_k, -1):  # vLLM's "off"
    top_k = 0
  seed = (_get_int(body, "seed", None, 0, MAX_SEED) if "seed" in body
          else secrets.randbelow(MAX_SEED + 1))
  try:
    base = SamplingParams(
        max_tokens=_get_int(body, budget, 16, 1, max_tokens_limit),
        temperature=_get_float(body, "temperature", 1.0),
        top_p=_get_float(body, "top_p", 1.0),
        top_k=_get_int({"top_k": top_k}, "top_k", 0, 0),
        repetition_penalty=_get_float(body, penalty, 1.0),
        no_repeat_ngram=_get_int(body, "no_repeat_ngram", 0, 0),
        stop=tuple(stop),
        seed=seed,
        chat=chat,
    )
  except ValueError as e:
    if isinstance(e, BadRequest):
      raise
    field = str(e).split(":", 1)[0]
    if field == "repetition_penalty":
      field = penalty
    raise BadRequest(f"'{field}': {str(e).split(':', 1)[-1].strip()}", field) from None
  params = [base.replace(seed=client_lib.prompt_seed(base.seed, j)) for j in range(len(prompts))]
  return ParsedRequest(prompts=prompts, params=params, chat=chat, logprobs=logprobs)


