"""An AI rater: the paper's pairwise rater questions answered by a language model.

The paper's human raters saw a user profile and two movie descriptions in random order, the real
movie and the variant an algorithm wrote in H steps, and answered a form; the reported scores are
fractions of raters preferring the variant (User Utility, Rater Utility, Distance Score; PAPER_SPEC.md
§3.3). Its Amazon study asked a model the same questions. Here any ``SamplingClient`` answers, with
greedy decoding:

* ``user``: given the pair's user profile, which of (anchor description, policy's final description)
  would this viewer prefer? Score: the fraction preferring the variant (User Utility).
* ``overall``: the same two texts without a profile: which is better overall? (The paper's Rater
  Utility asked the rater about their own taste; a model has none, so this is the profile-free
  reading, not the same quantity.)
* ``distance``: given the anchor as the original, which of (policy's final description, the random
  policy's final description on the same pair and sample) is more different from it? Score: the
  fraction judging the policy's variant further than random actions' (0.5: as far as random). A
  variant is always further from the original than the original itself, so the comparison needs a
  second variant; random actions are the natural reference.

Every question is asked in both orders (the variant as A, then as B), which cancels a rater that
always answers one letter: an item's score is the mean over its parsed orders of "chose the variant"
(1, 0.5 for a split decision, 0), and an answer naming neither letter (``prompts.parse_choice``) is a
counted parse failure; an item with no parsed order is dropped. Reported per question and policy:
the mean score with a normal-approximation interval over items, parse failures, the share of items
whose two orders agree (``position_consistency``), the share of parsed answers that were "A"
(``first_position_rate``: 0.5 for an unbiased rater), and the rater's agreement with the utility:
among items with a decision (score != 0.5), the share where the rater's choice is the one the
utility ranks higher (``user``/``overall``: U(E_D(variant)) > U(E_D(anchor)) for the user;
``distance``: ||E_D(x) - E_D(anchor)|| larger), with a Wilson interval (scipy).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np
import scipy.stats

from eagle_jax import checks, prompts

QUESTIONS = tuple(prompts.RATER_QUESTIONS)


@dataclasses.dataclass(frozen=True)
class RaterConfig:
  """``config.eval.rater``, checked once (``from_config``).

  Attributes:
    enabled: run the rater in ``launch.evaluate``.
    pairs: held-out pairs rated per split (a seeded sample; all if fewer).
    policies: report policy names rated (e.g. "random", "agent[g_optimal]").
    questions: subset of ``QUESTIONS``.
    max_tokens: tokens of each answer.
    seed: seed of the pair sample.
  """

  enabled: bool
  pairs: int
  policies: tuple[str, ...]
  questions: tuple[str, ...]
  max_tokens: int
  seed: int

  @classmethod
  def from_config(cls, rater) -> RaterConfig:
    """Raises ``ConfigError`` naming the ``config.eval.rater`` field that is wrong."""
    checks.check_numbers(rater, [("pairs", dict(integer=True, lo=1)),
                                 ("max_tokens", dict(integer=True, lo=1)),
                                 ("seed", dict(integer=True, lo=0))], prefix="config.eval.rater")
    questions = tuple(rater.questions)
    bad = [q for q in questions if q not in QUESTIONS]
    if bad or not questions:
      raise checks.ConfigError(f"config.eval.rater.questions={questions!r}: expected a non-empty "
                               f"subset of {QUESTIONS}")
    policies = tuple(str(p) for p in rater.policies)
    if not policies:
      raise checks.ConfigError("config.eval.rater.policies: expected at least one policy name")
    return cls(enabled=bool(rater.enabled), pairs=int(rater.pairs), policies=policies,
               questions=questions, max_tokens=int(rater.max_tokens), seed=int(rater.seed))


@dataclasses.dataclass(frozen=True)
class Item:
  """One pairwise comparison: is ``variant`` chosen over ``other``?

  Attributes:
    question: a ``QUESTIONS`` key.
    variant: the policy's text.
    other: the text it is compared with (anchor, or random policy's text).
    utility_prefers_variant: whether the utility ranks ``variant`` above ``other``.
    profile: the user's profile (``user`` question).
    original: the anchor description (``distance`` question).
  """

  question: str
  variant: str
  other: str
  utility_prefers_variant: bool
  profile: str | None = None
  original: str | None = None

  def prompts(self) -> list[list[prompts.Message]]:
    """The two orders: variant as A, then variant as B."""
    kw = dict(profile=self.profile, original=self.original)
    return [prompts.rater_prompt(self.question, self.variant, self.other, **kw),
            prompts.rater_prompt(self.question, self.other, self.variant, **kw)]


async def ask(client, items: Sequence[Item], *, max_tokens: int, seed: int = 0
              ) -> list[tuple[str | None, str | None]]:
  """The parsed letters of both orders of every item (None: unparsed), all in one call."""
  msgs = [m for it in items for m in it.prompts()]
  if not msgs:
    return []
  answers = await client.sample(msgs, max_tokens=max_tokens, temperature=0.0, seed=seed, chat=True)
  letters = [prompts.parse_choice(a) for a in answers]
  return [(letters[2 * i], letters[2 * i + 1]) for i in range(len(items))]


def wilson(successes: int, n: int, confidence: float) -> dict[str, float]:
  """Share ``successes / n`` with its Wilson score interval (``scipy.stats.binomtest``)."""
  if n == 0:
    return {"mean": float("nan"), "ci_low": float("nan"), "ci_high": float("nan"), "n": 0}
  ci = scipy.stats.binomtest(successes, n).proportion_ci(confidence, method="wilson")
  return {"mean": successes / n, "ci_low": float(ci.low), "ci_high": float(ci.high), "n": n}


def summarise(items: Sequence[Item], letters: Sequence[tuple[str | None, str | None]],
              confidence: float, mean_ci) -> dict[str, Any]:
  """Scores of one (question, policy) block from its items' two parsed answers (module docstring).

  ``mean_ci``: ``[N] values -> {mean, ci_low, ci_high, ...}`` (the evaluation's interval)."""
  scores, agree, decided, consistent, both, first, parsed = [], 0, 0, 0, 0, 0, 0
  failures = 0
  for it, (a, b) in zip(items, letters):
    # Order 1 shows the variant as A, order 2 as B.
    chose = [x for x in ((a == "A") if a else None, (b == "B") if b else None) if x is not None]
    failures += (a is None) + (b is None)
    first += (a == "A") + (b == "A")
    parsed += (a is not None) + (b is not None)
    if not chose:
      continue
    s = float(np.mean(chose))
    scores.append(s)
    if len(chose) == 2:
      both += 1
      consistent += chose[0] == chose[1]
    if s != 0.5:
      decided += 1
      agree += (s > 0.5) == it.utility_prefers_variant
  out: dict[str, Any] = {
      "items": len(items), "asked": 2 * len(items), "parse_failures": failures,
      "score": (mean_ci(np.asarray(scores), confidence) if scores
                else {"mean": float("nan"), "n": 0}),
      "position_consistency": consistent / both if both else float("nan"),
      "first_position_rate": first / parsed if parsed else float("nan"),
      "agreement_with_utility": wilson(agree, decided, confidence),
      "utility_prefers_variant": float(np.mean([it.utility_prefers_variant for it in items]))
      if items else float("nan"),
  }
  return out


def build_items(question: str, *, anchors: Sequence[str], variants: Sequence[str],
                randoms: Sequence[str] | None, profiles: Sequence[str],
                variant_utility: np.ndarray, anchor_utility: np.ndarray,
                variant_shift: np.ndarray, random_shift: np.ndarray | None) -> list[Item]:
  """The items of one question over N rated pairs.

  Args:
    question: a ``QUESTIONS`` key.
    anchors, variants, profiles: [N] anchor descriptions, the policy's final descriptions, the
      users' profiles.
    randoms: [N] the random policy's final descriptions (``distance``; None otherwise).
    variant_utility, anchor_utility: [N] U of the variant and of the anchor for the pair's user.
    variant_shift, random_shift: [N] ||E_D(x) - E_D(anchor)|| of the policy's and random's texts.
  """
  n = len(variants)
  if question == "distance":
    if randoms is None or random_shift is None:
      raise ValueError("the distance question needs the random policy's texts")
    return [Item("distance", variants[i], randoms[i],
                 bool(variant_shift[i] > random_shift[i]), original=anchors[i]) for i in range(n)]
  better = np.asarray(variant_utility) > np.asarray(anchor_utility)
  return [Item(question, variants[i], anchors[i], bool(better[i]),
               profile=profiles[i] if question == "user" else None) for i in range(n)]
