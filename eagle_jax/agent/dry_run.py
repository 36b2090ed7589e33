"""AOT check of a (paper-scale) agent config without data or models: mesh, sharded shapes, RL step.

``launch.train --dry_run`` runs it; on CPU use fake devices
(``XLA_FLAGS=--xla_force_host_platform_device_count=8``).

With a decoder-backed E_D (``config.encoder.backbone="decoder"``) the report's ``encoder`` section
is the AOT-compiled E_D training step (``embed.decoder_encoder.dry_run_report``).

For a language-model agent (``policy.kind="lm_choice"``) the decoder is abstract: its shapes come
from ``config.policy.lm.shapes`` (a ``models.configs.PRESETS`` name) or the ``config.json`` of the
safetensors folder ``config.policy.lm.decoder``; no weight is read or allocated. The report then
adds the compiled step's per-device memory (``compiled.memory_analysis()``), the trainable (LoRA +
value head) and frozen (base) parameter counts, and what fits on a TPU v5e-8 (16 GiB HBM per chip).

Per device: XLA compiles the SPMD-partitioned program of one device, so ``memory_analysis()``
and ``cost_analysis()`` are per device (a matmul sharded 8 ways reports 1/8 of its FLOPs). The fit
is an estimate from the CPU compiler's buffer assignment; the TPU compiler fuses and schedules
differently.
"""

from __future__ import annotations

import math
import re
import time
from typing import Any

import jax

from eagle_jax import parallel, training
from eagle_jax.agent import rollout
from eagle_jax.agent.learner import Learner
from eagle_jax.agent.trainer import validate
from eagle_jax.embed import wals
from eagle_jax.models import configs as model_configs
from eagle_jax.models import decoder as decoder_lib
from eagle_jax.models import files

GIB = 1024**3
HBM_BYTES = 16 * GIB  # TPU v5e: 16 GiB HBM per chip
V5E_PEAK_FLOPS = 197e12  # TPU v5e: bf16 peak per chip


def abstract_decoder(spec):
  """The agent decoder's shapes without its weights: ``AgentDecoder(config, None, None, source)``.

  Raises:
    ConfigError: no preset and no ``config.json`` to read the shapes from.
  """
  from eagle_jax.agent.lm_features import AgentDecoder  # noqa: PLC0415

  try:
    config = decoder_lib.abstract_config(spec.shapes, spec.decoder)
  except files.LoadingError as e:
    raise training.ConfigError(f"config.policy.lm: decoder shapes: {e}") from e
  if config is None:
    raise training.ConfigError(
        "config.policy.lm.shapes: the dry run needs the agent decoder's shapes: a preset "
        f"{sorted(model_configs.PRESETS)} or a safetensors folder with config.json in "
        f"config.policy.lm.decoder (got {spec.decoder!r})")
  return AgentDecoder(config, None, None, f"preset:{spec.shapes}" if spec.shapes else spec.decoder)


def _specs(tree, collapse: bool) -> dict[str, str]:
  """'a/b/c' -> str(PartitionSpec) of an abstract pytree (``collapse``: one entry for all layers,
  ``layers/*``)."""
  out = {}
  for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
    name = "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)
    out[re.sub(r"/layers/\d+/", "/layers/*/", name) if collapse else name] = str(x.sharding.spec)
  return out


def _count(tree, pred=lambda name: True) -> int:
  return int(sum(math.prod(x.shape) for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]
                 if pred(jax.tree_util.keystr(path))))


def memory_report(compiled, batch_size: int, batch_shards: int, states: str,
                  microbatches: int = 1) -> dict[str, Any]:
  """Per-device memory of ``compiled`` and the fit on a v5e chip (16 GiB).

  The step processes its ``batch_size`` episodes in ``microbatches`` slices one after another
  (``rl.microbatches``), so its temporaries scale with the slice, B / M episodes. The estimate:
  the batch-independent part (arguments, outputs not aliased to them, code) plus temporaries taken
  as linear in the slice through 0 (temp / slice per episode: an upper bound on the slope, so the
  largest slice is a lower bound); slices are multiples of ``batch_shards`` (``states``: what one
  episode holds).
  """
  m = compiled.memory_analysis()
  mem = {name: int(getattr(m, f"{name}_size_in_bytes")) for name in
         ("argument", "output", "alias", "temp", "generated_code")}
  fixed = mem["argument"] + mem["output"] - mem["alias"] + mem["generated_code"]
  total = fixed + mem["temp"]
  slice_size = batch_size // microbatches
  per_episode = mem["temp"] / slice_size
  largest = int((HBM_BYTES - fixed) // per_episode) if per_episode > 0 else slice_size
  largest = max(largest // batch_shards * batch_shards, 0)
  gib = lambda x: round(x / GIB, 3)  # noqa: E731
  fits = total <= HBM_BYTES
  verdict = (f"batch {batch_size} in {microbatches} slice(s) of {slice_size} episodes needs "
             f"{gib(total)} GiB per device: {'fits' if fits else 'does NOT fit'} in 16 GiB (v5e "
             f"chip); largest slice that fits (a multiple of {batch_shards}, temp linear in the "
             f"slice): {largest} episodes")
  if largest:
    verdict += f", i.e. rl.microbatches >= {-(-batch_size // largest)} at batch {batch_size}"
  else:
    verdict += (f"; the smallest slice, {batch_shards} episodes (one per data shard: {states}), "
                f"needs ~{gib(fixed + per_episode * batch_shards)} GiB")
  return {
      "per_device_bytes": {**mem, "total": total},
      "per_device_gib": {**{k: gib(v) for k, v in mem.items()}, "total": gib(total)},
      "v5e_fit": {"hbm_gib_per_chip": gib(HBM_BYTES), "batch": batch_size,
                  "microbatches": microbatches, "fits": fits, "fixed_gib": gib(fixed),
                  "temp_gib_per_episode": gib(per_episode), "largest_slice": largest,
                  "verdict": verdict},
  }


def lm_step_flops(c, episodes: int, horizon: int, k: int, p: int, length: int, *,
                  remat: bool, full_finetune: bool) -> float:
  """Matmul FLOPs of one language-model RL step, counted from the shapes (XLA's
  ``cost_analysis`` counts a loop body once, and the step loops over slices and candidate chunks).

  Every state's P prompt tokens and K x L candidate tokens go through the agent's forward pass,
  the reference's forward pass, the agent's backward pass (activation gradients only when the
  base is frozen, about one forward; two with full fine-tuning) and, with ``remat``, one more
  forward. Per token and forward pass: 2 x (the projection weights of every layer + the V x D
  logits) + 4 x context x heads x head_dim per layer (context: P / 2 for prompt tokens, P + L / 2
  for candidate tokens).
  """
  d, hd = c.hidden, c.head_dim
  proj = c.layers * (d * c.heads * hd * 2 + d * c.kv_heads * hd * 2 + 3 * d * c.intermediate)
  dense = 2.0 * (proj + c.vocab_size * d)
  attn = lambda ctx: 4.0 * ctx * c.heads * hd * c.layers  # noqa: E731
  per_state = p * (dense + attn(p / 2)) + k * length * (dense + attn(p + length / 2))
  passes = 3 + (1 if full_finetune else 0) + (1 if remat else 0)
  return float(episodes * horizon * per_state * passes)


def dry_run(config, devices=None) -> dict[str, Any]:
  """Validates a (paper-scale) config without data or models: builds the mesh, the sharded
  parameter and optimizer shapes (``jax.eval_shape``) and AOT-lowers and compiles the RL step.

  Runs on fake devices: ``XLA_FLAGS=--xla_force_host_platform_device_count=8``.
  """
  mesh = training.build_mesh(config.mesh, devices=devices)
  job = validate(config, mesh, inputs=False)
  lm = job.policy.kind != "head"
  if lm:
    decoder = abstract_decoder(job.policy)
    learner = Learner(job, 0, 0, mesh, decoder)
    s_dim, a_dim = learner.model.state_dim, learner.model.action_dim
  else:
    # Z is the space of the augmented WALS vectors (``World``'s item and user tables).
    s_dim, a_dim = rollout.feature_dims(job.text_dim, wals.augmented_dim(_wals_config(config)),
                                        job.horizon)
    learner = Learner(job, s_dim, a_dim, mesh)
  b = job.rl.batch_size
  t0 = time.perf_counter()
  # Candidates per step in the RL batch: K, or the one written action of ``lm_generate``.
  k = 1 if learner.writes else job.num_actions
  lowered = learner.lower_rl_step(b, job.horizon, job.num_actions)
  t1 = time.perf_counter()
  compiled = lowered.compile()
  t2 = time.perf_counter()
  abstract = learner.abstract_state()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) and cost else cost
  flops = float(cost.get("flops", float("nan"))) if isinstance(cost, dict) else float("nan")
  xla_flops = flops
  if lm:  # cost_analysis counts the slice and chunk loops' bodies once
    lm_cfg = job.policy.lm
    flops = lm_step_flops(decoder.config, b, job.horizon, k, s_dim, a_dim,
                          remat=lm_cfg.remat, full_finetune=lm_cfg.full_finetune) / mesh.size
  report = {
      "mesh": dict(mesh.shape), "devices": int(mesh.size), "compiled": compiled is not None,
      "lower_seconds": round(t1 - t0, 1), "compile_seconds": round(t2 - t1, 1),
      "param_count": learner.model.num_params(), "state_dim": s_dim, "action_dim": a_dim,
      "param_shardings": _specs(abstract["params"], lm),
      "batch_sharding": {"state": str(parallel.named_sharding(mesh, ("batch", None, None)).spec)},
      # Per device (the partitioned program); the step's total is x devices. The head's from
      # XLA's cost_analysis, the language model's counted from its shapes (``lm_step_flops``).
      "flops_per_step": flops * mesh.size, "flops_per_step_per_device": flops,
      "xla_cost_analysis_flops_per_device": xla_flops,  # loop bodies (slices, chunks) once
      "rl_batch": {"episodes": b, "horizon": job.horizon, "candidates": k},
  }
  batch_shards = training.data_parallelism(mesh)
  report["memory"] = memory_report(compiled, b, batch_shards,
                                   f"{job.horizon} states x {k} candidates",
                                   job.rl.microbatches)
  report["v5e_seconds_per_step_at_peak"] = round(flops / V5E_PEAK_FLOPS, 3)
  if lm:
    params, frozen = abstract["params"], learner.model.frozen
    c = decoder.config
    report["decoder"] = {
        "source": decoder.source, "vocab_size": c.vocab_size, "hidden": c.hidden,
        "intermediate": c.intermediate, "layers": c.layers, "heads": c.heads,
        "kv_heads": c.kv_heads, "head_dim": c.head_dim, "tie_embeddings": c.tie_embeddings,
        "param_dtype": str(jax.numpy.dtype(c.param_dtype)),
        "compute_dtype": job.policy.lm.compute_dtype,
        "prompt_tokens": s_dim, "action_tokens": a_dim,
        "candidate_tokens_per_step": b * job.horizon * k * a_dim}
    report["param_counts"] = {
        "trainable": _count(params), "lora": _count(params, lambda p: "lora" in p),
        "value_head": _count(params, lambda p: "value_head" in p),
        "frozen_base": _count(frozen), "total": _count(params) + _count(frozen)}
    report["frozen_shardings"] = _specs(frozen, True)
  if str(config.encoder.get("backbone", "minilm")) == "decoder":
    from eagle_jax.embed import decoder_encoder  # noqa: PLC0415

    enc = config.encoder.decoder
    report["encoder"] = decoder_encoder.dry_run_report(
        enc, training.build_mesh(enc.mesh, "config.encoder.decoder.mesh", devices=devices),
        int(enc.batch_size), out_dim=wals.augmented_dim(_wals_config(config)))
  return report


def _wals_config(config) -> wals.WALSConfig:
  try:
    return wals.WALSConfig.from_config(config.wals.wals)
  except ValueError as e:
    raise training.ConfigError(f"config.wals.wals: {e}") from e
