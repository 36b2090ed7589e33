r"""EAGLE's environment workload: S states x K actions of transitions, five ways, in one run.

  python -m benchmarks.env_bench --tree                 # 4 states x 8 actions, 40 new tokens
  python -m benchmarks.env_bench --tree --states=8 --k=8 --rounds=3
  python -m benchmarks.env_bench --tree --reasons=5    # the paper's states: plot + 5 + 5 reasons

The states are SmolLM2 plots of MovieLens-100K's most rated movies (written first, untimed, as
the world's anchor plots are) or, with ``--reasons=N``, their descriptions with N reasons to like
and N to dislike each (``env.states="description"``, written by ``env.build.describe_movies``
with ``movielens_smoke.paper_world``'s description settings), the actions the project's
template actions of each movie, the prompts ``prompts.transition_prompt`` in SmolLM2's chat
template, and the sampling the smoke config's ``env.sampling`` (greedy, repetition penalty 1.2,
no repeated 3-grams, 40 new tokens).
Timed, interleaved over ``--rounds`` (the order rotates each round), median seconds:

1. ``LocalSampler`` with prefix sharing and continuous batching (``--slots`` rows that read the
   prefixes of the requests admitted with them from a pool, once per prefix per step);
2. the same sampler with sharing alone, decode batches of ``--batch`` rows (the paper world's
   setting), whose decode steps read each shared prefix once for all its rows, and the same with
   the prefix copied into every row's cache (``Sampler.copy_prefix``: the previous decode);
3. the same sampler without either (today's path: decode batches of ``--batch`` rows);
4. transformers' PyTorch ``generate`` on the same weights (float32, 2 threads, batches of
   ``--batch`` left-padded prompts, greedy with the same penalty and n-gram ban);
5. llama.cpp's OpenAI-compatible server (``llama-cpp-python[server]``, when installed) serving the
   same GGUF, reached through ``OpenAIClient``; it has no n-gram ban and takes the penalty as
   ``repeat_penalty`` over its last 64 tokens, so its answers differ (tokens/s is printed too);
6. the ceiling: this machine's measured matmul rate over the FLOPs of the shared workload
   (2 x parameters per prefilled or generated token; attention not counted).

Our sampler runs in ``--precision`` (``models.loading.PRECISIONS``; float32 by default, "mixed" as
in the quick start: bf16 weights and matmul operands), the ceiling at the matmul rate of its
operand dtype; PyTorch stays float32.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import statistics
import subprocess
import sys
import time

import numpy as np
from flax import nnx

from configs import movielens_smoke
from eagle_jax import assets, prompts
from eagle_jax.data import catalog, movielens
from eagle_jax.env import action_templates, build, local, openai
from eagle_jax.env.client import SamplingParams
from eagle_jax.models import llama as llama_lib
from eagle_jax.models import loading, prefix
from eagle_jax.models.tokenizer import Tokenizer

SAMPLING = SamplingParams(max_tokens=40, temperature=0.0, repetition_penalty=1.2,
                          no_repeat_ngram=3, chat=True)


def workload(backend: local.LocalSampler, states: int, k: int, reasons: int = 0) -> list:
  """Transition prompts (chat messages), state-major: ``states * k``."""
  ratings = movielens.load_ml100k_assets()
  movies = catalog.movies_from_ratings(ratings, catalog.most_rated_items(ratings, states))
  if reasons:
    config = movielens_smoke.get_config()
    movielens_smoke.paper_world(config)  # sampled reasons: greedy ones would all be the same
    config.descriptions.n_reasons = reasons
    recs = asyncio.run(build.describe_movies(backend, movies, config.descriptions))
    print(f"reasons per state (to like + to dislike, after removing duplicates): "
          f"{[len(d['likes']) + len(d['dislikes']) for d in recs]}")
    texts = [d["text"] for d in recs]
  else:
    plots = backend.generate_sync([prompts.plot_prompt(m.title, m.genres, m.tags)
                                   for m in movies], [SAMPLING.replace(max_tokens=60)] * states)
    texts = [f"Plot: {p.text}" for p in plots]
  out = []
  for m, text in zip(movies, texts):
    actions = action_templates.template_actions(m.genres, m.tags)
    step = max(1, len(actions) // k)
    out += [prompts.transition_prompt(text, a.text) for a in actions[::step][:k]]
  return out


def random_rows(rows: int, prompt: int, shared: int, seed: int = 0) -> list[list[int]]:
  """``rows`` prompts of ``prompt`` random SmolLM2 token ids, the first ``shared`` common to all."""
  rng = np.random.default_rng(seed)
  head = rng.integers(100, 40000, shared).tolist()
  return [head + rng.integers(100, 40000, prompt - shared).tolist() for _ in range(rows)]


def _load() -> str:
  try:
    return f"{os.getloadavg()[0]:.2f}"
  except OSError:
    return "n/a"


def matmul_rate(dtype="float32") -> float:
  """Measured matmul FLOP/s of this machine under XLA (2048^3, operands in ``dtype``, a name or a
  dtype, float32 accumulation, best of 5)."""
  import jax
  import jax.numpy as jnp

  a = jnp.ones((2048, 2048), dtype)
  f = jax.jit(lambda x: jnp.matmul(x, x, preferred_element_type=jnp.float32))
  f(a).block_until_ready()
  best = min(_timed(lambda: f(a).block_until_ready()) for _ in range(5))
  return 2 * 2048**3 / best


def _timed(fn) -> float:
  t = time.perf_counter()
  fn()
  return time.perf_counter() - t


class Torch:
  """PyTorch ``generate`` over the same weights, batches of ``batch`` left-padded prompts."""

  def __init__(self, path, tok: Tokenizer, batch: int):
    import torch

    from benchmarks.models_bench import torch_llama

    torch.set_num_threads(2)
    config, hf = loading.gguf_to_hf(path)
    self.model, self.tok, self.batch = torch_llama(config, hf), tok, batch

  def run(self, ids: list[list[int]]) -> int:
    import torch

    tokens = 0
    for start in range(0, len(ids), self.batch):
      rows = ids[start:start + self.batch]
      width = max(map(len, rows))
      x = torch.tensor([[self.tok.pad_id] * (width - len(r)) + r for r in rows])
      mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
      with torch.no_grad():
        out = self.model.generate(
            x, attention_mask=mask, max_new_tokens=SAMPLING.max_tokens, do_sample=False,
            repetition_penalty=SAMPLING.repetition_penalty,
            no_repeat_ngram_size=SAMPLING.no_repeat_ngram, pad_token_id=self.tok.pad_id,
            eos_token_id=list(self.tok.stop_ids))
      new = out[:, width:]
      tokens += int(sum(((row != self.tok.pad_id).cumsum(0) > 0).sum() for row in new))
    return tokens


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


class LlamaCpp:
  """llama-cpp-python's server on a loopback port (2 threads), or None when not installed."""

  @classmethod
  def start(cls, path) -> LlamaCpp | None:
    try:
      import llama_cpp.server  # noqa: F401
    except ImportError:
      return None
    self = cls()
    self.port = _free_port()
    self.proc = subprocess.Popen(
        [sys.executable, "-m", "llama_cpp.server", "--model", str(path), "--n_threads", "2",
         "--n_threads_batch", "2", "--n_ctx", "4096", "--host", "127.0.0.1", "--port",
         str(self.port), "--model_alias", "smollm2"], stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL)
    for _ in range(600):
      try:
        socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
        return self
      except OSError:
        time.sleep(0.2)
    self.stop()
    raise RuntimeError("llama_cpp.server did not open its port in 120 s")

  def run(self, msgs) -> int:
    async def go():
      async with openai.OpenAIClient(f"http://127.0.0.1:{self.port}", "smollm2",
                                     max_concurrency=8, timeout_s=600) as client:
        out = await client.generate(msgs, [SAMPLING.replace(no_repeat_ngram=0)] * len(msgs))
      return sum(c.completion_tokens or 0 for c in out)
    return asyncio.run(go())

  def stop(self) -> None:
    self.proc.terminate()
    self.proc.wait()


def run(states: int, k: int, rounds: int, batch: int, slots: int, chunk: int,
        reasons: int = 0, precision: str = "float32") -> None:
  logging.getLogger("httpx").setLevel(logging.WARNING)
  path = assets.smollm2_gguf()
  plain = local.LocalSampler.from_gguf(path, batch_buckets=(batch,), chat=True,
                                       precision=precision)
  sampler = plain.sampler
  fast = local.LocalSampler(sampler, chat=True, share_prefix=True, continuous=True, slots=slots,
                            chunk=chunk)
  msgs = workload(plain, states, k, reasons)
  ids = [plain.encode(m, SAMPLING) for m in msgs]
  n = len(msgs)
  params = [SAMPLING.replace(seed=i) for i in range(n)]
  print(f"{states} states ({'plot' if not reasons else f'plot + {reasons} + {reasons} reasons'}) "
        f"x {k} actions = {n} transitions; prompts {min(map(len, ids))}.."
        f"{max(map(len, ids))} tokens; {SAMPLING.max_tokens} new tokens; our precision "
        f"{precision}; load {_load()}")

  def ours(backend):
    out = backend.generate_sync(msgs, params)
    return sum(c.completion_tokens for c in out), [c.text for c in out]

  shared = local.LocalSampler(sampler, batch_buckets=(batch,), chat=True, share_prefix=True)

  def prefix_copied():
    sampler.copy_prefix = True
    try:
      return ours(shared)
    finally:
      sampler.copy_prefix = False

  texts = {}
  runners = {
      "shared + continuous (ours)": lambda: ours(fast),
      f"unshared, batches of {batch} (today)": lambda: ours(plain),
      f"shared, batches of {batch}": lambda: ours(shared),
      f"shared, batches of {batch}, prefix copied": prefix_copied,
  }
  torch_gen = Torch(path, plain.tokenizer, batch)
  runners[f"PyTorch generate, batches of {batch}"] = lambda: (torch_gen.run(ids), None)
  server = LlamaCpp.start(path)
  if server is not None:
    runners["llama.cpp server (llama-cpp-python)"] = lambda: (server.run(msgs), None)
  else:
    print("llama.cpp server: not installed (pip install -e '.[llamacpp]', about 10 min)")
  try:
    for fn in runners.values():  # compile / warm up, untimed
      fn()
    times = {name: [] for name in runners}
    tokens = {}
    names = list(runners)
    for r in range(rounds):
      order = names[r % len(names):] + names[:r % len(names)]
      for name in order:
        t = time.perf_counter()
        tokens[name], out = runners[name]()
        times[name].append(time.perf_counter() - t)
        if out is not None:
          texts.setdefault(name, out)
      print(f"round {r + 1}/{rounds} done, load {_load()}", flush=True)
  finally:
    fast.batcher.close()
    if server is not None:
      server.stop()
  rate = matmul_rate(sampler.config.operand_dtype)
  plan = prefix.plan(ids, min_shared=sampler.min_shared, min_bucket=1, pad_id=sampler.pad_id,
                     bucket=lambda x, m: max(int(x), 1))
  prefilled = plan.cost if plan is not None else sum(map(len, ids))
  params_count = llama_lib.param_count(nnx.merge(sampler.graphdef, sampler.state))
  flops = 2 * params_count * (prefilled + tokens[names[0]])
  ceiling = n / (flops / rate)
  today = statistics.median(times[names[1]])
  print(f"\n{'':<40}{'seconds':>9}{'trans/s':>9}{'tok/s':>8}{'vs today':>10}")
  for name in names:
    sec = statistics.median(times[name])
    print(f"{name:<40}{sec:>9.2f}{n / sec:>9.2f}{tokens[name] / sec:>8.1f}{today / sec:>9.2f}x")
  print(f"{'ceiling (matmul rate x FLOPs)':<40}{flops / rate:>9.2f}{ceiling:>9.2f}{'':>8}"
        f"{today / (flops / rate):>9.2f}x")
  same = [sum(a == b for a, b in zip(texts[names[1]], texts[name])) for name in names[:4]
          if name != names[1]]
  print(f"\nmatmul rate {rate / 1e9:.0f} GFLOP/s; {params_count / 1e6:.1f}M parameters; "
        f"{prefilled} prefilled tokens shared ({sum(map(len, ids))} unshared)")
  print(f"answers identical to today's (the three shared runs): {same} of {n}; "
        f"{fast.batcher.stats()}; compiles {fast.batcher.compile_counts()}, "
        f"{sampler.compile_count()} unshared or shared decode programs; load at end {_load()}")
  fast.batcher.close()
