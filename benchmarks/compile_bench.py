r"""Compile time against run time of the environment LLM's decode programs: blocks unrolled or scanned.

  python -m benchmarks.compile_bench              # 16 rows, 128-token prompts, 40 new tokens
  python -m benchmarks.compile_bench --rounds=3 --prompt=512

Every prompt-length bucket and prefix-sharing plan of ``Sampler.generate_ids`` is a program of its
own, compiled on first use; a short job (the quick start writes its world with about a dozen) pays
those compiles as much as it pays decoding. SmolLM2-135M (the offline GGUF asset), 16 rows of
``--prompt`` random tokens whose first ``--shared`` tokens are common (a state's transition
prompts), repetition penalty and no-repeat 3-grams as in the world's sampling, greedy. Four
samplers: blocks unrolled (``scan_layers=False``) or as one ``lax.scan`` (``Llama.scan_layers``),
each with and without prefix sharing. Per round, each builds a fresh sampler (a fresh compile)
and times, interleaved in a rotating order:

* compile: the first call's seconds minus the same call's warm seconds (40 new tokens, and the
  one-token program that isolates the prefill);
* prefill: a warm one-token call; step: (warm 40-token call - prefill) / 40.

Medians over rounds; the answers of all four are compared token for token. Then two kernels of a
decode step, each beside its alternative: the step's weight matmuls in float32 and bfloat16;
top-k/top-p's full sort of the logits beside ``lax.top_k`` of each head ``logits.SORT_HEADS`` tries;
the token draw of ``logits.draw`` (inverse transform, one uniform per row) beside
``jax.random.categorical`` (Gumbel-max, one random number per vocabulary entry); and the step's
attention over every layer's cache of ``--cache_slots`` slots as ``attention.attend`` computes it
(cache stored heads before slots, queries grouped by head) beside the same attention over a cache
stored slots before heads with the time axis first, which XLA transposes every step.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence

import numpy as np
from absl import app, flags

from benchmarks.tree_bench import (
  _load,  # the load average as the tree benchmark prints it
  random_rows,
)
from eagle_jax import assets
from eagle_jax.models import loading, sampling
from eagle_jax.models import logits as logits_lib
from eagle_jax.models.sampling_params import SamplingParams

_ROUNDS = flags.DEFINE_integer("rounds", 2, "Rounds (each compiles every variant afresh).")
_ROWS = flags.DEFINE_integer("rows", 16, "Rows per call (the world's decode batch).")
_PROMPT = flags.DEFINE_integer("prompt", 128, "Prompt tokens per row.")
_SHARED = flags.DEFINE_integer("shared", 100, "Leading tokens common to every row.")
_NEW = flags.DEFINE_integer("new", 40, "New tokens (the world's transitions: 40).")
_SLOTS = flags.DEFINE_list("cache_slots", ["168", "672"],
                           "Cache widths of the attention kernel line (slots per row).")


def _timed(fn) -> tuple[float, object]:
  t = time.perf_counter()
  out = fn()
  return time.perf_counter() - t, out


def main(argv: Sequence[str]) -> None:
  del argv
  _, model = loading.load_llama_gguf(assets.smollm2_gguf())
  ids = random_rows(_ROWS.value, _PROMPT.value, _SHARED.value)
  params = {n: SamplingParams(max_tokens=n, temperature=0.0, repetition_penalty=1.2,
                              no_repeat_ngram=3, stop=[]) for n in (1, _NEW.value)}
  variants = [(scan, share) for scan in (False, True) for share in (False, True)]
  names = {v: f"{'scanned' if v[0] else 'unrolled'}, {'shared' if v[1] else 'unshared'}"
           for v in variants}
  stats = {v: {"compile": [], "prefill": [], "step": []} for v in variants}
  answers = {}
  print(f"SmolLM2-135M, {_ROWS.value} rows x {_PROMPT.value} prompt tokens ({_SHARED.value} "
        f"common), {_NEW.value} new tokens; load {_load()}", flush=True)
  for r in range(_ROUNDS.value):
    order = variants[r % len(variants):] + variants[:r % len(variants)]
    for v in order:
      s = sampling.Sampler(model, share_prefix=v[1], scan_layers=v[0])
      first = {n: _timed(lambda n=n, s=s: s.generate_ids(ids, params[n]))[0] for n in params}
      warm = {}
      for n in params:
        warm[n], out = _timed(lambda n=n, s=s: s.generate_ids(ids, params[n]))
      answers[v] = np.asarray(out.tokens)
      stats[v]["compile"].append(sum(first[n] - warm[n] for n in params))
      stats[v]["prefill"].append(warm[1])
      stats[v]["step"].append((warm[_NEW.value] - warm[1]) / (_NEW.value - 1))
    print(f"round {r + 1}/{_ROUNDS.value} done, load {_load()}", flush=True)
  med = {v: {k: statistics.median(x) for k, x in d.items()} for v, d in stats.items()}
  print(f"\n{'':<22}{'compile s':>10}{'prefill s':>10}{'step ms':>9}{'compile vs unrolled':>21}"
        f"{'call vs unrolled':>18}")
  for v in variants:
    m, base = med[v], med[(False, v[1])]
    call, base_call = (m["prefill"] + (_NEW.value - 1) * m["step"],
                       base["prefill"] + (_NEW.value - 1) * base["step"])
    print(f"{names[v]:<22}{m['compile']:>10.2f}{m['prefill']:>10.2f}{m['step'] * 1e3:>9.1f}"
          f"{base['compile'] / m['compile']:>20.2f}x{base_call / call:>17.2f}x")
  same = {names[v]: bool(np.array_equal(answers[v], answers[variants[0]])) for v in variants}
  print(f"\nanswers equal to unrolled, unshared: {same}; load {_load()}")
  _kernels(model)
  print(f"load at end {_load()}")


def _best(fn, *args) -> float:
  fn(*args).block_until_ready()
  return min(_timed(lambda: fn(*args).block_until_ready())[0] for _ in range(5))


def _kernels(model) -> None:
  """Four costs behind a decode step, each against its alternative, best of 5: the step's weight
  matmuls (every block's projections and the output projection, one row block of ``--rows``) in
  float32 and in bfloat16; top-k/top-p's sort of the logits against ``lax.top_k`` of its heads; the
  token draw, inverse transform against Gumbel-max; one query per row attending over every
  layer's cache (layers scanned), in both cache layouts."""
  import jax  # noqa: PLC0415
  import jax.numpy as jnp  # noqa: PLC0415
  from flax import nnx  # noqa: PLC0415

  weights = [x for x in jax.tree.leaves(nnx.state(model)) if x.ndim >= 2]
  x = jax.random.normal(jax.random.key(1), (_ROWS.value, model.config.hidden))

  def chain(x, ws):  # each weight as a [in, out] matrix applied to a [rows, in] block
    out = 0.0
    for w in ws:
      w2 = w.reshape(w.shape[0], -1) if w.shape[0] == x.shape[1] else w.reshape(-1, x.shape[1]).T
      out = out + jnp.max(x.astype(w2.dtype) @ w2).astype(jnp.float32)
    return out

  f = jax.jit(chain)
  f32 = _best(f, x, weights)
  bf16 = _best(f, x, [w.astype(jnp.bfloat16) for w in weights])
  gb = sum(w.size for w in weights) * 4 / 1e9
  print(f"\nweight matmuls of one step, {_ROWS.value} rows: float32 {f32 * 1e3:.1f} ms "
        f"({gb:.2f} GB read, {gb / f32:.1f} GB/s), bfloat16 {bf16 * 1e3:.1f} ms "
        f"({bf16 / f32:.2f}x float32's time)")
  logits = jax.random.normal(jax.random.key(0), (_ROWS.value, model.config.vocab_size))
  sort = _best(jax.jit(lambda v: jnp.sort(v, axis=-1)), logits)
  heads = []
  for h in logits_lib.SORT_HEADS:
    t = _best(jax.jit(lambda v, h=h: jax.lax.top_k(v, h)[0]), logits)
    heads.append(f"lax.top_k {h} {t * 1e3:.1f} ms ({sort / t:.0f}x)")
  print(f"logits [{_ROWS.value}, {model.config.vocab_size}]: full sort {sort * 1e3:.1f} ms, "
        f"{', '.join(heads)}")
  keys = jax.random.split(jax.random.key(5), _ROWS.value)
  steps = jnp.zeros((_ROWS.value,), jnp.int32)
  gumbel = _best(jax.jit(lambda s: jax.vmap(jax.random.categorical)(keys, s)), logits)
  inverse = _best(jax.jit(lambda s: logits_lib.draw(s, keys, steps)), logits)
  print(f"a token per row from those logits: jax.random.categorical {gumbel * 1e3:.2f} ms, "
        f"logits.draw {inverse * 1e3:.2f} ms ({gumbel / inverse:.1f}x)")
  for slots in map(int, _SLOTS.value):
    heads_first, slots_first = _attention_layouts(model.config, _ROWS.value, slots)
    print(f"attention of one step over {model.config.layers} layers x {_ROWS.value} rows x "
          f"{slots} slots: attention.attend {heads_first * 1e3:.1f} ms, slots before heads "
          f"{slots_first * 1e3:.1f} ms ({slots_first / heads_first:.2f}x)")


def _attention_layouts(config, rows: int, slots: int) -> tuple[float, float]:
  """Seconds of ``attention.attend`` for one query per row over a cache ``[L, rows, KVH, slots,
  hd]`` (the cache's layout), and of the same attention written for ``[L, rows, slots, KVH, hd]``."""
  import jax  # noqa: PLC0415
  import jax.numpy as jnp  # noqa: PLC0415

  from eagle_jax.models import attention  # noqa: PLC0415

  keys = jax.random.split(jax.random.key(2), 3)
  shape = (config.layers, rows, config.kv_heads, slots, config.head_dim)
  k, v = (jax.random.normal(key, shape) for key in keys[:2])
  q = jax.random.normal(keys[2], (rows, 1, config.heads, config.head_dim))
  mask = jnp.ones((rows, slots), bool)
  last = jnp.array([slots - 1], jnp.int32)
  g = config.heads // config.kv_heads

  def slots_first_attend(x, kk, vv):  # the einsums of attention.attend over [B, S, KVH, hd]
    qg = x.reshape(rows, 1, config.kv_heads, g, config.head_dim)
    scores = jnp.einsum("btkgd,bskd->bkgts", qg, kk) * config.head_dim**-0.5
    probs = jax.nn.softmax(scores, axis=-1)
    return jnp.einsum("bkgts,bskd->btkgd", probs, vv).reshape(x.shape)

  def layers(attend):
    def run(x, k, v):
      body = lambda x, kv: (x + attend(x, *kv), None)
      return jax.lax.scan(body, x, (k, v))[0]
    return jax.jit(run)

  heads_first = _best(layers(lambda x, kk, vv: attention.attend(
      x, kk, vv, mask, last, config.head_dim**-0.5)), q, k, v)
  to_slots_first = lambda a: jnp.swapaxes(a, 2, 3)
  slots_first = _best(layers(slots_first_attend), q, to_slots_first(k), to_slots_first(v))
  return heads_first, slots_first


if __name__ == "__main__":
  app.run(main)
