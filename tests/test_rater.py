"""The AI rater's parsing and aggregation against hand-computed values, and its config errors."""

import asyncio
import math

import ml_collections
import numpy as np
import pytest

from eagle_jax import checks, prompts
from eagle_jax.evaluation import agent_eval, rater


@pytest.mark.parametrize("text, letter", [
    ("B", "B"), ("A.", "A"), (" b ", "B"), ("(A)", "A"), ("Answer: B", "B"),
    ("The answer is A because", "A"), ("Movie B is more fun.", "B"),
    ("I would pick Movie A.", "A"), ("Option B", "B"),
    ("A movie about a dog", None), ("Movie A and Movie B are both good", None),
    ("neither", None), ("", None), ("Both", None),
])
def test_parse_choice(text, letter):
  assert prompts.parse_choice(text) == letter


def test_rater_prompt_shows_the_context_and_both_texts_in_order():
  msgs = prompts.rater_prompt("user", "first text", "second text", profile="Loves horror.")
  user = msgs[-1]["content"]
  assert user.index("Viewer: Loves horror.") < user.index("Movie A: first text") < user.index(
      "Movie B: second text")
  assert prompts.RATER_QUESTIONS["user"] in user
  d = prompts.rater_prompt("distance", "x", "y", original="the anchor")[-1]["content"]
  assert "Original movie: the anchor" in d and "Viewer:" not in d
  with pytest.raises(ValueError, match="rater question 'taste'"):
    prompts.rater_prompt("taste", "x", "y")


class _Letters:
  """A scripted rater: answers the i-th prompt of a call with ``answers[i]`` (a load instrument for
  the aggregation logic, not a model)."""

  def __init__(self, answers):
    self.answers = list(answers)
    self.prompts = []

  async def sample(self, msgs, *, max_tokens, temperature, seed, **params):
    assert params.get("chat") is True and temperature == 0.0
    self.prompts.extend(msgs)
    return self.answers[:len(msgs)]


def _items(n, prefers):
  return [rater.Item("user", f"variant {i}", f"anchor {i}", prefers[i], profile=f"p{i}")
          for i in range(n)]


def test_ask_sends_both_orders_and_summarise_counts_by_hand():
  items = _items(4, [True, True, False, False])
  # item 0: variant first then second -> "A","B": chose variant both times (score 1)
  # item 1: "A","A": first order chose variant, second chose other (0.5, inconsistent)
  # item 2: "B","A": chose the other both times (score 0)
  # item 3: "?","B": one parse failure, second order chose variant (score 1)
  client = _Letters(["A", "B", "A", "A", "B", "A", "no idea", "Movie B"])
  letters = asyncio.run(rater.ask(client, items, max_tokens=4))
  assert letters == [("A", "B"), ("A", "A"), ("B", "A"), (None, "B")]
  first_prompt, second_prompt = client.prompts[0][-1]["content"], client.prompts[1][-1]["content"]
  assert "Movie A: variant 0" in first_prompt and "Movie B: variant 0" in second_prompt
  out = rater.summarise(items, letters, 0.95, agent_eval.mean_ci)
  scores = np.array([1.0, 0.5, 0.0, 1.0])
  assert out["score"]["mean"] == pytest.approx(scores.mean())
  se = scores.std(ddof=1) / 2
  assert out["score"]["ci_high"] - out["score"]["mean"] == pytest.approx(1.959964 * se, rel=1e-5)
  assert out["parse_failures"] == 1 and out["asked"] == 8
  assert out["position_consistency"] == pytest.approx(2 / 3)  # items 0 and 2 of the 3 with both
  assert out["first_position_rate"] == pytest.approx(4 / 7)  # "A" in 4 of 7 parsed answers
  # Decided items: 0 (chose variant, utility agrees), 2 (chose other, utility prefers other),
  # 3 (chose variant, utility prefers other): 2 of 3 agree.
  agree = out["agreement_with_utility"]
  assert (agree["mean"], agree["n"]) == (pytest.approx(2 / 3), 3)


def test_a_rater_that_always_says_a_scores_one_half_and_is_never_consistent():
  items = _items(5, [True] * 5)
  letters = asyncio.run(rater.ask(_Letters(["A"] * 10), items, max_tokens=4))
  out = rater.summarise(items, letters, 0.95, agent_eval.mean_ci)
  assert out["score"]["mean"] == 0.5 and out["position_consistency"] == 0.0
  assert out["first_position_rate"] == 1.0 and out["agreement_with_utility"]["n"] == 0


def test_wilson_interval_equals_the_formula():
  k, n, z = 7, 20, 1.959963984540054
  p = k / n
  centre = (p + z * z / (2 * n)) / (1 + z * z / n)
  half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
  got = rater.wilson(k, n, 0.95)
  assert got["ci_low"] == pytest.approx(centre - half, abs=1e-9)
  assert got["ci_high"] == pytest.approx(centre + half, abs=1e-9)


def test_distance_items_compare_with_random_by_embedding_shift():
  items = rater.build_items("distance", anchors=["a0", "a1"], variants=["v0", "v1"],
                            randoms=["r0", "r1"], profiles=["p0", "p1"],
                            variant_utility=np.zeros(2), anchor_utility=np.zeros(2),
                            variant_shift=np.array([0.3, 0.1]), random_shift=np.array([0.2, 0.2]))
  assert [(it.variant, it.other, it.original, it.utility_prefers_variant) for it in items] == [
      ("v0", "r0", "a0", True), ("v1", "r1", "a1", False)]
  with pytest.raises(ValueError, match="random policy"):
    rater.build_items("distance", anchors=["a"], variants=["v"], randoms=None, profiles=["p"],
                      variant_utility=np.zeros(1), anchor_utility=np.zeros(1),
                      variant_shift=np.zeros(1), random_shift=None)


@pytest.mark.parametrize("field, value, match", [
    ("pairs", 0, "config.eval.rater.pairs"), ("questions", ("taste",), "questions"),
    ("policies", (), "policies"), ("max_tokens", 0, "max_tokens")])
def test_bad_rater_config_names_the_field(field, value, match):
  c = ml_collections.ConfigDict(dict(enabled=True, pairs=4, policies=("random",),
                                     questions=("user",), max_tokens=4, seed=0))
  c[field] = value
  with pytest.raises(checks.ConfigError, match=match):
    rater.RaterConfig.from_config(c)
