"""The language-model agent's LoRA RL train step: eagle_jax (JAX) vs PyTorch + peft (CPU).

A step: the ``lm_choice`` RL loss (``losses.eagle_loss`` on ``action_scores(..., "mean")``; the
reference scores from a second adapter set, no gradient) over N states x K candidates (P prompt, L
action tokens; random ids), its gradient w.r.t. the LoRA adapters (r=8, alpha=16, attn + MLP) and
the value head, and an AdamW update. ``jax``: jit of value_and_grad + optax, frozen base passed as
an argument, each prompt encoded once and its KV cache repeated to the K candidates (``AgentLM``).
``torch-full`` / ``torch-cache``: HF ``LlamaForCausalLM`` with the same weights
(``loading.params_to_hf``) and a peft LoRA with the same adapters (``--torch_threads`` 2), N*K full
prompt+action sequences / with each prompt encoded once and its ``DynamicCache`` repeated K times.
All start from the same non-zero adapters; their initial losses must agree to 1e-3. After a warm-up,
the contenders alternate (rotating order) over ``--repeats`` steps; medians are reported, with
FLOPs (XLA cost analysis / torch FlopCounterMode, and an analytic estimate) against this machine's
measured f32 matmul rate (probed between the steps). On a machine busier than its cores, torch's
OpenMP threads spin at barriers and its times balloon: compare with ``--torch_threads=1`` there.
Run from the repository root::

  python -m benchmarks.agent_bench               # SmolLM2-135M-Instruct (GGUF asset), N=4 K=5
  python -m benchmarks.agent_bench --tiny        # tiny random Llama: a fast smoke check
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import peft
import torch
import transformers
from flax import nnx
from torch.utils.flop_counter import FlopCounterMode

from eagle_jax import assets, parallel, training
from eagle_jax.agent import lm_policy, losses
from eagle_jax.models import llama as llama_lib
from eagle_jax.models import loading

LORA = {"q_proj": ("attn", "wq"), "k_proj": ("attn", "wk"), "v_proj": ("attn", "wv"),
        "o_proj": ("attn", "wo"), "gate_proj": ("mlp", "w_gate"), "up_proj": ("mlp", "w_up"),
        "down_proj": ("mlp", "w_down")}  # peft target -> our (block, weight)
RANK, ALPHA, KL_COEF, VALUE_COEF = 8, 16.0, 0.1, 0.5


def timed(fn) -> tuple[float, float, object]:
  """(wall seconds, process CPU seconds, result) of one call."""
  wall, cpu = time.perf_counter(), time.process_time()
  out = fn()
  return time.perf_counter() - wall, time.process_time() - cpu, out


def matmul_probe(n: int):
  """A function measuring the FLOP/s of one jitted f32 [n, n] x [n, n] matmul (compiled here)."""
  a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
  f = jax.jit(lambda x, y: x @ y)
  f(a, a).block_until_ready()
  return lambda: 2 * n**3 / min(timed(lambda: f(a, a).block_until_ready())[0] for _ in range(2))


def analytic_flops(c, n_lora: int, layer_tokens: int, logit_rows: int, attn_pairs: int) -> float:
  """Step FLOPs ~ 3 forwards' matmuls (agent forward; backward through activations only, no weight
  gradients of the frozen base; reference forward) + 4x the forward attention (dense)."""
  d, hd = c.hidden, c.head_dim
  per_layer = 2 * d * (c.heads + c.kv_heads) * hd + 3 * d * c.intermediate
  matmul = 2 * (c.layers * per_layer + n_lora) * layer_tokens + 2 * d * c.vocab_size * logit_rows
  return 3 * matmul + 4 * 4 * c.layers * c.heads * c.head_dim * attn_pairs


def build_jax(args):
  if args.tiny:
    config = llama_lib.LlamaConfig(vocab_size=512, hidden=64, intermediate=160, layers=2, heads=4,
                                   kv_heads=2, head_dim=16)
    llama = llama_lib.Llama(config, rngs=nnx.Rngs(0))
  else:
    config, llama = loading.load_llama_gguf(assets.resolve_gguf("smollm2"))
  base = nnx.to_pure_dict(nnx.state(llama, nnx.Param))
  mesh = parallel.make_mesh({"data": 1}, devices=jax.devices()[:1])
  pcfg = lm_policy.LMPolicyConfig(lora_rank=RANK, lora_alpha=ALPHA, prompt_tokens=args.prompt,
                                  action_tokens=args.action)
  model = lm_policy.LMPolicyModel(config, pcfg, mesh, seed=0, base=base)

  def random_b(params, seed):  # non-zero B (at init B = 0 and the adapters do nothing)
    rng = np.random.RandomState(seed)
    return jax.tree_util.tree_map_with_path(
        lambda p, x: jnp.asarray(rng.normal(0, 0.02, x.shape), x.dtype)
        if str(getattr(p[-1], "key", "")).endswith("_lora_b") else x, params)

  params, ref_params = random_b(model.init(), 1), random_b(model.init(), 2)
  opt = training.make_optimizer({"learning_rate": 1e-4}, 100)
  rng, n, k = np.random.RandomState(0), args.n, args.k
  batch = (rng.randint(0, config.vocab_size, (n, args.prompt)).astype(np.int32),
           rng.randint(0, config.vocab_size, (n, k, args.action)).astype(np.int32),
           rng.randint(0, k, n).astype(np.int32), rng.normal(0, 1, n).astype(np.float32))

  def step(params, opt_state, ref_params, frozen, batch):
    prompt, actions, acts, reward = batch

    def loss_fn(p):
      token_logp, values = model.module(p, frozen)(prompt, actions)
      scores = lm_policy.action_scores(token_logp, actions, "mean")
      ref_logp, _ = model.module(ref_params, frozen)(prompt, actions)
      ref_scores = jax.lax.stop_gradient(lm_policy.action_scores(ref_logp, actions, "mean"))
      return losses.eagle_loss(
          logits=scores[:, None], ref_logits=ref_scores[:, None], candidate_mask=None,
          actions=acts[:, None], values=values[:, None], reward=reward, gamma=1.0,
          gae_lambda=1.0, kl_coef=KL_COEF, value_coef=VALUE_COEF).total

    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = opt.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  jbatch = tuple(jnp.asarray(x) for x in batch)
  state = {"params": params, "opt": opt.init(params)}
  t0 = time.perf_counter()
  compiled = jax.jit(step).lower(params, state["opt"], ref_params, model.frozen, jbatch).compile()
  compile_s, cost = time.perf_counter() - t0, compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, list | tuple) else cost

  def run():
    state["params"], state["opt"], loss = compiled(state["params"], state["opt"], ref_params,
                                                   model.frozen, jbatch)
    return float(jax.block_until_ready((state, loss))[1])

  n_lora = sum(x.size for x in jax.tree.leaves(params["backbone"]))
  return dict(config=config, llama=llama, params=params, ref_params=ref_params, batch=batch,
              run=run, flops=float(cost["flops"]), compile_s=compile_s, n_lora=n_lora)


def build_torch(j, mode: str):
  """The peft step over the same weights, adapters and batch: (initial loss, run, FLOPs/step)."""
  c = j["config"]
  tcfg = transformers.LlamaConfig(
      vocab_size=c.vocab_size, hidden_size=c.hidden, intermediate_size=c.intermediate,
      num_hidden_layers=c.layers, num_attention_heads=c.heads, num_key_value_heads=c.kv_heads,
      head_dim=c.head_dim, rope_theta=c.rope_theta, rms_norm_eps=c.rms_eps,
      tie_word_embeddings=c.tie_embeddings, max_position_embeddings=c.max_len)
  tmodel = transformers.LlamaForCausalLM(tcfg).eval().to(torch.float32)
  hf = {key: torch.tensor(np.array(v)) for key, v in loading.params_to_hf(j["llama"]).items()}
  missing, unexpected = tmodel.load_state_dict(hf, strict=False)
  if [m for m in missing if m != "lm_head.weight"] or unexpected:
    raise RuntimeError(f"torch state dict mismatch: {missing}, {unexpected}")
  tmodel.tie_weights()
  lcfg = peft.LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=list(LORA), lora_dropout=0.0)
  pm = peft.get_peft_model(tmodel, lcfg)
  pm.add_adapter("ref", lcfg)
  head = torch.nn.Linear(c.hidden, 1)
  t = lambda x: torch.tensor(np.asarray(x))
  with torch.no_grad():  # A/B = our adapters (W + B A alpha / r; o_proj's A [H, hd, r] flattened)
    for adapter, params in (("default", j["params"]), ("ref", j["ref_params"])):
      for name, mod in pm.named_modules():
        if hasattr(mod, "lora_A") and adapter in mod.lora_A:
          parts = name.split(".")
          ours = params["backbone"]["layers"][int(parts[parts.index("layers") + 1])]
          block, w = LORA[parts[-1]]
          mod.lora_A[adapter].weight.copy_(t(ours[block][f"{w}_lora_a"]).reshape(-1, RANK).T)
          mod.lora_B[adapter].weight.copy_(t(ours[block][f"{w}_lora_b"]).reshape(RANK, -1).T)
    head.weight.copy_(t(j["params"]["value_head"]["kernel"]).T)
    head.bias.copy_(t(j["params"]["value_head"]["bias"]))
  inner, lm_head = pm.base_model.model.model, pm.base_model.model.lm_head
  prompt, actions, acts, reward = (torch.tensor(x) for x in j["batch"])
  (n, k, length), p = actions.shape, prompt.shape[1]
  prompt, acts, flat = prompt.long(), acts.long(), actions.long().reshape(n * k, length)

  def scores_values(adapter):
    pm.set_adapter(adapter)
    if mode == "full":
      seq = torch.cat([prompt.repeat_interleave(k, 0), flat], 1)
      h = inner(input_ids=seq, use_cache=False).last_hidden_state
      logits = lm_head(h[:, p - 1:p + length - 1])
      hp = h.view(n, k, p + length, -1)[:, 0, :p]
    else:
      out = inner(input_ids=prompt, use_cache=True)
      hp, cache = out.last_hidden_state, out.past_key_values
      cache.batch_repeat_interleave(k)
      ha = inner(input_ids=flat, past_key_values=cache, use_cache=True).last_hidden_state
      logits = torch.cat([lm_head(hp[:, -1:]).repeat_interleave(k, 0), lm_head(ha[:, :-1])], 1)
    logp = logits.gather(-1, flat[..., None])[..., 0] - torch.logsumexp(logits, -1)
    return logp.view(n, k, length).mean(-1), head(hp.mean(1))[:, 0]

  def loss_fn():
    with torch.no_grad():
      ref_scores, _ = scores_values("ref")
    scores, values = scores_values("default")
    logp, logq = torch.log_softmax(scores, -1), torch.log_softmax(ref_scores, -1)
    adv = reward - values.detach()
    pg = -(adv * logp[torch.arange(n), acts]).mean()
    kl = (logp.exp() * (logp - logq)).sum(-1).mean()
    return pg + KL_COEF * kl + VALUE_COEF * 0.5 * ((values - reward) ** 2).mean()

  trainable = [q for name, q in pm.named_parameters() if ".default." in name]
  opt = torch.optim.AdamW(trainable + list(head.parameters()), lr=1e-4, weight_decay=0.0)

  def run():
    loss = loss_fn()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return float(loss.detach())

  with FlopCounterMode(display=False) as counter:
    init_loss = run()  # the warm-up step (its loss is at the initial parameters)
  return init_loss, run, float(counter.get_total_flops())


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--tiny", action="store_true", help="tiny random Llama instead of SmolLM2")
  for flag, default, text in (("n", 4, "states N"), ("k", 5, "candidates K per state"),
                              ("prompt", 128, "prompt tokens P"), ("action", 24, "action tokens L"),
                              ("repeats", 5, "timed steps per contender"),
                              ("torch_threads", 2, "torch intra-op threads"),
                              ("matmul", 2048, "size of the matmul-rate probe")):
    parser.add_argument(f"--{flag}", type=int, default=default, help=text)
  parser.add_argument("--torch_modes", default="full,cache", help="subset of full,cache")
  args = parser.parse_args(argv)
  warnings.filterwarnings("ignore", category=FutureWarning)
  warnings.filterwarnings("ignore", message=".*(not writable|requires_grad=True to a scalar).*")
  transformers.logging.set_verbosity_error()
  torch.set_num_threads(args.torch_threads)
  print(f"load average at start: {os.getloadavg()}")
  probe = matmul_probe(args.matmul)
  j = build_jax(args)
  c, n, k, p, length = j["config"], args.n, args.k, args.prompt, args.action
  print(f"model: {'tiny random Llama' if args.tiny else 'SmolLM2-135M-Instruct'} (layers="
        f"{c.layers}, hidden={c.hidden}, vocab={c.vocab_size}), float32; LoRA r={RANK} "
        f"alpha={ALPHA} on attn+mlp ({j['n_lora']} adapter params); N={n} K={k} P={p} L={length}; "
        f"jax compile {j['compile_s']:.1f}s; torch threads {torch.get_num_threads()}", flush=True)
  lossj = j["run"]()  # the warm-up step returns the loss at the initial parameters
  fed = n * p + n * k * length
  contenders = {"jax": (j["run"], j["flops"], fed, analytic_flops(
      c, j["n_lora"], fed, n + n * k * (length - 1), fed * (p + length)))}
  for mode in [m for m in args.torch_modes.split(",") if m]:
    lt, run, flops = build_torch(j, mode)
    print(f"loss at the initial parameters: jax {lossj:.6f}  torch-{mode} {lt:.6f}  "
          f"|diff| {abs(lossj - lt):.2e}", flush=True)
    if not abs(lossj - lt) <= 1e-3:
      print("ERROR: the losses differ by more than 1e-3: the contenders do not do the same work")
      return 1
    fed = n * k * (p + length) if mode == "full" else n * p + n * k * length
    pairs = fed * (p + length) if mode == "full" else n * p * p + n * k * length * (p + length)
    contenders[f"torch-{mode}"] = (run, flops, fed,
                                   analytic_flops(c, j["n_lora"], fed, n * k * length, pairs))
  names = list(contenders)
  times, cpu, last, rates = {name: [] for name in names}, {name: [] for name in names}, {}, []
  for r in range(args.repeats):  # interleaved, rotating the order; a matmul probe between steps
    for name in names[r % len(names):] + names[:r % len(names)]:
      rates.append(probe())
      seconds, cpu_s, last[name] = timed(contenders[name][0])
      times[name].append(seconds)
      cpu[name].append(cpu_s)
      print(f"  repeat {r + 1}/{args.repeats}: {name} {seconds:.3f}s, CPU {cpu_s:.3f}s", flush=True)
  med = {name: float(np.median(t)) for name, t in times.items()}
  rate = float(np.median(rates))
  print(f"matmul rate ({args.matmul}^3 f32, jax.jit; median of {len(rates)} probes between the "
        f"steps): {rate / 1e9:.1f} GFLOP/s (range {min(rates) / 1e9:.1f}-{max(rates) / 1e9:.1f})")
  print(f"{'contender':<12}{'s/step':>8}{'CPU s':>8}{'act tok/s':>10}{'fed tok/s':>10}"
        f"{'FLOPs meas':>11}{'FLOPs anal':>11}{'GFLOP/s':>8}{'%mm meas':>9}{'%mm anal':>9}"
        f"{'jax speed-up':>13}")
  for name, (_, flops, fed, anal) in contenders.items():
    s = med[name]
    print(f"{name:<12}{s:>8.3f}{np.median(cpu[name]):>8.3f}{n * k * length / s:>10.1f}"
          f"{fed / s:>10.1f}{flops:>11.3e}{anal:>11.3e}{flops / s / 1e9:>8.2f}"
          f"{flops / s / rate:>9.1%}{anal / s / rate:>9.1%}{s / med['jax']:>13.2f}")
  print(f"{args.repeats} interleaved repeats, medians; all step times: " + "; ".join(
      f"{name} {' '.join(f'{t:.3f}' for t in ts)}" for name, ts in times.items()))
  print(f"loss of the last step (same trajectory: 1 + {args.repeats} steps each): "
        + "  ".join(f"{name} {value:.6f}" for name, value in last.items()))
  print("CPU s: process CPU seconds per step (all threads, spin-waiting included; less load-bound "
        "than wall time). act tok/s = N*K*L/s; fed tok/s = tokens fed to the decoder per forward/s "
        "(a step = agent forward + backward + reference forward). FLOPs meas: XLA cost analysis "
        "(jax), torch FlopCounterMode (it skips CPU SDPA attention); anal: 3 forwards' matmuls + "
        "4x dense attention. jax speed-up = torch s/step / jax s/step. torch-full: N*K full "
        "prompt+action sequences (no shared-prompt cache); torch-cache: each prompt encoded once, "
        "its DynamicCache repeated to the K candidates, as jax does.")
  print(f"load average at end: {os.getloadavg()}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
