"""The decoder's key/value cache and how it is stored.

``KVCache`` holds ``k, v: [layers, B, kv_heads, S, head_dim]`` (heads before slots: attention's
products, batched over (row, head), read it as stored), the slot mask ``[B, S]`` and the next slot
index. A cache that only decoding writes and reads (the sampler's, the continuous batcher's, shared
prefixes) is stored in the attention products' operand dtype, bfloat16 as its ``uint16`` bits
(``decode_cache_dtype``); a cache under ``jax.grad`` stays in the compute dtype.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp


@flax.struct.dataclass
class KVCache:
  """Preallocated key/value cache shared by all layers.

  Attributes:
    k: [layers, B, kv_heads, S, head_dim] keys (after RoPE).
    v: [layers, B, kv_heads, S, head_dim] values.
    mask: [B, S] bool, slot holds a real (non-padding) token.
    index: [] int32, next slot to write (the same for every row).
  """

  k: jax.Array
  v: jax.Array
  mask: jax.Array
  index: jax.Array

  @classmethod
  def init(cls, config, batch: int, length: int, dtype=None) -> KVCache:
    """An empty cache of ``length`` slots for ``batch`` rows of a decoder (``config``: its
    ``llama.LlamaConfig``; dtype: the compute dtype, or ``decode_cache_dtype`` for a cache no
    gradient goes through)."""
    if batch <= 0 or length <= 0:
      raise ValueError(f"KVCache.init: batch and length must be positive, got {batch}, {length}")
    shape = (config.layers, batch, config.kv_heads, length, config.head_dim)
    dtype = dtype or config.dtype
    return cls(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype),
               mask=jnp.zeros((batch, length), bool), index=jnp.zeros((), jnp.int32))

  @classmethod
  def for_decoding(cls, config, batch: int, length: int) -> KVCache:
    """An empty cache that only decoding writes and reads (no gradient through it), stored in
    ``decode_cache_dtype(config)``."""
    return cls.init(config, batch, length, dtype=decode_cache_dtype(config))

  @property
  def length(self) -> int:
    return self.k.shape[SLOT_AXIS]

  @property
  def positions_next(self) -> jax.Array:
    """[B] int32: the RoPE position of the next real token of each row."""
    return jnp.sum(self.mask, axis=-1, dtype=jnp.int32)


def decode_cache_dtype(config) -> jnp.dtype:
  """Storage dtype of a cache that only decoding writes and reads (no gradient through it), for a
  decoder's ``llama.LlamaConfig``.

  The attention products' operand dtype, which every read casts to anyway; bfloat16 is held as
  its ``uint16`` bits (``as_bits``, ``cache_entries``, ``read_cache``): XLA:CPU upcasts a bfloat16
  dynamic-update-slice or dynamic-slice to float32, converting a whole stacked cache there and
  back at each layer's write, where on bits both are plain in-place copies. Bits carry no
  gradient, so a cache under ``jax.grad`` (the agent's prompt encoding) keeps ``KVCache.init``'s
  default, the compute dtype."""
  op = jnp.dtype(config.operand_dtype)
  return jnp.dtype(jnp.uint16) if op == jnp.bfloat16 else op


def as_bits(x: jax.Array) -> jax.Array:
  """A 16-bit float array as its ``uint16`` bits (others as they are).

  XLA:CPU has no 16-bit float dynamic-slice or dynamic-update-slice: it converts the whole
  operand to float32 and back around them (a scanned layer's weights, a stacked cache's write),
  where on bits both are plain copies. Bits carry no gradient."""
  if jnp.issubdtype(x.dtype, jnp.floating) and x.dtype.itemsize == 2:
    return jax.lax.bitcast_convert_type(x, jnp.uint16)
  return x


def from_bits(x: jax.Array, like: jax.Array) -> jax.Array:
  """Inverse of ``as_bits``: ``x`` in ``like``'s dtype."""
  return x if x.dtype == like.dtype else jax.lax.bitcast_convert_type(x, like.dtype)


def cache_entries(x: jax.Array, storage: jnp.dtype) -> jax.Array:
  """Keys or values ``x`` (float) as a cache of dtype ``storage`` holds them; ``uint16`` storage:
  the bfloat16 bits."""
  if storage == jnp.uint16:
    return as_bits(x.astype(jnp.bfloat16))
  return x.astype(storage)


def read_cache(x: jax.Array, dtype: jnp.dtype) -> jax.Array:
  """Cached keys or values ``x`` in the float ``dtype`` (inverse of ``cache_entries``)."""
  if x.dtype == jnp.uint16:
    return jax.lax.bitcast_convert_type(x, jnp.bfloat16).astype(dtype)
  return x.astype(dtype)


CACHE_AXES = (None, "batch", "kv_heads", "length", "kv")
SLOT_AXIS = 3  # the slot axis of ``KVCache.k`` and ``.v``
