"""ELM training (two stages) and the ``ELM`` decoder wrapper; the report is in ``evaluation.py``.

``run(config, workdir)`` is what ``python -m launch.train_elm`` calls:

1. **Embeddings**: E_D (``encoder_dir``, or trained into ``<workdir>/encoder`` with WALS) gives the
   WALS ``embeddings.npz``; movies use the augmented item vectors ``[y_i, 1, c_i, 1]`` (EAGLE's Z),
   users ``[x_u, b_u, 1, mu]``. The adapter reads them standardised per column
   (``adapter.standardisation`` over the whole table of the domain).
2. **Examples** (``tasks``): train/held-out movies from the most-rated ones, users from the most
   active ones; targets from the environment LLM through ``CachedClient`` (``responses.jsonl``).
3. **Training**: a pure-pytree train step under ``jax.jit`` with named shardings on the mesh of
   ``config.mesh``; parameters created sharded (``training.FunctionalModel``), AdamW from
   ``training.make_optimizer``. Steps ``[0, stage1_steps)`` are **stage 1**: only the adapter is
   differentiated and updated; the decoder parameters are a separate, never-donated argument, so
   they stay bit-identical. Steps ``[stage1_steps, stage1_steps + stage2_steps)`` are **stage 2**:
   adapter and decoder are trained together with a fresh optimizer. Loss: mean next-token
   cross-entropy over the target tokens (``tasks.collate``'s ``loss_mask``).
4. **Checkpoints** (``checkpoint.Checkpointer`` in ``<workdir>/checkpoints``): ``{"adapter",
   "opt"}`` (plus ``"decoder"`` in stage 2: a frozen decoder is not copied into every checkpoint),
   every ``save_every`` steps and at the end of each stage; a rerun resumes from the latest step.
   Metrics go to ``metrics.jsonl`` and TensorBoard (``training.MetricsWriter``).
5. **Report** (``report.json``): semantic consistency (``metrics.semantic_consistency``) of summaries
   of held-out movies decoded by the trained ELM, by the same decoder prompted with the title alone
   (no embedding), and by the ELM from random embeddings (a Gaussian fitted to the item table; SC
   measured against the held-out movie, i.e. the chance level, and against the random point
   itself); for the ELM and the title-only texts also the *mismatched* SC (each text against the
   other held-out movies, ``metrics.cross_consistency``) and the rank of a text's own movie among
   the held-out ones, which separate embedding-specific content from text that merely resembles
   popular movies in general; SC of decoded interpolations ``0.5 (z_a + z_b)`` of held-out pairs; SC of the
   environment LLM's own summaries written from title and genres (a reference); behavioural
   consistency of decoded profiles of held-out users, with a mismatched-user control and the
   environment LLM's profiles as references.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import time
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from flax import nnx

from eagle_jax import checkpoint, parallel, training
from eagle_jax.elm import adapter as adapter_lib
from eagle_jax.elm import tasks as tasks_lib
from eagle_jax.models import llama as llama_lib
from eagle_jax.models import sampling as sampling_lib
from eagle_jax.models.tokenizer import Tokenizer

ConfigError = training.ConfigError


# ---------------------------------------------------------------------------------------------------
# Config checks.


def validate_config(config) -> None:
  """Raises ``ConfigError`` naming the first invalid field."""
  def positive_int(field: str, value, allow_zero: bool = False):
    if isinstance(value, bool) or not isinstance(value, int) or value < (0 if allow_zero else 1):
      raise ConfigError(f"config.{field}: expected an int >= {0 if allow_zero else 1}, "
                        f"got {value!r}")

  if config.decoder.kind not in ("gguf", "random"):
    raise ConfigError(f"config.decoder.kind: expected 'gguf' or 'random', got "
                      f"{config.decoder.kind!r}")
  for f in ("hidden", "n_tokens"):
    positive_int(f"adapter.{f}", config.adapter[f])
  if not float(config.adapter.out_scale) > 0:
    raise ConfigError(f"config.adapter.out_scale: expected > 0, got {config.adapter.out_scale!r}")
  tasks = tuple(config.data.movie_tasks)
  for t in tasks:
    if t not in tasks_lib.TASKS or tasks_lib.TASKS[t].domains != ("movie",):
      raise ConfigError(f"config.data.movie_tasks: {t!r} is not a single-movie task; known: "
                        f"{sorted(k for k, v in tasks_lib.TASKS.items() if v.domains == ('movie',))}")
  positive_int("data.train_movies", config.data.train_movies)
  positive_int("data.test_movies", config.data.test_movies)
  for f in ("comparison_pairs", "train_users", "test_users"):
    positive_int(f"data.{f}", config.data[f], allow_zero=True)
  if config.data.train_movies < 2 and config.data.comparison_pairs:
    raise ConfigError("config.data.comparison_pairs needs config.data.train_movies >= 2")
  if isinstance(config.data.target_tokens, bool) or not isinstance(
      config.data.target_tokens, int) or config.data.target_tokens < 8:
    raise ConfigError(f"config.data.target_tokens: expected an int >= 8, got "
                      f"{config.data.target_tokens!r}")
  positive_int("train.stage1_steps", config.train.stage1_steps, allow_zero=True)
  positive_int("train.stage2_steps", config.train.stage2_steps, allow_zero=True)
  if config.train.stage1_steps + config.train.stage2_steps < 1:
    raise ConfigError("config.train.stage1_steps + config.train.stage2_steps must be >= 1")
  for f in ("batch_size", "save_every", "max_to_keep", "log_every"):
    positive_int(f"train.{f}", config.train[f])
  for stage in ("stage1_optimizer", "stage2_optimizer"):
    lr = config.train[stage].learning_rate
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not lr > 0:
      raise ConfigError(f"config.train.{stage}.learning_rate: expected > 0, got {lr!r}")
  for f in ("batch", "max_new_tokens", "bc_movies"):
    positive_int(f"eval.{f}", config.eval[f])
  for f in ("interpolations", "random_embeddings", "train_movies"):
    positive_int(f"eval.{f}", config.eval[f], allow_zero=True)
  positive_int("env.batch", config.env.batch)
  positive_int("env.retries", config.env.retries, allow_zero=True)


# ---------------------------------------------------------------------------------------------------
# Models.


@dataclasses.dataclass
class Parts:
  """The static pieces of an ELM: tokenizer, functional adapter and decoder, mesh.

  Attributes:
    tokenizer: the decoder's tokenizer.
    decoder_config: ``LlamaConfig``.
    adapter_fm, decoder_fm: ``training.FunctionalModel`` of the adapter and the decoder.
    mesh: the mesh everything is placed on.
    placeholder_id: token id written at soft positions (``<|endoftext|>`` when present, else 0).
  """

  tokenizer: Tokenizer
  decoder_config: llama_lib.LlamaConfig
  adapter_fm: training.FunctionalModel
  decoder_fm: training.FunctionalModel
  mesh: jax.sharding.Mesh
  placeholder_id: int
  # Compiled train steps by (stage, prompt length, optimizer fields, schedule length): a second
  # ``train`` call with the same parts (resume in the same process, tests) does not recompile.
  step_cache: dict = dataclasses.field(default_factory=dict, repr=False)

  def adapter_init(self):
    """Fresh adapter parameters (a copy of one cached jitted init: train states are donated)."""
    if "adapter_init" not in self.step_cache:
      self.step_cache["adapter_init"] = self.adapter_fm.init()
    return jax.tree.map(jnp.copy, self.step_cache["adapter_init"])


def _gguf_path(config) -> str:
  from eagle_jax import assets  # noqa: PLC0415 (fetches on first use)

  return config.decoder.gguf or str(assets.smollm2_gguf())


def build_parts(config, mesh: jax.sharding.Mesh, in_dim: int, tokenizer: Tokenizer | None = None
                ) -> tuple[Parts, Any]:
  """Tokenizer, functional adapter and decoder, and the decoder's parameters (placed sharded).

  Returns:
    ``(parts, decoder_params)``; ``decoder_params`` is a pure-dict pytree.
  """
  from eagle_jax.models import loading  # noqa: PLC0415 (gguf reader)

  path = _gguf_path(config)
  if not os.path.exists(path):
    raise ConfigError(f"config.decoder.gguf: {path!r} does not exist")
  tokenizer = tokenizer or Tokenizer.from_gguf(path)
  if config.decoder.kind == "gguf":
    dcfg, model = loading.load_llama_gguf(path, mesh=mesh)
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    del model
  else:
    r = config.decoder.random
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
  ac = config.adapter
  adapter_fm = training.FunctionalModel(
      lambda rngs: adapter_lib.Adapter(in_dim, dcfg.hidden, ac.hidden, ac.n_tokens,
                                       out_scale=float(ac.out_scale), rngs=rngs),
      seed=int(ac.seed), mesh=mesh)
  try:
    placeholder = tokenizer.token_to_id("<|endoftext|>")
  except ValueError:
    placeholder = 0
  return Parts(tokenizer, dcfg, adapter_fm, decoder_fm, mesh, placeholder), params


def input_embeddings(adapter: adapter_lib.Adapter, decoder: llama_lib.Llama,
                     batch: Mapping[str, jax.Array]) -> jax.Array:
  """[B, T, D] decoder inputs: token embeddings with soft tokens at the placeholders."""
  soft = adapter(batch["z"], batch["domain"])  # [B, S, n, D]
  return adapter_lib.inject_soft_tokens(decoder.embed(batch["tokens"]), soft, batch["slot_index"])


def loss_fn(adapter_params, decoder_params, batch, *, parts: Parts, target_start: int):
  """Mean next-token cross-entropy over the target tokens.

  Args:
    adapter_params, decoder_params: pure-dict parameter pytrees.
    batch: ``tasks.collate`` arrays (``z`` standardised).
    parts: the functional models.
    target_start: P, the first column that can hold a target token (every ``loss_mask`` before it
      is False), so logits are only computed for columns ``[P - 1, T - 1)``.

  Returns:
    ``(loss, (sum of target NLL, number of target tokens))``.
  """
  adapter = parts.adapter_fm.module(adapter_params)
  decoder = parts.decoder_fm.module(decoder_params)
  x = input_embeddings(adapter, decoder, batch)
  hidden, _ = decoder.forward_embeddings(x, attention_mask=batch["attention_mask"])
  logits = decoder.logits(hidden[:, target_start - 1:-1])  # [B, L, V] predicts columns [P, T)
  target = batch["tokens"][:, target_start:]
  mask = batch["loss_mask"][:, target_start:].astype(jnp.float32)
  nll = jax.nn.logsumexp(logits, axis=-1) - jnp.take_along_axis(
      logits, target[..., None], axis=-1)[..., 0]
  total = jnp.sum(nll * mask)
  count = jnp.sum(mask)
  return total / jnp.maximum(count, 1.0), (total, count)


def make_train_step(parts: Parts, optimizer: optax.GradientTransformation, *, stage: int,
                    target_start: int, state_shardings, decoder_shardings, batch_sharding):
  """The jitted step ``(state, decoder_params, batch) -> (state, metrics)``.

  ``state`` is ``{"adapter", "opt"}`` in stage 1 and ``{"adapter", "decoder", "opt"}`` in stage 2
  (then the separate ``decoder_params`` argument is ignored). Only ``state`` is donated.
  """
  loss = functools.partial(loss_fn, parts=parts, target_start=target_start)

  def step(state, decoder_params, batch):
    if stage == 1:
      trainable = {"adapter": state["adapter"]}
      fn = lambda t: loss(t["adapter"], decoder_params, batch)  # noqa: E731
    else:
      trainable = {"adapter": state["adapter"], "decoder": state["decoder"]}
      fn = lambda t: loss(t["adapter"], t["decoder"], batch)  # noqa: E731
    (value, (total, count)), grads = jax.value_and_grad(fn, has_aux=True)(trainable)
    updates, opt = optimizer.update(grads, state["opt"], trainable)
    new = optax.apply_updates(trainable, updates)
    metrics = {"loss": value, "target_tokens": count, "grad_norm": training.global_norm(grads),
               "adapter_norm": training.global_norm(new["adapter"])}
    return {**new, "opt": opt}, metrics

  replicated = parallel.replicated(parts.mesh)
  return jax.jit(step, in_shardings=(state_shardings, decoder_shardings, batch_sharding),
                 out_shardings=(state_shardings, replicated), donate_argnums=(0,))


# ---------------------------------------------------------------------------------------------------
# Training loop.


@dataclasses.dataclass
class Dataset:
  """Encoded training examples and the standardised domain tables.

  Attributes:
    rows: encoded examples (``tasks.Encoded``).
    tables: domain index -> [N, d] standardised embeddings.
    prompt_len: P; target_len: L.
  """

  rows: list[tasks_lib.Encoded]
  tables: dict[int, np.ndarray]
  prompt_len: int
  target_len: int

  def batch(self, step: int, batch_size: int, seed: int, pad_id: int) -> dict[str, np.ndarray]:
    idx = tasks_lib.epoch_order(len(self.rows), batch_size, step, seed)
    return tasks_lib.collate([self.rows[i] for i in idx], self.tables,
                             prompt_len=self.prompt_len, target_len=self.target_len,
                             pad_id=pad_id)


def train(config, workdir: str, parts: Parts, decoder_params, data: Dataset,
          meta_extra: Mapping[str, Any] | None = None,
          stop_after: int | None = None) -> tuple[dict[str, Any], Any, list[dict[str, Any]]]:
  """Runs (or resumes) both stages; returns ``(final state, decoder params, train records)``.

  Args:
    config: the ELM config (``train`` fields).
    workdir: run folder (``checkpoints/``, ``metrics.jsonl``).
    parts: from ``build_parts``.
    decoder_params: the initial (pretrained) decoder parameters.
    data: training examples.
    meta_extra: JSON metadata saved with every checkpoint (what ``load_elm`` needs).
    stop_after: stop (after saving) once this global step is reached (tests of resume).
  """
  tc = config.train
  mesh = parts.mesh
  training.check_divisible(tc.batch_size, mesh, "config.train.batch_size")
  s1, s2 = int(tc.stage1_steps), int(tc.stage2_steps)
  total = s1 + s2
  ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"),
                                 max_to_keep=int(tc.max_to_keep))
  pad_id = parts.tokenizer.pad_id
  example = data.batch(0, tc.batch_size, tc.seed, pad_id)
  b_shard = training.batch_shardings(example, mesh)
  d_shard = parts.decoder_fm.shardings

  def opt_for(stage):
    return training.make_optimizer(tc[f"stage{stage}_optimizer"], s1 if stage == 1 else s2)

  def fresh_state(stage, adapter_params, dec_params):
    trainable = {"adapter": adapter_params}
    if stage == 2:  # a copy: the state is donated, the caller's decoder arrays must survive
      trainable["decoder"] = jax.tree.map(jnp.copy, dec_params)
    key = ("opt_init", stage, json.dumps(tc[f"stage{stage}_optimizer"].to_dict(), sort_keys=True),
           s1 if stage == 1 else s2)
    if key not in parts.step_cache:
      parts.step_cache[key] = jax.jit(opt_for(stage).init)
    with jax.set_mesh(mesh):
      opt = parts.step_cache[key](trainable)
    return {**trainable, "opt": opt}

  def shardings_of(tree):
    return jax.tree.map(lambda x: x.sharding, tree)

  meta = dict(meta_extra or {})
  latest = ckpt.latest_step()
  if latest is None:
    step, stage = 0, 1 if s1 > 0 else 2
    state = fresh_state(stage, parts.adapter_init(), decoder_params)
  else:
    # The stage of a checkpoint decides its structure: read its metadata first.
    _, _, saved_meta = ckpt.restore(latest)
    saved_stage = int(saved_meta["stage"])
    # A freshly initialised state of that stage is the restore target (structure and shardings).
    target = fresh_state(saved_stage, parts.adapter_init(), decoder_params)
    step, state, _ = ckpt.restore(latest, target=target, shardings=shardings_of(target))
    del target
    stage = saved_stage
    if saved_stage == 2:
      decoder_params = state["decoder"]
    logging.info("resumed ELM training from step %d (stage %d) in %s", step, stage,
                 ckpt.directory)
  writer = training.MetricsWriter(workdir, resume_step=step if latest is not None else None)
  records: list[dict[str, Any]] = []
  progress = training.Progress(total, initial=step, desc="elm", keys=("loss",))
  steps_fn = {}
  t_last, n_last = time.perf_counter(), step
  window: list = []

  def save(s, st):
    ckpt.save(s, st, {**meta, "stage": stage, "step": s, "stage1_steps": s1,
                      "stage2_steps": s2}, force=True)

  try:
    while step < total:
      if stage == 1 and step >= s1:  # (step s1 was saved at the end of stage 1)
        stage = 2
        state = fresh_state(2, state["adapter"], decoder_params)
      if stage not in steps_fn:
        key = (stage, data.prompt_len, json.dumps(tc[f"stage{stage}_optimizer"].to_dict(),
                                                  sort_keys=True), s1 if stage == 1 else s2,
               jax.tree.structure(example), tuple(np.shape(v) for v in example.values()))
        if key not in parts.step_cache:
          parts.step_cache[key] = make_train_step(
              parts, opt_for(stage), stage=stage, target_start=data.prompt_len,
              state_shardings=shardings_of(state), decoder_shardings=d_shard,
              batch_sharding=b_shard)
        steps_fn[stage] = parts.step_cache[key]
      batch = jax.device_put(data.batch(step, tc.batch_size, tc.seed, pad_id), b_shard)
      with jax.set_mesh(mesh):
        state, m = steps_fn[stage](state, decoder_params, batch)
      window.append(m)
      step += 1
      end_of_stage = step == s1 or step == total
      if step % tc.log_every == 0 or end_of_stage:
        now = time.perf_counter()
        host = jax.device_get(window)
        # Token-weighted mean loss over the steps since the last record (a single batch of a few
        # examples is too noisy to follow), other metrics of the last step.
        tokens = sum(float(h["target_tokens"]) for h in host)
        mean_loss = sum(float(h["loss"]) * float(h["target_tokens"]) for h in host) / max(
            tokens, 1.0)
        rec = writer.write(step, {**host[-1], "loss_window": mean_loss, "window_steps": len(host),
                                  "stage": stage,
                                  "seconds_per_step": (now - t_last) / max(step - n_last, 1)})
        t_last, n_last, window = now, step, []
        records.append(rec)
      progress.update(1, jax.device_get(m) if step % tc.log_every == 0 else None)
      if step % tc.save_every == 0 or end_of_stage:
        save(step, state)
      if stop_after is not None and step >= stop_after:
        break
  finally:
    progress.close()
    writer.close()
    ckpt.close()
  if stage == 2:
    decoder_params = state["decoder"]
  return state, decoder_params, records


# ---------------------------------------------------------------------------------------------------
# Inference.


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
    self.n_tokens = parts.adapter_fm.abstract["w2"].get_value().shape[2]

    def embed(adapter_params, decoder_params, batch):
      adapter = parts.adapter_fm.module(adapter_params)
      decoder = parts.decoder_fm.module(decoder_params)
      return input_embeddings(adapter, decoder, batch)

    self._embed = jax.jit(embed)
    self._decoder_params = decoder_params

  def prompt_ids(self, task: str, fill: Sequence[str] | None = None):
    return tasks_lib.elm_prompt_ids(self.tokenizer, tasks_lib.get_task(task), self.n_tokens,
                                    placeholder_id=self.parts.placeholder_id, fill=fill)

  def _params(self, max_new_tokens, repetition_penalty, no_repeat_ngram, temperature):
    return sampling_lib.SamplingParams(
        max_new_tokens=int(max_new_tokens), temperature=float(temperature),
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
    """The same decoder and prompt with text in place of the embeddings (title-only baseline)."""
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


# ---------------------------------------------------------------------------------------------------
# Data preparation.


def _encoder(config, workdir: str):
  """E_D ``(ed: texts -> Z, meta, folder)``, training it (and WALS) into ``<workdir>/encoder`` when
  needed."""
  from eagle_jax.embed import encoder_train  # noqa: PLC0415

  directory = config.encoder_dir
  if not directory:
    directory = os.path.join(workdir, "encoder")
    if not os.path.isdir(os.path.join(directory, "checkpoints")):
      logging.info("no encoder_dir: training E_D into %s", directory)
      encoder_train.run(config.encoder, directory)
  ckpt_dir = os.path.join(directory, "checkpoints")
  if not os.path.isdir(ckpt_dir):
    raise ConfigError(f"config.encoder_dir: {directory!r} has no checkpoints/ (not an E_D run)")
  ed, meta = encoder_train.load_encoder(ckpt_dir, minilm=config.encoder.minilm or None)
  if meta.get("target") != "augmented":
    raise ConfigError(f"config.encoder_dir: E_D in {directory!r} regresses {meta.get('target')!r},"
                      " expected 'augmented' WALS vectors")
  return ed, meta, directory


def encoder_heldout(directory: str, num_items: int) -> np.ndarray:
  """[I] bool: the movies E_D never saw in training (``split.npz`` of its run folder)."""
  path = os.path.join(directory, "split.npz")
  if not os.path.exists(path):
    raise ConfigError(f"config.encoder_dir: {directory!r} has no split.npz (E_D's held-out movies)")
  with np.load(path, allow_pickle=False) as z:
    held = np.asarray(z["heldout_item"], bool)
  if held.shape != (num_items,):
    raise ConfigError(f"config.encoder_dir: {path} covers {held.shape[0]} items, the ratings "
                      f"have {num_items} (another data set?)")
  return held


def prepare(config, workdir: str, parts_tokenizer: Tokenizer, env_client, ratings, item_z,
            user_z, ed_heldout: np.ndarray | None = None
            ) -> tuple[dict[str, Any], list[tasks_lib.Example], list[dict[str, Any]]]:
  """Splits movies and users, and asks the environment for every target.

  Movies: the ``test_movies`` most-rated movies among those E_D was *not* trained on
  (``ed_heldout``; E_D would otherwise recognise a title mentioned in a text and favour the
  title-only baseline), and the ``train_movies`` most-rated of the rest. Users: a seeded split of
  the most active users.

  Returns:
    ``(split, examples with targets, provenance records)``; ``split`` has ``train_movies``,
    ``test_movies``, ``train_users``, ``test_users`` (index arrays), ``pairs`` and the eval-only
    reference examples under ``reference``.
  """
  from eagle_jax.env import build  # noqa: PLC0415

  dc = config.data
  by_count = build.most_rated_items(ratings, ratings.num_items)
  if ed_heldout is None:
    ed_heldout = np.zeros(ratings.num_items, bool)
    ed_heldout[tasks_lib.split_indices(by_count[:dc.train_movies + dc.test_movies],
                                       dc.train_movies, dc.test_movies, dc.seed)[1]] = True
  test_m = np.sort(by_count[ed_heldout[by_count]][:dc.test_movies])
  train_m = np.sort(by_count[~ed_heldout[by_count]][:dc.train_movies])
  if len(test_m) < dc.test_movies or len(train_m) < dc.train_movies:
    raise ConfigError(f"config.data: {len(test_m)} held-out / {len(train_m)} training movies "
                      f"available, asked for {dc.test_movies} / {dc.train_movies}")
  n_users = dc.train_users + dc.test_users
  users = build.most_active_users(ratings, n_users) if n_users else np.zeros(0, np.int64)
  train_u, test_u = tasks_lib.split_indices(users, dc.train_users, dc.test_users, dc.seed)
  pair_list = tasks_lib.pairs(train_m, dc.comparison_pairs, dc.seed) if dc.comparison_pairs else []
  examples = [tasks_lib.Example(t, (int(i),)) for i in train_m for t in dc.movie_tasks]
  examples += [tasks_lib.Example("comparison", p) for p in pair_list]
  examples += [tasks_lib.Example("user_profile", (int(u),)) for u in train_u]
  reference = [tasks_lib.Example("summary", (int(i),)) for i in test_m]
  reference += [tasks_lib.Example("user_profile", (int(u),)) for u in test_u]
  user_titles = {u.user_index: u for u in build.users_from_ratings(
      ratings, np.concatenate([train_u, test_u]))} if n_users else None
  done, records = tasks_lib.run_async(tasks_lib.generate_targets(
      env_client, examples + reference, ratings, tokenizer=parts_tokenizer,
      target_tokens=dc.target_tokens, sampling=config.env.sampling, seed=config.env.seed,
      retries=config.env.retries, user_titles=user_titles))
  ref_keys = {(e.task, e.slots) for e in reference}
  train_keys = {(e.task, e.slots) for e in examples}
  train_ex = [e for e in done if (e.task, e.slots) in train_keys]
  ref_ex = [e for e in done if (e.task, e.slots) in ref_keys and (e.task, e.slots)
            not in train_keys]
  split = {"train_movies": train_m, "test_movies": test_m, "train_users": train_u,
           "test_users": test_u, "pairs": pair_list, "reference": ref_ex}
  return split, train_ex, records


def make_dataset(examples: Sequence[tasks_lib.Example], parts: Parts, tables: Mapping[int, Any],
                 target_tokens: int) -> Dataset:
  rows = tasks_lib.encode_examples(examples, parts.tokenizer, n_tokens=parts.adapter_fm.abstract[
      "w2"].get_value().shape[2], target_tokens=target_tokens,
      placeholder_id=parts.placeholder_id, domains=adapter_lib.DOMAINS)
  if not rows:
    raise ValueError("no training examples (every target failed to parse?)")
  prompt_len = max(len(r.prompt) for r in rows)
  return Dataset(rows, dict(tables), prompt_len, target_tokens)


# ---------------------------------------------------------------------------------------------------
# Evaluation.


# ---------------------------------------------------------------------------------------------------
# The job.


def load_elm(workdir: str, config=None, *, mesh=None, batch: int = 8) -> ELM:
  """Restores the trained ELM of a ``run`` folder (latest checkpoint)."""
  ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"))
  latest = ckpt.latest_step()
  if latest is None:
    raise FileNotFoundError(f"no ELM checkpoint in {workdir}/checkpoints")
  import ml_collections  # noqa: PLC0415

  _, _, meta = ckpt.restore(latest)  # (metadata first: the stage decides the structure)
  config = config or ml_collections.ConfigDict(meta["config"])
  mesh = mesh or training.build_mesh(config.mesh)
  stage = int(meta["stage"])
  parts, dec_params = build_parts(config, mesh, int(meta["in_dim"]))
  trainable = {"adapter": parts.adapter_fm.abstract_params()}
  if stage == 2:
    trainable["decoder"] = parts.decoder_fm.abstract_params()
  opt = training.make_optimizer(config.train[f"stage{stage}_optimizer"],
                                int(meta[f"stage{stage}_steps"]))
  target = {**trainable, "opt": jax.eval_shape(opt.init, trainable)}
  _, state, _ = ckpt.restore(latest, target=target)
  ckpt.close()
  adapter_params = state["adapter"]
  if stage == 2:
    dec_params = state["decoder"]
  norms = {int(k): (np.asarray(v[0]), np.asarray(v[1])) for k, v in meta["norms"].items()}
  return ELM(parts, adapter_params, dec_params, norms, batch=batch)


def run(config, workdir: str) -> dict[str, Any]:
  """Prepares data, trains (resuming), evaluates; writes ``report.json``. Returns the report."""
  from eagle_jax.embed import wals_train  # noqa: PLC0415
  from eagle_jax.env import cache as cache_lib  # noqa: PLC0415
  from eagle_jax.env import local  # noqa: PLC0415

  t_start = time.perf_counter()
  validate_config(config)
  training.check_workdir(workdir)
  mesh = training.build_mesh(config.mesh)
  training.check_divisible(config.train.batch_size, mesh, "config.train.batch_size")
  seconds: dict[str, float] = {}

  t0 = time.perf_counter()
  ed, enc_meta, enc_dir = _encoder(config, workdir)
  ratings = wals_train.load_data(config.encoder.wals.data)

  latent = wals_train.load_npz(enc_meta["embeddings"], item_ids=np.asarray(ratings.item_ids),
                               user_ids=np.asarray(ratings.user_ids))
  item_z, user_z = latent["item_augmented"], latent["user_augmented"]
  seconds["encoder_and_embeddings"] = time.perf_counter() - t0

  t0 = time.perf_counter()
  parts, dec_params = build_parts(config, mesh, int(item_z.shape[1]))
  seconds["load_decoder"] = time.perf_counter() - t0
  norms = {0: adapter_lib.standardisation(item_z), 1: adapter_lib.standardisation(user_z)}
  tables = {d: ((z - norms[d][0]) / norms[d][1]).astype(np.float32)
            for d, z in ((0, item_z), (1, user_z))}

  t0 = time.perf_counter()
  with jax.set_mesh(mesh):
    env_model = parts.decoder_fm.module(dec_params)
  env_sampler = sampling_lib.Sampler(env_model, parts.tokenizer, mesh=mesh)
  backend = local.LocalSampler(env_sampler, model_id=config.env.model_id,
                               batch_buckets=(int(config.env.batch),), chat=True)
  cache_path = config.env.cache or os.path.join(workdir, "responses.jsonl")
  cache = cache_lib.ResponseCache(cache_path)
  client = cache_lib.CachedClient(backend, cache, model_id=config.env.model_id)
  split, examples, records = prepare(config, workdir, parts.tokenizer, client, ratings, item_z,
                                     user_z, encoder_heldout(enc_dir, ratings.num_items))
  cache.close()
  seconds["targets"] = time.perf_counter() - t0
  with open(os.path.join(workdir, "examples.jsonl"), "w") as f:
    for e in examples + split["reference"]:
      f.write(json.dumps({"task": e.task, "slots": list(e.slots), "target": e.target,
                          "split": "train" if e in examples else "reference"}) + "\n")
  failures = sum(not r["parsed"] for r in records)
  logging.info("%d training examples (%d env answers, %d unparsable; cache hits %d, misses %d)",
               len(examples), len(records), failures, client.hits, client.misses)

  data = make_dataset(examples, parts, tables, config.data.target_tokens)
  meta = {"config": config.to_dict(), "in_dim": int(item_z.shape[1]),
          "norms": {str(k): [v[0].tolist(), v[1].tolist()] for k, v in norms.items()},
          "prompt_len": data.prompt_len, "embeddings": enc_meta["embeddings"]}
  t0 = time.perf_counter()
  state, dec_params, _ = train(config, workdir, parts, dec_params, data, meta)
  seconds["train"] = time.perf_counter() - t0
  # The whole history, including steps of earlier (interrupted) invocations in this workdir.
  train_records = training.read_metrics(os.path.join(workdir, "metrics.jsonl"))

  report: dict[str, Any] = {
      "data": {"train_examples": len(examples), "per_task": {
          t: sum(e.task == t for e in examples) for t in tasks_lib.TASKS},
               "test_movies": [int(i) for i in split["test_movies"]],
               "test_titles": [str(ratings.titles[i]) for i in split["test_movies"]],
               "test_users": [int(u) for u in split["test_users"]],
               "env_answers": len(records), "env_unparsable": failures,
               "cache_hits": client.hits, "cache_misses": client.misses,
               "prompt_len": data.prompt_len, "target_len": data.target_len},
      "train": {"records": train_records,
                "first_loss_window": (train_records[0].get("loss_window")
                                      if train_records else None),
                "last_loss_window": (train_records[-1].get("loss_window")
                                     if train_records else None)},
      "devices": jax.device_count(), "mesh": dict(mesh.shape)}
  if config.eval.enabled:
    from eagle_jax.models.text_encoder import SentenceEncoder  # noqa: PLC0415

    t0 = time.perf_counter()
    encoder = SentenceEncoder.from_pretrained(config.encoder.minilm or None)
    elm = ELM(parts, state["adapter"], dec_params, norms, batch=config.eval.batch)
    from eagle_jax.elm import evaluation  # noqa: PLC0415 (evaluation imports this module)

    report["eval"] = evaluation.evaluate(config, elm, encode=encoder.encode, ed=ed,
                              ratings=ratings, item_z=item_z, user_z=user_z, split=split)
    seconds["eval"] = time.perf_counter() - t0
    sc = report["eval"]["semantic_consistency"]
    report["headline"] = {
        k: {"cos": v["cos"]["mean"], "rank": v["rank"]["mean"], "top10": v["top10"],
            **({"mismatched_cos": v["mismatched_cos"],
                "own_rank_among_set": v["own_rank_among_set"]["mean"]}
               if "mismatched_cos" in v else {})}
        for k, v in sc.items()}
    report["headline"]["elm_beats_title_only_and_random"] = bool(
        sc["elm"]["cos"]["mean"] > sc["title_only"]["cos"]["mean"]
        and sc["elm"]["cos"]["mean"] > sc.get("random_embedding_control", {}).get(
            "cos", {}).get("mean", -np.inf))
  seconds["total"] = time.perf_counter() - t_start
  report["seconds"] = seconds
  report["config"] = config.to_dict()
  with open(os.path.join(workdir, "report.json"), "w") as f:
    json.dump(report, f, indent=2, default=float)
  return report
