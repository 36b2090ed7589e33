"""Environment-data pipeline: batching, JSONL with provenance, config checks, resume, real SmolLM2
descriptions."""

import asyncio
import json

import ml_collections
import numpy as np
import pytest

from configs import env_blocks
from eagle_jax import prompts
from eagle_jax.data import catalog, records
from eagle_jax.data.types import RatingsData
from eagle_jax.env import build
from eagle_jax.env.batching import BatchingClient
from eagle_jax.env.cache import CachedClient, ResponseCache, cache_key
from eagle_jax.env.client import Completion, SamplingBackend, SamplingParams


class _Echo(SamplingBackend):
  """A backend whose answer names the prompt's last message and seed; counts generate calls."""

  model_id = "echo"
  default_chat = True

  def __init__(self):
    self.calls = []

  async def generate(self, prompts_, params, *, on_result=None):
    self.calls.append(len(prompts_))
    out = []
    for i, (p, q) in enumerate(zip(prompts_, params)):
      c = Completion(f"Answer for seed {q.seed} about {str(p)[-20:]}.", "stop")
      if on_result is not None:
        on_result(i, c)
      out.append(c)
    return out


def test_derive_seed_is_stable_and_distinct():
  assert records.derive_seed(0, "plot", 1, 0) == records.derive_seed(0, "plot", 1, 0)
  seeds = {records.derive_seed(s, k, m, a) for s in (0, 1) for k in ("plot", "like")
           for m in (1, 2) for a in (0, 1)}
  assert len(seeds) == 16 and all(0 <= s < 2**31 for s in seeds)


def test_batching_client_merges_concurrent_calls_without_changing_answers():
  inner = _Echo()
  client = BatchingClient(inner)

  async def go():
    return await asyncio.gather(*[client.sample([f"prompt {i}"], max_tokens=4, seed=100 + i)
                                  for i in range(5)])

  merged = asyncio.run(go())
  assert inner.calls == [5]  # one inner call for five concurrent sample calls
  alone = [asyncio.run(_Echo().sample([f"prompt {i}"], max_tokens=4, seed=100 + i))
           for i in range(5)]
  assert merged == alone
  assert merged[3] == ["Answer for seed 103 about prompt 3."]


def test_jsonl_append_and_read_skip_a_truncated_line(tmp_path):
  path = tmp_path / "x.jsonl"
  records.append_jsonl(path, [{"movie_id": 1, "a": "x"}, {"movie_id": 2}])
  with open(path, "ab") as f:
    f.write(b'{"movie_id": 3, "trunc')  # a killed writer
  records.append_jsonl(path, [{"movie_id": 4}, {"movie_id": 1, "a": "dup"}])
  recs = records.read_jsonl(path, key="movie_id")
  assert [r["movie_id"] for r in recs] == [1, 2, 4]
  assert recs[0]["a"] == "x"  # the first record of a key wins
  assert records.read_jsonl(tmp_path / "missing.jsonl") == []


def _toy_ratings():
  # 3 users, 4 items; ratings hand-placed.
  user = np.array([0, 0, 0, 0, 1, 1, 2], np.int32)
  item = np.array([0, 1, 2, 3, 0, 2, 0], np.int32)
  rating = np.array([5, 1, 5, 3, 4, 2, 1], np.float32)
  ts = np.array([10, 11, 12, 13, 14, 15, 16], np.int64)
  return RatingsData(user, item, rating, ts, np.array([7, 8, 9]), np.array([11, 12, 13, 14]),
                     ["A (1990)", "B (1991)", "C (1992)", "D (1993)"],
                     [("Drama",), ("Comedy",), ("Drama", "War"), ()], [(), (), (), ()])


def test_selection_and_user_titles_by_hand():
  r = _toy_ratings()
  assert catalog.most_rated_items(r, 2).tolist() == [0, 2]  # 3 and 2 ratings
  assert catalog.most_active_users(r, 2).tolist() == [0, 1]
  u = catalog.users_from_ratings(r, [0], n_titles=2)[0]
  # User 0: 5 stars on A (t=10) and C (t=12): most recent first -> C, A; worst: B (1), D (3).
  assert (u.user_id, u.liked, u.disliked) == (7, ("C (1992)", "A (1990)"), ("B (1991)", "D (1993)"))
  m = catalog.movies_from_ratings(r, [2])[0]
  assert (m.movie_id, m.title, m.genres) == (13, "C (1992)", ("Drama", "War"))
  with pytest.raises(ValueError, match="item_indices"):
    catalog.movies_from_ratings(r, [4])


def _blocks(**actions):
  c = ml_collections.ConfigDict()
  c.descriptions = env_blocks.descriptions_config()
  c.profiles = env_blocks.profiles_config()
  c.actions = env_blocks.actions_config(**actions)
  return c


def test_env_data_config_rejects_bad_fields_naming_them():
  build.check_config(_blocks())  # the shared defaults are valid
  cases = [
      (lambda c: c.descriptions.sampling.update(temprature=0.5), r"config.descriptions.sampling.*"
       "unknown field.*temprature"),
      (lambda c: c.descriptions.sampling.update(top_p=0.0), r"config.descriptions.sampling.top_p"),
      (lambda c: c.descriptions.update(n_reasons=-1), r"config.descriptions.n_reasons"),
      (lambda c: c.profiles.update(kind="llm_written"), r"config.profiles.kind"),
      (lambda c: c.actions.update(k=1), r"config.actions.k"),
      (lambda c: c.actions.sampling.update(max_tokens=0), r"config.actions.sampling.max_tokens"),
      (lambda c: c.actions.update(dedupe_threshold=1.5), r"config.actions.dedupe_threshold"),
  ]
  for change, pattern in cases:
    c = _blocks()
    change(c)
    with pytest.raises(ValueError, match=pattern):
      build.check_config(c)


def test_template_profiles_need_no_llm_and_record_their_source(tmp_path):
  r = _toy_ratings()
  users = catalog.users_from_ratings(r, [0, 1], n_titles=2)
  cfg = env_blocks.profiles_config(kind="template")
  recs = asyncio.run(build.profile_users(_NoCalls(), users, cfg, tmp_path / "p.jsonl"))
  assert recs[0]["profile"] == "Loved: C (1992); A (1990). Disliked: B (1991); D (1993)."
  assert [x["source"] for x in recs] == ["template", "template"] and all(x["ok"] for x in recs)
  assert records.read_jsonl(tmp_path / "p.jsonl", key="user_id") == recs


class _NoCalls(SamplingBackend):
  model_id = "none"

  async def generate(self, prompts_, params, *, on_result=None):
    raise AssertionError("no LLM call expected")


def test_action_sets_from_echo_backend_record_provenance(tmp_path):
  cfg = env_blocks.actions_config(k=12, llm_calls=4, seed=3,
                                  sampling=dict(max_tokens=8, temperature=0.7))
  desc = [{"movie_id": 5, "item_index": 0, "ok": True, "text": "Plot: A heist.", "genres": ["Crime"],
           "tags": []},
          {"movie_id": 6, "item_index": 1, "ok": False, "text": None, "genres": [], "tags": []}]
  prof = [{"user_id": 9, "ok": True, "profile": "Loves heists and clever plans."}]
  inner = _Echo()

  def encode(texts):  # distinct one-hot vectors: no near-duplicates
    return np.eye(len(texts), dtype=np.float32)

  out = tmp_path / "actions.jsonl"
  sets = asyncio.run(build.build_action_sets(inner, encode, desc, prof, cfg, out_path=out))
  assert inner.calls == [4]  # the four action requests went out as one batch
  assert len(sets) == 1 and sets[0]["movie_id"] == 5 and sets[0]["user_id"] == 9
  acts = sets[0]["actions"]
  assert len(acts) == 12
  seed = records.derive_seed(3, "actions", 5)
  llm = [a for a in acts if a["source"] == "llm"]
  assert [a["seed"] for a in llm] == [seed + c for c in range(4)]
  assert [a["personalised"] for a in llm] == [False, True, False, True]
  reqs = sets[0]["provenance"]["requests"]
  assert [r["params"]["seed"] for r in reqs] == [seed + c for c in range(4)]
  assert all(r["params"]["max_tokens"] == 8 and r["params"]["temperature"] == 0.7 for r in reqs)
  assert "Loves heists" in reqs[1]["prompt"][-1]["content"]
  assert "Loves heists" not in reqs[0]["prompt"][-1]["content"]
  # Rerun: nothing new is asked or written.
  again = _Echo()
  asyncio.run(build.build_action_sets(again, encode, desc, prof, cfg, out_path=out))
  assert again.calls == [] and len(out.read_text().splitlines()) == 1
  # Not personalised: the profile is never sent and the set names no user.
  generic = asyncio.run(build.build_action_sets(
      _Echo(), encode, desc, prof, env_blocks.actions_config(k=12, llm_calls=4, personalised=False)))
  assert generic[0]["user_id"] is None
  assert not any(a["personalised"] for a in generic[0]["actions"])


@pytest.fixture(scope="module")
def smollm2_local():
  from eagle_jax.env import local

  return local.LocalSampler.from_gguf(chat=True, batch_buckets=(4,), model_id="smollm2-test")


def test_failed_plot_falls_back_to_metadata_when_asked(tmp_path):
  movie = catalog.Movie(1, 0, "Toy Story (1995)", ("Animation", "Comedy"))
  gen = env_blocks.descriptions_config(n_reasons=1, retries=0, fallback=True)

  class _Short(_Echo):  # every answer too short to be a plot
    async def generate(self, prompts_, params, *, on_result=None):
      return [Completion("Too short.", "stop") for _ in prompts_]

  rec = asyncio.run(build.describe_movies(_Short(), [movie], gen))[0]
  assert rec["ok"] and rec["source"] == "metadata"
  assert rec["plot"] == "Toy Story (1995), a animation/comedy film."
  assert rec["likes"] == [] and rec["text"] == "Plot: " + rec["plot"]
  gen.fallback = False
  rec = asyncio.run(build.describe_movies(_Short(), [movie], gen))[0]
  assert not rec["ok"] and rec["text"] is None


@pytest.mark.slow
def test_describe_two_movies_with_smollm2_jsonl_provenance_and_resume(tmp_path, smollm2_local):
  movies = [catalog.Movie(1, 0, "Toy Story (1995)", ("Animation", "Children's", "Comedy")),
            catalog.Movie(50, 49, "Star Wars (1977)", ("Action", "Sci-Fi"))]
  gen = env_blocks.descriptions_config(plot_tokens=40, reason_tokens=16, n_reasons=1, retries=1)
  cache = ResponseCache(tmp_path / "responses.jsonl")
  cached = CachedClient(smollm2_local, cache)
  out = tmp_path / "descriptions.jsonl"
  recs = asyncio.run(build.describe_movies(cached, movies, gen, out))
  first_misses = cached.misses
  assert first_misses >= 2 + 2 * sum(r["ok"] for r in recs)
  lines = [json.loads(x) for x in out.read_text().splitlines()]
  assert [r["movie_id"] for r in lines] == [1, 50] and lines == recs
  for rec, movie in zip(recs, movies):
    assert rec["title"] == movie.title and rec["genres"] == list(movie.genres)
    prov = rec["provenance"]
    assert prov["model"] == "smollm2-test"
    plots = [c for c in prov["calls"] if c["purpose"] == "plot"]
    assert plots[0]["params"]["seed"] == records.derive_seed(0, "plot", movie.movie_id, 0)
    assert plots[0]["prompt"] == prompts.plot_prompt(movie.title, movie.genres)
    assert prov["parse_failures"] == sum(not c["parsed"] for c in prov["calls"])
    for c in prov["calls"]:
      # The provenance text is exactly what the response cache holds for (model, prompt, params).
      params = SamplingParams(**{**c["params"], "stop": tuple(c["params"]["stop"])})
      assert cache.get(cache_key("smollm2-test", c["prompt"], params)).text == c["text"]
      assert params.max_tokens == (40 if c["purpose"] == "plot" else 16)
      assert params.temperature == 0.7 and params.repetition_penalty == 1.2
    if rec["ok"]:
      assert rec["plot"] == prompts.clean_paragraph(plots[-1]["text"])
      assert rec["text"].startswith("Plot: " + rec["plot"])
      assert len(rec["likes"]) <= 1 and len(rec["dislikes"]) <= 1
    else:
      assert rec["text"] is None and all(not c["parsed"] for c in plots)
  # A batched answer equals the same prompt sampled alone (seeds are per prompt).
  c0 = recs[0]["provenance"]["calls"][0]
  alone = smollm2_local.generate_sync(
      [c0["prompt"]], [SamplingParams(**{**c0["params"], "stop": ()})])[0].text
  assert alone == c0["text"]
  # Rerun on the same files: no model call, nothing appended.
  cached2 = CachedClient(smollm2_local, ResponseCache(tmp_path / "responses.jsonl"))
  again = asyncio.run(build.describe_movies(cached2, movies, gen, out))
  assert again == recs and cached2.misses == 0 and cached2.hits == 0
  assert len(out.read_text().splitlines()) == 2
  # Output lost but cache kept: rebuilt from the cache alone, same content.
  out.unlink()
  cached3 = CachedClient(smollm2_local, ResponseCache(tmp_path / "responses.jsonl"))
  rebuilt = asyncio.run(build.describe_movies(cached3, movies, gen, out))
  assert cached3.misses == 0 and cached3.hits == first_misses
  strip = lambda rs: [{k: v for k, v in r.items() if k != "provenance"} for r in rs]
  assert strip(rebuilt) == strip(recs)
