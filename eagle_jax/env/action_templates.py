"""The template grammar of candidate actions: screenwriting macro actions with curated slots.

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
"""

from __future__ import annotations

import dataclasses
import itertools
import string
from collections.abc import Sequence

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
