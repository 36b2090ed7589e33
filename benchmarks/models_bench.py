"""SmolLM2-135M generation speed: eagle_jax (JAX, KV-cache sampler) vs transformers (PyTorch CPU).

Both sides run the same dequantised GGUF weights in float32, the same ChatML prompt (replicated to
the batch), greedy decoding and exactly ``--new_tokens`` new tokens (stop tokens disabled on both
sides). Times exclude compilation (JAX is warmed up once on the same shapes) and model loading; each
figure is the best of ``--repeats`` runs. Tokens/s counts generated tokens over the whole batch.
Peak memory is the process's maximum resident set size (``resource.getrusage``), measured after the
JAX runs and again after the PyTorch runs. If ``benchmarks/minilm_bench.py`` provides ``run(quick)
-> dict``, its results are printed too.

Run from the repository root::

  python -m benchmarks.models_bench            # batch 1 and 8, 64 new tokens
  python -m benchmarks.models_bench --quick    # 16 new tokens, one repeat
"""

from __future__ import annotations

import argparse
import importlib
import resource
import sys
import time

import numpy as np


def _peak_rss_mib() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _best_time(fn, repeats: int) -> float:
  best = float("inf")
  for _ in range(repeats):
    t0 = time.perf_counter()
    fn()
    best = min(best, time.perf_counter() - t0)
  return best



def torch_llama(config, hf):
  """transformers' ``LlamaForCausalLM`` (float32, eval) holding the HF-named weights ``hf``."""
  import torch
  import transformers

  tcfg = transformers.LlamaConfig(
      vocab_size=config.vocab_size, hidden_size=config.hidden,
      intermediate_size=config.intermediate, num_hidden_layers=config.layers,
      num_attention_heads=config.heads, num_key_value_heads=config.kv_heads,
      head_dim=config.head_dim, rope_theta=config.rope_theta, rms_norm_eps=config.rms_eps,
      tie_word_embeddings=config.tie_embeddings, max_position_embeddings=config.max_len)
  tmodel = transformers.LlamaForCausalLM(tcfg).eval().to(torch.float32)
  state = {k: torch.from_numpy(np.array(v)) for k, v in hf.items()}
  missing, unexpected = tmodel.load_state_dict(state, strict=False)
  missing = [k for k in missing if k != "lm_head.weight"]
  if missing or unexpected:
    raise RuntimeError(f"torch state dict mismatch: missing {missing}, unexpected {unexpected}")
  tmodel.tie_weights()
  return tmodel


def run(
    quick: bool = False,
    batches=(1, 8),
    new_tokens: int | None = None,
    torch_threads: int | None = None,
) -> dict:
  import jax

  from eagle_jax import assets
  from eagle_jax.models import loading, sampling
  from eagle_jax.models.tokenizer import Tokenizer

  new_tokens = new_tokens or (16 if quick else 64)
  repeats = 1 if quick else 2
  path = assets.smollm2_gguf()
  tok = Tokenizer.from_gguf(path)
  prompt = tok.apply_chat_template(
      [{"role": "user", "content": "Write a short story about a robot who learns to paint."}],
      tokenize=True)
  config, hf = loading.gguf_to_hf(path)
  params = loading.hf_to_params(hf, config, source=str(path))
  model = loading.load_params(config, params, source=str(path))
  del params
  sampler = sampling.Sampler(model, tok)
  sp = sampling.SamplingParams(max_tokens=new_tokens, stop_ids=())
  results: dict = {"new_tokens": new_tokens, "prompt_tokens": len(prompt),
                   "jax_devices": jax.device_count()}
  jax_out = {}
  for b in batches:
    prompts = [prompt] * b
    t0 = time.perf_counter()
    jax_out[b] = sampler.generate_ids(prompts, sp)  # compile + run
    results[f"jax_b{b}_first_call_s"] = time.perf_counter() - t0
    sec = _best_time(lambda p=prompts: sampler.generate_ids(p, sp), repeats)
    results[f"jax_b{b}_tok_s"] = b * new_tokens / sec
  results["jax_peak_rss_mib"] = _peak_rss_mib()

  import torch

  if torch_threads:
    torch.set_num_threads(torch_threads)

  tmodel = torch_llama(config, hf)
  del hf
  for b in batches:
    ids = torch.tensor([prompt] * b)

    def gen(ids=ids):
      with torch.no_grad():
        return tmodel.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
            min_new_tokens=new_tokens, do_sample=False, pad_token_id=tok.pad_id,
            eos_token_id=None)

    out = gen()  # warm-up
    agree = np.mean(out[:, len(prompt):].numpy() == jax_out[b].tokens)
    results[f"token_agreement_b{b}"] = float(agree)
    sec = _best_time(gen, repeats)
    results[f"torch_b{b}_tok_s"] = b * new_tokens / sec
    results[f"ratio_b{b}_jax_over_torch"] = (
        results[f"jax_b{b}_tok_s"] / results[f"torch_b{b}_tok_s"])
  results["torch_threads"] = torch.get_num_threads()
  results["peak_rss_mib_after_torch"] = _peak_rss_mib()
  return results


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true", help="16 new tokens, one repeat")
  parser.add_argument("--new_tokens", type=int, default=None)
  parser.add_argument("--batches", type=str, default="1,8")
  parser.add_argument("--torch_threads", type=int, default=None, help="default: torch's choice")
  args = parser.parse_args(argv)
  batches = tuple(int(b) for b in args.batches.split(","))
  res = run(args.quick, batches, args.new_tokens, args.torch_threads)
  print("== SmolLM2-135M-Instruct generation (greedy, float32, CPU) ==")
  for key, value in res.items():
    print(f"{key:32s} {value:.3f}" if isinstance(value, float) else f"{key:32s} {value}")
  try:
    minilm = importlib.import_module("benchmarks.minilm_bench")
  except ImportError:
    minilm = None
  if minilm is not None and hasattr(minilm, "run"):
    print("== MiniLM (benchmarks.minilm_bench.run) ==")
    for key, value in minilm.run(args.quick).items():
      print(f"{key:32s} {value:.3f}" if isinstance(value, float) else f"{key:32s} {value}")
  else:
    print("== MiniLM: benchmarks/minilm_bench.py with run(quick) not found; skipped ==")
  return 0


if __name__ == "__main__":
  sys.exit(main())
