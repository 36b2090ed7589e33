"""End to end with real models: a tiny run trained with SmolLM2, evaluated with Gemma 3 270M as the
test environment (environment transfer) and SmolLM2 as an AI rater."""

import glob
import json
import os

import numpy as np
import pytest
import tiny_run

TRAIN = ("--config.reference.steps=10", "--config.rl.steps=10", "--config.checkpoint.every=5",
         # The paper's world's switches (movielens_smoke.paper_world) at their cheapest, on the tiny
         # plot run: description states with 1 + 1 reasons, two-heading LLM profiles, personalised
         # action sets (prefix sharing stays off, as in tiny_run).
         "--config.env.states=description", "--config.descriptions.n_reasons=1",
         "--config.descriptions.reason_tokens=16", "--config.descriptions.sampling.temperature=0.7",
         "--config.profiles.kind=llm", "--config.profiles.headings=('Overall','Genre')",
         "--config.profiles.tokens=16", "--config.actions.personalised=True",
         "--config.world.ed_descriptions=3")
EVAL = [
    "--config.eval.transfer.enabled=True", "--config.eval.rater.enabled=True",
    "--config.eval.rater.pairs=3",
    "--config.eval.rater.policies=('random','agent[g_optimal]','agent[g_optimal]/greedy')",
]


def _run(module, workdir, extra=()):
  return tiny_run.run(module, workdir, *TRAIN, *extra)


@pytest.mark.slow
def test_transfer_and_rater_sections(tmp_path):
  work = str(tmp_path / "run")
  _run("launch.train", work)
  _run("launch.evaluate", work, EVAL)
  _check_paper_world(work)
  (path,) = glob.glob(os.path.join(work, "eval-*", "report.json"))
  with open(path) as f:
    report = json.load(f)
  t = report["transfer"]
  assert t["train_env_model"] == report["env"]["model"]
  assert t["test_env_model"] != t["train_env_model"] and "+chat:" in t["test_env_model"]
  assert t["test_env"]["transitions"] > 0
  for split, by_policy in t["side_by_side"].items():
    main = report["splits"][split]["policies"]
    test = t["splits"][split]["policies"]
    assert set(by_policy) == set(main) == set(test)
    for name, row in by_policy.items():
      assert row["train_env_gain"]["mean"] == pytest.approx(main[name]["gain"]["mean"], abs=1e-9)
      assert row["test_env_gain"]["mean"] == pytest.approx(test[name]["gain"]["mean"], abs=1e-9)
      diff = np.asarray(test[name]["gain_per_pair"]) - np.asarray(main[name]["gain_per_pair"])
      assert row["test_minus_train"]["mean"] == pytest.approx(diff.mean(), abs=1e-6)  # float32 gains
  # The anchors' descriptions are frozen from training: step 0 is the same in both environments.
  for split in t["splits"]:
    a = report["splits"][split]["policies"]["random"]["utility_by_step"][0]
    b = t["splits"][split]["policies"]["random"]["utility_by_step"][0]
    assert a == pytest.approx(b, abs=1e-6)
  r = report["rater"]
  assert r["model"] == report["env"]["model"]
  for block in r["splits"].values():
    assert block["pairs"] == 3
    qs = block["questions"]
    assert set(qs) == {"user", "overall", "distance"}
    assert set(qs["user"]) == {"random", "agent[g_optimal]", "agent[g_optimal]/greedy"}
    assert "random" not in qs["distance"]
    for q in qs.values():
      for row in q.values():
        assert row["items"] == 3 and row["asked"] == 6
        assert 0 <= row["parse_failures"] <= 6
        if row["score"]["n"]:
          assert 0.0 <= row["score"]["mean"] <= 1.0
  # Table 2 carries the rater's scores of the rated policies as columns.
  for split, block in r["splits"].items():
    rows = {x["policy"]: x for x in report["tables"]["table2"][split]}
    want = block["questions"]["user"]["agent[g_optimal]"]["score"]
    got = rows["agent[g_optimal]"]["rater_user"]
    assert got["n"] == want["n"] and (want["n"] == 0 or got["mean"] == want["mean"])
    assert rows["reference[g_optimal]"]["rater_user"] is None  # not among the rated policies
  # A rerun replays both environments and the rater from the response caches: same report.
  _run("launch.evaluate", work, EVAL)
  with open(path) as f:
    again = json.load(f)
  assert again["transfer"]["side_by_side"] == t["side_by_side"]
  assert again["rater"] == r


def _check_paper_world(work):
  """world.json of the paper's world: reasons in the states, LLM profiles with their headings, about
  half of each anchor's actions personalised to a recorded profile, against env/*.jsonl."""
  from eagle_jax import prompts  # noqa: PLC0415

  with open(os.path.join(work, "world.json")) as f:
    world = json.load(f)
  with open(os.path.join(work, "env", "profiles.jsonl")) as f:
    profiles = {r["user_id"]: r for r in map(json.loads, f)}
  assert world["anchors"] and all(v == "llm" for v in world["profile_source"].values())
  for text in world["profiles"].values():
    if text is not None:
      assert text.startswith("Overall preferences: ")
      assert [x.split(":")[0] for x in text.split("\n")] in (
          ["Overall preferences"], ["Overall preferences", "Genre preferences"])
  for a in world["anchors"].values():
    desc = prompts.Description.parse(a["state"])
    assert (desc.plot, list(desc.likes), list(desc.dislikes)) == (a["plot"], a["likes"],
                                                                   a["dislikes"])
    assert len(a["likes"]) <= 1 and len(a["dislikes"]) <= 1
    n = sum(x["personalised"] for x in a["actions_detail"])
    assert n == a["personalised_actions"] and a["personalised_share"] == n / len(a["actions"])
    assert 0 < a["personalised_share"] < 1  # K = 2: one personalised, one generic
    source = profiles[a["personalised_to_user"]]
    assert source["user_index"] == a["personalised_to_user_index"] and source["ok"]
    assert str(source["user_index"]) in world["profiles"]
  # The paper's profile consistency check on the LLM profiles (env/profile_check.py): every user
  # with a profile is counted on its side of the split, and the verdict is the recorded comparison.
  pc = world["profile_check"]
  with_profile = [r["user_index"] for r in profiles.values() if r["ok"]]
  assert pc["users_train"] + pc["users_heldout"] == len(with_profile) and pc["users_heldout"] >= 1
  assert pc["heldout_l2"] > 0 and pc["nearest_user_l2"] > 0 and pc["mean_user_l2"] > 0
  assert pc["passed"] == (pc["heldout_l2"] < pc["nearest_user_l2"])
  # E_D trained on the anchors' descriptions and 3 more movies', rows as the states read them.
  with open(os.path.join(work, "env", "descriptions.jsonl")) as f:
    descs = [json.loads(x) for x in f]
  assert len(descs) == len(world["anchors"]) + 3
  with open(os.path.join(work, "encoder", "texts.jsonl")) as f:
    texts = [json.loads(x) for x in f]
  ok = [d["text"] for d in descs if d["ok"]]
  assert texts[-len(ok):] == ok and all(t.startswith("Plot: ") for t in ok)
  split = np.load(os.path.join(work, "encoder", "split.npz"), allow_pickle=False)
  held = int(np.sum(split["heldout_row"] & (split["kind"] == "description")))
  assert world["encoder_description_rows"] == held
  assert (world["encoder_description_r2"] is None) == (held < 2)  # R^2 of 0 or 1 row: None
  # E_D on the anchors' states and their K = 2 cached next states each.
  ed = world["ed_on_states"]
  assert ed["anchors"] == len(world["anchors"]) and ed["next_states"] == 2 * ed["anchors"]
  assert ed["r2_anchor_states"] < 1 and ed["mean_move_l2"] > 0
