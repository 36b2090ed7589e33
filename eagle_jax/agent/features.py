"""Frozen text features for the agent, memoised per distinct text.

A ``TextFeatures`` maps strings to [N, F] float32 rows through a frozen backbone and remembers the
texts it has seen: within a run, episodes revisit the same descriptions and candidate actions many
times (the environment's answers are cached, so the state space is a tree of distinct texts), and a
remembered text is not encoded again. The memo is a least-recently-used table of at most
``max_entries`` texts (``config.world.feature_memo``; 0: unbounded), so a paper-scale run's host
memory does not grow with every text it ever met; a dropped text is encoded again when it returns
(the backbones here give a text the same row whatever it is encoded with).

Backbones:
* ``minilm`` (default on CPU): all-MiniLM-L6-v2 mean-pooled, L2-normalised sentence embeddings (the
  same features E_D's head reads, so one encoder pass per text serves the policy and the utility).
* ``decoder``: the environment/agent decoder (SmolLM2) final-norm hidden states mean-pooled over the
  text's tokens (``DecoderPooler``), for runs that want the policy to read with the decoder.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from eagle_jax.checks import NonFiniteError
from eagle_jax.models import llama as llama_lib


class TextFeatures:
  """Memoised ``texts -> [N, F]`` over an ``encode`` function (a bounded LRU memo).

  Args:
    encode: the backbone, ``[M] texts -> [M, F]``.
    dim: F.
    name: names the features in errors.
    max_entries: most texts remembered (least recently used dropped first); 0: all of them.

  Attributes:
    dim: F.
    encoded: number of texts actually sent to ``encode`` (the rest were memo hits).
  """

  def __init__(self, encode: Callable[[Sequence[str]], np.ndarray], dim: int,
               name: str = "text features", max_entries: int = 0):
    if int(max_entries) < 0:
      raise ValueError(f"{name}: max_entries={max_entries}; expected an int >= 0 (0: unbounded)")
    self._encode = encode
    self.dim = int(dim)
    self.name = name
    self.max_entries = int(max_entries)
    self._memo: collections.OrderedDict[str, np.ndarray] = collections.OrderedDict()
    self.encoded = 0

  def __call__(self, texts: Sequence[str]) -> np.ndarray:
    """[N] strings -> [N, F] float32."""
    if not texts:
      return np.zeros((0, self.dim), np.float32)
    rows: dict[str, np.ndarray] = {}
    for t in texts:
      if t not in rows and t in self._memo:
        self._memo.move_to_end(t)
        rows[t] = self._memo[t]
    todo = sorted({t for t in texts if t not in rows})
    if todo:
      new = np.asarray(self._encode(todo), np.float32)
      if new.shape != (len(todo), self.dim):
        raise ValueError(f"encoder returned {new.shape}, expected ({len(todo)}, {self.dim})")
      bad = ~np.isfinite(new).all(axis=1)
      if bad.any():
        text = todo[int(np.argmax(bad))]
        raise NonFiniteError(f"{self.name}: non-finite values for the text {text[:120]!r} "
                             f"({int(bad.sum())} of {len(todo)} texts); expected finite numbers")
      rows.update(zip(todo, new))
      self._memo.update(zip(todo, new))
      self.encoded += len(todo)
      if self.max_entries:
        while len(self._memo) > self.max_entries:
          self._memo.popitem(last=False)
    return np.stack([rows[t] for t in texts])

  def __len__(self) -> int:
    return len(self._memo)


class DecoderPooler:
  """Mean-pooled final hidden states of a ``Llama`` decoder: texts -> [N, D].

  Texts are tokenised (no chat template), truncated to ``max_tokens``, right-padded to their own
  bucket of 16 tokens and run ``batch`` rows at a time (padded) with texts of the same bucket only:
  a run compiles one program per length bucket, and a text's row does not depend on the texts it is
  pooled with (see ``models.text_encoder``).
  """

  def __init__(self, model: llama_lib.Llama, tokenizer, *, max_tokens: int = 256, batch: int = 16):
    from flax import nnx  # noqa: PLC0415

    self.tokenizer = tokenizer
    self.max_tokens = int(max_tokens)
    self.batch = int(batch)
    self.dim = int(model.config.hidden)
    graphdef, state = nnx.split(model)

    @jax.jit
    def pool(state, tokens, mask):
      m = nnx.merge(graphdef, state)
      positions = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0)
      hidden, _ = m.hidden_states(tokens, positions, attention_mask=mask)
      w = mask[..., None].astype(hidden.dtype)
      return jnp.sum(hidden * w, axis=1) / jnp.maximum(jnp.sum(w, axis=1), 1.0)

    self._state = state
    self._pool = pool

  def __call__(self, texts: Sequence[str]) -> np.ndarray:
    ids = [self.tokenizer.encode(t)[: self.max_tokens] or [0] for t in texts]
    out = np.zeros((len(ids), self.dim), np.float32)
    buckets = np.array([-(-len(x) // 16) * 16 for x in ids])
    for length in sorted(set(buckets.tolist())):
      members = np.flatnonzero(buckets == length)
      for start in range(0, len(members), self.batch):
        rows = members[start: start + self.batch]
        tokens = np.zeros((self.batch, length), np.int32)
        mask = np.zeros((self.batch, length), bool)
        for j, r in enumerate(rows):
          tokens[j, : len(ids[r])] = ids[r]
          mask[j, : len(ids[r])] = True
        pooled = np.asarray(self._pool(self._state, tokens, mask))
        out[rows] = pooled[: len(rows)]
    return out
