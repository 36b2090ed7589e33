"""AOT check of a (paper-scale) agent config without data or models: mesh, sharded shapes, RL step.

``launch.train --dry_run`` runs it; on CPU use fake devices
(``XLA_FLAGS=--xla_force_host_platform_device_count=8``).

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
import os
import re
import time
from typing import Any

import jax

from eagle_jax import parallel, training
from eagle_jax.agent import rollout
from eagle_jax.agent.trainer import Learner, validate
from eagle_jax.embed import wals
from eagle_jax.models import configs as model_configs
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
    if spec.shapes:
      return AgentDecoder(model_configs.preset(spec.shapes), None, None, f"preset:{spec.shapes}")
    path = os.path.join(spec.decoder, "config.json")
    if os.path.isfile(path):
      return AgentDecoder(model_configs.config_from_hf(files.read_json(path)), None, None,
                          spec.decoder)
  except files.LoadingError as e:
    raise training.ConfigError(f"config.policy.lm: decoder shapes: {e}") from e
  raise training.ConfigError(
      "config.policy.lm.shapes: the dry run needs the agent decoder's shapes: a preset "
      f"{sorted(model_configs.PRESETS)} or a safetensors folder with config.json in "
      f"config.policy.lm.decoder (got {spec.decoder!r})")


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


def memory_report(compiled, batch_size: int, batch_shards: int, states: str) -> dict[str, Any]:
  """Per-device memory of ``compiled`` and the fit on a v5e chip (16 GiB): the batch-independent
  part (arguments, outputs not aliased to them, code) plus temporaries taken as linear in the
  batch through 0 (temp / batch per episode: an upper bound on the slope, so the largest batch
  is a lower bound); batches are multiples of ``batch_shards`` (``states``: what the smallest
  batch puts on one device)."""
  m = compiled.memory_analysis()
  mem = {name: int(getattr(m, f"{name}_size_in_bytes")) for name in
         ("argument", "output", "alias", "temp", "generated_code")}
  fixed = mem["argument"] + mem["output"] - mem["alias"] + mem["generated_code"]
  total = fixed + mem["temp"]
  per_episode = mem["temp"] / batch_size
  largest = int((HBM_BYTES - fixed) // per_episode) if per_episode > 0 else batch_size
  largest = max(largest // batch_shards * batch_shards, 0)
  gib = lambda x: round(x / GIB, 3)  # noqa: E731
  fits = total <= HBM_BYTES
  verdict = (f"batch {batch_size} needs {gib(total)} GiB per device: "
             f"{'fits' if fits else 'does NOT fit'} in 16 GiB (v5e chip); largest batch that fits "
             f"(a multiple of {batch_shards}, temp linear in batch): {largest}")
  if not largest:
    verdict += (f"; the smallest batch, {batch_shards} ({states} per device), needs "
                f"~{gib(fixed + per_episode * batch_shards)} GiB")
  return {
      "per_device_bytes": {**mem, "total": total},
      "per_device_gib": {**{k: gib(v) for k, v in mem.items()}, "total": gib(total)},
      "v5e_fit": {"hbm_gib_per_chip": gib(HBM_BYTES), "batch": batch_size, "fits": fits,
                  "fixed_gib": gib(fixed), "temp_gib_per_episode": gib(per_episode),
                  "largest_batch": largest, "verdict": verdict},
  }


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
    try:
      wals_config = wals.WALSConfig.from_config(config.wals.wals)
    except ValueError as e:
      raise training.ConfigError(f"config.wals.wals: {e}") from e
    # Z is the space of the augmented WALS vectors (``World``'s item and user tables).
    s_dim, a_dim = rollout.feature_dims(job.text_dim, wals.augmented_dim(wals_config), job.horizon)
    learner = Learner(job, s_dim, a_dim, mesh)
  b = job.rl.batch_size
  t0 = time.perf_counter()
  lowered = learner.lower_rl_step(b, job.horizon, job.num_actions)
  t1 = time.perf_counter()
  compiled = lowered.compile()
  t2 = time.perf_counter()
  abstract = learner.abstract_state()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) and cost else cost
  flops = float(cost.get("flops", float("nan"))) if isinstance(cost, dict) else float("nan")
  report = {
      "mesh": dict(mesh.shape), "devices": int(mesh.size), "compiled": compiled is not None,
      "lower_seconds": round(t1 - t0, 1), "compile_seconds": round(t2 - t1, 1),
      "param_count": learner.model.num_params(), "state_dim": s_dim, "action_dim": a_dim,
      "param_shardings": _specs(abstract["params"], lm),
      "batch_sharding": {"state": str(parallel.named_sharding(mesh, ("batch", None, None)).spec)},
      # cost_analysis() is per device (the partitioned program); the step's total is x devices.
      "flops_per_step": flops * mesh.size, "flops_per_step_per_device": flops,
      "rl_batch": {"episodes": b, "horizon": job.horizon, "candidates": job.num_actions},
  }
  batch_shards = training.data_parallelism(mesh)
  report["memory"] = memory_report(compiled, b, batch_shards,
                                   f"{job.horizon} states x {job.num_actions} candidates")
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
        "candidate_tokens_per_step": b * job.horizon * job.num_actions * a_dim}
    report["param_counts"] = {
        "trainable": _count(params), "lora": _count(params, lambda p: "lora" in p),
        "value_head": _count(params, lambda p: "value_head" in p),
        "frozen_base": _count(frozen), "total": _count(params) + _count(frozen)}
    report["frozen_shardings"] = _specs(frozen, True)
  return report
