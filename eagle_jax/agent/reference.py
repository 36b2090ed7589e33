"""Reference policies of EAGLE (paper section 5.3) and the targets the reference network learns.

The reference policy pi_ref is a network of the agent's architecture trained by cross-entropy on
target distributions q(.|s) over the K candidates of a set of states (``reference_dataset``), chosen
by ``config.reference.states``:

* ``anchors`` (the paper: q(x) for the dataset's movies x): each training anchor's plot, paired with
  ``users_per_anchor`` of its training users; the K children of each anchor are computed once
  (anchors x K transitions).
* ``rollout``: every distinct state visited by ``episodes`` uniformly random rollouts on the
  training pairs (about episodes x H states, each with K children).

States are labelled ``chunk`` at a time: their features, children and targets exist for one chunk
only, so host memory is bounded by the chunk, not the dataset. A chunk's transitions go through
``ContentGapEnv.step`` (at most ``env.max_in_flight`` requests outstanding).

The kinds live in one registry, ``REFERENCES`` (name -> ``ReferenceKind``); ``lookup`` resolves a
configured name once, at the job's entry (``trainer.validate``):

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
from collections.abc import Awaitable, Callable

import jax
import numpy as np

from eagle_jax import design as design_lib
from eagle_jax.agent import rollout
from eagle_jax.agent import world as world_lib
from eagle_jax.agent.world import World
from eagle_jax.training import ConfigError, Progress

# How the labelled states are chosen (``config.reference.states``; module docstring).
STATES = ("anchors", "rollout")


@dataclasses.dataclass(frozen=True)
class LabelConfig:
  """How the reference states are visited and labelled (``config.reference``, validated by
  ``trainer.validate``).

  Attributes:
    episodes: uniformly random episodes that visit the states (``states="rollout"``).
    rollout_batch: episodes per rollout batch.
    exploratory_m: m, exploratory actions per state (``g_optimal``; in [1, K]).
    design_dim: principal directions the design runs in (0: raw Z).
    design_eps, design_max_iters, design_ridge: Frank-Wolfe settings.
    states: one of ``STATES``: which states are labelled.
    users_per_anchor: users paired with each anchor (``states="anchors"``).
    chunk: states labelled together (features, children and targets of one chunk at a time).
  """

  episodes: int
  rollout_batch: int
  exploratory_m: int
  design_dim: int
  design_eps: float
  design_max_iters: int
  design_ridge: float
  states: str = "rollout"
  users_per_anchor: int = 1
  chunk: int = 4096

  @classmethod
  def from_config(cls, reference_config) -> LabelConfig:
    """Typed fields of ``config.reference`` (the caller has checked the ranges of the older
    fields; ``states``, ``users_per_anchor`` and ``chunk`` are checked here).

    Raises:
      ConfigError: naming the field.
    """
    r = reference_config
    states = r.get("states", "rollout")
    if states not in STATES:
      raise ConfigError(f"config.reference.states={states!r}: expected one of {STATES}")
    for name, default in (("users_per_anchor", 1), ("chunk", 4096)):
      v = r.get(name, default)
      if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ConfigError(f"config.reference.{name}={v!r}: expected an int >= 1")
    return cls(episodes=int(r.episodes), rollout_batch=int(r.rollout_batch),
               exploratory_m=int(r.exploratory_m), design_dim=int(r.design_dim),
               design_eps=float(r.design_eps), design_max_iters=int(r.design_max_iters),
               design_ridge=float(r.design_ridge), states=states,
               users_per_anchor=int(r.get("users_per_anchor", 1)),
               chunk=int(r.get("chunk", 4096)))


@dataclasses.dataclass(frozen=True)
class Visited:
  """The distinct states the random rollouts visited.

  Attributes:
    texts: N descriptions.
    users: [N] int users of their episodes.
    items: [N] int anchor items of their episodes.
    mask: [N, K] bool valid candidates.
  """

  texts: list[str]
  users: np.ndarray
  items: np.ndarray
  mask: np.ndarray


# (world, visited, config, key) -> (targets [N, K] float32, stats of the labelling).
Label = Callable[[World, Visited, LabelConfig, jax.Array], Awaitable[tuple[np.ndarray, dict]]]


@dataclasses.dataclass(frozen=True)
class ReferenceKind:
  """One reference policy of the registry.

  Attributes:
    name: its key in ``REFERENCES``; also the agent's folder (``<workdir>/agents/<name>``).
    label: computes the targets of the visited states (``Label``).
    tries_candidates: labelling sends every candidate of every visited state through the
      environment (N * K transitions on top of the rollouts).
  """

  name: str
  label: Label
  tries_candidates: bool


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


async def _next_states(world: World, visited: Visited) -> list[str]:
  """The K next descriptions of every visited state, flattened state-major: N * K texts. A
  (description, anchor) met several times (an anchor with several users) is expanded once."""
  keys = list(dict.fromkeys((x, int(i)) for x, i in zip(visited.texts, visited.items)))
  children = await world_lib.expand(world, [x for x, _ in keys],
                                    np.asarray([i for _, i in keys], np.int64))
  row = {k: j for j, k in enumerate(keys)}
  return [c for x, i in zip(visited.texts, visited.items) for c in children[row[(x, int(i))]]]


async def _label_uniform(world: World, visited: Visited, config: LabelConfig, key: jax.Array
                         ) -> tuple[np.ndarray, dict]:
  del world, config, key  # q = 1/K needs no environment.
  return uniform_targets(visited.mask), {}


async def _label_optimistic(world: World, visited: Visited, config: LabelConfig, key: jax.Array
                            ) -> tuple[np.ndarray, dict]:
  del config, key
  flat = await _next_states(world, visited)
  k = world.num_actions
  u = world.env.text_utility(flat, np.repeat(visited.users, k))["utility"].reshape(-1, k)
  return optimistic_targets(u, visited.mask), {}


async def _label_g_optimal(world: World, visited: Visited, config: LabelConfig, key: jax.Array
                           ) -> tuple[np.ndarray, dict]:
  flat = await _next_states(world, visited)
  k = world.num_actions
  z = world.env.embed(flat).reshape(len(visited.texts), k, -1)
  proj = (principal_projection(np.asarray(world.env.item_table), config.design_dim)
          if config.design_dim > 0 else None)
  targets, design = g_optimal_targets(
      jax.random.fold_in(key, 10_000), z, m=config.exploratory_m, eps=config.design_eps,
      max_iters=config.design_max_iters, ridge=config.design_ridge, projection=proj)
  stats = {"design_g_over_rank": float(np.max(np.asarray(design.g_value)
                                               / np.asarray(design.rank))),
           "design_converged": float(np.mean(np.asarray(design.converged))),
           "design_support": float(np.mean(np.sum(np.asarray(design.weights) > 1e-6, -1)))}
  return targets, stats


REFERENCES: dict[str, ReferenceKind] = {
    "uniform": ReferenceKind("uniform", _label_uniform, tries_candidates=False),
    "optimistic": ReferenceKind("optimistic", _label_optimistic, tries_candidates=True),
    "g_optimal": ReferenceKind("g_optimal", _label_g_optimal, tries_candidates=True),
}


def lookup(kind: str, field: str) -> ReferenceKind:
  """The registry entry of ``kind``.

  Raises:
    ConfigError: naming ``field`` and the known kinds when ``kind`` is not registered.
  """
  if kind not in REFERENCES:
    raise ConfigError(f"{field}={kind!r} is not a reference policy; known kinds: "
                      f"{tuple(REFERENCES)}")
  return REFERENCES[kind]


class SetRows:
  """Per-state candidate features stored once per action set (per anchor, or per state with
  per-state actions): indexing gathers the rows.

  ``rows[idx]`` is ``table[set_of[idx]]``: [len(idx), K, A]; with per-anchor sets the [N, K, A]
  array of every state is never built (at paper scale it would be ~17 GB).

  Args:
    table: [I, K, A] candidate features of the I distinct action sets.
    set_of: [N] int row of ``table`` of each state.
  """

  def __init__(self, table: np.ndarray, set_of: np.ndarray):
    self.table = table
    self.set_of = np.asarray(set_of, np.int64)

  @property
  def shape(self) -> tuple[int, ...]:
    return (len(self.set_of),) + tuple(self.table.shape[1:])

  def __len__(self) -> int:
    return len(self.set_of)

  def __getitem__(self, idx) -> np.ndarray:
    return self.table[self.set_of[idx]]

  def __array__(self, dtype=None, copy=None) -> np.ndarray:
    out = self.table[self.set_of]
    return out if dtype is None else out.astype(dtype)


@dataclasses.dataclass
class ReferenceData:
  """States and targets for the reference network: state [N, S], action_feats [N, K, A] (an
  ``SetRows``: indexed like an array), mask [N, K], targets [N, K]; ``stats`` records design
  certificates and sizes."""

  state: np.ndarray
  action_feats: SetRows
  mask: np.ndarray
  targets: np.ndarray
  stats: dict

  def __len__(self) -> int:
    return len(self.state)


async def _rollout_states(world: World, featurizer: rollout.Featurizer, config: LabelConfig, *,
                          seed: int, reward: str, key: jax.Array, progress: Progress
                          ) -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray]:
  """The distinct (user, anchor, text, t) states of ``config.episodes`` random episodes:
  (texts, [N] users, [N] items, [N] steps)."""
  states, users, items, steps = [], [], [], []
  seen = set()
  for b in range(-(-config.episodes // config.rollout_batch)):
    pairs = rollout.sample_pairs(world.train_pairs, config.rollout_batch, seed + 7, b)
    ep = await rollout.collect(world, featurizer, None, pairs, jax.random.fold_in(key, b),
                               reward=reward)
    for (u, i), row in zip(ep.pairs, ep.texts):
      for t in range(featurizer.horizon):
        ident = (int(u), int(i), row[t], t)
        if ident not in seen:
          seen.add(ident)
          states.append(row[t])
          users.append(int(u))
          items.append(int(i))
          steps.append(t)
    progress.update(1)
  return states, np.asarray(users), np.asarray(items), np.asarray(steps)


def anchor_states(world: World, users_per_anchor: int, seed: int
                  ) -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray]:
  """Each training anchor's plot with ``users_per_anchor`` of its training users (a seeded draw
  without replacement per anchor; all of them when it has fewer): (texts, [N] users, [N] items,
  [N] steps = 0), anchor-major in item order."""
  pairs = np.asarray(world.train_pairs)
  order = np.argsort(pairs[:, 1], kind="stable")
  items_sorted = pairs[order, 1]
  anchors, starts, counts = np.unique(items_sorted, return_index=True, return_counts=True)
  users, items = [], []
  for i, s, c in zip(anchors.tolist(), starts.tolist(), counts.tolist()):
    rng = np.random.default_rng([int(seed) + 7, i])
    pick = rng.choice(c, size=min(users_per_anchor, c), replace=False)
    users.extend(pairs[order[s + np.sort(pick)], 0].tolist())
    items.extend([i] * len(pick))
  texts = [world.anchors[i].state for i in items]
  return texts, np.asarray(users), np.asarray(items), np.zeros(len(items), np.int64)


def _merge_stats(parts: list[tuple[int, dict]]) -> dict:
  """Chunk statistics -> one: the design certificate's worst case, other numbers size-weighted."""
  out: dict = {}
  for name in {k for _, st in parts for k in st}:
    vals = [(n, st[name]) for n, st in parts if name in st]
    if name == "design_g_over_rank":
      out[name] = float(max(v for _, v in vals))
    else:
      out[name] = float(sum(n * v for n, v in vals) / max(sum(n for n, _ in vals), 1))
  return out


async def reference_dataset(kind: ReferenceKind, world: World, featurizer: rollout.Featurizer,
                            config: LabelConfig, *, seed: int, reward: str, key: jax.Array
                            ) -> ReferenceData:
  """The states ``config.states`` chooses, labelled with ``kind``'s targets ``config.chunk`` at a
  time (module docstring).

  Args:
    kind: the registry entry (``lookup``).
    world, featurizer: the run's world and features (episodes last ``featurizer.horizon`` steps).
    config: the visiting, chunking and design settings.
    seed: the run seed (rollout pairs and anchor users are drawn from ``seed + 7``).
    reward: the rollouts' reward kind (``rollout.collect``; the targets do not use it).
    key: PRNG key (rollout draws and exploratory draws; chunk c > 0 labels with
      ``fold_in(key, 20_000 + c)``, chunk 0 with ``key``).
  """
  n_batches = (-(-config.episodes // config.rollout_batch) if config.states == "rollout" else 0)
  progress = Progress(n_batches + 1, desc=f"reference[{kind.name}] states")
  try:
    if config.states == "rollout":
      texts, users, items, steps = await _rollout_states(
          world, featurizer, config, seed=seed, reward=reward, key=key, progress=progress)
    else:
      texts, users, items, steps = anchor_states(world, config.users_per_anchor, seed)
    sets, set_of = np.unique(await world.actions.ids(texts, items), return_inverse=True)
    table, table_mask = featurizer.actions(sets)
    mask = table_mask[set_of]
    n, k = len(texts), world.num_actions
    progress.close()
    progress = Progress(n, desc=f"reference[{kind.name}] labelled states")
    state = np.zeros((n, featurizer.state_dim), np.float32)
    targets = np.zeros((n, k), np.float32)
    parts = []
    for c, s in enumerate(range(0, n, config.chunk)):
      e = min(s + config.chunk, n)
      state[s:e] = featurizer.state(users[s:e], texts[s:e], steps[s:e])
      q, st = await kind.label(world, Visited(texts[s:e], users[s:e], items[s:e], mask[s:e]),
                               config, key if c == 0 else jax.random.fold_in(key, 20_000 + c))
      targets[s:e] = q
      parts.append((e - s, st))
      progress.update(e - s)
  finally:
    progress.close()
  stats: dict = {"states": n, "kind": kind.name, "state_set": config.states,
                 **_merge_stats(parts)}
  return ReferenceData(state, SetRows(table, set_of), mask, targets, stats)
