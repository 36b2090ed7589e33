"""EAGLE losses against values worked out by hand on a tiny example."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from eagle_jax.agent import losses

# One episode, H=2 steps, K=2 candidates (worked out in the comments).
LOGITS = jnp.array([[[0.0, math.log(3.0)], [0.0, 0.0]]])  # pi = [1/4, 3/4], then [1/2, 1/2]
REF = jnp.zeros((1, 2, 2))  # pi_ref uniform
ACTIONS = jnp.array([[1, 0]])
VALUES = jnp.array([[0.5, 1.0]])
REWARD = jnp.array([2.0])
GAMMA = 0.5


def _loss(**kw):
  args = dict(logits=LOGITS, ref_logits=REF, candidate_mask=None, actions=ACTIONS, values=VALUES,
              reward=REWARD, gamma=GAMMA, gae_lambda=1.0, kl_coef=0.1, value_coef=0.5,
              entropy_coef=0.01)
  args.update(kw)
  return losses.eagle_loss(**args)


def test_eagle_loss_hand_computed():
  t = _loss()
  # Returns G = [0.5 * 2, 2] = [1, 2]; advantages A = G - V = [0.5, 1].
  pg = -(0.5 * math.log(0.75) + 1.0 * math.log(0.5)) / 2
  kl = (0.25 * math.log(0.25 / 0.5) + 0.75 * math.log(0.75 / 0.5) + 0.0) / 2
  value = 0.5 * ((0.5 - 1.0) ** 2 + (1.0 - 2.0) ** 2) / 2
  ent = (-(0.25 * math.log(0.25) + 0.75 * math.log(0.75)) + math.log(2.0)) / 2
  assert float(t.policy_gradient) == pytest.approx(pg, rel=1e-6)
  assert float(t.kl) == pytest.approx(kl, rel=1e-6)
  assert float(t.value) == pytest.approx(value, rel=1e-6)
  assert float(t.entropy) == pytest.approx(ent, rel=1e-6)
  assert float(t.mean_advantage) == pytest.approx(0.75, rel=1e-6)
  assert float(t.total) == pytest.approx(pg + 0.1 * kl + 0.5 * value - 0.01 * ent, rel=1e-6)


def test_policy_gradient_direction_and_masks():
  # d(-A log pi(a))/d logits = -A (onehot(a) - pi) / n_steps, hand-derived.
  g = jax.grad(lambda lg: _loss(logits=lg, kl_coef=0.0, entropy_coef=0.0).total)(LOGITS)
  expected = -np.array([[[0.5 * (0 - 0.25), 0.5 * (1 - 0.75)], [1.0 * (1 - 0.5), 1.0 * (0 - 0.5)]]])
  np.testing.assert_allclose(g, expected / 2, rtol=1e-6, atol=1e-7)
  # A masked step contributes nothing; a masked candidate gets probability 0.
  t = _loss(step_mask=jnp.array([[True, False]]), kl_coef=0.0, value_coef=0.0, entropy_coef=0.0)
  assert float(t.total) == pytest.approx(-0.5 * math.log(0.75), rel=1e-6)
  logp = losses.masked_log_softmax(jnp.array([1.0, 2.0, 3.0]), jnp.array([True, False, True]))
  np.testing.assert_allclose(np.exp(logp), [1 / (1 + math.e**2), 0.0, math.e**2 / (1 + math.e**2)],
                             rtol=1e-6, atol=1e-12)


def test_gae_matches_a_numpy_recursion():
  rng = np.random.default_rng(0)
  rewards = rng.normal(size=(3, 5)).astype(np.float32)
  values = rng.normal(size=(3, 5)).astype(np.float32)
  gamma, lam = 0.9, 0.7
  expected = np.zeros_like(rewards)
  for b in range(3):
    running = 0.0
    for t in reversed(range(5)):
      nv = values[b, t + 1] if t + 1 < 5 else 0.0
      running = rewards[b, t] + gamma * nv - values[b, t] + gamma * lam * running
      expected[b, t] = running
  got = losses.gae_advantages(jnp.asarray(rewards), jnp.asarray(values), gamma=gamma, lam=lam)
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_reference_cross_entropy_hand_computed():
  logits = jnp.array([[0.0, math.log(3.0), 5.0]])
  mask = jnp.array([[True, True, False]])  # pi_ref = [1/4, 3/4, 0]
  q = jnp.array([[0.5, 0.5, 0.0]])
  got = losses.reference_cross_entropy(logits, q, mask)
  assert float(got) == pytest.approx(-(0.5 * math.log(0.25) + 0.5 * math.log(0.75)), rel=1e-6)


def test_truncated_importance_weights_hand_computed():
  # Behaviour probabilities of the taken actions: 0.8 at t=0 (pi = 3/4 -> ratio 0.9375, kept) and
  # 0.25 at t=1 (pi = 1/2 -> ratio 2, clipped to 1.5 with importance_clip=1.5); A = [0.5, 1].
  mu = jnp.log(jnp.array([[0.8, 0.25]]))
  t = _loss(behaviour_logp=mu, importance_clip=1.5)
  pg = -(0.9375 * 0.5 * math.log(0.75) + 1.5 * 1.0 * math.log(0.5)) / 2
  assert float(t.policy_gradient) == pytest.approx(pg, rel=1e-6)
  # A behaviour policy equal to pi gives the on-policy loss.
  logp = jax.nn.log_softmax(LOGITS, -1)
  same = jnp.take_along_axis(logp, ACTIONS[..., None], -1)[..., 0]
  assert float(_loss(behaviour_logp=same).total) == pytest.approx(float(_loss().total), rel=1e-6)
