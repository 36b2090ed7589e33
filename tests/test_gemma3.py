"""Gemma 3 switches of the decoder against transformers' Gemma3ForCausalLM, and the real 270M GGUF.

The tiny reference is a random-weight ``Gemma3ForCausalLM`` (eager attention, float32) whose
sliding window (4) is shorter than the test sequences, whose layers mix local and global
attention with different RoPE bases (and linear scaling on the global ones), and whose norm
weights are perturbed away from HF's zero init, so every Gemma 3 switch changes the logits.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from decoder_fixtures import cached_chunk_logits, close_gguf, gguf_writer, save_torch, torch_logits
from flax import nnx

from eagle_jax import assets
from eagle_jax.models import attention, configs, llama, loading, sampling
from eagle_jax.models.files import LoadingError

TOL = 1e-4
WINDOW = 4
LAYER_TYPES = ["sliding_attention", "full_attention", "sliding_attention", "sliding_attention"]


def make_torch_gemma3(seed: int = 0, **overrides):
  """A random-weight Gemma3ForCausalLM; norms get ``w ~ N(0, 0.3)`` (HF inits them to 0)."""
  torch.manual_seed(seed)
  kwargs = dict(
      vocab_size=101, hidden_size=32, intermediate_size=48, num_hidden_layers=4,
      num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=WINDOW,
      layer_types=LAYER_TYPES, query_pre_attn_scalar=12, rms_norm_eps=1e-6,
      max_position_embeddings=64, pad_token_id=0, bos_token_id=2, eos_token_id=1,
      rope_parameters={
          "sliding_attention": {"rope_type": "default", "rope_theta": 100.0},
          "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 5000.0}})
  cfg = transformers.Gemma3TextConfig(**{**kwargs, **overrides})
  cfg._attn_implementation = "eager"
  model = transformers.Gemma3ForCausalLM(cfg).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      p.normal_(0.0, 0.3 if "norm" in name else 0.2)
  return model


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
  tmodel = make_torch_gemma3()
  path = save_torch(tmodel, tmp_path_factory.mktemp("gemma3"))
  config, model = loading.load_llama_safetensors(path)
  return tmodel, config, model


def test_config_read_from_hf(pair):
  _, config, _ = pair
  assert config.qk_norm and config.post_norms and config.scale_embeddings
  assert config.norm_offset == 1.0 and config.activation == "gelu_tanh" and config.tie_embeddings
  assert config.layer_types == tuple(LAYER_TYPES) and config.sliding_window == WINDOW
  assert (config.rope_theta, config.rope_local_theta, config.rope_scaling) == (5000.0, 100.0, 2.0)
  assert config.query_scale == pytest.approx(12**-0.5)
  assert config.layer_attention(0) == (100.0, 1.0, WINDOW)
  assert config.layer_attention(1) == (5000.0, 2.0, None)


def test_logits_match_torch_and_the_window_matters(pair):
  tmodel, config, model = pair
  tokens = np.random.RandomState(0).randint(0, config.vocab_size, (3, 12))
  ours, _ = model(jnp.asarray(tokens))
  ref = torch_logits(tmodel, tokens)
  assert np.abs(np.asarray(ours) - ref).max() <= TOL
  assert np.abs(ref).max() > 1.0
  # Honesty checks: without the window, or with one RoPE base, the logits are clearly different.
  for change in (dict(sliding_window=64), dict(rope_local_theta=5000.0), dict(rope_scaling=1.0)):
    other = nnx.merge(_graphdef(config.replace(**change)), nnx.state(model))
    diff = np.abs(np.asarray(other(jnp.asarray(tokens))[0]) - ref)
    assert diff.max() > 1e-2, change
    if "sliding_window" in change:  # before the window fills up, nothing changes
      assert diff[:, :WINDOW].max() <= TOL


def _graphdef(config):
  return nnx.split(nnx.eval_shape(lambda: llama.Llama(config, rngs=nnx.Rngs(0))))[0]


def test_left_padded_batch_matches_torch(pair):
  tmodel, config, model = pair
  tokens = np.random.RandomState(1).randint(3, config.vocab_size, (3, 12))
  mask = np.ones((3, 12), bool)
  mask[0, :3] = False
  mask[2, :1] = False
  ours = np.asarray(model(jnp.asarray(tokens), attention_mask=jnp.asarray(mask))[0])
  ref = torch_logits(tmodel, tokens, mask)
  assert np.abs(ours - ref)[mask].max() <= TOL
  alone = torch_logits(tmodel, tokens[0:1, 3:])  # the padded row run alone, unpadded
  assert np.abs(ours[0, 3:] - alone[0]).max() <= TOL


def test_kv_cache_chunks_match_torch_full_pass(pair):
  tmodel, config, model = pair
  tokens = np.random.RandomState(3).randint(3, config.vocab_size, (2, 14))
  mask = np.ones_like(tokens, bool)
  mask[1, :3] = False
  ref = torch_logits(tmodel, tokens, mask)
  ours, _ = cached_chunk_logits(model, config, tokens, mask)
  assert np.abs(ours - ref)[mask].max() <= TOL


def test_params_to_hf_round_trips_torch_state(pair):
  tmodel, _, model = pair
  back = loading.params_to_hf(model)
  sd = {k: v.numpy() for k, v in tmodel.state_dict().items()}
  assert set(back) == set(sd)
  for k, v in sd.items():
    np.testing.assert_array_equal(back[k], v, err_msg=k)


def test_greedy_generate_equals_torch_across_the_window(pair):
  tmodel, _, model = pair
  prompts = [[5, 17, 3, 88, 40, 9], [61, 7], [90, 4, 45, 45, 45, 12, 8, 64, 11, 3]]
  new = 9  # every prompt + new tokens is longer than the window (4)
  sampler = sampling.Sampler(model)
  res = sampler.generate_ids(prompts, sampling.SamplingParams(max_tokens=new, stop_ids=()))
  for i, prompt in enumerate(prompts):
    ids = torch.tensor([prompt])
    with torch.no_grad():
      out = tmodel.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new,
                            min_new_tokens=new, do_sample=False, pad_token_id=0,
                            eos_token_id=None)
    assert res.tokens[i].tolist() == out[0, len(prompt):].tolist(), i


def test_config_dicts_hub_layout_multimodal_and_errors():
  hub = dict(  # google/gemma-3-270m config.json (transformers 4.x field names)
      model_type="gemma3_text", vocab_size=262144, hidden_size=640, intermediate_size=2048,
      num_hidden_layers=18, num_attention_heads=4, num_key_value_heads=1, head_dim=256,
      hidden_activation="gelu_pytorch_tanh", max_position_embeddings=32768, rms_norm_eps=1e-6,
      rope_theta=1000000.0, rope_local_base_freq=10000.0, rope_scaling=None,
      query_pre_attn_scalar=256, sliding_window=512, _sliding_window_pattern=6,
      final_logit_softcapping=None, attn_logit_softcapping=None)
  config = configs.config_from_hf(hub)
  assert config.layer_types == attention.gemma3_layer_types(18)
  assert [i for i, t in enumerate(config.layer_types) if t == "full_attention"] == [5, 11, 17]
  assert (config.rope_theta, config.rope_local_theta, config.rope_scaling) == (1e6, 1e4, 1.0)
  assert config.query_scale == 1 / 16 and config.tie_embeddings
  big = configs.config_from_hf(
      {"model_type": "gemma3", "text_config": {**hub, "rope_scaling": {"rope_type": "linear",
                                                                       "factor": 8.0}}})
  assert big.rope_scaling == 8.0 and big.layer_attention(0) == (1e4, 1.0, 512)
  with pytest.raises(LoadingError, match="attn_logit_softcapping"):
    configs.config_from_hf({**hub, "attn_logit_softcapping": 50.0})
  with pytest.raises(LoadingError, match="sliding_window"):
    configs.config_from_hf({k: v for k, v in hub.items() if k != "sliding_window"})
  with pytest.raises(LoadingError, match="layer_types"):
    configs.config_from_hf({**hub, "layer_types": ["full_attention"]})
  with pytest.raises(ValueError, match="sliding_window"):
    llama.LlamaConfig(vocab_size=10, hidden=8, intermediate=8, layers=1, heads=2, kv_heads=2,
                      head_dim=4, layer_types=("sliding_attention",))


def write_gemma3_gguf(tmodel, path):
  """A torch Gemma 3 as a float32 gemma3 GGUF laid out like llama.cpp's converter: norms stored
  as ``1 + w``, q/k rows not permuted, hard-coded pattern/local base left to the reader."""
  c = tmodel.config
  w = gguf_writer(path, "gemma3", c, c.rope_parameters["full_attention"]["rope_theta"])
  w.add_key_length(c.head_dim)
  w.add_value_length(c.head_dim)
  w.add_sliding_window(c.sliding_window)
  sd = {k: v.detach().numpy().astype(np.float32) for k, v in tmodel.state_dict().items()}
  w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
  w.add_tensor("output_norm.weight", sd["model.norm.weight"] + 1)
  names = {"input_layernorm": "attn_norm", "post_attention_layernorm": "post_attention_norm",
           "pre_feedforward_layernorm": "ffn_norm", "post_feedforward_layernorm": "post_ffw_norm",
           "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm",
           "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
           "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
           "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
  for i in range(c.num_hidden_layers):
    for hf, gg in names.items():
      arr = sd[f"model.layers.{i}.{hf}.weight"]
      w.add_tensor(f"blk.{i}.{gg}.weight", arr + 1 if "norm" in gg else arr)
  return close_gguf(w, path)


def test_tiny_gemma3_gguf_logits_match_torch(tmp_path):
  # llama.cpp's hard-coded gemma3 choices: every 6th layer global, local base 10000, and
  # scale 1/sqrt(head_dim) (query_pre_attn_scalar = head_dim); the window is still 4.
  tmodel = make_torch_gemma3(
      seed=1, num_hidden_layers=6, layer_types=None, query_pre_attn_scalar=16,
      rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                       "full_attention": {"rope_type": "default", "rope_theta": 1e6}})
  config, model = loading.load_llama_gguf(write_gemma3_gguf(tmodel, tmp_path / "g3.gguf"))
  assert config.layer_types == attention.gemma3_layer_types(6) and config.sliding_window == WINDOW
  tokens = np.random.RandomState(5).randint(0, config.vocab_size, (2, 11))
  ref = torch_logits(tmodel, tokens)
  assert np.abs(np.asarray(model(jnp.asarray(tokens))[0]) - ref).max() <= TOL


# ------------------------------------------------------------------------------------------------
# The real Gemma 3 270M (Q4_K_M GGUF), tokenised by transformers' GGUF tokenizer.
# ------------------------------------------------------------------------------------------------


@functools.cache
def gemma3_270m():
  """(config, model, transformers tokenizer) of the real Gemma 3 270M, float32."""
  path = assets.gemma3_gguf()
  config, model = loading.load_llama_gguf(path)
  tok = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
  return config, model, tok


@functools.cache
def our_tokenizer():
  from eagle_jax.models.tokenizer import Tokenizer

  return Tokenizer.from_gguf(assets.gemma3_gguf(), chat_template="gemma")


FEW_SHOT = "Q: What is the capital of France?\nA: Paris\n"
FACTS = [("Q: What is the capital of Japan?\nA:", "Tokyo"),
         ("Q: What is the largest planet in the solar system?\nA:", "Jupiter"),
         ("Q: Who wrote the play Romeo and Juliet?\nA:", "Shakespeare")]


@pytest.mark.slow
def test_gemma3_270m_answers_factual_questions():
  config, model, tok = gemma3_270m()
  assert (config.layers, config.hidden, config.heads, config.kv_heads, config.head_dim) == (
      18, 640, 4, 1, 256)
  assert (config.vocab_size, config.sliding_window, config.intermediate) == (262144, 512, 2048)
  # Text in, text out through the project's own GGUF tokenizer (raw prompts get <bos>).
  sampler = sampling.Sampler(model, our_tokenizer())
  prompts = [FEW_SHOT + q for q, _ in FACTS]
  assert [sampler.tokenizer.encode_prompt(p) for p in prompts] == [tok(p).input_ids for p in prompts]
  res = sampler.generate(prompts, sampling.SamplingParams(max_tokens=6, stop_ids=(1, 107)))
  for (_, fact), answer in zip(FACTS, res.texts):
    assert fact in answer, res.texts


TEXTS = ["Hello world 12345, it's  fine!\n\tok", "  déjà vu — naïve café 😀 3.14159",
         "def f(x):\n    return x**2  # comment\n\n\n", "   leading and trailing   ",
         "<start_of_turn>user\nWhat is the capital of France?<end_of_turn>\n",
         "日本語のテキスト \u0001 \x7f ☃", "<b>bold</b> <unused5> <mask>", FEW_SHOT + FACTS[1][0]]


@pytest.mark.slow
def test_gemma3_tokenizer_from_the_gguf_equals_transformers_and_renders_gemma_chat():
  _, _, ref = gemma3_270m()
  ours = our_tokenizer()
  assert ours.vocab_size == len(ref) == 262144
  for text in TEXTS:
    ids = ours.encode(text)
    assert ids == ref(text, add_special_tokens=False).input_ids, text
    assert ours.decode(ids, skip_special_tokens=False) == text
    assert ours.encode_prompt(text) == ref(text).input_ids  # the file asks for <bos>
  turn = ref.convert_tokens_to_ids("<end_of_turn>")
  assert ours.stop_ids == (turn, ref.eos_token_id) and ours.pad_id == ref.pad_token_id
  msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a movie."},
          {"role": "assistant", "content": "Alien."}, {"role": "user", "content": "Another?"}]
  text = ours.apply_chat_template(msgs)
  assert text == ("<bos><start_of_turn>user\nBe brief.\n\nName a movie.<end_of_turn>\n"
                  "<start_of_turn>model\nAlien.<end_of_turn>\n<start_of_turn>user\nAnother?"
                  "<end_of_turn>\n<start_of_turn>model\n")
  assert ours.apply_chat_template(msgs, tokenize=True) == ref(text, add_special_tokens=False).input_ids


def transformers_from_gguf(path):
  """transformers' own GGUF reading of the same file (config, dequantisation, name mapping and the
  ``- 1`` on Gemma norms) into an eager float32 Gemma3ForCausalLM; ``from_pretrained(gguf_file=)``
  would need ``accelerate``, which is not installed, so its two steps are called directly."""
  from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

  cfg = transformers.AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)
  cfg._attn_implementation = "eager"
  tmodel = transformers.Gemma3ForCausalLM(cfg).eval()
  tensors = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=tmodel)["tensors"]
  missing, unexpected = tmodel.load_state_dict(
      {k: torch.as_tensor(np.asarray(v, np.float32)) for k, v in tensors.items()}, strict=False)
  assert missing == ["lm_head.weight"] and not unexpected  # lm_head is tied to the embeddings
  tmodel.tie_weights()
  return tmodel


@pytest.mark.slow
def test_gemma3_270m_logits_match_transformers_gguf_load():
  # Both sides dequantise the same file to float32 with gguf.quants, so the weights are equal and
  # only float32 summation order differs; Gemma's residual stream is large (logits up to ~35,
  # norm weights up to ~300). Measured: 1.3e-4 max abs on the 27-token prompt, 7.2e-4 over 600
  # tokens (sliding layers past their 512-slot window); the tolerance leaves ~3x headroom.
  _, model, tok = gemma3_270m()
  tmodel = transformers_from_gguf(assets.gemma3_gguf())
  assert tmodel.config.layer_types[5] == "full_attention" and tmodel.config.sliding_window == 512
  short = np.asarray([tok(FEW_SHOT + FACTS[0][0]).input_ids])
  long = np.asarray([tok(FEW_SHOT * 60).input_ids[:600]])
  forward = jax.jit(lambda m, t: m(t)[0])
  for ids in (short, long):
    ours = np.asarray(forward(model, jnp.asarray(ids)))
    ref = torch_logits(tmodel, ids)
    assert np.abs(ours - ref).max() <= 2e-3, (ids.shape, np.abs(ours - ref).max())
    assert np.abs(ref).max() > 10.0
    assert (ours[0].argmax(-1) == ref[0].argmax(-1)).mean() > 0.99
