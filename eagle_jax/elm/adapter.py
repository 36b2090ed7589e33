"""The ELM adapter E_A: domain embeddings -> soft tokens in the decoder's input-embedding space.

ELM (arXiv 2310.04475, PAPER_SPEC.md section 4.1) is ``((E_0 x E_A)^H, M_0)``: every input position
of the decoder is either a text token embedded by the LLM's own table ``E_0`` or a domain vector
mapped by the adapter ``E_A``. Here ``E_A`` is a two-layer MLP per *domain* (movies and users live
in different halves of the WALS space, so each gets its own MLP):

    h = gelu(z W1[dom] + b1[dom])                 z: [d] standardised domain vector
    soft = (h W2[dom] + b2[dom]) reshaped [n, D]  n soft tokens of width D (decoder hidden)

A prompt holds ``n`` *placeholder* positions per embedding it mentions ("Summarise the movie
<movie>."). ``inject_soft_tokens`` overwrites exactly those positions of ``embed(tokens)``; every
other position keeps its text-token embedding. Placeholder positions are described by a
``slot_index`` array: ``-1`` for text, ``s * n + j`` for soft token ``j`` of embedding slot ``s``.

Parameters carry logical axes from ``parallel.DEFAULT_RULES`` (``latent`` for the small domain
dimension, ``mlp`` for the hidden units, ``embed`` for the decoder width), so the adapter shards
like the decoder it feeds.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

DOMAINS = ("movie", "user")


class Adapter(nnx.Module):
  """Per-domain two-layer MLPs mapping a domain vector to ``n_tokens`` soft tokens.

  Args:
    in_dim: d, width of the (standardised) domain vectors.
    out_dim: D, the decoder's hidden width.
    hidden: width of the MLP's hidden layer.
    n_tokens: soft tokens per embedding.
    num_domains: number of separate MLPs (``len(DOMAINS)`` by default).
    out_scale: standard deviation of the initial soft tokens (match the decoder's token embeddings
      so the first steps feed the frozen decoder inputs of a familiar scale).
    rngs: initialisation keys.
  """

  def __init__(self, in_dim: int, out_dim: int, hidden: int, n_tokens: int = 1, *,
               num_domains: int = len(DOMAINS), out_scale: float = 0.05,
               rngs: nnx.Rngs, param_dtype=jnp.float32):
    for name, value in (("in_dim", in_dim), ("out_dim", out_dim), ("hidden", hidden),
                        ("n_tokens", n_tokens), ("num_domains", num_domains)):
      if not isinstance(value, int) or value <= 0:
        raise ValueError(f"Adapter.{name}: expected a positive int, got {value!r}")
    if not out_scale > 0:
      raise ValueError(f"Adapter.out_scale: expected > 0, got {out_scale!r}")
    self.in_dim, self.out_dim, self.hidden = in_dim, out_dim, hidden
    self.n_tokens, self.num_domains = n_tokens, num_domains
    k = rngs.params
    w1_init = nnx.initializers.normal(in_dim**-0.5)
    w2_init = nnx.initializers.normal(out_scale * hidden**-0.5 * 2.0)

    def param(init, shape, axes):
      return nnx.Param(nnx.with_partitioning(init, axes)(k(), shape, param_dtype))

    zeros = nnx.initializers.zeros
    # Created unsharded (as the decoder); training.FunctionalModel places them by their axes.
    with nnx.use_eager_sharding(False):
      self.w1 = param(w1_init, (num_domains, in_dim, hidden), (None, "latent", "mlp"))
      self.b1 = param(zeros, (num_domains, hidden), (None, "mlp"))
      self.w2 = param(w2_init, (num_domains, hidden, n_tokens, out_dim),
                      (None, "mlp", None, "embed"))
      self.b2 = param(zeros, (num_domains, n_tokens, out_dim), (None, None, "embed"))

  def __call__(self, z: jax.Array, domain: jax.Array) -> jax.Array:
    """Soft tokens of each embedding.

    Args:
      z: [..., d] float standardised domain vectors.
      domain: [...] int32 domain index of each vector (``DOMAINS``).

    Returns:
      [..., n, D] float32 soft tokens.
    """
    if z.shape[-1] != self.in_dim:
      raise ValueError(f"Adapter: z has width {z.shape[-1]}, expected in_dim={self.in_dim}")
    if domain.shape != z.shape[:-1]:
      raise ValueError(f"Adapter: domain shape {domain.shape} != z batch shape {z.shape[:-1]}")
    w1 = self.w1[...][domain]  # [..., d, h]
    h = jax.nn.gelu(jnp.einsum("...d,...dh->...h", z.astype(jnp.float32), w1)
                    + self.b1[...][domain])
    return jnp.einsum("...h,...hnD->...nD", h, self.w2[...][domain]) + self.b2[...][domain]


def inject_soft_tokens(token_embeddings: jax.Array, soft: jax.Array,
                       slot_index: jax.Array) -> jax.Array:
  """Replaces the placeholder positions of a prompt's embeddings with soft tokens.

  Args:
    token_embeddings: [B, T, D] embeddings of the prompt's tokens (``Llama.embed``).
    soft: [B, S, n, D] soft tokens of the S embedding slots of each row (``Adapter``).
    slot_index: [B, T] int32, ``-1`` at text positions, ``s * n + j`` at the position of soft
      token ``j`` of slot ``s``.

  Returns:
    [B, T, D] (dtype of ``token_embeddings``): ``soft[b, s, j]`` where ``slot_index[b, t] = s*n+j``,
    ``token_embeddings[b, t]`` where it is ``-1``.
  """
  b, t, d = token_embeddings.shape
  if soft.ndim != 4 or soft.shape[0] != b or soft.shape[-1] != d:
    raise ValueError(f"inject_soft_tokens: soft must be [{b}, S, n, {d}], got {soft.shape}")
  if slot_index.shape != (b, t):
    raise ValueError(f"inject_soft_tokens: slot_index must be {(b, t)}, got {slot_index.shape}")
  flat = soft.reshape(b, -1, d).astype(token_embeddings.dtype)  # [B, S*n, D]
  picked = jnp.take_along_axis(flat, jnp.clip(slot_index, 0, flat.shape[1] - 1)[..., None], axis=1)
  return jnp.where((slot_index >= 0)[..., None], picked, token_embeddings)


def standardisation(table, floor: float = 1e-3):
  """Per-column mean [d] and scale [d] of an embedding table [N, d] (constant columns: scale 1).

  Constant columns (the augmented WALS vectors have two) carry no information; their scale is set
  to 1 so they map to 0 instead of dividing by zero.
  """
  table = np.asarray(table, np.float64)
  mean = table.mean(0)
  std = table.std(0)
  return mean.astype(np.float32), np.where(std > floor, std, 1.0).astype(np.float32)
