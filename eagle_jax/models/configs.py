"""``LlamaConfig`` from checkpoint metadata: Hugging Face ``config.json`` dicts and GGUF fields.

Supported families, all one decoder (``llama.py``) with switches:

* ``llama`` (Llama, SmolLM2): the defaults.
* ``gemma`` (v1): embeddings scaled by sqrt(hidden), RMSNorm with ``1 + w``, GeGLU (tanh GELU),
  tied embeddings, free ``head_dim``.
* ``gemma3_text`` (or a multimodal ``gemma3`` config's ``text_config``): Gemma 1's switches plus
  QK-norm, four norms per block, interleaved sliding-window / global layers (``layer_types``, or
  every ``sliding_window_pattern``-th layer global), a RoPE base per layer kind
  (``rope_local_base_freq`` / ``rope_theta``, or the per-kind ``rope_parameters`` that
  transformers 5 writes), linear RoPE scaling on the global layers, and
  ``query_scale = query_pre_attn_scalar ** -0.5``.

GGUF (llama.cpp): ``general.architecture`` ``llama`` reads ``llama.*``; ``gemma3`` reads
``gemma3.*`` and adds what llama.cpp hard-codes for that architecture: local RoPE base 10000,
layer ``i`` global iff ``(i + 1) % 6 == 0``, no RoPE scaling on local layers, and attention scale
``1 / sqrt(head_dim)`` except for the 62-layer 27B (``1 / sqrt(hidden / heads)``). The vocabulary
size is the row count of ``token_embd``; a missing ``output.weight`` means tied embeddings.

``PRESETS``: the ``config.json`` fields of published decoders by name, so an AOT dry run of a
paper-scale config has the real shapes without the files (``preset``).
"""

from __future__ import annotations

from collections.abc import Mapping

import gguf
import jax.numpy as jnp

from eagle_jax.models import attention
from eagle_jax.models import llama as llama_lib
from eagle_jax.models.files import LoadingError

_ACTS = {"silu": "silu", "gelu_pytorch_tanh": "gelu_tanh"}
GEMMA3_LOCAL_THETA = 10000.0  # llama.cpp's hard-coded local RoPE base for gemma3
GEMMA3_PATTERN = 6  # llama.cpp / HF default: every 6th layer is global


def _rope(cfg: Mapping, kind: str | None) -> tuple[float | None, float]:
  """(theta or None, linear factor) of one layer kind from ``rope_parameters``/``rope_scaling``.

  ``kind`` is None for single-kind models; Gemma 3 nests ``rope_parameters`` per layer kind.
  """
  params = cfg.get("rope_parameters") or {}
  if kind is not None and isinstance(params.get(kind), Mapping):
    params = params[kind]
  elif kind == attention.SLIDING:
    params = {}  # legacy Gemma 3 configs: rope_local_base_freq, unscaled
  elif cfg.get("rope_scaling"):
    params = {**params, **cfg["rope_scaling"]}
  rope_type = params.get("rope_type", params.get("type"))
  if rope_type in (None, "default", "llama3"):  # llama3: read by ``_llama3_rope``
    factor = 1.0
  elif rope_type == "linear" and kind is not None:
    factor = float(params["factor"])
  else:
    raise LoadingError(f"config.json: rope scaling type {rope_type!r} is not supported")
  theta = params.get("rope_theta")
  return (None if theta is None else float(theta)), factor


def _llama3_rope(cfg: Mapping) -> tuple[float, float, float, int] | None:
  """Llama 3's RoPE scaling from ``rope_scaling`` (``rope_type="llama3"``), or None."""
  params = cfg.get("rope_scaling") or cfg.get("rope_parameters") or {}
  if params.get("rope_type", params.get("type")) != "llama3":
    return None
  try:
    out = (float(params["factor"]), float(params["low_freq_factor"]),
           float(params["high_freq_factor"]), int(params["original_max_position_embeddings"]))
  except (KeyError, TypeError, ValueError) as e:
    raise LoadingError(f"config.json: rope_scaling of type 'llama3' needs factor, "
                       f"low_freq_factor, high_freq_factor and original_max_position_embeddings "
                       f"({e!r})") from None
  if not (out[0] >= 1 and 0 < out[1] < out[2] and out[3] > 0):
    raise LoadingError(f"config.json: rope_scaling llama3 {params}: expected factor >= 1, "
                       "0 < low_freq_factor < high_freq_factor, original_max_position_embeddings > 0")
  return out


def config_from_hf(cfg: Mapping, **overrides) -> llama_lib.LlamaConfig:
  """``LlamaConfig`` from a Hugging Face ``config.json`` dict (see the module docstring)."""
  arch = cfg.get("model_type", "llama")
  if arch == "gemma3":
    if not isinstance(cfg.get("text_config"), Mapping):
      raise LoadingError("config.json: model_type 'gemma3' without a 'text_config' object")
    return config_from_hf({"model_type": "gemma3_text", **cfg["text_config"]}, **overrides)

  def need(key):
    if key not in cfg:
      raise LoadingError(f"config.json: missing field {key!r}")
    return cfg[key]

  supported = ("llama", "gemma", "gemma3_text")
  if arch not in supported:
    raise LoadingError(
        f"config.json: model_type {arch!r} is not supported; expected one of {supported}")
  heads = int(need("num_attention_heads"))
  hidden = int(need("hidden_size"))
  layers = int(need("num_hidden_layers"))
  for flag in ("attention_bias", "mlp_bias", "attn_logit_softcapping",
               "use_bidirectional_attention"):
    if cfg.get(flag):
      raise LoadingError(f"config.json: {flag}={cfg[flag]!r} is not supported")
  gemma, gemma3 = arch in ("gemma", "gemma3_text"), arch == "gemma3_text"
  act = cfg.get("hidden_activation") or cfg.get("hidden_act") or "silu"
  if act not in _ACTS:
    raise LoadingError(f"config.json: activation {act!r}; expected one of {sorted(_ACTS)}")
  theta, factor = _rope(cfg, attention.FULL if gemma3 else None)
  theta = theta if theta is not None else float(cfg.get("rope_theta", 1e6 if gemma3 else 1e4))
  kwargs = dict(
      vocab_size=int(need("vocab_size")),
      hidden=hidden,
      intermediate=int(need("intermediate_size")),
      layers=layers,
      heads=heads,
      kv_heads=int(cfg.get("num_key_value_heads") or heads),
      head_dim=int(cfg.get("head_dim") or hidden // heads),
      rope_theta=theta,
      rms_eps=float(cfg.get("rms_norm_eps", 1e-6)),
      tie_embeddings=bool(cfg.get("tie_word_embeddings", gemma)),
      max_len=int(cfg.get("max_position_embeddings", 2048)),
      scale_embeddings=gemma,
      norm_offset=1.0 if gemma else 0.0,
      activation=_ACTS[act],
      final_logit_softcap=cfg.get("final_logit_softcapping"),
      rope_llama3=None if gemma3 else _llama3_rope(cfg),
  )
  if gemma3:
    local, _ = _rope(cfg, attention.SLIDING)
    pattern = int(cfg.get("sliding_window_pattern") or cfg.get("_sliding_window_pattern")
                  or GEMMA3_PATTERN)
    kwargs.update(
        qk_norm=True,
        post_norms=True,
        layer_types=tuple(cfg.get("layer_types") or attention.gemma3_layer_types(layers, pattern)),
        sliding_window=int(need("sliding_window")),
        rope_local_theta=local if local is not None else float(
            cfg.get("rope_local_base_freq", GEMMA3_LOCAL_THETA)),
        rope_scaling=factor,
        query_scale=float(cfg.get("query_pre_attn_scalar", 256)) ** -0.5,
    )
  kwargs.update(overrides)
  try:
    return llama_lib.LlamaConfig(**kwargs)
  except ValueError as e:
    raise LoadingError(f"config.json: {e}") from None


# Shapes of published decoders: the fields of their Hugging Face ``config.json`` (for dry runs:
# shapes, shardings, memory; real runs read the folder's own config.json).
_LLAMA32_ROPE = dict(rope_type="llama3", factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
                     original_max_position_embeddings=8192)
PRESETS: dict[str, dict] = {
    "llama-3.2-1b": dict(
        model_type="llama", vocab_size=128256, hidden_size=2048, intermediate_size=8192,
        num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8, head_dim=64,
        rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=True,
        max_position_embeddings=131072, rope_scaling=_LLAMA32_ROPE, torch_dtype="bfloat16"),
    "llama-3.2-3b": dict(
        model_type="llama", vocab_size=128256, hidden_size=3072, intermediate_size=8192,
        num_hidden_layers=28, num_attention_heads=24, num_key_value_heads=8, head_dim=128,
        rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=True,
        max_position_embeddings=131072, rope_scaling=_LLAMA32_ROPE, torch_dtype="bfloat16"),
}


def preset(name: str, **overrides) -> llama_lib.LlamaConfig:
  """``LlamaConfig`` of the published decoder ``name`` (``PRESETS``), parameters stored in the
  checkpoint's ``torch_dtype``; ``overrides`` set ``LlamaConfig`` fields."""
  if name not in PRESETS:
    raise LoadingError(
        f"decoder shapes {name!r}: unknown preset; expected one of {sorted(PRESETS)}")
  fields = PRESETS[name]
  dtype = jnp.dtype(fields.get("torch_dtype", "float32"))
  return config_from_hf(fields, **{"param_dtype": dtype, **overrides})


def gguf_field(reader: gguf.GGUFReader, key: str, default=None):
  """A GGUF metadata value; ``LoadingError`` naming ``key`` when it is missing and no default."""
  field = reader.fields.get(key)
  if field is None:
    if default is None:
      raise LoadingError(f"GGUF metadata: missing field {key!r}")
    return default
  return field.contents()


GGUF_ARCHITECTURES = ("llama", "gemma3")


def config_from_gguf(reader: gguf.GGUFReader, **overrides) -> llama_lib.LlamaConfig:
  """``LlamaConfig`` from ``llama.*`` or ``gemma3.*`` GGUF metadata (see the module docstring)."""
  arch = gguf_field(reader, "general.architecture")
  if arch not in GGUF_ARCHITECTURES:
    raise LoadingError(f"GGUF general.architecture is {arch!r}; supported: {GGUF_ARCHITECTURES}")
  f = lambda key, default=None: gguf_field(reader, f"{arch}.{key}", default)  # noqa: E731
  names = {t.name for t in reader.tensors}
  hidden = int(f("embedding_length"))
  heads = int(f("attention.head_count"))
  layers = int(f("block_count"))
  embd = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
  if embd is None:
    raise LoadingError("GGUF: missing tensor 'token_embd.weight'")
  kwargs = dict(
      vocab_size=int(embd.shape[-1]),  # GGUF shapes are [in, out]: [hidden, vocab]
      hidden=hidden,
      intermediate=int(f("feed_forward_length")),
      layers=layers,
      heads=heads,
      kv_heads=int(f("attention.head_count_kv", heads)),
      rms_eps=float(f("attention.layer_norm_rms_epsilon")),
      tie_embeddings="output.weight" not in names,
      max_len=int(f("context_length", 2048)),
  )
  if arch == "llama":
    kwargs.update(head_dim=int(f("rope.dimension_count", hidden // heads)),
                  rope_theta=float(f("rope.freq_base", 10000.0)))
  else:
    head_dim = int(f("attention.key_length"))
    scaling = f("rope.scaling.type", "none")
    if scaling not in ("none", "linear"):
      raise LoadingError(f"GGUF metadata: gemma3.rope.scaling.type {scaling!r} is not supported")
    kwargs.update(
        head_dim=head_dim,
        rope_theta=float(f("rope.freq_base", 1e6)),
        scale_embeddings=True,
        norm_offset=1.0,
        activation="gelu_tanh",
        qk_norm=True,
        post_norms=True,
        layer_types=attention.gemma3_layer_types(layers, GEMMA3_PATTERN),
        sliding_window=int(f("attention.sliding_window")),
        rope_local_theta=GEMMA3_LOCAL_THETA,
        rope_scaling=float(f("rope.scaling.factor", 1.0)) if scaling == "linear" else 1.0,
        query_scale=(hidden / heads) ** -0.5 if layers == 62 else head_dim**-0.5,
    )
  kwargs.update(overrides)
  try:
    return llama_lib.LlamaConfig(**kwargs)
  except ValueError as e:
    raise LoadingError(f"GGUF metadata: {e}") from None
