"""The ELM model: adapter E_A and decoder as functional models, and the ``ELM`` decoder wrapper.

``build_parts`` creates the static pieces (tokenizer, ``training.FunctionalModel`` of the adapter
and of the decoder, mesh) and the decoder's parameters, placed sharded: a pretrained GGUF
(``decoder.kind == "gguf"``) or a random initialisation of ``decoder.random`` (tests).
``input_embeddings`` is the ELM's input layer ``(E_0 x E_A)``: the decoder's token embeddings with
the adapter's soft tokens at the placeholder positions; the train step and ``ELM`` share it.
``ELM`` decodes domain embeddings (and text-only prompts) with the KV-cache sampler.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from eagle_jax import training
from eagle_jax.elm import adapter as adapter_lib
from eagle_jax.elm import tasks as tasks_lib
from eagle_jax.models import llama as llama_lib
from eagle_jax.models import sampling as sampling_lib
from eagle_jax.models.tokenizer import Tokenizer

ConfigError = training.ConfigError


@dataclasses.dataclass
class Parts:
  """The static pieces of an ELM: tokenizer, functional adapter and decoder, mesh.

  Attributes:
    tokenizer: the decoder's tokenizer.
    decoder_config: ``LlamaConfig``.
    adapter_fm, decoder_fm: ``training.FunctionalModel`` of the adapter and the decoder.
    mesh: the mesh everything is placed on.
    placeholder_id: token id written at soft positions (``<|endoftext|>`` when present, else 0).
    n_tokens: soft tokens per embedding (the adapter's ``n_tokens``).
  """

  tokenizer: Tokenizer
  decoder_config: llama_lib.LlamaConfig
  adapter_fm: training.FunctionalModel
  decoder_fm: training.FunctionalModel
  mesh: jax.sharding.Mesh
  placeholder_id: int
  n_tokens: int = 1
  # The adapter's initial parameters, created once (``FunctionalModel.init`` compiles per call).
  _adapter0: Any = dataclasses.field(default=None, repr=False)

  def adapter_init(self):
    """Fresh adapter parameters: a copy of the initial ones (train states are donated)."""
    if self._adapter0 is None:
      self._adapter0 = self.adapter_fm.init()
    return jax.tree.map(jnp.copy, self._adapter0)


def _gguf_path(decoder_config) -> str:
  from eagle_jax import assets  # noqa: PLC0415 (fetches on first use)

  return decoder_config.gguf or str(assets.smollm2_gguf())


def build_parts(decoder_config, adapter_config, mesh: jax.sharding.Mesh, in_dim: int,
                tokenizer: Tokenizer | None = None) -> tuple[Parts, Any]:
  """Tokenizer, functional adapter and decoder, and the decoder's parameters (placed sharded).

  Args:
    decoder_config: ``config.decoder`` (``kind``, ``gguf``, ``random``).
    adapter_config: ``config.adapter`` (``hidden``, ``n_tokens``, ``out_scale``, ``seed``).
    mesh: where the parameters live.
    in_dim: d, width of the domain vectors.
    tokenizer: overrides the GGUF's tokenizer (tests).

  Returns:
    ``(parts, decoder_params)``; ``decoder_params`` is a pure-dict pytree.
  """
  from eagle_jax.models import loading  # noqa: PLC0415 (gguf reader)

  path = _gguf_path(decoder_config)
  if not os.path.exists(path):
    raise ConfigError(f"config.decoder.gguf: {path!r} does not exist")
  tokenizer = tokenizer or Tokenizer.from_gguf(path)
  if decoder_config.kind == "gguf":
    dcfg, model = loading.load_llama_gguf(path, mesh=mesh)
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    del model
  else:
    r = decoder_config.random
    try:
      dcfg = llama_lib.LlamaConfig(
          vocab_size=int(r.get("vocab_size", 0)) or tokenizer.vocab_size, hidden=r.hidden,
          intermediate=r.intermediate, layers=r.layers, heads=r.heads, kv_heads=r.kv_heads,
          head_dim=r.head_dim)
    except ValueError as e:
      raise ConfigError(f"config.decoder.random: {e}") from e
    params = None
  decoder_fm = training.FunctionalModel(lambda rngs: llama_lib.Llama(dcfg, rngs=rngs),
                                        seed=0, mesh=mesh)
  params = decoder_fm.init() if params is None else jax.device_put(params, decoder_fm.shardings)
  ac = adapter_config
  n_tokens = int(ac.n_tokens)
  adapter_fm = training.FunctionalModel(
      lambda rngs: adapter_lib.Adapter(in_dim, dcfg.hidden, ac.hidden, n_tokens,
                                       out_scale=float(ac.out_scale), rngs=rngs),
      seed=int(ac.seed), mesh=mesh)
  try:
    placeholder = tokenizer.token_to_id("<|endoftext|>")
  except ValueError:
    placeholder = 0
  return Parts(tokenizer, dcfg, adapter_fm, decoder_fm, mesh, placeholder, n_tokens), params


def input_embeddings(adapter: adapter_lib.Adapter, decoder: llama_lib.Llama,
                     batch: Mapping[str, jax.Array]) -> jax.Array:
  """Decoder inputs with soft tokens at the placeholders.

  Args:
    adapter, decoder: the modules.
    batch: ``tokens`` [B, T] int32, ``slot_index`` [B, T] int32, ``z`` [B, S, d] float32
      (standardised), ``domain`` [B, S] int32.

  Returns:
    [B, T, D] float32 input embeddings.
  """
  soft = adapter(batch["z"], batch["domain"])  # [B, S, n, D]
  return adapter_lib.inject_soft_tokens(decoder.embed(batch["tokens"]), soft, batch["slot_index"])


class ELM:
  """A trained ELM: decodes domain embeddings (and text-only prompts) with the KV-cache sampler.

  Args:
    parts: from ``build_parts``.
    adapter_params, decoder_params: trained parameters.
    norms: domain index -> (mean [d], scale [d]) standardisation of that domain's vectors.
    batch: decode batch size (rows are padded to it so the decode compiles once per prompt bucket).
  """

  def __init__(self, parts: Parts, adapter_params, decoder_params,
               norms: Mapping[int, tuple[np.ndarray, np.ndarray]], *, batch: int = 8):
    self.parts = parts
    self.tokenizer = parts.tokenizer
    self.adapter_params = adapter_params
    self.norms = {int(k): (np.asarray(m, np.float32), np.asarray(s, np.float32))
                  for k, (m, s) in norms.items()}
    self.batch = int(batch)
    with jax.set_mesh(parts.mesh):
      self.decoder = parts.decoder_fm.module(decoder_params)
    self.sampler = sampling_lib.Sampler(self.decoder, parts.tokenizer, mesh=parts.mesh)
    self.n_tokens = parts.n_tokens

    def embed(adapter_params, decoder_params, batch):
      adapter = parts.adapter_fm.module(adapter_params)
      decoder = parts.decoder_fm.module(decoder_params)
      return input_embeddings(adapter, decoder, batch)

    self._embed = jax.jit(embed)
    self._decoder_params = decoder_params

  def prompt_ids(self, task: str, fill: Sequence[str] | None = None):
    """``(ids, slot_index)`` of ``task``'s prompt (``tasks.elm_prompt_ids``)."""
    return tasks_lib.elm_prompt_ids(self.tokenizer, tasks_lib.get_task(task), self.n_tokens,
                                    placeholder_id=self.parts.placeholder_id, fill=fill)

  def _params(self, max_new_tokens, repetition_penalty, no_repeat_ngram, temperature):
    return sampling_lib.SamplingParams(
        max_tokens=int(max_new_tokens), temperature=float(temperature),
        repetition_penalty=float(repetition_penalty), no_repeat_ngram=int(no_repeat_ngram))

  def generate(self, task: str, z: np.ndarray, *, max_new_tokens: int = 48,
               repetition_penalty: float = 1.2, no_repeat_ngram: int = 3,
               temperature: float = 0.0, seed: int = 0) -> list[str]:
    """Decodes embeddings with ``task``'s prompt.

    Args:
      task: task name (``tasks.TASKS``).
      z: [N, S, d] raw (unstandardised) embeddings, S = the task's slots ([N, d] for one slot).
      max_new_tokens, repetition_penalty, no_repeat_ngram, temperature: decoding.
      seed: row i samples with seed ``seed + i`` (irrelevant when greedy).

    Returns:
      N texts.
    """
    t = tasks_lib.get_task(task)
    z = np.asarray(z, np.float32)
    if z.ndim == 2:
      z = z[:, None]
    if z.ndim != 3 or z.shape[1] != len(t.domains):
      raise ValueError(f"generate: z must be [N, {len(t.domains)}, d] for task {task!r}, "
                       f"got {z.shape}")
    doms = [adapter_lib.DOMAINS.index(d) for d in t.domains]
    zs = np.stack([(z[:, s] - self.norms[d][0]) / self.norms[d][1] for s, d in enumerate(doms)],
                  axis=1)
    ids, slots = self.prompt_ids(task)
    p = sampling_lib.bucket(len(ids), self.sampler.min_bucket)
    params = self._params(max_new_tokens, repetition_penalty, no_repeat_ngram, temperature)
    out: list[str] = []
    for start in range(0, len(zs), self.batch):
      chunk = zs[start:start + self.batch]
      n = len(chunk)
      chunk = np.concatenate([chunk, np.repeat(chunk[:1], self.batch - n, 0)], 0)
      tokens = np.full((self.batch, p), self.tokenizer.pad_id, np.int32)
      mask = np.zeros((self.batch, p), bool)
      slot_index = np.full((self.batch, p), -1, np.int32)
      tokens[:, p - len(ids):] = ids
      mask[:, p - len(ids):] = True
      slot_index[:, p - len(ids):] = slots
      batch = {"tokens": tokens, "slot_index": slot_index, "z": chunk,
               "domain": np.tile(np.asarray(doms, np.int32), (self.batch, 1))}
      with jax.set_mesh(self.parts.mesh):
        x = self._embed(self.adapter_params, self._decoder_params, batch)
      res = self.sampler.generate_embeddings(
          x, mask, params, tokens=tokens, seeds=[seed + start + i for i in range(self.batch)])
      out.extend(res.texts[:n])
    return out

  def generate_text(self, task: str, fills: Sequence[Sequence[str]], *, max_new_tokens: int = 48,
                    repetition_penalty: float = 1.2, no_repeat_ngram: int = 3,
                    temperature: float = 0.0, seed: int = 0) -> list[str]:
    """The same decoder and prompt with text in place of the embeddings (title-only baseline).

    Args:
      task: task name; ``fills`` holds one text per embedding slot of its prompt.
      fills: N lists of S strings.
      max_new_tokens, repetition_penalty, no_repeat_ngram, temperature, seed: as ``generate``.

    Returns:
      N texts.
    """
    params = self._params(max_new_tokens, repetition_penalty, no_repeat_ngram, temperature)
    prompts = [self.prompt_ids(task, fill=list(f))[0] for f in fills]
    out: list[str] = []
    for start in range(0, len(prompts), self.batch):
      chunk = prompts[start:start + self.batch]
      n = len(chunk)
      chunk = chunk + [chunk[0]] * (self.batch - n)
      res = self.sampler.generate_ids(chunk, params,
                                      seeds=[seed + start + i for i in range(self.batch)])
      out.extend(res.texts[:n])
    return out
