"""The dry run of a language-model agent (``agent/dry_run.py``) on 8 fake devices, tiny shapes.

The paper config with its decoder shapes replaced by a tiny preset: the report must carry the
compiled step's per-device memory, LoRA and base weights sharded over fsdp x tensor, and parameter
counts equal to a hand count from the shapes.
"""

import jax
import pytest

from configs import movielens_25m
from eagle_jax import training
from eagle_jax.agent import dry_run
from eagle_jax.models import configs as model_configs

TINY = dict(model_type="llama", vocab_size=256, hidden_size=64, intermediate_size=128,
            num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
            rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=True,
            torch_dtype="bfloat16")


def _config():
  config = movielens_25m.get_config()
  config.policy.lm.shapes = "tiny"
  config.encoder.decoder.shapes = "tiny"  # E_D's decoder backbone (the report's encoder section)
  config.policy.lm.prompt_tokens = 16
  config.policy.lm.action_tokens = 8
  config.policy.lm.lora_rank = 4
  config.actions.k = 12
  config.rl.horizon = 2
  config.rl.batch_size = 8
  config.rl.microbatches = 2  # the paper config's chunked, rematerialised, sliced step
  config.reference.batch_size = 8
  return config


@pytest.fixture(scope="module")
def report():
  if jax.device_count() < 8:
    pytest.skip("needs 8 (fake) devices")
  with pytest.MonkeyPatch.context() as mp:
    mp.setitem(model_configs.PRESETS, "tiny", TINY)
    yield dry_run.dry_run(_config())


def test_lm_dry_run_reports_per_device_memory_and_flops(report):
  assert report["compiled"]
  assert report["mesh"] == {"data": 2, "fsdp": 2, "tensor": 2}
  mem = report["memory"]["per_device_bytes"]
  assert set(mem) == {"argument", "output", "alias", "temp", "generated_code", "total"}
  assert mem["argument"] > 0 and mem["temp"] > 0
  assert mem["total"] == mem["argument"] + mem["output"] - mem["alias"] + mem["generated_code"] \
      + mem["temp"]
  fit = report["memory"]["v5e_fit"]
  assert fit["fits"] and fit["largest_slice"] >= 4 and fit["largest_slice"] % 4 == 0
  assert fit["microbatches"] == 2 and "2 slice(s) of 4 episodes" in fit["verdict"]
  assert report["flops_per_step"] == 8 * report["flops_per_step_per_device"] > 0
  assert report["decoder"]["candidate_tokens_per_step"] == 8 * 2 * 12 * 8
  assert report["decoder"]["param_dtype"] == "bfloat16"


def test_lm_dry_run_shards_lora_and_base_over_fsdp_and_tensor(report):
  params, frozen = report["param_shardings"], report["frozen_shardings"]
  # LoRA A inherits the contracted dimension's axis (embed -> fsdp), B the output's (mlp -> tensor).
  assert params["backbone/layers/*/mlp/w_gate_lora_a"] == "P('fsdp', None)"
  assert params["backbone/layers/*/mlp/w_gate_lora_b"] == "P(None, 'tensor')"
  assert frozen["backbone/layers/*/mlp/w_gate"] == "P('fsdp', 'tensor')"
  assert frozen["backbone/layers/*/attn/wq"] == "P('fsdp', 'tensor', None)"
  assert frozen["backbone/embedder/embedding"] == "P('tensor', 'fsdp')"
  assert report["batch_sharding"]["state"] == "P(('data', 'fsdp'), None, None)"


def test_lm_dry_run_param_counts_equal_the_hand_count(report):
  v, d, f, n_layers, h, kv, hd, r = 256, 64, 128, 1, 4, 2, 16, 4
  layer = d * h * hd + 2 * d * kv * hd + h * hd * d + 3 * d * f + 2 * d  # attn, mlp, 2 norms
  base = v * d + n_layers * layer + d  # tied embeddings, final norm
  # qwix LoRA: A [prod(contracted), r], B [r, prod(rest)] per einsum weight.
  lora = n_layers * r * ((d + h * hd) + 2 * (d + kv * hd) + (h * hd + d) + 2 * (d + f) + (f + d))
  counts = report["param_counts"]
  assert counts == {"trainable": lora + d + 1, "lora": lora, "value_head": d + 1,
                    "frozen_base": base, "total": base + lora + d + 1}
  assert report["param_count"] == lora + d + 1
  # The decoder-backed E_D's step is compiled too, over the same tiny decoder.
  enc = report["encoder"]
  assert enc["param_counts"]["frozen_base"] == base and enc["per_device_bytes"]["total"] > 0
  assert enc["out_dim"] == 32 + 3  # Z: the augmented WALS space, rank + 3


def test_lm_step_flops_match_xla_on_a_step_without_loops():
  """``lm_step_flops`` (counted from shapes) against XLA's ``cost_analysis`` of the same step
  compiled without slices, chunks or remat (where XLA counts every op once): within 10% at
  shapes where the matmuls dominate. With remat the count grows by exactly one forward pass."""
  if jax.device_count() < 8:
    pytest.skip("needs 8 (fake) devices")
  big = dict(TINY, vocab_size=2048, hidden_size=256, intermediate_size=1024, num_hidden_layers=2,
             head_dim=64)
  config = _config()
  config.rl.microbatches, config.policy.lm.candidate_chunk = 1, 0
  config.policy.lm.remat = False
  with pytest.MonkeyPatch.context() as mp:
    mp.setitem(model_configs.PRESETS, "tiny", big)
    out = dry_run.dry_run(config)
  xla = out["xla_cost_analysis_flops_per_device"] * 8
  assert abs(out["flops_per_step"] / xla - 1) < 0.10, (out["flops_per_step"], xla)
  c = model_configs.config_from_hf(big)
  three = dry_run.lm_step_flops(c, 8, 2, 12, 16, 8, remat=False, full_finetune=False)
  four = dry_run.lm_step_flops(c, 8, 2, 12, 16, 8, remat=True, full_finetune=False)
  assert four == pytest.approx(three * 4 / 3)


def test_lm_generate_dry_run_compiles_the_written_action_step():
  """``lm_generate`` episodes hold the written action as their one candidate: the dry run compiles
  that step (not K candidates), and its FLOPs follow."""
  if jax.device_count() < 8:
    pytest.skip("needs 8 (fake) devices")
  config = _config()
  config.policy.kind = "lm_generate"
  config.encoder.backbone = "minilm"
  with pytest.MonkeyPatch.context() as mp:
    mp.setitem(model_configs.PRESETS, "tiny", TINY)
    out = dry_run.dry_run(config)
  assert out["rl_batch"]["candidates"] == 1
  assert out["decoder"]["candidate_tokens_per_step"] == 8 * 2 * 1 * 8
  c = model_configs.config_from_hf(TINY)
  want = dry_run.lm_step_flops(c, 8, 2, 1, 16, 8, remat=True, full_finetune=False)
  assert out["flops_per_step"] == pytest.approx(want)


@pytest.mark.parametrize("shapes, match", [("", "needs the agent decoder's shapes"),
                                            ("llama-9b", "expected one of")])
def test_lm_dry_run_without_known_shapes_names_the_field(shapes, match):
  config = _config()
  config.encoder.backbone = "minilm"  # the agent's shapes are checked (no "tiny" preset here)
  config.policy.lm.shapes = shapes
  with pytest.raises(training.ConfigError, match=f"config.policy.lm.shapes.*{match}"):
    dry_run.dry_run(config)
