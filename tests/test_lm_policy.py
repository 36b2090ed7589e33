"""The language-model agent (``agent/lm_policy.py``) against PyTorch transformers + peft LoRA.

The reference is a tiny random ``LlamaForCausalLM`` with a peft LoRA whose A/B matrices are set to
our adapters' values; every quantity is recomputed in torch from full (prompt + action) sequences, one
candidate at a time, with no KV cache and no padding.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from decoder_fixtures import PEFT_TARGETS, make_torch_llama, peft_lora, save_torch
from flax import nnx

from eagle_jax import parallel
from eagle_jax.agent import lm_policy, losses
from eagle_jax.models import loading

TOL = 1e-5
OURS = PEFT_TARGETS  # peft module name -> (block, our weight)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  tmodel = make_torch_llama(seed=3)
  path = save_torch(tmodel, tmp_path_factory.mktemp("agent_llama"))
  config, model = loading.load_llama_safetensors(path)
  base = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  return tmodel, config, base


def _model(config, base, mesh=None, **kw):
  mesh = mesh or parallel.make_mesh({"data": 1}, devices=jax.devices()[:1])
  pcfg = lm_policy.LMPolicyConfig(lora_rank=4, lora_alpha=8.0, **kw)
  return lm_policy.LMPolicyModel(config, pcfg, mesh, seed=0, base=base)


def _random_adapters(params, seed=1, scale=0.2):
  """Adapters with non-zero B (at init B = 0 and the LoRA is the identity)."""
  leaves, tree = jax.tree.flatten(params)
  rng = np.random.RandomState(seed)
  leaves = [jnp.asarray(rng.normal(0, scale, x.shape).astype(np.float32)) for x in leaves]
  return jax.tree.unflatten(tree, leaves)


def _peft_model(tmodel, params, rank=4, alpha=8.0):
  """A peft LoRA of ``tmodel`` whose A/B equal our adapters (W + B A * alpha / r)."""
  return peft_lora(tmodel, params["backbone"], rank, alpha)


def _inputs(vocab, n=2, k=3, p=7, length=5, seed=0):
  rng = np.random.RandomState(seed)
  prompts = [list(rng.randint(0, vocab, rng.randint(3, p + 1))) for _ in range(n)]
  actions = [[list(rng.randint(0, vocab, rng.randint(1, length + 1))) for _ in range(k)]
             for _ in range(n)]
  pt = lm_policy.host_tokens(prompts, p, left=True)
  at = np.stack([lm_policy.host_tokens(a, length, left=False) for a in actions])
  return prompts, actions, pt, at


def _torch_token_logp(tmodel, prompts, actions):
  """[N, K, L] per-token log p(a_j | prompt, a_<j) from one full sequence per candidate."""
  n, k = len(actions), len(actions[0])
  length = max(len(a) for row in actions for a in row)
  out = np.zeros((n, k, length), np.float64)
  for i in range(n):
    for j in range(k):
      seq = prompts[i] + actions[i][j]
      with torch.no_grad():
        logits = tmodel(torch.tensor([seq])).logits[0].double()
      logp = torch.log_softmax(logits, -1).numpy()
      for t, tok in enumerate(actions[i][j]):
        out[i, j, t] = logp[len(prompts[i]) + t - 1, tok]
  return out


def test_lora_at_init_equals_the_base_exactly(tiny):
  _, config, base = tiny
  model = _model(config, base)
  params = model.init()
  _, _, pt, at = _inputs(config.vocab_size)
  lora_out, _ = model.module(params, model.frozen)(jnp.asarray(pt), jnp.asarray(at))
  full = _model(config, base, full_finetune=True)
  fparams = full.init()
  base_out, _ = full.module(fparams, full.frozen)(jnp.asarray(pt), jnp.asarray(at))
  assert np.array_equal(np.asarray(lora_out), np.asarray(base_out))
  # Every projection of both blocks has an adapter (the MLP too: it contracts with einsum).
  names = set(params["backbone"]["layers"][0]["attn"]) | set(params["backbone"]["layers"][0]["mlp"])
  assert {f"{w}_lora_b" for _, w in OURS.values()} <= names


@pytest.mark.parametrize("prefix_attention", [False, True], ids=["repeated_cache", "shared_prefix"])
def test_candidate_logprobs_and_reference_ce_match_peft(tiny, prefix_attention):
  tmodel, config, base = tiny
  model = _model(config, base, prefix_attention=prefix_attention)
  params = _random_adapters(model.init())
  prompts, actions, pt, at = _inputs(config.vocab_size)
  ours, value = model.module(params, model.frozen)(jnp.asarray(pt), jnp.asarray(at))
  ref = _torch_token_logp(_peft_model(make_torch_llama(seed=3), params), prompts, actions)
  assert np.abs(np.asarray(ours) - ref).max() <= TOL
  assert np.abs(ref).max() > 1.0
  # The adapters matter: the base alone differs by far more than the tolerance.
  assert np.abs(_torch_token_logp(tmodel, prompts, actions) - ref).max() > 1e-2
  # Scores: sum and per-token mean over real tokens.
  counts = np.array([[len(a) for a in row] for row in actions])
  for score, want in (("sum", ref.sum(-1)), ("mean", ref.sum(-1) / counts)):
    got = lm_policy.action_scores(ours, jnp.asarray(at), score)
    assert np.abs(np.asarray(got) - want).max() <= TOL
  # Reference cross-entropy on target strings drawn from q (exact expectation over q).
  q = np.array([[0.5, 0.5, 0.0], [0.0, 0.0, 1.0]], np.float32)
  ce = lm_policy.sequence_cross_entropy(ours, jnp.asarray(at), jnp.asarray(q))
  want = -(q * ref.sum(-1)).sum() / (q * counts).sum()
  assert abs(float(ce) - want) <= TOL
  assert value.shape == (2,) and np.isfinite(np.asarray(value)).all()


@pytest.mark.parametrize("prefix_attention,chunk,remat", [
    (False, 2, False), (True, 2, True), (False, 0, True)],
    ids=["chunk2", "shared_prefix_chunk2_remat", "remat"])
def test_chunked_and_rematerialised_scoring_match_peft_and_its_gradient(tiny, prefix_attention,
                                                                       chunk, remat):
  """``LMPolicyModel.apply`` with candidates scored in chunks (K = 3 padded to 4 with C = 2) and/or
  ``jax.checkpoint``: token log-probs equal peft's, and the gradient of a loss over them equals the
  one-pass, no-remat gradient."""
  _, config, base = tiny
  plain = _model(config, base, prefix_attention=prefix_attention)
  model = _model(config, base, prefix_attention=prefix_attention, candidate_chunk=chunk,
                 remat=remat)
  params = _random_adapters(model.init())
  prompts, actions, pt, at = _inputs(config.vocab_size)
  ours, value = model.apply(params, model.frozen, jnp.asarray(pt), jnp.asarray(at))
  ref = _torch_token_logp(_peft_model(make_torch_llama(seed=3), params), prompts, actions)
  assert ours.shape == ref.shape and np.abs(np.asarray(ours) - ref).max() <= TOL

  def loss(m):
    def fn(p):
      logp, v = m.apply(p, m.frozen, jnp.asarray(pt), jnp.asarray(at))
      scores = lm_policy.action_scores(logp, jnp.asarray(at), "mean")
      return jnp.sum(jax.nn.log_softmax(scores)[:, 1] * jnp.array([0.7, -1.3])) + jnp.sum(v ** 2)
    return jax.jit(jax.value_and_grad(fn))(params)

  (l1, g1), (l2, g2) = loss(plain), loss(model)
  assert abs(float(l1) - float(l2)) <= TOL
  big = max(float(np.abs(x).max()) for x in jax.tree.leaves(g1))
  assert big > 1e-3
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, atol=TOL * max(big, 1.0)), g1, g2)
  np.testing.assert_allclose(np.asarray(value), np.asarray(plain.apply(
      params, plain.frozen, jnp.asarray(pt), jnp.asarray(at))[1]), atol=TOL)


def test_choice_loss_matches_a_torch_computation(tiny):
  """The lm_choice RL loss (exact KL over candidates, REINFORCE with a value baseline) from scores
  computed by peft, against ``losses.eagle_loss`` on our scores."""
  tmodel, config, base = tiny
  model = _model(config, base)
  params = _random_adapters(model.init(), seed=2)
  ref_params = _random_adapters(model.init(), seed=5)
  prompts, actions, pt, at = _inputs(config.vocab_size, n=2, k=3)
  counts = np.array([[len(a) for a in row] for row in actions])
  agent = _torch_token_logp(_peft_model(make_torch_llama(seed=3), params), prompts, actions)
  refp = _torch_token_logp(_peft_model(make_torch_llama(seed=3), ref_params), prompts, actions)
  f, fr = agent.sum(-1) / counts, refp.sum(-1) / counts  # "mean" scores, [N=B*H, K]
  logp = f - np.log(np.exp(f).sum(-1, keepdims=True))
  logq = fr - np.log(np.exp(fr).sum(-1, keepdims=True))
  kl = (np.exp(logp) * (logp - logq)).sum(-1)
  acts = np.array([2, 0])
  values = np.array([0.1, -0.3])
  reward = np.array([0.7, -0.2])  # B = 2 episodes of H = 1
  pg = -np.mean((reward - values) * logp[np.arange(2), acts])
  want = pg + 0.3 * kl.mean() + 0.5 * 0.5 * np.mean((values - reward) ** 2)
  m = model.module(params, model.frozen)
  tl, _ = m(jnp.asarray(pt), jnp.asarray(at))
  tr, _ = model.module(ref_params, model.frozen)(jnp.asarray(pt), jnp.asarray(at))
  terms = losses.eagle_loss(
      logits=lm_policy.action_scores(tl, jnp.asarray(at), "mean")[:, None],
      ref_logits=lm_policy.action_scores(tr, jnp.asarray(at), "mean")[:, None],
      candidate_mask=None, actions=jnp.asarray(acts)[:, None],
      values=jnp.asarray(values, jnp.float32)[:, None], reward=jnp.asarray(reward, jnp.float32),
      gamma=1.0, gae_lambda=1.0, kl_coef=0.3, value_coef=0.5)
  assert abs(float(terms.kl) - kl.mean()) <= TOL
  assert abs(float(terms.policy_gradient) - pg) <= TOL
  assert abs(float(terms.total) - want) <= TOL


def test_merged_backbone_equals_the_adapted_model(tiny):
  """Folding W + A B alpha / r gives the LoRA model's logits (what the sampler decodes from)."""
  _, config, base = tiny
  model = _model(config, base)
  params = _random_adapters(model.init(), seed=4)
  _, _, pt, at = _inputs(config.vocab_size)
  want, _ = model.module(params, model.frozen)(jnp.asarray(pt), jnp.asarray(at))
  merged = lm_policy.merged_backbone(model, params, model.frozen)
  full = _model(config, merged, full_finetune=True)
  got, _ = full.module(full.init(), full.frozen)(jnp.asarray(pt), jnp.asarray(at))
  assert np.abs(np.asarray(got) - np.asarray(want)).max() <= TOL


# ---------------------------------------------------------------------------------------------------
# The trainer's Learner with the language-model agent (tiny decoder, smoke ":lm" schedule).


def _learner(mesh, config_, base, kind="lm_choice", overlap=True, microbatches=1):
  from configs import movielens_smoke  # noqa: PLC0415
  from eagle_jax.agent import lm_features, trainer  # noqa: PLC0415

  config = movielens_smoke.get_config("lm")
  config.policy.kind = kind
  config.rl.overlap = overlap  # off: on-policy batches (importance ratio 1)
  config.rl.microbatches = microbatches
  config.policy.lm.prompt_tokens, config.policy.lm.action_tokens = 7, 5
  config.policy.lm.lora_rank, config.policy.lm.lora_alpha = 4, 8.0
  decoder = lm_features.AgentDecoder(config_, base, None, "tiny")
  return trainer.Learner(trainer.validate(config, mesh, inputs=False), 0, 0, mesh, decoder)


def _lm_batch(vocab, seed, b=8, h=2, k=3):
  rng = np.random.RandomState(seed)
  _, _, pt, at = _inputs(vocab, n=b * h, k=k, seed=seed)
  return {"state": pt.reshape(b, h, -1), "action_feats": at.reshape(b, h, k, -1),
          "mask": np.ones((b, h, k), bool), "actions": rng.randint(0, k, (b, h)).astype(np.int32),
          "behaviour_logp": np.full((b, h), np.log(1 / k), np.float32),
          "reward": rng.normal(size=(b,)).astype(np.float32)}


def test_sharded_lm_steps_equal_one_device_and_leave_the_base_untouched(tiny):
  from eagle_jax import training  # noqa: PLC0415

  _, config, base = tiny
  results = []
  for mesh in (training.build_mesh({"data": 1}, devices=jax.devices()[:1]),
               training.build_mesh({"data": 2, "fsdp": 2, "tensor": 2})):
    learner = _learner(mesh, config, base)
    frozen_before = jax.tree.map(lambda x: np.array(x, copy=True), learner.model.frozen)
    state = learner.init_state()
    b = _lm_batch(config.vocab_size, 0)
    targets = np.zeros((8, 3), np.float32)
    targets[np.arange(8), np.arange(8) % 3] = 1.0
    ref_batch = {"state": b["state"][:, 0], "action_feats": b["action_feats"][:, 0],
                 "mask": b["mask"][:, 0], "targets": targets}
    params, opt, m0 = learner.reference_step(state["params"], state["opt_state"], ref_batch)
    state = learner.start_rl(dict(state, params=params, opt_state=opt))
    params, opt, m1 = learner.rl_step(state["params"], state["opt_state"], state["ref_params"], b)
    params, _, m2 = learner.rl_step(params, opt, state["ref_params"], _lm_batch(config.vocab_size, 1))
    results.append(([float(m0["loss"]), float(m1["total"]), float(m1["kl"]), float(m2["total"]),
                     float(m2["kl"])], jax.tree.map(np.asarray, params)))
    # The frozen base is bit-identical after training; only adapters and the value head moved.
    jax.tree.map(np.testing.assert_array_equal, frozen_before,
                 jax.tree.map(np.asarray, learner.model.frozen))
    lora = lambda p: p["backbone"]["layers"][1]["mlp"]["w_down_lora_b"]
    assert np.abs(np.asarray(lora(state["ref_params"])) - np.asarray(lora(params))).max() > 0
    if mesh.size == 8:  # the base and the adapters are really split over the mesh
      wq = learner.model.frozen["backbone"]["layers"][0]["attn"]["wq"]
      assert len({str(s.index) for s in wq.addressable_shards}) > 1
  (ma, pa), (mb, pb) = results
  np.testing.assert_allclose(ma, mb, atol=1e-5)
  assert mb[2] == 0.0  # the agent starts as its reference
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, atol=1e-5), pa, pb)


def test_microbatched_rl_step_equals_the_whole_batch(tiny):
  """``rl.microbatches = 4`` (gradient accumulation over slices of 2 episodes, sharded over a
  2-device data axis) gives the whole-batch step's metrics and parameters."""
  from eagle_jax import training  # noqa: PLC0415

  _, config, base = tiny
  mesh = training.build_mesh({"data": 2}, devices=jax.devices()[:2])
  out = []
  for m in (1, 4):
    learner = _learner(mesh, config, base, overlap=False, microbatches=m)
    state = learner.init_state()
    params = _random_adapters(state["params"], seed=4, scale=0.1)
    params, _, metrics = learner.rl_step(params, state["opt_state"], state["ref_params"],
                                         _lm_batch(config.vocab_size, 2))
    out.append((metrics, jax.tree.map(np.asarray, params)))
  (m1, p1), (m4, p4) = out
  assert float(m1["kl"]) > 1e-4
  for k in ("total", "policy_gradient", "kl", "value", "grad_norm"):
    assert abs(float(m1[k]) - float(m4[k])) <= TOL * max(1.0, abs(float(m1[k]))), k
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, atol=TOL), p1, p4)
  with pytest.raises(training.ConfigError, match="config.rl.batch_size=8 .* microbatches 8"):
    _learner(mesh, config, base, microbatches=8)


def _torch_dists(tmodel, prompts, actions):
  """Per-row [L, V] float64 next-token log-distributions at each action position (one action)."""
  out = []
  for p, a in zip(prompts, actions):
    with torch.no_grad():
      logits = tmodel(torch.tensor([p + a])).logits[0].double()
    out.append(torch.log_softmax(logits, -1).numpy()[len(p) - 1: len(p) + len(a) - 1])
  return out


def test_written_action_loss_token_kl_matches_peft(tiny):
  """lm_generate: the per-token KL(pi || pi_ref) over the vocabulary along the written action and
  the policy-gradient loss on its summed log-probability, against peft (float64 in torch)."""
  from eagle_jax import training  # noqa: PLC0415

  _, config, base = tiny
  mesh = training.build_mesh({"data": 1}, devices=jax.devices()[:1])
  learner = _learner(mesh, config, base, kind="lm_generate", overlap=False)
  model = learner.model
  params = _random_adapters(model.init(), seed=2)
  ref_params = _random_adapters(model.init(), seed=5)
  b, h = 2, 2
  prompts, actions, pt, at = _inputs(config.vocab_size, n=b * h, k=1, seed=3)
  batch = {"state": pt.reshape(b, h, -1), "action_feats": at.reshape(b, h, 1, -1),
           "mask": np.ones((b, h, 1), bool), "actions": np.zeros((b, h), np.int32),
           "behaviour_logp": np.zeros((b, h), np.float32),
           "reward": np.array([0.7, -0.4], np.float32)}
  terms = model.rl_terms(params, model.frozen, ref_params, jax.tree.map(jnp.asarray, batch),
                         learner.job.rl)
  acts = [row[0] for row in actions]
  lp = _torch_dists(_peft_model(make_torch_llama(seed=3), params), prompts, acts)
  lq = _torch_dists(_peft_model(make_torch_llama(seed=3), ref_params), prompts, acts)
  kl = np.array([(np.exp(p) * (p - q)).sum() for p, q in zip(lp, lq)]).reshape(b, h)
  taken = np.array([p[np.arange(len(a)), a].sum() for p, a in zip(lp, acts)]).reshape(b, h)
  values = np.asarray(model.scores(params, model.frozen, jnp.asarray(batch["state"]),
                                   jnp.asarray(batch["action_feats"]))[1])
  rl = learner.job.rl
  returns = batch["reward"][:, None] * rl.gamma ** np.arange(h - 1, -1, -1)
  pg = -np.mean((returns - values) * taken)  # gamma = lambda = 1: A_t = G_t - V(s_t)
  assert rl.gae_lambda == 1.0 and kl.min() > 1e-3
  assert abs(float(terms.kl) - kl.mean()) <= TOL
  assert abs(float(terms.policy_gradient) - pg) <= TOL
  want = pg + rl.kl_coef * kl.mean() + rl.value_coef * 0.5 * np.mean((values - returns) ** 2)
  assert abs(float(terms.total) - want) <= TOL


def test_writer_samples_from_the_adapted_policy(tiny):
  """lm_generate's writer decodes from the merged weights: the log pi it reports for each written
  action equals the adapted model's teacher-forced score of those tokens, greedy decoding takes
  the adapted model's argmax, and fixed keys repeat their draws."""
  from eagle_jax import training  # noqa: PLC0415
  from eagle_jax.models.tokenizer import Tokenizer  # noqa: PLC0415

  _, config, base = tiny
  mesh = training.build_mesh({"data": 1}, devices=jax.devices()[:1])
  learner = _learner(mesh, config, base, kind="lm_generate", overlap=False)
  model = learner.model
  vocab = {chr(65 + i % 26) * (1 + i // 26): i for i in range(config.vocab_size)}
  import tokenizers  # noqa: PLC0415

  backend = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="A"))
  model.decoder = lm_features_decoder(config, base, Tokenizer(backend, eos_id=3))
  params = _random_adapters(model.init(), seed=6)
  _, _, pt, _ = _inputs(config.vocab_size, n=3, k=1, seed=8)
  write = model.writer(params)
  key = jax.random.key(0)
  ids, logp, texts = write(pt, key, False)
  ids2, logp2, _ = write(pt, key, False)
  np.testing.assert_array_equal(ids, ids2)
  assert ids.shape == (3, model.action_dim) and len(texts) == 3
  tf, _ = model.token_logp(params, model.frozen, jnp.asarray(pt), jnp.asarray(ids[:, None]))
  np.testing.assert_allclose(np.asarray(tf).sum((-1, -2)), logp, atol=1e-4)
  gids, _, _ = write(pt, key, True)
  logits, _ = model._model.module(params, model.frozen)(jnp.asarray(pt),
                                                        jnp.asarray(gids[:, None]), full=True)
  first = np.asarray(logits)[:, 0, 0].argmax(-1)
  np.testing.assert_array_equal(first, gids[:, 0])


def lm_features_decoder(config, base, tokenizer):
  from eagle_jax.agent import lm_features  # noqa: PLC0415

  return lm_features.AgentDecoder(config, base, tokenizer, "tiny")
