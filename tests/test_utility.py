"""Content-gap utility against a direct numpy computation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from eagle_jax import utility


def _numpy_utility(z, zu, items, lam, k, exclude=None):
  out = []
  for n in range(z.shape[0]):
    d = np.linalg.norm(items - z[n], axis=1)
    if exclude is not None:
      d[exclude[n]] = np.inf
    out.append(zu[n] @ z[n] + lam * np.sort(d)[:k].sum())
  return np.array(out)


def test_utility_equals_numpy():
  rng = np.random.default_rng(0)
  items = rng.normal(size=(200, 8)).astype(np.float32)
  z = rng.normal(size=(16, 8)).astype(np.float32)
  zu = rng.normal(size=(16, 8)).astype(np.float32)
  got = utility.content_gap_utility(jnp.asarray(z), jnp.asarray(zu), jnp.asarray(items), lam=0.7)
  np.testing.assert_allclose(got, _numpy_utility(z, zu, items, 0.7, 3), rtol=1e-5, atol=1e-5)
  anchor = rng.integers(0, 200, size=16)
  z_at_anchor = items[anchor] + 1e-3
  got = utility.content_gap_utility(jnp.asarray(z_at_anchor), jnp.asarray(zu), jnp.asarray(items),
                                    lam=0.5, k=3, exclude=jnp.asarray(anchor))
  np.testing.assert_allclose(
      got, _numpy_utility(z_at_anchor, zu, items, 0.5, 3, exclude=anchor), rtol=1e-4, atol=1e-4)


def test_hand_computed_value_and_finite_gradient_at_an_item():
  items = jnp.array([[0.0, 0.0], [3.0, 4.0], [0.0, 1.0], [10.0, 0.0]])
  z = jnp.array([0.0, 0.0])  # sits on item 0: distances 0, 1, 5 to the 3 nearest
  u = utility.content_gap_utility(z, jnp.array([1.0, 2.0]), items, lam=2.0)
  assert float(u) == pytest.approx(0.0 + 2.0 * (0 + 1 + 5))
  g = jax.grad(lambda x: utility.content_gap_utility(x, jnp.array([1.0, 2.0]), items, lam=2.0))(z)
  assert np.isfinite(np.asarray(g)).all()


def test_bad_arguments():
  items = jnp.zeros((2, 3))
  with pytest.raises(ValueError, match="k must be in"):
    utility.content_gap_utility(jnp.zeros(3), jnp.zeros(3), items, lam=1.0, k=3)
  with pytest.raises(ValueError, match="item_table must be"):
    utility.content_gap_utility(jnp.zeros(4), jnp.zeros(4), items, lam=1.0, k=1)
  with pytest.raises(ValueError, match="lam"):
    utility.content_gap_utility(jnp.zeros(3), jnp.zeros(3), items, lam=-1.0, k=1)
