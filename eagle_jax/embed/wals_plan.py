"""Host-side layout of a sparse matrix as fixed-shape blocks of row segments, for WALS.

A WALS half-sweep solves one small linear system per row (user or item), built from the row's
observed entries. To build them with batched einsums in one compiled shape, whatever the degree
distribution:

* Each row's neighbour list is cut into *segments* of ``L = segment_length`` entries (the last one
  padded); a row with no entries gets one empty segment, so it is still solved (to the prior mean).
* Rows are packed greedily, longest first, into *blocks* of ``S`` segment slots and at most ``R`` rows.
  A block's normal equations are the per-segment Gram matrices summed per row (``segment_sum``), so
  one block shape ``[S, L]`` serves every row length. ``S`` grows to fit the longest row when needed.
* Padding entries point at column ``num_cols`` (one past the last): the solver appends a zero feature
  row there, so padding contributes nothing. Padding segments point at row slot ``R`` (dropped by the
  segment sum), padding row slots at row ``num_rows`` (dropped when solutions are scattered back).
* The number of blocks is a multiple of ``block_multiple`` (the mesh's row-shard count) so blocks, and
  with them rows, split evenly over devices.

Padding waste is under ``L`` entries per row plus the unused tail of each block. The layout depends
only on the data (stable orders), not on the device count beyond ``block_multiple``.
"""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class RowPlan:
  """One side of the matrix in blocks.

  Attributes:
    num_rows, num_cols: the matrix shape (rows are solved, columns are the other side).
    cols: [nb, S, L] int32 column of each entry (``num_cols`` for padding).
    vals: [nb, S, L] float32 value (0 for padding).
    seg_row: [nb, S] int32 row slot of each segment in its block (``R`` for padding segments).
    rows: [nb, R] int32 row index of each row slot (``num_rows`` for padding slots).
    counts: [nb, R] float32 observed entries of each row slot.
  """

  num_rows: int
  num_cols: int
  cols: np.ndarray
  vals: np.ndarray
  seg_row: np.ndarray
  rows: np.ndarray
  counts: np.ndarray

  @property
  def padded_entries(self) -> int:
    return int(self.cols.size)

  @property
  def nbytes(self) -> int:
    return sum(a.nbytes for a in (self.cols, self.vals, self.seg_row, self.rows, self.counts))


def build_plan(
    row: np.ndarray,
    col: np.ndarray,
    val: np.ndarray,
    num_rows: int,
    num_cols: int,
    *,
    segment_length: int = 32,
    block_segments: int = 1024,
    block_rows: int = 512,
    block_multiple: int = 1,
) -> RowPlan:
  """Lays out the entries ``(row[n], col[n], val[n])`` of a ``num_rows x num_cols`` matrix.

  Args:
    row: [N] int row index in ``[0, num_rows)``.
    col: [N] int column index in ``[0, num_cols)``.
    val: [N] float value.
    num_rows, num_cols: the matrix shape.
    segment_length: ``L``, entries per segment.
    block_segments: ``S``, segment slots per block (raised to fit the longest row).
    block_rows: ``R``, row slots per block.
    block_multiple: the block count is a multiple of this.

  Returns:
    A ``RowPlan`` in which every entry appears exactly once and every row in exactly one slot.
  """
  for name, value in (("segment_length", segment_length), ("block_segments", block_segments),
                      ("block_rows", block_rows), ("block_multiple", block_multiple)):
    if value < 1:
      raise ValueError(f"{name} must be >= 1, got {value}")
  ell = int(segment_length)
  row = np.asarray(row, np.int64)
  order = np.argsort(row, kind="stable")
  row_s = row[order]
  counts = np.bincount(row_s, minlength=num_rows).astype(np.int64)
  starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
  nseg = np.maximum(1, -(-counts // ell))
  s_cap = max(int(block_segments), int(nseg.max()))
  r_cap = int(block_rows)
  # Greedy packing, longest rows first (stable, so ties keep index order).
  by_len = np.argsort(-nseg, kind="stable")
  block_of = np.empty(num_rows, np.int64)
  slot_of = np.empty(num_rows, np.int64)
  seg0_of = np.empty(num_rows, np.int64)
  blk, used_s, used_r = 0, 0, 0
  for r, ns in zip(by_len.tolist(), nseg[by_len].tolist()):
    if used_s + ns > s_cap or used_r == r_cap:
      blk, used_s, used_r = blk + 1, 0, 0
    block_of[r], slot_of[r], seg0_of[r] = blk, used_r, used_s
    used_s += ns
    used_r += 1
  nb = -(-(blk + 1) // block_multiple) * block_multiple
  rows = np.full((nb, r_cap), num_rows, np.int32)
  rows[block_of, slot_of] = np.arange(num_rows)
  cnt = np.zeros((nb, r_cap), np.float32)
  cnt[block_of, slot_of] = counts
  seg_row = np.full((nb, s_cap), r_cap, np.int32)
  seg_index = np.repeat(np.arange(num_rows), nseg)  # row of each segment
  seg_k = np.arange(seg_index.size) - np.repeat(np.cumsum(nseg) - nseg, nseg)
  seg_row[block_of[seg_index], seg0_of[seg_index] + seg_k] = slot_of[seg_index]
  k = np.arange(row_s.size, dtype=np.int64) - starts[row_s]  # rank within the row
  flat = ((block_of[row_s] * s_cap + seg0_of[row_s] + k // ell) * ell) + k % ell
  cols = np.full(nb * s_cap * ell, num_cols, np.int32)
  vals = np.zeros(nb * s_cap * ell, np.float32)
  cols[flat] = np.asarray(col, np.int32)[order]
  vals[flat] = np.asarray(val, np.float32)[order]
  return RowPlan(num_rows=int(num_rows), num_cols=int(num_cols),
                 cols=cols.reshape(nb, s_cap, ell), vals=vals.reshape(nb, s_cap, ell),
                 seg_row=seg_row, rows=rows, counts=cnt)
