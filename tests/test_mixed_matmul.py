"""Mixed-precision dense products (``models/mixed_matmul.py``) and MiniLM fine-tuned with them.

References: numpy in float64 on operands rounded to bf16 with ``ml_dtypes`` (the products and both
gradients), and PyTorch transformers' ``BertModel`` with every ``nn.Linear`` replaced by a torch
autograd function that rounds its input, weight and incoming gradient to bf16 and computes in
float64 (the recipe the module documents, written independently).
"""

import re

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import optax
import pytest
import torch
import transformers
from flax import nnx

from eagle_jax.embed import encoder
from eagle_jax.models import bert
from eagle_jax.models.mixed_matmul import mixed_dot_general

SMALL = dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
             intermediate_size=37, max_position_embeddings=40, type_vocab_size=2)


def _bf16(a):
  return np.asarray(a, np.float32).astype(ml_dtypes.bfloat16).astype(np.float64)


@pytest.mark.parametrize("x_shape, w_shape, dims, spec", [
    ((3, 5, 8), (8, 7), (((2,), (0,)), ((), ())), "btd,dm->btm"),                 # dense
    ((3, 5, 8), (8, 2, 4), (((2,), (0,)), ((), ())), "btd,dhk->bthk"),            # to heads
    ((3, 5, 2, 4), (2, 4, 8), (((2, 3), (0, 1)), ((), ())), "bthk,hkd->btd"),     # from heads
])
def test_products_and_gradients_equal_float64_on_bf16_operands(x_shape, w_shape, dims, spec):
  rng = np.random.default_rng(0)
  x = rng.normal(size=x_shape).astype(np.float32)
  w = rng.normal(size=w_shape).astype(np.float32)
  f = mixed_dot_general(jnp.bfloat16)
  y, pull = jax.vjp(lambda a, b: f(a, b, dims), x, w)
  ins, out = spec.split("->")
  xs, ws = ins.split(",")
  assert y.dtype == jnp.float32
  np.testing.assert_allclose(y, np.einsum(spec, _bf16(x), _bf16(w)), rtol=0, atol=1e-5)
  g = rng.normal(size=y.shape).astype(np.float32)
  dx, dw = pull(g)
  assert dx.dtype == dw.dtype == jnp.float32
  np.testing.assert_allclose(dx, np.einsum(f"{out},{ws}->{xs}", _bf16(g), _bf16(w)), atol=1e-5,
                             rtol=0)
  np.testing.assert_allclose(dw, np.einsum(f"{xs},{out}->{ws}", _bf16(x), _bf16(g)), atol=1e-5,
                             rtol=0)
  # The float32 products differ by bf16's rounding: the check above could fail.
  assert np.abs(np.asarray(y) - np.einsum(spec, x, w)).max() > 1e-3
  assert mixed_dot_general(jnp.bfloat16) is f  # one object per dtype: equal module graphs


class _Bf16Linear(torch.autograd.Function):
  """y = x Wᵀ + b with x, W and the incoming gradient rounded to bf16, in float64."""

  @staticmethod
  def forward(ctx, x, weight, bias):
    xr, wr = x.to(torch.bfloat16).double(), weight.to(torch.bfloat16).double()
    ctx.save_for_backward(xr, wr)
    return (xr @ wr.T).float() + bias

  @staticmethod
  def backward(ctx, g):
    xr, wr = ctx.saved_tensors
    gr = g.to(torch.bfloat16).double()
    dx = (gr @ wr).float()
    dw = (gr.reshape(-1, gr.shape[-1]).T @ xr.reshape(-1, xr.shape[-1])).float()
    return dx, dw, g.reshape(-1, g.shape[-1]).sum(0)


def _torch_loss(model, ids, mask, target, bf16_linears: bool):
  original = torch.nn.functional.linear
  if bf16_linears:
    torch.nn.functional.linear = lambda x, w, b=None: _Bf16Linear.apply(x, w, b)
  try:
    h = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).last_hidden_state
  finally:
    torch.nn.functional.linear = original
  m = torch.tensor(mask).unsqueeze(-1).float()
  pooled = (h * m).sum(1) / m.sum(1).clamp(min=1e-9)
  emb = torch.nn.functional.normalize(pooled, p=2, dim=1)
  return ((emb - torch.tensor(target)) ** 2).sum(-1).mean()


@pytest.fixture(scope="module")
def small(tmp_path_factory):
  torch.manual_seed(0)
  model = transformers.BertModel(transformers.BertConfig(**SMALL, attn_implementation="eager")).eval()
  path = tmp_path_factory.mktemp("small_bert_mixed")
  model.save_pretrained(str(path), safe_serialization=True)
  rng = np.random.default_rng(1)
  ids = rng.integers(0, SMALL["vocab_size"], (4, 11))
  mask = np.ones((4, 11), np.int64)
  mask[1, 7:] = 0
  target = rng.normal(size=(4, SMALL["hidden_size"])).astype(np.float32) * 0.2
  return path, model, ids, mask, target


def _jax_loss_and_grads(path, ids, mask, target, matmul_dtype):
  model = bert.load_bert(path, matmul_dtype=matmul_dtype)

  def loss_fn(m):
    emb = m.embed(jnp.asarray(ids), jnp.asarray(mask))
    return jnp.mean(jnp.sum((emb - target) ** 2, axis=-1))

  loss, grads = nnx.value_and_grad(loss_fn)(model)
  return float(loss), grads


def test_mixed_bert_gradients_equal_torch_with_bf16_linears(small):
  path, torch_model, ids, mask, target = small
  loss, grads = _jax_loss_and_grads(path, ids, mask, target, jnp.bfloat16)
  plain_loss, plain_grads = _jax_loss_and_grads(path, ids, mask, target, None)
  torch_model.zero_grad()
  ref = _torch_loss(torch_model, ids, mask, target, bf16_linears=True)
  ref.backward()
  assert loss == pytest.approx(ref.item(), rel=1e-5)
  for layer in range(SMALL["num_hidden_layers"]):
    t = torch_model.encoder.layer[layer]
    j, p = grads.layers[layer], plain_grads.layers[layer]
    pairs = [  # (ours, float32 ours, torch [out, in] grad reshaped to ours)
        (j.intermediate.kernel, p.intermediate.kernel, t.intermediate.dense.weight.grad.T),
        (j.output.kernel, p.output.kernel, t.output.dense.weight.grad.T),
        (j.query.kernel, p.query.kernel, t.attention.self.query.weight.grad.T),
        (j.attention_output.kernel, p.attention_output.kernel,
         t.attention.output.dense.weight.grad.T),
    ]
    for ours, plain, theirs in pairs:
      theirs = theirs.numpy().reshape(ours.shape)
      scale = np.abs(theirs).max()
      assert np.abs(np.asarray(ours[...]) - theirs).max() < 1e-3 * scale
      # float32 products are measurably further from this reference than the bf16 recipe
      assert np.abs(np.asarray(plain[...]) - theirs).max() > 3 * np.abs(
          np.asarray(ours[...]) - theirs).max()
  word = torch_model.embeddings.word_embeddings.weight.grad.numpy()
  ours = np.asarray(grads.embeddings.word_embeddings.embedding[...])
  assert np.abs(ours - word).max() < 1e-3 * np.abs(word).max()


def test_fine_tuning_step_runs_every_dense_product_on_bf16_operands(small):
  path, *_ = small
  model = encoder.TextRegressor(bert.load_bert(path, matmul_dtype=jnp.bfloat16),
                                np.zeros((SMALL["hidden_size"], 3)), np.zeros(3))
  opt = nnx.Optimizer(model, optax.adamw(1e-3), wrt=nnx.Param)
  ids = jnp.ones((2, 8), jnp.int32)
  text = encoder.finetune_step.lower(model, opt, ids, ids, jnp.zeros((2, 3))).as_text()
  dots = re.findall(r"stablehlo\.dot_general %\S+, %\S+.*?: \((tensor<[^>]*>), (tensor<[^>]*>)\)",
                    text)
  bf16 = [d for d in dots if "bf16" in d[0] and "bf16" in d[1]]
  # 6 dense layers per block, each with its product and both gradient products
  assert len(bf16) == 3 * 6 * SMALL["num_hidden_layers"], (len(bf16), len(dots))
  # the rest: attention's two products and their gradients, and the linear head's three
  assert len(dots) - len(bf16) == 6 * SMALL["num_hidden_layers"] + 3
