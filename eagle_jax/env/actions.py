"""Candidate actions per state: LLM-written (generic and personalised) plus template macro actions.

The paper generates K = 100 actions per movie with Gemini Ultra: 50 generic and 50 personalised to a
random user profile, spread over five categories (PAPER_SPEC.md, section 1.6). A 135M environment
model writes one usable action per call at best, and often repeats itself (DESIGN.md), so
``build_action_set``:

1. asks for one action per call, cycling through the five categories, half with a user profile,
   each call with its own seed;
2. parses each answer (``prompts.clean_sentence``), drops failures (counted in the provenance);
3. removes near-duplicates by cosine similarity of their sentence embeddings (``dedupe``);
4. tops up to K from templates over the movie's MovieLens genres and tags and fixed per-category
   templates (legitimate macro actions such as "Turn it into a horror film").

Each action records where it came from (``llm``/``template``), its category and whether it was
personalised, so ablations (e.g. the paper's "no personalised actions") can filter them.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable, Sequence

import numpy as np

from eagle_jax.env import prompts

# Category -> templates with {genre} / {tag} slots or none.
_TEMPLATES = {
    "plot changes": (
        "Add a plot twist in which the hero's closest ally is secretly working against them.",
        "Move the story to a near-future city where technology controls daily life.",
        "Add a race against time that forces the characters to act quickly.",
        "Add {tag} elements to the story.",
    ),
    "character enhancements": (
        "Give the main character a hidden past that comes back to haunt them.",
        "Make the antagonist a rogue artificial intelligence.",
        "Add a witty sidekick who lightens the mood.",
        "Make the protagonist an unlikely hero who starts out as a coward.",
    ),
    "visual and storytelling improvements": (
        "Tell the story through flashbacks from the end of the film.",
        "Use more dynamic camera angles and long tracking shots in the action scenes.",
        "Shoot the film in black and white with stark lighting.",
        "Narrate the story from the point of view of the villain.",
    ),
    "thematic exploration": (
        "Explore the theme of family loyalty against personal ambition.",
        "Add a theme about the cost of revenge.",
        "Explore how technology isolates people from each other.",
        "Turn it into a {genre} film.",
    ),
    "audience appeal adjustments": (
        "Make the film more family friendly and suitable for children.",
        "Add more humour to lighten the tone.",
        "Raise the stakes with bigger action set pieces.",
        "Add a romantic subplot between the two leads.",
    ),
}


@dataclasses.dataclass(frozen=True)
class Action:
  """One candidate action and its provenance."""

  text: str
  category: str
  personalised: bool
  source: str  # "llm" or "template"
  seed: int | None = None


def template_actions(genres: Sequence[str], tags: Sequence[str]) -> list[Action]:
  """Template macro actions for a movie, filled with genres it does *not* have and its tags."""
  other_genres = [g for g in ("Horror", "Comedy", "Sci-Fi", "Romance", "Western", "Musical",
                              "Thriller", "Animation", "Documentary", "Fantasy") if g not in genres]
  out = []
  for category, templates in _TEMPLATES.items():
    for template in templates:
      if "{genre}" in template:
        out += [Action(template.format(genre=g.lower()), category, False, "template")
                for g in other_genres]
      elif "{tag}" in template:
        out += [Action(template.format(tag=t), category, False, "template") for t in tags[:5]]
      else:
        out.append(Action(template, category, False, "template"))
  return out


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
    max_tokens: int = 40,
    temperature: float = 0.9,
    dedupe_threshold: float = 0.9,
) -> tuple[list[Action], ActionStats]:
  """K candidate actions for one state (see module docstring).

  Args:
    client: a ``SamplingClient`` (``await client.sample(prompts, max_tokens=, temperature=, seed=)``
      on chat messages).
    encode: texts -> [n, e] sentence embeddings, for near-duplicate removal.
    description: the rendered state description.
    genres, tags: the anchor movie's MovieLens metadata (for templates).
    profile: a user profile for personalised actions (None: generic only).
    k: number of actions to return.
    llm_calls: LLM requests (half personalised when ``profile`` is given); 0 uses templates only.
    seed: base seed; request i uses ``seed + i``.

  Returns:
    ``(actions, stats)`` with exactly ``k`` actions when enough templates exist.
  """
  if k <= 0 or llm_calls < 0:
    raise ValueError(f"k must be > 0 and llm_calls >= 0, got k={k}, llm_calls={llm_calls}")
  stats = ActionStats(requested=llm_calls)
  requests = action_requests(description, profile, llm_calls, seed)
  meta = [(r.category, r.personalised, r.seed) for r in requests]
  messages = [r.messages for r in requests]
  answers = await asyncio.gather(*[
      client.sample([msg], max_tokens=max_tokens, temperature=temperature, seed=s)
      for (_, _, s), msg in zip(meta, messages)])
  candidates: list[Action] = []
  for (category, personal, s), answer in zip(meta, answers):
    try:
      text = prompts.clean_sentence(answer[0], min_words=4, max_words=30)
    except prompts.ParseError as e:
      stats.parse_failures += 1
      stats.failures.append(str(e))
      continue
    candidates.append(Action(text, category, personal, "llm", s))
  n_llm = len(candidates)
  candidates += template_actions(genres, tags)
  keep = dedupe([a.text for a in candidates], encode([a.text for a in candidates]),
                dedupe_threshold)
  stats.duplicates = sum(1 for i in range(n_llm) if i not in set(keep))
  chosen = [candidates[i] for i in keep if i < n_llm]
  rng = np.random.default_rng(seed)
  templates = [candidates[i] for i in keep if i >= n_llm]
  order = rng.permutation(len(templates))
  for j in order[: max(0, k - len(chosen))]:
    chosen.append(templates[j])
  stats.templates_used = max(0, min(k, len(chosen)) - min(n_llm - stats.duplicates, k))
  return chosen[:k], stats
