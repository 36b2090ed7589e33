"""Tokenizer: built from GGUF metadata (byte-level BPE or SentencePiece BPE), padding, chat prompts.

``Tokenizer.from_gguf`` builds a ``tokenizers.Tokenizer`` directly from the GGUF's
``tokenizer.ggml.*`` fields, without transformers' GGUF path (which needs torch in transformers 5):

* ``tokenizer.ggml.model == "gpt2"`` (SmolLM2, Llama 3): GPT-2 style byte-level BPE from
  ``tokens`` and ``merges``. The pre-tokenizer follows llama.cpp's ``tokenizer.ggml.pre``:
  ``gpt2``/``default`` is the GPT-2 regex with byte-level mapping; ``smollm`` additionally splits
  every digit on its own (llama.cpp applies ``\\p{N}`` first), which is what SmolLM2's Hugging
  Face tokenizer does.
* ``tokenizer.ggml.model == "llama"`` (SentencePiece BPE: Gemma, Llama 2): spaces become ``▁``,
  unknown bytes fall back to ``<0xNN>`` tokens, and the file carries no merges, so they are
  rebuilt from the vocabulary (every split of a token into two vocabulary pieces, best first).
  "Best" is the token's score; for Gemma files it is the token's position in the file, because
  Gemma's scores do not follow its merge order, and Gemma's all-space tokens are stored as real
  spaces and respelled as ``▁`` runs. This is what transformers' GGUF tokenizer builder does.

In both, tokens of type CONTROL (3) become special added tokens and USER_DEFINED (4) plain added
tokens, matched verbatim before BPE (``<|im_start|>``, ``<start_of_turn>``, ``\\n\\n`` ...).

Chat: ``apply_chat_template`` renders a ``models.chat_template.ChatTemplate``: the GGUF's own
``tokenizer.chat_template`` (SmolLM2's ChatML with its default system message), an override (a
bundled template such as ``"gemma"`` for Gemma base files, which carry none, or a ``.jinja``
file), else ChatML. ``stop_ids`` are the chat end-of-turn token (``<|im_end|>`` or
``<end_of_turn>``, when the vocabulary has one) and the GGUF's eos token. Raw (non-chat) prompts
get the bos token when the file says ``tokenizer.ggml.add_bos_token`` (Gemma); rendered chat
prompts never do (the template writes it).
"""

from __future__ import annotations

import pathlib
from collections.abc import Mapping, Sequence

import numpy as np
import tokenizers
from tokenizers import decoders, models, normalizers, pre_tokenizers

from eagle_jax.models import chat_template as chat_lib
from eagle_jax.models.configs import gguf_field as _gguf_field
from eagle_jax.models.files import LoadingError, open_gguf

END_OF_TURN = ("<|im_end|>", "<end_of_turn>", "<|eot_id|>")  # chat end-of-turn tokens, by family
_CONTROL, _USER_DEFINED = 3, 4
_SPACE = "\u2581"


def end_of_turn_id(backend: tokenizers.Tokenizer) -> int | None:
  """Id of the vocabulary's chat end-of-turn token (first of ``END_OF_TURN`` present), or None."""
  return next((i for i in map(backend.token_to_id, END_OF_TURN) if i is not None), None)


def _byte_level(tokens: list[str], merges: list[tuple[str, str]], pre: str) -> tokenizers.Tokenizer:
  vocab = {tok: i for i, tok in enumerate(tokens)}
  tk = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
  byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
  if pre == "smollm":
    tk.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), byte_level])
  elif pre in ("gpt2", "default"):
    tk.pre_tokenizer = byte_level
  else:
    raise LoadingError(
        f"GGUF tokenizer.ggml.pre is {pre!r}; supported: 'smollm', 'gpt2', 'default'")
  tk.decoder = decoders.ByteLevel()
  return tk


def spm_merges(tokens: Sequence[str], priority: Sequence[float]) -> list[tuple[str, str]]:
  """BPE merges implied by a SentencePiece vocabulary: each token's splits into two vocabulary
  pieces, ordered by the merged token's ``priority`` (higher first), then by longer left and right
  pieces, then by the pieces' ids (transformers' ``generate_merges``)."""
  vocab = {t: i for i, t in enumerate(tokens)}
  merges = []
  for tok, score in zip(tokens, priority):
    local = [(tok[:i], tok[i:]) for i in range(1, len(tok)) if tok[:i] in vocab and tok[i:] in vocab]
    local.sort(key=lambda lr: (vocab[lr[0]], vocab[lr[1]]))
    merges.extend((left, right, score) for left, right in local)
  merges.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
  return [(left, right) for left, right, _ in merges]


def _sentencepiece(tokens: list[str], scores: Sequence[float], gemma: bool) -> tokenizers.Tokenizer:
  if gemma:  # all-space tokens are stored as spaces; merge order is the file order
    tokens = [_SPACE * len(t) if " " in t and not t.strip() else t for t in tokens]
    scores = [-float(i) for i in range(len(tokens))]
  vocab = {tok: i for i, tok in enumerate(tokens)}
  unk = next((t for t in ("<unk>",) if t in vocab), None)
  tk = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=spm_merges(tokens, scores),
                                       fuse_unk=True, unk_token=unk, byte_fallback=True))
  tk.normalizer = normalizers.Replace(" ", _SPACE)
  tk.pre_tokenizer = pre_tokenizers.Split(pattern=" ", behavior="merged_with_previous")
  tk.decoder = decoders.Sequence(
      [decoders.Replace(_SPACE, " "), decoders.ByteFallback(), decoders.Fuse()])
  return tk


def backend_from_gguf(path: str | pathlib.Path) -> tuple[tokenizers.Tokenizer, dict]:
  """A ``tokenizers.Tokenizer`` and the GGUF tokenizer metadata (ids, chat template, add_bos)."""
  reader = open_gguf(path)
  kind = _gguf_field(reader, "tokenizer.ggml.model")
  tokens = list(_gguf_field(reader, "tokenizer.ggml.tokens"))
  if len(set(tokens)) != len(tokens) and kind == "gpt2":
    raise LoadingError(f"{path}: GGUF tokenizer.ggml.tokens: duplicate tokens")
  types = np.asarray(_gguf_field(reader, "tokenizer.ggml.token_type", [1] * len(tokens)))
  arch = str(_gguf_field(reader, "general.architecture", ""))
  if kind == "gpt2":
    merges = [tuple(m.split(" ", 1)) for m in _gguf_field(reader, "tokenizer.ggml.merges")]
    tk = _byte_level(tokens, merges, _gguf_field(reader, "tokenizer.ggml.pre", "default"))
  elif kind == "llama":
    scores = list(_gguf_field(reader, "tokenizer.ggml.scores", [0.0] * len(tokens)))
    tk = _sentencepiece(tokens, scores, gemma=arch.startswith("gemma"))
  else:
    raise LoadingError(f"{path}: GGUF tokenizer.ggml.model is {kind!r}; supported: 'gpt2' "
                     "(byte-level BPE), 'llama' (SentencePiece BPE)")
  vocab = tk.get_vocab(with_added_tokens=False)
  tk.add_special_tokens([tokenizers.AddedToken(tokens[i], special=True, normalized=False)
                         for i in np.flatnonzero(types == _CONTROL)])
  tk.add_tokens([tokenizers.AddedToken(tokens[i], special=False, normalized=False)
                 for i in np.flatnonzero(types == _USER_DEFINED) if tokens[i] in vocab])

  def token(key: str) -> str | None:
    i = int(_gguf_field(reader, key, -1))
    return tokens[i] if 0 <= i < len(tokens) else None

  meta = {
      "bos_id": int(_gguf_field(reader, "tokenizer.ggml.bos_token_id", -1)),
      "eos_id": int(_gguf_field(reader, "tokenizer.ggml.eos_token_id", -1)),
      "pad_id": int(_gguf_field(reader, "tokenizer.ggml.padding_token_id", -1)),
      "add_bos": bool(_gguf_field(reader, "tokenizer.ggml.add_bos_token", False)),
      "chat_template": _gguf_field(reader, "tokenizer.chat_template", ""),
      "special_tokens": {name: t for name, t in (
          ("bos_token", token("tokenizer.ggml.bos_token_id")),
          ("eos_token", token("tokenizer.ggml.eos_token_id")),
          ("unk_token", token("tokenizer.ggml.unknown_token_id")),
          ("pad_token", token("tokenizer.ggml.padding_token_id"))) if t is not None},
  }
  return tk, meta


class Tokenizer:
  """Encode/decode, padded batches and chat prompts over a ``tokenizers.Tokenizer``.

  Attributes:
    backend: the ``tokenizers.Tokenizer``.
    eos_id: chat end-of-turn id (``END_OF_TURN`` when the vocabulary has one, else the eos id).
    pad_id: id used for padding (never attended to).
    stop_ids: ids that end a generated answer (end of turn, then the file's eos).
    bos_id: id put before raw prompts when ``add_bos`` (None: none).
    chat: the ``ChatTemplate`` of ``apply_chat_template``.
  """

  def __init__(
      self,
      backend: tokenizers.Tokenizer,
      *,
      eos_id: int | None = None,
      pad_id: int | None = None,
      extra_stop_ids: Sequence[int] = (),
      bos_id: int | None = None,
      add_bos: bool = False,
      chat: chat_lib.ChatTemplate | None = None,
  ):
    self.backend = backend
    if eos_id is None:
      eos_id = end_of_turn_id(backend)
      if eos_id is None:
        raise ValueError(f"Tokenizer: eos_id not given and the vocabulary has none of "
                         f"{list(END_OF_TURN)}")
    self.eos_id = int(eos_id)
    self.pad_id = int(self.eos_id if pad_id is None or pad_id < 0 else pad_id)
    self.stop_ids = tuple(dict.fromkeys([self.eos_id, *(int(i) for i in extra_stop_ids)]))
    self.bos_id = None if bos_id is None or bos_id < 0 else int(bos_id)
    if add_bos and self.bos_id is None:
      raise ValueError("Tokenizer: add_bos needs a bos_id")
    self.add_bos = bool(add_bos)
    self.chat = chat or chat_lib.ChatTemplate(chat_lib.CHATML, origin="chatml")

  @classmethod
  def from_gguf(cls, path: str | pathlib.Path, chat_template: str | None = None) -> Tokenizer:
    """The file's tokenizer; ``chat_template``: an override for ``chat_template.resolve``."""
    backend, meta = backend_from_gguf(path)
    source, origin = chat_lib.resolve(chat_template, meta["chat_template"])
    turn = end_of_turn_id(backend)
    eos = meta["eos_id"] if turn is None else turn
    if eos < 0:
      raise LoadingError(f"{path}: GGUF has no eos token and no chat end-of-turn token")
    return cls(backend, eos_id=eos, pad_id=meta["pad_id"],
               extra_stop_ids=[meta["eos_id"]] if meta["eos_id"] >= 0 else [],
               bos_id=meta["bos_id"], add_bos=meta["add_bos"],
               chat=chat_lib.ChatTemplate(source, meta["special_tokens"], origin=origin))

  @property
  def vocab_size(self) -> int:
    return self.backend.get_vocab_size(with_added_tokens=True)

  def token_to_id(self, token: str) -> int:
    idx = self.backend.token_to_id(token)
    if idx is None:
      raise ValueError(f"token_to_id: {token!r} is not in the vocabulary")
    return idx

  def encode(self, text: str) -> list[int]:
    """Token ids of ``text``; special tokens written in the text are recognised; no bos."""
    if not isinstance(text, str):
      raise ValueError(f"encode: text must be a str, got {type(text).__name__}")
    return self.backend.encode(text, add_special_tokens=False).ids

  def encode_prompt(self, text: str) -> list[int]:
    """Token ids of a raw (non-chat) prompt: ``encode`` with the bos token when ``add_bos``."""
    ids = self.encode(text)
    return [self.bos_id, *ids] if self.add_bos else ids

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
    """The chat prompt of ``messages`` (dicts with ``role`` and ``content``) rendered by
    ``self.chat``; token ids (no extra bos: the template writes it) with ``tokenize``."""
    text = self.chat.render(messages, add_generation_prompt=add_generation_prompt)
    return self.encode(text) if tokenize else text
