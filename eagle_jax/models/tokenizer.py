"""Tokenizer: byte-level BPE built from GGUF metadata, padding, and ChatML chat templates.

``Tokenizer.from_gguf`` builds a ``tokenizers.Tokenizer`` directly from ``tokenizer.ggml.tokens``,
``tokenizer.ggml.merges`` and ``tokenizer.ggml.token_type`` (GPT-2 style byte-level BPE), without
transformers' GGUF path (which needs torch in transformers 5). Tokens of type CONTROL (3) and
USER_DEFINED (4) become special added tokens that are matched verbatim before BPE (``<|im_start|>``
etc.). The pre-tokenizer follows llama.cpp's ``tokenizer.ggml.pre``: ``gpt2``/``default`` is the
GPT-2 regex with byte-level mapping; ``smollm`` additionally splits every digit on its own
(llama.cpp applies ``\\p{N}`` first), which is what SmolLM2's Hugging Face tokenizer does.

Chat: ``apply_chat_template`` renders ChatML (``<|im_start|>role\\ncontent<|im_end|>\\n`` per
message, then ``<|im_start|>assistant\\n``). SmolLM2's template inserts a default system message
when the first message is not a system message; that text is read from the GGUF's
``tokenizer.chat_template``. The chat end-of-turn token ``<|im_end|>`` is the stop token (the GGUF's
eos id points to it for SmolLM2; ``<|im_start|>`` is its bos).
"""

from __future__ import annotations

import pathlib
import re
from collections.abc import Mapping, Sequence

import gguf
import numpy as np
import tokenizers
from tokenizers import decoders, models, pre_tokenizers

from eagle_jax.models.files import open_gguf

IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
_CONTROL, _USER_DEFINED = 3, 4
_SYSTEM_RE = re.compile(r"<\|im_start\|>system\n(.*?)<\|im_end\|>", re.S)


def _gguf_field(reader: gguf.GGUFReader, key: str, default=None):
  field = reader.fields.get(key)
  if field is None:
    if default is None:
      raise ValueError(f"GGUF metadata: missing tokenizer field {key!r}")
    return default
  return field.contents()


def bpe_from_gguf(path: str | pathlib.Path) -> tuple[tokenizers.Tokenizer, dict]:
  """A ``tokenizers.Tokenizer`` and the GGUF tokenizer metadata (ids, chat template)."""
  reader = open_gguf(path)
  model = _gguf_field(reader, "tokenizer.ggml.model")
  if model != "gpt2":
    raise ValueError(
        f"GGUF tokenizer.ggml.model is {model!r}; only byte-level BPE ('gpt2') is supported")
  pre = _gguf_field(reader, "tokenizer.ggml.pre", "default")
  tokens = list(_gguf_field(reader, "tokenizer.ggml.tokens"))
  merges = [tuple(m.split(" ", 1)) for m in _gguf_field(reader, "tokenizer.ggml.merges")]
  types = np.asarray(_gguf_field(reader, "tokenizer.ggml.token_type", [1] * len(tokens)))
  vocab = {tok: i for i, tok in enumerate(tokens)}
  if len(vocab) != len(tokens):
    raise ValueError("GGUF tokenizer.ggml.tokens: duplicate tokens")
  tk = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
  byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
  if pre == "smollm":
    tk.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), byte_level])
  elif pre in ("gpt2", "default"):
    tk.pre_tokenizer = byte_level
  else:
    raise ValueError(
        f"GGUF tokenizer.ggml.pre is {pre!r}; supported: 'smollm', 'gpt2', 'default'")
  tk.decoder = decoders.ByteLevel()
  special = [tokens[i] for i in np.flatnonzero((types == _CONTROL) | (types == _USER_DEFINED))]
  tk.add_special_tokens(
      [tokenizers.AddedToken(t, special=True, normalized=False) for t in special])
  meta = {
      "bos_id": int(_gguf_field(reader, "tokenizer.ggml.bos_token_id", -1)),
      "eos_id": int(_gguf_field(reader, "tokenizer.ggml.eos_token_id", -1)),
      "pad_id": int(_gguf_field(reader, "tokenizer.ggml.padding_token_id", -1)),
      "chat_template": _gguf_field(reader, "tokenizer.chat_template", ""),
  }
  return tk, meta


class Tokenizer:
  """Encode/decode, padded batches and ChatML prompts over a ``tokenizers.Tokenizer``.

  Attributes:
    backend: the ``tokenizers.Tokenizer``.
    eos_id: chat end-of-turn id (``<|im_end|>`` when the vocabulary has it).
    pad_id: id used for padding (never attended to).
    default_system: system message inserted when a chat does not start with one (or None).
  """

  def __init__(
      self,
      backend: tokenizers.Tokenizer,
      *,
      eos_id: int | None = None,
      pad_id: int | None = None,
      default_system: str | None = None,
  ):
    self.backend = backend
    im_end = backend.token_to_id(IM_END)
    if eos_id is None:
      if im_end is None:
        raise ValueError(f"Tokenizer: eos_id not given and the vocabulary has no {IM_END!r}")
      eos_id = im_end
    self.eos_id = int(eos_id)
    self.pad_id = int(self.eos_id if pad_id is None or pad_id < 0 else pad_id)
    self.default_system = default_system

  @classmethod
  def from_gguf(cls, path: str | pathlib.Path) -> Tokenizer:
    backend, meta = bpe_from_gguf(path)
    match = _SYSTEM_RE.search(meta["chat_template"] or "")
    return cls(backend, eos_id=backend.token_to_id(IM_END), pad_id=meta["pad_id"],
               default_system=match.group(1) if match else None)

  @property
  def vocab_size(self) -> int:
    return self.backend.get_vocab_size(with_added_tokens=True)

  @property
  def stop_ids(self) -> tuple[int, ...]:
    return (self.eos_id,)

  def token_to_id(self, token: str) -> int:
    idx = self.backend.token_to_id(token)
    if idx is None:
      raise ValueError(f"token_to_id: {token!r} is not in the vocabulary")
    return idx

  def encode(self, text: str) -> list[int]:
    """Token ids of ``text``; special tokens written in the text are recognised."""
    if not isinstance(text, str):
      raise ValueError(f"encode: text must be a str, got {type(text).__name__}")
    return self.backend.encode(text, add_special_tokens=False).ids

  def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
    return self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

  def pad(
      self,
      ids: Sequence[Sequence[int]],
      *,
      padding_side: str = "left",
      length: int | None = None,
  ) -> tuple[np.ndarray, np.ndarray]:
    """Pads id lists into arrays.

    Args:
      ids: B lists of token ids.
      padding_side: "left" (for generation) or "right".
      length: total length T (default: the longest list); must fit every list.

    Returns:
      (tokens [B, T] int32, mask [B, T] bool with True on real tokens).
    """
    if padding_side not in ("left", "right"):
      raise ValueError(f"padding_side: expected 'left' or 'right', got {padding_side!r}")
    if not ids:
      raise ValueError("pad: ids is empty")
    longest = max(len(x) for x in ids)
    length = longest if length is None else length
    if length < longest:
      raise ValueError(f"pad: length={length} is shorter than the longest sequence ({longest})")
    tokens = np.full((len(ids), length), self.pad_id, np.int32)
    mask = np.zeros((len(ids), length), bool)
    for i, x in enumerate(ids):
      n = len(x)
      sl = slice(length - n, length) if padding_side == "left" else slice(0, n)
      tokens[i, sl] = x
      mask[i, sl] = True
    return tokens, mask

  def apply_chat_template(
      self,
      messages: Sequence[Mapping[str, str]],
      *,
      add_generation_prompt: bool = True,
      tokenize: bool = False,
  ) -> str | list[int]:
    """ChatML prompt for ``messages`` (dicts with ``role`` and ``content``)."""
    if not messages:
      raise ValueError("apply_chat_template: messages is empty")
    parts = []
    for i, m in enumerate(messages):
      if not isinstance(m, Mapping) or "role" not in m or "content" not in m:
        raise ValueError(
            f"apply_chat_template: messages[{i}] needs 'role' and 'content', got {m!r}")
      if i == 0 and m["role"] != "system" and self.default_system is not None:
        parts.append(f"{IM_START}system\n{self.default_system}{IM_END}\n")
      parts.append(f"{IM_START}{m['role']}\n{m['content']}{IM_END}\n")
    if add_generation_prompt:
      parts.append(f"{IM_START}assistant\n")
    text = "".join(parts)
    return self.encode(text) if tokenize else text
