"""Prompts of the EAGLE environment, and robust parsing of what the LLM answers.

Every prompt is a list of chat messages (``{"role": ..., "content": ...}``); the sampling client applies
the model's chat template. The paper's prompts are images we could not read (PAPER_SPEC.md, section
5.1); these follow its described structure:

* **description** of a movie: a plot plus five reasons to like it and five to dislike it. A 135M model
  cannot write a list of five distinct items in one answer (DESIGN.md, measured), so the plot and each
  reason are separate short requests with different seeds; a larger environment LLM can use the same
  prompts.
* **user profile**: preferences written from the user's best and worst rated movies, under the
  headings of the paper's examples (overall, genre, director, aesthetic, other).
* **action**: one concrete change to the movie, in one of the five categories of the paper, optionally
  personalised to a user profile.
* **transition**: the environment step: apply an action to a description, return the new description.
* **rater**: a pairwise question to an AI rater (the paper's human form, answered by a model): which
  of two movies a viewer would prefer, which is better overall, which is more different from an
  original; answered with one letter.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence

Message = dict[str, str]

ACTION_CATEGORIES = (
    "plot changes",
    "character enhancements",
    "visual and storytelling improvements",
    "thematic exploration",
    "audience appeal adjustments",
)
# The paper's profile headings, each with what its one-sentence request asks for.
_HEADING_ASKS = {
    "Overall": "this viewer's overall movie taste",
    "Genre": "the genres this viewer likes and dislikes",
    "Director": "the kind of directors and filmmaking this viewer prefers",
    "Aesthetic": "this viewer's aesthetic preferences (look, tone, pacing)",
    "Other": "one other preference of this viewer",
}
PROFILE_HEADINGS = tuple(_HEADING_ASKS)
_SYSTEM = "You are a helpful assistant who writes short, concrete text about movies."
_LIKES = "Reasons to like it:"
_DISLIKES = "Reasons to dislike it:"


@dataclasses.dataclass(frozen=True)
class Description:
  """A movie description: plot, five reasons to like it, five to dislike it."""

  plot: str
  likes: tuple[str, ...] = ()
  dislikes: tuple[str, ...] = ()

  def render(self) -> str:
    """The text the encoder E_D and the agent read."""
    parts = [f"Plot: {self.plot.strip()}"]
    if self.likes:
      parts.append(_LIKES + "\n" + "\n".join(f"- {x}" for x in self.likes))
    if self.dislikes:
      parts.append(_DISLIKES + "\n" + "\n".join(f"- {x}" for x in self.dislikes))
    return "\n".join(parts)

  @classmethod
  def parse(cls, text: str) -> Description:
    """The inverse of ``render`` (``parse(d.render()) == d`` for plots and reasons without line
    breaks); a text that is not a rendered description is read as a bare plot.

    Raises:
      ParseError: a reasons heading appears but a line under it is not a ``- `` item.
    """
    lines = text.split("\n")
    if not lines[0].startswith("Plot: "):
      return cls(text.strip())
    plot, likes, dislikes, into = lines[0][len("Plot: "):], [], [], None
    for line in lines[1:]:
      if line == _LIKES:
        into = likes
      elif line == _DISLIKES:
        into = dislikes
      elif into is not None and line.startswith("- "):
        into.append(line[2:])
      elif into is None:
        plot += "\n" + line
      else:
        raise ParseError(f"description: expected a '- ' reason line, got {line!r}")
    return cls(plot.strip(), tuple(likes), tuple(dislikes))


def _chat(user: str) -> list[Message]:
  return [{"role": "system", "content": _SYSTEM}, {"role": "user", "content": user}]


def _movie_facts(title: str, genres: Sequence[str], tags: Sequence[str]) -> str:
  facts = f"Movie: {title}"
  if genres:
    facts += f"\nGenres: {', '.join(genres)}"
  if tags:
    facts += f"\nKeywords: {', '.join(tags[:8])}"
  return facts


def plot_prompt(title: str, genres: Sequence[str], tags: Sequence[str] = ()) -> list[Message]:
  return _chat(f"{_movie_facts(title, genres, tags)}\n\nWrite the plot of this movie in three "
               "sentences.")


def reason_prompt(title: str, plot: str, *, like: bool) -> list[Message]:
  kind = "might enjoy" if like else "might dislike"
  return _chat(f"Movie: {title}\nPlot: {plot}\n\nGive one short reason why someone {kind} this "
               "movie. Answer with one sentence.")


def profile_prompt(liked: Sequence[str], disliked: Sequence[str],
                   heading: str = "Overall") -> list[Message]:
  """One section (``heading``, one of ``PROFILE_HEADINGS``) of a user profile, from titles the user
  rated highly and poorly. One request per heading: a 135M model does not fill a five-part
  template in one answer (as for the description's reasons)."""
  if heading not in _HEADING_ASKS:
    raise ValueError(f"profile heading {heading!r} is not one of {PROFILE_HEADINGS}")
  return _chat("A viewer loved these movies: " + "; ".join(liked) + ".\nThe viewer disliked: "
               + "; ".join(disliked) + f".\n\nDescribe {_HEADING_ASKS[heading]} in one sentence.")


def render_profile(sections: Sequence[tuple[str, str]]) -> str:
  """A profile under the paper's headings: one ``"Heading preferences: text"`` line per section."""
  return "\n".join(f"{h} preferences: {t}" for h, t in sections)


def action_prompt(description: str, category: str, profile: str | None = None) -> list[Message]:
  """Asks for one change to the movie in ``category`` (personalised if ``profile`` is given)."""
  if category not in ACTION_CATEGORIES:
    raise ValueError(f"category {category!r} is not one of {ACTION_CATEGORIES}")
  who = f"\nViewer: {profile}\nThe change should make the movie appeal to this viewer." if (
      profile) else ""
  return _chat(f"{description}{who}\n\nSuggest one concrete change to this movie ({category}). "
               "Answer with one imperative sentence, for example: Make the villain a rogue AI.")


def transition_prompt(description: str, action: str) -> list[Message]:
  """The environment step: rewrite the plot after applying ``action``."""
  return _chat(f"{description}\n\nChange: {action}\n\nRewrite the plot of the movie with this "
               "change applied. Answer with the new plot in three sentences.")


def agent_prompt(description: str, profile: str, step: int, horizon: int) -> list[Message]:
  """The language-model agent's prompt at step ``step`` (0-based) of ``horizon``: the viewer, the
  current description, and the request for one change (the agent's answer is the action)."""
  return _chat(f"Viewer: {profile}\n\n{description}\n\nThis is change {step + 1} of {horizon}. "
               "Suggest one concrete change to this movie that this viewer would enjoy. Answer with "
               "one imperative sentence.")


RATER_QUESTIONS = {
    "user": "Which of the two movies would this viewer prefer to watch?",
    "overall": "Which of the two movies is better overall?",
    "distance": "Which of the two movies is more different from the original movie?",
}


def rater_prompt(question: str, first: str, second: str, *, profile: str | None = None,
                 original: str | None = None) -> list[Message]:
  """A pairwise question (``RATER_QUESTIONS``) about movies A = ``first`` and B = ``second``.

  ``profile`` is shown for the viewer question, ``original`` for the distance question."""
  if question not in RATER_QUESTIONS:
    raise ValueError(f"rater question {question!r} is not one of {sorted(RATER_QUESTIONS)}")
  context = ""
  if profile:
    context += f"Viewer: {profile}\n\n"
  if original:
    context += f"Original movie: {original}\n\n"
  return _chat(f"{context}Movie A: {first}\n\nMovie B: {second}\n\n{RATER_QUESTIONS[question]} "
               "Answer with one letter: A or B.")


# ---------------------------------------------------------------------------------------------------
# Parsing.

_PREAMBLE = re.compile(
    r"^(sure|certainly|of course|here(?:'s| is| are)|okay|ok)\b[^:\n]*[:.!]\s*", re.IGNORECASE)
_ITEM = re.compile(r"^\s*(?:\d+[.)]|[-*\u2022])\s+")
_LABEL = re.compile(r"^\s*(?:plot|answer|change|reason|new plot)\s*:\s*", re.IGNORECASE)


class ParseError(ValueError):
  """An LLM answer that could not be turned into the requested item."""


def clean_sentence(text: str, *, min_words: int = 3, max_words: int = 60) -> str:
  """The first usable sentence-like item of an answer.

  Removes chatty preambles ("Sure! Here is ..."), list markers, labels and quotes; keeps the first
  non-empty line and, within it, at most the first two sentences.

  Raises:
    ParseError: nothing with ``min_words``..``max_words`` words remains.
  """
  for line in text.strip().splitlines():
    line = _PREAMBLE.sub("", line.strip())
    line = _LABEL.sub("", _ITEM.sub("", line)).strip().strip("\"'").strip()
    if not line:
      continue
    sentences = re.split(r"(?<=[.!?])\s+", line)
    out = " ".join(sentences[:2]).strip()
    words = len(out.split())
    if words < min_words:
      continue
    if words > max_words:
      out = " ".join(out.split()[:max_words]).rstrip(",;") + "."
    return out
  raise ParseError(f"no sentence of at least {min_words} words in {text[:120]!r}")


def clean_paragraph(text: str, *, min_words: int = 8, max_sentences: int = 4) -> str:
  """A plot paragraph: preamble and labels removed, lines joined, at most ``max_sentences``."""
  lines = [_LABEL.sub("", _PREAMBLE.sub("", ln.strip())) for ln in text.strip().splitlines()]
  joined = " ".join(ln for ln in lines if ln)
  sentences = [s for s in re.split(r"(?<=[.!?])\s+", joined) if s]
  # Drop exact repeats (small models loop).
  seen, kept = set(), []
  for s in sentences:
    if s.lower() not in seen:
      seen.add(s.lower())
      kept.append(s)
  out = " ".join(kept[:max_sentences]).strip()
  if len(out.split()) < min_words:
    raise ParseError(f"plot shorter than {min_words} words: {text[:120]!r}")
  return out


def parse_list(text: str, *, min_words: int = 3) -> list[str]:
  """Items of a numbered or bulleted list (stray lines that are not items are ignored)."""
  items = []
  for line in text.splitlines():
    if _ITEM.match(line):
      try:
        items.append(clean_sentence(line, min_words=min_words))
      except ParseError:
        continue
  return items


_CHOICE_START = re.compile(r"^\W*(?:(?:the\s+)?(?:answer|movie|option)\s*(?:is\s*)?:?\s*)?([AB])\b",
                           re.IGNORECASE)
_CHOICE_NAMED = re.compile(r"\b(?:movie|option|answer(?:\s+is)?:?)\s+([AB])\b", re.IGNORECASE)


def parse_choice(text: str) -> str | None:
  """The letter a rater chose ("A" or "B"), or None when the answer names neither unambiguously.

  Accepted: the answer starting with the letter ("B", "B.", "Movie A ...", "Answer: B"), or naming
  exactly one of "Movie A"/"Movie B" (or option/answer) anywhere; naming both is ambiguous. The
  article "A" opening a sentence ("A movie about ...") is not a choice."""
  t = text.strip()
  named = {x.upper() for x in _CHOICE_NAMED.findall(t)}
  if len(named) > 1:
    return None
  m = _CHOICE_START.match(t)
  if m and not re.match(r"^A\s+[a-z]", t):
    return m.group(1).upper()
  return named.pop() if named else None
