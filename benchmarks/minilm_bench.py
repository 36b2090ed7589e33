r"""MiniLM sentence encoding speed: eagle_jax's SentenceEncoder vs PyTorch transformers' BertModel.

  python -m benchmarks.minilm_bench            # 512 sentences per batch size
  python -m benchmarks.minilm_bench --quick    # 128 sentences per batch size

Both sides embed the same synthetic movie-plot sentences (30-70 words, about 40-90 word pieces) with
the same all-MiniLM-L6-v2 weights and the same sentence-transformers pipeline, timed end to end:
tokenise (fast tokenizer, truncation at 256), sort by length, batch, forward, masked mean pool, L2
normalise, back in input order. PyTorch pads each batch to its longest sentence (as
sentence-transformers does) and runs under ``torch.inference_mode`` with its default intra-op
threads; JAX pads to length buckets (fixed compiled shapes). Compilation and the first PyTorch call
are warmed up outside the timing; the sides alternate and each reports its best run, in wall time
and in process CPU time (the latter is robust to other jobs on a shared machine). The largest
difference between the two sides' embeddings is printed as a check that they compute the same thing.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import numpy as np
from absl import app, flags

from eagle_jax import assets
from eagle_jax.models import text_encoder

_QUICK = flags.DEFINE_bool("quick", False, "128 sentences per batch size instead of 512.")

_SUBJECTS = ("a retired detective", "two estranged sisters", "a young pilot", "an android",
             "the crew of a cargo ship", "a small-town baker", "a disgraced scientist",
             "a teenage hacker", "an aging rock star", "a family of farmers")
_EVENTS = ("uncovers a conspiracy", "must survive a storm", "falls in love", "plans a heist",
           "is hunted by an assassin", "travels back in time", "inherits a haunted house",
           "joins a rebellion", "searches for a lost child", "enters a cooking contest")
_WORDS = ("while", "the", "city", "slowly", "turns", "against", "them", "and", "old", "secrets",
          "surface", "across", "frozen", "mountains", "during", "a", "war", "between", "rival",
          "kingdoms", "where", "nobody", "can", "be", "trusted", "until", "final", "night", "of",
          "festival", "brings", "everyone", "together", "with", "unexpected", "consequences")


def make_sentences(n: int, seed: int = 0) -> list[str]:
  """Deterministic plot-like sentences of 30-70 words."""
  rng = np.random.default_rng(seed)
  out = []
  for _ in range(n):
    tail = " ".join(rng.choice(_WORDS, int(rng.integers(25, 65))))
    out.append(f"{rng.choice(_SUBJECTS).capitalize()} {rng.choice(_EVENTS)} {tail}.")
  return out


class _TorchEncoder:
  """The sentence-transformers pipeline on transformers' PyTorch BertModel (the reference)."""

  def __init__(self, path, max_length: int):
    import torch  # noqa: PLC0415 (bench extra only)
    import transformers  # noqa: PLC0415

    self.torch = torch
    self.tokenizer = transformers.AutoTokenizer.from_pretrained(str(path))
    self.model = transformers.BertModel.from_pretrained(str(path)).eval()
    self.max_length = max_length

  def encode(self, texts: Sequence[str], batch_size: int) -> np.ndarray:
    torch = self.torch
    order = np.argsort([-len(t) for t in texts], kind="stable")  # sentence-transformers' sort key
    out = np.zeros((len(texts), self.model.config.hidden_size), np.float32)
    with torch.inference_mode():
      for start in range(0, len(texts), batch_size):
        idx = order[start:start + batch_size]
        batch = self.tokenizer([texts[i] for i in idx], padding=True, truncation=True,
                               max_length=self.max_length, return_tensors="pt")
        hidden = self.model(**batch).last_hidden_state
        m = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)
        out[idx] = torch.nn.functional.normalize(pooled, p=2, dim=1).numpy()
    return out


def _timed(fn) -> tuple[float, float, np.ndarray]:
  """(wall seconds, process CPU seconds, result) of one call."""
  wall, cpu = time.perf_counter(), time.process_time()
  result = fn()
  return time.perf_counter() - wall, time.process_time() - cpu, result


def run(quick: bool = False, batch_sizes: Sequence[int] = (32, 128)) -> dict:
  """Measures sentences/s for both sides.

  The two sides alternate, ``repeats`` times each, and each keeps its best run, so that load from
  other processes on a shared machine hits both alike. Process CPU time per sentence is reported as
  well: it is far less sensitive to such load than wall time.

  Args:
    quick: 128 sentences per batch size and 2 alternations (else 512 and 3).
    batch_sizes: sentences per forward call.

  Returns:
    ``{"minilm": {batch_size: {"jax": s/s, "torch": s/s, "ratio": jax/torch (wall),
    "jax_cpu_ms": CPU ms per sentence, "torch_cpu_ms": ..., "cpu_ratio": torch/jax CPU time,
    "max_abs_diff": largest embedding difference}}, "torch_threads": int, "n_sentences": int}``.
  """
  import torch  # noqa: PLC0415 (bench extra only)

  n, repeats = (128, 2) if quick else (512, 3)
  texts = make_sentences(n)
  path = assets.minilm_dir()
  jax_enc = text_encoder.SentenceEncoder.from_pretrained(path)
  torch_enc = _TorchEncoder(path, jax_enc.max_length)
  results = {}
  for bs in batch_sizes:
    jax_enc.encode(texts, batch_size=bs)  # compile every (rows, length bucket) shape it needs
    torch_enc.encode(texts[:bs], batch_size=bs)
    best = {"jax": (np.inf, np.inf), "torch": (np.inf, np.inf)}
    for _ in range(repeats):
      *jt, a = _timed(lambda bs=bs: jax_enc.encode(texts, batch_size=bs))
      *tt, b = _timed(lambda bs=bs: torch_enc.encode(texts, bs))
      best = {"jax": np.minimum(best["jax"], jt), "torch": np.minimum(best["torch"], tt)}
    (jw, jc), (tw, tc) = best["jax"], best["torch"]
    results[bs] = {"jax": n / jw, "torch": n / tw, "ratio": tw / jw,
                   "jax_cpu_ms": 1e3 * jc / n, "torch_cpu_ms": 1e3 * tc / n, "cpu_ratio": tc / jc,
                   "max_abs_diff": float(np.abs(a - b).max())}
  return {"minilm": results, "torch_threads": torch.get_num_threads(), "n_sentences": n}


def main(argv: Sequence[str]) -> None:
  del argv
  res = run(_QUICK.value)
  print(f"MiniLM (all-MiniLM-L6-v2) sentence encoding, {res['n_sentences']} sentences of 30-70 "
        f"words, end to end; torch intra-op threads: {res['torch_threads']}")
  print(f"{'batch':>6} {'JAX sent/s':>11} {'PyTorch sent/s':>15} {'JAX/PyTorch':>12} "
        f"{'JAX CPU ms/sent':>16} {'PyTorch CPU ms/sent':>20} {'CPU ratio':>10} {'max|diff|':>10}")
  for bs, r in res["minilm"].items():
    print(f"{bs:>6} {r['jax']:>11.1f} {r['torch']:>15.1f} {r['ratio']:>12.2f} "
          f"{r['jax_cpu_ms']:>16.1f} {r['torch_cpu_ms']:>20.1f} {r['cpu_ratio']:>10.2f} "
          f"{r['max_abs_diff']:>10.1e}")
  print("JAX/PyTorch = speed ratio from wall time; CPU ratio = PyTorch CPU time / JAX CPU time "
        "(> 1: JAX needs less CPU per sentence).")


if __name__ == "__main__":
  app.run(main)
