r"""Environment-data building throughput: merged decode batches vs one prompt per decode call.

  python -m benchmarks.env_build_bench            # 8 movies, plot + 2 reasons each, 32 tokens
  python -m benchmarks.env_build_bench --quick    # 4 movies, plot + 1 reason each, 16 tokens

``build.describe_movies`` sends every request as its own one-prompt ``sample`` call (so each prompt
has its own seed and cache entry). The reference is what those calls cost on the in-process
``LocalSampler`` as they are: one decode call per prompt. ``BatchingClient`` merges the calls
started in one event-loop tick into one ``generate``, which ``LocalSampler`` decodes in batches of
``--batch`` rows. Both runs produce the same answers (checked), sampling with temperature 0.7.
All decode shapes are compiled before timing. Printed: seconds, prompts/s and the ratio.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence

from absl import app, flags

from configs import env_blocks
from eagle_jax import data
from eagle_jax.data import catalog
from eagle_jax.env import build, local
from eagle_jax.env.batching import BatchingClient

_QUICK = flags.DEFINE_bool("quick", False, "Fewer movies, reasons and tokens.")
_BATCH = flags.DEFINE_integer("batch", 8, "Decode batch bucket of the merged run.")


class _Serial(BatchingClient):
  """The reference: passes each call straight through (one decode call per one-prompt call)."""

  async def generate(self, prompts, params, *, on_result=None):
    self.inner_calls += 1
    return await self.inner.generate(prompts, params, on_result=on_result)


async def _describe(client, movies, gen):
  return await build.describe_movies(client, movies, gen)


def main(argv: Sequence[str]) -> None:
  del argv
  quick = _QUICK.value
  n_movies, n_reasons, tokens = (4, 1, 16) if quick else (8, 2, 32)
  ratings = data.load_ml100k_assets()
  movies = catalog.movies_from_ratings(ratings, catalog.most_rated_items(ratings, n_movies))
  gen = env_blocks.descriptions_config(plot_tokens=tokens, reason_tokens=tokens,
                                       n_reasons=n_reasons, retries=0)
  sampler = local.LocalSampler.from_gguf(chat=True, batch_buckets=(1, _BATCH.value))
  # Compile every shape both runs use (a full run of each, untimed).
  warm = [m.__class__(m.movie_id + 10**6, m.item_index, m.title + " ", m.genres) for m in movies]
  asyncio.run(_describe(BatchingClient(sampler), warm, gen))
  asyncio.run(_describe(_Serial(sampler), warm, gen))

  results = {}
  for name, wrap in (("one prompt per decode", _Serial), ("merged batches", BatchingClient)):
    client = wrap(sampler)
    calls0 = sampler.decode_calls
    t0 = time.perf_counter()
    recs = asyncio.run(_describe(client, movies, gen))
    seconds = time.perf_counter() - t0
    prompts = sum(len(r["provenance"]["calls"]) for r in recs)
    results[name] = (seconds, prompts, sampler.decode_calls - calls0, recs)
    print(f"{name:>22}: {seconds:7.2f} s, {prompts} prompts, {prompts / seconds:6.2f} prompts/s, "
          f"{sampler.decode_calls - calls0} decode calls")
  strip = lambda rs: [[c["text"] for c in r["provenance"]["calls"]] for r in rs]
  same = strip(results["one prompt per decode"][3]) == strip(results["merged batches"][3])
  ratio = results["one prompt per decode"][0] / results["merged batches"][0]
  print(f"speed-up merged / one-per-decode: {ratio:.2f}x (same answers: {same})")


if __name__ == "__main__":
  app.run(main)
