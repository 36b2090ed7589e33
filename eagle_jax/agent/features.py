"""Frozen text features for the agent, memoised per distinct text.

A ``TextFeatures`` maps strings to [N, F] float32 rows through a frozen backbone and remembers every
text it has seen: within a run, episodes revisit the same descriptions and candidate actions many
times (the environment's answers are cached, so the state space is a tree of distinct texts), and each
text is encoded once.

Backbones:
* ``minilm`` (default on CPU): all-MiniLM-L6-v2 mean-pooled, L2-normalised sentence embeddings (the
  same features E_D's head reads, so one encoder pass per text serves the policy and the utility).
* ``decoder``: the environment/agent decoder (SmolLM2) final-norm hidden states mean-pooled over the
  text's tokens (``DecoderPooler``), for runs that want the policy to read with the decoder.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from eagle_jax.checks import NonFiniteError
from eagle_jax.models import llama as llama_lib


class TextFeatures:
  """Memoised ``texts -> [N, F]`` over an ``encode`` function.

  Attributes:
    dim: F.
    encoded: number of texts actually sent to ``encode`` (the rest were memo hits).
  """

  def __init__(self, encode: Callable[[Sequence[str]], np.ndarray], dim: int,
               name: str = "text features"):
    self._encode = encode
    self.dim = int(dim)
    self.name = name
    self._memo: dict[str, np.ndarray] = {}
    self.encoded = 0

  def __call__(self, texts: Sequence[str]) -> np.ndarray:
    """[N] strings -> [N, F] float32."""
    todo = sorted({t for t in texts if t not in self._memo})
    if todo:
      rows = np.asarray(self._encode(todo), np.float32)
      if rows.shape != (len(todo), self.dim):
        raise ValueError(f"encoder returned {rows.shape}, expected ({len(todo)}, {self.dim})")
      bad = ~np.isfinite(rows).all(axis=1)
      if bad.any():
        text = todo[int(np.argmax(bad))]
        raise NonFiniteError(f"{self.name}: non-finite values for the text {text[:120]!r} "
                             f"({int(bad.sum())} of {len(todo)} texts); expected finite numbers")
      self._memo.update(zip(todo, rows))
      self.encoded += len(todo)
    if not texts:
      return np.zeros((0, self.dim), np.float32)
    return np.stack([self._memo[t] for t in texts])

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
