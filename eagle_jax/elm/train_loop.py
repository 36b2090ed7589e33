"""ELM training: the loss, the two-stage loop (jitted once per stage) and its checkpoints.

Steps ``[0, stage1_steps)`` are **stage 1**: only the adapter is differentiated and updated; the
decoder parameters are a separate, never-donated argument, so they stay bit-identical. Steps
``[stage1_steps, stage1_steps + stage2_steps)`` are **stage 2**: adapter and decoder are trained
together with a fresh optimizer. Loss: mean next-token cross-entropy over the target tokens
(``tasks.collate``'s ``loss_mask``). AdamW from ``training.make_optimizer``.

``TrainLoop`` builds each stage's optimizer, state shardings, jitted state init and jitted train
step once, when it is constructed; every ``train`` call (a fresh run, a resume in the same process)
reuses them, so a step compiles once per stage and loop.

Checkpoints (``checkpoint.Checkpointer`` in ``<workdir>/checkpoints``) hold ``{"adapter", "opt"}``
(plus ``"decoder"`` in stage 2: a frozen decoder is not copied into every checkpoint), written every
``save_every`` steps, at the end of each stage and on SIGTERM (``preemption.Guard``: the step is
saved, then ``preemption.Preempted`` is raised); a rerun resumes from the newest intact step. Their
metadata adds ``stage``, ``step``, ``stage1_steps`` and ``stage2_steps`` to the caller's. Metrics go
to ``metrics.jsonl`` and TensorBoard (``training.MetricsWriter``).
"""

from __future__ import annotations

import dataclasses
import functools
import os
import time
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax
from absl import logging

from eagle_jax import checkpoint, parallel, preemption, training
from eagle_jax.elm.data import Dataset
from eagle_jax.elm.model import Parts, input_embeddings

STAGES = (1, 2)


def loss_fn(adapter_params, decoder_params, batch, *, parts: Parts, target_start: int):
  """Mean next-token cross-entropy over the target tokens.

  Args:
    adapter_params, decoder_params: pure-dict parameter pytrees.
    batch: ``tasks.collate`` arrays: ``tokens``, ``slot_index``, ``attention_mask``, ``loss_mask``
      [B, T], ``z`` [B, S, d] float32 (standardised), ``domain`` [B, S] int32.
    parts: the functional models.
    target_start: P, the first column that can hold a target token (every ``loss_mask`` before it
      is False), so logits are only computed for columns ``[P - 1, T - 1)``.

  Returns:
    ``(loss [], (sum of target NLL [], number of target tokens []))``, float32.
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


def stage_optimizer(train_config, stage: int) -> optax.GradientTransformation:
  """AdamW of ``stage`` (``train.stage{stage}_optimizer``, schedule over the stage's steps)."""
  return training.make_optimizer(train_config[f"stage{stage}_optimizer"],
                                 int(train_config[f"stage{stage}_steps"]))


def abstract_state(parts: Parts, tx: optax.GradientTransformation, stage: int) -> dict[str, Any]:
  """``ShapeDtypeStruct`` pytree, with shardings, of a stage's train state (restore target).

  ``{"adapter", "opt"}`` in stage 1, ``{"adapter", "decoder", "opt"}`` in stage 2; the optimizer's
  moments are sharded like their parameters, its counters replicated.
  """
  trainable = {"adapter": parts.adapter_fm.abstract_params()}
  shardings = {"adapter": parts.adapter_fm.shardings}
  if stage == 2:
    trainable["decoder"] = parts.decoder_fm.abstract_params()
    shardings["decoder"] = parts.decoder_fm.shardings
  opt = jax.eval_shape(tx.init, trainable)
  repl = parallel.replicated(parts.mesh)
  opt_shardings = optax.tree_map_params(tx, lambda _, s: s, opt, shardings,
                                        transform_non_params=lambda _: repl)
  opt = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), opt,
                     opt_shardings)
  return {**trainable, "opt": opt}


def make_train_step(parts: Parts, optimizer: optax.GradientTransformation, *, stage: int,
                    target_start: int, state_shardings, decoder_shardings, batch_sharding):
  """The jitted step ``(state, decoder_params, batch) -> (state, metrics)``.

  ``state`` is ``{"adapter", "opt"}`` in stage 1 and ``{"adapter", "decoder", "opt"}`` in stage 2
  (then the separate ``decoder_params`` argument is ignored). Only ``state`` is donated; the
  metrics (``loss``, ``target_tokens``, ``grad_norm``, ``adapter_norm``: [] float32) are replicated.
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


@dataclasses.dataclass(frozen=True)
class _Stage:
  """One stage's compiled pieces: ``init(adapter, decoder) -> state`` and ``step``."""

  abstract: dict[str, Any]
  init: Callable
  step: Callable


class TrainLoop:
  """Runs (or resumes) both stages; a step compiles once per stage for the loop's lifetime.

  Args:
    train_config: ``config.train``.
    parts: from ``model.build_parts``.
    data: training examples; fixes the batch shapes (``data.prompt_len`` is the loss's
      ``target_start``).

  Raises:
    ConfigError: ``train.batch_size`` is not a multiple of the mesh's data parallelism.
  """

  def __init__(self, train_config, parts: Parts, data: Dataset):
    training.check_divisible(train_config.batch_size, parts.mesh, "config.train.batch_size")
    self.config = train_config
    self.parts = parts
    self.data = data
    self.stage_steps = {s: int(train_config[f"stage{s}_steps"]) for s in STAGES}
    self.total = sum(self.stage_steps.values())
    self.pad_id = parts.tokenizer.pad_id
    example = data.batch(0, train_config.batch_size, train_config.seed, self.pad_id)
    self.batch_shardings = training.batch_shardings(example, parts.mesh)
    self._stages = {s: self._build(s) for s in STAGES}

  def _build(self, stage: int) -> _Stage:
    parts = self.parts
    tx = stage_optimizer(self.config, stage)
    abstract = abstract_state(parts, tx, stage)
    shardings = jax.tree.map(lambda x: x.sharding, abstract)

    def init(adapter_params, decoder_params):
      # Copies: the state is donated, the caller's arrays must survive.
      trainable = {"adapter": jax.tree.map(jnp.copy, adapter_params)}
      if stage == 2:
        trainable["decoder"] = jax.tree.map(jnp.copy, decoder_params)
      return {**trainable, "opt": tx.init(trainable)}

    step = make_train_step(parts, tx, stage=stage, target_start=self.data.prompt_len,
                           state_shardings=shardings, decoder_shardings=parts.decoder_fm.shardings,
                           batch_sharding=self.batch_shardings)
    return _Stage(abstract, jax.jit(init, out_shardings=shardings), step)

  def _fresh_state(self, stage: int, adapter_params, decoder_params) -> dict[str, Any]:
    with jax.set_mesh(self.parts.mesh):
      return self._stages[stage].init(adapter_params, decoder_params)

  def train(self, workdir: str, decoder_params, meta_extra: Mapping[str, Any] | None = None,
            stop_after: int | None = None) -> tuple[dict[str, Any], Any, list[dict[str, Any]]]:
    """Trains from the latest checkpoint of ``workdir`` (or from scratch) to the last step.

    Args:
      workdir: run folder (``checkpoints/``, ``metrics.jsonl``).
      decoder_params: the initial (pretrained) decoder parameters.
      meta_extra: JSON metadata saved with every checkpoint.
      stop_after: stop (after saving) once this global step is reached (tests of resume).

    Returns:
      ``(final state, decoder params, train records)``.
    """
    tc = self.config
    mesh = self.parts.mesh
    s1, total = self.stage_steps[1], self.total
    ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"),
                                   max_to_keep=int(tc.max_to_keep))
    meta = dict(meta_extra or {})
    latest = ckpt.latest_step()
    if latest is None:
      step, stage = 0, 1 if s1 > 0 else 2
      state = self._fresh_state(stage, self.parts.adapter_init(), decoder_params)
    else:
      # The stage of a checkpoint decides its structure: the target is read from its metadata.
      step, state, saved = ckpt.restore(
          target=lambda m: self._stages[int(m["stage"])].abstract)
      stage = int(saved["stage"])
      if stage == 2:
        decoder_params = state["decoder"]
      logging.info("resumed ELM training from step %d (stage %d) in %s", step, stage,
                   ckpt.directory)
    writer = training.MetricsWriter(workdir, resume_step=step if latest is not None else None)
    records: list[dict[str, Any]] = []
    progress = training.Progress(total, initial=step, desc="elm", keys=("loss",))
    t_last, n_last = time.perf_counter(), step
    window: list = []

    def save(s, st):
      ckpt.save(s, st, {**meta, "stage": stage, "step": s, "stage1_steps": s1,
                        "stage2_steps": self.stage_steps[2]}, force=True)

    guard = preemption.Guard().__enter__()
    try:
      while step < total:
        if stage == 1 and step >= s1:  # (step s1 was saved at the end of stage 1)
          stage = 2
          state = self._fresh_state(2, state["adapter"], decoder_params)
        batch = jax.device_put(self.data.batch(step, tc.batch_size, tc.seed, self.pad_id),
                               self.batch_shardings)
        with jax.set_mesh(mesh):
          state, m = self._stages[stage].step(state, decoder_params, batch)
        window.append(m)
        training.bound_in_flight(window)
        step += 1
        end_of_stage = step == s1 or step == total
        if step % tc.log_every == 0 or end_of_stage:
          now = time.perf_counter()
          host = jax.device_get(window)
          # Token-weighted mean loss over the steps since the last record (a single batch of a
          # few examples is too noisy to follow), other metrics of the last step.
          tokens = sum(float(h["target_tokens"]) for h in host)
          mean_loss = sum(float(h["loss"]) * float(h["target_tokens"]) for h in host) / max(
              tokens, 1.0)
          rec = writer.write(step, {**host[-1], "loss_window": mean_loss,
                                    "window_steps": len(host), "stage": stage,
                                    "seconds_per_step": (now - t_last) / max(step - n_last, 1)})
          t_last, n_last, window = now, step, []
          records.append(rec)
        progress.update(1, jax.device_get(m) if step % tc.log_every == 0 else None)
        stop = guard.should_stop(step)
        if step % tc.save_every == 0 or end_of_stage or stop:
          save(step, state)
        if stop:
          ckpt.wait()
          raise preemption.Preempted(step, ckpt.directory)
        if stop_after is not None and step >= stop_after:
          break
    finally:
      guard.__exit__()
      progress.close()
      writer.close()
      ckpt.close()
    if stage == 2:
      decoder_params = state["decoder"]
    return state, decoder_params, records


def restore_trained(directory: str, parts: Parts, train_config) -> tuple[dict[str, Any], dict]:
  """The trained parameters of the newest intact checkpoint in ``directory``.

  Args:
    directory: a ``checkpoints/`` folder written by ``TrainLoop.train``.
    parts: the ELM's pieces (the restored parameters are placed by their shardings).
    train_config: ``config.train`` of the run (the optimizer state's structure).

  Returns:
    ``(params, meta)``: ``params`` has ``adapter`` and, after stage 2, ``decoder``; ``meta`` is the
    checkpoint's metadata.

  Raises:
    FileNotFoundError: no checkpoint in ``directory``.
  """
  def target(meta):
    stage = int(meta["stage"])
    return abstract_state(parts, stage_optimizer(train_config, stage), stage)

  ckpt = checkpoint.Checkpointer(directory)
  try:
    if ckpt.latest_step() is None:
      raise FileNotFoundError(f"no ELM checkpoint in {directory}")
    _, state, meta = ckpt.restore(target=target)
  finally:
    ckpt.close()
  return {k: v for k, v in state.items() if k != "opt"}, meta
