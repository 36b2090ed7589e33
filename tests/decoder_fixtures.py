"""Shared helpers for the decoder tests: tiny PyTorch reference models and the real SmolLM2 loader.

The tiny models are Hugging Face ``LlamaForCausalLM`` / ``GemmaForCausalLM`` with random weights
from a fixed torch seed, saved with ``save_pretrained`` (safetensors): the independent reference for
logits. The real SmolLM2 model is loaded once per test session (``functools.cache``) because its
GGUF dequantisation takes seconds.
"""

from __future__ import annotations

import functools
import pathlib

import numpy as np
import torch
import transformers

from eagle_jax import assets
from eagle_jax.models import loading
from eagle_jax.models.tokenizer import Tokenizer

TINY_LLAMA = dict(
    vocab_size=97, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
    num_attention_heads=6, num_key_value_heads=2, rope_theta=5000.0, rms_norm_eps=1e-5,
    max_position_embeddings=256)


def make_torch_llama(tie: bool = False, seed: int = 0, **overrides):
  """A random-weight PyTorch LlamaForCausalLM (weights scaled up so logits are well spread)."""
  torch.manual_seed(seed)
  cfg = transformers.LlamaConfig(**{**TINY_LLAMA, "tie_word_embeddings": tie, **overrides})
  model = transformers.LlamaForCausalLM(cfg).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "norm" in name:
        p.copy_(1.0 + 0.2 * torch.randn_like(p))
      else:
        p.normal_(0.0, 0.15)
  return model


def save_torch(model, directory: pathlib.Path) -> pathlib.Path:
  model.save_pretrained(str(directory), safe_serialization=True)
  return directory


def torch_logits(model, tokens: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
  """Reference logits [B, T, V] (left padding: positions count real tokens, as in generate)."""
  ids = torch.tensor(np.asarray(tokens), dtype=torch.long)
  kwargs = {}
  if mask is not None:
    m = torch.tensor(np.asarray(mask), dtype=torch.long)
    kwargs = dict(attention_mask=m, position_ids=(m.cumsum(-1) - 1).clamp(min=0))
  with torch.no_grad():
    return model(ids, **kwargs).logits.float().numpy()


def cached_chunk_logits(model, config, tokens: np.ndarray, mask: np.ndarray,
                        cuts=((0, 6), (6, 7), (7, 8), (8, 14)), length: int = 20,
                        dtype=None):
  """Logits of ``tokens`` [B, T] fed through the KV cache (stored in ``dtype``, None: the
  default) in the chunks ``cuts``, and the cache."""
  import jax.numpy as jnp  # noqa: PLC0415

  from eagle_jax.models import llama  # noqa: PLC0415

  cache = llama.KVCache.init(config, batch=tokens.shape[0], length=length, dtype=dtype)
  pieces = []
  for start, stop in cuts:
    logits, cache = model(jnp.asarray(tokens[:, start:stop]),
                          attention_mask=jnp.asarray(mask[:, start:stop]), cache=cache)
    pieces.append(np.asarray(logits))
  return np.concatenate(pieces, axis=1), cache


def gguf_writer(path, arch: str, c, rope_theta: float):
  """A ``gguf.GGUFWriter`` with the metadata every decoder GGUF carries, from HF config ``c``."""
  import gguf  # noqa: PLC0415

  w = gguf.GGUFWriter(str(path), arch=arch)
  w.add_block_count(c.num_hidden_layers)
  w.add_context_length(c.max_position_embeddings)
  w.add_embedding_length(c.hidden_size)
  w.add_feed_forward_length(c.intermediate_size)
  w.add_head_count(c.num_attention_heads)
  w.add_head_count_kv(c.num_key_value_heads)
  w.add_rope_freq_base(float(rope_theta))
  w.add_layer_norm_rms_eps(c.rms_norm_eps)
  return w


def close_gguf(w, path):
  """Writes header, metadata and tensors of ``w``; returns ``path``."""
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  return path


@functools.cache
def smollm2():
  """(config, model, tokenizer) of the real SmolLM2-135M-Instruct, float32."""
  path = assets.smollm2_gguf()
  config, model = loading.load_llama_gguf(path)
  return config, model, Tokenizer.from_gguf(path)


@functools.cache
def smollm2_sampler():
  from eagle_jax.models import sampling

  _, model, tok = smollm2()
  return sampling.Sampler(model, tok)


def tiny_agent_decoder(directory: pathlib.Path) -> pathlib.Path:
  """A safetensors folder of a tiny random Llama over SmolLM2's vocabulary, with SmolLM2's
  ``tokenizer.json``: a language-model agent that reads the real prompts in milliseconds."""
  from eagle_jax.models.tokenizer import backend_from_gguf  # noqa: PLC0415

  backend, _ = backend_from_gguf(assets.smollm2_gguf())
  model = make_torch_llama(seed=7, vocab_size=backend.get_vocab_size(with_added_tokens=True),
                           hidden_size=32, intermediate_size=48, num_attention_heads=4,
                           num_key_value_heads=2, max_position_embeddings=512)
  save_torch(model, directory)
  backend.save(str(directory / "tokenizer.json"))
  return directory


PEFT_TARGETS = {"q_proj": ("attn", "wq"), "k_proj": ("attn", "wk"), "v_proj": ("attn", "wv"),
                "o_proj": ("attn", "wo"), "gate_proj": ("mlp", "w_gate"),
                "up_proj": ("mlp", "w_up"), "down_proj": ("mlp", "w_down")}


def peft_lora(tmodel, backbone: dict, rank: int, alpha: float):
  """A peft LoRA of the torch Llama ``tmodel`` whose A/B equal the qwix adapters in ``backbone``
  (the ``Llama``'s trainable pure dict): ``W + B A * alpha / r`` on every projection."""
  import peft  # noqa: PLC0415

  pm = peft.get_peft_model(tmodel, peft.LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0,
                                                   target_modules=list(PEFT_TARGETS)))
  with torch.no_grad():
    for name, mod in pm.named_modules():
      if not hasattr(mod, "lora_A") or "default" not in mod.lora_A:
        continue
      parts = name.split(".")
      block, w = PEFT_TARGETS[parts[-1]]
      layer = backbone["layers"][int(parts[parts.index("layers") + 1])][block]
      a = np.asarray(layer[f"{w}_lora_a"]).reshape(-1, rank)  # [in, r] (o_proj: [H*hd, r])
      b = np.asarray(layer[f"{w}_lora_b"]).reshape(rank, -1)  # [r, out]
      mod.lora_A["default"].weight.copy_(torch.tensor(a.T))
      mod.lora_B["default"].weight.copy_(torch.tensor(b.T))
  return pm.eval()
