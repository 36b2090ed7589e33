"""Reference policies of EAGLE (paper section 5.3) and the targets the reference network learns.

The reference policy pi_ref is a network of the agent's architecture trained by cross-entropy on
target distributions q(.|s) over the K candidates of states s visited by uniformly random rollouts
on the training pairs (``reference_dataset``):

* ``uniform``: q = 1/K.
* ``optimistic``: every candidate is tried through the environment, q = one-hot on the candidate whose
  next state has the highest utility for the episode's user (the best next-step utility found;
  ties go to the lowest index).
* ``g_optimal``: every candidate is tried, the next states are embedded with E_D, a G-optimal design
  pi* over those K embeddings is solved (``design.g_optimal_design``, Frank-Wolfe), m exploratory
  actions are drawn from pi* (``design.sample_exploratory_actions``) and q is uniform on them.

Choice where the paper is silent: the design is computed on next-state embeddings centred at the
item mean and projected on the top ``design_dim`` principal directions of the item table. With K
candidates and d > K latent dimensions the K raw embeddings are linearly independent and the G-optimal
design is uniform (Kiefer-Wolfowitz: weights 1/K, g = K); the projection makes the design select the
actions that span the main directions of behavioural variation. ``design_dim=0`` uses raw Z.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np

from eagle_jax import design as design_lib
from eagle_jax.agent import rollout
from eagle_jax.agent import world as world_lib
from eagle_jax.agent.world import World
from eagle_jax.training import ConfigError

KINDS = ("uniform", "optimistic", "g_optimal")


def check_kind(kind: str, field: str = "config.reference.kind") -> str:
  if kind not in KINDS:
    raise ConfigError(f"{field}={kind!r} is not a reference policy; expected one of {KINDS}")
  return kind


def uniform_targets(mask: np.ndarray) -> np.ndarray:
  """[N, K] bool -> [N, K] uniform over valid candidates."""
  m = mask.astype(np.float32)
  return m / m.sum(-1, keepdims=True)


def optimistic_targets(child_utility: np.ndarray, mask: np.ndarray) -> np.ndarray:
  """[N, K] next-state utilities -> [N, K] one-hot on the best valid candidate (lowest index on
  ties)."""
  best = np.argmax(np.where(mask, child_utility, -np.inf), axis=-1)
  out = np.zeros(child_utility.shape, np.float32)
  out[np.arange(len(best)), best] = 1.0
  return out


def principal_projection(item_table: np.ndarray, dim: int) -> tuple[np.ndarray, np.ndarray]:
  """(mean [d], P [d, dim]) of the items' top ``dim`` principal directions."""
  mean = item_table.mean(0)
  _, _, vt = np.linalg.svd(item_table - mean, full_matrices=False)
  return mean.astype(np.float32), vt[:dim].T.astype(np.float32)


def g_optimal_targets(key: jax.Array, child_z: np.ndarray, *, m: int, eps: float,
                      max_iters: int, ridge: float, projection=None
                      ) -> tuple[np.ndarray, design_lib.Design]:
  """Targets from the G-optimal design over next-state embeddings.

  Args:
    key: PRNG key of the exploratory draws.
    child_z: [N, K, d] E_D embeddings of the K next states of each of N states.
    m: exploratory actions per state (<= K).
    eps, max_iters, ridge: Frank-Wolfe settings (``design.g_optimal_design``).
    projection: optional ``(mean [d], P [d, r])``: the design runs on (z - mean) @ P.

  Returns:
    ``(targets [N, K], design)``: q uniform on the m drawn actions, and the design solved.
  """
  z = np.asarray(child_z, np.float32)
  if projection is not None:
    mean, p = projection
    z = (z - mean) @ p
  design = design_lib.g_optimal_design(z, eps=eps, max_iters=max_iters, ridge=ridge)
  chosen = np.asarray(design_lib.sample_exploratory_actions(key, z, design, m))
  out = np.zeros(z.shape[:2], np.float32)
  np.put_along_axis(out, chosen, 1.0 / m, axis=-1)
  return out, design


@dataclasses.dataclass
class ReferenceData:
  """States and targets for the reference network: state [N, S], action_feats [N, K, A],
  mask [N, K], targets [N, K]; ``stats`` records design certificates and sizes."""

  state: np.ndarray
  action_feats: np.ndarray
  mask: np.ndarray
  targets: np.ndarray
  stats: dict

  def __len__(self) -> int:
    return len(self.state)


async def reference_dataset(kind: str, world: World, featurizer: rollout.Featurizer,
                            config, key: jax.Array) -> ReferenceData:
  """Visits states with uniformly random rollouts and labels them with ``kind``'s targets.

  Args:
    kind: one of ``KINDS``.
    world, featurizer: the run's world and features.
    config: ``config.reference`` (episodes, batch_size, design settings) plus ``horizon`` and
      ``seed`` via the caller's ``ConfigDict``.
    key: PRNG key (rollout draws and exploratory draws).
  """
  check_kind(kind)
  r = config.reference
  horizon = int(config.rl.horizon)
  states, users, items, steps = [], [], [], []
  seen = set()
  n_batches = -(-int(r.episodes) // int(r.rollout_batch))
  for b in range(n_batches):
    pairs = rollout.sample_pairs(world.train_pairs, int(r.rollout_batch), int(config.seed) + 7, b)
    ep = await rollout.collect(world, featurizer, None, pairs, jax.random.fold_in(key, b),
                               horizon=horizon, reward=config.utility.reward)
    for (u, i), row in zip(ep.pairs, ep.texts):
      for t in range(horizon):
        ident = (int(u), int(i), row[t], t)
        if ident not in seen:
          seen.add(ident)
          states.append(row[t])
          users.append(int(u))
          items.append(int(i))
          steps.append(t)
  users_a, items_a, steps_a = np.asarray(users), np.asarray(items), np.asarray(steps)
  state = featurizer.state(users_a, states, steps_a)
  feats, mask = featurizer.actions(items_a)
  stats: dict = {"states": len(states), "kind": kind}
  if kind == "uniform":
    targets = uniform_targets(mask)
  else:
    children = await world_lib.expand(world, states, items_a)
    flat = [c for row in children for c in row]
    k = world.num_actions
    if kind == "optimistic":
      u = world.env.text_utility(flat, np.repeat(users_a, k))["utility"].reshape(-1, k)
      targets = optimistic_targets(u, mask)
    else:
      z = world.env.embed(flat).reshape(len(states), k, -1)
      proj = (principal_projection(np.asarray(world.env.item_table), int(r.design_dim))
              if int(r.design_dim) > 0 else None)
      targets, design = g_optimal_targets(
          jax.random.fold_in(key, 10_000), z, m=int(r.exploratory_m), eps=float(r.design_eps),
          max_iters=int(r.design_max_iters), ridge=float(r.design_ridge), projection=proj)
      stats.update(design_g_over_rank=float(np.max(np.asarray(design.g_value)
                                                   / np.asarray(design.rank))),
                   design_converged=float(np.mean(np.asarray(design.converged))),
                   design_support=float(np.mean(np.sum(np.asarray(design.weights) > 1e-6, -1))))
  return ReferenceData(state, feats, mask, targets.astype(np.float32), stats)
