"""The client stack built from ``config.llm``: validation, cache identity, per-process caches."""

import asyncio
import hashlib
import json

import ml_collections
import pytest

from configs import env_blocks
from eagle_jax.env import stack
from eagle_jax.env.batching import BatchingClient
from eagle_jax.env.cache import CachedClient


def test_defaults_are_valid_and_bad_fields_are_named():
  stack.check_llm_config(env_blocks.llm_config())
  cases = [
      (dict(server_url="http://127.0.0.1:1"), r"config.llm.served_model: required"),
      (dict(server_url="127.0.0.1:8000", served_model="m"), r"config.llm.server_url"),
      (dict(server_url="http://h:1", served_model="m", gguf="/x.gguf"), r"not both"),
      (dict(gguf="/no/such/model.gguf"), r"config.llm.gguf: no such file"),
      (dict(concurrency=0), r"config.llm.concurrency"),
      (dict(timeout_s=0.0), r"config.llm.timeout_s"),
      (dict(retries=-1), r"config.llm.retries"),
      (dict(batch_buckets=(8, 4)), r"config.llm.batch_buckets"),
      (dict(precision="float16"), r"config.llm.precision: expected one of \['bfloat16', "),
  ]
  for change, pattern in cases:
    with pytest.raises(ValueError, match=pattern):
      stack.check_llm_config(env_blocks.llm_config(**change))
  c = env_blocks.llm_config()
  with c.unlocked():
    c.model_id = "hand-typed"
  with pytest.raises(ValueError, match=r"unknown fields \['model_id'\]"):
    stack.check_llm_config(c)
  # A block saved before scan_layers and precision existed (a workdir's config.json) is valid; any
  # other missing field is not.
  old = {k: v for k, v in env_blocks.llm_config().items() if k not in ("scan_layers", "precision")}
  stack.check_llm_config(ml_collections.ConfigDict(old))
  with pytest.raises(ValueError, match=r"missing fields \['chunk'\]"):
    stack.check_llm_config(ml_collections.ConfigDict({k: v for k, v in old.items() if k != "chunk"}))
  with pytest.raises(ValueError, match=r"config.llm.scan_layers: expected a bool"):
    stack.check_llm_config(ml_collections.ConfigDict({**old, "scan_layers": "yes"}))


def test_local_model_name_is_the_file_hash(tmp_path):
  f = tmp_path / "m.gguf"
  f.write_bytes(b"weights v1" * 1000)
  want = hashlib.sha256(b"weights v1" * 1000).hexdigest()[:16]
  assert stack.local_model_name(f) == f"local-jax:{want}"
  f.write_bytes(b"weights v2" * 1000)  # a changed file is another model
  assert stack.local_model_name(f) != f"local-jax:{want}"


def test_precision_loads_those_dtypes_and_is_part_of_the_cache_identity(tmp_path):
  import jax  # noqa: PLC0415
  import jax.numpy as jnp  # noqa: PLC0415
  from flax import nnx  # noqa: PLC0415

  from eagle_jax import assets  # noqa: PLC0415

  names = {}
  for precision in ("float32", "mixed"):
    s = stack.open_llm(env_blocks.llm_config(precision=precision), str(tmp_path / "c.jsonl"))
    sampler = s.local.sampler
    config = sampler.config
    model = nnx.merge(sampler.graphdef, sampler.state)
    # The decoding copy (layer_scan.scanned) holds its stacked weights and tied table as the bits
    # of their dtype: read those dtypes through it.
    stacked = set(model.layers.dtypes)
    table = model.embedder.embedding[...].dtype
    others = {x.dtype for x in jax.tree.leaves(nnx.state(model, nnx.Param))
              if x.dtype != jnp.uint16}
    names[precision] = s.model_name
    asyncio.run(s.aclose())
    if precision == "mixed":
      assert (config.dtype, config.matmul_dtype) == (jnp.float32, jnp.bfloat16)
      assert stacked == {"bfloat16"} and table == jnp.uint16, (stacked, table)
      assert others == {jnp.dtype(jnp.bfloat16)}, others
      assert config.param_dtype == jnp.bfloat16
    else:
      assert config.matmul_dtype is None
      assert stacked == {"float32"} and others == {jnp.dtype(jnp.float32)} and table == jnp.float32
  assert names["float32"] == stack.local_model_name(assets.smollm2_gguf())
  assert names["mixed"] == names["float32"] + "+mixed"


def test_process_cache_paths_are_seeded_from_the_shared_file(tmp_path):
  shared = tmp_path / "cache.jsonl"
  assert stack.process_cache_path(str(shared), 0, 1) == str(shared)
  shared.write_text('{"k": 1}\n')
  own = stack.process_cache_path(str(shared), 1, 2)
  assert own == str(tmp_path / "cache.1.jsonl")
  assert open(own).read() == '{"k": 1}\n'
  with open(own, "a") as f:
    f.write('{"k": 2}\n')
  assert stack.process_cache_path(str(shared), 1, 2) == own  # never overwritten once there
  assert open(own).read().count("\n") == 2


def test_one_process_merges_the_per_process_caches_of_a_multi_process_run(tmp_path):
  from eagle_jax.env import cache as cache_lib  # noqa: PLC0415

  def rec(key, text):
    return json.dumps({"key": key, "text": text, "finish_reason": "stop"}) + "\n"

  shared = tmp_path / "cache.jsonl"
  shared.write_text(rec("a", "A") + rec("t", "torn")[:9])  # a killed writer's torn last line
  (tmp_path / "cache.0.jsonl").write_text(rec("a", "A") + rec("b", "B"))
  (tmp_path / "cache.1.jsonl").write_text(rec("c", "C") + "not json\n" + rec("b", "B2"))
  (tmp_path / "cache.old.jsonl").write_text(rec("z", "Z"))  # not a process's file
  assert stack.process_cache_path(str(shared), 0, 1) == str(shared)
  loaded = cache_lib.ResponseCache(shared)
  assert {k: loaded.get(k).text for k in "abcz" if k in loaded} == {"a": "A", "b": "B", "c": "C"}
  loaded.close()
  assert stack.process_cache_path(str(shared), 0, 1) == str(shared)  # idempotent
  assert shared.read_text().count('"key": "b"') == 1


def test_server_stack_names_the_served_model(tmp_path):
  llm = env_blocks.llm_config(server_url="http://127.0.0.1:9", served_model="Qwen/Qwen2.5-7B")
  s = stack.open_llm(llm, str(tmp_path / "cache.jsonl"))
  assert isinstance(s.client, BatchingClient) and isinstance(s.cached, CachedClient)
  assert s.model_name == "openai:Qwen/Qwen2.5-7B" == s.cached.model_id
  assert s.local is None and s.counters() == {"cache_hits": 0, "cache_misses": 0}
  asyncio.run(s.aclose())
