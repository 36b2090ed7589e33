"""Prefix-shared prefill: rows of one decode batch that start with the same tokens prefill it once.

The environment's prompts share long token prefixes (a state's K transition prompts share the
whole state text, every chat prompt the system prompt). ``plan`` groups the rows of one
``Sampler.generate_ids`` call and ``shared_prefill`` replaces the per-row prefill of the whole
prompt by

1. one prefill of each distinct prefix (a batch ``[G, Pp]`` of left-padded prefixes),
2. a fork: the prefix cache is gathered into the rows of its group (``[G] -> [B]`` on the batch
   axis of k, v and the slot mask), and
3. a prefill of each row's left-padded suffix ``[B, Ps]`` on top (cache index ``Pp``),

after which the decode loop runs as in unshared decoding, on a cache of ``S = Pp + Ps + N`` slots.

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
decoding (positions count the real tokens already in the cache, so the forked prefix gives the
suffix its true offsets; masked slots are skipped). Only the slot layout differs: between a row's
prefix (ending at slot ``Pp - 1``) and its suffix (left-padded in ``[Pp, Pp + Ps)``) lie masked
slots. Full attention ignores slot distances, so the result is mathematically equal; float sums run
over different shapes, so logits can differ in the last bits (a greedy or sampled near-tie could
in principle flip; the tests count mismatches). Sliding-window layers measure the window in slots,
so models with sliding layers (Gemma 3) are never shared (``supports``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from eagle_jax.models import llama as llama_lib
from eagle_jax.models.attention import SLIDING


class SharedInputs(NamedTuple):
  """The arrays of a shared prefill (a pytree argument of the jitted decode).

  Attributes:
    prefix_tokens: [G, Pp] int32 left-padded distinct prefixes (G bucketed; extra rows padding).
    prefix_mask: [G, Pp] bool real prefix tokens.
    row_prefix: [B] int32 index of each row's prefix.
    row_shared: [B] bool, the row uses its prefix (False: the whole prompt is its suffix).
    suffix_tokens: [B, Ps] int32 left-padded suffixes.
    suffix_mask: [B, Ps] bool real suffix tokens.
  """

  prefix_tokens: jax.Array | np.ndarray
  prefix_mask: jax.Array | np.ndarray
  row_prefix: jax.Array | np.ndarray
  row_shared: jax.Array | np.ndarray
  suffix_tokens: jax.Array | np.ndarray
  suffix_mask: jax.Array | np.ndarray


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


def _common(a: Sequence[int], b: Sequence[int]) -> int:
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
  adj = [min(_common(seqs[i], seqs[j]), len(seqs[i]) - 1, len(seqs[j]) - 1)
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
  g = bucket(len(shared), 1)
  pp = bucket(max(n for _, n in shared), min_bucket)
  row_prefix = np.zeros((b,), np.int32)
  row_len = np.zeros((b,), np.int64)
  prefix_tokens = np.full((g, pp), pad_id, np.int32)
  prefix_mask = np.zeros((g, pp), bool)
  for k, (rows, n) in enumerate(shared):
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
  inputs = SharedInputs(prefix_tokens, prefix_mask, row_prefix, row_len > 0, suffix_tokens,
                        suffix_mask)
  return PrefixPlan(inputs=inputs, groups=tuple(tuple(sorted(r)) for r, _ in shared),
                    prefix_lengths=tuple(n for _, n in shared), cost=cost,
                    unshared_cost=unshared_cost)


def shared_prefill(
    model: llama_lib.Llama, inputs: SharedInputs, new_bucket: int
) -> tuple[jax.Array, llama_lib.KVCache]:
  """Prefills distinct prefixes once, forks their cache into the rows, prefills the suffixes.

  Args:
    model: the decoder (full attention; see ``supports``).
    inputs: ``SharedInputs`` with prefixes ``[G, Pp]`` and suffixes ``[B, Ps]``.
    new_bucket: N, decode slots after the prompt.

  Returns:
    (logits [B, V] float32 of each row's last prompt token, cache of ``Pp + Ps + N`` slots with
    index ``Pp + Ps``).
  """
  g, pp = inputs.prefix_tokens.shape
  ps = inputs.suffix_tokens.shape[1]
  pcache = llama_lib.KVCache.init(model.config, g, pp)
  _, pcache = model.hidden_states(inputs.prefix_tokens, attention_mask=inputs.prefix_mask,
                                  cache=pcache)
  extra = ps + new_bucket

  def fork(x):  # [L, G, Pp, KVH, hd] -> [L, B, Pp + Ps + N, KVH, hd]
    x = jnp.take(x, inputs.row_prefix, axis=1)
    return jnp.pad(x, ((0, 0), (0, 0), (0, extra), (0, 0), (0, 0)))

  mask = jnp.take(pcache.mask, inputs.row_prefix, axis=0) & inputs.row_shared[:, None]
  cache = llama_lib.KVCache(k=fork(pcache.k), v=fork(pcache.v),
                            mask=jnp.pad(mask, ((0, 0), (0, extra))),
                            index=jnp.asarray(pp, jnp.int32))
  hidden, cache = model.hidden_states(inputs.suffix_tokens, attention_mask=inputs.suffix_mask,
                                      cache=cache)
  return model.logits(hidden[:, -1:])[:, 0], cache
