"""The candidate action sets of a run's states: per anchor, or (``actions.per_state``) per state.

Every set holds the K action texts a state offers (``env.actions.action_space`` of its default
actions) and has an integer id; features and targets are keyed by set id (``Featurizer.actions``,
``reference.SetRows``), so one code path serves both modes:

* per anchor (the default): every state of an episode offers its anchor's set; set ids 0 .. n - 1
  are the anchors in item order, and ``ids`` never calls the LLM;
* per state (the paper's state-dependent set A(x), PAPER_SPEC.md 1.6): an anchor's own state offers
  the anchor's set; every other state gets its own set on first visit, written by the environment
  LLM on that state's text (``env.build.build_action_sets``, the same requests, personalisation to
  a profile drawn at random per state, near-duplicate removal and templates as an anchor's set),
  with the anchor movie's genres and tags for the templates. New sets are appended to a JSONL file
  (``<workdir>/env/state_actions.jsonl``, one per process on several processes) keyed by a hash of
  the state text, so a resumed run reads them back instead of asking again. Cost: ``llm_calls``
  requests per distinct non-anchor state visited before the horizon (a depth-H tree: K + ... +
  K^(H-1) new sets per anchor), each a prompt holding the whole state.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

import numpy as np

from eagle_jax import training
from eagle_jax.data import records
from eagle_jax.env import actions as actions_lib
from eagle_jax.env import build

# (state texts, their anchor items) -> one list of K action texts per state.
MakeSets = Callable[[Sequence[str], Sequence[int]], Awaitable[list[list[str]]]]


def state_key(text: str) -> str:
  """The key of a state's set in the JSONL file: a stable hash of its text."""
  return "state:" + hashlib.sha256(text.encode("utf-8")).hexdigest()[:24]


class ActionBook:
  """Set id <-> K action texts, for anchors and (``make`` given) for every other state.

  Args:
    anchor_sets: anchor item -> (its state text, its K action texts).
    k: K, every set's size.
    make: writes the sets of new states (per-state mode); None: every state offers its anchor's set.
    requests_per_set: LLM requests ``make`` sends per new state (progress bars).
  """

  def __init__(self, anchor_sets: Mapping[int, tuple[str, Sequence[str]]], k: int,
               make: MakeSets | None = None, requests_per_set: int = 0):
    self.k = int(k)
    self._make = make
    self.requests_per_set = int(requests_per_set) if make is not None else 0
    self._sets: list[list[str]] = []
    self._anchor_id: dict[int, int] = {}
    self._state_id: dict[str, int] = {}
    for item in sorted(anchor_sets):
      state, texts = anchor_sets[item]
      self._anchor_id[int(item)] = self._add(texts, f"anchor {item}")
      self._state_id.setdefault(state, self._anchor_id[int(item)])

  @classmethod
  def for_anchors(cls, anchors: Mapping[int, Any], k: int, make: MakeSets | None = None,
                  requests_per_set: int = 0) -> ActionBook:
    """The book of ``anchors`` (item -> an object with ``state`` and ``actions``, as
    ``world.Anchor``)."""
    return cls({i: (a.state, a.actions) for i, a in anchors.items()}, k, make, requests_per_set)

  @property
  def per_state(self) -> bool:
    return self._make is not None

  @property
  def num_anchor_sets(self) -> int:
    return len(self._anchor_id)

  def __len__(self) -> int:
    return len(self._sets)

  def _add(self, texts: Sequence[str], what: str) -> int:
    texts = list(texts)
    if len(texts) != self.k:
      raise ValueError(f"the action set of {what} has {len(texts)} actions, expected K = {self.k}")
    self._sets.append(texts)
    return len(self._sets) - 1

  def texts(self, set_id: int) -> list[str]:
    """The K action texts of set ``set_id``."""
    return self._sets[int(set_id)]

  def missing(self, states: Sequence[str]) -> int:
    """How many distinct ``states`` have no set yet (0 per anchor)."""
    if not self.per_state:
      return 0
    return sum(x not in self._state_id for x in dict.fromkeys(states))

  def known(self, states: Sequence[str], items: Sequence[int]) -> np.ndarray:
    """[N] set ids of states whose sets exist (per anchor: always). KeyError on a state without
    one (per state: ``await ids(...)`` first)."""
    if not self.per_state:
      return np.asarray([self._anchor_id[int(i)] for i in items], np.int64)
    return np.asarray([self._state_id[x] for x in states], np.int64)

  async def ids(self, states: Sequence[str], items: Sequence[int]) -> np.ndarray:
    """[N] set ids of ``states`` (each reached from anchor ``items[n]``), writing the sets of
    states met for the first time (per-state mode) in one batch of LLM requests."""
    if self.per_state:
      new = list(dict.fromkeys((x, int(i)) for x, i in zip(states, items)
                               if x not in self._state_id))
      if new:
        sets = await self._make([x for x, _ in new], [i for _, i in new])
        for (x, i), texts in zip(new, sets):
          if x not in self._state_id:  # a concurrent call may have written it (the same set:
            # a state's requests are seeded by its text)
            self._state_id[x] = self._add(texts, f"a state of anchor {i}")
    return self.known(states, items)

  def stats(self) -> dict[str, int]:
    """Sets held: anchors' and states'."""
    return {"per_state": int(self.per_state), "anchor_sets": self.num_anchor_sets,
            "state_sets": len(self._sets) - self.num_anchor_sets}


def space(cfg, record: Mapping[str, Any], what: str) -> tuple[list[str], list[str]]:
  """A state's K action texts in ``cfg.space`` and each one's source, from its action-set record
  (``build.build_action_sets``: default actions, keyed by ``movie_id``).

  Args:
    cfg: the ``config.actions`` block.
    record: the action-set record.
    what: the state, for the error.

  Raises:
    ConfigError: fewer distinct default actions than K (naming ``config.actions.k``).
  """
  k, acts = int(cfg.k), record["actions"]
  if len(acts) != k:
    raise training.ConfigError(
        f"config.actions.k={k}: only {len(acts)} distinct actions for {what}; lower k or raise "
        "actions.llm_calls")
  pairs = actions_lib.action_space(
      [a["text"] for a in acts], cfg.get("space", "default"), k=k,
      macro_size=int(cfg.get("macro_size", 3)), macro_k=int(cfg.get("macro_k", 0)),
      seed=records.derive_seed(int(cfg.seed), "macro", record["movie_id"]))
  sources = [f"{acts[p[0]]['source']}:{acts[p[0]]['category']}" if len(p) == 1 else
             "macro:" + ",".join(map(str, p)) for _, p in pairs]
  return [t for t, _ in pairs], sources


def state_set_maker(cfg, client, encode: Callable[[Sequence[str]], np.ndarray],
                    descriptions: Sequence[Mapping[str, Any]],
                    profiles: Sequence[Mapping[str, Any]], out_path: str) -> MakeSets:
  """The per-state ``make`` of an ``ActionBook``: a state's set is an anchor's set written on the
  state's text (module docstring), its record appended to ``out_path`` and read back from it by a
  resumed run (read once, here).

  Args:
    cfg: the ``config.actions`` block.
    client: the environment LLM's ``SamplingClient``.
    encode: texts -> [n, e] sentence embeddings (near-duplicate removal).
    descriptions: the anchors' description records (genres and tags by ``item_index``).
    profiles: the profile records (the personalised half's random profile).
    out_path: the JSONL file of the state sets.
  """
  by_item = {int(d["item_index"]): d for d in descriptions}
  done = {r["movie_id"]: r for r in records.read_jsonl(out_path, key="movie_id")}

  async def make(states: Sequence[str], items: Sequence[int]) -> list[list[str]]:
    keys = [state_key(x) for x in states]
    todo = [{"movie_id": key, "item_index": int(i), "ok": True, "text": x,
             "genres": by_item[int(i)]["genres"], "tags": by_item[int(i)]["tags"]}
            for key, x, i in zip(keys, states, items) if key not in done]
    if todo:
      new = await build.build_action_sets(client, encode, todo, profiles, cfg)
      records.append_jsonl(out_path, new)
      done.update((r["movie_id"], r) for r in new)
    return [space(cfg, done[key], f"a state of {by_item[int(i)]['title']!r}")[0]
            for key, i in zip(keys, items)]

  return make


def from_config(cfg, anchors: Mapping[int, Any], client,
                encode: Callable[[Sequence[str]], np.ndarray], data, out_path: str) -> ActionBook:
  """The run's book: the anchors' sets and, with ``cfg.per_state``, every state's.

  Args:
    cfg: the ``config.actions`` block.
    anchors: item -> ``world.Anchor`` (its state and K action texts).
    client, encode: as ``state_set_maker``'s.
    data: the environment data (``build.EnvData``: descriptions and profiles).
    out_path: the state sets' JSONL file (``state_sets_path``).
  """
  make = None
  if cfg.get("per_state", False):
    make = state_set_maker(cfg, client, encode, data.descriptions, data.profiles, out_path)
  return ActionBook.for_anchors(anchors, int(cfg.k), make, int(cfg.llm_calls))


def state_sets_path(workdir: str, process_index: int, process_count: int) -> str:
  """``<workdir>/env/state_actions.jsonl``, or ``state_actions.<index>.jsonl`` on several processes
  (no concurrent appends to one file; each process writes the sets its own rows meet)."""
  name = ("state_actions.jsonl" if process_count <= 1
          else f"state_actions.{process_index}.jsonl")
  return os.path.join(workdir, "env", name)
