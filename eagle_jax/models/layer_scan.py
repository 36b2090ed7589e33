"""A decoder's blocks as one ``lax.scan`` over their stacked parameters.

Every prompt-length bucket and prefix-sharing plan of ``sampling.Sampler`` is a compiled program of
its own, and with the blocks unrolled each program holds ``layers`` copies of a block for the
prefill and again for the decode step; XLA's compile time grows with that size. Scanned, a program
holds one block, so it compiles several times faster, for a somewhat slower step (each layer's
weights are sliced out of the stacked arrays). The blocks' parameters are stacked once, when a
model is switched to scanning (``StackedBlocks``), not inside every compiled call, where the copy
of every weight would cost each prefill and decode call; ``Sampler(scan_layers=)`` chooses, and
``benchmarks/compile_bench.py`` measures both sides. The arithmetic is the unrolled loop's: the
same block code on the same values, in the same order. A scanned copy serves decoding only: its
bfloat16 weights are sliced as their bits (``kv_cache.as_bits``), which carry no gradient.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from eagle_jax.models.kv_cache import as_bits


def scannable(blocks: Sequence[nnx.Module]) -> bool:
  """Whether ``blocks`` share one graph (the same static attributes: no per-layer sliding windows
  or RoPE bases, as Gemma 3 has) and hold plain ``nnx.Param`` variables only (no LoRA adapters or
  other variable types a scan would have to carry)."""
  graphdefs = {nnx.graphdef(b) for b in blocks}
  plain = all(type(v) is nnx.Param for b in blocks for _, v in nnx.to_flat_state(nnx.state(b)))
  return len(graphdefs) == 1 and plain


class StackedBlocks(nnx.Module):
  """``layers`` blocks of one graph (``scannable``) held as one block whose parameters carry a
  leading layer axis (each ``[layers, ...]``), stacked here once and kept as the scan slices them:
  16-bit floats as their bits (``as_bits``), ``dtypes`` naming each leaf's float dtype. A
  conversion inside the jitted call would copy every stacked weight once per call (XLA:CPU
  materialises a bitcast-convert), which the continuous batcher pays every chunk of steps."""

  def __init__(self, blocks: Sequence[nnx.Module]):
    if not scannable(blocks):
      raise ValueError("StackedBlocks: the blocks differ in structure or hold non-Param variables")
    self.layers = len(blocks)
    stacked = jax.tree.map(lambda *a: jnp.stack(a), *[nnx.state(b) for b in blocks])
    self.dtypes = tuple(jnp.dtype(x.dtype).name for x in jax.tree.leaves(stacked))
    self.block = nnx.merge(nnx.graphdef(blocks[0]), jax.tree.map(as_bits, stacked))

  def weights(self, bits) -> list[jax.Array]:
    """The leaves of ``bits`` (the block's state, or one layer's slice of it) in their dtypes."""
    return [x if x.dtype == d else jax.lax.bitcast_convert_type(x, d)
            for x, d in zip(jax.tree.leaves(bits), self.dtypes)]


def run_blocks(blocks: StackedBlocks, inputs: tuple, kv, index, prefix, shared):
  """Runs the stacked blocks in order as one scan.

  Args:
    blocks: the decoder blocks; each layer's block is called as ``block(x, positions, key_mask,
      query_slots, layer_cache, layer_prefix)``.
    inputs: ``(x [B, T, D], positions [B, T], key_mask [B, S], query_slots [T])``.
    kv: the stacked cache ``(k, v)``, each [L, B, KVH, S, hd], or None; a block updates its layer
      ``i`` (the scan index) in place.
    index: [] int32 next cache slot, or None without a cache.
    prefix: ``SharedPrefix`` with k, v [L, G, KVH, Pp, hd] (scanned by layer), or None.
    shared: ``(row_mask, seats, row_seat)`` of ``prefix`` (the same for every layer), or None.

  Returns:
    (x [B, T, D] after the last block, the updated ``kv`` or None).
  """
  x, positions, key_mask, query_slots = inputs
  graphdef, stacked = nnx.split(blocks.block)
  treedef = jax.tree.structure(stacked)
  xs = (jnp.arange(blocks.layers, dtype=jnp.int32), stacked)
  if prefix is not None:
    xs = xs + (prefix.k, prefix.v)

  def body(carry, xs):
    x, kv = carry
    block = nnx.merge(graphdef, jax.tree.unflatten(treedef, blocks.weights(xs[1])))
    layer_cache = None if kv is None else (kv[0], kv[1], index, xs[0])
    layer_prefix = None if prefix is None else (xs[2], xs[3], *shared)
    x, kv = block(x, positions, key_mask, query_slots, layer_cache, layer_prefix)
    return (x, kv), None

  (x, kv), _ = jax.lax.scan(body, (x, kv), xs)
  return x, kv


def scanned(model: nnx.Module) -> nnx.Module:
  """A copy of a decoder (``Llama``) for decoding that runs its blocks as one scan: the blocks'
  parameters stacked once into ``StackedBlocks``, a tied embedding table held as bits with its
  transpose as the output head ``lm_head`` [D, V], every other parameter shared with ``model``;
  ``model`` itself if it already scans."""
  if model.scan_layers:
    return model
  if not scannable(model.layers):
    raise ValueError("scanned: the blocks cannot run as one scan (see scannable)")
  model = nnx.merge(*nnx.split(model))
  model.layers = StackedBlocks(model.layers)
  model.scan_layers = True
  if model.config.tie_embeddings:
    # The tied table once more as the output head in the layout of its product ([D, V]), and
    # the table as bits: inside a jitted call XLA:CPU would transpose the table for the product
    # and convert it to float32 for the lookup, both hoisted out of the decode loop, once per call.
    table = model.embedder.embedding[...]
    model.lm_head = nnx.Param(jnp.array(table.T))
    model.embedder.embedding = nnx.Param(as_bits(table))
  return model
