"""The EAGLE agent's policy and value network over candidate actions.

At a state s (the current description, the user, the step t) the environment offers K candidate
actions. The policy is a categorical distribution over them, pi(a|s) = softmax_a f(s, a), and the
value head estimates V(s). Documented choice of score (DESIGN.md leaves "sum of action-token log-probs,
or a pooled head" open): a **pooled head**. Each text is read once by a frozen language backbone and
pooled into a feature vector (``agent/features.py``: MiniLM mean-pooling by default on CPU, SmolLM2's
mean-pooled final hidden states as a switch); the trainable network is

    h_s = MLP_s(LN([phi(profile + description), z_user, E_D(description), onehot(t)]))    [N]
    h_a = MLP_a(LN([phi(action), E_D(action)]))                                           [N]
    f(s, a) = w^T gelu(W [h_s, h_a, h_s * h_a] + b)          V(s) = v^T gelu(U h_s + c)

This pooled head is the fast CPU path (``policy.kind="head"``). The paper's agent, a decoder that
scores candidates by the log-probability of their tokens (``lm_choice``) or writes the action
(``lm_generate``), is ``lm_policy.py``: with K candidates per state it runs the decoder forward and
backward over every candidate at every step, where the head reads each distinct text once (features
memoised across steps and episodes) and trains in milliseconds. The product term h_s * h_a lets the
score model user x action interactions (e.g. a horror-leaning user and "turn it into a horror film")
that a sum of state and action scores cannot.

Parameters carry logical axes (``embed`` for inputs, ``mlp`` for hidden units) so the same module is
data-parallel on a CPU mesh and tensor-parallel on a TPU slice.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx


@dataclasses.dataclass(frozen=True)
class PolicyConfig:
  """Shapes of the policy network.

  Attributes:
    state_dim: S, width of the state feature vector.
    action_dim: A, width of the action feature vector.
    hidden: N, width of the projections and of the score/value MLPs.
  """

  state_dim: int
  action_dim: int
  hidden: int = 128


def _dense(rngs: nnx.Rngs, din: int, dout: int, axes: tuple[str | None, str | None],
           scale: float = 1.0, use_bias: bool = True) -> nnx.Linear:
  init = nnx.initializers.variance_scaling(scale, "fan_in", "truncated_normal")
  return nnx.Linear(din, dout, rngs=rngs, use_bias=use_bias,
                    kernel_init=nnx.with_partitioning(init, axes),
                    bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), (axes[1],)))


def _norm(rngs: nnx.Rngs, dim: int) -> nnx.LayerNorm:
  return nnx.LayerNorm(dim, rngs=rngs,
                       scale_init=nnx.with_partitioning(nnx.initializers.ones_init(), ("embed",)),
                       bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), ("embed",)))


class PolicyValueNet(nnx.Module):
  """Scores K candidate actions and estimates the state value."""

  def __init__(self, config: PolicyConfig, *, rngs: nnx.Rngs):
    # Created unsharded; training.FunctionalModel places them by their logical axes.
    with nnx.use_eager_sharding(False):
      n = config.hidden
      self.config = config
      self.state_norm = _norm(rngs, config.state_dim)
      self.action_norm = _norm(rngs, config.action_dim)
      self.state_in = _dense(rngs, config.state_dim, n, ("embed", "mlp"))
      self.state_out = _dense(rngs, n, n, ("mlp", "embed"))
      self.action_in = _dense(rngs, config.action_dim, n, ("embed", "mlp"))
      self.action_out = _dense(rngs, n, n, ("mlp", "embed"))
      self.score_hidden = _dense(rngs, 3 * n, n, ("embed", "mlp"))
      # Small last layers: the initial policy is close to uniform and the initial value close to 0.
      # No score bias: a softmax over candidates is invariant to it (its gradient is exactly 0).
      self.score_out = _dense(rngs, n, 1, ("mlp", None), scale=0.01, use_bias=False)
      self.value_hidden = _dense(rngs, n, n, ("embed", "mlp"))
      self.value_out = _dense(rngs, n, 1, ("mlp", None), scale=0.01)

  def __call__(self, state: jax.Array, actions: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Scores and value.

    Args:
      state: [..., S] state features.
      actions: [..., K, A] features of the K candidate actions of that state.

    Returns:
      ``(logits [..., K], value [...])``; invalid candidates are masked by the caller
      (``losses.masked_log_softmax``).
    """
    hs = self.state_out(jax.nn.gelu(self.state_in(self.state_norm(state))))  # [..., N]
    ha = self.action_out(jax.nn.gelu(self.action_in(self.action_norm(actions))))  # [..., K, N]
    hs_k = jnp.broadcast_to(hs[..., None, :], ha.shape)
    joint = jnp.concatenate([hs_k, ha, hs_k * ha], axis=-1)
    logits = self.score_out(jax.nn.gelu(self.score_hidden(joint)))[..., 0]
    value = self.value_out(jax.nn.gelu(self.value_hidden(hs)))[..., 0]
    return logits, value
