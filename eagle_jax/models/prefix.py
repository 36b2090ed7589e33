"""Prefix sharing: rows of one decode batch that start with the same tokens read that prefix once.

The environment's prompts share long token prefixes (a state's K transition prompts share the
whole state text, every chat prompt the system prompt). ``plan`` groups the rows of one
``Sampler.generate_ids`` call and ``shared_prefill`` replaces the per-row prefill of the whole
prompt by

1. one prefill of each distinct prefix (a batch ``[G, Pp]`` of left-padded prefixes), kept as a
   ``SharedPrefix`` (keys and values ``[L, G, KVH, Pp, hd]``, and the *seats*: the rows of
   each prefix), and
2. a prefill of each row's left-padded suffix ``[B, Ps]`` into the rows' own cache of
   ``Ps + N`` slots, attending to its prefix through the seats (``attention.attend_shared_prefix``),

after which the decode loop runs as in unshared decoding on the own cache, every step attending to
the prefixes the same way: a prefix's keys and values are read once per step for all of its rows
(the K candidate actions of a state), where a cache with the prefix copied into every row reads
them K times (``forked_cache`` builds that copy, ``Sampler.copy_prefix``, for comparison). The
continuous batcher keeps its rows' prefixes in a pool read the same way (``prefix_pool.py``).

**Grouping rule** (``plan``). Rows are sorted lexicographically by token ids; ``a_j`` is the common
prefix length of sorted neighbours ``j`` and ``j + 1``, capped at both lengths minus one (every row
keeps at least one suffix token: its last prompt token gives the first logits). For a threshold
``t``, the groups are the maximal runs of sorted rows whose neighbour prefixes are all ``>= t``
(single linkage); a group's shared prefix is the minimum ``a_j`` inside it (the common prefix of
the whole group, since rows are sorted). A run of one row either shares nothing (its whole prompt
is its suffix) or is a group of its own with a prefix of its own (``_with_singles``): a batch cut
from a longer call often ends inside a state's K rows, and one long unshared row would widen every
row's suffix bucket to a whole prompt. Every ``t`` among the ``a_j >= min_shared``, with each
choice for the lone rows, is tried and the one with the smallest bucketed prefill cost
``bucket(G) * Pp + B * Ps`` (token slots pushed through the model) is kept;
if that is not below the unshared cost ``B * P``, ``plan`` returns None and the caller decodes
unshared. A two-level batch (several states, each with K transitions, all behind one system
prompt) thus forks per state rather than per system prompt when the state prefixes are longer.

**Exactness.** Each row sees the same real tokens with the same RoPE positions as in unshared
decoding (positions count the real tokens of the row's prefix and of its own cache; masked slots
are skipped). Only the slot layout differs: the prefix's slots precede the row's own, with masked
padding slots in between, and the softmax over both is assembled from two score blocks with a
shared maximum. Full attention ignores slot distances, so the result is mathematically equal;
float sums run over different shapes, so logits can differ in the last bits (a greedy or sampled
near-tie could in principle flip; the tests count mismatches). With bf16 matmul operands
(``LlamaConfig.matmul_dtype``; the prefixes' keys and values are then stored in it) those last bits
can flip a bf16 rounding, so the two paths differ by up to a few hundredths of a nat in log-prob
and greedy rows part at ties of that size. Sliding-window layers measure the
window in slots, so models with sliding layers (Gemma 3) are never shared (``supports``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from eagle_jax.models import llama as llama_lib
from eagle_jax.models.attention import SLIDING, SharedPrefix


class SharedInputs(NamedTuple):
  """The arrays of a shared prefill (a pytree argument of the jitted decode).

  Attributes:
    prefix_tokens: [G, Pp] int32 left-padded distinct prefixes (G bucketed; extra rows padding).
    prefix_mask: [G, Pp] bool real prefix tokens.
    row_prefix: [B] int32 index of each row's prefix.
    row_shared: [B] bool, the row uses its prefix (False: the whole prompt is its suffix).
    suffix_tokens: [B, Ps] int32 left-padded suffixes.
    suffix_mask: [B, Ps] bool real suffix tokens.
    seats: [G, R] int32 the rows of each prefix (``B``: an empty seat; R bucketed).
  """

  prefix_tokens: jax.Array | np.ndarray
  prefix_mask: jax.Array | np.ndarray
  row_prefix: jax.Array | np.ndarray
  row_shared: jax.Array | np.ndarray
  suffix_tokens: jax.Array | np.ndarray
  suffix_mask: jax.Array | np.ndarray
  seats: jax.Array | np.ndarray


@dataclasses.dataclass(frozen=True)
class PrefixPlan:
  """How one batch is prefilled with shared prefixes.

  Attributes:
    inputs: the arrays for ``shared_prefill``.
    groups: row indices of each group prefilled from one prefix (a group of one row: a lone row
      given a prefix of its own).
    prefix_lengths: shared prefix length of each group.
    cost: bucketed prefill cost ``bucket(G) * Pp + B * Ps``.
    unshared_cost: ``B * P`` of unshared decoding.
  """

  inputs: SharedInputs
  groups: tuple[tuple[int, ...], ...]
  prefix_lengths: tuple[int, ...]
  cost: int
  unshared_cost: int

  @property
  def history_width(self) -> int:
    """``Pp + Ps``: the prompt slots of the cache (the decode's first slot)."""
    return self.inputs.prefix_tokens.shape[1] + self.inputs.suffix_tokens.shape[1]


def supports(config: llama_lib.LlamaConfig) -> bool:
  """Prefix sharing is exact for full attention only (sliding windows count slots)."""
  return config.layer_types is None or SLIDING not in config.layer_types


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
  """Length of the common prefix of two token sequences."""
  n = min(len(a), len(b))
  i = 0
  while i < n and a[i] == b[i]:
    i += 1
  return i


def _groups_at(order: list[int], adj: list[int], t: int) -> list[tuple[list[int], int]]:
  """Runs of sorted rows whose neighbour prefixes are all >= t: [(rows, shared length)]."""
  runs, rows, shared = [], [order[0]], None
  for j, a in enumerate(adj):
    if a >= t:
      rows.append(order[j + 1])
      shared = a if shared is None else min(shared, a)
    else:
      runs.append((rows, shared or 0))
      rows, shared = [order[j + 1]], None
  runs.append((rows, shared or 0))
  return runs


def _with_singles(shared: list[tuple[list[int], int]], singles: list[int],
                  seqs: list[list[int]]) -> list[list[tuple[list[int], int]]]:
  """Candidate groupings for the rows that share with no other row (``singles``): left unshared
  (their whole prompt is their suffix, which widens every row's suffix bucket to the longest), or
  each prefilled as a group of its own whose prefix is as long as the longest shared one (or its
  own prompt but one token) or leaves its suffix no longer than the shared rows' longest."""
  out = [shared]
  if not shared or not singles:
    return out
  longest = max(n for _, n in shared)
  tail = max(len(seqs[i]) - n for rows, n in shared for i in rows)
  for rule in (lambda m: min(m - 1, longest), lambda m: min(m - 1, max(1, m - tail))):
    out.append(shared + [([i], rule(len(seqs[i]))) for i in singles])
  return out


def plan(
    prompts: Sequence[Sequence[int]],
    *,
    min_shared: int,
    min_bucket: int,
    pad_id: int,
    bucket,
) -> PrefixPlan | None:
  """Groups rows by shared prefix (the rule in the module docstring) and builds the arrays.

  Args:
    prompts: B non-empty token-id prompts.
    min_shared: shortest prefix worth sharing (tokens).
    min_bucket: smallest length bucket.
    pad_id: id written in padding slots.
    bucket: the sampler's ``bucket(n, minimum)`` helper.

  Returns:
    The plan, or None when no grouping beats unshared prefill.
  """
  b = len(prompts)
  if b < 2:
    return None
  seqs = [list(map(int, p)) for p in prompts]
  order = sorted(range(b), key=lambda i: seqs[i])
  adj = [min(common_prefix(seqs[i], seqs[j]), len(seqs[i]) - 1, len(seqs[j]) - 1)
         for i, j in zip(order, order[1:])]
  unshared_cost = b * bucket(max(map(len, seqs)), min_bucket)
  best = None
  for t in sorted({a for a in adj if a >= max(1, min_shared)}):
    runs = _groups_at(order, adj, t)
    shared = [(rows, n) for rows, n in runs if len(rows) > 1]
    for groups in _with_singles(shared, [rows[0] for rows, _ in runs if len(rows) == 1], seqs):
      prefixed = {i for rows, _ in groups for i in rows}
      pp = bucket(max(n for _, n in groups), min_bucket)
      suffix = max([len(seqs[i]) - n for rows, n in groups for i in rows]
                   + [len(seqs[i]) for i in range(b) if i not in prefixed])
      cost = bucket(len(groups), 1) * pp + b * bucket(suffix, min_bucket)
      if best is None or cost < best[0]:
        best = (cost, groups)
  if best is None or best[0] >= unshared_cost:
    return None
  cost, shared = best
  return PrefixPlan(inputs=build_inputs(seqs, shared, pad_id=pad_id, min_bucket=min_bucket,
                                        bucket=bucket),
                    groups=tuple(tuple(sorted(r)) for r, _ in shared),
                    prefix_lengths=tuple(n for _, n in shared), cost=cost,
                    unshared_cost=unshared_cost)


def build_inputs(seqs: Sequence[Sequence[int]], groups: Sequence[tuple[Sequence[int], int]], *,
                 pad_id: int, min_bucket: int, bucket) -> SharedInputs:
  """The arrays of a shared prefill: ``groups`` ``[(rows, prefix length)]`` (each ``0 < length <
  len(prompt)`` of its rows, whose first ``length`` tokens agree); rows in no group are unshared.
  G and R are bucketed with ``bucket(n, 1)``, ``Pp`` and ``Ps`` with ``bucket(n, min_bucket)``."""
  b = len(seqs)
  g = bucket(len(groups), 1)
  pp = bucket(max(n for _, n in groups), min_bucket)
  row_prefix = np.zeros((b,), np.int32)
  row_len = np.zeros((b,), np.int64)
  prefix_tokens = np.full((g, pp), pad_id, np.int32)
  prefix_mask = np.zeros((g, pp), bool)
  for k, (rows, n) in enumerate(groups):
    rows = list(rows)
    prefix_tokens[k, pp - n:] = seqs[rows[0]][:n]
    prefix_mask[k, pp - n:] = True
    row_prefix[rows] = k
    row_len[rows] = n
  ps = bucket(max(len(s) - n for s, n in zip(seqs, row_len)), min_bucket)
  suffix_tokens = np.full((b, ps), pad_id, np.int32)
  suffix_mask = np.zeros((b, ps), bool)
  for i, (s, n) in enumerate(zip(seqs, row_len)):
    suffix_tokens[i, ps - (len(s) - n):] = s[n:]
    suffix_mask[i, ps - (len(s) - n):] = True
  seats = np.full((g, bucket(max(len(rows) for rows, _ in groups), 1)), b, np.int32)
  for k, (rows, _) in enumerate(groups):
    seats[k, :len(rows)] = sorted(rows)
  return SharedInputs(prefix_tokens, prefix_mask, row_prefix, row_len > 0, suffix_tokens,
                      suffix_mask, seats)


def prefill_prefixes(model: llama_lib.Llama, inputs: SharedInputs) -> SharedPrefix:
  """Prefills the ``[G, Pp]`` distinct prefixes once: their keys and values for the rows."""
  g, pp = inputs.prefix_tokens.shape
  pcache = llama_lib.KVCache.for_decoding(model.config, g, pp)
  _, pcache = model.hidden_states(inputs.prefix_tokens, attention_mask=inputs.prefix_mask,
                                  cache=pcache)
  return SharedPrefix.from_cache(pcache, inputs.row_prefix, inputs.row_shared, inputs.seats)


def shared_prefill(
    model: llama_lib.Llama, inputs: SharedInputs, new_bucket: int
) -> tuple[jax.Array, llama_lib.KVCache, SharedPrefix]:
  """Prefills distinct prefixes once, then each row's suffix on top of its prefix.

  The rows' own cache holds their suffix and the decode slots only; the decode steps attend to the
  prefixes through ``prefix`` (read once per prefix per step, not once per row).

  Args:
    model: the decoder (full attention; see ``supports``).
    inputs: ``SharedInputs`` with prefixes ``[G, Pp]`` and suffixes ``[B, Ps]``.
    new_bucket: N, decode slots after the prompt.

  Returns:
    (logits [B, V] float32 of each row's last prompt token, the rows' own cache of ``Ps + N``
    slots with index ``Ps``, the prefixes).
  """
  prefix = prefill_prefixes(model, inputs)
  b, ps = inputs.suffix_tokens.shape
  cache = llama_lib.KVCache.for_decoding(model.config, b, ps + new_bucket)
  hidden, cache = model.hidden_states(inputs.suffix_tokens, attention_mask=inputs.suffix_mask,
                                      cache=cache, prefix=prefix)
  return model.logits(hidden[:, -1:])[:, 0], cache, prefix


def forked_cache(prefix: SharedPrefix, cache: llama_lib.KVCache) -> llama_lib.KVCache:
  """One self-contained cache of ``Pp + S`` slots per row: its prefix copied before its own slots
  (a decode that keeps no shared prefix: ``Sampler.copy_prefix``)."""
  row_mask = prefix.row_mask()

  def fork(x, own):  # [L, G, KVH, Pp, hd], [L, B, KVH, S, hd] -> [L, B, KVH, Pp + S, hd]
    x = jnp.take(x, prefix.row_prefix, axis=1)
    return jnp.concatenate([x.astype(own.dtype), own], axis=llama_lib.SLOT_AXIS)

  return llama_lib.KVCache(k=fork(prefix.k, cache.k), v=fork(prefix.v, cache.v),
                           mask=jnp.concatenate([row_mask, cache.mask], axis=1),
                           index=cache.index + row_mask.shape[1])
