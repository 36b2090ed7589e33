"""Losses of the EAGLE agent: REINFORCE with a learned baseline (or GAE), KL to a reference policy.

The agent's policy at a state is a categorical distribution over the K candidate actions of that state
(see ``agent/policy.py`` for how the decoder scores them). With that discrete action set the KL to the
reference policy is computed exactly, not estimated from samples:

    KL(pi || pi_ref)(s) = sum_a pi(a|s) (log pi(a|s) - log pi_ref(a|s)).

Paper Eq. (1) writes ``loss = PG-loss - alpha KL``; read as an objective to maximise, the loss we
minimise is (PAPER_SPEC.md, section 2.3)

    L = -E[sum_t A_t log pi(a_t|s_t)] + alpha E[sum_t KL_t] + c_v E[sum_t (V(s_t) - G_t)^2] / 2
        - c_ent E[sum_t H(pi(.|s_t))],

averaged over valid steps. The reward is terminal: r_t = 0 for t < H-1 and r_{H-1} = U(E_D(x_H)), the
utility of the final description x_H (the paper's r_{H-1} vs. the returned x_H off-by-one is resolved in
favour of scoring what is returned). Returns are G_t = gamma^(H-1-t) r_{H-1}. With ``gae_lambda`` the
advantages are GAE(gamma, lambda) on the value estimates; ``gae_lambda = 1`` is plain REINFORCE with a
baseline, A_t = G_t - V(s_t).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

_NEG = -1e9  # Logit of an invalid candidate (padding of ragged action sets).


def masked_log_softmax(logits: jax.Array, mask: jax.Array | None) -> jax.Array:
  """log softmax over the last axis, with invalid entries at probability 0.

  Args:
    logits: [..., K].
    mask: [..., K] bool, True for valid candidates (None: all valid).

  Returns:
    [..., K] log-probabilities (a large negative number where ``mask`` is False).
  """
  if mask is not None:
    logits = jnp.where(mask, logits, _NEG)
  return jax.nn.log_softmax(logits, axis=-1)


def terminal_returns(reward: jax.Array, horizon: int, gamma: float) -> jax.Array:
  """G_t = gamma^(H-1-t) * reward for a terminal reward.

  Args:
    reward: [B] final-step rewards.
    horizon: H.
    gamma: discount.

  Returns:
    [B, H] returns.
  """
  powers = gamma ** jnp.arange(horizon - 1, -1, -1, dtype=reward.dtype)
  return reward[:, None] * powers


def gae_advantages(
    rewards: jax.Array, values: jax.Array, *, gamma: float, lam: float
) -> jax.Array:
  """Generalized advantage estimates for episodes that end after H steps.

  Args:
    rewards: [B, H] per-step rewards.
    values: [B, H] value estimates V(s_t); the value after the last step is 0 (episode ends).
    gamma: discount.
    lam: GAE lambda (1: Monte-Carlo return minus baseline; 0: one-step TD error).

  Returns:
    [B, H] advantages.
  """
  next_values = jnp.concatenate([values[:, 1:], jnp.zeros_like(values[:, :1])], axis=1)
  deltas = rewards + gamma * next_values - values

  def step(carry, delta):
    adv = delta + gamma * lam * carry
    return adv, adv

  _, adv = jax.lax.scan(step, jnp.zeros_like(deltas[:, 0]), deltas.T, reverse=True)
  return adv.T


def categorical_kl(logp: jax.Array, logp_ref: jax.Array, mask: jax.Array | None) -> jax.Array:
  """Exact KL(p || p_ref) over the last axis; [..., K] -> [...]."""
  terms = jnp.exp(logp) * (logp - logp_ref)
  if mask is not None:
    terms = jnp.where(mask, terms, 0.0)
  return jnp.sum(terms, axis=-1)


def categorical_entropy(logp: jax.Array, mask: jax.Array | None) -> jax.Array:
  terms = -jnp.exp(logp) * logp
  if mask is not None:
    terms = jnp.where(mask, terms, 0.0)
  return jnp.sum(terms, axis=-1)


class LossTerms(NamedTuple):
  """Scalar parts of the EAGLE loss (all averaged over valid steps)."""

  total: jax.Array
  policy_gradient: jax.Array
  kl: jax.Array
  value: jax.Array
  entropy: jax.Array
  mean_advantage: jax.Array


def eagle_loss(
    *,
    logits: jax.Array,
    ref_logits: jax.Array,
    candidate_mask: jax.Array | None,
    actions: jax.Array,
    values: jax.Array,
    reward: jax.Array,
    step_mask: jax.Array | None = None,
    gamma: float,
    gae_lambda: float,
    kl_coef: float,
    value_coef: float,
    entropy_coef: float = 0.0,
    behaviour_logp: jax.Array | None = None,
    importance_clip: float = 1.0,
) -> LossTerms:
  """The EAGLE policy-gradient loss (see module docstring).

  Args:
    logits: [B, H, K] agent scores of the K candidates at each step.
    ref_logits: [B, H, K] reference-policy scores (treated as constants).
    candidate_mask: [B, H, K] bool valid candidates, or None.
    actions: [B, H] int chosen candidate indices.
    values: [B, H] value-head estimates V(s_t).
    reward: [B] terminal reward U(x_H) (or a gain over the anchor; see the trainer config).
    step_mask: [B, H] bool valid steps (None: all).
    gamma: discount.
    gae_lambda: GAE lambda (1.0 = REINFORCE with baseline).
    kl_coef: alpha, weight of KL(pi || pi_ref).
    value_coef: weight of the value regression loss.
    entropy_coef: weight of the entropy bonus.
    behaviour_logp: [B, H] log-probability of ``actions`` under the policy that collected them,
      when it lags the learner (rollouts overlapped with learner steps). The policy-gradient term is
      then weighted by the truncated importance ratio min(importance_clip, pi/mu) (constant), as
      in V-trace's rho-bar; None means on-policy (ratio 1).
    importance_clip: rho-bar.

  Returns:
    ``LossTerms``; ``total`` is what the optimiser minimises.
  """
  logp = masked_log_softmax(logits, candidate_mask)
  logp_ref = jax.lax.stop_gradient(masked_log_softmax(ref_logits, candidate_mask))
  logp_taken = jnp.take_along_axis(logp, actions[..., None], axis=-1)[..., 0]
  return policy_loss(
      logp_taken=logp_taken, kl=categorical_kl(logp, logp_ref, candidate_mask),
      entropy=categorical_entropy(logp, candidate_mask), values=values, reward=reward,
      step_mask=step_mask, gamma=gamma, gae_lambda=gae_lambda, kl_coef=kl_coef,
      value_coef=value_coef, entropy_coef=entropy_coef, behaviour_logp=behaviour_logp,
      importance_clip=importance_clip)


def policy_loss(
    *,
    logp_taken: jax.Array,
    kl: jax.Array,
    entropy: jax.Array,
    values: jax.Array,
    reward: jax.Array,
    step_mask: jax.Array | None = None,
    gamma: float,
    gae_lambda: float,
    kl_coef: float,
    value_coef: float,
    entropy_coef: float = 0.0,
    behaviour_logp: jax.Array | None = None,
    importance_clip: float = 1.0,
) -> LossTerms:
  """The EAGLE loss from per-step quantities, whatever the action space (``eagle_loss`` over K
  candidates; ``lm_policy.generate_terms`` for written actions).

  Args:
    logp_taken: [B, H] log pi(a_t | s_t) of the actions taken.
    kl: [B, H] KL(pi || pi_ref) at each step (exact over candidates, or summed per action token).
    entropy: [B, H] entropy of pi at each step (or its estimate).
    values, reward, step_mask, gamma, gae_lambda, kl_coef, value_coef, entropy_coef,
    behaviour_logp, importance_clip: as in ``eagle_loss``.
  """
  b, h = logp_taken.shape
  mask = jnp.ones((b, h), bool) if step_mask is None else step_mask
  denom = jnp.maximum(jnp.sum(mask), 1)
  mean = lambda x: jnp.sum(jnp.where(mask, x, 0.0)) / denom
  returns = terminal_returns(reward, h, gamma)
  rewards = jnp.zeros((b, h), reward.dtype).at[:, -1].set(reward)
  adv = jax.lax.stop_gradient(
      gae_advantages(rewards, jax.lax.stop_gradient(values), gamma=gamma, lam=gae_lambda))
  if behaviour_logp is not None:
    rho = jax.lax.stop_gradient(jnp.minimum(jnp.exp(logp_taken - behaviour_logp), importance_clip))
    adv = rho * adv
  pg = -mean(adv * logp_taken)
  kl = mean(kl)
  value = 0.5 * mean((values - returns) ** 2)
  entropy = mean(entropy)
  total = pg + kl_coef * kl + value_coef * value - entropy_coef * entropy
  return LossTerms(total, pg, kl, value, entropy, mean(adv))


def reference_cross_entropy(
    logits: jax.Array, target_probs: jax.Array, candidate_mask: jax.Array | None
) -> jax.Array:
  """Supervised loss of the reference policy: CE between targets q and pi_ref over candidates.

  Args:
    logits: [B, K] reference-policy scores.
    target_probs: [B, K] target distribution q (uniform, one-hot optimistic, or the G-optimal
      exploratory set), rows summing to 1 over valid candidates.
    candidate_mask: [B, K] bool valid candidates, or None.

  Returns:
    scalar mean over the batch of -sum_a q_a log pi_ref(a).
  """
  logp = masked_log_softmax(logits, candidate_mask)
  terms = target_probs * logp
  if candidate_mask is not None:
    terms = jnp.where(candidate_mask, terms, 0.0)
  return -jnp.mean(jnp.sum(terms, axis=-1))
