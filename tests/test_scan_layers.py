"""The sampler's decoder blocks as one ``lax.scan`` (``Llama.scan_layers``) decode as the unrolled
blocks do, and compile one block instead of ``layers``.

References: the unrolled model (itself checked against PyTorch in ``test_sampling.py``) and
PyTorch ``generate`` on the tiny model; the compiled program's text for what was compiled.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from decoder_fixtures import make_torch_llama, save_torch
from flax import nnx
from test_prefix_share import GREEDY, HISTORY, SAMPLED, torch_greedy

from eagle_jax.models import kv_cache, layer_scan, llama, loading, lora, sampling
from eagle_jax.models.llama import Llama, LlamaConfig


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  tmodel = make_torch_llama(tie=True, seed=5)
  _, model = loading.load_llama_safetensors(save_torch(tmodel, tmp_path_factory.mktemp("s")))
  return tmodel, model


def rows(seed: int) -> list[list[int]]:
  """Four rows behind one 30-token prefix (two the same), two unrelated rows (vocabulary 97)."""
  rng = np.random.default_rng(seed)
  head = [11] + rng.integers(1, 97, 29).tolist()
  tail = lambda first, n: [first] + rng.integers(1, 97, n - 1).tolist()
  same = tail(1, 4)
  return [head + same, head + tail(2, 9), head + same, head + tail(3, 2), tail(40, 13),
          tail(50, 6)]


@pytest.mark.parametrize("params", [GREEDY, SAMPLED, HISTORY],
                         ids=["greedy", "sampled", "penalty_ngram"])
@pytest.mark.parametrize("share", [False, True], ids=["unshared", "shared"])
def test_scanned_equals_unrolled(tiny, params, share):
  tmodel, model = tiny
  scanned = sampling.Sampler(model, share_prefix=share)
  unrolled = sampling.Sampler(model, share_prefix=share, scan_layers=False)
  assert scanned.scan_layers and nnx.merge(scanned.graphdef, scanned.state).scan_layers
  assert not nnx.merge(unrolled.graphdef, unrolled.state).scan_layers
  assert not model.scan_layers  # the caller's model is not switched
  batch, seeds = rows(1), [300 + i for i in range(6)]
  a = scanned.generate_ids(batch, params, seeds=seeds)
  b = unrolled.generate_ids(batch, params, seeds=seeds)
  assert (scanned.last_plan is not None) == share
  np.testing.assert_array_equal(a.tokens, b.tokens)
  np.testing.assert_array_equal(a.mask, b.mask)
  np.testing.assert_allclose(a.logprobs, b.logprobs, atol=1e-5)
  if params is GREEDY:
    for i, row in enumerate(batch):
      assert a.tokens[i].tolist() == torch_greedy(tmodel, row), i
  if params is SAMPLED:
    assert not np.array_equal(a.tokens, scanned.generate_ids(batch, GREEDY).tokens)


def test_scanned_soft_token_prefill_equals_unrolled(tiny):
  """``generate_embeddings`` (ELM's soft tokens) runs the same scanned blocks."""
  _, model = tiny
  rng = np.random.default_rng(2)
  emb = rng.normal(0, 0.5, (3, 7, model.config.hidden)).astype(np.float32)
  mask = np.ones((3, 7), bool)
  mask[0, :3] = False
  outs = [sampling.Sampler(model, scan_layers=s).generate_embeddings(emb, mask, GREEDY)
          for s in (True, False)]
  np.testing.assert_array_equal(outs[0].tokens, outs[1].tokens)
  np.testing.assert_allclose(outs[0].logprobs, outs[1].logprobs, atol=1e-5)


def test_program_holds_one_block(tiny):
  """The compiled decode of the scanned sampler has one block's matmuls (inside a loop), the
  unrolled one ``layers`` copies: what makes its compile several times faster."""
  _, model = tiny
  batch = rows(3)
  dots = {}
  for scan in (True, False):
    s = sampling.Sampler(model, scan_layers=scan)
    tokens, mask = s._pad(batch, sampling.bucket(max(map(len, batch))))
    mode, knobs = sampling.mode_and_knobs(GREEDY, ())
    text = s._generate.lower(s.state, jnp.asarray(tokens), jnp.asarray(mask), knobs,
                             s._row_keys(len(batch), 0, None), mode=mode, new_bucket=16,
                             pad_id=s.pad_id).as_text()
    dots[scan] = text.count("dot_general")
  layers = model.config.layers
  assert layers >= 2
  # Per block: q, k, v, o, gate, up, down projections and two attention contractions, in the
  # prefill and in the decode step; the lm head outside.
  assert dots[False] >= layers * 2 * 7
  assert dots[True] <= dots[False] / layers + 8


def test_mixed_decode_program_keeps_stacked_arrays_in_16_bits(tmp_path):
  """In mixed precision the scanned decode slices each layer's bf16 weights and writes and reads
  the bf16 cache as 16-bit bits: the optimized program holds no float32 copy of a stacked
  ``[layers, ...]`` weight or cache (XLA:CPU upcasts bf16 dynamic slices and updates to float32,
  which converted the whole stacked cache at every layer's write). Checked against the same
  program with the cache in float32, which must show such a copy (the check can see one)."""
  tmodel = make_torch_llama(tie=True, seed=5)
  _, model = loading.load_llama_safetensors(save_torch(tmodel, tmp_path),
                                            **loading.precision_dtypes("mixed"))
  c = model.config
  s = sampling.Sampler(model, scan_layers=True)
  batch = rows(3)
  tokens, mask = s._pad(batch, sampling.bucket(max(map(len, batch))))
  mode, knobs = sampling.mode_and_knobs(SAMPLED, ())
  args = (s.state, jnp.asarray(tokens), jnp.asarray(mask), knobs, s._row_keys(len(batch), 0, None))
  kw = dict(mode=mode, new_bucket=16, pad_id=s.pad_id)
  slots = tokens.shape[1] + 16
  cache_f32 = f"f32[{c.layers},{len(batch)},{c.kv_heads},{slots},{c.head_dim}]"
  stacked_f32 = re.compile(rf"f32\[{c.layers},\d+,\d+(,\d+)*\]")

  def optimized_text():
    return s._generate.lower(*args, **kw).compile().as_text()

  text = optimized_text()
  assert f"u16[{c.layers},{len(batch)},{c.kv_heads},{slots},{c.head_dim}]" in text
  assert not stacked_f32.search(text), stacked_f32.search(text).group(0)
  original = kv_cache.decode_cache_dtype
  try:  # the float32 cache the decoder kept before: the same check finds its copy
    kv_cache.decode_cache_dtype = lambda config: jnp.float32
    s = sampling.Sampler(model, scan_layers=True)
    args = (s.state,) + args[1:]
    assert cache_f32 in optimized_text()
  finally:
    kv_cache.decode_cache_dtype = original


def test_scannable_only_for_uniform_plain_blocks(tiny):
  _, model = tiny
  assert model.scannable()
  sliding = LlamaConfig(vocab_size=50, hidden=16, intermediate=32, layers=2, heads=2, kv_heads=1,
                        head_dim=8, layer_types=("sliding_attention", "full_attention"),
                        sliding_window=4)
  assert not Llama(sliding, rngs=nnx.Rngs(0)).scannable()  # per-layer windows: unrolled
  # LoRA adapters (qwix) are variables the scan does not carry: unrolled.
  adapted = lora.apply_lora(model, (jnp.ones((1, 4), jnp.int32),), rank=2, alpha=4.0,
                            modules=r"layers/\d+/mlp", seed=0)
  assert not adapted.scannable()
  s = sampling.Sampler(adapted)
  assert not s.scan_layers or not nnx.merge(s.graphdef, s.state).scan_layers
  with pytest.raises(ValueError, match="cannot run as one scan"):
    layer_scan.scanned(Llama(sliding, rngs=nnx.Rngs(0)))


def test_scanned_copy_stacks_the_blocks_once(tiny):
  """``layer_scan.scanned``: the blocks' parameters stacked on a leading layer axis in the copy (each
  equal to numpy's stack of the layers'), every other parameter the caller's own array, and the
  caller's model left unrolled."""
  _, model = tiny
  scanned = layer_scan.scanned(model)
  assert scanned.scan_layers and not model.scan_layers and layer_scan.scanned(scanned) is scanned
  assert scanned.layers.layers == model.config.layers
  per_layer = [nnx.to_flat_state(nnx.state(b)) for b in model.layers]
  stacked = dict(nnx.to_flat_state(nnx.state(scanned.layers.block)))
  assert len(stacked) == len(per_layer[0]) > 0
  for path, _ in per_layer[0]:
    want = np.stack([np.asarray(dict(layer)[path][...]) for layer in per_layer])
    np.testing.assert_array_equal(np.asarray(stacked[path][...]), want)
  assert scanned.embedder.embedding[...] is model.embedder.embedding[...]


def test_mixed_scanned_copy_keeps_the_forms_its_program_reads(tmp_path):
  """In mixed precision the scanned copy holds its stacked bf16 weights and its tied embedding
  table as bits (equal to the caller's values) and the tied table transposed as the output head,
  so the compiled decode neither converts the table to float32 for the lookup nor transposes it for
  the logits, work XLA:CPU hoists out of the decode loop and repeats every call (every chunk of
  the continuous batcher). The unrolled sampler's program, which keeps the tied table, shows both
  (the check can see them)."""
  _, model = loading.load_llama_safetensors(save_torch(make_torch_llama(tie=True, seed=5), tmp_path),
                                            **loading.precision_dtypes("mixed"))
  c = model.config
  copy = layer_scan.scanned(model)
  table = np.asarray(model.embedder.embedding[...])
  assert copy.embedder.embedding[...].dtype == jnp.uint16
  np.testing.assert_array_equal(np.asarray(copy.embedder.embedding[...]).view(table.dtype), table)
  np.testing.assert_array_equal(np.asarray(copy.lm_head[...]), table.T)
  stacked = jax.tree.leaves(nnx.state(copy.layers.block))
  per_layer = [jax.tree.leaves(nnx.state(b)) for b in model.layers]
  for j, (bits, dtype) in enumerate(zip(stacked, copy.layers.dtypes)):
    want = np.stack([np.asarray(layer[j]) for layer in per_layer])
    assert str(want.dtype) == dtype
    np.testing.assert_array_equal(np.asarray(bits).view(want.dtype), want)
  hoisted = re.compile(rf"= (f32\[{c.vocab_size},{c.hidden}\]|bf16\[{c.hidden},{c.vocab_size}\])"
                       r"\{[0-9,]*\} (fusion|copy|convert|transpose)\(")
  batch = rows(3)
  mode, knobs = sampling.mode_and_knobs(SAMPLED, ())
  for scan in (True, False):
    s = sampling.Sampler(model, scan_layers=scan)
    tokens, mask = s._pad(batch, sampling.bucket(max(map(len, batch))))
    text = s._generate.lower(s.state, jnp.asarray(tokens), jnp.asarray(mask), knobs,
                             s._row_keys(len(batch), 0, None), mode=mode, new_bucket=16,
                             pad_id=s.pad_id).compile().as_text()
    found = hoisted.search(text)
    assert (found is None) == scan, found and found.group(0)


def test_param_count_counts_a_tied_table_once(tmp_path):
  """The decoding copy's transposed head holds the tied table's numbers again; ``param_count``
  (the benchmarks' FLOP floors) counts the decoder's parameters, as PyTorch does."""
  tmodel = make_torch_llama(tie=True, seed=5)
  _, model = loading.load_llama_safetensors(save_torch(tmodel, tmp_path))
  want = sum(p.numel() for p in tmodel.parameters())  # tied: one table
  copy = layer_scan.scanned(model)
  assert hasattr(copy, "lm_head")
  assert llama.param_count(model) == want
  assert llama.param_count(copy) == want
