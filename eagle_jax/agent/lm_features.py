"""Inputs of the language-model agent: its decoder, tokenizer and token arrays of states and actions.

``AgentDecoder`` is the agent's backbone as loaded from a GGUF (an asset name or a path: SmolLM2 on
CPU) or a Hugging Face safetensors folder (larger models), with its tokenizer; it is loaded once per
process per source (``load_decoder``; both live in ``models/decoder.py``, shared with E_D).

``LMFeaturizer`` has the interface of ``rollout.Featurizer`` so rollouts, reference labelling,
episodes and evaluation run unchanged, but its arrays are token ids instead of float features:

  state   [N, P] int32   the agent prompt (``prompts.agent_prompt``: profile, description, step)
                          rendered by the decoder's chat template, left-padded with ``PAD``;
                          longer prompts keep their last P tokens (the instruction survives)
  actions [N, K, L] int32 each candidate action string followed by the end-of-turn token,
                          right-padded with ``PAD``; longer actions are cut to L tokens
"""

from __future__ import annotations

import numpy as np

from eagle_jax import prompts
from eagle_jax.agent.lm_policy import PAD, LMPolicyConfig, host_tokens
from eagle_jax.agent.world import World
from eagle_jax.models.decoder import Decoder as AgentDecoder
from eagle_jax.models.decoder import load_decoder
from eagle_jax.models.tokenizer import Tokenizer

__all__ = ["AgentDecoder", "LMFeaturizer", "load_decoder"]


class LMFeaturizer:
  """Token arrays of states and candidate actions (see module docstring).

  Args:
    world: the run's world (anchors with their actions, profiles).
    horizon: H.
    tokenizer: the agent decoder's tokenizer.
    config: the LM policy config (P = ``prompt_tokens``, L = ``action_tokens``).

  Attributes:
    horizon, state_dim (P), action_dim (L).
  """

  def __init__(self, world: World, horizon: int, tokenizer: Tokenizer, config: LMPolicyConfig):
    self.world = world
    self.horizon = int(horizon)
    self.tokenizer = tokenizer
    self.state_dim, self.action_dim = int(config.prompt_tokens), int(config.action_tokens)
    self.end_id = int(tokenizer.eos_id)  # the chat end-of-turn token ends an action
    self._action_memo: dict[int, np.ndarray] = {}
    self.truncated_prompts = 0
    self.truncated_actions = 0

  def prompt_ids(self, profile: str, text: str, t: int) -> list[int]:
    return self.tokenizer.apply_chat_template(
        prompts.agent_prompt(text, profile, int(t), self.horizon), tokenize=True)

  def action_ids(self, action: str) -> list[int]:
    return self.tokenizer.encode(action.strip()) + [self.end_id]

  def state(self, users: np.ndarray, texts: list[str], t: np.ndarray | int) -> np.ndarray:
    """[N] users, [N] descriptions, step t ([N] or scalar) -> [N, P] int32."""
    users = np.asarray(users)
    steps = np.broadcast_to(np.asarray(t), (len(texts),))
    rows = [self.prompt_ids(self.world.profiles[int(u)], x, int(s))
            for u, x, s in zip(users, texts, steps)]
    self.truncated_prompts += sum(len(r) > self.state_dim for r in rows)
    return host_tokens(rows, self.state_dim, left=True)

  def actions(self, set_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """[N] action-set ids (``world.actions``) -> ([N, K, L] int32 ids, [N, K] bool mask); anchor
    sets are memoised."""
    out = []
    for j in np.asarray(set_ids):
      j = int(j)
      ids = self._action_memo.get(j)
      if ids is None:
        rows = [self.action_ids(a) for a in self.world.actions.texts(j)]
        self.truncated_actions += sum(len(r) > self.action_dim for r in rows)
        ids = host_tokens(rows, self.action_dim, left=False)
        if j < self.world.actions.num_anchor_sets:
          self._action_memo[j] = ids
      out.append(ids)
    ids = np.stack(out)
    return ids, ids[..., 0] != PAD
