r"""The quick start's environment-LLM work against this machine's floor for it.

  python -m benchmarks.world_floor --workdir=runs/quickstart     # after launch.main
  python -m benchmarks.world_floor --workdir=runs/quickstart --scan_layers=false

Reads every request a finished run sent to the environment LLM (``<workdir>/env/cache.jsonl``:
prompt, sampling parameters with their seeds), groups them by the world's stages (plots, reasons,
profile sections, action sets, transitions; recognised by each prompt builder's question in
``eagle_jax/prompts.py``) and decodes each stage again, without its cached answers, in one call of
a fresh ``LocalSampler`` set as the quick start's ``config.llm`` (decode batches of 16, 32 or 64,
prefix sharing on, "mixed" precision; flags change them), timing it, compiles included, as the
run pays them. Beside each stage, the floor on these cores: FLOPs / the measured matmul rate in
the precision's matmul operand dtype, with FLOPs = 2 x (non-embedding parameters) per distinct
prompt-prefix token (the size of the stage's prompt trie: perfect sharing, every prefix once) and
per generated token, plus 2 x (embedding parameters) per generated token and per prompt (the
output projection). Attention, sampling and compiles are left out: no implementation of this
workload on these cores can beat the floor, which is what the quick start's 3-minute budget is
measured against. Printed: per stage, requests, tokens, seconds, floor and their ratio.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence

from absl import app, flags
from flax import nnx

from eagle_jax import assets, prompts
from eagle_jax.env import local
from eagle_jax.models import llama as llama_lib
from eagle_jax.models.sampling_params import SamplingParams

_WORKDIR = flags.DEFINE_string("workdir", "runs/quickstart", "A finished launch.main workdir.")
_SCAN = flags.DEFINE_bool("scan_layers", True, "Decoder blocks as one lax.scan (llm.scan_layers).")
_SHARE = flags.DEFINE_bool("share_prefix", True, "Prefix sharing (llm.share_prefix).")
_BUCKETS = flags.DEFINE_list("batch_buckets", ["16", "32", "64"],
                             "Decode batch sizes (llm.batch_buckets).")
_PRECISION = flags.DEFINE_enum("precision", "mixed", ["float32", "bfloat16", "mixed"],
                               "Dtypes of the model (llm.precision).")
_STAGES = flags.DEFINE_list("stages", [], "Stages to decode (default: all), e.g. transitions.")


def _ask(messages) -> str:
  """The first word of a prompt's question (its last paragraph): what kind of request it is."""
  return messages[-1]["content"].rsplit("\n\n", 1)[-1].split()[0]


STAGES = {  # first word of the question -> stage, in the order the world asks them
    _ask(prompts.plot_prompt("t", ["g"])): "plots",
    _ask(prompts.reason_prompt("t", "p", like=True)): "reasons",
    _ask(prompts.profile_prompt(["a"], ["b"])): "profile sections",
    _ask(prompts.action_prompt("d", prompts.ACTION_CATEGORIES[0])): "action sets",
    _ask(prompts.transition_prompt("d", "a")): "transitions",
}


def _trie_size(seqs: Sequence[Sequence[int]]) -> int:
  """Distinct prefixes of ``seqs``: the tokens a perfectly shared prefill computes."""
  root: dict = {}
  n = 0
  for s in seqs:
    node = root
    for t in s:
      if t not in node:
        node[t] = {}
        n += 1
      node = node[t]
  return n


def main(argv: Sequence[str]) -> None:
  del argv
  from benchmarks.tree_bench import _load, matmul_rate  # noqa: PLC0415

  path = os.path.join(_WORKDIR.value, "env", "cache.jsonl")
  if not os.path.isfile(path):
    raise app.UsageError(f"--workdir: no {path}; run python -m launch.main first")
  unknown = set(_STAGES.value) - set(STAGES.values())
  if unknown:
    raise app.UsageError(f"--stages: unknown {sorted(unknown)}, expected some of "
                         f"{list(STAGES.values())}")
  stages: dict[str, list] = {name: [] for name in STAGES.values()
                             if not _STAGES.value or name in _STAGES.value}
  with open(path, encoding="utf-8") as f:
    for line in f:
      rec = json.loads(line)
      if not isinstance(rec.get("prompt"), list):
        continue
      stage = STAGES.get(_ask(rec["prompt"]))
      if stage in stages:
        stages[stage].append((rec["prompt"], SamplingParams(**rec["params"])))
  backend = local.LocalSampler.from_gguf(assets.smollm2_gguf(), scan_layers=_SCAN.value,
                                         batch_buckets=tuple(map(int, _BUCKETS.value)), chat=True,
                                         share_prefix=_SHARE.value, precision=_PRECISION.value)
  model = backend.sampler
  params = llama_lib.param_count(nnx.merge(model.graphdef, model.state))
  embed = model.config.vocab_size * model.config.hidden
  rate = matmul_rate(model.config.operand_dtype)
  print(f"{_WORKDIR.value}: scan_layers={_SCAN.value}, share_prefix={_SHARE.value}, batch_buckets="
        f"{backend.batch_buckets}, precision={_PRECISION.value}; matmul rate "
        f"{rate / 1e9:.0f} GFLOP/s; load {_load()}; XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}",
        flush=True)
  print(f"\n{'stage':<18}{'requests':>9}{'prompt tok':>11}{'distinct':>9}{'generated':>10}"
        f"{'compiles':>9}{'seconds':>9}{'floor s':>9}{'x floor':>8}")
  total = floor_total = 0.0
  for name, reqs in stages.items():
    if not reqs:
      continue
    ids = [backend.encode(p, q) for p, q in reqs]
    compiled = model.compile_count()
    t = time.perf_counter()
    out = backend.generate_sync([p for p, _ in reqs], [q for _, q in reqs])
    sec = time.perf_counter() - t
    gen = sum(c.completion_tokens or 0 for c in out)
    distinct = _trie_size(ids)
    flops = 2 * (params - embed) * (distinct + gen) + 2 * embed * (gen + len(reqs))
    floor = flops / rate
    total, floor_total = total + sec, floor_total + floor
    print(f"{name:<18}{len(reqs):>9}{sum(map(len, ids)):>11}{distinct:>9}{gen:>10}"
          f"{model.compile_count() - compiled:>9}{sec:>9.1f}{floor:>9.1f}{sec / floor:>7.1f}x",
          flush=True)
  print(f"{'all':<18}{'':>56}{total:>9.1f}{floor_total:>9.1f}{total / floor_total:>7.1f}x")
  print(f"\nload at end {_load()}")


if __name__ == "__main__":
  app.run(main)
