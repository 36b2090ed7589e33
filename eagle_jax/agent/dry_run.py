"""AOT check of a (paper-scale) agent config without data or models: mesh, sharded shapes, RL step.

``launch.train --dry_run`` runs it; on CPU use fake devices
(``XLA_FLAGS=--xla_force_host_platform_device_count=8``).
"""

from __future__ import annotations

import time
from typing import Any

import jax

from eagle_jax import parallel, training
from eagle_jax.agent import rollout
from eagle_jax.agent.trainer import Learner, validate
from eagle_jax.embed import wals


def dry_run(config, devices=None) -> dict[str, Any]:
  """Validates a (paper-scale) config without data or models: builds the mesh, the sharded
  parameter and optimizer shapes (``jax.eval_shape``) and AOT-lowers and compiles the RL step.

  Runs on fake devices: ``XLA_FLAGS=--xla_force_host_platform_device_count=8``.
  """
  mesh = training.build_mesh(config.mesh, devices=devices)
  job = validate(config, mesh, inputs=False)
  try:
    wals_config = wals.WALSConfig.from_config(config.wals.wals)
  except ValueError as e:
    raise training.ConfigError(f"config.wals.wals: {e}") from e
  # Z is the space of the augmented WALS vectors (``World``'s item and user tables).
  s_dim, a_dim = rollout.feature_dims(job.text_dim, wals.augmented_dim(wals_config), job.horizon)
  learner = Learner(job, s_dim, a_dim, mesh)
  t0 = time.perf_counter()
  lowered = learner.lower_rl_step(job.rl.batch_size, job.horizon, job.num_actions)
  compiled = lowered.compile()
  abstract = learner.abstract_state()
  param_specs = {"/".join(map(str, path)): str(x.sharding.spec) for path, x in
                 jax.tree_util.tree_flatten_with_path(abstract["params"])[0]
                 for path in [[getattr(k, "key", k) for k in path]]}
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) and cost else cost
  return {
      "mesh": dict(mesh.shape), "devices": int(mesh.size), "compiled": compiled is not None,
      "compile_seconds": time.perf_counter() - t0,
      "param_count": learner.model.num_params(), "state_dim": s_dim, "action_dim": a_dim,
      "param_shardings": param_specs,
      "batch_sharding": {"state": str(parallel.named_sharding(mesh, ("batch", None, None)).spec)},
      "flops_per_step": float(cost.get("flops", float("nan"))) if isinstance(cost, dict) else None,
  }
