"""Llama-family decoder (Llama, SmolLM2, Gemma 1 and Gemma 3 switches) in Flax NNX.

The model is the standard pre-norm decoder-only transformer:

  h_0 = E[tokens] * (sqrt(D) if scale_embeddings else 1)
  a_l = h_l + P_a(Attn(RMSNorm(h_l)))    with RoPE on q and k, grouped-query attention
  h_{l+1} = a_l + P_m(W_down (act(W_gate x) * (W_up x))),  x = RMSNorm(a_l)   (SwiGLU / GeGLU)
  logits = RMSNorm(h_L) W_out             W_out = E^T when the embeddings are tied

``P_a``/``P_m`` are the identity, or with ``post_norms`` (Gemma 2/3) two more RMSNorms, so a block
has four norms.

* **RMSNorm**, **RoPE** (rotate-half layout) and the masked GQA softmax live in ``attention.py``.
  GGUF files of Llama store q/k rows permuted for llama.cpp's interleaved layout; ``loading.py``
  undoes that permutation, so both sources meet here.
* **GQA**: ``heads`` query heads share ``kv_heads`` key/value heads (``heads % kv_heads == 0``).
* **Masking**: attention is causal over *slots* (positions in the token array or the KV cache) and
  restricted to slots that hold real tokens. Because every row of a batch writes the same slot
  indices, left-padded prompts work with one shared cache index; RoPE uses the per-row ``positions``
  (the count of real tokens before each token), so padding does not shift positions.
* **Gemma 3**: ``qk_norm`` (RMSNorm over ``head_dim`` of q and k before RoPE), ``layer_types``
  interleaving global layers with sliding-window layers (``sliding_window`` slots, RoPE base
  ``rope_local_theta``; global layers use ``rope_theta`` and the linear ``rope_scaling``), and
  ``query_scale = query_pre_attn_scalar ** -0.5``. Each ``Attention`` fixes its layer's RoPE base,
  factor and window at construction (``LlamaConfig.layer_attention``).
* **KV cache** (``kv_cache.py``): ``KVCache`` holds ``k, v: [layers, B, kv_heads, S, head_dim]``,
  the slot mask ``[B, S]`` and the next slot index. A call with ``T`` tokens writes slots
  ``[index, index + T)``. Sliding layers keep all ``S`` slots.

Precision: parameters are stored in ``param_dtype`` and cast to ``dtype`` (the compute dtype) at
use; norms, RoPE, softmax and logits are computed in float32. ``matmul_dtype`` (bf16 under float32
activations) casts only the operands of the weight and attention products, summed in float32: bf16
units (AMX, AVX512-BF16) with float32 elementwise ops, which XLA:CPU runs faster than bf16 ones.

Sharding: parameters carry logical axis names (``nnx.with_partitioning``; names from
``eagle_jax.parallel.DEFAULT_RULES``). They are created unsharded (eager sharding off) and placed on
a mesh by ``loading.shard_model`` / ``loading.init_sharded``, which drop a mesh axis from a
dimension it does not divide (SmolLM2 has 9 heads). Activations are constrained with ``constrain``
only when a mesh is set with ``jax.set_mesh``. Layers are a Python list, run unrolled or, with
``scan_layers``, as one ``lax.scan`` over their stacked parameters (``layer_scan.py``).

Not implemented: Gemma 2's attention logit soft-capping (its final-logit soft-capping is
``final_logit_softcap``), and a ring-buffer cache for sliding layers.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from eagle_jax.models import layer_scan
from eagle_jax.models.attention import (
  LAYER_KINDS,
  SLIDING,
  SharedPrefix,
  apply_rope,
  attend,
  attend_shared_prefix,
  cast_einsum,
  rms_norm,
)
from eagle_jax.models.kv_cache import (  # noqa: F401  (KVCache and its axes are part of this API)
  CACHE_AXES,
  SLOT_AXIS,
  KVCache,
  cache_entries,
  decode_cache_dtype,
  read_cache,
)
from eagle_jax.parallel import constrain

_ACTIVATIONS = {
    "silu": jax.nn.silu,
    "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),
}


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
  """Decoder hyper-parameters.

  Attributes:
    vocab_size: V, rows of the embedding table.
    hidden: D, model width.
    intermediate: F, MLP hidden width.
    layers: number of decoder blocks.
    heads: query heads H.
    kv_heads: key/value heads (GQA); must divide ``heads``.
    head_dim: per-head width (``hidden // heads`` for Llama; free for Gemma).
    rope_theta: RoPE base frequency.
    rms_eps: RMSNorm epsilon.
    tie_embeddings: output projection is the transposed embedding table.
    max_len: longest sequence (cache length) the model is meant for; informational for RoPE.
    dtype: compute dtype (activations, matmul inputs).
    param_dtype: storage dtype of the parameters.
    matmul_dtype: operands of the weight and attention products (``operand_dtype``); None: dtype.
    scale_embeddings: multiply embeddings by sqrt(hidden) (Gemma).
    norm_offset: RMSNorm multiplies by ``norm_offset + w`` (0 Llama, 1 Gemma).
    activation: MLP gate activation, ``"silu"`` (SwiGLU) or ``"gelu_tanh"`` (GeGLU, Gemma).
    query_scale: attention logit scale; ``None`` means ``head_dim ** -0.5``.
    final_logit_softcap: if set, ``logits = c * tanh(logits / c)`` (Gemma 2).
    qk_norm: RMSNorm over ``head_dim`` on each query and key head before RoPE (Gemma 3).
    post_norms: extra RMSNorms on the attention and MLP outputs before each residual add
      (Gemma 2/3's four norms per block).
    layer_types: per-layer ``"full_attention"`` or ``"sliding_attention"``; None: all full.
    sliding_window: window width W of the sliding layers (a query sees itself and W - 1 before).
    rope_local_theta: RoPE base of the sliding layers; None: ``rope_theta``.
    rope_scaling: linear RoPE factor of the full-attention layers (positions / factor).
    rope_llama3: Llama 3's RoPE scaling ``(factor, low_freq_factor, high_freq_factor,
      original_max_position)`` (``attention.llama3_inv_freq``), or None.
  """

  vocab_size: int
  hidden: int
  intermediate: int
  layers: int
  heads: int
  kv_heads: int
  head_dim: int
  rope_theta: float = 10000.0
  rms_eps: float = 1e-5
  tie_embeddings: bool = True
  max_len: int = 2048
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32
  matmul_dtype: jnp.dtype | None = None
  scale_embeddings: bool = False
  norm_offset: float = 0.0
  activation: str = "silu"
  query_scale: float | None = None
  final_logit_softcap: float | None = None
  qk_norm: bool = False
  post_norms: bool = False
  layer_types: tuple[str, ...] | None = None
  sliding_window: int | None = None
  rope_local_theta: float | None = None
  rope_scaling: float = 1.0
  rope_llama3: tuple[float, float, float, int] | None = None

  def __post_init__(self):
    for name in ("vocab_size", "hidden", "intermediate", "layers", "heads", "kv_heads", "head_dim"):
      value = getattr(self, name)
      if not isinstance(value, int) or value <= 0:
        raise ValueError(f"LlamaConfig.{name}: expected a positive int, got {value!r}")
    if self.heads % self.kv_heads:
      raise ValueError(
          f"LlamaConfig.kv_heads: must divide heads={self.heads}, got {self.kv_heads}")
    if self.head_dim % 2:
      raise ValueError(f"LlamaConfig.head_dim: RoPE needs an even head_dim, got {self.head_dim}")
    if self.activation not in _ACTIVATIONS:
      raise ValueError(
          f"LlamaConfig.activation: expected one of {sorted(_ACTIVATIONS)}, got "
          f"{self.activation!r}")
    if self.layer_types is not None:
      object.__setattr__(self, "layer_types", tuple(self.layer_types))
      if len(self.layer_types) != self.layers or set(self.layer_types) - set(LAYER_KINDS):
        raise ValueError(f"LlamaConfig.layer_types: expected {self.layers} entries from "
                         f"{LAYER_KINDS}, got {self.layer_types!r}")
      if SLIDING in self.layer_types and not (
          isinstance(self.sliding_window, int) and self.sliding_window > 0):
        raise ValueError("LlamaConfig.sliding_window: sliding layers need a positive int, got "
                         f"{self.sliding_window!r}")

  def layer_attention(self, layer: int) -> tuple[float, float, int | None]:
    """(RoPE base, linear RoPE factor, sliding window or None) of decoder layer ``layer``."""
    if self.layer_types is not None and self.layer_types[layer] == SLIDING:
      theta = self.rope_theta if self.rope_local_theta is None else self.rope_local_theta
      return theta, 1.0, self.sliding_window
    return self.rope_theta, self.rope_scaling, None

  @property
  def operand_dtype(self) -> jnp.dtype:  # of the weight and attention products, summed in float32
    return self.matmul_dtype or self.dtype

  def matmul(self, spec: str, x: jax.Array, w, out=None) -> jax.Array:
    """``attention.cast_einsum`` of activations and a weight: operands in ``operand_dtype``."""
    return cast_einsum(spec, x, w[...], self.operand_dtype, out or self.dtype)

  def replace(self, **changes) -> LlamaConfig:
    return dataclasses.replace(self, **changes)


def _param(rngs: nnx.Rngs, init, shape, axes, dtype) -> nnx.Param:
  return nnx.Param(nnx.with_partitioning(init, axes)(rngs.params(), shape, dtype))


class RMSNorm(nnx.Module):
  """RMSNorm with a learned per-feature scale [D]."""

  def __init__(self, dim: int, config: LlamaConfig, *, rngs: nnx.Rngs, axis: str = "embed"):
    init = nnx.initializers.zeros if config.norm_offset else nnx.initializers.ones
    self.scale = _param(rngs, init, (dim,), (axis,), config.param_dtype)
    self.eps = config.rms_eps
    self.offset = config.norm_offset

  def __call__(self, x: jax.Array) -> jax.Array:
    return rms_norm(x, self.scale[...], self.eps, self.offset)


class Attention(nnx.Module):
  """Grouped-query self-attention with RoPE and an optional KV cache."""

  def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs, layer: int = 0):
    c = config
    self.config = c
    self.rope_theta, self.rope_factor, self.window = c.layer_attention(layer)
    if c.qk_norm:
      self.q_norm = RMSNorm(c.head_dim, c, rngs=rngs, axis="kv")
      self.k_norm = RMSNorm(c.head_dim, c, rngs=rngs, axis="kv")
    dense = nnx.initializers.normal(0.02)
    proj = lambda shape, axes: _param(rngs, dense, shape, axes, c.param_dtype)
    self.wq = proj((c.hidden, c.heads, c.head_dim), ("embed", "heads", "kv"))
    self.wk = proj((c.hidden, c.kv_heads, c.head_dim), ("embed", "kv_heads", "kv"))
    self.wv = proj((c.hidden, c.kv_heads, c.head_dim), ("embed", "kv_heads", "kv"))
    self.wo = proj((c.heads, c.head_dim, c.hidden), ("heads", "kv", "embed"))

  def __call__(
      self,
      x: jax.Array,
      positions: jax.Array,
      key_mask: jax.Array,
      query_slots: jax.Array,
      layer_cache: tuple[jax.Array, jax.Array, jax.Array, int] | None,
      prefix: tuple[jax.Array, jax.Array, jax.Array] | None = None,
  ) -> tuple[jax.Array, tuple[jax.Array, jax.Array] | None]:
    """Self-attention.

    Args:
      x: [B, T, D] normalised inputs (compute dtype).
      positions: [B, T] int32 RoPE positions.
      key_mask: [B, S] bool, key slot holds a real token (S = T without cache).
      query_slots: [T] int32 slot of each query (causality: key slot <= query slot).
      layer_cache: (k [L, B, KVH, S, hd], v [L, B, KVH, S, hd], index [], layer) or None: the
        whole stacked cache, updated in place at ``[layer, :, :, index:index + T]``.
      prefix: (k [G, KVH, Pp, hd], v, row_mask [B, Pp], seats [G, R], row_seat [B]) of this
        layer's shared prefixes (``SharedPrefix``, ``attention.attend_shared_prefix``).

    Returns:
      ([B, T, D] output, (k, v) updated stacked cache or None).
    """
    c = self.config
    q = c.matmul("btd,dhk->bthk", x, self.wq)
    k = c.matmul("btd,dhk->bthk", x, self.wk)
    v = c.matmul("btd,dhk->bthk", x, self.wv)
    if c.qk_norm:
      q, k = self.q_norm(q), self.k_norm(k)
    theta, factor, l3 = self.rope_theta, self.rope_factor, self.config.rope_llama3
    op = c.operand_dtype
    q = constrain(apply_rope(q, positions, theta, factor, l3).astype(op), ("batch", "length",
                                                                           "heads", "kv"))
    k = apply_rope(k, positions, theta, factor, l3)
    heads_first = lambda x: constrain(x.transpose(0, 2, 1, 3).astype(op),
                                      ("batch", "kv_heads", "length", "kv"))
    k, v = heads_first(k), heads_first(v)
    new_cache = None
    if layer_cache is not None:
      ck, cv, index, layer = layer_cache
      start = (layer, 0, 0, index, 0)
      ck = jax.lax.dynamic_update_slice(ck, cache_entries(k[None], ck.dtype), start)
      cv = jax.lax.dynamic_update_slice(cv, cache_entries(v[None], cv.dtype), start)
      new_cache = (ck, cv)
      k, v = read_cache(ck[layer], op), read_cache(cv[layer], op)
    scale = c.query_scale if c.query_scale is not None else c.head_dim**-0.5
    if prefix is not None:
      pk, pv, row_mask, seats, row_seat = prefix
      out = attend_shared_prefix(q, k, v, key_mask, query_slots, read_cache(pk, op),
                                 read_cache(pv, op), row_mask, seats, row_seat, scale)
    else:
      out = attend(q, k, v, key_mask, query_slots, scale, self.window)
    out = constrain(out, ("batch", "length", "heads", "kv"))
    y = c.matmul("bthk,hkd->btd", out, self.wo)
    return y, new_cache


class MLP(nnx.Module):
  """Gated MLP: ``W_down (act(W_gate x) * W_up x)``."""

  def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs):
    c = config
    dense = nnx.initializers.normal(0.02)
    self.config = c
    self.w_gate = _param(rngs, dense, (c.hidden, c.intermediate), ("embed", "mlp"), c.param_dtype)
    self.w_up = _param(rngs, dense, (c.hidden, c.intermediate), ("embed", "mlp"), c.param_dtype)
    self.w_down = _param(rngs, dense, (c.intermediate, c.hidden), ("mlp", "embed"), c.param_dtype)

  def __call__(self, x: jax.Array) -> jax.Array:
    """x: [B, T, D] -> [B, T, D]."""
    c = self.config  # einsums (not ``@``): qwix's LoRA interception sees these contractions
    gate = _ACTIVATIONS[c.activation](c.matmul("btd,df->btf", x, self.w_gate))
    h = constrain(gate * c.matmul("btd,df->btf", x, self.w_up), ("batch", "length", "mlp"))
    return c.matmul("btf,fd->btd", h, self.w_down)


class Block(nnx.Module):
  """One pre-norm decoder block."""

  def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs, layer: int = 0):
    self.attn_norm = RMSNorm(config.hidden, config, rngs=rngs)
    self.attn = Attention(config, rngs=rngs, layer=layer)
    self.mlp_norm = RMSNorm(config.hidden, config, rngs=rngs)
    self.mlp = MLP(config, rngs=rngs)
    self.post_norms = config.post_norms
    if config.post_norms:
      self.post_attn_norm = RMSNorm(config.hidden, config, rngs=rngs)
      self.post_mlp_norm = RMSNorm(config.hidden, config, rngs=rngs)

  def __call__(self, x, positions, key_mask, query_slots, layer_cache, prefix=None):
    y, new_cache = self.attn(self.attn_norm(x), positions, key_mask, query_slots, layer_cache,
                             prefix)
    if self.post_norms:
      y = self.post_attn_norm(y)
    x = constrain(x + y, ("batch", "length", "embed"))
    y = self.mlp(self.mlp_norm(x))
    if self.post_norms:
      y = self.post_mlp_norm(y)
    x = constrain(x + y, ("batch", "length", "embed"))
    return x, new_cache


class Embedder(nnx.Module):
  """Token embedding table [V, D]."""

  def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs):
    self.embedding = _param(rngs, nnx.initializers.normal(0.02), (config.vocab_size, config.hidden),
                            ("vocab", "embed"), config.param_dtype)


class Llama(nnx.Module):
  """Decoder-only language model.

  Typical use::

    logits, cache = model(tokens, positions, attention_mask=mask, cache=cache)

  ``embed`` + ``forward_embeddings`` + ``logits`` split the same computation so callers can inject
  soft-token embeddings (ELM) or read final hidden states (agent value head, pooled features).
  """

  def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs):
    self.config = config
    # Blocks as one lax.scan (``layer_scan.scanned``: a copy with ``StackedBlocks`` layers).
    self.scan_layers = False
    # Parameters are created unsharded; loading.shard_model places them on a mesh.
    with nnx.use_eager_sharding(False):
      self.embedder = Embedder(config, rngs=rngs)
      self.layers = nnx.List([Block(config, rngs=rngs, layer=i)
                              for i in range(config.layers)])
      self.final_norm = RMSNorm(config.hidden, config, rngs=rngs)
      if not config.tie_embeddings:
        self.lm_head = _param(rngs, nnx.initializers.normal(0.02),
                              (config.hidden, config.vocab_size), ("embed", "vocab"),
                              config.param_dtype)

  def embed(self, tokens: jax.Array) -> jax.Array:
    """tokens: [B, T] int32 -> [B, T, D] compute dtype (scaled by sqrt(D) for Gemma)."""
    table = self.embedder.embedding[...]
    x = jnp.take(table, tokens, axis=0)
    if table.dtype == jnp.uint16:  # a decoding copy's table as bits (``layer_scan.scanned``)
      x = jax.lax.bitcast_convert_type(x, self.config.param_dtype)
    x = x.astype(self.config.dtype)
    if self.config.scale_embeddings:
      x = x * jnp.asarray(math.sqrt(self.config.hidden), self.config.dtype)
    return constrain(x, ("batch", "length", "embed"))

  def forward_embeddings(
      self,
      x: jax.Array,
      positions: jax.Array | None = None,
      attention_mask: jax.Array | None = None,
      cache: KVCache | None = None,
      prefix: SharedPrefix | None = None,
  ) -> tuple[jax.Array, KVCache | None]:
    """Runs the decoder blocks and the final norm on input embeddings.

    Args:
      x: [B, T, D] input embeddings.
      positions: [B, T] int32 RoPE positions; default: count of real tokens before each token
        (including those already in ``cache``).
      attention_mask: [B, T] bool, token is real (not padding); default all True.
      cache: KVCache to append to, or None for a cache-free causal pass.
      prefix: shared prefixes that the rows continue (``SharedPrefix``): every query also attends
        to its row's prefix, which precedes the row's own slots; default positions count its
        real tokens. Not with sliding-window layers.

    Returns:
      (hidden [B, T, D] after the final norm (compute dtype), updated cache or None).
    """
    b, t, d = x.shape
    if d != self.config.hidden:
      raise ValueError(f"forward_embeddings: x has width {d}, expected hidden={self.config.hidden}")
    if attention_mask is None:
      attention_mask = jnp.ones((b, t), bool)
    attention_mask = attention_mask.astype(bool)
    if attention_mask.shape != (b, t):
      raise ValueError(f"attention_mask: expected shape {(b, t)}, got {attention_mask.shape}")
    if prefix is not None:
      if self.config.sliding_window:
        raise ValueError("forward_embeddings: prefix works without sliding windows only")
      row_mask, row_seat = prefix.row_mask(), prefix.row_seat()
    if positions is None:
      offset = 0 if cache is None else cache.positions_next[:, None]
      if prefix is not None:
        offset = offset + jnp.sum(row_mask, axis=-1, dtype=jnp.int32)[:, None]
      positions = offset + jnp.cumsum(attention_mask, axis=-1, dtype=jnp.int32) - 1
      positions = jnp.maximum(positions, 0)
    if positions.shape != (b, t):
      raise ValueError(f"positions: expected shape {(b, t)}, got {tuple(positions.shape)}")
    x = constrain(x.astype(self.config.dtype), ("batch", "length", "embed"))
    if cache is None:
      key_mask = attention_mask
      query_slots = jnp.arange(t, dtype=jnp.int32)
    else:
      if cache.k.shape[1] != b:
        raise ValueError(f"cache: batch {cache.k.shape[1]} does not match tokens batch {b}")
      key_mask = jax.lax.dynamic_update_slice(cache.mask, attention_mask, (0, cache.index))
      query_slots = cache.index + jnp.arange(t, dtype=jnp.int32)
    kv = None if cache is None else (cache.k, cache.v)
    index = None if cache is None else cache.index
    shared = None if prefix is None else (row_mask, prefix.seats, row_seat)
    if self.scan_layers:
      x, kv = layer_scan.run_blocks(self.layers, (x, positions, key_mask, query_slots), kv, index,
                                    prefix, shared)
    else:
      for i, block in enumerate(self.layers):
        layer_cache = None if kv is None else (kv[0], kv[1], index, i)
        layer_prefix = None if prefix is None else (prefix.k[i], prefix.v[i], *shared)
        x, kv = block(x, positions, key_mask, query_slots, layer_cache, layer_prefix)
    hidden = self.final_norm(x)
    if cache is None:
      return hidden, None
    return hidden, KVCache(k=constrain(kv[0], CACHE_AXES), v=constrain(kv[1], CACHE_AXES),
                           mask=key_mask, index=cache.index + t)

  def scannable(self) -> bool:
    """Whether the blocks can run as one ``lax.scan`` (``layer_scan.scannable``)."""
    return self.scan_layers or layer_scan.scannable(self.layers)

  def logits(self, hidden: jax.Array) -> jax.Array:
    """hidden: [B, T, D] -> logits [B, T, V] float32."""
    if self.config.tie_embeddings and not hasattr(self, "lm_head"):
      out = self.config.matmul("btd,vd->btv", hidden, self.embedder.embedding, jnp.float32)
    else:
      out = self.config.matmul("btd,dv->btv", hidden, self.lm_head, jnp.float32)
    if self.config.final_logit_softcap:
      cap = self.config.final_logit_softcap
      out = cap * jnp.tanh(out / cap)
    return constrain(out, ("batch", "length", "vocab"))

  def hidden_states(
      self,
      tokens: jax.Array | None,
      positions: jax.Array | None = None,
      attention_mask: jax.Array | None = None,
      cache: KVCache | None = None,
      input_embeddings: jax.Array | None = None,
      prefix: SharedPrefix | None = None,
  ) -> tuple[jax.Array, KVCache | None]:
    """Final-norm hidden states [B, T, D] (and the updated cache); see ``__call__`` and
    ``forward_embeddings`` (``prefix``)."""
    if input_embeddings is None:
      if tokens is None:
        raise ValueError("hidden_states: give tokens or input_embeddings")
      x = self.embed(tokens)
    else:
      x = input_embeddings
    return self.forward_embeddings(x, positions, attention_mask, cache, prefix)

  def __call__(
      self,
      tokens: jax.Array | None,
      positions: jax.Array | None = None,
      attention_mask: jax.Array | None = None,
      cache: KVCache | None = None,
      input_embeddings: jax.Array | None = None,
      prefix: SharedPrefix | None = None,
  ) -> tuple[jax.Array, KVCache | None]:
    """Next-token logits.

    Args:
      tokens: [B, T] int32 token ids (ignored when ``input_embeddings`` is given).
      positions: [B, T] int32 RoPE positions (default: derived from ``attention_mask``).
      attention_mask: [B, T] bool, False for padding.
      cache: optional KVCache; the call appends T slots.
      input_embeddings: optional [B, T, D] embeddings replacing ``embed(tokens)``.
      prefix: optional shared prefixes the rows continue (``forward_embeddings``).

    Returns:
      (logits [B, T, V] float32, updated cache or None).
    """
    hidden, cache = self.hidden_states(tokens, positions, attention_mask, cache, input_embeddings,
                                       prefix)
    return self.logits(hidden), cache


def param_count(model: Llama) -> int:
  """The decoder's parameters, a tied table once (a decoding copy's transposed head,
  ``layer_scan.scanned``, holds the same numbers)."""
  n = sum(int(x.size) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
  if model.config.tie_embeddings and hasattr(model, "lm_head"):
    n -= int(model.lm_head[...].size)
  return n
