"""The EAGLE environment seen by the agent: LLM transitions and the content-gap utility.

A state is a description of a possibly hypothetical movie together with the user it is written for:
either its plot text (``reasons=False``) or, as in the paper, a rendered ``prompts.Description``
(plot, reasons to like it, reasons to dislike it; ``reasons=True``). An action is a textual change
("Turn it into a horror film"). ``step`` asks the frozen
environment LLM to rewrite each description with its action (``prompts.transition_prompt``), all
requests of a call in flight together (at most ``max_in_flight`` at once, ``env.inflight``) through
the async sampling client, so a batching backend (the local sampler, our HTTP server, vLLM) runs
them as one batch. Every answer goes through the client's
response cache: transitions are greedy with a fixed seed, hence a deterministic function of
(description, action), and a rerun or a resumed run replays them from disk.

``embed`` is E_D (memoised per text): MiniLM, fine-tuned or frozen, through its regression head onto
the behavioural latent space Z; ``utility`` is ``eagle_jax.utility.content_gap_utility``.

Choices where the paper is silent (or where a small environment LLM cannot do what it does): an
answer that does not parse as a plot (too short) leaves the state unchanged (counted in
``parse_failures``), rather than ending the episode. With reasons, the environment sees the whole
description but rewrites the plot only; the next state keeps the parent's reasons (the paper's
environment LLM rewrites the whole description in one answer, which a 135M model cannot do: it does
not write lists, DESIGN.md). The reasons are then context that every child of a state shares, which
is also what makes the K transition prompts of a state share most of their tokens.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from eagle_jax import prompts
from eagle_jax import utility as utility_lib
from eagle_jax.agent.features import TextFeatures
from eagle_jax.checks import check_finite
from eagle_jax.env import client as client_lib
from eagle_jax.env import inflight


@functools.partial(jax.jit, static_argnames=("k", "lam"))
def _utility(z, z_user, items, lam, *, k):
  u = utility_lib.content_gap_utility(z, z_user, items, lam=lam, k=k)
  _, dist = utility_lib.nearest_items(z, items, k=k)
  return u, jnp.sum(z * z_user, -1), dist


class ContentGapEnv:
  """Transitions through an LLM client, E_D embeddings and the utility.

  Args:
    client: a ``SamplingBackend`` (normally a ``CachedClient``).
    params: sampling parameters of every transition (greedy by default in the configs).
    ed: E_D, ``texts -> [N, d]`` points of Z (``encoder_train.load_encoder``).
    item_table: [I, d] existing items in Z (augmented WALS item vectors).
    user_table: [U, d] users in Z (augmented WALS user vectors).
    lam: novelty weight of the utility.
    k: nearest existing items of the novelty term.
    max_sentences: sentences kept of a rewritten plot.
    reasons: states are rendered descriptions with reasons (see the module docstring).
    max_in_flight: most transition requests outstanding at once (0: a call's all at once).
    memo_size: most texts whose E_D output is remembered (LRU; 0: all).
  """

  def __init__(self, client, params: client_lib.SamplingParams,
               ed: Callable[[Sequence[str]], np.ndarray], item_table: np.ndarray,
               user_table: np.ndarray, *, lam: float, k: int = 3, max_sentences: int = 3,
               reasons: bool = False, max_in_flight: int = 0, memo_size: int = 0):
    self.reasons = bool(reasons)
    self.client = client
    self.params = params
    self.item_table = jnp.asarray(check_finite(item_table, "item table Z"), jnp.float32)
    # E_D of each distinct text, computed once while it stays in the LRU memo.
    self._z = TextFeatures(ed, self.item_table.shape[1], name="E_D output",
                           max_entries=memo_size)
    self.max_in_flight = int(max_in_flight)
    self.user_table = check_finite(user_table, "user table Z").astype(np.float32)
    self.lam = float(lam)
    self.k = int(k)
    self.max_sentences = int(max_sentences)
    self.steps = 0
    self.parse_failures = 0

  def with_client(self, client) -> ContentGapEnv:
    """This environment (transition sampling, state format, E_D and its memo, utility) answered by
    another LLM client, with fresh step counters (environment transfer)."""
    out = copy.copy(self)
    out.client, out.steps, out.parse_failures = client, 0, 0
    return out

  @property
  def dim(self) -> int:
    return int(self.item_table.shape[1])

  async def step(self, descriptions: Sequence[str], actions: Sequence[str]) -> list[str]:
    """Next descriptions: [N] descriptions x [N] actions -> [N] rewritten descriptions."""
    if len(descriptions) != len(actions):
      raise ValueError(f"{len(descriptions)} descriptions but {len(actions)} actions")
    if not descriptions:
      return []
    if self.reasons:
      parsed = [prompts.Description.parse(d) for d in descriptions]
      msgs = [prompts.transition_prompt(d, a) for d, a in zip(descriptions, actions)]
    else:
      msgs = [prompts.transition_prompt(f"Plot: {d}", a) for d, a in zip(descriptions, actions)]
    answers = await inflight.generate_bounded(self.client, msgs, [self.params] * len(msgs),
                                              self.max_in_flight)
    out = []
    for i, (d, c) in enumerate(zip(descriptions, answers)):
      try:
        plot = prompts.clean_paragraph(c.text, max_sentences=self.max_sentences)
      except prompts.ParseError:
        self.parse_failures += 1
        out.append(d)
        continue
      out.append(dataclasses.replace(parsed[i], plot=plot).render() if self.reasons else plot)
    self.steps += len(out)
    return out

  def embed(self, texts: Sequence[str]) -> np.ndarray:
    """E_D: [N] texts -> [N, d]."""
    return self._z(texts)

  def utility(self, z: np.ndarray, users: np.ndarray) -> dict[str, np.ndarray]:
    """U for each (z, user): z [..., d], users [...] int -> dict of [...] arrays.

    Returns ``utility``, ``preference`` (<z_user, z>) and ``distance`` (sum of the k nearest
    existing items' distances; ``utility = preference + lam * distance``).
    """
    z = jnp.asarray(z, jnp.float32)
    zu = jnp.asarray(self.user_table[np.asarray(users)])
    u, pref, dist = _utility(z, zu, self.item_table, lam=self.lam, k=self.k)
    check_finite(u, "utility U(z) (check the E_D outputs and the WALS tables)")
    return {"utility": np.asarray(u), "preference": np.asarray(pref),
            "distance": np.asarray(jnp.sum(dist, -1))}

  def text_utility(self, texts: Sequence[str], users: np.ndarray) -> dict[str, np.ndarray]:
    """``utility(embed(texts), users)`` for [N] texts and [N] users."""
    return self.utility(self.embed(texts), np.asarray(users))
