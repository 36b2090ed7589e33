"""Logit processing of one decode step: repetition penalty, n-gram bans, temperature, top-k, top-p;
and the draw of the next token.

The sampler's configuration splits into a static ``Mode`` (which switches are on: each combination
compiles once) and traced ``Knobs`` (their values), so one compiled decode serves every value.
``process_logits`` follows transformers' logits processors (``RepetitionPenaltyLogitsProcessor``,
``NoRepeatNGramLogitsProcessor``, ``TemperatureLogitsWarper``, ``TopKLogitsWarper``,
``TopPLogitsWarper``) in that order; ``tests/test_sampling.py`` compares them.

``draw`` samples a token per row by inverting the row's cumulative distribution at one uniform
number (as llama.cpp's sampler does) instead of ``jax.random.categorical``'s Gumbel-max, which
draws one random number per vocabulary entry: on CPU, hashing ``B x V`` counters through
threefry costs more per decode step than the rest of a step's logit work
(``benchmarks/compile_bench.py`` times both).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

NEG_INF = -1e30
# Heads tried in turn for top-k and top-p (``process_logits``): the largest tokens sorted by
# ``lax.top_k`` when they decide the rule, before the full sort of the vocabulary.
SORT_HEADS = (256, 4096)
# Vocabulary entries per block of ``draw``'s two-level cumulative sums.
DRAW_BLOCK = 256


class Mode(NamedTuple):
  """Static (compile-time) part of the sampling configuration."""

  greedy: bool
  top_k: bool
  top_p: bool
  penalty: bool
  ngram: int


class Knobs(NamedTuple):
  """Traced part of the sampling configuration."""

  temperature: jax.Array  # [] f32
  top_k: jax.Array  # [] int32
  top_p: jax.Array  # [] f32
  penalty: jax.Array  # [] f32
  stop_ids: jax.Array  # [n_stop] int32 (padded with -1)
  max_new: jax.Array  # [] int32



def process_logits(
    logits: jax.Array,
    mode: Mode,
    knobs: Knobs,
    presence: jax.Array | None,
    banned: jax.Array | None,
) -> jax.Array:
  """Applies penalty, n-gram bans, temperature, top-k and top-p.

  Args:
    logits: [B, V] float32 raw logits.
    mode: static switches.
    knobs: traced values.
    presence: [B, V] bool tokens already in the row (penalty), or None.
    banned: [B, V] bool tokens forbidden by the n-gram rule, or None.

  Returns:
    [B, V] float32 logits whose softmax is the sampling distribution (argmax for greedy).
  """
  if mode.penalty:
    r = knobs.penalty
    penalised = jnp.where(logits > 0, logits / r, logits * r)
    logits = jnp.where(presence, penalised, logits)
  if banned is not None:
    logits = jnp.where(banned, NEG_INF, logits)
  if mode.greedy:
    return logits
  logits = logits / knobs.temperature
  if mode.top_k or mode.top_p:
    logits = _truncated_top_k_top_p(logits, mode, knobs)
  return logits


def _truncated_top_k_top_p(logits: jax.Array, mode: Mode, knobs: Knobs) -> jax.Array:
  """Top-k and top-p from the shortest head of ``SORT_HEADS`` that decides the rule.

  Only the largest tokens decide top-k and top-p in practice: each head (``lax.top_k``, sorted
  descending) is tried in turn, and the next (finally the full sort) only when it does not decide
  the rule. A full sort of [B, V] costs more than a decoder step on CPU and grows with B. With
  top-k, k > head decides for every row at once. Top-p alone is decided row by row
  (``_top_p_by_rows``): a row whose head holds less than top_p of the probability mass (with a
  margin for float sums) takes the longer heads on its own. A head is the full sort's first
  tokens, so every path keeps the same tokens (but for float rounding of the mass at the top-p
  boundary: a head sums ``exp(logit - logsumexp)``).
  """
  if not mode.top_k:
    return _top_p_by_rows(logits, knobs)
  v = logits.shape[-1]
  heads = [h for h in SORT_HEADS if h < v]

  def tier(i: int) -> jax.Array:
    if i == len(heads):
      return _top_k_top_p(logits, -jnp.sort(-logits, axis=-1), mode, knobs)
    top = jax.lax.top_k(logits, heads[i])[0]  # [B, head], descending
    return jax.lax.cond(knobs.top_k <= heads[i], lambda: _top_k_top_p(logits, top, mode, knobs),
                        lambda: tier(i + 1))

  return tier(0)


def _top_p_threshold(sorted_desc: jax.Array, top_p: jax.Array,
                     log_norm: jax.Array | None) -> jax.Array:
  """[..., H] logits in descending order -> [..., 1] the smallest logit top-p keeps (transformers'
  rule: a token is kept while the mass before it is below top_p). ``log_norm`` [..., 1]: the log
  of the softmax normaliser over all V logits when H < V (None: H = V)."""
  if log_norm is None:
    probs = jax.nn.softmax(sorted_desc, axis=-1)
  else:
    probs = jnp.exp(sorted_desc - log_norm)
  mass_before = jnp.cumsum(probs, axis=-1) - probs
  keep = mass_before < top_p  # the first token always has mass_before == 0
  return jnp.min(jnp.where(keep, sorted_desc, jnp.inf), axis=-1, keepdims=True)


def _top_p_by_rows(logits: jax.Array, knobs: Knobs) -> jax.Array:
  """Top-p alone on ``logits`` [B, V]: every row's threshold from the first head, then, one row at
  a time, the rows that head does not decide from the longer heads and finally the full sort of
  that row. One flat row costs that row's longer head, not the whole batch's, and a row's tokens
  do not depend on the other rows of its batch (``benchmarks/top_p_bench.py`` times both rules)."""
  v = logits.shape[-1]
  heads = [h for h in SORT_HEADS if h < v]
  if not heads:
    return jnp.where(logits < _top_p_threshold(-jnp.sort(-logits, axis=-1), knobs.top_p, None),
                     NEG_INF, logits)
  log_norm = jax.nn.logsumexp(logits, axis=-1, keepdims=True)  # [B, 1]

  def decides(top: jax.Array, norm: jax.Array) -> jax.Array:
    return jnp.exp(top - norm).sum(-1) >= knobs.top_p + 1e-4

  top = jax.lax.top_k(logits, heads[0])[0]  # [B, head], descending
  threshold = _top_p_threshold(top, knobs.top_p, log_norm)  # [B, 1]
  decided = decides(top, log_norm)  # [B]

  def row_threshold(row: jax.Array, norm: jax.Array, i: int = 1) -> jax.Array:
    """[V], [1] -> [1] from head ``i`` on."""
    if i == len(heads):
      return _top_p_threshold(-jnp.sort(-row), knobs.top_p, None)
    head = jax.lax.top_k(row, heads[i])[0]
    return jax.lax.cond(decides(head, norm), lambda: _top_p_threshold(head, knobs.top_p, norm),
                        lambda: row_threshold(row, norm, i + 1))

  def redo(r: jax.Array, thr: jax.Array) -> jax.Array:
    return jax.lax.cond(decided[r], lambda: thr,
                        lambda: thr.at[r].set(row_threshold(logits[r], log_norm[r])))

  threshold = jax.lax.cond(jnp.all(decided), lambda: threshold,
                           lambda: jax.lax.fori_loop(0, logits.shape[0], redo, threshold))
  return jnp.where(logits < threshold, NEG_INF, logits)


def _top_k_top_p(logits: jax.Array, sorted_desc: jax.Array, mode: Mode, knobs: Knobs) -> jax.Array:
  """Top-k, then top-p (transformers' order), given ``sorted_desc`` [B, H]: the H largest logits
  in descending order (H = V, or a head of at least k tokens)."""
  if mode.top_k:
    k = jnp.clip(knobs.top_k, 1, logits.shape[-1])
    kth = jnp.take(sorted_desc, k - 1, axis=-1)[:, None]
    logits = jnp.where(logits < kth, NEG_INF, logits)
    sorted_desc = jnp.where(jnp.arange(sorted_desc.shape[-1]) < k, sorted_desc, NEG_INF)
  if mode.top_p:  # after top-k the kept tokens' softmax (transformers' order)
    threshold = _top_p_threshold(sorted_desc, knobs.top_p, None)
    logits = jnp.where(logits < threshold, NEG_INF, logits)
  return logits


def ngram_bans(seq: jax.Array, valid: jax.Array, cur: jax.Array, n: int, vocab: int) -> jax.Array:
  """Tokens that would repeat an n-gram.

  Args:
    seq: [B, L] int32 token history (prompt slots then generated slots).
    valid: [B, L] bool real tokens in ``seq`` (only slots < cur can be True).
    cur: [] int32 slot the next token goes to.
    n: n-gram size (>= 1).
    vocab: V.

  Returns:
    [B, V] bool banned next tokens.
  """
  b, length = seq.shape
  if n == 1:
    return jnp.zeros((b, vocab), jnp.int8).at[jnp.arange(b)[:, None], seq].max(
        valid.astype(jnp.int8)).astype(bool)
  tail = jax.lax.dynamic_slice_in_dim(seq, cur - (n - 1), n - 1, axis=1)  # [B, n-1]
  tail_ok = jnp.all(jax.lax.dynamic_slice_in_dim(valid, cur - (n - 1), n - 1, axis=1), axis=1)
  w = length - n + 1
  match = jnp.ones((b, w), bool)
  for i in range(n):
    match &= valid[:, i : i + w]
  for i in range(n - 1):
    match &= seq[:, i : i + w] == tail[:, i : i + 1]
  match &= tail_ok[:, None]
  nxt = seq[:, n - 1 :]
  return jnp.zeros((b, vocab), jnp.int8).at[jnp.arange(b)[:, None], nxt].max(
      match.astype(jnp.int8)).astype(bool)


def draw(scores: jax.Array, keys: jax.Array, steps: jax.Array) -> jax.Array:
  """One token per row from ``softmax(scores)``, by inverse transform sampling.

  Row ``b`` draws ``u ~ U[0, 1)`` from ``fold_in(keys[b], steps[b])`` and returns the first token
  whose cumulative probability exceeds ``u``: a categorical draw from one random number per row.
  The cumulative sums are two-level (over ``V / DRAW_BLOCK`` block masses, then over the chosen
  block's ``DRAW_BLOCK`` entries), so float32 rounding moves a token's probability by at most a
  few hundred float32 epsilons of the row's mass, not by a ``V``-long running sum's error; a token
  of probability zero (``NEG_INF`` score: banned, or cut by top-k/top-p) is never drawn, whatever
  the rounding.

  Args:
    scores: [B, V] float32 logits of the sampling distribution (after ``process_logits``).
    keys: [B] PRNG keys, one per row.
    steps: [B] int32 decode step of each row (folded into its key).

  Returns:
    [B] int32 drawn token ids.
  """
  b, v = scores.shape
  nb = -(-v // DRAW_BLOCK)
  p = jnp.exp(scores - scores.max(axis=-1, keepdims=True))
  blocks = jnp.pad(p, ((0, 0), (0, nb * DRAW_BLOCK - v))).reshape(b, nb, DRAW_BLOCK)
  u = jax.vmap(lambda k, s: jax.random.uniform(jax.random.fold_in(k, s), ()))(keys, steps)

  def first_above(mass, target):  # [B, n], [B] -> first index whose running sum exceeds target
    cum = jnp.cumsum(mass, axis=-1)
    last = mass.shape[-1] - 1 - jnp.argmax(mass[:, ::-1] > 0, axis=-1)  # last positive entry
    i = jnp.minimum(jnp.sum(cum <= target[:, None], axis=-1), last)
    before = jnp.take_along_axis(cum - mass, i[:, None], axis=-1)[:, 0]
    return i, before

  block_mass = blocks.sum(-1)  # [B, nb]
  target = u * block_mass.sum(-1)
  block, before = first_above(block_mass, target)
  within = jnp.take_along_axis(blocks, block[:, None, None], axis=1)[:, 0]  # [B, DRAW_BLOCK]
  token, _ = first_above(within, jnp.maximum(target - before, 0.0))
  return (block * DRAW_BLOCK + token).astype(jnp.int32)
