"""EAGLE's ELM baseline (PAPER_SPEC.md section 2.8): optimise the utility in Z, then decode the point.

Given a user ``z_u`` and an anchor movie ``z_a`` (augmented WALS vectors), projected gradient ascent
on the content-gap utility ``U(z) = <z_u, z> + lam * sum_{j in NN_k(z)} ||z - y_j||``
(``utility.content_gap_utility``) starts at ``z_a``; the optimum is decoded into a description by
a trained ELM (``elm.model.ELM``, task ``summary`` by default).

Choices where the paper is silent (it only says "search nearby", App. B suggests staying inside
``B_eps`` of the data):

* **Trust region**: every iterate is projected onto the ball ``||z - z_a|| <= radius`` around the
  anchor. ``U`` is unbounded (the novelty term grows without limit far from all items), so without
  a bound the ascent leaves the data manifold, where the ELM has never been trained. The default
  radius is the mean distance of an item to its nearest other item in ``item_table`` (one typical
  "step between movies").
* **Constant coordinates stay fixed**: columns of ``item_table`` with zero spread (the two constant
  1s of ``[y, 1, c, 1]``) are masked out of the gradient, so ``z*`` remains a valid augmented item
  vector whose inner product with ``z_u`` is a predicted rating.
* Plain gradient steps of size ``lr`` on ``U`` (no momentum); ``U`` is piecewise smooth (the
  neighbour set changes), and the best iterate seen is returned, not the last.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from eagle_jax import utility


def default_radius(item_table: np.ndarray) -> float:
  """Mean l2 distance of an item to its nearest other item: [N, d] -> float."""
  y = np.asarray(item_table, np.float64)
  sq = np.sum(y * y, 1)[:, None] - 2 * y @ y.T + np.sum(y * y, 1)[None]
  np.fill_diagonal(sq, np.inf)
  return float(np.mean(np.sqrt(np.maximum(sq.min(1), 0.0))))


def free_columns(item_table: np.ndarray, tol: float = 1e-6) -> np.ndarray:
  """[d] float mask: 1 for columns that vary over the items, 0 for constant ones."""
  return (np.asarray(item_table).std(0) > tol).astype(np.float32)


@functools.partial(jax.jit, static_argnames=("k", "steps"))
def _ascend(z_user, z_anchor, item_table, free, lam, lr, radius, *, k: int, steps: int):
  """Batched projected ascent. z_user, z_anchor: [N, d] -> (z_best [N, d], u_best [N], u0 [N])."""
  def u(z):
    return utility.content_gap_utility(z, z_user, item_table, lam=0.0, k=k) + lam * jnp.sum(
        utility.nearest_items(z, item_table, k=k)[1], -1)

  grad = jax.grad(lambda z: jnp.sum(u(z)))

  def project(z):
    delta = (z - z_anchor) * free
    norm = jnp.linalg.norm(delta, axis=-1, keepdims=True)
    scale = jnp.minimum(1.0, radius / jnp.maximum(norm, 1e-12))
    return z_anchor + delta * scale

  def body(_, carry):
    z, best, u_best = carry
    z = project(z + lr * grad(z) * free)
    uz = u(z)
    better = uz > u_best
    return z, jnp.where(better[:, None], z, best), jnp.where(better, uz, u_best)

  u0 = u(z_anchor)
  _, best, u_best = jax.lax.fori_loop(0, steps, body, (z_anchor, z_anchor, u0))
  return best, u_best, u0


def ascend_utility(z_user: np.ndarray, z_anchor: np.ndarray, item_table: np.ndarray, *,
                   lam: float, k: int = 3, steps: int = 100, lr: float = 0.05,
                   radius: float | None = None) -> dict[str, np.ndarray]:
  """Projected gradient ascent on the content-gap utility from the anchor.

  Args:
    z_user: [d] or [N, d] user vectors.
    z_anchor: [d] or [N, d] anchor item vectors (the starting points and trust-region centres).
    item_table: [I, d] existing items (neighbours of the novelty term).
    lam: novelty weight (>= 0).
    k: neighbours of the novelty term.
    steps: gradient steps (>= 1).
    lr: step size (> 0).
    radius: trust-region radius (default ``default_radius(item_table)``).

  Returns:
    ``{"z": [N, d] best point, "utility": [N] its utility, "utility_anchor": [N], "radius": []}``.
  """
  if lam < 0:
    raise ValueError(f"lam: expected >= 0, got {lam}")
  if steps < 1:
    raise ValueError(f"steps: expected >= 1, got {steps}")
  if not lr > 0:
    raise ValueError(f"lr: expected > 0, got {lr}")
  items = np.asarray(item_table, np.float32)
  zu = np.atleast_2d(np.asarray(z_user, np.float32))
  za = np.atleast_2d(np.asarray(z_anchor, np.float32))
  if zu.shape != za.shape or zu.shape[1] != items.shape[1]:
    raise ValueError(f"z_user {zu.shape} and z_anchor {za.shape} must be [N, {items.shape[1]}]")
  radius = default_radius(items) if radius is None else float(radius)
  if not radius > 0:
    raise ValueError(f"radius: expected > 0, got {radius}")
  z, u, u0 = _ascend(jnp.asarray(zu), jnp.asarray(za), jnp.asarray(items),
                     jnp.asarray(free_columns(items)), jnp.float32(lam), jnp.float32(lr),
                     jnp.float32(radius), k=int(k), steps=int(steps))
  return {"z": np.asarray(z), "utility": np.asarray(u), "utility_anchor": np.asarray(u0),
          "radius": np.float32(radius)}


def decode_utility_optimum(elm, z_user: np.ndarray, z_anchor: np.ndarray,
                           item_table: np.ndarray, *, lam: float, k: int = 3, steps: int = 100,
                           lr: float = 0.05, radius: float | None = None, task: str = "summary",
                           **decode) -> tuple[np.ndarray, list[str]]:
  """The paper's ELM baseline: ``z* = argmax U`` near the anchor, decoded by the ELM.

  Args:
    elm: a trained ``elm.model.ELM`` (``elm.job.load_elm(workdir)``).
    z_user, z_anchor: [d] or [N, d] user and anchor item vectors (augmented WALS).
    item_table: [I, d] all item vectors.
    lam, k, steps, lr, radius: see ``ascend_utility``.
    task: ELM task used to decode (a single-movie task).
    **decode: decoding options of ``ELM.generate`` (max_new_tokens, temperature, ...).

  Returns:
    ``(z_star [N, d], texts: N str)``.
  """
  out = ascend_utility(z_user, z_anchor, item_table, lam=lam, k=k, steps=steps, lr=lr,
                       radius=radius)
  return out["z"], elm.generate(task, out["z"], **decode)


def utilities(z: np.ndarray, z_user: np.ndarray, item_table: np.ndarray, *, lam: float,
              k: int = 3) -> np.ndarray:
  """``content_gap_utility`` on host arrays: z, z_user [N, d] -> [N]."""
  return np.asarray(utility.content_gap_utility(
      jnp.asarray(z, jnp.float32), jnp.asarray(z_user, jnp.float32),
      jnp.asarray(item_table, jnp.float32), lam=lam, k=k))


__all__: Sequence[str] = ("ascend_utility", "decode_utility_optimum", "default_radius",
                          "free_columns", "utilities")
