"""Environment transfer (the paper's Table 3): test trained agents with another environment LLM.

The agents, their references, the anchors with their descriptions x_0, the candidate action sets and
the user profiles are frozen from training (the run's ``world.json`` world); only the LLM that
rewrites a description after an action changes. The test world shares the training world's E_D,
latent tables, utility and policy features, so a gain difference between the two environments is
the environment's doing. Transitions of the test LLM go through their own response cache
(``<workdir>/env/transfer_cache.jsonl``; keys name the answering model) and, as in training, the
test tree is prefetched level by level when ``config.env.prefetch_depth`` is set.

Report section ``transfer``: the test model's cache identity beside the training one, a full split
report (the same policies and comparisons as the main report) under the test environment, and per
split and policy the gain in both environments with the paired difference (test - train, same pairs
and action draws) and its interval.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
from typing import Any

from absl import logging

from eagle_jax import checks
from eagle_jax.agent import world as world_lib
from eagle_jax.env import stack


@dataclasses.dataclass(frozen=True)
class TransferConfig:
  """``config.eval.transfer``: ``enabled`` and the test environment's ``llm`` block."""

  enabled: bool
  llm: Any

  @classmethod
  def from_config(cls, transfer) -> TransferConfig:
    """Raises ``ConfigError`` naming the ``config.eval.transfer.llm`` field that is wrong."""
    try:
      stack.check_llm_config(transfer.llm, "config.eval.transfer.llm")
    except ValueError as e:
      raise checks.ConfigError(str(e)) from None
    return cls(enabled=bool(transfer.enabled), llm=transfer.llm)


def open_world(config, tcfg: TransferConfig, world: world_lib.World, workdir: str
               ) -> world_lib.World:
  """``world`` with its environment LLM replaced by ``tcfg.llm`` (everything else shared)."""
  llm = stack.open_llm(tcfg.llm, os.path.join(workdir, "env", "transfer_cache.jsonl"),
                       field="config.eval.transfer.llm")
  if llm.model_name == world.llm.model_name:
    raise checks.ConfigError(
        f"config.eval.transfer.llm: the test environment is the training one ({llm.model_name}); "
        "set another gguf or server")
  test = dataclasses.replace(world, env=world.env.with_client(llm.client), llm=llm,
                             info={**world.info, "env_model": llm.model_name})
  depth = int(config.env.prefetch_depth)
  if depth > 0:
    n, _ = asyncio.run(world_lib.prefetch_tree(test, sorted(test.anchors), depth))
    logging.info("transfer: %d states prefetched with %s", n, llm.model_name)
  return test


def report(train_world: world_lib.World, test_world: world_lib.World, train_episodes,
           test_episodes, test_splits: dict[str, Any], confidence: float, mean_ci
           ) -> dict[str, Any]:
  """The ``transfer`` section (module docstring).

  Args:
    train_world, test_world: the two worlds (model names, transition counters).
    train_episodes, test_episodes: split -> policy -> ``rollout.Episodes`` in each environment,
      drawn with the same keys on the same pairs.
    test_splits: the split reports of the test environment (``agent_eval._split_report``).
    confidence: interval level.
    mean_ci: ``[N] values -> {mean, ci_low, ci_high, ...}``.
  """
  side = {}
  for split, by_policy in test_episodes.items():
    side[split] = {}
    for name, ep in by_policy.items():
      n = len(test_splits[split]["policies"][name]["gain_per_pair"])
      test_gain = ep.reward.reshape(n, -1).mean(1)
      train_gain = train_episodes[split][name].reward.reshape(n, -1).mean(1)
      side[split][name] = {"train_env_gain": mean_ci(train_gain, confidence),
                           "test_env_gain": mean_ci(test_gain, confidence),
                           "test_minus_train": mean_ci(test_gain - train_gain, confidence)}
  return {"train_env_model": train_world.llm.model_name,
          "test_env_model": test_world.llm.model_name,
          "test_env": {"transitions": test_world.env.steps,
                       "parse_failures": test_world.env.parse_failures},
          "side_by_side": side, "splits": test_splits}
