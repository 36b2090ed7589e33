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
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from eagle_jax import parallel, training
from eagle_jax.checks import ConfigError
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
      ``attention.attend_with_prefix`` (read once per state) instead of K copies of the prompt's
      KV cache: the same numbers up to float reassociation, K times less cache memory (accelerator
      configs with K = 100).
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

  @classmethod
  def from_config(cls, block, field: str = "config.policy") -> LMPolicyConfig:
    """Reads and checks ``block`` (a ConfigDict); raises ``ConfigError`` naming the field."""
    def get(name, default):
      return block.get(name, default) if hasattr(block, "get") else getattr(block, name, default)

    values = {}
    for f in dataclasses.fields(cls):
      value, kind = get(f.name, f.default), type(f.default)
      ok = isinstance(value, kind) or (kind is float and isinstance(value, int))
      if not ok or (kind is not bool and isinstance(value, bool)):
        raise ConfigError(f"{field}.{f.name}={value!r}: expected {kind.__name__}")
      values[f.name] = kind(value)
    out = cls(**values)
    if out.kind not in KINDS:
      raise ConfigError(f"{field}.kind={out.kind!r}: expected one of {KINDS}")
    if out.score not in SCORES:
      raise ConfigError(f"{field}.score={out.score!r}: expected one of {SCORES}")
    for name in ("prompt_tokens", "action_tokens", "lora_rank", "act_batch"):
      if getattr(out, name) < 1:
        raise ConfigError(f"{field}.{name}={getattr(out, name)}: expected an integer >= 1")
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

  def action_logits(self, prompt: jax.Array, actions: jax.Array
                    ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Next-token logits at every action position, the prompt encoded once.

    Args:
      prompt: [N, P] int32 prompt ids, left-padded with -1 (at least one real token per row).
      actions: [N, K, L] int32 candidate ids, right-padded with -1.

    Returns:
      ``(logits [N, K, L, V] float32 predicting action token j, real-token mask [N, K, L],
      value [N])``.
    """
    n, k, length = actions.shape
    flat = actions.reshape(n * k, length)
    amask = flat != PAD
    if self.prefix_attention:
      last, value, cache = self.encode_prompt(prompt, 0)
      start = jnp.repeat(cache.positions_next, k)[:, None]
      positions = start + jnp.maximum(jnp.cumsum(amask, -1, dtype=jnp.int32) - 1, 0)
      hidden, _ = self.backbone.hidden_states(jnp.where(amask, flat, 0), positions,
                                              attention_mask=amask, prefix=cache)
    else:
      last, value, cache = self.encode_prompt(prompt, length)
      rep = llama_lib.KVCache(k=jnp.repeat(cache.k, k, axis=1), v=jnp.repeat(cache.v, k, axis=1),
                              mask=jnp.repeat(cache.mask, k, axis=0), index=cache.index)
      hidden, _ = self.backbone.hidden_states(jnp.where(amask, flat, 0), attention_mask=amask,
                                              cache=rep)
    # Token j is predicted by the prompt's last position (j = 0) or by action position j - 1.
    logits = self.backbone.logits(hidden[:, :-1])  # [NK, L-1, V]
    first = jnp.repeat(last, k, axis=0)[:, None]  # [NK, 1, V]
    pred = jnp.concatenate([first, logits], axis=1)
    return pred.reshape(n, k, length, -1), amask.reshape(n, k, length), value

  def __call__(self, prompt: jax.Array, actions: jax.Array, full: bool = False
               ) -> tuple[jax.Array, jax.Array]:
    """Per-token log-probabilities of each candidate after the prompt, and the value. (The one
    entry point: qwix's LoRA intercepts the calls made inside ``__call__`` only.)

    Args:
      prompt: [N, P] int32 prompt ids, left-padded with -1.
      actions: [N, K, L] int32 candidate ids, right-padded with -1.
      full: return the next-token logits ``[N, K, L, V]`` instead (``action_logits``).

    Returns:
      ``(token_logp [N, K, L] float32, 0 at padding; value [N] float32)``.
    """
    pred, _, value = self.action_logits(prompt, actions)
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


def _lora(module: AgentLM, config: LMPolicyConfig, example: tuple, seed: int) -> AgentLM:
  import qwix  # noqa: PLC0415

  provider = qwix.LoraProvider(module_path=config.lora_modules, rank=config.lora_rank,
                               alpha=config.lora_alpha)
  return qwix.apply_lora_to_model(module, provider, *example, rngs=nnx.Rngs(seed + 1))


def _trainable_filter(config: LMPolicyConfig):
  return nnx.Param if config.full_finetune else nnx.Any(nnx.LoRAParam,
                                                        nnx.PathContains("value_head"))


class LMPolicyModel:
  """``AgentLM`` with LoRA as ``module(params, frozen)`` over pure pytrees.

  Args:
    llm_config: the decoder's shapes.
    config: the policy config.
    mesh: device mesh (parameters and the base are placed by their logical axes).
    seed: PRNG seed of the adapters and the value head.
    base: pure-dict ``Llama`` parameters (``nnx.to_pure_dict(nnx.state(llama, nnx.Param))``),
      or None for abstract-only use (the dry run).

  Attributes:
    shardings: pure-dict shardings of the trainable parameters.
    frozen: the frozen base parameters (pure dict; ``{}`` with full fine-tuning), or abstract.
  """

  def __init__(self, llm_config: llama_lib.LlamaConfig, config: LMPolicyConfig,
               mesh: jax.sharding.Mesh, *, seed: int = 0, base: dict | None = None,
               rules=parallel.DEFAULT_RULES):
    self.config = config
    self.llm_config = llm_config.replace(dtype=jnp.dtype(config.compute_dtype))
    self.mesh, self.rules, self.seed = mesh, rules, seed
    self._example = (jnp.zeros((1, 4), jnp.int32), jnp.zeros((1, 2, 3), jnp.int32))
    abstract = nnx.eval_shape(self._build)
    trainable = _trainable_filter(config)
    self.graphdef, t_state, f_state = nnx.split(abstract, trainable, ...)
    self._t_abstract, self._f_abstract = t_state, f_state
    self.shardings = training.state_shardings(t_state, mesh, rules)
    self.frozen_shardings = training.state_shardings(f_state, mesh, rules)
    f_pure = nnx.to_pure_dict(f_state)
    if base is None:
      self.frozen = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                                 f_pure, self.frozen_shardings)
    else:
      self.frozen = self._place_base(base, f_pure)

  def _build(self) -> AgentLM:
    with nnx.use_eager_sharding(False):
      module = AgentLM(self.llm_config, rngs=nnx.Rngs(self.seed),
                       prefix_attention=self.config.prefix_attention)
      return module if self.config.full_finetune else _lora(module, self.config, self._example,
                                                            self.seed)

  def _place_base(self, base: dict, abstract: dict) -> dict:
    """The loaded decoder weights as the frozen pytree (under ``backbone``), sharded; with full
    fine-tuning there is no frozen part and ``base`` seeds ``init`` instead."""
    self._base_init = base if self.config.full_finetune else None
    if self.config.full_finetune:
      return jax.tree.map(lambda x: x, abstract)  # empty or non-parameter state only
    want = abstract["backbone"]
    flat_w = dict(jax.tree_util.tree_flatten_with_path(want)[0])
    flat_b = dict(jax.tree_util.tree_flatten_with_path(base)[0])
    if set(flat_w) != set(flat_b):
      missing = sorted(map(str, set(flat_w) - set(flat_b)))[:3]
      raise ConfigError(f"agent decoder weights do not match its config (missing {missing})")
    for path, x in flat_w.items():
      if tuple(flat_b[path].shape) != tuple(x.shape):
        raise ConfigError(f"agent decoder weight {jax.tree_util.keystr(path)}: shape "
                          f"{tuple(flat_b[path].shape)}, expected {tuple(x.shape)}")
    sh = self.frozen_shardings["backbone"]
    placed = jax.tree.map(lambda x, w, s: jax.device_put(jnp.asarray(x, w.dtype), s),
                          base, want, sh)
    return dict(abstract, backbone=placed)

  def init(self) -> dict:
    """Fresh trainable parameters (adapters with B = 0, so the agent starts as the base, and the
    value head; or, with full fine-tuning, the loaded weights), created with their shardings."""
    def make():
      _, t_state, _ = nnx.split(self._build(), _trainable_filter(self.config), ...)
      return nnx.to_pure_dict(t_state)

    params = jax.jit(make, out_shardings=self.shardings)()
    if self.config.full_finetune and getattr(self, "_base_init", None) is not None:
      params = dict(params, backbone=jax.tree.map(
          lambda x, s: jax.device_put(jnp.asarray(x), s), self._base_init,
          self.shardings["backbone"]))
    return params

  def abstract_params(self) -> dict:
    pure = nnx.to_pure_dict(self._t_abstract)
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        pure, self.shardings)

  def module(self, params: dict, frozen: dict) -> AgentLM:
    """The module with ``params`` over the frozen base (usable inside ``jax.jit``)."""
    t = jax.tree.map(lambda x: x, self._t_abstract)
    nnx.replace_by_pure_dict(t, params)
    f = jax.tree.map(lambda x: x, self._f_abstract)
    nnx.replace_by_pure_dict(f, frozen)
    return nnx.merge(self.graphdef, t, f)

  def num_params(self) -> int:
    return int(sum(math.prod(x.shape) for x in jax.tree.leaves(nnx.to_pure_dict(self._t_abstract))))

  def num_frozen(self) -> int:
    return int(sum(math.prod(x.shape) for x in jax.tree.leaves(nnx.to_pure_dict(self._f_abstract))))


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


