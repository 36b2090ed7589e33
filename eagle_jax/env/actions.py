"""Candidate actions per state: LLM-written (generic and personalised) plus template macro actions.

The paper generates K = 100 actions per movie with Gemini Ultra: 50 generic and 50 personalised to a
random user profile, spread over five categories (PAPER_SPEC.md, section 1.6). A 135M environment
model writes one usable action per call at best, and often repeats itself (DESIGN.md), so
``build_action_set``:

1. asks for one action per call, cycling through the five categories, half with a user profile,
   each call with its own seed;
2. parses each answer (``prompts.clean_sentence``), drops failures (counted in the provenance);
3. removes near-duplicates among them by cosine similarity of their sentence embeddings
   (``dedupe``);
4. tops up to K from a template grammar (``template_actions``), drawing round-robin over the five
   categories (and, when the viewer's liked genres are given, alternating personalised and generic
   templates, so about half the set is personalised) and skipping any template that duplicates an
   action already in the set (same text, or cosine similarity >= the threshold).

The template grammar lives in ``action_templates.py``.

The set is a pure function of the arguments: ``np.random.default_rng(seed)`` shuffles each
(personalised, category) queue of templates. Each action records where it came from
(``llm``/``template``), its category and whether it was personalised, so ablations (e.g. the
paper's "no personalised actions") can filter them.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable, Sequence

import numpy as np

from eagle_jax import prompts
from eagle_jax.env import client as client_lib
from eagle_jax.env.action_templates import Action, template_actions
from eagle_jax.env.client import SamplingParams

# Texts per extra ``encode`` call of ``_assemble`` (after near-duplicates exhaust the first call).
_ENCODE_CHUNK = 32



def dedupe(texts: Sequence[str], embeddings: np.ndarray, threshold: float = 0.9) -> list[int]:
  """Indices of a greedy subset with pairwise cosine similarity below ``threshold``.

  Args:
    texts: [K] texts (exact duplicates, case-insensitive, are always removed).
    embeddings: [K, e] sentence embeddings (any scale).
    threshold: maximum cosine similarity allowed between kept items.

  Returns:
    Kept indices, in input order.
  """
  if len(texts) != embeddings.shape[0]:
    raise ValueError(f"{len(texts)} texts but {embeddings.shape[0]} embeddings")
  unit = embeddings / np.maximum(np.linalg.norm(embeddings, axis=-1, keepdims=True), 1e-12)
  kept: list[int] = []
  seen: set[str] = set()
  for i, text in enumerate(texts):
    key = " ".join(text.lower().split())
    if key in seen:
      continue
    if kept and float(np.max(unit[kept] @ unit[i])) >= threshold:
      continue
    seen.add(key)
    kept.append(i)
  return kept


@dataclasses.dataclass(frozen=True)
class ActionRequest:
  """One LLM request for a candidate action: its category, personalisation, seed and prompt."""

  category: str
  personalised: bool
  seed: int
  messages: list[prompts.Message]


def action_requests(
    description: str, profile: str | None, llm_calls: int, seed: int
) -> list[ActionRequest]:
  """The requests ``build_action_set`` sends: categories in turn, every second one personalised
  (when ``profile`` is given), request ``i`` with seed ``seed + i``."""
  out = []
  for i in range(llm_calls):
    category = prompts.ACTION_CATEGORIES[i % len(prompts.ACTION_CATEGORIES)]
    personal = profile is not None and i % 2 == 1
    out.append(ActionRequest(category, personal, seed + i, prompts.action_prompt(
        description, category, profile if personal else None)))
  return out


@dataclasses.dataclass
class ActionStats:
  """Provenance counts of one ``build_action_set`` call."""

  requested: int = 0
  parse_failures: int = 0
  duplicates: int = 0
  templates_used: int = 0
  failures: list[str] = dataclasses.field(default_factory=list)


def _unit(x: np.ndarray) -> np.ndarray:
  x = np.asarray(x, np.float64)
  return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def _key(text: str) -> str:
  return " ".join(text.lower().split())


def _balanced_pick(queues: dict[tuple[bool, str], list], chosen: Sequence[Action],
                   want_personal: bool) -> tuple[bool, str] | None:
  """The queue to draw the next template from: the personalised half while it is below half of the
  set (when ``want_personal``), then the category with the fewest actions so far (ties: category
  order), among non-empty queues; None when all are empty."""
  n_personal = sum(a.personalised for a in chosen)
  halves = [False]
  if want_personal:
    halves = [True, False] if 2 * n_personal <= len(chosen) else [False, True]
  counts = {c: 0 for c in prompts.ACTION_CATEGORIES}
  for a in chosen:
    counts[a.category] = counts.get(a.category, 0) + 1
  for personal in halves:
    open_ = [c for c in prompts.ACTION_CATEGORIES if queues.get((personal, c))]
    if open_:
      return personal, min(open_, key=lambda c: counts[c])
  return None


def _assemble(
    llm: Sequence[Action],
    templates: Sequence[Action],
    encode: Callable[[Sequence[str]], np.ndarray],
    *,
    k: int,
    rng: np.random.Generator,
    threshold: float,
) -> tuple[list[Action], int]:
  """The action set: LLM-written actions first, then templates, without near-duplicates.

  An action is kept unless an identical text (case-insensitive) or one with cosine similarity
  >= ``threshold`` is already in the set. LLM actions are taken in order (at most ``k``). Each
  (personalised, category) queue of templates is shuffled by ``rng``, then templates are drawn one
  at a time from the queue ``_balanced_pick`` names (round-robin over the five categories,
  alternating personalised and generic when there are personalised templates) until the set has
  ``k`` actions or the queues run out.

  ``encode`` is called once on the LLM actions and the templates expected to be drawn (plus a
  margin), and again, on ``_ENCODE_CHUNK`` more at a time, only if near-duplicates exhaust them;
  a large template pool thus costs little more than the templates kept.

  Returns:
    ``(actions, llm_duplicates)``: the set, and how many LLM actions were near-duplicates.
  """
  queues: dict[tuple[bool, str], list[int]] = {}
  for i, a in enumerate(templates):
    queues.setdefault((a.personalised, a.category), []).append(i)
  for key, q in queues.items():  # insertion order is fixed by template_actions
    queues[key] = [q[j] for j in rng.permutation(len(q))]
  want_personal = any(p for p, _ in queues)
  # Expected drawing order if nothing were rejected: the order in which templates are encoded.
  plan, sim_chosen, sim_queues = [], list(llm[:k]), {q: list(v) for q, v in queues.items()}
  while len(sim_chosen) < k and (q := _balanced_pick(sim_queues, sim_chosen, want_personal)):
    plan.append(sim_queues[q].pop(0))
    sim_chosen.append(templates[plan[-1]])
  planned = set(plan)
  plan += [i for q in queues.values() for i in q if i not in planned]
  n = len(llm)
  texts = [a.text for a in llm] + [a.text for a in templates]  # llm i -> i, template i -> n + i
  unit: dict[int, np.ndarray] = {}

  def encode_rows(rows: list[int]) -> None:
    if rows:
      unit.update(zip(rows, _unit(encode([texts[r] for r in rows]))))

  need = max(0, k - min(k, n))
  encode_rows(list(range(n)) + [n + i for i in plan[: need + need // 4 + 8]])
  plan_pos = 0

  def embedding(row: int) -> np.ndarray:
    nonlocal plan_pos
    if row not in unit:
      while plan_pos < len(plan) and n + plan[plan_pos] in unit:
        plan_pos += 1
      rest = [n + i for i in plan[plan_pos:] if n + i != row and n + i not in unit]
      encode_rows([row] + rest[: _ENCODE_CHUNK - 1])
    return unit[row]

  llm_keep = dedupe(texts[:n], np.stack([unit[i] for i in range(n)]), threshold) if n else []
  out = [llm[i] for i in llm_keep[:k]]
  kept = [unit[i] for i in llm_keep[:k]]
  keys = {_key(a.text) for a in out}
  while len(out) < k and (q := _balanced_pick(queues, out, want_personal)):
    i = queues[q].pop(0)
    if _key(templates[i].text) in keys:
      continue
    e = embedding(n + i)
    if kept and float(np.max(np.stack(kept) @ e)) >= threshold:
      continue
    kept.append(e)
    keys.add(_key(templates[i].text))
    out.append(templates[i])
  return out, n - len(llm_keep)


async def build_action_set(
    *,
    client,
    encode: Callable[[Sequence[str]], np.ndarray],
    description: str,
    genres: Sequence[str],
    tags: Sequence[str],
    profile: str | None,
    k: int,
    llm_calls: int,
    seed: int,
    params: SamplingParams,
    dedupe_threshold: float = 0.9,
    liked_genres: Sequence[str] = (),
) -> tuple[list[Action], ActionStats]:
  """K candidate actions for one state (see module docstring).

  A pure function of its arguments (and the client's answers): ``seed`` seeds the requests and the
  shuffling of the templates.

  Args:
    client: a ``SamplingClient`` (one chat-message prompt per ``sample`` call).
    encode: texts -> [n, e] sentence embeddings, for near-duplicate removal.
    description: the rendered state description.
    genres, tags: the anchor movie's MovieLens metadata (for templates).
    profile: a user profile for personalised actions (None: generic only).
    k: number of actions to return.
    llm_calls: LLM requests (half personalised when ``profile`` is given); 0 uses templates only.
    seed: base seed; request i uses ``seed + i``; ``np.random.default_rng(seed)`` shuffles the
      templates.
    params: sampling of the action requests (its ``seed`` is replaced per request).
    liked_genres: the viewer's favourite genres; when given, about half of the set is personalised
      templates built on them (empty: generic templates only).

  Returns:
    ``(actions, stats)`` with exactly ``k`` actions when enough distinct ones exist (for every
    MovieLens genre set at k = 100 with templates alone).
  """
  if k <= 0 or llm_calls < 0:
    raise ValueError(f"k must be > 0 and llm_calls >= 0, got k={k}, llm_calls={llm_calls}")
  stats = ActionStats(requested=llm_calls)
  requests = action_requests(description, profile, llm_calls, seed)
  meta = [(r.category, r.personalised, r.seed) for r in requests]
  messages = [r.messages for r in requests]
  answers = await asyncio.gather(*[
      client_lib.sample_one(client, msg, params.replace(seed=s))
      for (_, _, s), msg in zip(meta, messages)])
  candidates: list[Action] = []
  for (category, personal, s), answer in zip(meta, answers):
    try:
      text = prompts.clean_sentence(answer, min_words=4, max_words=30)
    except prompts.ParseError as e:
      stats.parse_failures += 1
      stats.failures.append(str(e))
      continue
    candidates.append(Action(text, category, personal, "llm", s))
  acts, stats.duplicates = _assemble(
      candidates, template_actions(genres, tags, liked_genres), encode, k=k,
      rng=np.random.default_rng(seed), threshold=dedupe_threshold)
  stats.templates_used = sum(a.source == "template" for a in acts)
  return acts, stats


# ---------------------------------------------------------------------------------------------------
# Action spaces of the paper's Table 4.

ACTION_SPACES = ("default", "macro", "combined")


def macro_text(parts: Sequence[str]) -> str:
  """One macro action, a tuple of actions the environment applies in one step, as one action text
  (the transition prompt then asks for all of them at once)."""
  return "Make these changes together: " + " ".join(
      f"({i + 1}) {p.strip().rstrip('.')}." for i, p in enumerate(parts))


def action_space(actions: Sequence[str], space: str, *, k: int, macro_size: int, macro_k: int,
                 seed: int) -> list[tuple[str, tuple[int, ...]]]:
  """The K action texts of a state in action space ``space``, each with the indices (into
  ``actions``, the state's default set) of the actions it is made of.

  * ``"default"``: the first K default actions, one each;
  * ``"macro"``: K macro actions (the paper's section 6), each an ordered tuple of ``macro_size``
    distinct default actions drawn uniformly without repetition of a tuple;
  * ``"combined"``: the first ``K - macro_k`` default actions and ``macro_k`` macro actions. The
    set keeps K entries (the paper adds the macro actions to the default ones; here K stays the
    policy's width, so every row of Table 4 scores the same number of candidates).

  A pure function of its arguments (``np.random.default_rng(seed)`` draws the tuples).

  Raises:
    ValueError: unknown ``space``, or fewer distinct tuples (or default actions) than needed.
  """
  if space not in ACTION_SPACES:
    raise ValueError(f"action space {space!r}: expected one of {ACTION_SPACES}")
  n = len(actions)
  n_macro = {"default": 0, "macro": k, "combined": macro_k}[space]
  n_single = k - n_macro
  if n_single > n:
    raise ValueError(f"action space {space!r}: {n_single} default actions needed, {n} given")
  out = [(actions[i], (i,)) for i in range(n_single)]
  if n_macro:
    if not 2 <= macro_size <= n:
      raise ValueError(f"macro_size={macro_size}: expected 2..{n} (the default actions)")
    possible = np.prod(np.arange(n - macro_size + 1, n + 1), dtype=np.float64)
    if possible < n_macro:
      raise ValueError(f"{n_macro} distinct macro actions of {macro_size} from {n} actions: only "
                       f"{int(possible)} exist")
    rng, seen = np.random.default_rng(seed), set()
    while len(seen) < n_macro:
      parts = tuple(int(i) for i in rng.choice(n, size=macro_size, replace=False))
      if parts not in seen:
        seen.add(parts)
        out.append((macro_text([actions[i] for i in parts]), parts))
  return out
