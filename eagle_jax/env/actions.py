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

The grammar: per category, a few templates with slots ("Set the story {setting}.", "Make the
antagonist {role}.", "Explore the theme of {theme}.", "Turn it into {genre}.") filled from short
curated vocabularies of legitimate screenwriting macro actions (settings, eras, plot events,
endings, antagonists, traits, companions, storytelling devices, visual styles, scores, themes,
allegories, tones, audiences, crowd-pleasers), plus the movie's tags. ``{genre}`` slots name only
MovieLens genres the movie lacks, and a filler that amounts to a genre ("funnier, with running
gags") is skipped for movies of that genre. Personalised templates name a genre the viewer likes
("... with the horror atmosphere this viewer likes."; "Lean into the drama elements this viewer
enjoys." when the movie already has it). This yields 266-300 generic templates for a
MovieLens-100K movie (293-295 for a single-genre one), no two of them at MiniLM cosine >= 0.9, and
about 120 more personalised ones per liked genre it lacks, so K = 100 is reached for every movie
with templates alone (``llm_calls = 0``), about 20 per category.

The set is a pure function of the arguments: ``np.random.default_rng(seed)`` shuffles each
(personalised, category) queue of templates. Each action records where it came from
(``llm``/``template``), its category and whether it was personalised, so ablations (e.g. the
paper's "no personalised actions") can filter them.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import string
from collections.abc import Callable, Sequence

import numpy as np

from eagle_jax.env import prompts

# MovieLens genre -> how templates name it: (noun phrase, modifier, plural).
_GENRE_FORMS = {
    "Action": ("an action film", "action", "action films"),
    "Adventure": ("an adventure film", "adventure", "adventure films"),
    "Animation": ("an animated film", "animation", "animated films"),
    "Children's": ("a children's film", "children's film", "children's films"),
    "Comedy": ("a comedy", "comedy", "comedies"),
    "Crime": ("a crime film", "crime", "crime films"),
    "Documentary": ("a mock documentary", "documentary", "documentaries"),
    "Drama": ("a serious drama", "drama", "dramas"),
    "Fantasy": ("a fantasy film", "fantasy", "fantasy films"),
    "Film-Noir": ("a film noir", "film noir", "noir films"),
    "Horror": ("a horror film", "horror", "horror films"),
    "Musical": ("a musical", "musical", "musicals"),
    "Mystery": ("a mystery", "mystery", "mysteries"),
    "Romance": ("a romance", "romance", "romances"),
    "Sci-Fi": ("a science fiction film", "science fiction", "science fiction films"),
    "Thriller": ("a thriller", "thriller", "thrillers"),
    "War": ("a war film", "war film", "war films"),
    "Western": ("a western", "western", "westerns"),
}
# Genre slots: {genre}/{genre_mod}/{genres} name a genre the movie lacks; {liked}/{liked_mod}/
# {liked_plural} one of the viewer's liked genres it lacks; {shared_mod} a liked genre it has.
_GENRE_SLOTS = {"genre": ("genre", 0), "genre_mod": ("genre", 1), "genres": ("genre", 2),
                "liked": ("liked", 0), "liked_mod": ("liked", 1), "liked_plural": ("liked", 2),
                "shared_mod": ("shared", 1)}

# Slot -> curated fillers. A filler given as (text, genre) amounts to adding that MovieLens genre
# and is left out for movies that already have it.
_VOCAB: dict[str, tuple[str | tuple[str, str], ...]] = {
    "setting": (
        "at a remote research station in Antarctica",
        "aboard a generation ship drifting between the stars",
        "in a fishing village on the Norwegian coast", "in a crumbling palace in Venice",
        "in a dusty desert mining town", "in a sprawling megacity of the near future",
        "aboard a submarine on a secret patrol", "in a travelling circus",
        "at a boarding school in the Highlands", "inside a maximum-security prison",
        "on a luxury cruise ship", "in a snowbound mountain hotel", "in a colony on the Moon",
        "in the night markets of Hong Kong", "at a Mumbai film studio",
        "on a tropical island cut off by a storm",
    ),
    "era": (
        "ancient Rome", "Victorian London", "the Roaring Twenties", "feudal Japan",
        ("the Wild West", "Western"), "the swinging sixties", "Renaissance Florence",
        "a future after the collapse of civilisation", "the Viking age", "the French Revolution",
        "the dot-com boom of the late nineties", "the Cold War",
    ),
    "event": (
        "a heist that goes wrong", "a kidnapping the hero must resolve",
        "a betrayal by the hero's closest ally", "a race against time to stop a disaster",
        "a case of mistaken identity", "a courtroom trial", "an earthquake that levels the city",
        "a long-buried family secret", "a rival who steals the hero's big idea",
        "a deadly epidemic", "a mysterious stranger who arrives in town",
        "a double-cross during a ransom exchange", "an election the hero must win",
        "a shipwreck that strands everyone", "a lost treasure map",
    ),
    "ending": (
        "the hero fails but saves someone else", "the villain gets away",
        "the two rivals become friends", "the narrator turns out to be the villain",
        "the town is saved at a terrible cost", "the lovers part for good",
        "the dead mentor turns out to be alive", "the final question is left open",
        "the hero chooses family over fame", "the hero walks away from the fight",
    ),
    "role": (
        "a rogue artificial intelligence", "a corrupt police chief", "the hero's own brother",
        "a charismatic cult leader", "a ruthless tech billionaire", "a vengeful ghost",
        "a shape-shifting alien", "the hero's former best friend", "a scheming senator",
        "the hero's future self", "an ancient curse", "a sympathetic rebel with a just cause",
        "a bored aristocrat who plays games with lives", "a faceless government agency",
    ),
    "trait": (
        "a hidden past that comes back to haunt them", "a crippling fear of heights",
        "a secret double life", "a terminal illness", "a photographic memory",
        "a criminal record they are ashamed of", "an estranged daughter", "a gambling addiction",
        "a debt to a dangerous gangster", "a lost love they never got over",
        "a famous parent to live up to", "a vow they must not break",
    ),
    "companion": (
        "a witty sidekick who lightens the mood", "a wise old mentor",
        "a rival who becomes an ally", "a street-smart orphan", "a talking animal companion",
        "a sarcastic robot", "a grumpy neighbour", "an eccentric inventor", "a retired detective",
        "a ghost only they can see", "a fast-talking con artist", "a nosy journalist",
        "a reluctant bodyguard", "a grandmother with a secret past",
    ),
    "hero": (
        "an unlikely hero who starts out as a coward", "a retired astronaut", "a teenage hacker",
        "a small-town nurse", "an ageing boxer", "a disgraced chef", "a blind piano tuner",
        "a rookie firefighter", "a widowed farmer", "a reformed thief",
    ),
    "device": (
        "through flashbacks from the end of the film", "in reverse chronological order",
        "from the point of view of the villain", "through found footage",
        "as a series of letters read aloud", "through several unreliable narrators",
        "in real time over a single night", "as interlocking chapters told out of order",
        "through the eyes of a child", "as a tale an old man tells his grandchildren",
        "with a narrator who speaks straight to the camera", "as a chain of short vignettes",
    ),
    "visual": (
        "in black and white with stark lighting", "as one unbroken take",
        "in saturated neon colours", "with a muted wintry palette", "on grainy 16mm film",
        "in sweeping widescreen landscapes", "with long tracking shots in the action scenes",
        "in extreme close-ups on the actors' faces", "with dynamic, tilted camera angles",
        "in the warm golden light of late afternoon", "with miniature sets and practical effects",
        "with a fixed camera, like a stage play",
        ("with handheld cameras, like a documentary", "Documentary"),
        ("as hand-drawn animation", "Animation"),
    ),
    "music": (
        "a minimalist piano score", "1980s synthesizer music", "a full symphony orchestra",
        "frantic jazz drumming", "traditional folk songs", "heavy metal",
        "silence broken only by natural sounds", "a haunting choir", "a single cello",
        "hip-hop beats", "baroque harpsichord music",
    ),
    "theme": (
        "family loyalty against personal ambition", "the cost of revenge",
        "how technology isolates people from each other", "grief and letting go",
        "class inequality", "identity and belonging", "fate versus free will",
        "the corrupting nature of power", "memory and regret", "faith and doubt",
        "the loss of innocence", "forgiveness", "the meaning of home", "truth and propaganda",
        "ageing and mortality", "freedom versus security",
    ),
    "allegory": (
        "climate change", "the Cold War arms race", "social media addiction", "immigration",
        "the financial crisis", "colonialism", "a pandemic", "celebrity culture",
        "the gig economy", "addiction",
    ),
    "bond": (
        "a father and his estranged son", "two sisters who compete for everything",
        "a teacher and a difficult student", "an old soldier and a refugee child",
        "two strangers stuck in the same place", "a detective and the suspect she protects",
        "a dying man and his nurse", "two old friends on opposite sides of the law",
    ),
    "tone": (
        "lighter and more hopeful", "darker and more suspenseful", "more playful and irreverent",
        "more melancholic", "more intimate and quiet", "more epic and grand", "more satirical",
        "more whimsical", "grittier and more realistic", "warmer and more sentimental",
        "more absurd", ("funnier, with running gags", "Comedy"),
        ("scarier, with a creeping sense of dread", "Horror"),
    ),
    "audience": (
        "teenagers", "a late-night cult audience", "an international audience", "older viewers",
        "film festival audiences", "sports fans", "history buffs", "video game players",
        "fans of big blockbusters", ("families with young children", "Children's"),
        ("fans of true crime", "Crime"),
    ),
    "appeal": (
        "a star cameo", "a post-credits scene", "a faster pace with shorter scenes",
        "a happier ending", "a cute animal", "more heartfelt emotional moments",
        "a big twist in the last ten minutes", "a memorable catchphrase",
        ("more humour to lighten the tone", "Comedy"),
        ("a romantic subplot between the two leads", "Romance"),
        ("bigger action set pieces", "Action"), ("a song-and-dance number", "Musical"),
    ),
}

# Category -> generic templates (slots: _VOCAB keys, genre slots, {tag}).
_TEMPLATES = {
    "plot changes": (
        "Set the story {setting}.",
        "Move the story to {era}.",
        "Build the second act around {event}.",
        "Change the ending so that {ending}.",
        "Add {tag} elements to the story.",
        "Add a subplot borrowed from {genres}.",
    ),
    "character enhancements": (
        "Make the antagonist {role}.",
        "Give the protagonist {trait}.",
        "Pair the hero with {companion}.",
        "Make the protagonist {hero}.",
        "Add a character who seems to have walked out of {genre}.",
    ),
    "visual and storytelling improvements": (
        "Tell the story {device}.",
        "Shoot the film {visual}.",
        "Score the film with {music}.",
        "Shoot the key scenes in the visual style of {genre}.",
    ),
    "thematic exploration": (
        "Explore the theme of {theme}.",
        "Make the story an allegory of {allegory}.",
        "Centre the story on the bond between {bond}.",
        "Turn it into {genre}.",
    ),
    "audience appeal adjustments": (
        "Make the tone {tone}.",
        "Make it appeal to {audience}.",
        "Add {appeal}.",
        "Add {genre_mod} moments to win over fans of {genres}.",
    ),
}

# Category -> personalised templates (each names a genre the viewer likes).
_PERSONAL_TEMPLATES = {
    "plot changes": (
        "Add a subplot in the style of the {liked_plural} this viewer loves.",
        "Set the story {setting} and give it the {liked_mod} edge this viewer enjoys.",
        "Build the second act around {event}, played as {liked} for this viewer.",
    ),
    "character enhancements": (
        "Make the antagonist {role}, written like a villain from {liked}.",
        "Pair the hero with {companion}, in the spirit of the {liked_plural} this viewer loves.",
        "Give the protagonist the arc of a hero from {liked}, which this viewer loves.",
    ),
    "visual and storytelling improvements": (
        "Tell the story {device}, with the {liked_mod} atmosphere this viewer likes.",
        "Shoot the film {visual}, borrowing the look of the {liked_plural} this viewer loves.",
        "Lean into the {shared_mod} elements this viewer enjoys.",
    ),
    "thematic exploration": (
        "Explore the theme of {theme} through the {liked_mod} lens this viewer prefers.",
        "Turn it into {liked}, the kind of film this viewer loves.",
        "Deepen the {shared_mod} themes that this viewer responds to.",
    ),
    "audience appeal adjustments": (
        "Add the {liked_mod} elements this viewer enjoys.",
        "Make the tone {tone}, as in the {liked_plural} this viewer likes.",
        "Add {appeal} for this fan of {liked_plural}.",
        "Heighten the {shared_mod} moments for this viewer.",
    ),
}


# Texts per extra ``encode`` call of ``_assemble`` (after near-duplicates exhaust the first call).
_ENCODE_CHUNK = 32


@dataclasses.dataclass(frozen=True)
class Action:
  """One candidate action and its provenance."""

  text: str
  category: str
  personalised: bool
  source: str  # "llm" or "template"
  seed: int | None = None


def _slots(template: str) -> list[str]:
  return [name for _, name, _, _ in string.Formatter().parse(template) if name]


def _family(slot: str) -> str | None:
  """The genre family of a slot (slots of one family in a template name the same genre)."""
  return _GENRE_SLOTS[slot][0] if slot in _GENRE_SLOTS else None


def _expand(template: str, fillers: dict[str, list[str]], families: dict[str, list[str]]
            ) -> list[str]:
  """Every filling of ``template``: genre-family slots share one genre, other slots vary."""
  slots = list(dict.fromkeys(_slots(template)))
  fams = list(dict.fromkeys(f for f in map(_family, slots) if f))
  free = [s for s in slots if _family(s) is None]
  out = []
  for genre_combo in itertools.product(*[families[f] for f in fams]):
    chosen = dict(zip(fams, genre_combo))
    values = {s: _GENRE_FORMS[chosen[_family(s)]][_GENRE_SLOTS[s][1]]
              for s in slots if _family(s)}
    for combo in itertools.product(*[fillers[s] for s in free]):
      out.append(template.format(**values, **dict(zip(free, combo))))
  return out


def template_actions(genres: Sequence[str], tags: Sequence[str],
                     liked_genres: Sequence[str] = ()) -> list[Action]:
  """Every template macro action for a movie, generic then personalised, in a fixed order.

  Genre slots name only genres the movie lacks (``{genre}``) or, in personalised templates, the
  viewer's liked genres it lacks (``{liked}``) or has (``{shared_mod}``: lean into them); fillers
  that amount to a genre the movie has are skipped. Genres outside MovieLens' 18 are ignored.

  Args:
    genres: the movie's MovieLens genres.
    tags: its tags (the first five fill ``{tag}``).
    liked_genres: the viewer's favourite genres (empty: no personalised templates).
  """
  own = set(genres)
  liked = [g for g in dict.fromkeys(liked_genres) if g in _GENRE_FORMS]
  families = {"genre": [g for g in _GENRE_FORMS if g not in own],
              "liked": [g for g in liked if g not in own],
              "shared": [g for g in liked if g in own]}
  fillers = {slot: [v if isinstance(v, str) else v[0] for v in values
                    if isinstance(v, str) or v[1] not in own]
             for slot, values in _VOCAB.items()}
  fillers["tag"] = [str(t) for t in tags[:5]]
  # Personalised fillers: none that evokes a genre (it would clash with the liked one).
  plain = {slot: [v for v in values if isinstance(v, str)] for slot, values in _VOCAB.items()}
  out = []
  for personal, grammar in ((False, _TEMPLATES), (True, _PERSONAL_TEMPLATES)):
    if personal and not liked:
      continue
    for category, templates in grammar.items():
      for template in templates:
        out += [Action(text, category, personal, "template")
                for text in _expand(template, plain if personal else fillers, families)]
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
    max_tokens: int = 40,
    temperature: float = 0.9,
    dedupe_threshold: float = 0.9,
    liked_genres: Sequence[str] = (),
) -> tuple[list[Action], ActionStats]:
  """K candidate actions for one state (see module docstring).

  A pure function of its arguments (and the client's answers): ``seed`` seeds the requests and the
  shuffling of the templates.

  Args:
    client: a ``SamplingClient`` (``await client.sample(prompts, max_tokens=, temperature=, seed=)``
      on chat messages).
    encode: texts -> [n, e] sentence embeddings, for near-duplicate removal.
    description: the rendered state description.
    genres, tags: the anchor movie's MovieLens metadata (for templates).
    profile: a user profile for personalised actions (None: generic only).
    k: number of actions to return.
    llm_calls: LLM requests (half personalised when ``profile`` is given); 0 uses templates only.
    seed: base seed; request i uses ``seed + i``; ``np.random.default_rng(seed)`` shuffles the
      templates.
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
  acts, stats.duplicates = _assemble(
      candidates, template_actions(genres, tags, liked_genres), encode, k=k,
      rng=np.random.default_rng(seed), threshold=dedupe_threshold)
  stats.templates_used = sum(a.source == "template" for a in acts)
  return acts, stats
