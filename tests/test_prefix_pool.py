"""The continuous batcher's prefix pool (``models/prefix_pool.py``) against hand-computed values and
numpy. Decoding through it is checked end to end in ``test_continuous.py`` (answers equal to
batches of one, with and without sharing)."""

import jax.numpy as jnp
import numpy as np

from eagle_jax.models import prefix_pool
from eagle_jax.models.attention import SharedPrefix


def test_admission_groups_keep_short_suffixes_and_give_long_rows_their_own_prefix():
  seqs = [[1] * 30 + [2] * 5, [1] * 30 + [3] * 20, [1] * 30 + [4] * 3, [5] * 10, [6] * 40]
  planned = [([0, 1, 2], 30)]
  got = prefix_pool.admission_groups(seqs, planned, suffix_cap=16)
  # Row 1's suffix (20) is over the cap: a prefix of its own (its prompt but one token); row 3
  # (10 tokens) fits the own cache whole; row 4 (40) is too long: a prefix of its own.
  assert got == [([0, 2], 30), ([1], 49), ([4], 39)]
  assert prefix_pool.admission_groups(seqs, [], suffix_cap=64) == []
  assert prefix_pool.admission_groups(seqs, [], suffix_cap=32) == [
      ([0], 34), ([1], 49), ([2], 32), ([4], 39)]


def test_ledger_entries_views_and_release():
  ledger = prefix_pool.Ledger(entries=4, rows=4)
  assert ledger.arrays() is None
  a, b = ledger.allocate(), ledger.allocate()
  assert (a, b) == (0, 1)
  for row, entry in ((0, a), (2, a), (3, a), (1, b)):
    ledger.assign(row, entry)
  live, row_prefix, row_shared, seats = ledger.arrays()
  np.testing.assert_array_equal(live, [0, 1])
  np.testing.assert_array_equal(row_prefix, [0, 1, 0, 0])
  np.testing.assert_array_equal(row_shared, [True] * 4)
  # R = 4 (three rows read entry 0, a power of two); empty seats hold the row count.
  np.testing.assert_array_equal(seats, [[0, 2, 3, 4], [1, 4, 4, 4]])
  ledger.retire(1)  # entry 1's last row: free again
  ledger.retire(0)  # entry 0 still read by rows 2 and 3
  live, row_prefix, row_shared, seats = ledger.arrays()
  np.testing.assert_array_equal(live, [0])
  np.testing.assert_array_equal(row_shared, [False, False, True, True])
  np.testing.assert_array_equal(seats, [[2, 3]])
  got = [ledger.allocate() for _ in range(3)]  # entries 1 (freed), 2 and 3, in some order
  assert sorted(got) == [1, 2, 3]
  ledger.assign(0, got[0])
  ledger.assign(1, got[1])
  live, row_prefix, _, seats = ledger.arrays()  # three live entries: G padded to 4 by repeating
  order = sorted([0, got[0], got[1]])
  np.testing.assert_array_equal(live, order + [0])
  np.testing.assert_array_equal(row_prefix, [order.index(got[0]), order.index(got[1]), 0, 0])
  np.testing.assert_array_equal(seats[0], [2, 3])
  np.testing.assert_array_equal(seats[order.index(got[0])], [0, 4])
  np.testing.assert_array_equal(seats[3], [4, 4])

def test_put_right_aligns_prefixes_and_view_gathers_them():
  rng = np.random.default_rng(0)
  layers, entries, kvh, width, hd = 2, 4, 3, 8, 5
  pool = prefix_pool.Pool(k=jnp.asarray(rng.normal(size=(layers, entries, kvh, width, hd))),
                          v=jnp.asarray(rng.normal(size=(layers, entries, kvh, width, hd))),
                          mask=jnp.asarray(rng.random((entries, width)) < 0.5))
  g, pp = 3, 5
  pk = rng.normal(size=(layers, g, kvh, pp, hd))
  pv = rng.normal(size=(layers, g, kvh, pp, hd))
  pm = rng.random((g, pp)) < 0.7
  prefix = SharedPrefix(k=jnp.asarray(pk), v=jnp.asarray(pv), mask=jnp.asarray(pm),
                        row_prefix=jnp.zeros((2,), jnp.int32), row_shared=jnp.ones((2,), bool),
                        seats=jnp.zeros((g, 1), jnp.int32))
  entries_of = np.asarray([2, entries, 0], np.int32)  # the second prefix is dropped
  new = prefix_pool.put(pool, prefix, jnp.asarray(entries_of))
  want_k, want_v, want_m = (np.array(x) for x in pool)
  for j, e in enumerate(entries_of):
    if e < entries:
      want_k[:, e] = 0
      want_k[:, e, :, width - pp:] = pk[:, j]
      want_v[:, e] = 0
      want_v[:, e, :, width - pp:] = pv[:, j]
      want_m[e] = False
      want_m[e, width - pp:] = pm[j]
  np.testing.assert_array_equal(new.k, want_k)
  np.testing.assert_array_equal(new.v, want_v)
  np.testing.assert_array_equal(new.mask, want_m)
  live = jnp.asarray([0, 3], jnp.int32)
  seen = prefix_pool.view(new, live, jnp.asarray([1, 0], jnp.int32), jnp.asarray([True, False]),
                          jnp.asarray([[4, 4], [0, 4]], jnp.int32))
  np.testing.assert_array_equal(seen.k, want_k[:, [0, 3]])
  np.testing.assert_array_equal(seen.v, want_v[:, [0, 3]])
  np.testing.assert_array_equal(seen.mask, want_m[[0, 3]])
  np.testing.assert_array_equal(seen.row_prefix, [1, 0])
