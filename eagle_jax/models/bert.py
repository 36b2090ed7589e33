"""BERT encoder (MiniLM) in Flax NNX, sentence-transformers pooling, and the HF safetensors loader.

The model is the post-LayerNorm BERT of Devlin et al. (2019) as Hugging Face's ``BertModel``
computes it, so that real checkpoints (all-MiniLM-L6-v2: 6 layers, d=384, 12 heads) load unchanged:

  h_0 = LN(E_word[ids] + E_pos[0..T-1] + E_type[token_type_ids])
  for each layer:
    q, k, v = h W_q + b_q, h W_k + b_k, h W_v + b_v         (split into H heads of size d/H)
    A = softmax(q kᵀ / sqrt(d/H) + mask_bias)                (mask_bias = -inf-like on padded keys)
    h = LN(h + (A v) W_o + b_o)
    h = LN(h + gelu(h W_1 + b_1) W_2 + b_2)

Only padded *keys* are masked, exactly as in ``BertModel``; hidden states at padded *query*
positions are computed but meaningless and pooled away (they are ill-conditioned, so they agree
with PyTorch less closely than real positions; the MiniLM test gives them a looser tolerance). GELU is the
exact erf form (``hidden_act="gelu"``); ``"gelu_new"``/``"gelu_pytorch_tanh"`` select the tanh
approximation. LayerNorm uses the two-pass variance (flax's fast ``E[x²]-E[x]²`` loses digits at
eps=1e-12).

Sentence embeddings follow sentence-transformers' ``Transformer -> Pooling(mean) -> Normalize``
modules (all-MiniLM-L6-v2's ``modules.json``): e = Σ_t m_t h_t / max(Σ_t m_t, 1e-9), then e /
max(‖e‖₂, 1e-12).

Sharding. Parameters carry logical axis names (``vocab``, ``embed``, ``heads``, ``kv``, ``mlp``) as
``out_sharding`` metadata with ``eager_sharding=False``, so the model builds and runs unsharded with
no mesh; ``parallel.shard_module`` places them on a mesh through ``parallel.DEFAULT_RULES``. A dimension that
its mesh axes do not divide (e.g. the 30,522-row vocabulary on 4 tensor shards) is replicated on
that dimension instead: the choice keeps every real checkpoint loadable on any mesh. Activations get
sharding constraints (``batch``, ``length``, ``embed``/``heads``/``mlp``) only when a mesh is set
with ``jax.set_mesh``.

Loading (``load_bert``) reads ``model.safetensors`` with ``safetensors.numpy`` (no torch, no pickle)
and ``config.json``, maps every Hugging Face tensor name to its NNX parameter, and raises
``ValueError`` naming the tensor and file for a missing, unexpected or misshaped tensor. Ignored on
purpose: ``embeddings.position_ids`` (a buffer, always ``arange``) and ``pooler.*`` (the [CLS] tanh
pooler, which mean-pooled sentence embeddings do not use). A ``bert.`` prefix (``BertFor*``
checkpoints) is stripped.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from eagle_jax import parallel
from eagle_jax.models.mixed_matmul import mixed_dot_general
from eagle_jax.parallel import constrain

_GELU_EXACT = ("gelu",)
_GELU_TANH = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")
IGNORED_TENSORS = ("embeddings.position_ids", "pooler.dense.weight", "pooler.dense.bias")


@dataclasses.dataclass(frozen=True)
class BertConfig:
  """Shape and numerics of a BERT encoder (the fields of Hugging Face's ``config.json``).

  Attributes:
    vocab_size: rows of the word embedding.
    hidden_size: model width d; a multiple of ``num_attention_heads``.
    num_hidden_layers: number of transformer layers.
    num_attention_heads: heads H; head size is d / H.
    intermediate_size: MLP hidden width.
    max_position_embeddings: longest sequence the position table covers.
    type_vocab_size: rows of the token-type (segment) embedding.
    layer_norm_eps: LayerNorm epsilon.
    hidden_act: ``"gelu"`` (exact) or a tanh variant (``"gelu_new"``, ``"gelu_pytorch_tanh"``).
    pad_token_id: id of [PAD].
    dtype: compute dtype (float32 or bfloat16); softmax, LayerNorm statistics and pooling run in
      float32 regardless.
    param_dtype: parameter storage dtype.
    matmul_dtype: operand dtype of the dense layers' products in the forward and the backward
      pass, summed and returned in float32 (``mixed_matmul``; with ``dtype`` float32: mixed
      precision); None: ``dtype``, plain products.
  """

  vocab_size: int = 30522
  hidden_size: int = 384
  num_hidden_layers: int = 6
  num_attention_heads: int = 12
  intermediate_size: int = 1536
  max_position_embeddings: int = 512
  type_vocab_size: int = 2
  layer_norm_eps: float = 1e-12
  hidden_act: str = "gelu"
  pad_token_id: int = 0
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  matmul_dtype: Any = None

  def __post_init__(self):
    for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                 "intermediate_size", "max_position_embeddings", "type_vocab_size"):
      value = getattr(self, name)
      if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
        raise ValueError(f"BertConfig.{name} must be a positive integer, got {value!r}")
    if self.hidden_size % self.num_attention_heads:
      raise ValueError(
          f"BertConfig.hidden_size ({self.hidden_size}) must be a multiple of "
          f"num_attention_heads ({self.num_attention_heads})")
    if not (isinstance(self.layer_norm_eps, (int, float)) and self.layer_norm_eps > 0):
      raise ValueError(f"BertConfig.layer_norm_eps must be a positive number, got "
                       f"{self.layer_norm_eps!r}")
    if self.hidden_act not in _GELU_EXACT + _GELU_TANH:
      raise ValueError(f"BertConfig.hidden_act must be one of {_GELU_EXACT + _GELU_TANH}, got "
                       f"{self.hidden_act!r}")
    if not 0 <= self.pad_token_id < self.vocab_size:
      raise ValueError(f"BertConfig.pad_token_id must be in [0, vocab_size), got "
                       f"{self.pad_token_id!r}")
    for name in ("dtype", "param_dtype", "matmul_dtype"):
      if name == "matmul_dtype" and self.matmul_dtype is None:
        continue
      if jnp.dtype(getattr(self, name)) not in (jnp.float32, jnp.bfloat16, jnp.float16):
        raise ValueError(f"BertConfig.{name} must be float32, bfloat16 or float16, got "
                         f"{getattr(self, name)!r}")

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_attention_heads

  @classmethod
  def from_hf_dict(cls, d: Mapping[str, Any], *, source: str = "config", **overrides) -> BertConfig:
    """Builds a config from a Hugging Face ``config.json`` dict, validating the fields used.

    Args:
      d: the parsed ``config.json``.
      source: name used in error messages (e.g. the file path).
      **overrides: fields to set directly (``dtype``, ``param_dtype``, ...).

    Raises:
      ValueError: a missing or ill-typed field, a non-BERT model type, or a relative position
        embedding (not implemented).
    """
    if not isinstance(d, Mapping):
      raise ValueError(f"{source}: expected a JSON object, got {type(d).__name__}")
    model_type = d.get("model_type", "bert")
    if model_type != "bert":
      raise ValueError(f"{source}: model_type must be 'bert', got {model_type!r}")
    pos_type = d.get("position_embedding_type", "absolute")
    if pos_type != "absolute":
      raise ValueError(f"{source}: position_embedding_type must be 'absolute', got {pos_type!r}")
    required = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                "intermediate_size")
    missing = [k for k in required if k not in d]
    if missing:
      raise ValueError(f"{source}: missing required field(s) {missing}")
    fields = {f.name for f in dataclasses.fields(cls)} - {"dtype", "param_dtype", "matmul_dtype"}
    kwargs = {k: d[k] for k in fields if k in d}
    if kwargs.get("pad_token_id") is None:
      kwargs.pop("pad_token_id", None)
    kwargs.update(overrides)
    try:
      return cls(**kwargs)
    except ValueError as e:
      raise ValueError(f"{source}: {e}") from None

  @classmethod
  def from_json(cls, path: str | os.PathLike, **overrides) -> BertConfig:
    """Reads and validates a Hugging Face ``config.json``."""
    path = pathlib.Path(path)
    if not path.is_file():
      raise ValueError(f"config path {str(path)!r} is not a file")
    try:
      d = json.loads(path.read_text())
    except json.JSONDecodeError as e:
      raise ValueError(f"{path}: not valid JSON ({e})") from None
    return cls.from_hf_dict(d, source=str(path), **overrides)


def _meta(*axes: str | None) -> dict[str, Any]:
  return {"out_sharding": axes, "eager_sharding": False}


class BertEmbeddings(nnx.Module):
  """Word + position + token-type embeddings, then LayerNorm."""

  def __init__(self, cfg: BertConfig, *, rngs: nnx.Rngs):
    init = nnx.initializers.normal(0.02)
    kw = dict(param_dtype=cfg.param_dtype, embedding_init=init, rngs=rngs)
    self.word_embeddings = nnx.Embed(cfg.vocab_size, cfg.hidden_size,
                                     embedding_metadata=_meta("vocab", "embed"), **kw)
    self.position_embeddings = nnx.Embed(cfg.max_position_embeddings, cfg.hidden_size,
                                         embedding_metadata=_meta(None, "embed"), **kw)
    self.token_type_embeddings = nnx.Embed(cfg.type_vocab_size, cfg.hidden_size,
                                           embedding_metadata=_meta(None, "embed"), **kw)
    self.layer_norm = _layer_norm(cfg, rngs)

  def __call__(self, input_ids: jax.Array, token_type_ids: jax.Array) -> jax.Array:
    """``input_ids``, ``token_type_ids``: [B, T] int -> [B, T, d] float32."""
    t = input_ids.shape[-1]
    x = (self.word_embeddings.embedding[...][input_ids]
         + self.position_embeddings.embedding[...][:t][None]
         + self.token_type_embeddings.embedding[...][token_type_ids])
    return self.layer_norm(x.astype(jnp.float32))


def _layer_norm(cfg: BertConfig, rngs: nnx.Rngs) -> nnx.LayerNorm:
  return nnx.LayerNorm(cfg.hidden_size, epsilon=cfg.layer_norm_eps, use_fast_variance=False,
                       dtype=jnp.float32, param_dtype=cfg.param_dtype,
                       scale_metadata=_meta("embed"), bias_metadata=_meta("embed"), rngs=rngs)


def _dense(
    cfg: BertConfig, rngs: nnx.Rngs, in_f, out_f, axis, kernel_axes, bias_axes
) -> nnx.LinearGeneral:
  mixed = cfg.matmul_dtype is not None and jnp.dtype(cfg.matmul_dtype) != jnp.dtype(cfg.dtype)
  return nnx.LinearGeneral(in_f, out_f, axis=axis, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                           dot_general=mixed_dot_general(cfg.matmul_dtype) if mixed else None,
                           kernel_init=nnx.initializers.normal(0.02),
                           kernel_metadata=_meta(*kernel_axes), bias_metadata=_meta(*bias_axes),
                           rngs=rngs)


class BertLayer(nnx.Module):
  """One post-LN transformer layer: self-attention block, then GELU MLP block."""

  def __init__(self, cfg: BertConfig, *, rngs: nnx.Rngs):
    d, h, k = cfg.hidden_size, cfg.num_attention_heads, cfg.head_dim
    self.cfg = cfg
    qkv = lambda: _dense(cfg, rngs, d, (h, k), -1, ("embed", "heads", "kv"), ("heads", "kv"))
    self.query, self.key, self.value = qkv(), qkv(), qkv()
    self.attention_output = _dense(cfg, rngs, (h, k), d, (-2, -1), ("heads", "kv", "embed"),
                                   ("embed",))
    self.attention_norm = _layer_norm(cfg, rngs)
    self.intermediate = _dense(cfg, rngs, d, cfg.intermediate_size, -1, ("embed", "mlp"), ("mlp",))
    self.output = _dense(cfg, rngs, cfg.intermediate_size, d, -1, ("mlp", "embed"), ("embed",))
    self.output_norm = _layer_norm(cfg, rngs)

  def __call__(self, x: jax.Array, key_bias: jax.Array) -> jax.Array:
    """``x``: [B, T, d] float32, ``key_bias``: [B, 1, 1, T] float32 (0 or a large negative)."""
    cfg = self.cfg
    xc = x.astype(cfg.dtype)
    q = constrain(self.query(xc), ("batch", "length", "heads", "kv"))
    k = constrain(self.key(xc), ("batch", "length", "heads", "kv"))
    v = constrain(self.value(xc), ("batch", "length", "heads", "kv"))
    # softmax(q kᵀ / sqrt(d/H) + key_bias) v, logits and softmax in float32.
    ctx = jax.nn.dot_product_attention(q, k, v, bias=key_bias, implementation="xla")
    attn = self.attention_output(ctx).astype(jnp.float32)
    x = constrain(self.attention_norm(x + attn), ("batch", "length", "embed"))
    hidden = self.intermediate(x.astype(cfg.dtype))
    hidden = jax.nn.gelu(hidden, approximate=cfg.hidden_act in _GELU_TANH)
    hidden = constrain(hidden, ("batch", "length", "mlp"))
    out = self.output(hidden).astype(jnp.float32)
    return constrain(self.output_norm(x + out), ("batch", "length", "embed"))


class BertModel(nnx.Module):
  """BERT encoder: ``__call__`` returns the last hidden state, ``embed`` the sentence embedding."""

  def __init__(self, cfg: BertConfig, *, rngs: nnx.Rngs):
    self.config = cfg
    self.embeddings = BertEmbeddings(cfg, rngs=rngs)
    self.layers = nnx.List([BertLayer(cfg, rngs=rngs) for _ in range(cfg.num_hidden_layers)])

  def __call__(
      self,
      input_ids: jax.Array,
      attention_mask: jax.Array | None = None,
      token_type_ids: jax.Array | None = None,
  ) -> jax.Array:
    """Last hidden state.

    Args:
      input_ids: [B, T] int token ids, T <= max_position_embeddings.
      attention_mask: [B, T] int/bool, 1 for real tokens, 0 for padding (default all ones).
      token_type_ids: [B, T] int segment ids (default zeros).

    Returns:
      [B, T] -> [B, T, d] float32 hidden states after the last layer.
    """
    cfg = self.config
    if input_ids.ndim != 2:
      raise ValueError(f"input_ids must be [B, T], got shape {input_ids.shape}")
    if input_ids.shape[1] > cfg.max_position_embeddings:
      raise ValueError(f"input_ids length {input_ids.shape[1]} exceeds max_position_embeddings "
                       f"{cfg.max_position_embeddings}")
    for name, arr in (("attention_mask", attention_mask), ("token_type_ids", token_type_ids)):
      if arr is not None and arr.shape != input_ids.shape:
        raise ValueError(f"{name} must have the shape of input_ids {input_ids.shape}, got "
                         f"{arr.shape}")
    if attention_mask is None:
      attention_mask = jnp.ones(input_ids.shape, jnp.int32)
    if token_type_ids is None:
      token_type_ids = jnp.zeros(input_ids.shape, jnp.int32)
    input_ids = constrain(input_ids, ("batch", "length"))
    x = constrain(self.embeddings(input_ids, token_type_ids), ("batch", "length", "embed"))
    neg = jnp.finfo(jnp.float32).min
    key_bias = jnp.where(attention_mask.astype(bool), 0.0, neg)[:, None, None, :]
    for layer in self.layers:
      x = layer(x, key_bias)
    return x

  def embed(
      self,
      input_ids: jax.Array,
      attention_mask: jax.Array,
      token_type_ids: jax.Array | None = None,
  ) -> jax.Array:
    """Sentence embeddings: masked mean pool then L2 normalise; [B, T] -> [B, d] float32."""
    hidden = self(input_ids, attention_mask, token_type_ids)
    return l2_normalize(mean_pool(hidden, attention_mask))


def mean_pool(hidden: jax.Array, attention_mask: jax.Array) -> jax.Array:
  """Masked mean over tokens as sentence-transformers' ``Pooling(mean)``.

  Args:
    hidden: [B, T, d] float.
    attention_mask: [B, T] int/bool.

  Returns:
    [B, d] float32: Σ_t m_t h_t / max(Σ_t m_t, 1e-9).
  """
  m = attention_mask.astype(jnp.float32)[..., None]
  return (hidden.astype(jnp.float32) * m).sum(-2) / jnp.maximum(m.sum(-2), 1e-9)


def l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
  """``x / max(‖x‖₂, eps)`` over the last axis (torch ``F.normalize``); [..., d] -> [..., d]."""
  norm = jnp.sqrt(jnp.sum(jnp.square(x), axis=-1, keepdims=True))
  return x / jnp.maximum(norm, eps)


# ----------------------------------------------------------------------------------------------
# Loading Hugging Face safetensors

Path = tuple[str | int, ...]


def hf_param_map(cfg: BertConfig) -> dict[str, tuple[Path, tuple[int, ...], Callable]]:
  """Hugging Face tensor name -> (NNX parameter path, expected HF shape, HF -> NNX transform)."""
  d, h, k, f = cfg.hidden_size, cfg.num_attention_heads, cfg.head_dim, cfg.intermediate_size
  ident = lambda w: w
  mapping: dict[str, tuple[Path, tuple[int, ...], Callable]] = {
      "embeddings.word_embeddings.weight": (("embeddings", "word_embeddings", "embedding"),
                                            (cfg.vocab_size, d), ident),
      "embeddings.position_embeddings.weight": (
          ("embeddings", "position_embeddings", "embedding"), (cfg.max_position_embeddings, d),
          ident),
      "embeddings.token_type_embeddings.weight": (
          ("embeddings", "token_type_embeddings", "embedding"), (cfg.type_vocab_size, d), ident),
      "embeddings.LayerNorm.weight": (("embeddings", "layer_norm", "scale"), (d,), ident),
      "embeddings.LayerNorm.bias": (("embeddings", "layer_norm", "bias"), (d,), ident),
  }
  for i in range(cfg.num_hidden_layers):
    hf, nx = f"encoder.layer.{i}.", ("layers", i)
    for name in ("query", "key", "value"):
      mapping[f"{hf}attention.self.{name}.weight"] = (
          nx + (name, "kernel"), (d, d), lambda w: w.T.reshape(d, h, k))
      mapping[f"{hf}attention.self.{name}.bias"] = (
          nx + (name, "bias"), (d,), lambda b: b.reshape(h, k))
    mapping[f"{hf}attention.output.dense.weight"] = (
        nx + ("attention_output", "kernel"), (d, d), lambda w: w.T.reshape(h, k, d))
    mapping[f"{hf}attention.output.dense.bias"] = (nx + ("attention_output", "bias"), (d,), ident)
    mapping[f"{hf}attention.output.LayerNorm.weight"] = (
        nx + ("attention_norm", "scale"), (d,), ident)
    mapping[f"{hf}attention.output.LayerNorm.bias"] = (nx + ("attention_norm", "bias"), (d,), ident)
    mapping[f"{hf}intermediate.dense.weight"] = (nx + ("intermediate", "kernel"), (f, d),
                                                 lambda w: w.T)
    mapping[f"{hf}intermediate.dense.bias"] = (nx + ("intermediate", "bias"), (f,), ident)
    mapping[f"{hf}output.dense.weight"] = (nx + ("output", "kernel"), (d, f), lambda w: w.T)
    mapping[f"{hf}output.dense.bias"] = (nx + ("output", "bias"), (d,), ident)
    mapping[f"{hf}output.LayerNorm.weight"] = (nx + ("output_norm", "scale"), (d,), ident)
    mapping[f"{hf}output.LayerNorm.bias"] = (nx + ("output_norm", "bias"), (d,), ident)
  return mapping


def assign_hf_tensors(
    model: BertModel,
    tensors: Mapping[str, np.ndarray],
    *,
    source: str = "tensors",
    mesh: Mesh | None = None,
    rules: parallel.LogicalRules = parallel.DEFAULT_RULES,
) -> BertModel:
  """Writes Hugging Face-named tensors into ``model``'s parameters, checked key by key.

  Args:
    model: a ``BertModel`` (concrete or from ``nnx.eval_shape``); its parameters are replaced.
    tensors: HF name -> array (HF layout: linear weights are [out, in]).
    source: file name for error messages.
    mesh: if given, each parameter is placed with its logical sharding on this mesh.
    rules: logical axis rules for ``mesh``.

  Returns:
    ``model``, updated in place.

  Raises:
    ValueError: naming the tensor and ``source`` for a missing, unexpected or misshaped tensor, or
      a non-floating tensor.
  """
  cfg = model.config
  names = list(tensors)
  if names and all(n.startswith("bert.") for n in names if n not in IGNORED_TENSORS):
    tensors = {n.removeprefix("bert."): v for n, v in tensors.items()}
  mapping = hf_param_map(cfg)
  unexpected = sorted(n for n in tensors if n not in mapping and n not in IGNORED_TENSORS)
  if unexpected:
    raise ValueError(f"{source}: unexpected tensor(s) {unexpected[:5]}"
                     f"{' ...' if len(unexpected) > 5 else ''} (not part of a "
                     f"{cfg.num_hidden_layers}-layer BertModel)")
  missing = [n for n in mapping if n not in tensors]
  if missing:
    raise ValueError(f"{source}: missing tensor(s) {missing[:5]}"
                     f"{' ...' if len(missing) > 5 else ''}")
  params = {path: var for path, var in nnx.iter_graph(model) if isinstance(var, nnx.Param)}
  assigned = set()
  for name, (path, shape, transform) in mapping.items():
    value = tensors[name]
    if tuple(value.shape) != shape:
      raise ValueError(
          f"{source}: tensor {name!r} has shape {tuple(value.shape)}, expected {shape}")
    if not np.issubdtype(value.dtype, np.floating) and value.dtype.name != "bfloat16":
      raise ValueError(f"{source}: tensor {name!r} has dtype {value.dtype}, expected a float")
    var = params[path]
    new = np.asarray(transform(value)).astype(cfg.param_dtype)
    if new.shape != var.get_value().shape:
      raise ValueError(f"{source}: tensor {name!r} maps to shape {new.shape}, but parameter "
                       f"{'/'.join(map(str, path))} is {var.get_value().shape}")
    if mesh is not None:
      var.set_value(jax.device_put(new, parallel.variable_sharding(var, new.shape, mesh, rules)))
    else:
      var.set_value(jnp.asarray(new))
    assigned.add(path)
  left = sorted("/".join(map(str, p)) for p in set(params) - assigned)
  if left:
    raise ValueError(f"{source}: parameters without a tensor: {left}")
  return model


def load_bert(
    path: str | os.PathLike,
    *,
    config: BertConfig | None = None,
    mesh: Mesh | None = None,
    rules: parallel.LogicalRules = parallel.DEFAULT_RULES,
    dtype: Any = jnp.float32,
    matmul_dtype: Any = None,
) -> BertModel:
  """Loads a Hugging Face BERT checkpoint (safetensors) into a ``BertModel``.

  Args:
    path: a folder with ``config.json`` and ``model.safetensors``, or a ``.safetensors`` file (then
      ``config.json`` is looked for beside it unless ``config`` is given).
    config: overrides ``config.json``.
    mesh: place parameters on this mesh by their logical axes (default: the default device).
    rules: logical axis rules.
    dtype: compute dtype (parameters stay float32).
    matmul_dtype: operand dtype of the dense layers' products (``BertConfig.matmul_dtype``).

  Returns:
    The model with every parameter taken from the file.

  Raises:
    ValueError: a missing file, a bad ``config.json`` field, or a missing, unexpected or misshaped
      tensor (naming it and the file).
  """
  from eagle_jax.models.files import load_safetensors_file  # noqa: PLC0415

  path = pathlib.Path(path)
  weights = path / "model.safetensors" if path.is_dir() else path
  if not weights.is_file():
    raise ValueError(f"path {str(path)!r}: no safetensors file at {str(weights)!r}")
  if config is None:
    config = BertConfig.from_json(weights.parent / "config.json", dtype=dtype,
                                  matmul_dtype=matmul_dtype)
  tensors = load_safetensors_file(weights)
  model = nnx.eval_shape(lambda: BertModel(config, rngs=nnx.Rngs(0)))
  return assign_hf_tensors(model, tensors, source=str(weights), mesh=mesh, rules=rules)
