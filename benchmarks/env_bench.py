r"""Environment-LLM serving throughput: 8 concurrent client streams vs serial requests.

  python -m benchmarks.env_bench            # 32 new tokens, 16 serial + 48 concurrent requests
  python -m benchmarks.env_bench --quick    # 16 new tokens, 8 serial + 16 concurrent requests
  python -m benchmarks.env_bench --tree     # EAGLE's S states x K actions (benchmarks/tree_bench)

SmolLM2-135M-Instruct (the offline GGUF asset) runs in ``LocalSampler`` behind ``EnvServer`` on a
loopback port; ``OpenAIClient`` drives it.

* serial: one stream, each request sent after the previous answer (what a naive caller does);
* concurrent: ``--streams`` streams, each sending its next request as soon as its previous one is
  answered; the server batches whatever is queued into one decode call (up to ``--max_batch``).

Greedy decoding; prompts are distinct raw-text continuations so every request decodes its own row.
All decode shapes (batch buckets 1, 2, 4, 8) are compiled before timing. Printed: requests/s,
generated tokens/s and the concurrent/serial ratio (target >= 3x), plus the server's batch sizes
and, as a ceiling, the same batch decoded in-process without HTTP.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import Sequence

from absl import app, flags

from eagle_jax.env import local, openai, server
from eagle_jax.env.client import SamplingParams

_QUICK = flags.DEFINE_bool("quick", False, "Fewer requests and tokens.")
_STREAMS = flags.DEFINE_integer("streams", 8, "Concurrent client streams.")
_MAX_BATCH = flags.DEFINE_integer("max_batch", 8, "Server decode batch limit.")
_TREE = flags.DEFINE_bool("tree", False, "EAGLE's transition tree workload (tree_bench).")
_STATES = flags.DEFINE_integer("states", 4, "--tree: states.")
_K = flags.DEFINE_integer("k", 8, "--tree: actions per state.")
_ROUNDS = flags.DEFINE_integer("rounds", 2, "--tree: timed rounds (interleaved).")
_BATCH = flags.DEFINE_integer("batch", 16, "--tree: decode batch of the unshared and torch runs.")
_SLOTS = flags.DEFINE_integer("slots", 16, "--tree: continuous-batching rows.")
_CHUNK = flags.DEFINE_integer("chunk", 8, "--tree: decode steps between admissions.")
_PRECISION = flags.DEFINE_enum("precision", "float32", ["float32", "bfloat16", "mixed"],
                               "--tree: dtypes of our sampler (models/loading.py PRECISIONS).")
_REASONS = flags.DEFINE_integer("reasons", 0, "--tree: reasons to like and to dislike in each "
                                "state (0: plot-only states).")

_TOPICS = ["a heist in Venice", "two rival chefs", "a lighthouse keeper", "a time-travelling cat",
           "a chess prodigy", "a haunted library", "a desert rally", "a jazz band on tour",
           "a lost astronaut", "a village football team", "a detective in Lagos", "a dragon tamer"]


_MOODS = ["funny", "sad", "tense", "quiet", "strange", "tender", "dark", "joyful"]


def _prompts(n: int, offset: int) -> list[str]:
  """Distinct short prompts (96 combinations, all in the 16-token prompt bucket)."""
  out = []
  for i in range(offset, offset + n):
    mood, topic = _MOODS[(i // len(_TOPICS)) % len(_MOODS)], _TOPICS[i % len(_TOPICS)]
    out.append(f"A {mood} film about {topic}. The plot:")
  return out


async def _stream(client: openai.OpenAIClient, prompts: Sequence[str], max_tokens: int,
                  tokens: list[int]) -> None:
  for p in prompts:
    c = await client.generate([p], [SamplingParams(max_tokens=max_tokens)])
    tokens.append(c[0].completion_tokens or 0)


async def _run(backend: local.LocalSampler, n_serial: int, n_conc: int, max_tokens: int) -> dict:
  srv = server.EnvServer(backend, max_batch=_MAX_BATCH.value, max_queue=1024, batch_wait_ms=2.0)
  port = await srv.start("127.0.0.1", 0)
  url = f"http://127.0.0.1:{port}"
  out = {}
  try:
    async with openai.OpenAIClient(url, backend.model_id, max_concurrency=_STREAMS.value,
                                   timeout_s=600) as client:
      await _stream(client, _prompts(1, 95), max_tokens, [])  # connection warm-up
      srv.batch_sizes.clear()
      tokens: list[int] = []
      t = time.perf_counter()
      await _stream(client, _prompts(n_serial, 0), max_tokens, tokens)
      out["serial"] = (time.perf_counter() - t, n_serial, sum(tokens), list(srv.batch_sizes))

      srv.batch_sizes.clear()
      tokens = []
      prompts = _prompts(n_conc, 16)
      per = [prompts[s::_STREAMS.value] for s in range(_STREAMS.value)]
      t = time.perf_counter()
      await asyncio.gather(*(_stream(client, ps, max_tokens, tokens) for ps in per))
      out["concurrent"] = (time.perf_counter() - t, n_conc, sum(tokens), list(srv.batch_sizes))
  finally:
    await srv.stop()
  return out


def main(argv: Sequence[str]) -> None:
  del argv
  if _TREE.value:
    from benchmarks import tree_bench  # noqa: PLC0415

    tree_bench.run(_STATES.value, _K.value, _ROUNDS.value, _BATCH.value, _SLOTS.value,
                   _CHUNK.value, _REASONS.value, _PRECISION.value)
    return
  quick = _QUICK.value
  max_tokens = 16 if quick else 32
  n_serial, n_conc = (8, 16) if quick else (16, 48)
  t = time.perf_counter()
  buckets = tuple(b for b in (1, 2, 4, 8, 16) if b < _MAX_BATCH.value) + (_MAX_BATCH.value,)
  backend = local.LocalSampler.from_gguf(batch_buckets=buckets)
  print(f"loaded SmolLM2-135M-Instruct in {time.perf_counter() - t:.1f} s")
  lengths = {len(backend.encode(p, SamplingParams())) for p in _prompts(96, 0)}
  print(f"prompt lengths {min(lengths)}..{max(lengths)} tokens")
  if max(lengths) > backend.sampler.min_bucket:  # a second prompt bucket would compile mid-run
    raise ValueError(f"benchmark prompts longer than {backend.sampler.min_bucket} tokens")
  t = time.perf_counter()
  for b in buckets:  # same prompt family, so the same prompt bucket as the timed runs
    backend.generate_sync(_prompts(b, 88), [SamplingParams(max_tokens=max_tokens)] * b)
  print(f"compiled decode for batch buckets {buckets} in {time.perf_counter() - t:.1f} s")

  res = asyncio.run(_run(backend, n_serial, n_conc, max_tokens))

  # Ceiling: one in-process decode call of a full batch, no HTTP.
  prompts = _prompts(_MAX_BATCH.value, 80)
  params = [SamplingParams(max_tokens=max_tokens, seed=i) for i in range(len(prompts))]
  t = time.perf_counter()
  direct = backend.generate_sync(prompts, params)
  direct_s = time.perf_counter() - t
  direct_tok = sum(c.completion_tokens or 0 for c in direct)

  print(f"\nmax_tokens={max_tokens}, streams={_STREAMS.value}, max_batch={_MAX_BATCH.value}")
  print(f"{'mode':<34}{'requests':>9}{'seconds':>9}{'req/s':>8}{'tok/s':>8}  batch sizes")
  rates = {}
  for name in ("serial", "concurrent"):
    sec, n, tok, batches = res[name]
    rates[name] = (n / sec, tok / sec)
    label = "serial (1 stream)" if name == "serial" else f"concurrent ({_STREAMS.value} streams)"
    mean_b = statistics.mean(batches) if batches else 0
    print(f"{label:<34}{n:>9}{sec:>9.2f}{n / sec:>8.2f}{tok / sec:>8.1f}  mean {mean_b:.2f}, "
          f"max {max(batches) if batches else 0}")
  print(f"{'in-process batch (no HTTP)':<34}{len(prompts):>9}{direct_s:>9.2f}"
        f"{len(prompts) / direct_s:>8.2f}{direct_tok / direct_s:>8.1f}  {len(prompts)}")
  ratio_req = rates["concurrent"][0] / rates["serial"][0]
  ratio_tok = rates["concurrent"][1] / rates["serial"][1]
  print(f"\nthroughput ratio concurrent/serial: {ratio_req:.2f}x requests/s, {ratio_tok:.2f}x "
        f"tokens/s (target >= 3x)")


if __name__ == "__main__":
  app.run(main)
