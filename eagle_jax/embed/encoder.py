"""The encoder E_D: text -> behavioural latent space Z.

The paper fine-tunes Gemini Nano-2 with an l2 regression loss from a movie description to the movie's
WALS factor (PAPER_SPEC.md, section 1.7). Here E_D is a frozen sentence encoder (all-MiniLM-L6-v2,
mean-pooled, normalised; ``models/text_encoder.py``) followed by a small MLP head trained with the same
l2 loss. Freezing the backbone keeps E_D trainable on a CPU in seconds and makes it deterministic.

Metrics reported for a held-out set of movies:
* R^2 = 1 - sum ||y - y_hat||^2 / sum ||y - mean(y)||^2 (pooled over dimensions);
* nearest-neighbour recall@k: the fraction of held-out movies whose own factor is among the k items
  nearest to the prediction, among all items;
* the same for a genre-only ridge regression baseline (multi-hot genres -> factors, closed form).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx


class RegressionHead(nnx.Module):
  """MLP from sentence embeddings to Z: [N, e] -> [N, d]."""

  def __init__(self, in_dim: int, out_dim: int, hidden: int, *, dropout: float, rngs: nnx.Rngs):
    self.hidden = nnx.Linear(in_dim, hidden, rngs=rngs)
    self.out = nnx.Linear(hidden, out_dim, rngs=rngs)
    self.dropout = nnx.Dropout(dropout, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.out(self.dropout(nnx.gelu(self.hidden(x))))


@dataclasses.dataclass(frozen=True)
class HeadConfig:
  """Training settings of the regression head (see configs)."""

  hidden: int = 256
  dropout: float = 0.1
  learning_rate: float = 3e-3
  weight_decay: float = 1e-4
  steps: int = 1500
  batch_size: int = 128
  seed: int = 0


def r2_score(y_true: np.ndarray, y_pred: np.ndarray) -> float:
  """Pooled R^2 over all dimensions: [N, d], [N, d] -> scalar."""
  resid = np.sum((y_true - y_pred) ** 2)
  total = np.sum((y_true - y_true.mean(axis=0)) ** 2)
  return float(1.0 - resid / total)


def nn_recall_at_k(
    pred: np.ndarray, true_index: np.ndarray, item_table: np.ndarray, k: int = 10
) -> float:
  """Fraction of rows whose true item is among the k items nearest (l2) to the prediction.

  Args:
    pred: [M, d] predicted factors.
    true_index: [M] index of each row's own item in ``item_table``.
    item_table: [N, d] all item factors.
    k: neighbours.
  """
  sq = (np.sum(pred**2, 1, keepdims=True) - 2 * pred @ item_table.T
        + np.sum(item_table**2, 1)[None])
  own = sq[np.arange(len(true_index)), true_index]
  rank = np.sum(sq < own[:, None], axis=1)  # items strictly nearer than the true one
  return float(np.mean(rank < k))


def fit_head(
    x_train: np.ndarray, y_train: np.ndarray, cfg: HeadConfig
) -> tuple[RegressionHead, list[float]]:
  """Trains the head with AdamW on the mean squared l2 error.

  Args:
    x_train: [N, e] sentence embeddings.
    y_train: [N, d] target factors.
    cfg: settings.

  Returns:
    ``(head, losses)`` with the training loss every 100 steps.
  """
  if x_train.shape[0] != y_train.shape[0] or x_train.shape[0] == 0:
    raise ValueError(f"x_train {x_train.shape} and y_train {y_train.shape} must have the same, "
                     "non-zero, number of rows")
  head = RegressionHead(x_train.shape[1], y_train.shape[1], cfg.hidden, dropout=cfg.dropout,
                        rngs=nnx.Rngs(cfg.seed))
  opt = nnx.Optimizer(head, optax.adamw(cfg.learning_rate, weight_decay=cfg.weight_decay),
                      wrt=nnx.Param)

  @nnx.jit
  def step(head, opt, x, y):
    def loss_fn(h):
      return jnp.mean(jnp.sum((h(x) - y) ** 2, axis=-1))

    loss, grads = nnx.value_and_grad(loss_fn)(head)
    opt.update(head, grads)
    return loss

  rng = np.random.default_rng(cfg.seed)
  n = x_train.shape[0]
  bs = min(cfg.batch_size, n)
  losses = []
  head.train()
  for i in range(cfg.steps):
    idx = rng.choice(n, size=bs, replace=False)
    loss = step(head, opt, jnp.asarray(x_train[idx]), jnp.asarray(y_train[idx]))
    if i % 100 == 0 or i == cfg.steps - 1:
      losses.append(float(loss))
  head.eval()
  return head, losses


def predict(head: RegressionHead, x: np.ndarray, batch: int = 4096) -> np.ndarray:
  """[N, e] -> [N, d] in evaluation mode."""
  head.eval()
  fn = nnx.jit(lambda h, v: h(v))
  return np.concatenate([np.asarray(fn(head, jnp.asarray(x[i:i + batch])))
                         for i in range(0, x.shape[0], batch)], axis=0)


def genre_features(genres: Sequence[Sequence[str]], vocabulary: Sequence[str] | None = None):
  """Multi-hot genre matrix [N, G] and its vocabulary (sorted unless given)."""
  vocab = list(vocabulary) if vocabulary is not None else sorted({g for gs in genres for g in gs})
  index = {g: j for j, g in enumerate(vocab)}
  out = np.zeros((len(genres), len(vocab)), np.float32)
  for i, gs in enumerate(genres):
    for g in gs:
      if g in index:
        out[i, index[g]] = 1.0
  return out, vocab


def ridge_fit_predict(
    x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, reg: float = 1.0
) -> np.ndarray:
  """Closed-form ridge regression with an unpenalised intercept: predictions [M, d]."""
  xm, ym = x_train.mean(0), y_train.mean(0)
  a = (x_train - xm).T @ (x_train - xm) + reg * np.eye(x_train.shape[1])
  w = np.linalg.solve(a, (x_train - xm).T @ (y_train - ym))
  return (x_test - xm) @ w + ym
