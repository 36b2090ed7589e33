r"""Mixed-precision decoding with 16-bit stacked arrays against the float32 copies XLA:CPU made.

  python -m benchmarks.cache_bits_bench                        # 32 rows, 130-token prompts
  python -m benchmarks.cache_bits_bench --prompt=400 --shared=380 --share

XLA:CPU has no bfloat16 dynamic-slice or dynamic-update-slice: it converts the operand to float32
and back around them. In ``"mixed"`` precision (bf16 weights and matmul operands) the scanned
decoder slices a layer's weights out of the stacked bf16 arrays every step, and the KV cache, kept
in float32 before, was converted to bf16 layer by layer at every read. Now a decode-only cache is
stored as the bf16 bits (``kv_cache.decode_cache_dtype``: uint16) and the weights are sliced as bits
(``layer_scan.as_bits``); "before" runs the same sampler with both undone (the cache in the compute
dtype, the weights sliced as bf16), patched in for its calls only.

SmolLM2-135M (the offline GGUF asset) in mixed precision, blocks scanned, ``--rows`` rows of
``--prompt`` random tokens (the first ``--shared`` common to every row), the world's sampling
(temperature 0.7, repetition penalty 1.2, no repeated 3-grams), ``--new`` new tokens. Per round,
interleaved: a warm one-token call (the prefill) and a warm ``--new``-token call; step = their
difference over ``--new - 1``. Best of ``--rounds``; answers compared token for token.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Sequence

import jax.numpy as jnp
import numpy as np
from absl import app, flags

from benchmarks.tree_bench import _load, random_rows
from eagle_jax import assets
from eagle_jax.models import kv_cache, layer_scan, loading, sampling
from eagle_jax.models.sampling_params import SamplingParams

_ROUNDS = flags.DEFINE_integer("rounds", 3, "Timed rounds (interleaved).")
_ROWS = flags.DEFINE_integer("rows", 32, "Rows per call.")
_PROMPT = flags.DEFINE_integer("prompt", 130, "Prompt tokens per row.")
_SHARED = flags.DEFINE_integer("shared", 0, "Leading tokens common to every row.")
_SHARE = flags.DEFINE_bool("share", False, "Prefix-shared decoding (the world's setting).")
_NEW = flags.DEFINE_integer("new", 40, "New tokens.")


@contextlib.contextmanager
def _before():
  """The float32 decode cache and the bf16 weight slices of the code before this change."""
  saved = kv_cache.decode_cache_dtype, layer_scan.as_bits
  kv_cache.decode_cache_dtype = lambda config: jnp.dtype(config.dtype)
  layer_scan.as_bits = lambda x: x
  try:
    yield
  finally:
    kv_cache.decode_cache_dtype, layer_scan.as_bits = saved


def main(argv: Sequence[str]) -> None:
  del argv
  if not 0 <= _SHARED.value < _PROMPT.value or _NEW.value < 2 or _ROWS.value < 1:
    raise app.UsageError("expected 0 <= --shared < --prompt, --new >= 2, --rows >= 1")
  _, model = loading.load_llama_gguf(assets.smollm2_gguf(), **loading.precision_dtypes("mixed"))
  ids = random_rows(_ROWS.value, _PROMPT.value, _SHARED.value)
  params = {n: SamplingParams(max_tokens=n, temperature=0.7, repetition_penalty=1.2,
                              no_repeat_ngram=3, stop=[]) for n in (1, _NEW.value)}
  variants = {"16-bit arrays (ours)": contextlib.nullcontext, "float32 copies (before)": _before}
  samplers = {name: sampling.Sampler(model, share_prefix=_SHARE.value) for name in variants}
  print(f"SmolLM2-135M mixed, {_ROWS.value} rows x {_PROMPT.value} prompt tokens "
        f"({_SHARED.value} common, sharing {'on' if _SHARE.value else 'off'}), {_NEW.value} new "
        f"tokens; load {_load()}", flush=True)
  first, times, answers = {}, {v: {n: [] for n in params} for v in variants}, {}
  for name, patch in variants.items():
    with patch():
      t = time.perf_counter()
      answers[name] = samplers[name].generate_ids(ids, params[_NEW.value], seed=3)
      samplers[name].generate_ids(ids, params[1], seed=3)
      first[name] = time.perf_counter() - t
  for r in range(_ROUNDS.value):
    for name, patch in (list(variants.items())[::-1] if r % 2 else variants.items()):
      with patch():
        for n, p in params.items():
          t = time.perf_counter()
          samplers[name].generate_ids(ids, p, seed=3)
          times[name][n].append(time.perf_counter() - t)
    print(f"round {r + 1}/{_ROUNDS.value} done, load {_load()}", flush=True)
  print(f"\n{'':<26}{'first calls s':>14}{'prefill s':>10}{'step ms':>9}{'call s':>8}"
        f"{'call vs before':>16}")
  best = {v: {n: min(t) for n, t in d.items()} for v, d in times.items()}
  before = best["float32 copies (before)"][_NEW.value]
  for name in variants:
    b = best[name]
    step = (b[_NEW.value] - b[1]) / (_NEW.value - 1)
    print(f"{name:<26}{first[name]:>14.2f}{b[1]:>10.3f}{step * 1e3:>9.1f}{b[_NEW.value]:>8.3f}"
          f"{before / b[_NEW.value]:>15.2f}x")
  a, b = answers.values()
  print(f"\nanswers identical: {np.array_equal(a.tokens, b.tokens)}; log-probs max difference "
        f"{float(np.max(np.abs(a.logprobs - b.logprobs))):.2e}; load at end {_load()}")


if __name__ == "__main__":
  app.run(main)
