r"""Weighted alternating least squares (WALS) for explicit ratings, jitted and sharded over rows.

Objective
---------
With users ``u`` (factors ``x_u`` in R^k, bias ``b_u``), items ``i`` (factors ``y_i``, bias ``c_i``), the
global mean ``mu`` of the training ratings (0 when ``center=False``) and observed ratings ``r_ui``::

  L = w_obs * sum_{(u,i) observed} (r_ui - mu - b_u - c_i - <x_u, y_i>)^2
    + w0    * sum_{all (u,i)} <x_u, y_i>^2
    + sum_u lam_u (|x_u|^2 + beta b_u^2) + sum_i lam_i (|y_i|^2 + beta c_i^2),
  lam_r = reg * max(n_r, 1)^nu,

where ``w_obs = observed_weight``, ``w0 = unobserved_weight``, ``beta = bias_reg / reg`` and ``n_r`` is
the number of observed entries of row ``r`` (``nu = reg_exponent``: 0 gives TF's WALSModel penalty,
1 gives the frequency-scaled ALS-WR penalty of Zhou et al. 2008). This is the TF contrib ``WALSModel``
objective (observed weight plus a uniform unobserved weight pulling every prediction toward 0, the
Hu-Koren-Volinsky form) applied to centred explicit ratings, with optional biases that the unobserved
term does not touch. The predicted rating is ``mu + b_u + c_i + <x_u, y_i>``; ``augmented`` returns
vectors ``z_u, z_i`` whose inner product is exactly that. Without biases and centring it is
``<x_u, y_i>``.

Solves
------
Fixing the items, ``L`` is a sum over users of independent ridge problems in ``theta_u = [x_u, b_u]``
with features ``phi_i = [y_i, 1]`` and targets ``t_ui = r_ui - mu - c_i``::

  (w_obs * sum_{i in N(u)} phi_i phi_i^T + w0 * blockdiag(G, 0) + lam_u diag(1.., beta)) theta_u
      = w_obs * sum_{i in N(u)} t_ui phi_i,          G = sum_{all i} y_i y_i^T = Y^T Y,

(the Gramian trick: the unobserved term over *all* items costs one ``k x k`` matrix per half-sweep).
A sweep solves all users, then all items, each exactly, so ``L`` never increases. A row with no
observed entries gets the prior mean: ``theta = 0`` (its prediction is ``mu`` plus the other side's
bias), never NaN, since ``reg > 0`` keeps every system positive definite.

Layout and sharding
-------------------
Rows are cut into fixed-length segments packed into fixed-shape blocks (``wals_plan``), so one compiled
block body serves every degree distribution. Per block the other side's features are gathered into
``[S, L, d]``, per-segment normal equations built with one batched einsum and summed per row
(``segment_sum``), and the ``[R, d, d]`` systems solved by a blocked Cholesky factorisation written in
XLA ops (``cholesky_solve``; LAPACK's batched kernel deadlocks XLA's CPU thread pool here), inside a
``lax.map`` over blocks so memory stays at one block. Whole blocks, and with them rows, are sharded
over the mesh's ``rows`` logical axis (``("data", "fsdp")``) with ``jax.shard_map``: each device solves
its own rows against a replicated copy of the other side's factors and the Gramian. The factor tables
are replicated between half-sweeps, which is fine up to MovieLens-25M sizes (162,541 x 64 float32 is
42 MB); tables that do not fit on one device would need ALX-style sharded tables and all-gathers. A
row's solve does not depend on the sharding, so 1 and 8 devices agree to float32 rounding (tested).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, PartitionSpec

from eagle_jax import parallel
from eagle_jax.embed import wals_plan
from eagle_jax.embed.cholesky import cholesky_solve


@dataclasses.dataclass(frozen=True)
class WALSConfig:
  """Hyperparameters of WALS (see the module docstring for the objective).

  Attributes:
    rank: factor dimension ``k``.
    reg: L2 weight ``reg`` (> 0).
    unobserved_weight: ``w0`` >= 0, weight of every entry's pull of ``<x_u, y_i>`` toward 0.
    observed_weight: ``w_obs`` > 0, weight of the observed squared errors.
    reg_exponent: ``nu`` >= 0, the penalty of a row scales as ``max(n_r, 1)^nu``.
    use_bias: learn user and item biases ``b_u, c_i``.
    bias_reg: L2 weight of the biases (``None``: same as ``reg``).
    center: subtract the global mean of the training ratings.
    sweeps: number of sweeps (users then items) in ``fit``.
    init_scale: item factors start as ``N(0, init_scale^2 / k)``; user factors are solved first.
    seed: seed of the initial item factors.
    segment_length: entries per row segment ``L`` (``wals_plan``).
    block_segments: segment slots per block ``S``; one block gathers ``S * L * (k+1)`` floats.
    block_rows: row slots per block ``R`` (systems solved per block).
  """

  rank: int = 32
  reg: float = 0.1
  unobserved_weight: float = 0.0
  observed_weight: float = 1.0
  reg_exponent: float = 0.0
  use_bias: bool = True
  bias_reg: float | None = None
  center: bool = True
  sweeps: int = 10
  init_scale: float = 0.1
  seed: int = 0
  segment_length: int = 32
  block_segments: int = 1024
  block_rows: int = 512

  def __post_init__(self):
    checks = (
        ("rank", self.rank >= 1, "an integer >= 1"),
        ("reg", self.reg > 0 and math.isfinite(self.reg), "a finite number > 0"),
        ("unobserved_weight", self.unobserved_weight >= 0 and math.isfinite(self.unobserved_weight),
         "a finite number >= 0"),
        ("observed_weight", self.observed_weight > 0 and math.isfinite(self.observed_weight),
         "a finite number > 0"),
        ("reg_exponent", self.reg_exponent >= 0, "a number >= 0"),
        ("bias_reg", self.bias_reg is None or self.bias_reg > 0, "None or a number > 0"),
        ("sweeps", self.sweeps >= 0, "an integer >= 0"),
        ("init_scale", self.init_scale > 0, "a number > 0"),
        ("segment_length", self.segment_length >= 1, "an integer >= 1"),
        ("block_segments", self.block_segments >= 1, "an integer >= 1"),
        ("block_rows", self.block_rows >= 1, "an integer >= 1"),
    )
    for name, ok, expected in checks:
      if not ok:
        raise ValueError(f"WALSConfig.{name} must be {expected}, got {getattr(self, name)!r}")

  @classmethod
  def from_config(cls, config: Mapping[str, Any] | Any) -> WALSConfig:
    """From a mapping or ``ml_collections.ConfigDict``; unknown fields are an error."""
    items = dict(config.items()) if hasattr(config, "items") else dict(vars(config))
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(items) - known)
    if unknown:
      raise ValueError(f"WALS config: unknown fields {unknown}; known: {sorted(known)}")
    return cls(**items)

  @property
  def bias_weight(self) -> float:
    return self.reg if self.bias_reg is None else self.bias_reg


def augmented_dim(config: WALSConfig) -> int:
  """Width of ``WALSFactors.augmented``'s vectors for ``config``: ``rank + 3``.

  The three extra coordinates are there with or without biases and centring (the biases and ``mu``
  are then 0), so the width depends on the rank only.
  """
  return int(config.rank) + 3


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class WALSFactors:
  """The learned embeddings.

  Attributes:
    user_factors: [U, k] float32 ``x_u``.
    item_factors: [I, k] float32 ``y_i``.
    user_bias: [U] float32 ``b_u`` (zeros without biases).
    item_bias: [I] float32 ``c_i`` (zeros without biases).
    global_mean: [] float32 ``mu`` (0 without centring).
  """

  user_factors: jax.Array
  item_factors: jax.Array
  user_bias: jax.Array
  item_bias: jax.Array
  global_mean: jax.Array

  def to_dict(self) -> dict[str, jax.Array]:
    return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

  @classmethod
  def from_dict(cls, tree: Mapping[str, Any]) -> WALSFactors:
    return cls(**{f.name: jnp.asarray(tree[f.name]) for f in dataclasses.fields(cls)})

  def augmented(self) -> tuple[jax.Array, jax.Array]:
    """``z_u = [x_u, b_u, 1, mu]`` [U, k+3] and ``z_i = [y_i, 1, c_i, 1]`` [I, k+3].

    ``<z_u, z_i>`` is the predicted rating ``mu + b_u + c_i + <x_u, y_i>``.
    """
    nu, ni = self.user_factors.shape[0], self.item_factors.shape[0]
    mu = jnp.broadcast_to(self.global_mean, (nu,))
    zu = jnp.concatenate([self.user_factors, self.user_bias[:, None], jnp.ones((nu, 1)),
                          mu[:, None]], axis=1)
    zi = jnp.concatenate([self.item_factors, jnp.ones((ni, 1)), self.item_bias[:, None],
                          jnp.ones((ni, 1))], axis=1)
    return zu, zi


def validate_ratings(
    user: np.ndarray, item: np.ndarray, rating: np.ndarray, num_users: int, num_items: int,
    rank: int,
) -> None:
  """Raises ``ValueError`` naming the argument when the ratings cannot be factorised."""
  if num_users <= 0 or num_items <= 0:
    raise ValueError(f"empty matrix: num_users={num_users}, num_items={num_items}; both must be > 0")
  n = user.shape[0]
  if n == 0:
    raise ValueError("empty matrix: no ratings to factorise (user, item and rating are empty)")
  for name, arr in (("user", user), ("item", item), ("rating", rating)):
    if arr.ndim != 1 or arr.shape[0] != n:
      raise ValueError(f"{name} must be a 1-d array of length {n}, got shape {arr.shape}")
  for name, arr in (("user", user), ("item", item)):
    if not np.issubdtype(arr.dtype, np.integer):
      raise ValueError(f"{name} must hold integer indices, got dtype {arr.dtype}")
  for name, arr, bound in (("user", user, num_users), ("item", item, num_items)):
    lo, hi = int(arr.min()), int(arr.max())
    if lo < 0 or hi >= bound:
      raise ValueError(f"{name} indices must be in [0, {bound}), got range [{lo}, {hi}]")
  bad = ~np.isfinite(rating)
  if bad.any():
    k = int(np.argmax(bad))
    raise ValueError(f"rating must be finite: {int(bad.sum())} NaN/inf values, the first at "
                     f"position {k} (user {int(user[k])}, item {int(item[k])})")
  if rank > num_items or rank > num_users:
    raise ValueError(f"rank={rank} exceeds the matrix size ({num_users} users x {num_items} "
                     f"items); rank must be <= min(num_users, num_items)")
  key = user.astype(np.int64) * num_items + item.astype(np.int64)
  if np.unique(key).shape[0] != n:
    raise ValueError("(user, item) pairs must be unique: the ratings contain duplicates")


def _device_plan(plan: wals_plan.RowPlan, mesh: Mesh) -> dict[str, jax.Array]:
  """Places a plan's blocks on the mesh, split over the ``rows`` logical axis (whole blocks)."""
  put = lambda x: jax.device_put(
      x, parallel.named_sharding(mesh, ["rows"] + [None] * (x.ndim - 1)))
  return {name: put(getattr(plan, name)) for name in ("cols", "vals", "seg_row", "rows", "counts")}



def _half_sweep(
    plan: dict[str, jax.Array],
    other_factors: jax.Array,
    other_bias: jax.Array,
    mu: jax.Array,
    *,
    num_rows: int,
    cfg: WALSConfig,
    mesh: Mesh,
) -> tuple[jax.Array, jax.Array]:
  """Solves every row given the other side.

  Args:
    plan: device blocks of this side (``_device_plan``).
    other_factors: [n, k] float32 factors of the other side (replicated).
    other_bias: [n] float32 biases of the other side.
    mu: [] float32 global mean.
    num_rows: rows on this side.
    cfg: hyperparameters.
    mesh: the mesh whose ``rows`` axes split the blocks.

  Returns:
    ([num_rows, k] factors, [num_rows] biases), replicated.
  """
  n, k = other_factors.shape
  d = k + 1 if cfg.use_bias else k
  feats = other_factors
  if cfg.use_bias:
    feats = jnp.concatenate([feats, jnp.ones((n, 1), feats.dtype)], axis=1)
  feats = jnp.concatenate([feats, jnp.zeros((1, d), feats.dtype)], axis=0)  # padding column n
  offset = jnp.zeros((n + 1,), jnp.float32)
  if cfg.use_bias:
    offset = offset.at[:n].set(other_bias)
  gram = jnp.dot(other_factors.T, other_factors, precision=jax.lax.Precision.HIGHEST)
  base = jnp.zeros((d, d), jnp.float32).at[:k, :k].set(cfg.unobserved_weight * gram)
  reg_diag = jnp.full((d,), cfg.reg, jnp.float32)
  if cfg.use_bias:
    reg_diag = reg_diag.at[k].set(cfg.bias_weight)
  rows_spec = parallel.logical_to_spec(["rows"])[0]
  spec2, spec3, rep = PartitionSpec(rows_spec, None), PartitionSpec(rows_spec, None, None), (
      PartitionSpec())
  solve = jax.shard_map(
      functools.partial(_solve_blocks, cfg=cfg), mesh=mesh,
      in_specs=(spec3, spec3, spec2, spec2, rep, rep, rep, rep, rep), out_specs=spec3)
  sol = solve(plan["cols"], plan["vals"], plan["seg_row"], plan["counts"], feats, offset, base,
              reg_diag, mu)
  out = jnp.zeros((num_rows, d), jnp.float32).at[plan["rows"].reshape(-1)].set(
      sol.reshape(-1, d), mode="drop", unique_indices=True)
  if cfg.use_bias:
    return out[:, :k], out[:, k]
  return out, jnp.zeros((num_rows,), jnp.float32)


def _solve_blocks(cols, vals, seg_row, counts, feats, offset, base, reg_diag, mu, *,
                  cfg: WALSConfig):
  """Per device: the ridge solutions of the rows of its blocks.

  Args:
    cols: [nb, S, L] int32 other-side indices (``n`` for padding).
    vals: [nb, S, L] float32 ratings.
    seg_row: [nb, S] int32 row slot of each segment (``R`` for padding).
    counts: [nb, R] float32 observed entries per row slot.
    feats: [n+1, d] float32 other-side features ``[y, 1]`` with a zero padding row.
    offset: [n+1] float32 other-side biases (0 for padding).
    base: [d, d] float32 ``w0 * blockdiag(G, 0)``.
    reg_diag: [d] float32 per-coordinate penalty ``reg`` (``bias_reg`` for the bias).
    mu: [] float32 global mean.
    cfg: hyperparameters.

  Returns:
    [nb, R, d] float32 solutions ``theta = [x, b]`` per row slot.
  """
  hi = jax.lax.Precision.HIGHEST
  num_slots = counts.shape[-1]

  def solve_block(args):
    c, v, sr, m = args  # [S, L], [S, L], [S], [R]
    phi = feats[c]  # [S, L, d]
    target = v - mu - offset[c]  # padding has phi = 0, so its target does not matter
    seg_a = jnp.einsum("sld,sle->sde", phi, phi, precision=hi)
    seg_b = jnp.einsum("sld,sl->sd", phi, target, precision=hi)
    a = jax.ops.segment_sum(seg_a, sr, num_segments=num_slots)  # [R, d, d]; slot R dropped
    rhs = jax.ops.segment_sum(seg_b, sr, num_segments=num_slots)
    lam = jnp.maximum(m, 1.0) ** cfg.reg_exponent
    a = cfg.observed_weight * a + base + lam[:, None, None] * jnp.diag(reg_diag)
    return cholesky_solve(a, cfg.observed_weight * rhs)

  return jax.lax.map(solve_block, (cols, vals, seg_row, counts))


def _sweep(user_plan, item_plan, factors: WALSFactors, *, num_users: int, num_items: int,
           cfg: WALSConfig, mesh: Mesh) -> WALSFactors:
  """One sweep: all users given the items, then all items given the new users."""
  mu = factors.global_mean
  uf, ub = _half_sweep(user_plan, factors.item_factors, factors.item_bias, mu,
                       num_rows=num_users, cfg=cfg, mesh=mesh)
  itf, ib = _half_sweep(item_plan, uf, ub, mu, num_rows=num_items, cfg=cfg, mesh=mesh)
  return WALSFactors(user_factors=uf, item_factors=itf, user_bias=ub, item_bias=ib,
                     global_mean=mu)


def _objective(user_plan, factors: WALSFactors, user_counts, item_counts, *,
               cfg: WALSConfig) -> jax.Array:
  """The objective ``L`` of the module docstring, [] float32, summed block by block."""
  hi = jax.lax.Precision.HIGHEST
  x, y = factors.user_factors, factors.item_factors
  k = x.shape[1]
  ni = y.shape[0]
  xp = jnp.concatenate([x, jnp.zeros((1, k))], axis=0)
  yp = jnp.concatenate([y, jnp.zeros((1, k))], axis=0)
  bp = jnp.concatenate([factors.user_bias, jnp.zeros((1,))])
  cp = jnp.concatenate([factors.item_bias, jnp.zeros((1,))])
  mu = factors.global_mean

  def block_loss(args):
    c, v, sr, rows = args  # [S, L], [S, L], [S], [R]
    r = jnp.concatenate([rows, jnp.array([x.shape[0]], rows.dtype)])[sr]  # [S] user per segment
    pred = mu + bp[r][:, None] + cp[c] + jnp.einsum("sk,slk->sl", xp[r], yp[c], precision=hi)
    err = jnp.where(c < ni, v - pred, 0.0)
    return jnp.sum(err * err)

  data = jnp.sum(jax.lax.map(block_loss, (user_plan["cols"], user_plan["vals"],
                                          user_plan["seg_row"], user_plan["rows"])))
  gx = jnp.dot(x.T, x, precision=hi)
  gy = jnp.dot(y.T, y, precision=hi)
  lam_u = cfg.reg * jnp.maximum(user_counts, 1.0) ** cfg.reg_exponent
  lam_i = cfg.reg * jnp.maximum(item_counts, 1.0) ** cfg.reg_exponent
  beta = cfg.bias_weight / cfg.reg
  penalty = (jnp.sum(lam_u * (jnp.sum(x * x, axis=1) + beta * factors.user_bias ** 2))
             + jnp.sum(lam_i * (jnp.sum(y * y, axis=1) + beta * factors.item_bias ** 2)))
  return cfg.observed_weight * data + cfg.unobserved_weight * jnp.sum(gx * gy) + penalty


class WALS:
  """WALS on one ratings matrix: plans built once, jitted sweeps, objective.

  Example::

    model = WALS.from_ratings(train, WALSConfig(rank=32, reg=0.05), mesh=parallel.make_mesh())
    factors, history = model.fit()
  """

  def __init__(
      self,
      user: np.ndarray,
      item: np.ndarray,
      rating: np.ndarray,
      *,
      num_users: int,
      num_items: int,
      config: WALSConfig,
      mesh: Mesh | None = None,
  ):
    """Validates the ratings, lays them out on ``mesh`` (default: all devices on ``data``).

    Args:
      user: [N] int user index in ``[0, num_users)``.
      item: [N] int item index in ``[0, num_items)``.
      rating: [N] float rating (finite).
      num_users, num_items: the matrix shape; users or items without ratings are allowed and get
        the prior mean (zero factor and bias).
      config: hyperparameters.
      mesh: device mesh; rows are split over its ``rows`` logical axis.

    Raises:
      ValueError: empty matrix, out-of-range or duplicated indices, non-finite ratings, or a rank
        above ``min(num_users, num_items)``.
    """
    user, item, rating = np.asarray(user), np.asarray(item), np.asarray(rating)
    validate_ratings(user, item, rating, int(num_users), int(num_items), config.rank)
    self.config = config
    self.num_users, self.num_items = int(num_users), int(num_items)
    self.mesh = mesh if mesh is not None else parallel.make_mesh()
    shards = parallel.axis_size(self.mesh, "rows")
    self.global_mean = float(np.mean(rating, dtype=np.float64)) if config.center else 0.0
    kwargs = dict(segment_length=config.segment_length, block_segments=config.block_segments,
                  block_rows=config.block_rows, block_multiple=shards)
    self.user_plan = wals_plan.build_plan(user, item, rating, self.num_users, self.num_items,
                                          **kwargs)
    self.item_plan = wals_plan.build_plan(item, user, rating, self.num_items, self.num_users,
                                          **kwargs)
    self._user_dev = _device_plan(self.user_plan, self.mesh)
    self._item_dev = _device_plan(self.item_plan, self.mesh)
    rep = parallel.replicated(self.mesh)
    self._user_counts = jax.device_put(
        np.bincount(user, minlength=self.num_users).astype(np.float32), rep)
    self._item_counts = jax.device_put(
        np.bincount(item, minlength=self.num_items).astype(np.float32), rep)
    self._sweep = jax.jit(
        functools.partial(_sweep, num_users=self.num_users, num_items=self.num_items,
                          cfg=config, mesh=self.mesh),
        out_shardings=rep)
    self._objective = jax.jit(functools.partial(_objective, cfg=config), out_shardings=rep)

  @classmethod
  def from_ratings(cls, data, config: WALSConfig, *, mesh: Mesh | None = None) -> WALS:
    """From a ``eagle_jax.data.RatingsData``."""
    return cls(data.user, data.item, data.rating, num_users=data.num_users,
               num_items=data.num_items, config=config, mesh=mesh)

  def init(self, seed: int | None = None) -> WALSFactors:
    """Item factors ``N(0, init_scale^2 / k)`` from numpy's PCG64 (device independent), rest 0."""
    cfg = self.config
    rng = np.random.default_rng(cfg.seed if seed is None else seed)
    items = rng.normal(0.0, cfg.init_scale / np.sqrt(cfg.rank), (self.num_items, cfg.rank))
    rep = parallel.replicated(self.mesh)
    return jax.device_put(WALSFactors(
        user_factors=np.zeros((self.num_users, cfg.rank), np.float32),
        item_factors=items.astype(np.float32),
        user_bias=np.zeros((self.num_users,), np.float32),
        item_bias=np.zeros((self.num_items,), np.float32),
        global_mean=np.float32(self.global_mean)), rep)

  def place(self, factors: WALSFactors) -> WALSFactors:
    """Puts ``factors`` (e.g. restored from a checkpoint) on this model's mesh, replicated."""
    f = WALSFactors.from_dict({k: np.asarray(v, np.float32) for k, v in factors.to_dict().items()})
    return jax.device_put(f, parallel.replicated(self.mesh))

  def sweep(self, factors: WALSFactors) -> WALSFactors:
    """One sweep (users, then items)."""
    return self._sweep(self._user_dev, self._item_dev, factors)

  def objective(self, factors: WALSFactors) -> float:
    """The training objective ``L`` (module docstring) at ``factors``."""
    return float(self._objective(self._user_dev, factors, self._user_counts, self._item_counts))

  def fit(
      self,
      factors: WALSFactors | None = None,
      *,
      sweeps: int | None = None,
      start: int = 0,
      track_objective: bool = True,
      callback: Callable[[int, WALSFactors, dict[str, float]], None] | None = None,
  ) -> tuple[WALSFactors, list[dict[str, float]]]:
    """Runs sweeps ``start+1 .. sweeps`` (default ``config.sweeps``) from ``factors``.

    Args:
      factors: the starting point (default ``init()``).
      sweeps: total number of sweeps.
      start: sweeps already done (for resuming).
      track_objective: evaluate ``L`` after every sweep (one extra pass over the ratings).
      callback: ``callback(sweep, factors, record)`` after every sweep (checkpointing, logging).

    Returns:
      The factors and one record per sweep: ``sweep``, ``seconds`` (wall time of the sweep,
      including compilation on the first one) and ``objective`` when tracked.
    """
    factors = self.init() if factors is None else factors
    total = self.config.sweeps if sweeps is None else int(sweeps)
    history = []
    for s in range(start + 1, total + 1):
      t0 = time.perf_counter()
      factors = jax.block_until_ready(self.sweep(factors))
      record = {"sweep": s, "seconds": time.perf_counter() - t0}
      if track_objective:
        record["objective"] = self.objective(factors)
      history.append(record)
      if callback is not None:
        callback(s, factors, record)
    return factors, history
