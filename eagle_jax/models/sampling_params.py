"""How one prompt is sampled: the single parameters type from config to decoder.

``SamplingParams`` is what a config's sampling block becomes (``from_config``), what every
environment backend takes per prompt (``eagle_jax.env.client``), what the HTTP client and server
translate to and from the OpenAI API, what the response cache keys on, and what the JAX decoder
(``eagle_jax.models.sampling.Sampler``) runs. Plain Python: importing it pulls in no JAX.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

MAX_SEED = 2**31 - 1


def check_int(name: str, value: Any, lo: int, hi: int | None = None) -> int:
  """``value`` as an int in ``[lo, hi]``; ValueError naming ``name`` otherwise."""
  if isinstance(value, bool) or not isinstance(value, int):
    raise ValueError(f"{name}: expected an int, got {type(value).__name__} {value!r}")
  if value < lo or (hi is not None and value > hi):
    bound = f"[{lo}, {hi}]" if hi is not None else f">= {lo}"
    raise ValueError(f"{name}: expected an int in {bound}, got {value}")
  return value


def check_float(name: str, value: Any) -> float:
  """``value`` as a finite float; ValueError naming ``name`` otherwise."""
  if isinstance(value, bool) or not isinstance(value, (int, float)):
    raise ValueError(f"{name}: expected a number, got {type(value).__name__} {value!r}")
  value = float(value)
  if value != value or value in (float("inf"), float("-inf")):
    raise ValueError(f"{name}: expected a finite number, got {value}")
  return value


@dataclasses.dataclass(frozen=True)
class SamplingParams:
  """How to sample one prompt (every field but ``stop_ids`` is part of the response-cache key).

  Attributes:
    max_tokens: most new tokens (>= 1).
    temperature: 0 for greedy decoding, else the softmax temperature (>= 0).
    top_p: nucleus mass in (0, 1] (1: off).
    top_k: keep the k most likely tokens (0: off).
    repetition_penalty: > 0; > 1 discourages tokens already in the row (1: off).
    no_repeat_ngram: forbid repeating any n-gram of this size (0: off; not part of the OpenAI API,
      sent as an extra field only when set).
    stop: strings that end the answer; the answer is cut before the first occurrence.
    seed: the prompt seed (``eagle_jax.env.client`` documents the per-prompt seed rule).
    chat: render a string prompt as one user turn with the chat template.
    stop_ids: token ids that end a row in the JAX decoder (None: the tokenizer's stop tokens). A
      decoder-level detail: never sent over HTTP, not part of cache keys.
  """

  max_tokens: int = 64
  temperature: float = 0.0
  top_p: float = 1.0
  top_k: int = 0
  repetition_penalty: float = 1.0
  no_repeat_ngram: int = 0
  stop: tuple[str, ...] = ()
  seed: int = 0
  chat: bool = False
  stop_ids: tuple[int, ...] | None = None

  def __post_init__(self):
    check_int("max_tokens", self.max_tokens, 1)
    check_int("top_k", self.top_k, 0)
    check_int("no_repeat_ngram", self.no_repeat_ngram, 0)
    check_int("seed", self.seed, 0, MAX_SEED)
    for name in ("temperature", "top_p", "repetition_penalty"):
      object.__setattr__(self, name, check_float(name, getattr(self, name)))
    if self.temperature < 0:
      raise ValueError(f"temperature: expected >= 0, got {self.temperature}")
    if not 0.0 < self.top_p <= 1.0:
      raise ValueError(f"top_p: expected in (0, 1], got {self.top_p}")
    if self.repetition_penalty <= 0:
      raise ValueError(f"repetition_penalty: expected > 0, got {self.repetition_penalty}")
    stop = self.stop
    if isinstance(stop, str):
      stop = (stop,)
    if not isinstance(stop, (tuple, list)) or not all(isinstance(s, str) and s for s in stop):
      raise ValueError(f"stop: expected a list of non-empty strings, got {self.stop!r}")
    object.__setattr__(self, "stop", tuple(stop))
    if not isinstance(self.chat, bool):
      raise ValueError(f"chat: expected a bool, got {self.chat!r}")
    if self.stop_ids is not None:
      ids = tuple(self.stop_ids)
      for i in ids:
        check_int("stop_ids[]", i, 0)
      object.__setattr__(self, "stop_ids", ids)

  def replace(self, **changes) -> SamplingParams:
    return dataclasses.replace(self, **changes)

  def to_dict(self) -> dict[str, Any]:
    """JSON-ready dict of the cache-key fields (``stop`` as a list; ``stop_ids`` left out)."""
    # Shallow (every field is a scalar or a tuple of them): ``dataclasses.asdict``'s deep copy was
    # most of the response cache's time per request.
    d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
    d["stop"] = list(self.stop)
    del d["stop_ids"]
    return d

  @classmethod
  def from_config(cls, config: Mapping[str, Any] | Any, field: str = "sampling",
                  **overrides) -> SamplingParams:
    """Params from a config block (a ``ConfigDict`` or mapping of field names).

    Args:
      config: the block; every key must be a field name.
      field: its dotted path, named in errors (e.g. ``config.env.sampling``).
      **overrides: fields set on top of the block (e.g. ``max_tokens`` per request kind).

    Raises:
      ValueError: an unknown key or a bad value, naming ``field``.
    """
    d = dict(config.items()) if hasattr(config, "items") else dict(config)
    known = {f.name for f in dataclasses.fields(cls)} - {"stop_ids"}
    unknown = sorted(set(d) - known)
    if unknown:
      raise ValueError(f"{field}: unknown field(s) {unknown}; expected some of {sorted(known)}")
    d.update(overrides)
    if "stop" in d:
      d["stop"] = tuple(d["stop"])
    try:
      return cls(**d)
    except ValueError as e:
      raise ValueError(f"{field}.{e}") from None
