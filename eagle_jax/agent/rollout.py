"""Episodes: featurisation of states and actions, and batched asynchronous rollouts.

An episode starts at an anchor movie's plot for a user, takes H actions (each chosen among the K
candidates of its current state: the anchor's set, or the state's own with per-state actions,
``agent.action_book``) and is scored at the end: the reward is terminal, r_{H-1} = U(E_D(x_H)) or,
with ``reward="gain"`` (the default), U(E_D(x_H)) - U(E_D(x_0)), the utility gained over the anchor
for that user (same optimum per pair, lower variance across pairs).

All episodes of a batch advance in lockstep: at step t the policy scores every episode's candidates in
one jitted call, then one ``env.step`` sends all B rewrite requests at once (the async client keeps
them in flight together; the local sampler decodes them as one batch).

Features (``Featurizer``), all from memoised frozen encoders:
  state  [S] = [phi(x_t), phi(profile_u), z_u, E_D(x_t), onehot(t; H)]
  action [A] = [phi(a), E_D(a)]
where phi is the policy's text feature (MiniLM sentence embedding, or the decoder's mean-pooled hidden
states with ``policy.backbone="decoder"``) and E_D(.) the encoder's point of Z for that text.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import numpy as np

from eagle_jax import hosts
from eagle_jax.agent import losses
from eagle_jax.agent.world import World

PolicyFn = Callable[[np.ndarray, np.ndarray], np.ndarray]  # ([N,S], [N,K,A]) -> logits [N,K]
# A policy that writes its action (lm_generate): (state ids [N, P], key, greedy) ->
# (action ids [N, L] int32 -1 padded, log pi of each written action [N], action texts).
WriterFn = Callable[[np.ndarray, jax.Array, bool], tuple[np.ndarray, np.ndarray, list[str]]]
# Terminal reward kinds of ``collect`` (``config.utility.reward``).
REWARDS = ("gain", "utility")


def feature_dims(text_dim: int, latent_dim: int, horizon: int) -> tuple[int, int]:
  """(S, A): widths of the state and action feature vectors."""
  return 2 * text_dim + 2 * latent_dim + horizon, text_dim + latent_dim


class Featurizer:
  """State and action feature arrays of a world (see module docstring).

  Args:
    world: the run's world (features, E_D, anchors, profiles).
    horizon: H, the width of the step one-hot and the length of the episodes ``collect`` runs.
  """

  def __init__(self, world: World, horizon: int):
    self.world = world
    self.horizon = int(horizon)
    self.text_dim = world.policy_features.dim
    self.latent_dim = world.env.dim
    self.state_dim, self.action_dim = feature_dims(self.text_dim, self.latent_dim, self.horizon)
    self._action_memo: dict[int, np.ndarray] = {}

  def state(self, users: np.ndarray, texts: list[str], t: np.ndarray | int) -> np.ndarray:
    """[N] users, [N] descriptions, step t ([N] or scalar) -> [N, S] float32."""
    users = np.asarray(users)
    n = len(texts)
    phi = self.world.policy_features(texts)
    prof = self.world.policy_features([self.world.profiles[int(u)] for u in users])
    zu = self.world.env.user_table[users]
    zx = self.world.env.embed(texts)
    onehot = np.zeros((n, self.horizon), np.float32)
    onehot[np.arange(n), np.broadcast_to(np.asarray(t), (n,))] = 1.0
    return np.concatenate([phi, prof, zu, zx, onehot], axis=1).astype(np.float32)

  def actions(self, set_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """[N] action-set ids (``world.actions``) -> ([N, K, A] features, [N, K] bool mask). Anchor
    sets are memoised here; a state's set is built from the memoised text features."""
    out = []
    for j in np.asarray(set_ids):
      j = int(j)
      feats = self._action_memo.get(j)
      if feats is None:
        texts = self.world.actions.texts(j)
        feats = np.concatenate([self.world.policy_features(texts), self.world.env.embed(texts)],
                               axis=1).astype(np.float32)
        if j < self.world.actions.num_anchor_sets:
          self._action_memo[j] = feats
      out.append(feats)
    feats = np.stack(out)
    return feats, np.ones(feats.shape[:2], bool)


@dataclasses.dataclass
class Episodes:
  """A batch of B finished episodes of horizon H over K candidates.

  Attributes:
    pairs: [B, 2] int (user, anchor item).
    texts: B lists of H + 1 descriptions (x_0 = anchor plot, ..., x_H).
    actions: [B, H] int32 chosen candidate indices.
    set_ids: [B, H] int action set (``world.actions``) the candidates of step t came from.
    behaviour_logp: [B, H] log-probability of the chosen action under the behaviour policy.
    state: [B, H, S] state features of x_0..x_{H-1}.
    action_feats: [B, H, K, A] candidate features.
    mask: [B, H, K] valid candidates.
    utility, preference, distance: [B, H + 1] of each x_t for its user.
    reward: [B] terminal reward.
    written: with a writing policy, the B lists of H action texts it wrote (its token ids are
      ``action_feats[:, t, 0]``, K = 1); None when actions are chosen among candidates.
  """

  pairs: np.ndarray
  texts: list[list[str]]
  actions: np.ndarray
  behaviour_logp: np.ndarray
  state: np.ndarray
  action_feats: np.ndarray
  mask: np.ndarray
  utility: np.ndarray
  preference: np.ndarray
  distance: np.ndarray
  reward: np.ndarray
  written: list[list[str]] | None = None
  set_ids: np.ndarray | None = None

  def batch(self) -> dict[str, np.ndarray]:
    """The arrays the RL train step consumes."""
    return {"state": self.state, "action_feats": self.action_feats, "mask": self.mask,
            "actions": self.actions, "behaviour_logp": self.behaviour_logp,
            "reward": self.reward}

  def action_texts(self, world: World) -> list[list[str]]:
    if self.written is not None:
      return self.written
    return [[world.actions.texts(j)[int(a)] for j, a in zip(ids, row)]
            for ids, row in zip(self.set_ids, self.actions)]


def choose(logits: np.ndarray, mask: np.ndarray, key: jax.Array | None, greedy: bool
           ) -> tuple[np.ndarray, np.ndarray]:
  """Samples (or argmaxes) one candidate per row: ([N] int32 choice, [N] its log-probability)."""
  logp = np.asarray(losses.masked_log_softmax(logits, mask))
  if greedy:
    a = np.argmax(np.where(mask, logp, -np.inf), axis=-1)
  else:
    a = np.asarray(jax.random.categorical(key, logp, axis=-1))
  a = a.astype(np.int32)
  return a, logp[np.arange(len(a)), a]


async def collect(world: World, featurizer: Featurizer, policy: PolicyFn | WriterFn | None,
                  pairs: np.ndarray, key: jax.Array, *, reward: str = "gain",
                  greedy: bool = False, writes: bool = False, rows: slice | None = None
                  ) -> Episodes:
  """Runs B episodes to the horizon H = ``featurizer.horizon``.

  On several processes each runs its own block ``rows`` of the batch (``hosts.process_rows``): its
  environment calls are for those episodes only, while the policy acts on the states of all B,
  all-gathered (a global computation on the mesh), and draws every row's action from the same
  global draw, so each episode is the one a single process would run.

  Args:
    world: environment and anchors.
    featurizer: state/action features (its horizon is the episodes').
    policy: logits of a batch of states, or None for the uniformly random policy.
    pairs: [B, 2] (user, anchor item).
    key: PRNG key of the action draws (step t uses ``fold_in(key, t)``).
    reward: one of ``REWARDS``: "gain" (U(x_H) - U(x_0)) or "utility" (U(x_H)).
    greedy: take the most probable action instead of sampling.
    writes: ``policy`` is a ``WriterFn`` (it writes each action; the episode's ``action_feats``
      hold the written ids as the one candidate, K = 1).
  """
  if reward not in REWARDS:
    raise ValueError(f"reward must be one of {REWARDS}, got {reward!r}")
  horizon = featurizer.horizon
  all_pairs = np.asarray(pairs, np.int32)
  rows = slice(0, len(all_pairs)) if rows is None else rows
  pairs = all_pairs[rows]
  users, items = pairs[:, 0], pairs[:, 1]
  texts = [[world.anchors[int(i)].state] for i in items]
  per_state = world.actions.per_state
  if not per_state:  # every step offers the anchors' sets
    anchor_ids = world.actions.known([], all_pairs[:, 1])
    all_feats, all_mask = featurizer.actions(anchor_ids)
  states, acts, logps, written, set_ids, feats_t, mask_t = [], [], [], [], [], [], []
  for t in range(horizon):
    cur = [x[-1] for x in texts]
    s = featurizer.state(users, cur, t)
    all_s = hosts.gather_rows(s, rows, len(all_pairs))
    if per_state:  # this process's rows' sets, then every row's features
      ids = await world.actions.ids(cur, items)
      f, m = featurizer.actions(ids)
      all_feats = hosts.gather_rows(f, rows, len(all_pairs))
      all_mask = hosts.gather_rows(m, rows, len(all_pairs))
    else:
      ids = anchor_ids[rows]
    if writes:
      ids_w, lp, chosen = policy(all_s, jax.random.fold_in(key, t), greedy)
      ids_w, lp, chosen = ids_w[rows], lp[rows], chosen[rows]
      a = np.zeros(len(pairs), np.int32)
      written.append((ids_w[:, None], chosen))
    else:
      logits = (np.zeros(all_mask.shape, np.float32) if policy is None
                else np.asarray(policy(all_s, all_feats)))
      a, lp = choose(logits, all_mask, jax.random.fold_in(key, t), greedy)
      a, lp = a[rows], lp[rows]
      chosen = [world.actions.texts(j)[int(c)] for j, c in zip(ids, a)]
    nxt = await world.env.step(cur, chosen)
    for x, y in zip(texts, nxt):
      x.append(y)
    states.append(s)
    acts.append(a)
    logps.append(lp)
    set_ids.append(ids)
    if not writes:
      feats_t.append(all_feats[rows])
      mask_t.append(all_mask[rows])
  flat = [x for row in texts for x in row]
  u = world.env.text_utility(flat, np.repeat(users, horizon + 1))
  shape = (len(pairs), horizon + 1)
  util = u["utility"].reshape(shape)
  r = util[:, -1] - util[:, 0] if reward == "gain" else util[:, -1]
  if writes:
    action_feats = np.stack([ids for ids, _ in written], 1)  # [B, H, 1, L]
    mask_bhk = np.ones(action_feats.shape[:3], bool)
    texts_w = [list(row) for row in zip(*(chosen for _, chosen in written))]
  else:
    action_feats, mask_bhk, texts_w = np.stack(feats_t, 1), np.stack(mask_t, 1), None
  return Episodes(
      pairs=pairs, texts=texts, actions=np.stack(acts, 1),
      behaviour_logp=np.stack(logps, 1).astype(np.float32), state=np.stack(states, 1),
      action_feats=action_feats, mask=mask_bhk, utility=util,
      preference=u["preference"].reshape(shape), distance=u["distance"].reshape(shape),
      reward=r.astype(np.float32), written=texts_w, set_ids=np.stack(set_ids, 1))


def sample_pairs(pairs: np.ndarray, batch: int, seed: int, step: int) -> np.ndarray:
  """The (user, anchor) pairs of batch ``step``: a deterministic function of (seed, step), so the
  data iterator's state is the step number (restored with the checkpoint)."""
  rng = np.random.default_rng([int(seed), int(step)])
  idx = rng.choice(len(pairs), size=batch, replace=batch > len(pairs))
  return pairs[idx]
