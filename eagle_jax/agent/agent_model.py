"""The agent's network behind one interface: the pooled head (``policy.kind="head"``) or a language
model (``lm_choice``), so the trainer, the checkpoints and the evaluation do not branch on it.

Both give, for states and their K candidates (the featurizer's arrays, ``[..., S]`` and
``[..., K, A]`` for the head, token ids ``[..., P]`` and ``[..., K, L]`` for the language model):

* ``scores(params, frozen, state, actions) -> (logits [..., K], value [...])``, the policy's
  candidate scores (``pi = softmax``) and the value baseline;
* ``rl_terms(params, frozen, ref_params, batch, rl) -> losses.LossTerms``: the EAGLE loss of a
  batch of episodes (exact KL over the candidates; for ``lm_generate``, whose episodes hold the
  written action as the one candidate, the per-token KL over the vocabulary);
* ``policy_fn(params)``: what ``rollout.collect`` calls (a ``PolicyFn``, or a ``WriterFn`` when
  ``writes``: the decoder with the adapters folded in samples the action);
* ``reference_loss(params, frozen, batch) -> (loss, metrics)``: the head's cross-entropy between
  the targets q and pi_ref over the candidates, or the language model's next-token cross-entropy on
  the target action strings (``lm_policy.sequence_cross_entropy``);
* ``init()`` / ``abstract_params()`` / ``shardings`` of the trainable parameters, and ``frozen``:
  ``{}`` for the head, the shared frozen decoder base for LoRA;
* ``featurizer(world)`` and ``input_shapes(...)`` for the AOT dry run.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from eagle_jax import training
from eagle_jax.agent import lm_policy, losses, rollout
from eagle_jax.agent.policy import PolicyConfig, PolicyValueNet
from eagle_jax.models import configs as model_configs

POLICY_KINDS = ("head",) + lm_policy.KINDS


@dataclasses.dataclass(frozen=True)
class AgentSpec:
  """What the job says about the agent's network (``config.policy``).

  Attributes:
    kind: one of ``POLICY_KINDS``.
    hidden: width of the pooled head (``head``).
    lm: the language-model policy config (``lm_*`` kinds).
    decoder: the agent decoder's source: a GGUF asset name / path, a safetensors folder, or
      ``""`` for the environment LLM's own GGUF (``config.llm.gguf``).
    chat_template: override of the decoder's chat template (``""``: the file's).
    shapes: a ``models.configs.PRESETS`` name giving the decoder's shapes to the dry run (``""``:
      the dry run reads ``config.json`` of the safetensors folder ``decoder``).
  """

  kind: str
  hidden: int
  lm: lm_policy.LMPolicyConfig | None = None
  decoder: str = ""
  chat_template: str = ""
  shapes: str = ""


def check_policy(config) -> AgentSpec:
  """Reads ``config.policy`` (``kind``; ``hidden`` or the ``lm`` block) and checks it."""
  kind = str(config.policy.get("kind", "head"))
  if kind not in POLICY_KINDS:
    raise training.ConfigError(f"config.policy.kind={kind!r}: expected one of {POLICY_KINDS}")
  if kind == "head":
    return AgentSpec(kind, int(config.policy.hidden))
  block = config.policy.get("lm")
  if block is None:
    raise training.ConfigError("config.policy.lm: the language-model policy block is missing")
  lm = lm_policy.LMPolicyConfig.from_config(dict(block, kind=kind), "config.policy.lm")
  decoder = str(block.get("decoder", "")) or str(config.llm.get("gguf", ""))
  shapes = str(block.get("shapes", ""))
  if shapes and shapes not in model_configs.PRESETS:
    raise training.ConfigError(f"config.policy.lm.shapes={shapes!r}: expected one of "
                               f"{sorted(model_configs.PRESETS)} or ''")
  return AgentSpec(kind, int(config.policy.hidden), lm, decoder,
                   str(block.get("chat_template", "")), shapes)


def choice_terms(model, params, frozen, ref_params, batch, rl) -> losses.LossTerms:
  """``losses.eagle_loss`` over the K candidates' scores."""
  logits, values = model.scores(params, frozen, batch["state"], batch["action_feats"])
  ref_logits, _ = model.scores(ref_params, frozen, batch["state"], batch["action_feats"])
  return losses.eagle_loss(
      logits=logits, ref_logits=ref_logits, candidate_mask=batch["mask"],
      actions=batch["actions"], values=values, reward=batch["reward"],
      gamma=rl.gamma, gae_lambda=rl.gae_lambda, kl_coef=rl.kl_coef, value_coef=rl.value_coef,
      entropy_coef=rl.entropy_coef, behaviour_logp=batch["behaviour_logp"] if rl.overlap else None)


class HeadAgent:
  """``PolicyValueNet`` over frozen text features (``policy.py``)."""

  writes = False

  def __init__(self, spec: AgentSpec, state_dim: int, action_dim: int, mesh, seed: int):
    self.state_dim, self.action_dim = int(state_dim), int(action_dim)
    pcfg = PolicyConfig(self.state_dim, self.action_dim, spec.hidden)
    self._model = training.FunctionalModel(lambda rngs: PolicyValueNet(pcfg, rngs=rngs),
                                           seed=seed, mesh=mesh)
    self.shardings = self._model.shardings
    self.frozen: dict = {}
    self.init, self.abstract_params = self._model.init, self._model.abstract_params
    self.num_params = self._model.num_params

  def scores(self, params, frozen, state, actions):
    return self._model.module(params)(state, actions)

  def rl_terms(self, params, frozen, ref_params, batch, rl) -> losses.LossTerms:
    return choice_terms(self, params, frozen, ref_params, batch, rl)

  def reference_loss(self, params, frozen, batch) -> tuple[jax.Array, dict]:
    logits, _ = self.scores(params, frozen, batch["state"], batch["action_feats"])
    loss = losses.reference_cross_entropy(logits, batch["targets"], batch["mask"])
    return loss, {"loss": loss, "target_agreement": _agreement(logits, batch)}

  def input_shapes(self, lead: tuple[int, ...], k: int) -> dict[str, Any]:
    return {"state": (lead + (self.state_dim,), jnp.float32),
            "action_feats": (lead + (k, self.action_dim), jnp.float32)}


class LMAgent:
  """``lm_policy.AgentLM`` (LoRA or fully fine-tuned) over token ids."""

  def __init__(self, spec: AgentSpec, decoder, mesh, seed: int):
    self.spec = spec
    self.lm = spec.lm
    self.decoder = decoder
    self._model = lm_policy.LMPolicyModel(decoder.config, spec.lm, mesh, seed=seed,
                                          base=decoder.params)
    self.shardings, self.frozen = self._model.shardings, self._model.frozen
    self.init, self.abstract_params = self._model.init, self._model.abstract_params
    self.num_params = self._model.num_params
    self.state_dim, self.action_dim = spec.lm.prompt_tokens, spec.lm.action_tokens
    self.writes = spec.kind == "lm_generate"
    self.act_batch = spec.lm.act_batch
    self.mesh = mesh
    self._sampler = None
    self._llama_split = None

  def token_logp(self, params, frozen, state, actions):
    """state [..., P], actions [..., K, L] -> (token log-probs [..., K, L], value [...])."""
    lead = state.shape[:-1]
    flat_s = state.reshape((-1, state.shape[-1]))
    flat_a = actions.reshape((-1,) + actions.shape[-2:])
    logp, value = self._model.apply(params, frozen, flat_s, flat_a)
    return logp.reshape(lead + logp.shape[-2:]), value.reshape(lead)

  def scores(self, params, frozen, state, actions):
    logp, value = self.token_logp(params, frozen, state, actions)
    return lm_policy.action_scores(logp, actions, self.lm.score), value

  def rl_terms(self, params, frozen, ref_params, batch, rl) -> losses.LossTerms:
    if not self.writes:
      return choice_terms(self, params, frozen, ref_params, batch, rl)
    state, acts = batch["state"], batch["action_feats"]  # [B, H, P], [B, H, 1, L]
    b, h = state.shape[:2]
    flat_s, flat_a = state.reshape(b * h, -1), acts.reshape(b * h, 1, -1)
    logits, values = self._model.apply(params, frozen, flat_s, flat_a, full=True)
    ref_logits, _ = self._model.apply(ref_params, frozen, flat_s, flat_a, full=True)
    ref_logits = jax.lax.stop_gradient(ref_logits)
    tokens = flat_a[:, 0]
    logp = jax.nn.log_softmax(logits[:, 0], -1)
    entropy = -jnp.sum(jnp.where((tokens != lm_policy.PAD)[..., None], jnp.exp(logp) * logp, 0.0),
                       (-2, -1))
    return losses.policy_loss(
        logp_taken=jnp.sum(lm_policy.token_log_probs(logits[:, 0], tokens), -1).reshape(b, h),
        kl=lm_policy.token_kl(logits[:, 0], ref_logits[:, 0], tokens).reshape(b, h),
        entropy=entropy.reshape(b, h), values=values.reshape(b, h), reward=batch["reward"],
        gamma=rl.gamma, gae_lambda=rl.gae_lambda, kl_coef=rl.kl_coef, value_coef=rl.value_coef,
        entropy_coef=rl.entropy_coef,
        behaviour_logp=batch["behaviour_logp"] if rl.overlap else None)

  def writer(self, params):
    """A ``rollout.WriterFn`` of ``params``: the decoder with the adapters folded in
    (``lm_policy.merged_backbone``) writes the action (``lm.temperature``; greedy on request),
    at most L tokens; log pi of a written action is the sum of its tokens' model log-probs."""
    import numpy as np  # noqa: PLC0415

    from eagle_jax.models import sampling  # noqa: PLC0415
    from eagle_jax.models.sampling_params import SamplingParams  # noqa: PLC0415

    llama = self._llama(lm_policy.merged_backbone(self._model, params, self.frozen))
    if self._sampler is None:
      self._sampler = sampling.Sampler(llama, self.decoder.tokenizer, mesh=self.mesh)
    else:
      self._sampler.set_model(llama)
    sampler, width = self._sampler, self.action_dim

    def write(state: np.ndarray, key: jax.Array, greedy: bool):
      prompts = [row[row != lm_policy.PAD].tolist() for row in np.asarray(state)]
      seeds = np.asarray(jax.random.randint(key, (len(prompts),), 0, 2**31 - 1)).tolist()
      temp = 0.0 if greedy else self.lm.temperature
      out = sampler.generate_ids(prompts, SamplingParams(max_tokens=width, temperature=temp),
                                 seeds=seeds)
      ids = np.where(out.mask, out.tokens, lm_policy.PAD).astype(np.int32)
      ids = np.pad(ids, ((0, 0), (0, max(0, width - ids.shape[1]))), constant_values=-1)[:, :width]
      return ids, out.total_logprob.astype(np.float32), [t.strip() for t in out.texts]

    return write

  def _llama(self, backbone: dict):
    from flax import nnx  # noqa: PLC0415

    from eagle_jax.models import llama as llama_lib  # noqa: PLC0415

    if self._llama_split is None:  # the decoder's structure, built once per agent
      cfg = self._model.llm_config
      self._llama_split = nnx.split(nnx.eval_shape(lambda: llama_lib.Llama(cfg,
                                                                           rngs=nnx.Rngs(0))))
    graphdef, abstract = self._llama_split
    state = jax.tree.map(lambda x: x, abstract)
    nnx.replace_by_pure_dict(state, backbone)
    return nnx.merge(graphdef, state)

  def reference_loss(self, params, frozen, batch) -> tuple[jax.Array, dict]:
    acts = batch["action_feats"]
    logp, _ = self.token_logp(params, frozen, batch["state"], acts)
    loss = lm_policy.sequence_cross_entropy(logp, acts, batch["targets"])
    logits = lm_policy.action_scores(logp, acts, self.lm.score)
    return loss, {"loss": loss, "target_agreement": _agreement(logits, batch)}

  def input_shapes(self, lead: tuple[int, ...], k: int) -> dict[str, Any]:
    return {"state": (lead + (self.state_dim,), jnp.int32),
            "action_feats": (lead + (k, self.action_dim), jnp.int32)}


def _agreement(logits, batch) -> jax.Array:
  logp = losses.masked_log_softmax(logits, batch["mask"])
  return jnp.mean(jnp.take_along_axis(batch["targets"], jnp.argmax(logp, -1)[:, None], -1) > 0)


def build(spec: AgentSpec, *, state_dim: int = 0, action_dim: int = 0, mesh, seed: int,
          decoder=None):
  """The agent network of ``spec`` (``decoder``: an ``lm_features.AgentDecoder`` for LM kinds,
  with ``params=None`` for abstract shapes)."""
  if spec.kind == "head":
    return HeadAgent(spec, state_dim, action_dim, mesh, seed)
  return LMAgent(spec, decoder, mesh, seed)


def featurizer(spec: AgentSpec, world, horizon: int):
  """The featurizer the agent of ``spec`` reads ``world`` through."""
  if spec.kind == "head":
    return rollout.Featurizer(world, horizon)
  from eagle_jax.agent import lm_features  # noqa: PLC0415

  dec = lm_features.load_decoder(spec.decoder, spec.chat_template)
  return lm_features.LMFeaturizer(world, horizon, dec.tokenizer, spec.lm)
