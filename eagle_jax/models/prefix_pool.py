"""The continuous batcher's shared prefixes: a pool of prefilled prefixes read once per step.

With prefix sharing, ``ContinuousBatcher`` keeps an admitted request's prompt in two parts: a
*prefix* in an entry of a ``Pool``, shared by every row that continues it (a state's K transition
prompts admitted together), and the row's own *suffix* in its row of the decode cache, followed by
its generated tokens. Each decode step reads each live prefix once for all of its rows
(``attention.attend_shared_prefix`` through the ``SharedPrefix`` that ``view`` gathers), where
self-contained rows would each read a copy of it, and the rows' own cache is only as wide as a
suffix and the new tokens.

* ``Pool``: keys and values ``[L, E, KVH, Pp, hd]`` and slot mask ``[E, Pp]`` of ``E`` entries
  (one per decode row suffices: an entry is kept only while a row reads it), each prefix
  right-aligned in its ``Pp`` slots (RoPE positions count real tokens, so the padding before it is
  invisible).
* ``admission_groups``: the prefix groups of one admission: ``prefix.plan``'s groups, and a prefix
  of its own (its prompt but the last token) for every row whose suffix would not fit the rows'
  own cache; rows that fit share nothing and keep their whole prompt as their suffix.
* ``Ledger``: which entry each decode row reads, the free entries, and the arrays of the view.
* ``put`` writes an admission's prefilled prefixes into their entries; ``view`` gathers the live
  entries into a ``SharedPrefix`` of ``G`` prefixes with ``R`` seats each (both powers of two),
  once per change of the live rows, not per step.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from eagle_jax.models.attention import SharedPrefix
from eagle_jax.models.kv_cache import SLOT_AXIS, KVCache


class Pool(NamedTuple):
  """Prefilled prefixes (a pytree).

  Attributes:
    k, v: [L, E, KVH, Pp, hd] keys (after RoPE) and values, the decode cache's storage dtype.
    mask: [E, Pp] bool, slot holds a real prefix token.
  """

  k: jax.Array
  v: jax.Array
  mask: jax.Array

  @classmethod
  def empty(cls, config, entries: int, width: int) -> Pool:
    """``entries`` empty prefixes of ``width`` slots of a decoder (``llama.LlamaConfig``)."""
    cache = KVCache.for_decoding(config, entries, width)
    return cls(cache.k, cache.v, cache.mask)


def put(pool: Pool, prefix: SharedPrefix, entries: jax.Array) -> Pool:
  """Writes prefilled prefixes into pool entries.

  Args:
    pool: the pool, entries of ``Pp`` slots.
    prefix: G prefilled prefixes (k, v [L, G, KVH, Pp', hd], mask [G, Pp'], ``Pp' <= Pp``).
    entries: [G] int32 entry of each prefix (``E``: not kept, dropped).

  Returns:
    The pool with those entries replaced, each prefix right-aligned in its ``Pp`` slots.
  """
  pad = pool.mask.shape[1] - prefix.mask.shape[1]

  def placed(x, axis):
    widths = [(0, 0)] * x.ndim
    widths[axis] = (pad, 0)
    return jnp.pad(x, widths)

  set_k = lambda a, x: a.at[:, entries].set(placed(x.astype(a.dtype), SLOT_AXIS), mode="drop")
  return Pool(k=set_k(pool.k, prefix.k), v=set_k(pool.v, prefix.v),
              mask=pool.mask.at[entries].set(placed(prefix.mask, 1), mode="drop"))


def view(pool: Pool, live: jax.Array, row_prefix: jax.Array, row_shared: jax.Array,
         seats: jax.Array) -> SharedPrefix:
  """The live entries as the ``SharedPrefix`` a decode step reads.

  Args:
    pool: the pool.
    live: [G] int32 entries (padded by repeating one; a padding entry has no seats).
    row_prefix: [B] int32 index into ``live`` of each row's prefix.
    row_shared: [B] bool, the row reads a prefix.
    seats: [G, R] int32 rows reading each prefix (``B``: an empty seat).
  """
  return SharedPrefix(k=jnp.take(pool.k, live, axis=1), v=jnp.take(pool.v, live, axis=1),
                      mask=jnp.take(pool.mask, live, axis=0), row_prefix=row_prefix,
                      row_shared=row_shared, seats=seats)


def admission_groups(seqs: Sequence[Sequence[int]], groups: Sequence[tuple[Sequence[int], int]],
                     suffix_cap: int) -> list[tuple[list[int], int]]:
  """Prefix groups ``[(rows, prefix length)]`` of one admission's prompts ``seqs``.

  ``groups`` (``prefix.plan``'s, possibly none) are kept for their rows whose suffix is at most
  ``suffix_cap`` tokens; every other row longer than ``suffix_cap`` gets a group of its own, its
  prompt but the last token as prefix. Rows in no group share nothing (at most ``suffix_cap``
  tokens each)."""
  out, covered = [], set()
  for rows, n in groups:
    keep = [i for i in rows if len(seqs[i]) - n <= suffix_cap]
    if keep:
      out.append((keep, n))
      covered.update(keep)
  out += [([i], len(s) - 1) for i, s in enumerate(seqs)
          if i not in covered and len(s) > suffix_cap]
  return out


def pow2(n: int) -> int:
  """The smallest power of two >= max(n, 1): the bucket of a pool view's and an admission's
  sizes (one compiled program per bucket)."""
  return 1 << (max(n, 1) - 1).bit_length()


class Ledger:
  """Host bookkeeping of a pool of ``entries`` entries read by ``rows`` decode rows."""

  def __init__(self, entries: int, rows: int):
    self.entries, self.rows = entries, rows
    self.row_entry: dict[int, int] = {}  # decode row -> entry it reads
    self._free = list(range(entries))

  def allocate(self) -> int:
    """A free entry (the pool has one per decode row, so one is free for every new group)."""
    return self._free.pop(0)

  def assign(self, row: int, entry: int) -> None:
    self.row_entry[row] = entry

  def retire(self, row: int) -> None:
    """Row ``row`` left; its entry is free once no row reads it."""
    entry = self.row_entry.pop(row, None)
    if entry is not None and entry not in self.row_entry.values():
      self._free.append(entry)

  def key(self) -> tuple:
    return tuple(sorted(self.row_entry.items()))

  def arrays(self) -> tuple[np.ndarray, ...] | None:
    """``(live [G], row_prefix [B], row_shared [B], seats [G, R])`` for ``view`` (G, R powers of
    two), or None when no row reads a prefix."""
    live = sorted(set(self.row_entry.values()))
    if not live:
      return None
    where = {e: j for j, e in enumerate(live)}
    members = [sorted(r for r, e in self.row_entry.items() if e == entry) for entry in live]
    g, r = pow2(len(live)), pow2(max(map(len, members)))
    seats = np.full((g, r), self.rows, np.int32)
    for j, m in enumerate(members):
      seats[j, :len(m)] = m
    row_prefix = np.zeros((self.rows,), np.int32)
    row_shared = np.zeros((self.rows,), bool)
    for row, entry in self.row_entry.items():
      row_prefix[row], row_shared[row] = where[entry], True
    return (np.asarray(live + [live[0]] * (g - len(live)), np.int32), row_prefix, row_shared,
            seats)
