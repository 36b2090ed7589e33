r"""Top-p's truncation of one decode step's logits: decided row by row against batch-wide.

  python -m benchmarks.top_p_bench                # 64 rows x SmolLM2's 49,152 logits
  python -m benchmarks.top_p_bench --rows=16

``logits.process_logits`` with top-p alone takes a row's threshold from the 256 largest logits
(``lax.top_k``) when they hold top_p of its mass, and only the rows they do not decide take the
4,096 head, then the full sort, one row at a time. The rule before it (``batch_wide`` here) took
the longer head, then the full sort, for the whole batch as soon as one row needed it. Logits:
``--rows`` rows of N(0, 1) x scale, where a scale of 8 gives a peaked row (the 256 head decides),
3 a row that needs the 4,096 head and 1 a flat one (the full sort); cases with 0, 1, 4 and every
row needing more than the 256 head, and a few flat rows. Best of 5 per case, the two rules
interleaved, and their kept tokens compared.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from benchmarks.tree_bench import _load
from eagle_jax.models import logits as logits_lib

_ROWS = flags.DEFINE_integer("rows", 64, "Rows per decode step (the quick start: up to 64).")
_VOCAB = flags.DEFINE_integer("vocab", 49152, "Vocabulary size (SmolLM2: 49,152).")
_TOP_P = flags.DEFINE_float("top_p", 0.9, "top_p (the profiles' sampling: 0.9).")


def batch_wide(logits: jax.Array, top_p: jax.Array) -> jax.Array:
  """The rule before: the shortest head that decides *every* row, for all rows."""
  heads = [h for h in logits_lib.SORT_HEADS if h < logits.shape[-1]]
  log_norm = jax.nn.logsumexp(logits, axis=-1, keepdims=True)

  def tier(i: int) -> jax.Array:
    if i == len(heads):
      thr = logits_lib._top_p_threshold(-jnp.sort(-logits, axis=-1), top_p, None)  # noqa: SLF001
      return jnp.where(logits < thr, logits_lib.NEG_INF, logits)
    top = jax.lax.top_k(logits, heads[i])[0]
    decided = jnp.all(jnp.exp(top - log_norm).sum(-1) >= top_p + 1e-4)
    thr = logits_lib._top_p_threshold(top, top_p, log_norm)  # noqa: SLF001
    return jax.lax.cond(decided, lambda: jnp.where(logits < thr, logits_lib.NEG_INF, logits),
                        lambda: tier(i + 1))

  return tier(0)


def _best(fn, *args) -> float:
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(5):
    t = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t)
  return min(times)


def main(argv: Sequence[str]) -> None:
  del argv
  b, v, top_p = _ROWS.value, _VOCAB.value, jnp.float32(_TOP_P.value)
  mode = logits_lib.Mode(greedy=False, top_k=False, top_p=True, penalty=False, ngram=0)
  knobs = logits_lib.Knobs(temperature=jnp.float32(1.0), top_k=jnp.int32(0), top_p=top_p,
                           penalty=jnp.float32(1.0), stop_ids=jnp.zeros((1,), jnp.int32),
                           max_new=jnp.int32(1))
  by_rows = jax.jit(lambda x: logits_lib.process_logits(x, mode, knobs, None, None))
  before = jax.jit(lambda x: batch_wide(x, top_p))
  print(f"top-p {_TOP_P.value} on [{b}, {v}] logits; load {_load()}")
  print(f"{'rows needing a longer head':<34}{'by rows ms':>11}{'batch-wide ms':>15}{'ratio':>8}"
        f"{'same tokens':>13}")
  rng = np.random.default_rng(0)
  cases = [("none", []), ("1 (the 4,096 head)", [3.0]), ("4 (the 4,096 head)", [3.0] * 4),
           ("1 flat (full sort)", [1.0]), ("4 flat", [1.0] * 4), ("all (the 4,096 head)", [3.0] * b)]
  for name, slow in cases:
    scales = np.full(b, 8.0)
    scales[:len(slow)] = slow
    x = jnp.asarray(rng.normal(size=(b, v)).astype(np.float32) * scales[:, None])
    t_rows, t_before = _best(by_rows, x), _best(before, x)
    same = bool(np.array_equal(np.asarray(by_rows(x)) > -1e29, np.asarray(before(x)) > -1e29))
    print(f"{name:<34}{t_rows * 1e3:>11.2f}{t_before * 1e3:>15.2f}{t_before / t_rows:>7.1f}x"
          f"{same!s:>13}", flush=True)
  print(f"load at end {_load()}")


if __name__ == "__main__":
  app.run(main)
