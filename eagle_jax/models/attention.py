"""The decoder's attention math: RMSNorm, RoPE, and grouped-query attention with slot masks.

Pure functions of arrays (no parameters, no config object), used by ``llama.py``'s ``Attention``:

* ``rms_norm``: ``x / sqrt(mean(x^2) + eps) * (offset + w)`` in float32 (``offset`` 1 for Gemma,
  whose checkpoints store ``w - 1``). Also the QK-norm of Gemma 3 (over ``head_dim`` of each head).
* ``apply_rope``: rotary embedding in Hugging Face's rotate-half layout, feature ``i < d/2`` paired
  with ``i + d/2`` and rotated by ``pos / factor * theta^(-2i/d)``; ``factor`` is the linear RoPE
  scaling of Gemma 3's global layers (1 elsewhere).
* ``attend``: softmax attention of ``H`` query heads over ``KVH`` shared key/value heads (GQA).
  Keys are *slots* (token-array or KV-cache positions). A key slot ``s`` is visible from query slot
  ``q`` iff it holds a real token, ``s <= q`` (causal) and, for a sliding-window layer of width
  ``W``, ``s > q - W`` (the query and the ``W - 1`` slots before it, as Hugging Face's
  ``sliding_window_overlay``). Slot distance equals token distance because a row's real tokens
  occupy contiguous slots: prompts are left-padded and every later call appends at the same index
  for all rows (a finished row's padding comes after its last real token). A prefill from slot 0
  (as many queries as key slots) runs in blocks of ``CAUSAL_BLOCK`` queries, each over the keys up
  to its last query only: the causally masked half of the score matrix is never computed.
* ``attend_shared_prefix`` with ``SharedPrefix``: the same attention for rows that continue one of
  a few shared, cached prefixes, each prefix's keys and values read once for all of its rows.

Gemma 3 interleaves local (sliding-window, own RoPE base) and global layers; ``layer_kind`` names
the per-layer choice, with the Hugging Face ``layer_types`` spellings.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)
CAUSAL_BLOCK = 128  # queries per block of a prefill from slot 0 (``attend``)
SLIDING = "sliding_attention"
FULL = "full_attention"
LAYER_KINDS = (FULL, SLIDING)


def gemma3_layer_types(layers: int, pattern: int = 6) -> tuple[str, ...]:
  """Gemma 3's default interleaving: layer ``i`` is global iff ``(i + 1) % pattern == 0``."""
  return tuple(FULL if (i + 1) % pattern == 0 else SLIDING for i in range(layers))


def rms_norm(x: jax.Array, scale: jax.Array, eps: float, offset: float) -> jax.Array:
  """x: [..., D]; scale: [D]. Normalises in float32 and returns x's dtype."""
  xf = x.astype(jnp.float32)
  y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
  return (y * (offset + scale.astype(jnp.float32))).astype(x.dtype)


def llama3_inv_freq(inv_freq: jax.Array, factor: float, low_freq_factor: float,
                    high_freq_factor: float, original_max_position: int) -> jax.Array:
  """Llama 3's frequency-dependent RoPE scaling (Hugging Face ``rope_type="llama3"``).

  Frequencies whose wavelength exceeds ``original_max_position / low_freq_factor`` are divided by
  ``factor``; those shorter than ``original_max_position / high_freq_factor`` are kept; in between
  they are interpolated linearly in ``original_max_position / wavelength``.
  inv_freq: [d/2] float32 -> [d/2] float32.
  """
  low_wavelen = original_max_position / low_freq_factor
  high_wavelen = original_max_position / high_freq_factor
  wavelen = 2 * math.pi / inv_freq
  scaled = jnp.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
  smooth = (original_max_position / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
  smoothed = (1 - smooth) * scaled / factor + smooth * scaled
  medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
  return jnp.where(medium, smoothed, scaled)


def apply_rope(x: jax.Array, positions: jax.Array, theta: float, factor: float = 1.0,
               llama3: tuple[float, float, float, int] | None = None) -> jax.Array:
  """Rotary embedding, rotate-half layout.

  Args:
    x: [B, T, N, d] queries or keys.
    positions: [B, T] int32 positions.
    theta: base frequency.
    factor: linear RoPE scaling (positions are divided by it); 1 means none.
    llama3: ``(factor, low_freq_factor, high_freq_factor, original_max_position)`` of Llama 3's
      scaling (``llama3_inv_freq``), or None.

  Returns:
    [B, T, N, d], x's dtype.
  """
  d = x.shape[-1]
  inv_freq = 1.0 / (theta ** (jnp.arange(0, d, 2, dtype=jnp.float32) / d))  # [d/2]
  if factor != 1.0:
    inv_freq = inv_freq / factor
  if llama3 is not None:
    inv_freq = llama3_inv_freq(inv_freq, *llama3)
  angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, d/2]
  cos = jnp.cos(angles)[:, :, None, :]
  sin = jnp.sin(angles)[:, :, None, :]
  xf = x.astype(jnp.float32)
  x1, x2 = xf[..., : d // 2], xf[..., d // 2 :]
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x.dtype)


def cast_einsum(spec: str, x: jax.Array, w: jax.Array, operand, out) -> jax.Array:
  """``einsum(spec, x, w)`` with both operands cast to ``operand``, accumulated and returned in
  ``out`` (bf16 operands summed in float32: what CPU bf16 units and accelerators compute)."""
  if operand == out:  # a plain einsum (what qwix's LoRA interception expects)
    return jnp.einsum(spec, x.astype(operand), w.astype(operand))
  return jnp.einsum(spec, x.astype(operand), w.astype(operand), preferred_element_type=out)


def attend(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    key_mask: jax.Array,
    query_slots: jax.Array,
    scale: float,
    window: int | None = None,
) -> jax.Array:
  """Grouped-query softmax attention over slots.

  Args:
    q: [B, T, H, hd] queries (after RoPE).
    k: [B, KVH, S, hd] keys (after RoPE); ``H % KVH == 0``.
    v: [B, KVH, S, hd] values.
    key_mask: [B, S] bool, key slot holds a real token.
    query_slots: [T] int32 slot of each query.
    scale: logit scale (``head_dim ** -0.5`` or Gemma's ``query_pre_attn_scalar ** -0.5``).
    window: sliding-window width ``W`` (key slot ``> query slot - W``) or None for global.

  Returns:
    [B, T, H, hd] attention output in q's dtype; scores and softmax in float32.
  """
  t, blk = q.shape[1], CAUSAL_BLOCK
  if t == k.shape[2] and t > blk:
    # As many queries as key slots: a prefill from slot 0 (no cache, or an empty cache of T
    # slots), query i at slot i. Queries [a, a + blk) see keys [0, a + blk) only.
    return jnp.concatenate([
        attend(q[:, a:a + blk], k[:, :, :a + blk], v[:, :, :a + blk], key_mask[:, :a + blk],
               query_slots[a:a + blk], scale, window) for a in range(0, t, blk)], axis=1)
  qg = _grouped(q, k.shape[1])
  scores = _slot_scores(qg, k, key_mask, query_slots, scale, window)
  probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
  out = jnp.einsum("bkgts,bksd->bkgtd", probs, v, preferred_element_type=jnp.float32)
  return _ungrouped(out).astype(q.dtype)


# Attention works on queries grouped by key/value head, [B, KVH, H / KVH, T, hd]: every product is
# then batched over (row, head) with operands and output in the order XLA's CPU matmul kernels
# take as they are (a product whose output needs a transpose falls back to a slower kernel).
def _grouped(q: jax.Array, kvh: int) -> jax.Array:
  """[B, T, H, hd] -> [B, KVH, H / KVH, T, hd]."""
  b, t, h, hd = q.shape
  return q.reshape(b, t, kvh, h // kvh, hd).transpose(0, 2, 3, 1, 4)


def _ungrouped(out: jax.Array) -> jax.Array:
  """[B, KVH, H / KVH, T, hd] -> [B, T, H, hd]."""
  b, kvh, g, t, hd = out.shape
  return out.transpose(0, 3, 1, 2, 4).reshape(b, t, kvh * g, hd)


def _slot_scores(qg: jax.Array, k: jax.Array, key_mask: jax.Array, query_slots: jax.Array,
                 scale: float, window: int | None) -> jax.Array:
  """Scaled float32 scores [B, KVH, H / KVH, T, S] of grouped queries qg [B, KVH, H / KVH, T,
  hd] over key slots k [B, KVH, S, hd], ``MASK_VALUE`` where the slot is not visible."""
  scores = jnp.einsum("bkgtd,bksd->bkgts", qg, k, preferred_element_type=jnp.float32) * scale
  slots = jnp.arange(k.shape[2], dtype=jnp.int32)[None, None, :]
  qs = query_slots[None, :, None]
  allowed = key_mask[:, None, :] & (slots <= qs)
  if window is not None:
    allowed = allowed & (slots > qs - window)
  return jnp.where(allowed[:, None, None, :, :], scores, MASK_VALUE)


class SharedPrefix(NamedTuple):
  """Cached keys and values of G distinct token prefixes that the rows of a batch continue.

  Rows attend to their prefix through ``attention.attend_shared_prefix``, which reads each prefix
  once for all of its rows (a state's prompt, once for its K candidate actions) instead of once
  per row from a copy in the row's own cache; the rows' own cache holds only what follows.

  Attributes:
    k, v: [layers, G, kv_heads, Pp, head_dim] the prefixes' keys (after RoPE) and values.
    mask: [G, Pp] bool, prefix slot holds a real token.
    row_prefix: [B] int32 prefix of each row.
    row_shared: [B] bool, the row continues its prefix (False: it attends to its own slots only).
    seats: [G, R] int32 the rows that continue each prefix, ``B`` for an empty seat (every row
      with ``row_shared`` sits in the seats of its ``row_prefix``, exactly once).
  """

  k: jax.Array
  v: jax.Array
  mask: jax.Array
  row_prefix: jax.Array
  row_shared: jax.Array
  seats: jax.Array

  @classmethod
  def from_cache(cls, cache, row_prefix, row_shared, seats) -> SharedPrefix:
    """The prefix of a ``llama.KVCache`` of G rows (its k, v: ``[L, G, KVH, Pp, hd]``)."""
    return cls(k=cache.k, v=cache.v,
               mask=cache.mask, row_prefix=jnp.asarray(row_prefix, jnp.int32),
               row_shared=jnp.asarray(row_shared, bool), seats=jnp.asarray(seats, jnp.int32))

  def row_mask(self) -> jax.Array:
    """[B, Pp] bool: prefix slot is a real token of the row's prefix."""
    return jnp.take(self.mask, self.row_prefix, axis=0) & self.row_shared[:, None]

  def row_seat(self) -> jax.Array:
    """[B] int32 flat seat of each row (``G * R``, no seat, for a row without prefix)."""
    n, r = self.seats.shape
    b = self.row_prefix.shape[0]
    return jnp.full((b,), n * r, jnp.int32).at[self.seats.reshape(-1)].set(
        jnp.arange(n * r, dtype=jnp.int32), mode="drop")


def attend_shared_prefix(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    key_mask: jax.Array,
    query_slots: jax.Array,
    prefix_k: jax.Array,
    prefix_v: jax.Array,
    row_mask: jax.Array,
    seats: jax.Array,
    row_seat: jax.Array,
    scale: float,
) -> jax.Array:
  """Attention of rows to their own slots and to a shared, cached prefix read once per prefix.

  Rows continue one of ``G`` distinct prefixes (a state's prompt that its K candidate actions
  extend). Attending to a copy of the prefix in every row reads its keys and values once per row;
  here each prefix is read once for all its rows: the queries are gathered into *seats*, ``R`` per
  prefix (``seats[n]``: the rows that continue prefix ``n``), the prefix scores are computed per
  prefix in one batched product, and the softmax over (prefix slots + own slots) is assembled per
  row with a shared maximum. Mathematically equal to attending to ``concat(prefix, own slots)``.

  Args:
    q: [B, T, H, hd] queries (after RoPE).
    k, v: [B, KVH, S, hd] the rows' own keys and values (after RoPE); ``H % KVH == 0``.
    key_mask: [B, S] bool, own slot holds a real token.
    query_slots: [T] int32 own slot of each query (causality: own key slot <= query slot; every
      prefix slot precedes every own slot).
    prefix_k, prefix_v: [G, KVH, Pp, hd] the prefixes' cached keys and values.
    row_mask: [B, Pp] bool, prefix slot is a real token of the row's prefix (all False for a row
      that continues none).
    seats: [G, R] int32 row of each seat (``B``: an empty seat).
    row_seat: [B] int32 flat seat ``n * R + r`` of each row (``G * R`` for a row without prefix:
      its prefix output is zero).
    scale: logit scale.

  Returns:
    [B, T, H, hd] attention output in q's dtype; scores and softmax in float32.
  """
  n, r = seats.shape
  qg = _grouped(q, k.shape[1])  # [B, KVH, gq, T, hd]
  own = _slot_scores(qg, k, key_mask, query_slots, scale, None)  # [B, KVH, gq, T, S]

  def to_seats(x):  # [B, KVH, ...] -> [G, KVH, R, ...], zeros in empty seats
    x = jnp.concatenate([x, jnp.zeros((1,) + x.shape[1:], x.dtype)], axis=0)
    return jnp.swapaxes(jnp.take(x, seats, axis=0), 1, 2)

  def to_rows(x):  # [G, KVH, R, ...] -> [B, KVH, ...], zeros for rows without a seat
    x = jnp.swapaxes(x, 1, 2)
    return jnp.take(x.reshape((n * r,) + x.shape[2:]), row_seat, axis=0, mode="fill",
                    fill_value=0)

  pre = jnp.einsum("nkrgtd,nksd->nkrgts", to_seats(qg), prefix_k,
                   preferred_element_type=jnp.float32) * scale
  pre = to_rows(pre)  # [B, KVH, gq, T, Pp]
  pre = jnp.where(row_mask[:, None, None, None, :], pre, MASK_VALUE)
  m = jnp.maximum(own.max(-1, keepdims=True), pre.max(-1, keepdims=True))
  e_own, e_pre = jnp.exp(own - m), jnp.exp(pre - m)
  denom = e_own.sum(-1, keepdims=True) + e_pre.sum(-1, keepdims=True)
  out = jnp.einsum("bkgts,bksd->bkgtd", (e_own / denom).astype(v.dtype), v,
                   preferred_element_type=jnp.float32)
  out_pre = jnp.einsum("nkrgts,nksd->nkrgtd", to_seats((e_pre / denom).astype(prefix_v.dtype)),
                       prefix_v, preferred_element_type=jnp.float32)
  return _ungrouped(out + to_rows(out_pre)).astype(q.dtype)
