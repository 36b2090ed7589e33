"""The decoder E_D (``embed/decoder_encoder.py``) against PyTorch transformers + peft LoRA.

The reference is a tiny random ``LlamaForCausalLM`` (``decoder_fixtures``): its ``LlamaModel``'s
last hidden state (after the final norm) mean-pooled over the real tokens of left-padded rows, times
the same linear head, with peft adapters set to our qwix adapters' values, and one AdamW step taken
by ``torch.optim.AdamW`` on the same loss.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from decoder_fixtures import (
  PEFT_TARGETS,
  make_torch_llama,
  peft_lora,
  save_torch,
  tiny_agent_decoder,
)
from flax import nnx

from configs import encoder_ml100k
from eagle_jax import checkpoint, training
from eagle_jax.checks import ConfigError
from eagle_jax.embed import decoder_encoder as de
from eagle_jax.embed import encoder_train
from eagle_jax.models import configs as model_configs
from eagle_jax.models import decoder as decoder_lib
from eagle_jax.models import loading

TOL = 1e-5
RANK, ALPHA, D_OUT = 4, 8.0, 5


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  path = save_torch(make_torch_llama(seed=3), tmp_path_factory.mktemp("encoder_llama"))
  config, model = loading.load_llama_safetensors(path)
  return config, nnx.to_pure_dict(nnx.state(model, nnx.Param))


@pytest.fixture(scope="module")
def models(tiny):
  """(LoRA model, full fine-tuning model) on one device, shared so their programs compile once."""
  config, base = tiny
  return _model(config, base), _model(config, base, full_finetune=True)


def _one_device():
  return training.build_mesh({"data": 1}, devices=jax.devices()[:1])


def _model(config, base, mesh=None, **kw):
  cfg = de.DecoderEncoderConfig(**{"lora_rank": RANK, "lora_alpha": ALPHA, "batch_size": 8,
                                   "learning_rate": 1e-3, "weight_decay": 0.1, **kw})
  return de.DecoderRegressorModel(config, cfg, D_OUT, mesh or _one_device(), base=base)


def _rows(vocab, n=8, seed=0):
  rng = np.random.RandomState(seed)
  return [list(rng.randint(0, vocab, rng.randint(1, 12))) for _ in range(n)]


def _random(tree, seed, scale=0.2):
  leaves, treedef = jax.tree.flatten(tree)
  rng = np.random.RandomState(seed)
  return jax.tree.unflatten(treedef, [jnp.asarray(rng.normal(0, scale, x.shape), jnp.float32)
                                      for x in leaves])


def _torch_hidden(tmodel, ids):
  """The torch ``LlamaModel``'s last hidden state (after the final norm) of left-padded ids
  ([N, T], PAD = -1; positions count real tokens), and the [N, T] mask."""
  inner = tmodel.get_base_model().model if hasattr(tmodel, "get_base_model") else tmodel.model
  m = torch.tensor(ids != decoder_lib.PAD, dtype=torch.long)
  h = inner(input_ids=torch.tensor(np.where(ids >= 0, ids, 0), dtype=torch.long),
            attention_mask=m, position_ids=(m.cumsum(-1) - 1).clamp(min=0)).last_hidden_state
  return h, m


def _torch_pooled(tmodel, rows, width=16):
  """[N, D] float64: the final-norm states mean-pooled over the real tokens."""
  with torch.no_grad():
    h, m = _torch_hidden(tmodel, decoder_lib.left_pad(rows, width))
  w = m[..., None].double()
  return ((h.double() * w).sum(1) / w.sum(1)).numpy()


def _ours(model, params, rows, width=16):
  """[N, d] through the model's jitted forward on one left-padded array."""
  return np.asarray(model._outputs(params, model.frozen, model.put(decoder_lib.left_pad(rows,
                                                                                       width))))


def test_pooled_prediction_equals_torch_llama(tiny, models):
  """(a) Full fine-tuning form (no adapters): mean-pooled final-norm states times the head."""
  config, _ = tiny
  model = models[1]
  params = model.init()
  head = params["head"]
  rows = _rows(config.vocab_size)
  want = (_torch_pooled(make_torch_llama(seed=3), rows) @ np.asarray(head["kernel"])
          + np.asarray(head["bias"]))
  got = _ours(model, params, rows)
  assert np.abs(got - want).max() <= TOL and np.abs(want).max() > 0.1
  # The same rows through ``apply`` (own-width buckets, fixed call size) give the same numbers.
  np.testing.assert_allclose(model.apply(params, rows), want, atol=TOL)


def test_lora_is_the_base_at_init_and_matches_peft(tiny, models):
  """(b) Adapters with B = 0 leave the base's outputs bit-identical; non-zero adapters equal a
  peft LoRA with the same A, B."""
  config, _ = tiny
  rows = _rows(config.vocab_size, seed=1)
  lora_model, full = models
  params = lora_model.init()
  fparams = dict(full.init(), head=params["head"])
  assert np.array_equal(_ours(lora_model, params, rows), _ours(full, fparams, rows))
  names = set(params["backbone"]["layers"][0]["attn"]) | set(params["backbone"]["layers"][0]["mlp"])
  assert {"wq_lora_b", "wo_lora_b", "w_gate_lora_b", "w_down_lora_b"} <= names
  params = dict(_random(params, seed=2), head=params["head"])
  tref = peft_lora(make_torch_llama(seed=3), params["backbone"], RANK, ALPHA)
  head = params["head"]
  want = _torch_pooled(tref, rows) @ np.asarray(head["kernel"]) + np.asarray(head["bias"])
  got = _ours(lora_model, params, rows)
  assert np.abs(got - want).max() <= TOL
  assert np.abs(got - _ours(full, fparams, rows)).max() > 1e-2  # the adapters matter


def test_training_step_matches_torch_adamw_and_keeps_the_base(tiny, models):
  """(c) One step: the loss and every updated trainable (head, adapters) equal torch's AdamW on
  the same loss; the frozen base stays bit-identical over steps."""
  config, _ = tiny
  model = models[0]
  params = model.init()
  params = dict(params, head=_random(params["head"], seed=4))
  rows = _rows(config.vocab_size, seed=5)
  y = np.random.RandomState(6).normal(size=(8, D_OUT)).astype(np.float32)
  ids = decoder_lib.left_pad(rows, 16)
  frozen_before = jax.tree.map(lambda x: np.array(x, copy=True), model.frozen)
  # torch: the same adapters (A random, B = 0) and head, AdamW over exactly those tensors.
  tref = peft_lora(make_torch_llama(seed=3), params["backbone"], RANK, ALPHA)
  kernel = torch.tensor(np.asarray(params["head"]["kernel"]), dtype=torch.float32,
                        requires_grad=True)
  bias = torch.tensor(np.asarray(params["head"]["bias"]), requires_grad=True)
  lora = [p for n, p in tref.named_parameters() if "lora_" in n]
  assert all(p.requires_grad for p in lora) and len(lora) == 2 * 7 * config.layers
  opt = torch.optim.AdamW(lora + [kernel, bias], lr=1e-3, weight_decay=0.1, eps=1e-8)
  h, mask = _torch_hidden(tref, ids)
  pooled = (h * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
  tloss = ((pooled @ kernel + bias - torch.tensor(y)) ** 2).sum(-1).mean()
  tloss.backward()
  opt.step()
  new, opt_state, loss = model.step(params, model.init_opt(params), ids, y)
  assert abs(float(loss) - tloss.item()) <= TOL
  np.testing.assert_allclose(np.asarray(new["head"]["kernel"]), kernel.detach().numpy(), atol=TOL)
  np.testing.assert_allclose(np.asarray(new["head"]["bias"]), bias.detach().numpy(), atol=TOL)
  for name, mod in tref.named_modules():  # torch's stepped adapters against ours
    if hasattr(mod, "lora_A") and "default" in mod.lora_A:
      parts = name.split(".")
      block, w = PEFT_TARGETS[parts[-1]]
      ours = new["backbone"]["layers"][int(parts[parts.index("layers") + 1])][block]
      for key, lin in (("a", mod.lora_A["default"]), ("b", mod.lora_B["default"])):
        want = lin.weight.detach().numpy().T
        got = np.asarray(ours[f"{w}_lora_{key}"]).reshape(want.shape)
        np.testing.assert_allclose(got, want, atol=TOL, err_msg=f"{name}.lora_{key}")
  b = new["backbone"]["layers"][0]["mlp"]["w_down_lora_b"]
  assert np.abs(np.asarray(b)).max() > 0  # B moved off zero
  new, _, _ = model.step(new, opt_state, ids, y)
  jax.tree.map(np.testing.assert_array_equal, frozen_before,
               jax.tree.map(np.asarray, model.frozen))


def test_sharded_steps_equal_one_device(tiny, models):
  """(d) Two steps on a (data 2, fsdp 2, tensor 2) mesh of 8 CPU devices equal one device."""
  if jax.device_count() < 8:
    pytest.skip("needs 8 (fake) devices")
  config, base = tiny
  rows = _rows(config.vocab_size, seed=7)
  y = np.random.RandomState(8).normal(size=(8, D_OUT)).astype(np.float32)
  ids = decoder_lib.left_pad(rows, 16)
  out = []
  sharded = _model(config, base, training.build_mesh({"data": 2, "fsdp": 2, "tensor": 2}))
  for model in (models[0], sharded):
    mesh = model.mesh
    params = model.init()
    params = dict(params, head=jax.device_put(_random(params["head"], seed=9),
                                              model.model.shardings["head"]))
    opt = model.init_opt(params)
    params, opt, l1 = model.step(params, opt, ids, y)
    params, opt, l2 = model.step(params, opt, ids[::-1].copy(), y[::-1].copy())
    out.append(([float(l1), float(l2)], jax.tree.map(np.asarray, params)))
    if mesh.size == 8:  # the base and the batch really are split over the mesh
      wq = model.frozen["backbone"]["layers"][0]["attn"]["wq"]
      assert len({str(s.index) for s in wq.addressable_shards}) > 1
  (la, pa), (lb, pb) = out
  np.testing.assert_allclose(la, lb, atol=TOL)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=TOL), pa, pb)


def _synthetic_run_config(tmp_path, source):
  ratings_cfg = dict(num_users=40, num_items=48, num_ratings=400, rank=4, seed=0)
  config = encoder_ml100k.get_config("decoder")
  config.wals.data.source = "synthetic"
  config.wals.data.synthetic = ratings_cfg
  from eagle_jax.data import synthetic  # noqa: PLC0415

  ratings = synthetic.generate_ratings(**ratings_cfg)
  rng = np.random.RandomState(0)
  np.savez(tmp_path / "embeddings.npz", item_ids=ratings.item_ids,
           item_factors=rng.normal(size=(ratings.num_items, 3)).astype(np.float32),
           item_bias=rng.normal(size=ratings.num_items).astype(np.float32))
  config.embeddings = str(tmp_path / "embeddings.npz")
  config.decoder.source = str(source)
  config.decoder.max_tokens = 16
  config.decoder.batch_size = 8
  config.decoder.epochs = 1
  config.decoder.learning_rate = 1e-3
  config.finetune.validation_fraction = 0.25
  return config


def test_encoder_train_run_saves_adapters_and_load_encoder_restores_it(tmp_path):
  """(e) ``encoder_train.run`` with ``backbone="decoder"`` on a tiny decoder over SmolLM2's
  tokenizer: the checkpoint holds adapters and head only, and ``load_encoder`` gives predictions
  whose held-out R^2 is the report's."""
  source = tiny_agent_decoder(tmp_path / "decoder")
  config = _synthetic_run_config(tmp_path, source)

  def features(texts):  # stands in for MiniLM (the baseline's features only)
    return np.array([[len(t), t.count(" "), t.count(",")] for t in texts], np.float32)

  report = encoder_train.run(config, str(tmp_path / "run"), encode=features)
  assert report["kind"] == "decoder" and [h["epoch"] for h in report["losses"]] == [0, 1]
  with checkpoint.Checkpointer(tmp_path / "run" / "checkpoints") as ckpt:
    _, raw, meta = ckpt.restore()
  leaves = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(raw)[0]]
  assert leaves and all("lora" in p or "head" in p or "y_" in p for p in leaves), leaves
  assert meta["decoder"]["source"] == str(source) and meta["decoder"]["lora_rank"] == 8
  predict, meta = encoder_train.load_encoder(str(tmp_path / "run" / "checkpoints"))
  split = np.load(tmp_path / "run" / "split.npz")
  texts = [json.loads(x) for x in (tmp_path / "run" / "texts.jsonl").read_text().splitlines()]
  rows = np.flatnonzero(split["heldout_row"] & (split["kind"] == "metadata"))
  z = np.load(config.embeddings)
  table = np.concatenate([z["item_factors"], np.ones((48, 1)), z["item_bias"][:, None],
                          np.ones((48, 1))], 1)
  y = table[split["item_of_row"][rows]]
  pred = predict([texts[r] for r in rows])
  r2 = 1 - ((y - pred) ** 2).sum() / ((y - y.mean(0)) ** 2).sum()
  assert r2 == pytest.approx(report["metrics"]["heldout_r2"], abs=1e-5)


@pytest.mark.parametrize("name,value", [
    ("backbone", "gpt"), ("decoder.lora_rank", 0), ("decoder.compute_dtype", "float16"),
    ("decoder.full_finetune", 1), ("decoder.shapes", "llama-9b"), ("decoder.mesh", {"model": 2}),
    ("decoder.learning_rate", -1.0), ("decoder.lora_modules", "(")])
def test_bad_config_field_raises_config_error_naming_it(name, value):
  """(f) Each bad field of the decoder E_D is refused by ``check_config`` by its name."""
  config = encoder_ml100k.get_config("decoder")
  block, key = (config.decoder, name.split(".")[1]) if "." in name else (config, name)
  setattr(block, key, None)  # a None field takes a value of any type
  setattr(block, key, value)
  with pytest.raises(ConfigError, match=f"config.{name}"):
    encoder_train.check_config(config, inputs=False)


TINY = dict(model_type="llama", vocab_size=256, hidden_size=64, intermediate_size=128,
            num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
            rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=True,
            torch_dtype="bfloat16")


def test_dry_run_report_compiles_the_sharded_step_for_abstract_shapes(monkeypatch):
  """(g) AOT compile for a tiny preset on 8 devices: memory, FLOPs and hand-counted parameters."""
  if jax.device_count() < 8:
    pytest.skip("needs 8 (fake) devices")
  monkeypatch.setitem(model_configs.PRESETS, "tiny", TINY)
  config = encoder_ml100k.get_config("decoder")
  config.decoder.shapes, config.decoder.lora_rank = "tiny", 4
  config.decoder.compute_dtype, config.decoder.max_tokens = "bfloat16", 32
  mesh = training.build_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  report = de.dry_run_report(config.decoder, mesh, 8, out_dim=7)
  mem = report["per_device_bytes"]
  assert mem["argument"] > 0 and mem["temp"] > 0
  assert mem["total"] == (mem["argument"] + mem["output"] - mem["alias"] + mem["generated_code"]
                          + mem["temp"])
  assert report["flops_per_step"] == 8 * report["flops_per_step_per_device"] > 0
  v, d, f, h, kv, hd, r = 256, 64, 128, 4, 2, 16, 4
  base = v * d + (d * h * hd + 2 * d * kv * hd + h * hd * d + 3 * d * f + 2 * d) + d
  lora = r * ((d + h * hd) + 2 * (d + kv * hd) + (h * hd + d) + 2 * (d + f) + (f + d))
  assert report["param_counts"] == {"trainable": lora + d * 7 + 7, "lora": lora,
                                    "head": d * 7 + 7, "frozen_base": base,
                                    "total": base + lora + d * 7 + 7}
  assert report["decoder"]["param_dtype"] == "bfloat16"
  with pytest.raises(ConfigError, match="config.encoder.decoder.shapes"):
    config.decoder.shapes = ""
    de.dry_run_report(config.decoder, mesh, 8)
