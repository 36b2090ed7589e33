"""The EAGLE agent as a language model: a decoder that scores (or writes) the next action.

The paper's agent is an LLM that writes the action for the current state; its reference policy is the
same LLM fine-tuned on action strings. Here the agent is any decoder ``models/llama.py`` loads
(SmolLM2 GGUF on CPU, safetensors folders for larger models) wrapped in ``AgentLM``:

* **Inputs.** The agent prompt (``prompts.agent_prompt``: the user's profile, the current
  description and the instruction, rendered by the decoder's chat template) as token ids
  ``prompt: [N, P] int32``, left-padded with -1; the state's K candidate action strings, each followed
  by the end-of-turn token, as ``actions: [N, K, L] int32``, right-padded with -1
  (``agent/lm_features.py`` builds both).
* **Scores (``lm_choice``).** ``log pi(a | s)`` over the K candidates is a softmax over
  ``f(s, a) = sum_j log p(a_j | prompt, a_<j)`` (``score="sum"``) or that sum divided by the action's
  token count (``score="mean"``, which removes the bias towards short candidates). The prompt is
  encoded **once per state**: one pass fills a KV cache, which is repeated to the K candidate rows,
  and a second pass reads the candidates against it.
* **Value.** ``V(s) = w^T mean_t h_t + b`` over the final-norm hidden states of the prompt's real
  tokens (the pooled-head choice of the value baseline, small initial weights so V starts near 0).
* **Training.** LoRA through ``qwix`` (``qwix.LoraProvider`` on the modules matching
  ``lora_modules``, rank and alpha from config) or full fine-tuning (``full_finetune``). The
  trainable parameters are the adapters (or all decoder weights) plus the value head; the frozen
  base is *one* pytree shared by the agent, the reference and the behaviour policy (their adapters
  differ; the base is never copied) and is not checkpointed: it is reloaded from its file.

``LMPolicyModel`` exposes the interface of ``training.FunctionalModel`` that ``trainer.Learner``
uses (``init``, ``abstract_params``, ``shardings``, ``module``), plus ``frozen`` (the base, passed
to every jitted step as an argument, not closed over).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from eagle_jax import checks, parallel
from eagle_jax.checks import ConfigError
from eagle_jax.models import attention, lora
from eagle_jax.models import llama as llama_lib

KINDS = ("lm_choice", "lm_generate")
SCORES = ("sum", "mean")
PAD = -1  # token id of padding in ``prompt`` and ``actions``


@dataclasses.dataclass(frozen=True)
class LMPolicyConfig:
  """The language-model policy (``config.policy`` with ``kind`` one of ``KINDS``).

  Attributes:
    kind: ``lm_choice`` (score the K candidates) or ``lm_generate`` (write the action).
    score: ``sum`` or ``mean`` of the action tokens' log-probabilities (``lm_choice``).
    prompt_tokens: P, agent-prompt length (longer prompts keep their last P tokens).
    action_tokens: L, action length including the end-of-turn token (longer ones are cut).
    full_finetune: train every decoder weight instead of LoRA adapters.
    lora_rank, lora_alpha: adapter rank r and scale alpha (the update is ``B A * alpha / r``).
    lora_modules: regex over module paths of the decoder that get adapters.
    temperature: sampling temperature of ``lm_generate``.
    act_batch: states per policy call when acting (rollouts, evaluation): fixed, so the scoring
      program compiles once and its memory (K copies of the prompt's KV cache) is bounded.
    compute_dtype: ``float32`` or ``bfloat16`` activations (parameters keep their dtype).
    prefix_attention: the candidates attend the prompt's cached keys through
      ``attention.attend_shared_prefix`` (read once per state) instead of K copies of the prompt's
      KV cache: the same numbers up to float reassociation, K times less cache memory (accelerator
      configs with K = 100).
    candidate_chunk: candidates scored per pass (0: all K at once): the prompt is encoded once and
      the candidates read it ``candidate_chunk`` at a time (``LMPolicyModel.apply``), so the
      full-vocabulary logits of one chunk are live instead of K candidates'.
    remat: recompute the prompt's and each candidate chunk's forward pass in the backward pass
      instead of keeping their activations (``jax.checkpoint``): less memory, about one more
      forward pass of compute.
  """

  kind: str = "lm_choice"
  score: str = "mean"
  prompt_tokens: int = 192
  action_tokens: int = 32
  full_finetune: bool = False
  lora_rank: int = 8
  lora_alpha: float = 16.0
  lora_modules: str = r"backbone/layers/\d+/(attn|mlp)"
  temperature: float = 1.0
  act_batch: int = 8
  compute_dtype: str = "float32"
  prefix_attention: bool = False
  candidate_chunk: int = 0
  remat: bool = False

  @classmethod
  def from_config(cls, block, field: str = "config.policy") -> LMPolicyConfig:
    """Reads and checks ``block`` (a ConfigDict); raises ``ConfigError`` naming the field."""
    out = cls(**checks.typed_fields(cls, block, field))
    if out.kind not in KINDS:
      raise ConfigError(f"{field}.kind={out.kind!r}: expected one of {KINDS}")
    if out.score not in SCORES:
      raise ConfigError(f"{field}.score={out.score!r}: expected one of {SCORES}")
    for name in ("prompt_tokens", "action_tokens", "lora_rank", "act_batch"):
      if getattr(out, name) < 1:
        raise ConfigError(f"{field}.{name}={getattr(out, name)}: expected an integer >= 1")
    if out.candidate_chunk < 0:
      raise ConfigError(f"{field}.candidate_chunk={out.candidate_chunk}: expected 0 (all "
                        "candidates at once) or a positive chunk size")
    if out.lora_alpha <= 0 or out.temperature <= 0:
      raise ConfigError(f"{field}.lora_alpha and {field}.temperature must be > 0")
    if out.compute_dtype not in ("float32", "bfloat16"):
      raise ConfigError(f"{field}.compute_dtype={out.compute_dtype!r}: expected float32 or bfloat16")
    return out


class AgentLM(nnx.Module):
  """A decoder backbone with a value head; see the module docstring."""

  def __init__(self, config: llama_lib.LlamaConfig, *, rngs: nnx.Rngs,
               prefix_attention: bool = False):
    self.backbone = llama_lib.Llama(config, rngs=rngs)
    self.prefix_attention = prefix_attention
    init = nnx.initializers.variance_scaling(1e-4, "fan_in", "truncated_normal")
    with nnx.use_eager_sharding(False):
      self.value_head = nnx.Linear(
          config.hidden, 1, rngs=rngs, kernel_init=nnx.with_partitioning(init, ("embed", None)),
          bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), (None,)))

  def encode_prompt(self, prompt: jax.Array, extra: int):
    """prompt: [N, P] int32 (-1 padded) -> (last-token logits [N, V], value [N], KV cache with
    ``extra`` free slots after the prompt)."""
    mask = prompt != PAD
    cache = llama_lib.KVCache.init(self.backbone.config, prompt.shape[0], prompt.shape[1] + extra)
    hidden, cache = self.backbone.hidden_states(jnp.where(mask, prompt, 0), attention_mask=mask,
                                                cache=cache)
    w = mask[..., None].astype(jnp.float32)
    pooled = jnp.sum(hidden.astype(jnp.float32) * w, 1) / jnp.maximum(jnp.sum(w, 1), 1.0)
    value = self.value_head(pooled)[..., 0]
    last = self.backbone.logits(hidden[:, -1:])[:, 0]
    return last, value, cache

  def action_logits(self, prompt: jax.Array, actions: jax.Array, encoded=None
                    ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Next-token logits at every action position, the prompt encoded once.

    Args:
      prompt: [N, P] int32 prompt ids, left-padded with -1 (at least one real token per row).
      actions: [N, K, L] int32 candidate ids, right-padded with -1.
      encoded: the prompt's ``encode_prompt`` output, if already computed (chunked scoring).

    Returns:
      ``(logits [N, K, L, V] float32 predicting action token j, real-token mask [N, K, L],
      value [N])``.
    """
    n, k, length = actions.shape
    flat = actions.reshape(n * k, length)
    amask = flat != PAD
    if encoded is None:
      encoded = self.encode_prompt(prompt, 0 if self.prefix_attention else length)
    last, value, cache = encoded
    if self.prefix_attention:
      start = jnp.repeat(cache.positions_next, k)[:, None]
      positions = start + jnp.maximum(jnp.cumsum(amask, -1, dtype=jnp.int32) - 1, 0)
      prefix = attention.SharedPrefix.from_cache(
          cache, row_prefix=jnp.arange(n * k) // k, row_shared=jnp.ones((n * k,), bool),
          seats=jnp.arange(n * k).reshape(n, k))
      hidden, _ = self.backbone.hidden_states(jnp.where(amask, flat, 0), positions,
                                              attention_mask=amask, prefix=prefix)
    else:
      rep = llama_lib.KVCache(k=jnp.repeat(cache.k, k, axis=1), v=jnp.repeat(cache.v, k, axis=1),
                              mask=jnp.repeat(cache.mask, k, axis=0), index=cache.index)
      hidden, _ = self.backbone.hidden_states(jnp.where(amask, flat, 0), attention_mask=amask,
                                              cache=rep)
    # Token j is predicted by the prompt's last position (j = 0) or by action position j - 1.
    logits = self.backbone.logits(hidden[:, :-1])  # [NK, L-1, V]
    first = jnp.repeat(last, k, axis=0)[:, None]  # [NK, 1, V]
    pred = jnp.concatenate([first, logits], axis=1)
    return pred.reshape(n, k, length, -1), amask.reshape(n, k, length), value

  def __call__(self, prompt: jax.Array, actions: jax.Array | None = None, full: bool = False,
               encoded=None, extra: int = 0):
    """Per-token log-probabilities of each candidate after the prompt, and the value. (The one
    entry point: qwix's LoRA intercepts the calls made inside ``__call__`` only.)

    Args:
      prompt: [N, P] int32 prompt ids, left-padded with -1.
      actions: [N, K, L] int32 candidate ids, right-padded with -1; None: only encode the prompt
        and return ``encode_prompt(prompt, extra)`` (chunked scoring, ``LMPolicyModel.apply``).
      full: return the next-token logits ``[N, K, L, V]`` instead (``action_logits``).
      encoded: the prompt's ``encode_prompt`` output, if already computed.
      extra: free cache slots after the prompt when only encoding (L, or 0 with
        ``prefix_attention``).

    Returns:
      ``(token_logp [N, K, L] float32, 0 at padding; value [N] float32)``.
    """
    if actions is None:
      return self.encode_prompt(prompt, extra)
    pred, _, value = self.action_logits(prompt, actions, encoded)
    return (pred if full else token_log_probs(pred, actions)), value


def token_log_probs(logits: jax.Array, actions: jax.Array) -> jax.Array:
  """log softmax(logits)[token] at real tokens, 0 at padding: [..., L, V], [..., L] -> [..., L]."""
  tokens = jnp.where(actions != PAD, actions, 0)
  logp = jnp.take_along_axis(logits, tokens[..., None], axis=-1)[..., 0]
  logp = logp - jax.nn.logsumexp(logits, -1)
  return jnp.where(actions != PAD, logp, 0.0)


def token_kl(logits: jax.Array, ref_logits: jax.Array, actions: jax.Array) -> jax.Array:
  """KL(pi || pi_ref) of the next-token distributions, summed over the action's real tokens.

  ``sum_j sum_v pi(v | s, a_<j) (log pi(v | s, a_<j) - log pi_ref(v | s, a_<j))``: the per-token
  KL along the written action (its expectation over actions drawn from pi is the KL between the
  two policies' distributions over whole action strings).

  Args:
    logits, ref_logits: [..., L, V] next-token logits of the agent and the reference.
    actions: [..., L] ids (-1 padded).

  Returns:
    [...] float32.
  """
  logp = jax.nn.log_softmax(logits, -1)
  logq = jax.nn.log_softmax(ref_logits, -1)
  kl = jnp.sum(jnp.exp(logp) * (logp - logq), -1)
  return jnp.sum(jnp.where(actions != PAD, kl, 0.0), -1)


def action_scores(token_logp: jax.Array, actions: jax.Array, score: str) -> jax.Array:
  """[..., K, L] per-token log-probs -> [..., K] candidate scores (sum, or mean over real tokens)."""
  total = jnp.sum(token_logp, axis=-1)
  if score == "sum":
    return total
  count = jnp.sum(actions != PAD, axis=-1)
  return total / jnp.maximum(count, 1)


def sequence_cross_entropy(token_logp: jax.Array, actions: jax.Array, targets: jax.Array
                           ) -> jax.Array:
  """The reference's next-token cross-entropy on target action strings, per token.

  ``-sum_{n,a} q_{n,a} sum_j log p(a_j | ...) / sum_{n,a} q_{n,a} |a|``: the usual per-token
  language-modelling loss on the action strings drawn from q (the expectation over q taken exactly).

  Args:
    token_logp: [N, K, L] from ``AgentLM``.
    actions: [N, K, L] ids (-1 padded).
    targets: [N, K] target distribution q over each state's candidates.
  """
  counts = jnp.sum(actions != PAD, axis=-1).astype(jnp.float32)
  nll = -jnp.sum(targets * jnp.sum(token_logp, -1))
  return nll / jnp.maximum(jnp.sum(targets * counts), 1e-9)


# ---------------------------------------------------------------------------------------------------
# The model as pure pytrees: trainable (adapters + value head) and frozen (base) parameters.


class LMPolicyModel(lora.FrozenBaseModel):
  """``AgentLM`` with LoRA (or fully fine-tuned) as ``module(params, frozen)`` over pure pytrees
  (``models.lora.FrozenBaseModel``: trainable = adapters + value head, frozen = the decoder base).

  Args:
    llm_config: the decoder's shapes.
    config: the policy config.
    mesh: device mesh (parameters and the base are placed by their logical axes).
    seed: PRNG seed of the value head (and, + 1, of the adapters).
    base: pure-dict ``Llama`` parameters (``nnx.to_pure_dict(nnx.state(llama, nnx.Param))``),
      or None for abstract-only use (the dry run).
  """

  def __init__(self, llm_config: llama_lib.LlamaConfig, config: LMPolicyConfig,
               mesh: jax.sharding.Mesh, *, seed: int = 0, base: dict | None = None,
               rules=parallel.DEFAULT_RULES):
    self.config = config
    self.llm_config = llm_config.replace(dtype=jnp.dtype(config.compute_dtype))
    self.seed = seed
    example = (jnp.zeros((1, 4), jnp.int32), jnp.zeros((1, 2, 3), jnp.int32))

    def build() -> AgentLM:
      module = AgentLM(self.llm_config, rngs=nnx.Rngs(seed),
                       prefix_attention=config.prefix_attention)
      if config.full_finetune:
        return module
      return lora.apply_lora(module, example, rank=config.lora_rank, alpha=config.lora_alpha,
                             modules=config.lora_modules, seed=seed + 1)

    super().__init__(build, lora.trainable_filter(config.full_finetune, ("value_head",)), mesh,
                     base=base, full_finetune=config.full_finetune, rules=rules)

  def apply(self, params: dict, frozen: dict, prompt: jax.Array, actions: jax.Array,
            full: bool = False) -> tuple[jax.Array, jax.Array]:
    """``module(params, frozen)(prompt, actions, full)`` under ``candidate_chunk`` and ``remat``.

    With ``candidate_chunk = C < K`` the prompt is encoded once and ``lax.map`` scores the
    candidates C at a time against its KV cache (K is padded to a multiple of C with empty
    candidates, which are cut again): the same numbers as one pass up to float reassociation. With
    ``remat`` the prompt encoding and each chunk are ``jax.checkpoint``-ed.

    Args:
      params, frozen: trainable and frozen parameters.
      prompt: [N, P] int32; actions: [N, K, L] int32 (-1 padded).
      full: return next-token logits ``[N, K, L, V]`` instead of token log-probs ``[N, K, L]``.

    Returns:
      ``(token_logp [N, K, L] or logits [N, K, L, V] float32, value [N])``.
    """
    cfg = self.config
    n, k, length = actions.shape
    maybe_remat = jax.checkpoint if cfg.remat else (lambda f: f)
    if not cfg.candidate_chunk or cfg.candidate_chunk >= k:
      return maybe_remat(lambda p, a: self.module(p, frozen)(prompt, a, full))(params, actions)
    c = cfg.candidate_chunk
    extra = 0 if cfg.prefix_attention else length
    encoded = maybe_remat(lambda p: self.module(p, frozen)(prompt, extra=extra))(params)
    acts = jnp.pad(actions, ((0, 0), (0, -k % c), (0, 0)), constant_values=PAD)
    chunks = jnp.moveaxis(acts.reshape(n, -1, c, length), 1, 0)  # [K/C, N, C, L]
    score = maybe_remat(lambda p, enc, a: self.module(p, frozen)(prompt, a, full, encoded=enc)[0])
    out = jax.lax.map(lambda a: score(params, encoded, a), chunks)  # [K/C, N, C, L(, V)]
    out = jnp.moveaxis(out, 0, 1).reshape((n, -1) + out.shape[3:])[:, :k]
    return out, encoded[1]


def merged_backbone(model: LMPolicyModel, params: dict, frozen: dict) -> dict:
  """Decoder weights with the adapters folded in, ``W + A B * alpha / r`` (pure dict of the
  ``Llama``'s parameters): what a sampler decodes from (qwix cannot run inside its while loop)."""
  if model.config.full_finetune:
    return params["backbone"]
  scale = model.config.lora_alpha / model.config.lora_rank

  def fold(base: dict, adapters: dict | None) -> dict:
    out = {}
    for name, value in base.items():
      sub = None if adapters is None else adapters.get(name)
      if isinstance(value, dict):
        out[name] = fold(value, sub if isinstance(sub, dict) else None)
        continue
      a = None if adapters is None else adapters.get(f"{name}_lora_a")
      b = None if adapters is None else adapters.get(f"{name}_lora_b")
      if a is None:
        out[name] = value
      else:
        delta = jnp.tensordot(a, b, axes=1) * scale
        out[name] = (value + delta.reshape(value.shape)).astype(value.dtype)
    return out

  return fold(frozen["backbone"], params.get("backbone"))


def host_tokens(rows: list[list[int]], width: int, left: bool) -> np.ndarray:
  """Pads id lists to ``[len(rows), width]`` int32 with ``PAD`` (left or right), cutting long rows
  to their last (left) or first (right) ``width`` ids."""
  out = np.full((len(rows), width), PAD, np.int32)
  for i, ids in enumerate(rows):
    ids = ids[-width:] if left else ids[:width]
    if left:
      out[i, width - len(ids):] = ids
    else:
      out[i, :len(ids)] = ids
  return out


