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
  for all rows (a finished row's padding comes after its last real token).

Gemma 3 interleaves local (sliding-window, own RoPE base) and global layers; ``layer_kind`` names
the per-layer choice, with the Hugging Face ``layer_types`` spellings.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)
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
    k: [B, S, KVH, hd] keys (after RoPE); ``H % KVH == 0``.
    v: [B, S, KVH, hd] values.
    key_mask: [B, S] bool, key slot holds a real token.
    query_slots: [T] int32 slot of each query.
    scale: logit scale (``head_dim ** -0.5`` or Gemma's ``query_pre_attn_scalar ** -0.5``).
    window: sliding-window width ``W`` (key slot ``> query slot - W``) or None for global.

  Returns:
    [B, T, H, hd] attention output in q's dtype; scores and softmax in float32.
  """
  b, t, h, hd = q.shape
  kvh = k.shape[2]
  qg = q.reshape(b, t, kvh, h // kvh, hd)
  scores = jnp.einsum("btkgd,bskd->bkgts", qg, k, preferred_element_type=jnp.float32) * scale
  slots = jnp.arange(k.shape[1], dtype=jnp.int32)[None, None, :]
  qs = query_slots[None, :, None]
  allowed = key_mask[:, None, :] & (slots <= qs)
  if window is not None:
    allowed = allowed & (slots > qs - window)
  scores = jnp.where(allowed[:, None, None, :, :], scores, MASK_VALUE)
  probs = jax.nn.softmax(scores, axis=-1).astype(q.dtype)
  return jnp.einsum("bkgts,bskd->btkgd", probs, v).reshape(b, t, h, hd)


def attend_with_prefix(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    key_mask: jax.Array,
    prefix_k: jax.Array,
    prefix_v: jax.Array,
    prefix_mask: jax.Array,
    scale: float,
) -> jax.Array:
  """Attention of G continuations per row to one shared, cached prefix and to their own tokens.

  Row ``n``'s prefix (``prefix_k[n]``, e.g. a state's prompt) precedes each of its G continuations
  (rows ``n * G .. n * G + G - 1`` of ``q``, e.g. its candidate actions). The prefix keys are read
  once per row, not copied G times: the softmax over (prefix slots + own causal slots) is assembled
  from the two score blocks with a shared maximum.

  Args:
    q, k, v: [N * G, T, H | KVH, hd] the continuations' queries, keys and values (after RoPE).
    key_mask: [N * G, T] bool, continuation token is real.
    prefix_k, prefix_v: [N, S, KVH, hd] the prefixes' cached keys and values.
    prefix_mask: [N, S] bool, prefix slot holds a real token.
    scale: logit scale.

  Returns:
    [N * G, T, H, hd] attention output in q's dtype; scores and softmax in float32.
  """
  ng, t, h, hd = q.shape
  n, s, kvh, _ = prefix_k.shape
  g = ng // n
  qg = q.reshape(ng, t, kvh, h // kvh, hd)
  own = jnp.einsum("btkgd,bskd->bkgts", qg, k, preferred_element_type=jnp.float32) * scale
  slots = jnp.arange(t, dtype=jnp.int32)
  allowed = key_mask[:, None, :] & (slots[None, None, :] <= slots[None, :, None])
  own = jnp.where(allowed[:, None, None], own, MASK_VALUE)  # [NG, KVH, g, T, T]
  qp = qg.reshape(n, g * t, kvh, h // kvh, hd)
  pre = jnp.einsum("bqkgd,bskd->bkgqs", qp, prefix_k, preferred_element_type=jnp.float32) * scale
  pre = jnp.where(prefix_mask[:, None, None, None, :], pre, MASK_VALUE)  # [N, KVH, g, G*T, S]
  pre = pre.reshape(n, kvh, h // kvh, g, t, s).transpose(0, 3, 1, 2, 4, 5).reshape(
      ng, kvh, h // kvh, t, s)
  m = jnp.maximum(own.max(-1, keepdims=True), pre.max(-1, keepdims=True))
  e_own, e_pre = jnp.exp(own - m), jnp.exp(pre - m)
  denom = e_own.sum(-1, keepdims=True) + e_pre.sum(-1, keepdims=True)
  out = jnp.einsum("bkgts,bskd->btkgd", (e_own / denom).astype(q.dtype), v)
  e_pre = (e_pre / denom).astype(q.dtype).reshape(n, g, kvh, h // kvh, t, s)
  out_pre = jnp.einsum("bjkgts,bskd->bjtkgd", e_pre, prefix_v).reshape(ng, t, kvh, h // kvh, hd)
  return (out + out_pre).reshape(ng, t, h, hd)
