r"""E_D's fine-tuning step: MiniLM + a linear head, float32 against mixed precision, and PyTorch.

  python -m benchmarks.ed_bench                 # 32 rows at 32, 64 and 128 tokens
  python -m benchmarks.ed_bench --lengths=32 --rounds=3

One AdamW step on the mean squared error of a linear head over the mean-pooled, normalised MiniLM
embedding (``encoder.finetune_step`` on an ``encoder.TextRegressor``, as ``encoder.finetune``
trains E_D): eagle_jax in float32
and in mixed precision (``BertConfig.matmul_dtype=bfloat16``: every dense product and both of its
gradient products on bf16 operands summed in float32, ``models/mixed_matmul.py``), against
transformers' PyTorch ``BertModel`` with the same head and optimizer, in float32 and under
``torch.autocast("cpu", bfloat16)`` (PyTorch's own mixed precision), with its default intra-op
threads. Random token ids, every row full length. The four sides alternate within each round; best
of the rounds per side, after a warm-up step (JAX's compile) outside the timing. The first step's
loss of every side is printed as a check that they compute the same thing.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags
from flax import nnx

from benchmarks.tree_bench import _load
from eagle_jax import assets
from eagle_jax.embed import encoder
from eagle_jax.models import bert

_ROWS = flags.DEFINE_integer("rows", 32, "Rows per step (E_D's finetune.batch_size).")
_LENGTHS = flags.DEFINE_list("lengths", ["32", "64", "128"], "Tokens per row.")
_ROUNDS = flags.DEFINE_integer("rounds", 4, "Timed steps per side and length.")
_OUT = 4  # the latent space's width (the quick start's rank-4 WALS, augmented: 7; any small d)
_HEAD = np.random.default_rng(1).normal(size=(384, _OUT)).astype(np.float32)  # both sides' head


def _jax_step(matmul_dtype):
  model = encoder.TextRegressor(bert.load_bert(assets.minilm_dir(), matmul_dtype=matmul_dtype),
                                _HEAD, np.zeros(_OUT))
  opt = nnx.Optimizer(model, optax.adamw(3e-5, weight_decay=0.01), wrt=nnx.Param)
  return lambda ids, mask, y: float(encoder.finetune_step(model, opt, jnp.asarray(ids),
                                                          jnp.asarray(mask), jnp.asarray(y)))


def _torch_step(autocast: bool):
  import torch  # noqa: PLC0415 (bench extra only)
  import transformers  # noqa: PLC0415

  model = transformers.BertModel.from_pretrained(str(assets.minilm_dir()))
  model.train()
  head = torch.nn.Linear(384, _OUT)
  with torch.no_grad():
    head.weight.copy_(torch.tensor(_HEAD.T))
    head.bias.zero_()
  params = list(model.parameters()) + list(head.parameters())
  opt = torch.optim.AdamW(params, lr=3e-5, weight_decay=0.01)
  for m in model.modules():  # no dropout, as the JAX side
    if isinstance(m, torch.nn.Dropout):
      m.p = 0.0

  def step(ids, mask, y):
    ids, mask, y = torch.tensor(ids), torch.tensor(mask), torch.tensor(y)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
      h = model(input_ids=ids, attention_mask=mask).last_hidden_state
    h = h.float()
    m = mask.unsqueeze(-1).float()
    emb = torch.nn.functional.normalize((h * m).sum(1) / m.sum(1).clamp(min=1e-9), dim=1)
    loss = ((head(emb) - y) ** 2).sum(-1).mean()
    opt.zero_grad()
    loss.backward()
    opt.step()
    return loss.item()

  return step


def main(argv: Sequence[str]) -> None:
  del argv
  sides = {"jax float32": _jax_step(None), "jax mixed": _jax_step(jnp.bfloat16),
           "torch float32": _torch_step(False), "torch autocast bf16": _torch_step(True)}
  rng = np.random.default_rng(0)
  print(f"E_D fine-tuning step, MiniLM + linear head, {_ROWS.value} rows; load {_load()}")
  print(f"{'tokens':>7}" + "".join(f"{name:>21}" for name in sides) + f"{'mixed vs f32':>14}"
        f"{'mixed vs torch f32':>20}{'mixed vs autocast':>19}")
  for t in map(int, _LENGTHS.value):
    ids = rng.integers(1000, 20000, (_ROWS.value, t)).astype(np.int32)
    mask = np.ones_like(ids)
    y = rng.normal(size=(_ROWS.value, _OUT)).astype(np.float32)
    first = {name: step(ids, mask, y) for name, step in sides.items()}  # warm-up (compiles)
    times = {name: [] for name in sides}
    for _ in range(_ROUNDS.value):
      for name, step in sides.items():
        t0 = time.perf_counter()
        step(ids, mask, y)
        times[name].append(time.perf_counter() - t0)
    best = {name: min(v) for name, v in times.items()}
    print(f"{t:>7}" + "".join(f"{best[n] * 1e3:>18.0f} ms" for n in sides)
          + f"{best['jax float32'] / best['jax mixed']:>13.2f}x"
          f"{best['torch float32'] / best['jax mixed']:>19.2f}x"
          f"{best['torch autocast bf16'] / best['jax mixed']:>18.2f}x", flush=True)
    print(f"{'':>7}first losses: " + ", ".join(f"{n} {v:.4f}" for n, v in first.items()))
  print(f"load at end {_load()}")


if __name__ == "__main__":
  app.run(main)
