"""Paper-scale plumbing: bounded feature memo, bounded in-flight requests, per-anchor reference
targets, the streamed world record and the stand-in environment."""

import asyncio
import hashlib
import json
import types

import jax
import ml_collections
import numpy as np
import pytest

from eagle_jax import prompts, training
from eagle_jax.agent import action_book, reference, rollout
from eagle_jax.agent import world as world_lib
from eagle_jax.agent.env import ContentGapEnv
from eagle_jax.agent.features import TextFeatures
from eagle_jax.env import inflight, standin
from eagle_jax.env.client import SamplingParams

PARAMS = SamplingParams(max_tokens=40, temperature=0.0, seed=0, chat=True)


def test_text_features_lru_memo_is_bounded_and_drops_the_least_recent():
  calls = []

  def encode(texts):
    calls.append(list(texts))
    return np.array([[len(t), ord(t[0])] for t in texts], np.float32)

  f = TextFeatures(encode, 2, max_entries=2)
  # A call larger than the memo still answers every text.
  np.testing.assert_array_equal(f(["a", "bb", "ccc", "a"]), [[1, 97], [2, 98], [3, 99], [1, 97]])
  assert len(f) == 2  # "a" (least recent) dropped
  f(["bb"])  # a hit: "bb" becomes the most recent, "ccc" the least
  f(["d"])  # drops "ccc"
  f(["bb", "ccc"])  # "ccc" is encoded again, "bb" is not
  assert calls == [["a", "bb", "ccc"], ["d"], ["ccc"]] and f.encoded == 5 and len(f) == 2
  with pytest.raises(ValueError, match="max_entries=-1"):
    TextFeatures(encode, 2, max_entries=-1)


class _Counting:
  """Backend wrapper recording the most requests ever outstanding at once."""

  def __init__(self, inner):
    self.inner, self.now, self.peak, self.sizes = inner, 0, 0, []

  async def generate(self, prompts_, params, on_result=None):
    self.now += len(prompts_)
    self.peak = max(self.peak, self.now)
    self.sizes.append(len(prompts_))
    await asyncio.sleep(0)  # let the other workers start their calls
    try:
      return await self.inner.generate(prompts_, params)
    finally:
      self.now -= len(prompts_)


@pytest.mark.parametrize("limit", [1, 3, 7, 600])
def test_bounded_requests_equal_one_call_and_never_exceed_the_limit(limit, monkeypatch):
  monkeypatch.setattr(inflight, "MAX_CALL", 2)  # several workers even for small limits
  msgs = [f"prompt {i}" for i in range(23)]
  params = [PARAMS.replace(seed=i % 3) for i in range(23)]
  once = asyncio.run(standin.StandInBackend().generate(msgs, params))
  client = _Counting(standin.StandInBackend())
  got = asyncio.run(inflight.generate_bounded(client, msgs, params, limit))
  assert [c.text for c in got] == [c.text for c in once]
  assert client.peak <= limit and sum(client.sizes) == 23
  if limit < 23:
    assert client.peak == min(limit, 2 * max(1, limit // 2))


def test_standin_environment_is_a_pure_function_of_prompt_and_params():
  a, b = standin.StandInBackend(), standin.StandInBackend()
  msg = [prompts.transition_prompt("Plot: A ship.", "Add a storm")]
  x = asyncio.run(a.generate(msg, [PARAMS]))[0].text
  assert x == asyncio.run(b.generate(msg, [PARAMS]))[0].text == standin.answer(msg[0], PARAMS)
  assert x != asyncio.run(a.generate(msg, [PARAMS.replace(seed=1)]))[0].text
  other = [prompts.transition_prompt("Plot: A ship.", "Add a ghost")]
  assert x != asyncio.run(a.generate(other, [PARAMS]))[0].text
  assert prompts.clean_paragraph(x, max_sentences=2) == x and a.calls == 3


def _hash_encoder(d):
  def encode(texts):
    return np.stack([np.random.default_rng(int.from_bytes(
        hashlib.sha256(t.encode()).digest()[:8], "big")).normal(size=d) for t in texts]
                    ).astype(np.float32)
  return encode


def _tiny_world(k=4, d=3):
  rng = np.random.default_rng(0)
  backend = standin.StandInBackend()
  env = ContentGapEnv(backend, PARAMS, _hash_encoder(d), rng.normal(size=(9, d)),
                      rng.normal(size=(6, d)), lam=0.5, k=2, max_sentences=2, max_in_flight=5)
  anchors = {i: types.SimpleNamespace(state=f"Movie {i} has a plot.",
                                      actions=[f"Change {j} of {i}" for j in range(k)])
             for i in (2, 5, 7)}
  users = np.array([0, 1, 3])
  pairs = np.stack(np.meshgrid(users, np.array(sorted(anchors)), indexing="ij"), -1).reshape(-1, 2)
  world = types.SimpleNamespace(env=env, anchors=anchors, num_actions=k,
                                actions=action_book.ActionBook.for_anchors(anchors, k),
                                profiles={int(u): f"user {u}" for u in range(6)},
                                train_pairs=pairs.astype(np.int32),
                                policy_features=TextFeatures(_hash_encoder(5), 5))
  return world, backend


def _labels(**kw):
  return reference.LabelConfig(episodes=1, rollout_batch=1, exploratory_m=2, design_dim=0,
                               design_eps=1e-3, design_max_iters=300, design_ridge=0.0, **kw)


def test_per_anchor_targets_equal_numpy_and_the_visited_state_path():
  world, backend = _tiny_world()
  feat = rollout.Featurizer(world, horizon=2)
  cfg = _labels(states="anchors", users_per_anchor=2, chunk=4)
  data = asyncio.run(reference.reference_dataset(
      reference.REFERENCES["optimistic"], world, feat, cfg, seed=0, reward="gain",
      key=jax.random.key(0)))
  # Each anchor's K children are asked for once, whatever its number of users.
  assert backend.calls == 3 * 4 and len(data) == 6 and data.stats["state_set"] == "anchors"
  texts, users, items, _ = reference.anchor_states(world, 2, 0)
  assert items.tolist() == [2, 2, 5, 5, 7, 7]
  assert all((u, i) in set(map(tuple, world.train_pairs.tolist())) for u, i in zip(users, items))
  # Independent reference: children from the stand-in by hand, U(z) in numpy.
  enc = _hash_encoder(3)
  z_items = np.asarray(world.env.item_table)
  for n, (u, i) in enumerate(zip(users, items)):
    kids = [prompts.clean_paragraph(standin.answer(prompts.transition_prompt(
        f"Plot: {world.anchors[i].state}", a), PARAMS), max_sentences=2)
            for a in world.anchors[i].actions]
    z = enc(kids)
    dist = np.sort(np.linalg.norm(z[:, None] - z_items[None], axis=-1), -1)[:, :2].sum(-1)
    util = z @ world.env.user_table[u] + 0.5 * dist
    assert data.targets[n].tolist() == np.eye(4)[np.argmax(util)].tolist()
  # The same states through the visited-state labeller in one call: the same targets.
  old, _ = asyncio.run(reference.REFERENCES["optimistic"].label(
      world, reference.Visited(texts, users, items, np.ones((6, 4), bool)), cfg,
      jax.random.key(0)))
  np.testing.assert_array_equal(data.targets, old)
  np.testing.assert_array_equal(data.state, feat.state(users, texts, 0))
  np.testing.assert_array_equal(data.action_feats[np.array([5, 0])],
                                feat.actions(world.actions.known([], items[[5, 0]]))[0])
  assert data.action_feats.shape == (6, 4, feat.action_dim) and data.mask.all()


def test_g_optimal_in_one_chunk_equals_the_unchunked_labelling():
  world, _ = _tiny_world()
  feat = rollout.Featurizer(world, horizon=2)
  key = jax.random.key(1)
  data = asyncio.run(reference.reference_dataset(
      reference.REFERENCES["g_optimal"], world, feat, _labels(states="anchors", chunk=64),
      seed=0, reward="gain", key=key))
  texts, users, items, _ = reference.anchor_states(world, 1, 0)
  old, _ = asyncio.run(reference.REFERENCES["g_optimal"].label(
      world, reference.Visited(texts, users, items, np.ones((3, 4), bool)),
      _labels(), key))
  np.testing.assert_array_equal(data.targets, old)
  np.testing.assert_allclose(data.targets.sum(-1), 1.0)


def test_label_config_fields_are_checked_by_name():
  ref = ml_collections.ConfigDict(dict(episodes=1, rollout_batch=1, exploratory_m=1, design_dim=0,
                                       design_eps=1e-3, design_max_iters=1, design_ridge=0.0,
                                       states="visited", users_per_anchor=1, chunk=8))
  with pytest.raises(training.ConfigError, match=r"config.reference.states='visited'"):
    reference.LabelConfig.from_config(ref)
  ref.states, ref.chunk = "anchors", 0
  with pytest.raises(training.ConfigError, match=r"config.reference.chunk=0"):
    reference.LabelConfig.from_config(ref)


def test_world_record_streams_pairs_and_round_trips(tmp_path):
  anchor = world_lib.Anchor(4, "T", "A plot.", ["a", "b"], ["template:x", "template:y"])
  rng = np.random.default_rng(0)
  world = types.SimpleNamespace(
      anchors={4: anchor}, profiles={1: "p"}, num_actions=2, info={"latent_dim": 3},
      train_pairs=rng.integers(0, 50, size=(5000, 2)).astype(np.int32),
      heldout_pairs={"new_users": np.array([[1, 4]], np.int32),
                     "new_anchors": np.zeros((0, 2), np.int32)})
  data = types.SimpleNamespace(
      descriptions=[{"movie_id": 40, "item_index": 4, "source": "llm", "plot": "A plot.",
                     "likes": [], "dislikes": []}],
      action_sets=[{"movie_id": 40, "user_id": 11, "actions": [
          {"text": "a", "personalised": True}, {"text": "b", "personalised": False}]}],
      profiles=[{"user_id": 11, "user_index": 1, "source": "template"}])
  world_lib.write_world(world, str(tmp_path), types.SimpleNamespace(user_ids=np.arange(5)), data)
  record = json.loads((tmp_path / "world.json").read_text())
  assert "train_pairs" not in record and record["pair_counts"]["train"] == 5000
  assert (tmp_path / "world.json").stat().st_size < 5000  # no pair lists in the JSON
  pairs = world_lib.load_pairs(str(tmp_path))
  np.testing.assert_array_equal(pairs["train"], world.train_pairs)
  np.testing.assert_array_equal(pairs["new_users"], [[1, 4]])
  assert pairs["new_anchors"].shape == (0, 2) and record["anchors"]["4"]["title"] == "T"
  a = record["anchors"]["4"]
  assert (a["state"], a["personalised_actions"], a["personalised_share"]) == ("A plot.", 1, 0.5)
  assert a["personalised_to_user"] == 11 and a["personalised_to_user_index"] == 1
  np.save(tmp_path / "world" / "train_pairs.npy", np.zeros((3, 3), np.int32))
  with pytest.raises(ValueError, match=r"train_pairs.npy: expected \[5000, 2\]"):
    world_lib.load_pairs(str(tmp_path))


def test_bounded_response_cache_keeps_the_most_recent_answers_and_re_asks_the_rest(tmp_path):
  from eagle_jax.env import cache as cache_lib  # noqa: PLC0415

  path = tmp_path / "cache.jsonl"
  backend = standin.StandInBackend()
  client = cache_lib.CachedClient(backend, cache_lib.ResponseCache(path, max_entries=3))
  msgs = [f"prompt {i}" for i in range(5)]
  params = [PARAMS] * 5
  expect = [standin.answer(m, PARAMS) for m in msgs]
  # A call larger than the memory still answers every prompt (duplicates asked once).
  got = asyncio.run(client.generate(msgs + msgs[:1], params + params[:1]))
  assert [c.text for c in got] == expect + expect[:1] and backend.calls == 5
  assert len(client.cache) == 3  # the 3 most recent remembered
  got = asyncio.run(client.generate(msgs[4:] + msgs[:1], params[:2]))
  assert [c.text for c in got] == [expect[4], expect[0]] and backend.calls == 6  # 0 re-asked
  client.cache.close()
  assert len(path.read_text().splitlines()) == 6  # every answer on disk, the re-asked one twice
  reloaded = cache_lib.ResponseCache(path, max_entries=2)
  assert len(reloaded) == 2 and reloaded.duplicate_lines == 0
  full = cache_lib.ResponseCache(path)
  assert len(full) == 5 and full.duplicate_lines == 1
  with pytest.raises(ValueError, match="max_entries"):
    cache_lib.ResponseCache(path, max_entries=-1)
