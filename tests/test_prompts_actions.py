"""Parsing of LLM answers and construction of candidate action sets."""

import asyncio

import numpy as np
import pytest

from eagle_jax.env import actions, prompts


@pytest.mark.parametrize("answer, expected", [
    ("Sure! Here is a change: Make the villain a rogue AI.", "Make the villain a rogue AI."),
    ("1. Set the story on a space station.\n2. Set the story on a space station.",
     "Set the story on a space station."),
    ('"Give the hero a twin sister."', "Give the hero a twin sister."),
    ("Change: Add a heist subplot. It raises the stakes. More text here.",
     "Add a heist subplot. It raises the stakes."),
    ("\n\n- Make it a musical with big dance numbers\n", "Make it a musical with big dance numbers"),
])
def test_clean_sentence(answer, expected):
  assert prompts.clean_sentence(answer) == expected


def test_clean_sentence_rejects_empty_and_truncates_rambling():
  with pytest.raises(prompts.ParseError, match="no sentence"):
    prompts.clean_sentence("Sure!\n\n1.  \nOk.")
  long = "Make " + "the story very " * 30 + "long."
  assert len(prompts.clean_sentence(long, max_words=20).split()) == 20


def test_clean_paragraph_drops_repeats_and_labels():
  text = ("Plot: A detective hunts a thief. The thief is her brother. The thief is her brother. "
          "They reconcile at the end.")
  assert prompts.clean_paragraph(text) == (
      "A detective hunts a thief. The thief is her brother. They reconcile at the end.")
  with pytest.raises(prompts.ParseError):
    prompts.clean_paragraph("Too short.")


def test_parse_list_ignores_stray_text():
  text = "Here are ideas:\n1. Add a dragon to the story.\nstray line\n2) Make it funnier please.\n- ok"
  assert prompts.parse_list(text) == ["Add a dragon to the story.", "Make it funnier please."]


def test_description_render_and_prompts():
  d = prompts.Description("A heist in Paris.", ("Great cast.",), ("Too long.",))
  assert d.render() == ("Plot: A heist in Paris.\nReasons to like it:\n- Great cast.\n"
                        "Reasons to dislike it:\n- Too long.")
  msg = prompts.action_prompt(d.render(), "plot changes", profile="Loves noir.")
  assert msg[-1]["role"] == "user" and "Loves noir." in msg[-1]["content"]
  with pytest.raises(ValueError, match="category"):
    prompts.action_prompt("x", "bad category")


def test_dedupe_by_cosine_and_exact_text():
  texts = ["Add a dragon.", "add  a dragon.", "Add a wyvern.", "Make it a musical."]
  emb = np.array([[1.0, 0.0], [1.0, 0.0], [0.99, 0.14], [0.0, 1.0]])
  # cos(0, 2) = 0.99 / |(.99, .14)| = 0.990 >= 0.95 -> dropped; exact repeat dropped.
  assert actions.dedupe(texts, emb, threshold=0.95) == [0, 3]
  assert actions.dedupe(texts, emb, threshold=0.999) == [0, 2, 3]


def test_template_actions_use_missing_genres_and_tags():
  acts = actions.template_actions(["Comedy"], ["time travel"])
  texts = [a.text for a in acts]
  assert "Turn it into a horror film." in texts and "Turn it into a comedy film." not in texts
  assert "Add time travel elements to the story." in texts
  assert {a.category for a in acts} == set(prompts.ACTION_CATEGORIES)


class _ScriptedClient:
  """Answers from a fixed script keyed by seed (a network stand-in for logic tests)."""

  def __init__(self, script):
    self.script, self.calls = script, []

  async def sample(self, prompts_, *, max_tokens, temperature, seed):
    self.calls.append((prompts_[0][-1]["content"], seed))
    return [self.script[seed]]


def test_build_action_set_counts_failures_duplicates_and_tops_up():
  script = {10: "1. Make the hero a retired astronaut.", 11: "??", 12: "Make the hero a retired "
            "astronaut.", 13: "Add a storm that traps everyone in the house."}
  client = _ScriptedClient(script)
  encode = lambda texts: np.stack([np.eye(64)[hash(t.lower()) % 64] for t in texts])
  acts, stats = asyncio.run(actions.build_action_set(
      client=client, encode=encode, description="Plot: x", genres=["Drama"], tags=["storm"],
      profile="Likes space.", k=6, llm_calls=4, seed=10))
  assert len(acts) == 6
  assert stats.parse_failures == 1 and stats.duplicates == 1
  llm = [a for a in acts if a.source == "llm"]
  assert [a.text for a in llm] == ["Make the hero a retired astronaut.",
                                   "Add a storm that traps everyone in the house."]
  assert [a.personalised for a in llm] == [False, True]
  assert sum("Likes space." in c for c, _ in client.calls) == 2  # half of the calls personalised
  assert stats.templates_used == 4
