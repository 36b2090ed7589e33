"""ELM trainer: loss vs a PyTorch + numpy cross-entropy, frozen stage 1, stage 2, resume, config."""

import functools
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from decoder_fixtures import make_torch_llama, save_torch

from configs import elm_ml100k
from eagle_jax import training
from eagle_jax.elm import adapter as adapter_lib
from eagle_jax.elm import data as data_lib
from eagle_jax.elm import job, tasks, train_loop
from eagle_jax.elm import model as model_lib
from eagle_jax.models import llama as llama_lib
from eagle_jax.models import loading
from eagle_jax.models.tokenizer import Tokenizer


@functools.cache
def tok():
  """A three-token word-level tokenizer: the trainer only needs its pad and special ids."""
  import tokenizers

  vocab = {"<|im_end|>": 0, "<|endoftext|>": 1, "[UNK]": 2}
  return Tokenizer(tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]")))


def _rows(vocab, rng, n=6):
  rows = []
  for i in range(n):
    p = int(rng.integers(3, 6))
    prompt = rng.integers(1, vocab, size=p).tolist()
    slot = [-1] * p
    slot[1] = 0
    target = rng.integers(1, vocab, size=int(rng.integers(1, 5))).tolist()
    rows.append(tasks.Encoded("summary", (0,), (i % 4,), prompt, slot, target))
  return rows


def test_loss_equals_numpy_cross_entropy_of_torch_logits(tmp_path):
  tmodel = make_torch_llama(tie=False, seed=1)
  cfg, model = loading.load_llama_safetensors(save_torch(tmodel, tmp_path))
  from flax import nnx

  dec_fm = training.FunctionalModel(lambda r: llama_lib.Llama(cfg, rngs=r))
  ad_fm = training.FunctionalModel(lambda r: adapter_lib.Adapter(3, cfg.hidden, 8, 1, rngs=r),
                                   seed=2)
  parts = model_lib.Parts(None, cfg, ad_fm, dec_fm, None, 0)
  dec_params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  ad_params = ad_fm.init()
  rng = np.random.default_rng(0)
  tables = {0: rng.normal(size=(4, 3)).astype(np.float32)}
  batch = tasks.collate(_rows(cfg.vocab_size, rng, 3), tables, prompt_len=6, target_len=4,
                        pad_id=0)
  loss_fn = jax.jit(functools.partial(train_loop.loss_fn, parts=parts, target_start=6))
  loss, (total, count) = loss_fn(ad_params, dec_params, jax.tree.map(jnp.asarray, batch))
  # Reference: the adapter's soft token placed by hand, PyTorch logits, numpy cross-entropy.
  soft = np.asarray(ad_fm.module(ad_params)(jnp.asarray(batch["z"]), jnp.asarray(batch["domain"])))
  emb = tmodel.model.embed_tokens.weight.detach().numpy()[batch["tokens"]].copy()
  for b, t in zip(*np.nonzero(batch["slot_index"] >= 0)):
    emb[b, t] = soft[b, 0, 0]
  m = batch["attention_mask"].astype(np.int64)
  with torch.no_grad():
    logits = tmodel(inputs_embeds=torch.tensor(emb), attention_mask=torch.tensor(m),
                    position_ids=torch.tensor(np.maximum(m.cumsum(-1) - 1, 0))).logits.double()
  logp = torch.log_softmax(logits, -1).numpy()
  nll = []
  for b, t in zip(*np.nonzero(batch["loss_mask"])):
    nll.append(-logp[b, t - 1, batch["tokens"][b, t]])
  assert int(count) == batch["loss_mask"].sum() == len(nll)
  assert float(loss) == pytest.approx(np.mean(nll), rel=1e-4)
  assert float(total) == pytest.approx(np.sum(nll), rel=1e-4)


def _config(**train):
  c = elm_ml100k.get_config()
  c.decoder.kind = "random"
  c.decoder.random.vocab_size = 97  # small logits: fast steps (token ids of the rows are < 97)
  c.adapter.hidden = 16
  c.mesh = {"data": 2}
  c.train.update(dict(stage1_steps=3, stage2_steps=1, batch_size=2, save_every=2, log_every=1,
                      max_to_keep=3), **train)
  c.train.stage2_optimizer.update(dict(learning_rate=1e-2, warmup_steps=0))
  return c


def _leaves(tree):
  return [np.asarray(x) for x in jax.tree.leaves(tree)]


def test_stage1_freezes_decoder_stage2_trains_it_and_resume_is_exact(tmp_path):
  config = _config()
  # Two of the forced devices: data parallel over a sharded batch, cheaper compiles than eight.
  mesh = training.build_mesh(config.mesh, devices=jax.devices()[:2])
  parts, dec0 = model_lib.build_parts(config.decoder, config.adapter, mesh, in_dim=5,
                                      tokenizer=tok())
  dec0_host = _leaves(dec0)
  rng = np.random.default_rng(0)
  data = data_lib.Dataset(_rows(parts.decoder_config.vocab_size, rng),
                         {0: rng.normal(size=(4, 5)).astype(np.float32)}, 6, 4)
  ad0 = _leaves(parts.adapter_init())

  # Run 1 stops after step 2 (stage 1 only).
  loop = train_loop.TrainLoop(config.train, parts, data)  # both stages compiled once, reused
  state, dec, _ = loop.train(str(tmp_path / "a"), dec0, {"k": 1}, stop_after=2)
  assert set(state) == {"adapter", "opt"}
  for x, y in zip(_leaves(dec), dec0_host):
    np.testing.assert_array_equal(x, y)  # bit-identical decoder
  assert any(not np.array_equal(x, y) for x, y in zip(_leaves(state["adapter"]), ad0))
  # Run 2 resumes from the saved step 2 in the same folder and finishes (step 3, then stage 2).
  state_b, dec_b, records = loop.train(str(tmp_path / "a"), dec0, {"k": 1})
  assert [r["step"] for r in records] == [3, 4]  # resumed from the checkpoint of step 2
  assert [r["stage"] for r in records] == [1, 2]
  assert set(state_b) == {"adapter", "decoder", "opt"}
  assert any(not np.array_equal(x, y) for x, y in zip(_leaves(dec_b), dec0_host))
  steps = [json.loads(line)["step"] for line in open(tmp_path / "a" / "metrics.jsonl")]
  assert steps == [1, 2, 3, 4]
  # An uninterrupted run ends in the same parameters.
  state_c, dec_c, _ = loop.train(str(tmp_path / "c"), dec0, {"k": 1})
  for x, y in zip(_leaves(state_b["adapter"]) + _leaves(dec_b),
                  _leaves(state_c["adapter"]) + _leaves(dec_c)):
    np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("field,value,match", [
    ("decoder.kind", "bert", "config.decoder.kind"),
    ("adapter.n_tokens", 0, "config.adapter.n_tokens"),
    ("data.movie_tasks", ("summary", "comparison"), "config.data.movie_tasks"),
    ("data.target_tokens", 4, "config.data.target_tokens"),
    ("train.stage1_steps", -1, "config.train.stage1_steps"),
    ("train.batch_size", 0, "config.train.batch_size"),
    ("train.stage1_optimizer.learning_rate", 0.0, "config.train.stage1_optimizer.learning_rate"),
    ("eval.bc_movies", 0, "config.eval.bc_movies"),
])
def test_bad_config_values_name_the_field(field, value, match):
  c = elm_ml100k.get_config()
  node = c
  *path, last = field.split(".")
  for p in path:
    node = node[p]
  node[last] = value
  with pytest.raises(training.ConfigError, match=match.replace(".", r"\.")):
    job.validate_config(c)


def test_batch_not_divisible_by_mesh_names_the_field(tmp_path):
  config = _config(batch_size=3)
  mesh = training.build_mesh(config.mesh, devices=jax.devices()[:2])
  parts = model_lib.Parts(None, None, None, None, mesh, 0)  # the check comes before any use
  with pytest.raises(training.ConfigError, match=r"config\.train\.batch_size=3"):
    train_loop.TrainLoop(config.train, parts, None)


def test_default_config_is_valid():
  job.validate_config(elm_ml100k.get_config())


def test_preemption_saves_the_reached_step_and_resume_is_exact(tmp_path, monkeypatch):
  """A stop request after step 3 (between the periodic saves 2 and 4) saves step 3 and raises
  ``Preempted``; the rerun resumes there and ends in the uninterrupted run's parameters."""
  from eagle_jax import checkpoint, preemption  # noqa: PLC0415

  config = _config(stage1_steps=3, stage2_steps=2)
  mesh = training.build_mesh(config.mesh, devices=jax.devices()[:2])
  parts, dec0 = model_lib.build_parts(config.decoder, config.adapter, mesh, in_dim=5,
                                      tokenizer=tok())
  rng = np.random.default_rng(0)
  data = data_lib.Dataset(_rows(parts.decoder_config.vocab_size, rng),
                         {0: rng.normal(size=(4, 5)).astype(np.float32)}, 6, 4)
  loop = train_loop.TrainLoop(config.train, parts, data)
  stop_at = {"step": 3}
  monkeypatch.setattr(preemption.Guard, "should_stop",
                      lambda self, step: step == stop_at["step"])
  with pytest.raises(preemption.Preempted) as info:
    loop.train(str(tmp_path / "a"), dec0, {"k": 1})
  ckpt_dir = str(tmp_path / "a" / "checkpoints")
  assert info.value.step == 3 and info.value.directory == ckpt_dir
  assert sorted(int(x) for x in os.listdir(ckpt_dir) if x.isdigit()) == [2, 3]
  with checkpoint.Checkpointer(ckpt_dir) as ckpt:
    assert ckpt.metadata()["step"] == 3
  stop_at["step"] = None
  state_b, dec_b, records = loop.train(str(tmp_path / "a"), dec0, {"k": 1})
  assert [r["step"] for r in records] == [4, 5]
  state_c, dec_c, _ = loop.train(str(tmp_path / "c"), dec0, {"k": 1})
  for x, y in zip(_leaves(state_b["adapter"]) + _leaves(dec_b),
                  _leaves(state_c["adapter"]) + _leaves(dec_c)):
    np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7)


_QUEUED_ELM = """
import sys
sys.path.insert(0, "tests")
import numpy as np
import test_elm_train_loop as T
from eagle_jax import training
from eagle_jax.elm import data as data_lib, model as model_lib, train_loop
c = T._config(stage1_steps=300, stage2_steps=0, save_every=1000, log_every=1000)
c.mesh = {"data": 8}
c.train.batch_size = 8
mesh = training.build_mesh(c.mesh)
parts, dec0 = model_lib.build_parts(c.decoder, c.adapter, mesh, in_dim=5, tokenizer=T.tok())
rng = np.random.default_rng(0)
data = data_lib.Dataset(T._rows(parts.decoder_config.vocab_size, rng, 16),
                        {0: rng.normal(size=(4, 5)).astype(np.float32)}, 6, 4)
_, _, records = train_loop.TrainLoop(c.train, parts, data).train(sys.argv[1], dec0, {"k": 1})
print("finished", records[-1]["step"])
"""


def test_steps_between_log_lines_do_not_queue_into_a_deadlock(tmp_path):
  # 300 data-parallel steps on 8 forced host devices, logged once at the end: without
  # training.bound_in_flight they queue up and XLA:CPU hangs in an all-reduce until its rendezvous
  # timeout (60 s here) aborts the process.
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8 "
             "--xla_cpu_collective_call_terminate_timeout_seconds=60")
  proc = subprocess.run([sys.executable, "-c", _QUEUED_ELM, str(tmp_path / "run")], cwd=root,
                        env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert proc.stdout.split()[-2:] == ["finished", "300"]
