"""G-optimal designs over action embeddings: a batched, jitted Frank-Wolfe solver with a certificate.

EAGLE's G-optimal reference policy (paper, Definition 1) puts weights ``pi`` on the K candidate actions
of a state, with embeddings ``z_a`` in R^d, so as to minimise the worst-case predictive variance

    g(pi) = max_a z_a^T V(pi)^{-1} z_a,      V(pi) = sum_a pi_a z_a z_a^T + ridge * I.

The single-instance solvers and their maths are in ``design_solvers``: Frank-Wolfe with away
steps from a Kumar-Yildirim core set (the default), and the paper's random-subset rejection sampling
(``method="rejection"``).

The batch: z may have any leading dims; they are flattened and the single-instance solver is vmapped. A
``lax.while_loop`` over "epochs" (one refresh plus ``refresh_every`` rank-one steps, which become no-ops
once an instance has converged) keeps the vmapped loop free of ``lax.cond`` (which vmap turns into
both-branch ``select``). With a ``mesh``, the batch is sharded over the mesh axes of the logical axis
``batch`` and each device runs its own loop under ``jax.shard_map`` (no per-step collectives).

Precision: float32 by default (float64 inputs stay float64 when ``jax_enable_x64`` is on). In float32
the certificate is meaningful down to eps of about 1e-5; every matmul asks for HIGHEST precision so
that TPUs do not fall back to bfloat16 passes. Directions whose singular value is below
``rank_rtol * s_max`` are treated as absent (g ignores the component of an action along them).

Input checks: NaN/Inf inputs raise ``ValueError`` on the host before the jitted solver runs. When the
public functions are called on traced values (inside a user's ``jax.jit``) that check is skipped.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import Mesh, PartitionSpec

from eagle_jax import parallel
from eagle_jax.design_solvers import (
    Design,
    frank_wolfe_single,
    rejection_single,
    span_coordinates,
    value_in_span,
)

_HI = lax.Precision.HIGHEST
_METHODS = ("frank_wolfe", "rejection")


# ---------------------------------------------------------------------------------------------------
# Input checks (host side).


def _is_traced(x) -> bool:
  return isinstance(x, jax.core.Tracer)


def _as_actions(z, name: str = "z") -> jax.Array:
  """Validates and converts action embeddings to a floating array [..., K, d]."""
  if not _is_traced(z):
    z = jnp.asarray(z)
  if z.ndim < 2:
    raise ValueError(f"{name}: expected action embeddings of shape [..., K, d], got shape {z.shape}")
  if z.shape[-2] < 1 or z.shape[-1] < 1:
    raise ValueError(f"{name}: expected K >= 1 actions and d >= 1 dims, got shape {z.shape}")
  if not jnp.issubdtype(z.dtype, jnp.floating):
    z = z.astype(jnp.float32)
  elif z.dtype not in (jnp.float32, jnp.float64):
    z = z.astype(jnp.float32)  # bfloat16/float16: solve in float32.
  if not _is_traced(z) and not bool(jnp.all(jnp.isfinite(z))):
    raise ValueError(f"{name}: contains NaN or Inf entries; a design needs finite embeddings")
  return z


def _check_positive(name: str, value, *, integer: bool = False, allow_zero: bool = False) -> None:
  kind = (int, np.integer) if integer else (int, float, np.integer, np.floating)
  if isinstance(value, bool) or not isinstance(value, kind):
    raise ValueError(f"{name}: expected a python {'int' if integer else 'number'}, got {value!r}")
  if not np.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
    raise ValueError(f"{name}: expected a finite value {'>=' if allow_zero else '>'} 0, got {value!r}")


def _default_rtol(rank_rtol: float | None, k: int, d: int, dtype) -> float:
  if rank_rtol is None:
    return 10.0 * max(k, d) * float(jnp.finfo(dtype).eps)
  _check_positive("rank_rtol", rank_rtol)
  return float(rank_rtol)


# ---------------------------------------------------------------------------------------------------
# Batched, jitted entry points.


@functools.partial(jax.jit, static_argnames=("eps", "max_iters", "ridge", "rtol", "refresh_every"))
def _frank_wolfe_batch(z, *, eps, max_iters, ridge, rtol, refresh_every):
  fn = functools.partial(
      frank_wolfe_single, eps=eps, max_iters=max_iters, ridge=ridge, rtol=rtol,
      refresh_every=refresh_every)
  return jax.vmap(fn)(z)


@functools.partial(jax.jit, static_argnames=("m", "c_factor", "max_iters", "rtol"))
def _rejection_batch(z, keys, *, m, c_factor, max_iters, rtol):
  fn = functools.partial(
      rejection_single, m=m, c_factor=c_factor, max_iters=max_iters, rtol=rtol)
  return jax.vmap(fn)(z, keys)


_BATCH_FNS = {"frank_wolfe": _frank_wolfe_batch, "rejection": _rejection_batch}


@functools.lru_cache(maxsize=64)
def _sharded_fn(mesh: Mesh, method: str, statics: tuple, ndims: tuple[int, ...]):
  """Jitted shard_map of a batch solver; cached so repeated calls reuse one compilation."""
  axes = parallel.logical_to_spec(("batch",))[0]
  specs = tuple(PartitionSpec(axes, *([None] * (n - 1))) for n in ndims)
  out_specs = Design(PartitionSpec(axes, None), *([PartitionSpec(axes)] * 4))
  batch_fn = functools.partial(_BATCH_FNS[method], **dict(statics))
  # Purely per-device code (no collectives); check_vma=False lets the loops start from unvarying
  # constants such as jnp.zeros without pcast bookkeeping.
  mapped = jax.shard_map(
      batch_fn, mesh=mesh, in_specs=specs, out_specs=out_specs, check_vma=False)
  in_shardings = tuple(jax.sharding.NamedSharding(mesh, sp) for sp in specs)
  return jax.jit(mapped, in_shardings=in_shardings), in_shardings


def _solve(method: str, statics: dict, mesh: Mesh | None, *args) -> Design:
  """Runs a batch solver, optionally with the batch sharded over the ``batch`` mesh axes."""
  if mesh is None:
    return _BATCH_FNS[method](*args, **statics)
  shards = parallel.axis_size(mesh, "batch")
  n = args[0].shape[0]
  pad = (-n) % shards
  if pad:  # Pad with copies of the first instance; they are sliced off below.
    args = tuple(jnp.concatenate([a, jnp.repeat(a[:1], pad, axis=0)], axis=0) for a in args)
  fn, shardings = _sharded_fn(
      mesh, method, tuple(sorted(statics.items())), tuple(a.ndim for a in args))
  out = fn(*(jax.device_put(a, sh) for a, sh in zip(args, shardings)))
  return jax.tree.map(lambda x: x[:n], out) if pad else out


def g_optimal_design(
    z,
    *,
    eps: float = 1e-2,
    max_iters: int = 10_000,
    ridge: float = 0.0,
    method: str = "frank_wolfe",
    key: jax.Array | None = None,
    m: int = 10,
    C: float = 1.0,  # noqa: N803  (the paper's name for the approximation factor)
    rank_rtol: float | None = None,
    refresh_every: int = 50,
    mesh: Mesh | None = None,
) -> Design:
  """G-optimal design over the actions of each state.

  Args:
    z: [..., K, d] action embeddings (float32; float64 is kept when jax_enable_x64 is on).
    eps: stopping tolerance, ``g(pi) <= (1 + eps) r`` (Frank-Wolfe duality gap when ridge > 0).
    max_iters: Frank-Wolfe step budget (``method="rejection"``: number of subsets drawn).
    ridge: Tikhonov term in ``V(pi) = sum_a pi_a z_a z_a^T + ridge I`` (>= 0; 0 works on the span).
    method: ``"frank_wolfe"`` (default) or ``"rejection"`` (the paper's random m-subset sampler).
    key: PRNG key, required for ``method="rejection"``.
    m: subset size for ``method="rejection"``.
    C: approximation factor for ``method="rejection"``: accept when ``g <= C r``.
    rank_rtol: relative singular-value tolerance of the rank decision (default
      ``10 max(K, d) eps_machine``).
    refresh_every: Frank-Wolfe steps between exact rebuilds of V^{-1} and of the leverages.
    mesh: optional mesh; the flattened batch is sharded over the mesh axes of the logical axis
      ``batch`` and each device solves its shard (padded to a multiple of the shard count).

  Returns:
    Design with weights [..., K], g_value / iterations / converged / rank [...].

  Raises:
    ValueError: bad shapes, NaN/Inf in z (checked on the host unless z is traced), bad options.
  """
  z = _as_actions(z)
  if method not in _METHODS:
    raise ValueError(f"method: expected one of {_METHODS}, got {method!r}")
  _check_positive("eps", eps)
  _check_positive("max_iters", max_iters, integer=True)
  _check_positive("ridge", ridge, allow_zero=True)
  _check_positive("refresh_every", refresh_every, integer=True)
  *batch, k, d = z.shape
  rtol = _default_rtol(rank_rtol, k, d, z.dtype)
  flat = z.reshape((-1, k, d))

  if method == "frank_wolfe":
    statics = dict(eps=float(eps), max_iters=int(max_iters), ridge=float(ridge), rtol=rtol,
                   refresh_every=int(refresh_every))
    args = (flat,)
  else:
    if key is None:
      raise ValueError("key: method='rejection' draws random subsets and needs a PRNG key")
    _check_positive("m", m, integer=True)
    _check_positive("C", C)
    if m > k:
      raise ValueError(f"m: subset size {m} exceeds the number of actions K={k}")
    if ridge != 0:
      raise ValueError("ridge: method='rejection' follows the paper's Definition 1 (ridge=0)")
    keys = jax.random.split(key, flat.shape[0])
    statics = dict(m=int(m), c_factor=float(C), max_iters=int(max_iters), rtol=rtol)
    args = (flat, keys)

  out = _solve(method, statics, mesh, *args)
  shape = tuple(batch)
  return Design(
      out.weights.reshape(shape + (k,)), out.g_value.reshape(shape),
      out.iterations.reshape(shape), out.converged.reshape(shape), out.rank.reshape(shape))


@functools.partial(jax.jit, static_argnames=("ridge", "rtol"))
def _design_value_batch(z, weights, *, ridge, rtol):
  def one(z1, w1):
    y, mask, r = span_coordinates(z1, rtol, whiten=ridge == 0)
    return value_in_span(y, mask, r, w1, ridge)

  return jax.vmap(one)(z, weights)


def design_value(z, weights, *, ridge: float = 0.0, rank_rtol: float | None = None) -> jax.Array:
  """g(pi) = max_a z_a^T V(pi)^+ z_a for given weights, on the span of the actions.

  Args:
    z: [..., K, d] action embeddings.
    weights: [..., K] nonnegative weights (used as given; the Kiefer-Wolfowitz bound ``g >= r``
      assumes they sum to 1).
    ridge: Tikhonov term as in ``g_optimal_design``.
    rank_rtol: rank tolerance as in ``g_optimal_design``.

  Returns:
    [...] g values; ``+inf`` when ridge = 0 and the weighted actions do not span all K actions.
  """
  z = _as_actions(z)
  _check_positive("ridge", ridge, allow_zero=True)
  w = jnp.asarray(weights, dtype=z.dtype) if not _is_traced(weights) else weights.astype(z.dtype)
  if w.shape != z.shape[:-1]:
    raise ValueError(f"weights: expected shape {z.shape[:-1]} (z without its last dim), got {w.shape}")
  if not _is_traced(w) and not bool(jnp.all(jnp.isfinite(w) & (w >= 0))):
    raise ValueError("weights: expected finite, nonnegative entries")
  *batch, k, d = z.shape
  rtol = _default_rtol(rank_rtol, k, d, z.dtype)
  out = _design_value_batch(
      z.reshape((-1, k, d)), w.reshape((-1, k)), ridge=float(ridge), rtol=rtol)
  return out.reshape(tuple(batch))


def sample_exploratory_actions(key: jax.Array, z, design: Design, m: int = 10) -> jax.Array:
  """Samples m distinct actions per state with probability proportional to the design weights.

  Successive sampling without replacement via Gumbel top-k: the m largest of ``log pi_a + G_a``
  (G_a i.i.d. Gumbel) are a draw of m actions without replacement, each next one with probability
  proportional to pi among those left. If the support holds fewer than m actions, all of it is taken
  and the rest is filled uniformly at random from the zero-weight actions. For a rejection-sampler
  design (uniform on an m-subset) this returns that subset in random order.

  Args:
    key: PRNG key (one for the whole batch; draws are independent across states).
    z: [..., K, d] the action embeddings the design was computed for (used to check shapes).
    design: a Design with weights [..., K].
    m: number of exploratory actions (the paper uses 10).

  Returns:
    [..., m] int32 action indices, distinct within each state.
  """
  weights = design.weights
  zshape = z.shape
  if len(zshape) < 2 or tuple(zshape[:-1]) != tuple(weights.shape):
    raise ValueError(
        f"design: weights of shape {weights.shape} do not match z of shape {zshape} "
        "(expected weights [..., K] for z [..., K, d])")
  _check_positive("m", m, integer=True)
  if m > weights.shape[-1]:
    raise ValueError(f"m: cannot draw {m} distinct actions out of K={weights.shape[-1]}")
  return _sample_topk(key, weights, m=int(m))


@functools.partial(jax.jit, static_argnames=("m",))
def _sample_topk(key, weights, *, m):
  w = weights.astype(jnp.float32)
  gumbel = jax.random.gumbel(key, w.shape, dtype=jnp.float32)
  on_support = w > 0
  # Support scores are >= log(tiny) - a few (> -120); off-support ones sit far below, so they are only
  # used once the support is exhausted, and among themselves they are ordered uniformly at random.
  score = jnp.where(on_support, jnp.log(jnp.where(on_support, w, 1.0)) + gumbel, gumbel - 1e4)
  _, idx = lax.top_k(score, m)
  return idx.astype(jnp.int32)
