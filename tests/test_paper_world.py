"""The paper's world (PAPER_SPEC.md sections 1.5 and 1.6): description states with reasons,
profiles under the paper's headings, action sets personalised to a randomly drawn profile."""

import asyncio

import numpy as np
import pytest
from scipy import stats

from configs import env_blocks
from eagle_jax import prompts
from eagle_jax.agent.env import ContentGapEnv
from eagle_jax.data import catalog, records
from eagle_jax.env import actions, build
from eagle_jax.env.client import Completion, SamplingBackend, SamplingParams

PARAMS = SamplingParams(max_tokens=16)


class _Scripted(SamplingBackend):
  """Answers each prompt with ``answer(last user message)``; records every prompt."""

  model_id = "scripted"
  default_chat = True

  def __init__(self, answer):
    self.answer, self.prompts = answer, []

  async def generate(self, prompts_, params, *, on_result=None):
    out = []
    for i, p in enumerate(prompts_):
      self.prompts.append(p)
      c = Completion(self.answer(p[-1]["content"]), "stop")
      if on_result is not None:
        on_result(i, c)
      out.append(c)
    return out


@pytest.mark.parametrize("desc", [
    prompts.Description("A heist goes wrong."),
    prompts.Description("A heist goes wrong.", ("Tense scenes.",)),
    prompts.Description("A heist goes wrong. Twice.", ("Tense scenes.", "Great cast."),
                        ("Too long.", "Thin plot.")),
    prompts.Description("A heist.", (), ("Too long.",)),
])
def test_description_parse_inverts_render(desc):
  assert prompts.Description.parse(desc.render()) == desc


def test_description_parse_reads_a_bare_plot_and_rejects_a_broken_list():
  assert prompts.Description.parse("Just a plot.") == prompts.Description("Just a plot.")
  with pytest.raises(prompts.ParseError, match="reason line"):
    prompts.Description.parse("Plot: x\nReasons to like it:\nnot an item")


def _env(client, reasons):
  return ContentGapEnv(client, PARAMS, lambda t: np.zeros((len(t), 2), np.float32),
                       np.eye(2, dtype=np.float32), np.ones((1, 2), np.float32), lam=0.1, k=1,
                       max_sentences=2, reasons=reasons)


def test_transition_of_a_description_rewrites_the_plot_and_keeps_the_reasons():
  new_plot = "The heist now happens on the moon. The crew must breathe carefully."
  client = _Scripted(lambda msg: new_plot if "moon" in msg else "Too short.")
  state = prompts.Description("A heist goes wrong in Paris.", ("Tense scenes.", "Great cast."),
                              ("Too long.",)).render()
  out = asyncio.run(_env(client, True).step([state, state], ["Set it on the moon.", "Other."]))
  # The environment saw the whole description (reasons included) and the action.
  shown = client.prompts[0][-1]["content"]
  assert shown.startswith(state + "\n\nChange: Set it on the moon.")
  assert prompts.Description.parse(out[0]) == prompts.Description(
      new_plot, ("Tense scenes.", "Great cast."), ("Too long.",))
  assert out[1] == state  # an answer that is not a plot leaves the state as it was
  # Plot-only states: the prompt shows "Plot: <state>" and the next state is the bare plot.
  plain = _Scripted(lambda msg: new_plot)
  env = _env(plain, False)
  assert asyncio.run(env.step(["A heist goes wrong."], ["Set it on the moon."])) == [new_plot]
  assert plain.prompts[0][-1]["content"].startswith("Plot: A heist goes wrong.\n\nChange:")
  # The transfer environment shares everything but the client.
  other = env.with_client(client)
  assert other.client is client and env.client is plain and other.reasons == env.reasons
  assert other.steps == 0 and env.steps == 1


def test_profile_draw_is_uniform_and_a_function_of_the_movie():
  draws = np.array([build.profile_draw(7, m, 4) for m in range(4000)])
  assert draws.min() == 0 and draws.max() == 3
  assert stats.chisquare(np.bincount(draws, minlength=4)).pvalue > 1e-3
  assert [build.profile_draw(7, m, 4) for m in (5, 3, 5)] == [draws[5], draws[3], draws[5]]
  assert not np.array_equal(draws, [build.profile_draw(8, m, 4) for m in range(4000)])


def _users(n):
  return [catalog.User(u, u, (f"Liked {u}",), (f"Disliked {u}",), ("Comedy",)) for u in range(n)]


def test_llm_profiles_have_one_section_per_heading_in_order(tmp_path):
  def answer(msg):
    if "Liked 1" in msg and "overall" in msg:
      return "No."  # user 1's first section never parses: no profile
    if "aesthetic" in msg:
      return "?"  # a later section that fails is left out
    return f"This viewer section text about {msg.split('Describe ')[1][:30]}."

  cfg = env_blocks.profiles_config(headings=("Overall", "Genre", "Aesthetic"), retries=0)
  client = _Scripted(answer)
  recs = asyncio.run(build.profile_users(client, _users(2), cfg, tmp_path / "p.jsonl"))
  assert len(client.prompts) == 6  # 2 users x 3 headings
  ok, failed = recs
  lines = ok["profile"].split("\n")
  assert [x.split(":")[0] for x in lines] == ["Overall preferences", "Genre preferences"]
  assert "overall movie" in lines[0] and "genres this viewer" in lines[1]
  assert ok["ok"] and ok["source"] == "llm"
  assert [c["purpose"] for c in ok["provenance"]["calls"]] == ["Overall", "Genre", "Aesthetic"]
  assert ok["provenance"]["parse_failures"] == 1
  seeds = [c["params"]["seed"] for c in ok["provenance"]["calls"]]
  assert seeds == [records.derive_seed(0, "profile", 0, h, 0)
                   for h in ("Overall", "Genre", "Aesthetic")]
  assert not failed["ok"] and failed["profile"] is None


def test_bad_profile_headings_name_the_field():
  cfg = env_blocks.profiles_config(headings=("Overall", "Mood"))
  c = type("C", (), {})()
  c.descriptions, c.profiles, c.actions = (env_blocks.descriptions_config(), cfg,
                                           env_blocks.actions_config())
  with pytest.raises(ValueError, match=r"config\.profiles\.headings"):
    build.check_config(c)


def test_action_spaces_of_table_4():
  acts = [f"Change number {i}." for i in range(6)]
  default = actions.action_space(acts, "default", k=4, macro_size=3, macro_k=0, seed=1)
  assert default == [(a, (i,)) for i, a in enumerate(acts[:4])]
  macro = actions.action_space(acts, "macro", k=5, macro_size=3, macro_k=0, seed=1)
  assert len(macro) == 5 and len({p for _, p in macro}) == 5
  for text, parts in macro:
    assert len(parts) == 3 and len(set(parts)) == 3
    assert text == ("Make these changes together: " +
                    " ".join(f"({j + 1}) Change number {i}." for j, i in enumerate(parts)))
  assert macro == actions.action_space(acts, "macro", k=5, macro_size=3, macro_k=0, seed=1)
  assert macro != actions.action_space(acts, "macro", k=5, macro_size=3, macro_k=0, seed=2)
  combined = actions.action_space(acts, "combined", k=5, macro_size=2, macro_k=2, seed=1)
  assert combined[:3] == default[:3] and [len(p) for _, p in combined] == [1, 1, 1, 2, 2]
  # Uniform over ordered tuples: every (first, second) pair of 4 actions about equally often.
  many = actions.action_space(acts[:4], "macro", k=12, macro_size=2, macro_k=0, seed=0)
  assert sorted(p for _, p in many) == [(i, j) for i in range(4) for j in range(4) if i != j]
  with pytest.raises(ValueError, match="only 6 exist"):
    actions.action_space(acts[:3], "macro", k=7, macro_size=2, macro_k=0, seed=0)
  with pytest.raises(ValueError, match="expected one of"):
    actions.action_space(acts, "mega", k=2, macro_size=2, macro_k=0, seed=0)


@pytest.mark.parametrize("field, value, match", [
    ("space", "mega", r"config\.actions\.space"),
    ("macro_k", 0, r"config\.actions\.macro_k"),
    ("macro_size", 1, r"config\.actions\.macro_size"),
])
def test_bad_action_space_fields_name_the_field(field, value, match):
  c = type("C", (), {})()
  c.descriptions, c.profiles = env_blocks.descriptions_config(), env_blocks.profiles_config()
  c.actions = env_blocks.actions_config(space="combined", macro_k=2)
  c.actions[field] = value
  with pytest.raises(ValueError, match=match):
    build.check_config(c)


@pytest.mark.parametrize("variant", ["", "no_personal", "macro", "combined"])
def test_study_configs_are_the_paper_world_and_pass_the_checks(variant):
  from configs import movielens_study  # noqa: PLC0415
  from eagle_jax import training  # noqa: PLC0415
  from eagle_jax.agent import trainer, world  # noqa: PLC0415

  c = movielens_study.get_config(variant)
  world.check_config(c)
  trainer.validate(c, training.build_mesh({"data": -1}))
  assert c.world.num_train_anchors >= 40 and c.world.num_heldout_anchors >= 12
  assert c.actions.k >= 10 and c.env.states == "description" and c.profiles.kind == "llm"
  assert c.llm.share_prefix
  assert c.actions.personalised == (variant != "no_personal")
  assert c.rl.horizon == (1 if variant == "macro" else 2)
  with pytest.raises(ValueError, match="unknown variant"):
    movielens_study.get_config("huge")


def test_the_quick_start_builds_the_paper_world_and_plot_is_the_fast_switch():
  """``launch.main``'s default config (the quick start) is the paper's world; ``:plot`` only
  changes the world; ``:paper`` is the default's name."""
  from configs import movielens_smoke  # noqa: PLC0415
  from eagle_jax import training  # noqa: PLC0415
  from eagle_jax.agent import trainer, world  # noqa: PLC0415

  c, plot = movielens_smoke.get_config(), movielens_smoke.get_config("plot")
  assert (c.env.states, c.descriptions.n_reasons, c.profiles.kind) == ("description", 5, "llm")
  assert c.actions.personalised and c.world.ed_descriptions > 0
  assert (plot.env.states, plot.descriptions.n_reasons, plot.profiles.kind) == ("plot", 0,
                                                                                "template")
  assert not plot.actions.personalised and plot.world.ed_descriptions == 0
  assert c.to_dict() == movielens_smoke.get_config("paper").to_dict()
  world_fields = {"env", "descriptions", "profiles", "actions", "world", "llm"}
  assert {k for k in c.keys() if c[k] != plot[k]} <= world_fields
  world.check_config(c)
  trainer.validate(c, training.build_mesh({"data": -1}))
  with pytest.raises(ValueError, match="unknown variant"):
    movielens_smoke.get_config("papr")


def test_bad_world_and_encoder_row_fields_name_the_field():
  from configs import movielens_smoke  # noqa: PLC0415
  from eagle_jax.agent import world  # noqa: PLC0415
  from eagle_jax.embed import encoder_train  # noqa: PLC0415

  c = movielens_smoke.get_config("paper")
  assert c.world.ed_descriptions > 0
  c.world.ed_descriptions = -1
  with pytest.raises(ValueError, match=r"world\.ed_descriptions"):
    world.check_config(c)
  enc = movielens_smoke.get_config().encoder
  enc.description_rows = "summary"
  with pytest.raises(ValueError, match=r"encoder\.description_rows: expected one of"):
    encoder_train.check_config(enc, "config.encoder", inputs=False)
