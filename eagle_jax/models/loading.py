"""Real decoder weights into the NNX ``Llama``: GGUF and Hugging Face safetensors, key-checked.

Both sources are first brought to the Hugging Face layout of ``LlamaForCausalLM`` or
``Gemma3ForCausalLM`` (``model.layers.N.self_attn.q_proj.weight`` as ``[out, in]`` arrays), then
mapped to our parameter names and shapes by one function (``hf_to_params``) and assigned with
``assign_checked``, which refuses a missing, unexpected or misshaped tensor and names it. The
config comes from ``configs.py`` (``config_from_hf`` / ``config_from_gguf``, re-exported here).

Per-block norms: Llama has ``input_layernorm`` (our ``attn_norm``) and
``post_attention_layernorm`` (our ``mlp_norm``, before the MLP). Gemma 3 has four:
``input_layernorm``, ``post_attention_layernorm`` (our ``post_attn_norm``, on the attention
output), ``pre_feedforward_layernorm`` (our ``mlp_norm``), ``post_feedforward_layernorm`` (our
``post_mlp_norm``), plus ``self_attn.q_norm``/``k_norm`` ``[head_dim]``.

GGUF (llama.cpp): tensors are read with ``gguf.GGUFReader`` and dequantised with
``gguf.quants.dequantize`` to float32; GGUF lists shapes fastest-axis first, so the numpy shape is
the reversed GGUF shape, which is exactly HF's ``[out, in]``. For ``llama`` files, llama.cpp's
converter permutes the rows of ``attn_q``/``attn_k`` per head from HF's rotate-half order to
interleaved pairs (``w.reshape(n, 2, d/2, in).swapaxes(1, 2)``); ``unpermute_rotary`` applies the
inverse. For ``gemma3`` files it does not permute (Gemma uses NeoX-style RoPE in llama.cpp), but
stores each RMSNorm weight as ``1 + w``; ``gguf_to_hf`` subtracts the 1.

safetensors: read with ``safetensors.numpy`` (no torch, no pickle), sharded checkpoints through
``model.safetensors.index.json``; the config from ``config.json``.

Sharding: the model is built abstractly (``nnx.eval_shape``), every array is placed with
``jax.device_put`` on a ``NamedSharding`` from its logical axes (``parallel.fit_spec``: a mesh axis
that does not divide a dimension is dropped for that dimension), then merged. No parameter is ever
materialised unsharded on one device when a mesh is given, and no random init is run.
"""

from __future__ import annotations

import pathlib
from collections.abc import Callable, Mapping

import gguf
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from eagle_jax import parallel
from eagle_jax.models import llama as llama_lib
from eagle_jax.models.configs import config_from_gguf, config_from_hf, gguf_field
from eagle_jax.models.files import (
    LoadingError,
    finite_weights,
    load_safetensors_file,
    open_gguf,
    read_json,
)

# Named precisions of a decoder that only decodes (the environment LLM): LlamaConfig fields.
PRECISIONS = {
    # Everything float32 (equals PyTorch's float32 forward up to reassociation).
    "float32": dict(dtype=jnp.float32, param_dtype=jnp.float32, matmul_dtype=None),
    # bfloat16 weights and activations (accelerators).
    "bfloat16": dict(dtype=jnp.bfloat16, param_dtype=jnp.bfloat16, matmul_dtype=None),
    # bfloat16 weights and matmul operands, float32 activations and accumulation (CPUs with bf16
    # units: AMX, AVX512-BF16; XLA:CPU runs bf16 elementwise ops slowly, bf16 matmuls fast).
    "mixed": dict(dtype=jnp.float32, param_dtype=jnp.bfloat16, matmul_dtype=jnp.bfloat16),
}


def precision_dtypes(precision: str, field: str = "precision") -> dict:
  """``LlamaConfig`` dtype fields of a named precision (``PRECISIONS``); ValueError naming
  ``field`` otherwise."""
  if precision not in PRECISIONS:
    raise ValueError(f"{field}: expected one of {sorted(PRECISIONS)}, got {precision!r}")
  return dict(PRECISIONS[precision])


# HF buffers that are not parameters (safe to ignore when present).
_IGNORED_HF_KEYS = ("rotary_emb.inv_freq",)


# ------------------------------------------------------------------------------------------------
# Generic key-checked assignment (reusable by any NNX model).
# ------------------------------------------------------------------------------------------------


def path_key(path: tuple) -> str:
  """Dotted name of an NNX state path, e.g. ``layers.0.attn.wq``."""
  return ".".join(str(p) for p in path)


def assign_checked(
    target: nnx.State,
    arrays: Mapping[str, np.ndarray],
    *,
    source: str,
    mesh: jax.sharding.Mesh | None = None,
    dtype: jnp.dtype | None = None,
) -> nnx.State:
  """Fills an (abstract) NNX state with ``arrays``, checking every key and shape.

  Args:
    target: state of the model (abstract ``ShapeDtypeStruct`` leaves from ``nnx.eval_shape`` or
      real arrays); only its paths, shapes, dtypes and logical-axis metadata are used.
    arrays: dotted path (``path_key``) -> array with the target's shape.
    source: checkpoint description used in error messages (e.g. the file path).
    mesh: if given, each array is placed with the sharding of its logical axes on ``mesh``.
    dtype: cast to this dtype (default: the target leaf's dtype).

  Returns:
    A new state with the same structure holding ``jax.Array`` values.

  Raises:
    LoadingError: a target key has no array, an array has no target key, or shapes differ.
  """
  flat = nnx.to_flat_state(target)
  expected = {path_key(p): v for p, v in flat}
  missing = sorted(set(expected) - set(arrays))
  unexpected = sorted(set(arrays) - set(expected))
  if missing:
    raise LoadingError(f"{source}: missing tensor(s) for {missing[:8]}"
                       f"{' ...' if len(missing) > 8 else ''} ({len(missing)} missing)")
  if unexpected:
    raise LoadingError(f"{source}: unexpected tensor(s) {unexpected[:8]}"
                       f"{' ...' if len(unexpected) > 8 else ''} ({len(unexpected)} unexpected)")
  new_leaves = []
  for path, var in flat:
    key = path_key(path)
    ref = var.get_value()
    arr = arrays[key]
    if tuple(arr.shape) != tuple(ref.shape):
      raise LoadingError(
          f"{source}: tensor {key!r} has shape {tuple(arr.shape)}, expected {tuple(ref.shape)}")
    arr = np.asarray(arr).astype(dtype or ref.dtype, copy=False)
    if mesh is not None:
      value = jax.device_put(arr, parallel.variable_sharding(var, arr.shape, mesh))
    else:
      value = jnp.asarray(arr)
    new_leaves.append((path, var.replace(value)))
  return nnx.from_flat_state(new_leaves)


def shard_model(model: nnx.Module, mesh: jax.sharding.Mesh) -> nnx.Module:
  """Places every variable of ``model`` on ``mesh`` by its logical axes (in place; returns it)."""
  return parallel.shard_module(model, mesh)


def init_sharded(config: llama_lib.LlamaConfig, mesh: jax.sharding.Mesh, seed: int = 0):
  """A randomly initialised ``Llama`` whose parameters are created directly sharded on ``mesh``."""
  abstract = nnx.eval_shape(lambda: llama_lib.Llama(config, rngs=nnx.Rngs(seed)))
  graphdef, abstract_state = nnx.split(abstract)
  flat = nnx.to_flat_state(abstract_state)
  shardings = []
  for _, var in flat:
    shape = var.get_value().shape
    shardings.append(parallel.variable_sharding(var, shape, mesh))

  def make():
    state = nnx.state(llama_lib.Llama(config, rngs=nnx.Rngs(seed)))
    return [v.get_value() for _, v in nnx.to_flat_state(state)]

  values = jax.jit(make, out_shardings=shardings)()
  state = nnx.from_flat_state([(p, v.replace(x)) for (p, v), x in zip(flat, values)])
  return nnx.merge(graphdef, state)


# ------------------------------------------------------------------------------------------------
# Hugging Face Llama layout -> our parameter names.
# ------------------------------------------------------------------------------------------------


def _hf_norm_names(config: llama_lib.LlamaConfig) -> dict[str, str]:
  """Our per-block norm names -> HF's (Llama's ``post_attention_layernorm`` is Gemma 3's
  ``pre_feedforward_layernorm``; Gemma 3's ``post_attention_layernorm`` is a post-norm)."""
  names = {"attn_norm.scale": "input_layernorm.weight"}
  if config.post_norms:
    names.update({"post_attn_norm.scale": "post_attention_layernorm.weight",
                  "mlp_norm.scale": "pre_feedforward_layernorm.weight",
                  "post_mlp_norm.scale": "post_feedforward_layernorm.weight"})
  else:
    names["mlp_norm.scale"] = "post_attention_layernorm.weight"
  if config.qk_norm:
    names.update({"attn.q_norm.scale": "self_attn.q_norm.weight",
                  "attn.k_norm.scale": "self_attn.k_norm.weight"})
  return names


def hf_to_params(
    hf: Mapping[str, np.ndarray], config: llama_lib.LlamaConfig, *, source: str
) -> dict[str, np.ndarray]:
  """Maps HF ``LlamaForCausalLM``/``Gemma3ForCausalLM`` tensors (``[out, in]``) to our names.

  Raises:
    LoadingError: a required HF tensor is missing, misshaped, or an HF tensor is not consumed.
  """
  c = config
  used: set[str] = set()

  def get(name: str, shape: tuple[int, ...]) -> np.ndarray:
    if name not in hf:
      raise LoadingError(f"{source}: missing tensor {name!r} (expected shape {shape})")
    arr = np.asarray(hf[name])
    if tuple(arr.shape) != shape:
      raise LoadingError(
          f"{source}: tensor {name!r} has shape {tuple(arr.shape)}, expected {shape}")
    used.add(name)
    return arr

  d, h, kvh, hd, f, v = c.hidden, c.heads, c.kv_heads, c.head_dim, c.intermediate, c.vocab_size
  out = {
      "embedder.embedding": get("model.embed_tokens.weight", (v, d)),
      "final_norm.scale": get("model.norm.weight", (d,)),
  }
  for i in range(c.layers):
    p = f"model.layers.{i}."
    o = f"layers.{i}."
    for ours, theirs in _hf_norm_names(c).items():
      out[o + ours] = get(p + theirs, (hd if ".q_norm" in ours or ".k_norm" in ours else d,))
    out[o + "attn.wq"] = get(p + "self_attn.q_proj.weight", (h * hd, d)).T.reshape(d, h, hd)
    out[o + "attn.wk"] = get(p + "self_attn.k_proj.weight", (kvh * hd, d)).T.reshape(d, kvh, hd)
    out[o + "attn.wv"] = get(p + "self_attn.v_proj.weight", (kvh * hd, d)).T.reshape(d, kvh, hd)
    out[o + "attn.wo"] = get(p + "self_attn.o_proj.weight", (d, h * hd)).T.reshape(h, hd, d)
    out[o + "mlp.w_gate"] = get(p + "mlp.gate_proj.weight", (f, d)).T
    out[o + "mlp.w_up"] = get(p + "mlp.up_proj.weight", (f, d)).T
    out[o + "mlp.w_down"] = get(p + "mlp.down_proj.weight", (d, f)).T
  if c.tie_embeddings:
    if "lm_head.weight" in hf:
      head = get("lm_head.weight", (v, d))
      if not np.array_equal(head, out["embedder.embedding"]):
        raise LoadingError(
            f"{source}: config ties embeddings but 'lm_head.weight' differs from "
            "'model.embed_tokens.weight'")
  else:
    out["lm_head"] = get("lm_head.weight", (v, d)).T
  extra = sorted(k for k in hf if k not in used and not k.endswith(_IGNORED_HF_KEYS))
  if extra:
    raise LoadingError(f"{source}: unexpected tensor(s) {extra[:8]} ({len(extra)} unexpected)")
  return out


def load_params(
    config: llama_lib.LlamaConfig,
    params: Mapping[str, np.ndarray],
    *,
    source: str,
    mesh: jax.sharding.Mesh | None = None,
) -> llama_lib.Llama:
  """Builds a ``Llama`` from dotted parameter arrays without running a random init."""
  abstract = nnx.eval_shape(lambda: llama_lib.Llama(config, rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(abstract)
  return nnx.merge(graphdef, assign_checked(state, params, source=source, mesh=mesh))


# ------------------------------------------------------------------------------------------------
# safetensors (Hugging Face layout).
# ------------------------------------------------------------------------------------------------


def read_safetensors_dir(path: str | pathlib.Path) -> dict[str, np.ndarray]:
  """All tensors of ``model.safetensors`` (or an index of shards) in ``path``."""
  path = pathlib.Path(path)
  single = path / "model.safetensors"
  index = path / "model.safetensors.index.json"
  if single.is_file():
    return load_safetensors_file(single)
  if index.is_file():
    weight_map = read_json(index).get("weight_map")
    if not isinstance(weight_map, dict):
      raise LoadingError(f"{index}: missing the 'weight_map' object")
    out: dict[str, np.ndarray] = {}
    for name in sorted(set(weight_map.values())):
      out.update(load_safetensors_file(path / name))
    return out
  raise LoadingError(f"{path}: expected model.safetensors or model.safetensors.index.json")


def load_llama_safetensors(
    path: str | pathlib.Path,
    *,
    dtype: jnp.dtype = jnp.float32,
    param_dtype: jnp.dtype = jnp.float32,
    matmul_dtype: jnp.dtype | None = None,
    mesh: jax.sharding.Mesh | None = None,
) -> tuple[llama_lib.LlamaConfig, llama_lib.Llama]:
  """Loads a Hugging Face Llama checkpoint folder (``config.json`` + safetensors); the dtypes are
  ``LlamaConfig``'s fields of those names."""
  path = pathlib.Path(path)
  cfg_file = path / "config.json"
  if not cfg_file.is_file():
    raise LoadingError(f"{path}: no config.json")
  try:
    config = config_from_hf(read_json(cfg_file), dtype=dtype, param_dtype=param_dtype,
                            matmul_dtype=matmul_dtype)
  except LoadingError as e:
    raise LoadingError(f"{path}/{e}" if str(e).startswith("config.json") else str(e)) from None
  hf = read_safetensors_dir(path)
  params = hf_to_params(hf, config, source=str(path))
  return config, load_params(config, params, source=str(path), mesh=mesh)


# ------------------------------------------------------------------------------------------------
# GGUF (llama.cpp).
# ------------------------------------------------------------------------------------------------


def unpermute_rotary(w: np.ndarray, n_heads: int) -> np.ndarray:
  """Undoes llama.cpp's q/k row permutation.

  Args:
    w: [n_heads * d, in] rows in llama.cpp's interleaved rotary order.
    n_heads: heads of this projection (query heads for q, kv heads for k).

  Returns:
    [n_heads * d, in] rows in Hugging Face's rotate-half order.
  """
  if w.shape[0] % (2 * n_heads):
    raise LoadingError(f"unpermute_rotary: {w.shape[0]} rows not divisible by 2*{n_heads}")
  half = w.shape[0] // n_heads // 2
  return w.reshape(n_heads, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


_GGUF_TO_HF = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_GEMMA3_GGUF_TO_HF = {
    **_GGUF_TO_HF,
    "ffn_norm.weight": "pre_feedforward_layernorm.weight",
    "post_attention_norm.weight": "post_attention_layernorm.weight",
    "post_ffw_norm.weight": "post_feedforward_layernorm.weight",
    "attn_q_norm.weight": "self_attn.q_norm.weight",
    "attn_k_norm.weight": "self_attn.k_norm.weight",
}


def gguf_to_hf(
    path: str | pathlib.Path,
) -> tuple[llama_lib.LlamaConfig, dict[str, np.ndarray]]:
  """Reads a ``llama`` or ``gemma3`` GGUF as a config and float32 HF-layout tensors.

  llama.cpp's converter stores every Gemma RMSNorm weight as ``1 + w`` (llama.cpp multiplies by
  the stored weight) and leaves Gemma's q/k rows in rotate-half order (NeoX RoPE), so for
  ``gemma3`` the norms get ``- 1`` and q/k are not un-permuted.

  Raises:
    LoadingError: unsupported architecture, missing metadata, or a tensor name that has no HF
      counterpart.
  """
  path = pathlib.Path(path)
  reader = open_gguf(path)
  try:
    config = config_from_gguf(reader)
  except LoadingError as e:
    raise LoadingError(f"{path}: {e}") from None
  gemma = gguf_field(reader, "general.architecture") == "gemma3"
  names = _GEMMA3_GGUF_TO_HF if gemma else _GGUF_TO_HF
  hf: dict[str, np.ndarray] = {}
  for t in reader.tensors:
    try:
      arr = gguf.quants.dequantize(t.data, t.tensor_type)
    except NotImplementedError:
      raise LoadingError(f"{path}: tensor {t.name!r} has quantisation {t.tensor_type.name}, "
                         "which gguf cannot dequantise") from None
    arr = finite_weights(arr.astype(np.float32, copy=False), f"{path}: tensor {t.name!r}")
    arr = arr.reshape([int(x) for x in reversed(t.shape.tolist())])
    name = t.name
    if gemma and name.endswith("norm.weight"):
      arr = arr - np.float32(1.0)
    if name == "token_embd.weight":
      hf["model.embed_tokens.weight"] = arr
    elif name == "output_norm.weight":
      hf["model.norm.weight"] = arr
    elif name == "output.weight":
      hf["lm_head.weight"] = arr
    elif name.startswith("blk."):
      _, layer, rest = name.split(".", 2)
      if rest not in names:
        raise LoadingError(f"{path}: GGUF tensor {name!r} has no Hugging Face counterpart")
      if rest == "attn_q.weight" and not gemma:
        arr = unpermute_rotary(arr, config.heads)
      elif rest == "attn_k.weight" and not gemma:
        arr = unpermute_rotary(arr, config.kv_heads)
      hf[f"model.layers.{layer}.{names[rest]}"] = arr
    elif name == "rope_freqs.weight":
      raise LoadingError(f"{path}: GGUF tensor 'rope_freqs.weight' (scaled RoPE) is unsupported")
    else:
      raise LoadingError(f"{path}: unexpected GGUF tensor {name!r}")
  return config, hf


def load_llama_gguf(
    path: str | pathlib.Path,
    *,
    dtype: jnp.dtype = jnp.float32,
    param_dtype: jnp.dtype = jnp.float32,
    matmul_dtype: jnp.dtype | None = None,
    mesh: jax.sharding.Mesh | None = None,
) -> tuple[llama_lib.LlamaConfig, llama_lib.Llama]:
  """Loads a ``llama`` or ``gemma3`` GGUF (dequantised) into a ``Llama``.

  Args:
    path: the ``.gguf`` file.
    dtype: compute dtype.
    param_dtype: storage dtype of the dequantised weights.
    matmul_dtype: operand dtype of the weight matmuls (``LlamaConfig.matmul_dtype``).
    mesh: optional mesh to create the parameters sharded on.

  Returns:
    (config, model).
  """
  config, hf = gguf_to_hf(path)
  config = config.replace(dtype=dtype, param_dtype=param_dtype, matmul_dtype=matmul_dtype)
  params = hf_to_params(hf, config, source=str(path))
  del hf
  return config, load_params(config, params, source=str(path), mesh=mesh)


def params_to_hf(model: llama_lib.Llama) -> dict[str, np.ndarray]:
  """Inverse of ``hf_to_params``: our parameters as HF ``LlamaForCausalLM`` (or
  ``Gemma3ForCausalLM``) float32 tensors."""
  c = model.config
  d, h, kvh, hd = c.hidden, c.heads, c.kv_heads, c.head_dim
  to_np: Callable = lambda v: np.asarray(v[...], dtype=np.float32)
  out = {
      "model.embed_tokens.weight": to_np(model.embedder.embedding),
      "model.norm.weight": to_np(model.final_norm.scale),
  }
  state = {path_key(k): v for k, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
  for i, blk in enumerate(model.layers):
    p = f"model.layers.{i}."
    for ours, theirs in _hf_norm_names(c).items():
      out[p + theirs] = np.asarray(state[f"layers.{i}.{ours}"].get_value(), dtype=np.float32)
    out[p + "self_attn.q_proj.weight"] = to_np(blk.attn.wq).reshape(d, h * hd).T
    out[p + "self_attn.k_proj.weight"] = to_np(blk.attn.wk).reshape(d, kvh * hd).T
    out[p + "self_attn.v_proj.weight"] = to_np(blk.attn.wv).reshape(d, kvh * hd).T
    out[p + "self_attn.o_proj.weight"] = to_np(blk.attn.wo).reshape(h * hd, d).T
    out[p + "mlp.gate_proj.weight"] = to_np(blk.mlp.w_gate).T
    out[p + "mlp.up_proj.weight"] = to_np(blk.mlp.w_up).T
    out[p + "mlp.down_proj.weight"] = to_np(blk.mlp.w_down).T
  out["lm_head.weight"] = (out["model.embed_tokens.weight"] if c.tie_embeddings
                           else to_np(model.lm_head).T)
  return out
