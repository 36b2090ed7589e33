"""Candidate action sets per anchor and per state (``actions.per_state``): the book's ids, the
state sets' requests, file and resume, and episodes, expansions and reference rows over them."""

import asyncio
import json
import os
import socket
import subprocess
import sys
import types

import jax
import ml_collections
import numpy as np
import pytest
from test_scale import _hash_encoder  # text -> a fixed pseudo-random vector

from configs import env_blocks, movielens_smoke
from eagle_jax import prompts, training
from eagle_jax.agent import action_book, reference, rollout
from eagle_jax.agent import world as world_lib
from eagle_jax.agent.env import ContentGapEnv
from eagle_jax.agent.features import TextFeatures
from eagle_jax.data import records
from eagle_jax.env import actions as actions_lib
from eagle_jax.env import build, standin
from eagle_jax.env.client import SamplingParams

PARAMS = SamplingParams(max_tokens=40, temperature=0.0, seed=0, chat=True)
DESCS = [{"movie_id": 100 + i, "item_index": i, "title": f"Movie {i}", "genres": ["Drama"],
          "tags": ["storm"]} for i in (2, 5, 7)]
PROFS = [{"user_id": 90, "user_index": 0, "ok": True, "profile": "Loves storms at sea.",
          "liked_genres": ["Adventure"]}]


class _Counting(standin.StandInBackend):
  """The stand-in backend, counting the prompts it answers."""

  def __init__(self):
    super().__init__()
    self.prompts = 0

  async def generate(self, prompts_, params, *, on_result=None):
    self.prompts += len(prompts_)
    return await super().generate(prompts_, params, on_result=on_result)


def _cfg(**kw):
  return env_blocks.actions_config(k=4, llm_calls=2, seed=1, personalised=True,
                                   sampling=dict(max_tokens=16, temperature=0.7), **kw)


def test_per_anchor_book_offers_the_anchor_set_everywhere_and_per_state_writes_new_states_once():
  sets = {5: ("s5", ["c", "d"]), 2: ("s2", ["a", "b"])}
  book = action_book.ActionBook(sets, 2)
  assert not book.per_state and len(book) == 2 and book.texts(0) == ["a", "b"]  # item order
  assert book.known(["anything", "else"], [5, 2]).tolist() == [1, 0]
  assert asyncio.run(book.ids(["x"], [5])).tolist() == [1]
  calls = []

  async def make(states, items):
    calls.append((list(states), list(items)))
    return [[x + "+1", x + "+2"] for x in states]

  book = action_book.ActionBook(sets, 2, make)
  assert book.missing(["s2", "x", "x", "y"]) == 2
  ids = asyncio.run(book.ids(["s2", "x", "x", "y", "s5"], [2, 2, 2, 5, 5]))
  assert ids.tolist() == [0, 2, 2, 3, 1] and calls == [(["x", "y"], [2, 5])]
  assert book.texts(3) == ["y+1", "y+2"]
  assert asyncio.run(book.ids(["y", "z"], [5, 2])).tolist() == [3, 4] and calls[-1] == (["z"], [2])
  assert book.stats() == {"per_state": 1, "anchor_sets": 2, "state_sets": 3}
  assert book.missing(["x", "z", "s5"]) == 0
  with pytest.raises(KeyError):
    book.known(["never seen"], [2])

  async def short(states, items):
    return [["only one"] for _ in states]

  with pytest.raises(ValueError, match="has 1 actions, expected K = 2"):
    asyncio.run(action_book.ActionBook(sets, 2, short).ids(["w"], [2]))


def test_state_sets_are_anchor_sets_written_on_the_state_text_and_resume_from_the_file(tmp_path):
  cfg, enc = _cfg(), _hash_encoder(64)
  out = tmp_path / "env" / "state_actions.jsonl"
  backend = _Counting()
  make = action_book.state_set_maker(cfg, backend, enc, DESCS, PROFS, str(out))
  states = ["A storm hits the village at night.", "The king finds a letter in the tower."]
  got = asyncio.run(make(states, [2, 5]))
  assert backend.prompts == 2 * cfg.llm_calls  # llm_calls requests per new state
  recs = {r["movie_id"]: r for r in records.read_jsonl(out, key="movie_id")}
  assert sorted(recs) == sorted(action_book.state_key(x) for x in states)
  for x, i, texts in zip(states, [2, 5], got):
    # Independently: the set ``build_action_sets`` writes for an anchor whose description is x.
    desc = {"movie_id": action_book.state_key(x), "item_index": i, "ok": True, "text": x,
            "genres": ["Drama"], "tags": ["storm"]}
    ref = asyncio.run(build.build_action_sets(standin.StandInBackend(), enc, [desc], PROFS, cfg))
    assert texts == [a["text"] for a in ref[0]["actions"]] and len(texts) == 4
    rec = recs[action_book.state_key(x)]
    assert rec["user_id"] == 90 and rec["item_index"] == i
    prompts_sent = [r["prompt"][-1]["content"] for r in rec["provenance"]["requests"]]
    assert all(x in p for p in prompts_sent)  # every request reads the state's own text
    assert sum("Loves storms at sea." in p for p in prompts_sent) == 1  # half personalised
  # A resumed run reads the file: the same sets, no request.
  again = _Counting()
  make2 = action_book.state_set_maker(cfg, again, enc, DESCS, PROFS, str(out))
  assert asyncio.run(make2(states[::-1], [5, 2])) == got[::-1] and again.prompts == 0
  # Macro actions are drawn from the state's own default actions.
  ccfg = _cfg(space="combined", macro_k=1, macro_size=2)
  mixed = asyncio.run(action_book.state_set_maker(ccfg, _Counting(), enc, DESCS, PROFS,
                                                  str(out))(states[:1], [2]))[0]
  defaults = [a["text"] for a in recs[action_book.state_key(states[0])]["actions"]]
  assert mixed[:3] == defaults[:3]
  parts = actions_lib.action_space(
      defaults, "combined", k=4, macro_size=2, macro_k=1,
      seed=records.derive_seed(1, "macro", action_book.state_key(states[0])))[3][1]
  assert mixed[3] == actions_lib.macro_text([defaults[p] for p in parts])
  assert action_book.state_sets_path("/w", 1, 2) == "/w/env/state_actions.1.jsonl"


def _world(tmp_path, k=4, d=3):
  rng = np.random.default_rng(0)
  env = ContentGapEnv(standin.StandInBackend(), PARAMS, _hash_encoder(d), rng.normal(size=(9, d)),
                      rng.normal(size=(6, d)), lam=0.5, k=2, max_sentences=2, max_in_flight=7)
  anchors = {i: types.SimpleNamespace(state=f"Movie {i} has a storm at sea.",
                                      actions=[f"Change {j} of {i}" for j in range(k)])
             for i in (2, 5, 7)}
  make = action_book.state_set_maker(_cfg(), standin.StandInBackend(), _hash_encoder(64), DESCS,
                                     PROFS, str(tmp_path / "state_actions.jsonl"))
  book = action_book.ActionBook.for_anchors(anchors, k, make)
  users = np.array([0, 1, 3])
  pairs = np.stack(np.meshgrid(users, np.array(sorted(anchors)), indexing="ij"), -1).reshape(-1, 2)
  return types.SimpleNamespace(env=env, anchors=anchors, num_actions=k, actions=book,
                               profiles={int(u): f"user {u}" for u in range(6)},
                               train_pairs=pairs.astype(np.int32),
                               policy_features=TextFeatures(_hash_encoder(5), 5))


def _child(x, a):
  return prompts.clean_paragraph(standin.answer(prompts.transition_prompt(f"Plot: {x}", a),
                                                PARAMS), max_sentences=2)


def test_episodes_and_expansions_offer_each_state_its_own_set(tmp_path):
  world = _world(tmp_path)
  feat = rollout.Featurizer(world, horizon=2)
  ep = asyncio.run(rollout.collect(world, feat, None, world.train_pairs[:6], jax.random.key(3)))
  book = world.actions
  anchor_ids = {i: n for n, i in enumerate(sorted(world.anchors))}  # anchor sets: item order
  assert ep.set_ids[:, 0].tolist() == [anchor_ids[int(i)] for i in ep.pairs[:, 1]]
  chosen = ep.action_texts(world)
  for b, row in enumerate(ep.texts):
    sid = int(ep.set_ids[b, 1])
    assert sid >= book.num_anchor_sets and book.known([row[1]], [0])[0] == sid
    # The second step's candidates are x_1's own set, featurised from its texts.
    np.testing.assert_array_equal(ep.action_feats[b, 1], feat.actions([sid])[0][0])
    assert chosen[b][1] == book.texts(sid)[ep.actions[b, 1]]
    assert chosen[b][1] not in world.anchors[int(ep.pairs[b, 1])].actions
    assert row[2] == _child(row[1], chosen[b][1])  # the environment applied that action
  # Expanding a state tries every action of its own set.
  x1, i = ep.texts[0][1], int(ep.pairs[0, 1])
  kids = asyncio.run(world_lib.expand(world, [x1], np.array([i])))[0]
  assert kids == [_child(x1, a) for a in book.texts(book.known([x1], [i])[0])]
  # Reference rows on visited states: each state's features come from its own set.
  cfg = reference.LabelConfig(episodes=3, rollout_batch=3, exploratory_m=2, design_dim=0,
                              design_eps=1e-3, design_max_iters=300, design_ridge=0.0)
  data = asyncio.run(reference.reference_dataset(reference.REFERENCES["uniform"], world, feat, cfg,
                                                 seed=0, reward="gain", key=jax.random.key(0)))
  texts, _, items, _ = asyncio.run(reference._rollout_states(  # noqa: SLF001
      world, feat, cfg, seed=0, reward="gain", key=jax.random.key(0),
      progress=training.Progress(1)))
  ids = book.known(texts, items)
  assert len(data) == len(texts) and (ids >= book.num_anchor_sets).sum() > 0
  np.testing.assert_array_equal(np.asarray(data.action_feats), feat.actions(ids)[0])


def test_per_state_must_be_a_bool():
  config = movielens_smoke.get_config("plot")
  # ConfigDict keeps a field's type; a config assembled from a dict (a JSON file) need not.
  config.actions = ml_collections.ConfigDict({**config.actions.to_dict(), "per_state": "yes"})
  with pytest.raises(training.ConfigError, match=r"config.actions.per_state: expected True or "):
    world_lib.check_config(config)


def _policy(states, action_feats):
  """A fixed scorer of the candidates (logits [N, K]) that reads the gathered action features."""
  return 3.0 * np.asarray(action_feats).sum(-1) + 0.0 * np.asarray(states).sum(-1, keepdims=True)


_WORKER = r"""
import asyncio, json, pathlib, sys
sys.path.insert(0, "tests")
import jax
from eagle_jax import hosts, parallel
port, pid, tmp = sys.argv[1], int(sys.argv[2]), pathlib.Path(sys.argv[3])
hosts.initialize(f"127.0.0.1:{port}", 2, pid)
import test_action_book as t
from eagle_jax.agent import rollout
world = t._world(tmp / f"process{pid}")
rows = hosts.process_rows(parallel.make_mesh({"data": -1}), 8)
ep = asyncio.run(rollout.collect(world, rollout.Featurizer(world, horizon=2), t._policy,
                                 world.train_pairs[:8], jax.random.key(3), greedy=True, rows=rows))
print(json.dumps({"rows": [rows.start, rows.stop], "texts": ep.texts,
                  "actions": ep.action_texts(world), "sets": world.actions.stats()}), flush=True)
"""


def test_two_processes_collect_per_state_episodes_as_one_process_does(tmp_path):
  """Each process writes the sets of its own rows' states; the policy scores every row's gathered
  candidates, so each episode is the one process's: the same states and actions."""
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1")
  procs = [subprocess.Popen([sys.executable, "-c", _WORKER, str(port), str(i), str(tmp_path)],
                            cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True) for i in range(2)]
  outs = [p.communicate(timeout=300) for p in procs]
  for p, (_, err) in zip(procs, outs):
    assert p.returncode == 0, err[-3000:]
  world = _world(tmp_path / "one")
  one = asyncio.run(rollout.collect(world, rollout.Featurizer(world, horizon=2), _policy,
                                    world.train_pairs[:8], jax.random.key(3), greedy=True))
  got = [json.loads(out.strip().splitlines()[-1]) for out, _ in outs]
  assert sorted(tuple(r["rows"]) for r in got) == [(0, 4), (4, 8)]
  for r in got:
    lo, hi = r["rows"]
    assert r["texts"] == one.texts[lo:hi] and r["actions"] == one.action_texts(world)[lo:hi]
    assert r["sets"]["state_sets"] == len({row[1] for row in one.texts[lo:hi]})  # its rows only
  assert any(a[1] not in world.anchors[int(i)].actions
             for a, (_, i) in zip(one.action_texts(world), one.pairs))
