"""A decoder as a frozen base: its shapes, weights and tokenizer, and its pooled text features.

``Decoder`` is what a job reads a Llama-family backbone as: loaded from a GGUF (an asset name or a
path: SmolLM2 on CPU) or a Hugging Face safetensors folder (larger models), once per process per
source (``load_decoder``), or abstract (shapes only, ``params=None``) for AOT dry runs
(``abstract_config``). The agent (``agent/lm_features.py``) and the encoder E_D
(``embed/decoder_encoder.py``) share it, so both read one copy of the base weights.

Token arrays: texts -> id lists (``tokenize``) -> ids ``[N, T] int32`` left-padded with ``PAD`` to a
multiple of ``BUCKET`` (``bucket_width``, ``left_pad``); ``pooled_hidden`` is the mean of the
final-norm hidden states over a row's real tokens, ``[N, D] float32``.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from eagle_jax import assets
from eagle_jax.models import configs as model_configs
from eagle_jax.models import files, loading
from eagle_jax.models import llama as llama_lib
from eagle_jax.models.tokenizer import Tokenizer

PAD = -1  # token id of padding in id arrays
BUCKET = 16  # padded widths (``bucket_width``) are multiples of this many tokens


@dataclasses.dataclass(frozen=True)
class Decoder:
  """A decoder's shapes, frozen weights (pure dict of the ``Llama``'s parameters, or None when
  abstract) and tokenizer (None when abstract); ``source`` names the file or folder it came from."""

  config: llama_lib.LlamaConfig
  params: dict | None
  tokenizer: Tokenizer | None
  source: str


@functools.cache
def load_decoder(source: str, chat_template: str = "") -> Decoder:
  """Loads ``source``: a GGUF asset name / path (``""``: SmolLM2) or a safetensors folder holding
  ``config.json`` and ``tokenizer.json`` (ChatML prompts). ``chat_template``: an override of the
  GGUF's template (``chat_template.resolve``; ``""``: the file's own)."""
  import tokenizers  # noqa: PLC0415
  from flax import nnx  # noqa: PLC0415

  if source and os.path.isdir(source):
    config, model = loading.load_llama_safetensors(source)
    tokenizer = Tokenizer(tokenizers.Tokenizer.from_file(os.path.join(source, "tokenizer.json")))
    path = source
  else:
    path = str(assets.resolve_gguf(source))
    config, model = loading.load_llama_gguf(path)
    tokenizer = Tokenizer.from_gguf(path, chat_template or None)
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  return Decoder(config, params, tokenizer, path)


def abstract_config(shapes: str, source: str) -> llama_lib.LlamaConfig | None:
  """A decoder's shapes without reading its weights: the preset ``shapes``
  (``models.configs.PRESETS``), else the ``config.json`` of the safetensors folder ``source``;
  None when neither is available. Raises ``files.LoadingError`` for an unknown preset or a bad
  ``config.json``."""
  if shapes:
    return model_configs.preset(shapes)
  path = os.path.join(source, "config.json") if source else ""
  if path and os.path.isfile(path):
    return model_configs.config_from_hf(files.read_json(path))
  return None


def tokenize(tokenizer: Tokenizer, texts: Sequence[str], max_tokens: int) -> list[list[int]]:
  """Each text's first ``max_tokens`` token ids, no chat template (bos first when the tokenizer
  adds one)."""
  return [tokenizer.encode_prompt(t)[:max_tokens] for t in texts]


def bucket_width(rows: Sequence[Sequence[int]], max_tokens: int) -> int:
  """The padded width of a call: its longest row rounded up to ``BUCKET``, at most
  ``max_tokens``."""
  longest = max((len(r) for r in rows), default=1)
  return min(max_tokens, max(BUCKET, -(-longest // BUCKET) * BUCKET))


def left_pad(rows: Sequence[Sequence[int]], width: int) -> np.ndarray:
  """Id lists -> ``[len(rows), width]`` int32, left-padded with ``PAD``; longer rows keep their
  first ``width`` ids."""
  out = np.full((len(rows), width), PAD, np.int32)
  for i, ids in enumerate(rows):
    ids = list(ids)[:width]
    if ids:
      out[i, width - len(ids):] = ids
  return out


def pooled_hidden(backbone: llama_lib.Llama, ids: jax.Array) -> jax.Array:
  """Mean of the final-norm hidden states over the real tokens.

  Args:
    backbone: the decoder.
    ids: [N, T] int32 token ids, padded with ``PAD`` (RoPE positions count real tokens only, so
      left padding shifts nothing).

  Returns:
    [N, D] float32 (zeros for a row without real tokens).
  """
  mask = ids != PAD
  hidden, _ = backbone.hidden_states(jnp.where(mask, ids, 0), attention_mask=mask)
  w = mask[..., None].astype(jnp.float32)
  return jnp.sum(hidden.astype(jnp.float32) * w, 1) / jnp.maximum(jnp.sum(w, 1), 1.0)
