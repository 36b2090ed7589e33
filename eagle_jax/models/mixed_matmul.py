"""Dense-layer matmuls with 16-bit operands summed in float32, in the forward and backward pass.

``mixed_dot_general(operand)`` is a ``lax.dot_general`` as flax's ``nnx.LinearGeneral(dot_general=)``
calls it: ``y = x W`` with ``x`` and ``W`` cast to ``operand`` (bfloat16) and accumulated and
returned in float32. Its gradients are the two transposed products, ``dx = g Wᵀ`` and
``dW = xᵀ g``, with the cotangent ``g`` cast to ``operand`` too, also summed in float32: the usual
mixed-precision recipe (float32 parameters, optimizer and every non-matmul op).

Why by hand: autodiff of a bf16-operand product transposes it with the float32 cotangent as one
operand, and XLA:CPU runs a product of mixed or float32 operands on its float32 path. On CPUs with
bf16 matrix units (AMX) a bf16-operand, float32-result product is several times faster than a
float32 one, and a bf16-result product is not (it goes through float32 too), so only the forward
would gain. Here all three products of a dense layer take the fast path.
"""

from __future__ import annotations

import functools
import string
from collections.abc import Callable

import jax
import jax.numpy as jnp


def _einsum_specs(dimension_numbers, x_ndim: int, w_ndim: int) -> tuple[str, str, str]:
  """Einsum subscripts ``(x, w, out)`` of a batch-free ``dot_general`` (out: x's free dimensions,
  then w's, as ``lax.dot_general`` orders them)."""
  (x_contract, w_contract), (x_batch, w_batch) = dimension_numbers
  if len(x_batch) or len(w_batch):
    raise ValueError("mixed_dot_general: contractions with batch dimensions are not supported")
  letters = iter(string.ascii_letters)
  xs = [next(letters) for _ in range(x_ndim)]
  ws: list[str | None] = [None] * w_ndim
  for a, b in zip(x_contract, w_contract, strict=True):
    ws[b] = xs[a]
  ws = [c or next(letters) for c in ws]
  out = ([xs[i] for i in range(x_ndim) if i not in x_contract]
         + [ws[i] for i in range(w_ndim) if i not in w_contract])
  return "".join(xs), "".join(ws), "".join(out)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _product(x: jax.Array, w: jax.Array, specs: tuple[str, str, str], operand) -> jax.Array:
  xs, ws, out = specs
  return jnp.einsum(f"{xs},{ws}->{out}", x.astype(operand), w.astype(operand),
                    preferred_element_type=jnp.float32)


def _product_fwd(x, w, specs, operand):
  x16, w16 = x.astype(operand), w.astype(operand)
  dtypes = (jnp.zeros((0,), x.dtype), jnp.zeros((0,), w.dtype))  # the primals' dtypes, as arrays
  return _product(x16, w16, specs, operand), (x16, w16, dtypes)


def _product_bwd(specs, operand, residuals, g):
  x16, w16, (x_dtype, w_dtype) = residuals
  xs, ws, out = specs
  g16 = g.astype(operand)
  dx = jnp.einsum(f"{out},{ws}->{xs}", g16, w16, preferred_element_type=jnp.float32)
  dw = jnp.einsum(f"{xs},{out}->{ws}", x16, g16, preferred_element_type=jnp.float32)
  return dx.astype(x_dtype.dtype), dw.astype(w_dtype.dtype)


_product.defvjp(_product_fwd, _product_bwd)


@functools.cache
def mixed_dot_general(operand) -> Callable[..., jax.Array]:
  """A ``lax.dot_general`` replacement (batch-free contractions: dense layers) with operands in
  ``operand`` and float32 results and gradients (module docstring). One function object per
  dtype, so modules holding it compare equal across instances (one compile per shape)."""
  operand = jnp.dtype(operand)

  def dot_general(x, w, dimension_numbers, precision=None, preferred_element_type=None,
                  **unused):
    del precision, preferred_element_type, unused  # always float32 results
    return _product(x, w, _einsum_specs(dimension_numbers, x.ndim, w.ndim), operand)

  return dot_general
