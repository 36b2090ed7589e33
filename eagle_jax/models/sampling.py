"""Batched sampling from a ``Llama`` with a preallocated KV cache, and continuation scoring.

Generation (``Sampler.generate_ids``):

1. Prompts are **left-padded** to a length bucket ``P`` (2^k or 1.5 * 2^k, at least ``min_bucket``),
   so the last column holds every row's last prompt token and all rows share one cache write index.
   RoPE positions count real tokens only, so padding changes nothing but the slots.
2. A jitted function runs the prefill (a forward pass over ``[B, P]`` into a cache of ``S = P + N``
   slots, ``N`` the new-token bucket) and then a ``lax.while_loop`` of decode steps, each a forward
   pass over ``[B, 1]``. The loop ends when ``params.max_tokens`` are produced or every row has emitted
   a stop token. Compilation happens once per (batch size, ``P``, ``N``, sampling mode); the numeric
   knobs (temperature, top-k, top-p, penalty, stop ids, token budget) are traced values.
3. Each step turns the last logits ``l`` (float32 ``[B, V]``) into a token:
   * repetition penalty ``r`` (CTRL / Hugging Face convention): for every token already in the row
     (prompt or generated), ``l <- l / r`` if ``l > 0`` else ``l * r``;
   * no-repeat n-gram ``n``: tokens that would complete an n-gram already present are banned;
   * greedy (``temperature == 0``): ``argmax``; otherwise ``l / T``, then top-k (keep the k
     largest), then top-p (keep the smallest prefix of the sorted distribution with mass >= p; the
     top token is always kept), then a categorical draw (``logits.draw``: inverse transform
     sampling at one uniform number from ``fold_in(key, step)``).
4. Per-token log-probs are those of the **unmodified model** distribution, ``log softmax(l)[token]``
   before penalty, temperature or truncation: what a policy-gradient agent needs as ``log pi``. A
   row stops after its first stop token, which is included (with its log-prob) in the output.

Prefix sharing (``generate_ids(share_prefix=True)``, or the ``Sampler`` default; off by default):
rows of one call that start with the same tokens (at least ``min_shared``) prefill that prefix once
and then their own suffixes on top of it (``prefix.py``: grouping rule, exactness). The rows' own
cache holds only their ``Ps + N`` suffix and decode slots; every prefill and decode step attends to
the prefixes through ``attention.SharedPrefix``, which reads each prefix once for all its rows (K
candidate actions of one state read the state's keys and values once per step, not K times). It
compiles once per (batch size, number of prefixes, rows per prefix, prefix and suffix buckets,
``N``, mode), and
``compile_count`` reports how many programs the decode has compiled.

Generation from input embeddings (``Sampler.generate_embeddings``): the same decode with the
prefill run on caller-given ``[B, P, D]`` prompt embeddings (ELM soft tokens at placeholder
positions, ``eagle_jax/elm``); the prompt token ids only feed the penalty and n-gram history.

Scoring (``Sampler.score``): ``log p(continuation | prompt)`` per sequence, summed and per token,
from one cache-free forward pass over left-padded ``prompt + continuation`` (bucketed); logits are
computed only over the last ``C`` positions (continuation bucket), not the full vocabulary at every
position.

Everything is deterministic for a fixed ``seed``.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from eagle_jax.models import layer_scan
from eagle_jax.models import llama as llama_lib
from eagle_jax.models import logits as logits_lib
from eagle_jax.models import prefix as prefix_lib
from eagle_jax.models.sampling_params import SamplingParams
from eagle_jax.models.tokenizer import Tokenizer

_DEFAULT_PARAMS = SamplingParams()


@dataclasses.dataclass
class GenerationResult:
  """Generated tokens per row.

  Attributes:
    tokens: [B, N] int32 generated ids (pad id after a row stopped).
    mask: [B, N] bool, True on generated tokens (stop token included).
    logprobs: [B, N] float32 model log-probs of the tokens (0 where mask is False).
    lengths: [B] int32 number of generated tokens.
    total_logprob: [B] float32 sum of ``logprobs``.
    texts: decoded text per row (stop tokens and special tokens removed) if a tokenizer was given.
  """

  tokens: np.ndarray
  mask: np.ndarray
  logprobs: np.ndarray
  lengths: np.ndarray
  total_logprob: np.ndarray
  texts: list[str] | None = None


@dataclasses.dataclass
class ScoreResult:
  """Continuation log-likelihoods.

  Attributes:
    total: [B] float32 ``sum_j log p(c_j | prompt, c_<j)``.
    per_token: [B, C] float32, left-aligned per continuation (0 past its end).
    mask: [B, C] bool, True on continuation tokens.
  """

  total: np.ndarray
  per_token: np.ndarray
  mask: np.ndarray


def bucket(n: int, minimum: int = 16) -> int:
  """Smallest bucket >= max(n, minimum); buckets are 2^k and 1.5 * 2^k (padding waste < 1/3)."""
  n = max(int(n), int(minimum), 1)
  p = 1 << (n - 1).bit_length()  # smallest power of two >= n
  three_quarters = 3 * p // 4
  return three_quarters if p >= 4 and three_quarters >= n else p



def mode_and_knobs(params: SamplingParams, stop: Sequence[int]) -> tuple[logits_lib.Mode,
                                                                         logits_lib.Knobs]:
  """The static ``Mode`` and traced ``Knobs`` of ``params`` with stop ids ``stop``."""
  mode = logits_lib.Mode(
      greedy=params.temperature == 0.0,
      top_k=params.top_k > 0 and params.temperature > 0,
      top_p=params.top_p < 1.0 and params.temperature > 0,
      penalty=params.repetition_penalty != 1.0,
      ngram=int(params.no_repeat_ngram),
  )
  # Padded with -1 (never a token) to a multiple of 4 so a few more stop ids do not recompile.
  stop_arr = np.full((max(4, -(-len(stop) // 4) * 4),), -1, np.int32)
  stop_arr[: len(stop)] = stop
  knobs = logits_lib.Knobs(
      temperature=jnp.float32(params.temperature or 1.0),
      top_k=jnp.int32(params.top_k),
      top_p=jnp.float32(params.top_p),
      penalty=jnp.float32(params.repetition_penalty),
      stop_ids=jnp.asarray(stop_arr),
      max_new=jnp.int32(params.max_tokens),
  )
  return mode, knobs


def _generate_impl(
    graphdef,
    state,
    tokens: jax.Array,
    mask: jax.Array,
    knobs: logits_lib.Knobs,
    keys: jax.Array,
    *,
    mode: logits_lib.Mode,
    new_bucket: int,
    pad_id: int,
    embeddings: jax.Array | None = None,
    shared: prefix_lib.SharedInputs | None = None,
    copy_prefix: bool = False,
):
  """Prefill + while-loop decode.

  Args:
    tokens, mask: [B, P] left-padded prompts.
    keys: [B] PRNG keys, one per row: a row's samples depend on its own key only, never on the
      other rows of the batch.
    embeddings: optional [B, P, D] prompt input embeddings used for the prefill instead of
      ``embed(tokens)`` (soft tokens, ELM); ``tokens`` still feed the penalty and n-gram history.
    shared: optional prefix-shared prefill (``prefix.shared_prefill``, ``P = Pp + Ps``) instead
      of the prefill of ``tokens``, which then only feed the penalty and n-gram history.
    copy_prefix: with ``shared``, decode on a cache with each row's prefix copied into it
      (``prefix.forked_cache``) instead of reading the shared prefixes once per step.

  Returns:
    (tokens [B, N] int32, mask [B, N] bool, logprobs [B, N] float32).
  """
  model = nnx.merge(graphdef, state)
  config = model.config
  b, p = tokens.shape
  v = config.vocab_size
  prefix = None
  if shared is not None:
    logits, cache, prefix = prefix_lib.shared_prefill(model, shared, new_bucket)
    if copy_prefix:
      cache, prefix = prefix_lib.forked_cache(prefix, cache), None
  else:
    cache = llama_lib.KVCache.for_decoding(config, b, p + new_bucket)
    hidden, cache = model.hidden_states(tokens, attention_mask=mask, cache=cache,
                                        input_embeddings=embeddings)
    logits = model.logits(hidden[:, -1:])[:, 0]  # [B, V]
  rows = jnp.arange(b)[:, None]
  presence = None
  if mode.penalty:
    presence = jnp.zeros((b, v), jnp.int8).at[rows, tokens].max(mask.astype(jnp.int8)).astype(bool)
  seq = valid = None
  if mode.ngram:
    seq = jnp.concatenate([tokens, jnp.full((b, new_bucket), pad_id, jnp.int32)], axis=1)
    valid = jnp.concatenate([mask, jnp.zeros((b, new_bucket), bool)], axis=1)

  out_tokens = jnp.full((b, new_bucket), pad_id, jnp.int32)
  out_mask = jnp.zeros((b, new_bucket), bool)
  out_logp = jnp.zeros((b, new_bucket), jnp.float32)
  done = jnp.zeros((b,), bool)

  def cond(carry):
    step, done = carry[0], carry[1]
    return (step < knobs.max_new) & ~jnp.all(done)

  def body(carry):
    step, done, logits, cache, presence, seq, valid, out_tokens, out_mask, out_logp = carry
    banned = None
    if mode.ngram:
      banned = logits_lib.ngram_bans(seq, valid, p + step, mode.ngram, v)
    scores = logits_lib.process_logits(logits, mode, knobs, presence, banned)
    if mode.greedy:
      tok = jnp.argmax(scores, axis=-1).astype(jnp.int32)
    else:
      tok = logits_lib.draw(scores, keys, jnp.full((b,), step, jnp.int32))
    logp = jnp.take_along_axis(jax.nn.log_softmax(logits), tok[:, None], axis=-1)[:, 0]
    live = ~done
    tok = jnp.where(live, tok, pad_id)
    out_tokens = out_tokens.at[:, step].set(tok)
    out_mask = out_mask.at[:, step].set(live)
    out_logp = out_logp.at[:, step].set(jnp.where(live, logp, 0.0))
    if mode.penalty:
      presence = presence.at[jnp.arange(b), tok].max(live)
    if mode.ngram:
      seq = seq.at[:, p + step].set(tok)
      valid = valid.at[:, p + step].set(live)
    done = done | (live & jnp.any(tok[:, None] == knobs.stop_ids[None, :], axis=-1))
    new_logits, cache = model(tok[:, None], attention_mask=live[:, None], cache=cache,
                              prefix=prefix)
    return (step + 1, done, new_logits[:, 0], cache, presence, seq, valid, out_tokens, out_mask,
            out_logp)

  carry = (jnp.zeros((), jnp.int32), done, logits, cache, presence, seq, valid, out_tokens,
           out_mask, out_logp)
  carry = jax.lax.while_loop(cond, body, carry)
  return carry[7], carry[8], carry[9]


def _score_impl(graphdef, state, tokens, mask, *, cont_bucket: int):
  """tokens/mask: [B, L] left-padded prompt+continuation -> [B, C] log p of the last C tokens."""
  model = nnx.merge(graphdef, state)
  hidden, _ = model.hidden_states(tokens, attention_mask=mask)
  length = tokens.shape[1]
  h = hidden[:, length - 1 - cont_bucket : length - 1]  # predicts tokens[:, L-C:]
  logits = model.logits(h)  # [B, C, V]
  target = tokens[:, length - cont_bucket :]
  logp = jax.nn.log_softmax(logits, axis=-1)
  return jnp.take_along_axis(logp, target[..., None], axis=-1)[..., 0]


class Sampler:
  """Jitted batched generation and scoring for one model.

  Args:
    model: the decoder.
    tokenizer: optional; gives default stop ids, the pad id and decoded texts.
    mesh: optional mesh; calls run under ``jax.set_mesh(mesh)`` (parameters already placed on it,
      e.g. by ``loading.load_llama_gguf(..., mesh=mesh)``).
    min_bucket: smallest prompt / new-token bucket.
    share_prefix: default of ``generate_ids(share_prefix=)``: prefill token prefixes shared by
      rows of a call once (``prefix.py``; never for sliding-window models).
    min_shared: shortest shared prefix (tokens) worth sharing.
    copy_prefix: with sharing, decode on caches with each row's prefix copied in instead of
      reading each shared prefix once per step for all its rows; the same tokens, for comparison
      (``benchmarks/tree_bench.py``).
    scan_layers: run the decoder blocks as one ``lax.scan`` when the model allows it
      (``Llama.scannable``): every prompt-length bucket and sharing plan is a program of its own,
      and a program with one block instead of ``layers`` compiles several times faster.
  """

  def __init__(
      self,
      model: llama_lib.Llama,
      tokenizer: Tokenizer | None = None,
      *,
      mesh: jax.sharding.Mesh | None = None,
      min_bucket: int = 16,
      share_prefix: bool = False,
      min_shared: int = 16,
      copy_prefix: bool = False,
      scan_layers: bool = True,
  ):
    self.scan_layers = bool(scan_layers)
    model = self._scanned(model) if self.scan_layers else model
    self.config = model.config
    self.tokenizer = tokenizer
    self.mesh = mesh
    self.min_bucket = min_bucket
    self.share_prefix = bool(share_prefix)
    self.min_shared = int(min_shared)
    self.copy_prefix = bool(copy_prefix)
    self.last_plan: prefix_lib.PrefixPlan | None = None  # of the last generate_ids call
    self.pad_id = tokenizer.pad_id if tokenizer is not None else 0
    self.graphdef, self.state = nnx.split(model)
    self._generate = jax.jit(
        functools.partial(_generate_impl, self.graphdef),
        static_argnames=("mode", "new_bucket", "pad_id", "copy_prefix"))
    self._score = jax.jit(functools.partial(_score_impl, self.graphdef),
                          static_argnames=("cont_bucket",))

  def compile_count(self) -> int:
    """Number of compiled decode programs so far (the jitted decode's cache size)."""
    return self._generate._cache_size()

  @staticmethod
  def _scanned(model: llama_lib.Llama) -> llama_lib.Llama:
    """A copy of ``model`` that runs its blocks as one scan (``layer_scan.scanned``), if it can."""
    return layer_scan.scanned(model) if model.scannable() else model

  def set_model(self, model: llama_lib.Llama) -> None:
    """Switches to ``model``'s current parameters (same structure, so nothing recompiles)."""
    graphdef, state = nnx.split(self._scanned(model) if self.scan_layers else model)
    if graphdef != self.graphdef:
      raise ValueError("set_model: model structure or config differs from the sampler's model")
    self.state = state

  def _run(self, fn, *args, **kwargs):
    if self.mesh is None:
      return fn(*args, **kwargs)
    with jax.set_mesh(self.mesh):
      return fn(*args, **kwargs)

  def _check_ids(self, name: str, seqs: Sequence[Sequence[int]], allow_empty: bool) -> None:
    if not seqs:
      raise ValueError(f"{name}: expected at least one sequence")
    for i, s in enumerate(seqs):
      if not allow_empty and len(s) == 0:
        raise ValueError(f"{name}[{i}] is empty")
      if len(s) and (min(s) < 0 or max(s) >= self.config.vocab_size):
        raise ValueError(f"{name}[{i}]: token ids must be in [0, {self.config.vocab_size})")

  def _pad(self, seqs: Sequence[Sequence[int]], length: int) -> tuple[np.ndarray, np.ndarray]:
    tokens = np.full((len(seqs), length), self.pad_id, np.int32)
    mask = np.zeros((len(seqs), length), bool)
    for i, s in enumerate(seqs):
      if len(s):
        tokens[i, length - len(s):] = s
        mask[i, length - len(s):] = True
    return tokens, mask

  def generate_ids(
      self,
      prompts: Sequence[Sequence[int]],
      params: SamplingParams = _DEFAULT_PARAMS,
      *,
      seed: int = 0,
      seeds: Sequence[int] | None = None,
      share_prefix: bool | None = None,
  ) -> GenerationResult:
    """Generates continuations of token-id prompts (any lengths; left-padded internally).

    Args:
      prompts: token-id prompts.
      params: sampling settings.
      seed: with ``seeds=None``, row ``i`` samples with the key ``fold_in(key(seed), i)``.
      seeds: one seed per prompt; row ``i`` samples with ``key(seeds[i])``, so its answer does
        not depend on which other prompts share the batch (the environment client relies on it).
      share_prefix: prefill shared token prefixes once per call (``prefix.py``: same tokens as
        unshared decoding up to float reassociation); None: the sampler's default.
    """
    self._check_ids("prompts", prompts, allow_empty=False)
    if seeds is not None and len(seeds) != len(prompts):
      raise ValueError(f"seeds: expected one per prompt ({len(prompts)}), got {len(seeds)}")
    keys = self._row_keys(len(prompts), seed, seeds)
    share = self.share_prefix if share_prefix is None else share_prefix
    self.last_plan = None
    if share and prefix_lib.supports(self.config):
      self.last_plan = prefix_lib.plan(prompts, min_shared=self.min_shared,
                                       min_bucket=self.min_bucket, pad_id=self.pad_id,
                                       bucket=bucket)
    width = (self.last_plan.history_width if self.last_plan is not None
             else bucket(max(len(x) for x in prompts), self.min_bucket))
    tokens, mask = self._pad(prompts, width)
    if self.last_plan is None:
      return self._decode(tokens, mask, params, keys)
    shared = prefix_lib.SharedInputs(*map(jnp.asarray, self.last_plan.inputs))
    return self._decode(tokens, mask, params, keys, shared=shared)

  def generate_embeddings(
      self,
      embeddings: jax.Array | np.ndarray,
      mask: np.ndarray,
      params: SamplingParams = _DEFAULT_PARAMS,
      *,
      tokens: np.ndarray | None = None,
      seed: int = 0,
      seeds: Sequence[int] | None = None,
  ) -> GenerationResult:
    """Generates continuations of prompts given as input embeddings (e.g. with ELM soft tokens).

    The caller left-pads the prompts itself (use ``bucket`` for the width ``P`` so the decode
    compiles once per bucket); everything else is as in ``generate_ids``: the same decode loop,
    stop ids, per-row keys and log-probs, and ``generate_embeddings(model.embed(tokens), mask,
    tokens=tokens)`` gives the tokens of ``generate_ids`` on the same padded prompts.

    Args:
      embeddings: [B, P, D] left-padded prompt embeddings (padding rows are ignored).
      mask: [B, P] bool, True on real prompt positions (each row needs at least one, the last
        column must be real: left padding).
      params: sampling settings.
      tokens: optional [B, P] int32 ids of the prompt positions for the repetition penalty and the
        n-gram ban (default: the pad id everywhere, i.e. the prompt does not count).
      seed, seeds: as in ``generate_ids``.
    """
    embeddings = jnp.asarray(embeddings)
    mask = np.asarray(mask, bool)
    if embeddings.ndim != 3 or embeddings.shape[-1] != self.config.hidden:
      raise ValueError(f"embeddings: expected [B, P, {self.config.hidden}], got "
                       f"{tuple(embeddings.shape)}")
    b, p = embeddings.shape[:2]
    if mask.shape != (b, p):
      raise ValueError(f"mask: expected shape {(b, p)}, got {mask.shape}")
    if not mask[:, -1].all():
      raise ValueError("mask: prompts must be left-padded (last column real in every row)")
    if tokens is None:
      tokens = np.full((b, p), self.pad_id, np.int32)
    tokens = np.asarray(tokens, np.int32)
    if tokens.shape != (b, p):
      raise ValueError(f"tokens: expected shape {(b, p)}, got {tokens.shape}")
    if seeds is not None and len(seeds) != b:
      raise ValueError(f"seeds: expected one per prompt ({b}), got {len(seeds)}")
    return self._decode(tokens, mask, params, self._row_keys(b, seed, seeds),
                        embeddings=embeddings.astype(self.config.dtype))

  def _decode(self, tokens: np.ndarray, mask: np.ndarray, params: SamplingParams,
              keys: jax.Array, embeddings: jax.Array | None = None,
              shared: prefix_lib.SharedInputs | None = None) -> GenerationResult:
    """The decode shared by ``generate_ids`` and ``generate_embeddings``: [B, P] left-padded
    tokens and mask (and optional [B, P, D] input embeddings, or a prefix-shared prefill)
    -> ``GenerationResult``."""
    stop = params.stop_ids
    if stop is None:
      stop = self.tokenizer.stop_ids if self.tokenizer is not None else ()
    n_bucket = bucket(params.max_tokens, self.min_bucket)
    mode, knobs = mode_and_knobs(params, stop)
    extra = {} if embeddings is None else {"embeddings": embeddings}
    if shared is not None:
      extra["shared"] = shared
      extra["copy_prefix"] = self.copy_prefix
    out_tokens, out_mask, out_logp = self._run(
        self._generate, self.state, jnp.asarray(tokens), jnp.asarray(mask), knobs, keys,
        mode=mode, new_bucket=n_bucket, pad_id=self.pad_id, **extra)
    n = params.max_tokens
    out_tokens = np.asarray(out_tokens)[:, :n]
    out_mask = np.asarray(out_mask)[:, :n]
    out_logp = np.asarray(out_logp)[:, :n]
    result = GenerationResult(
        tokens=out_tokens, mask=out_mask, logprobs=out_logp,
        lengths=out_mask.sum(axis=1).astype(np.int32), total_logprob=out_logp.sum(axis=1))
    if self.tokenizer is not None:
      result.texts = [
          self.tokenizer.decode([t for t, m in zip(row, mrow) if m and t not in stop])
          for row, mrow in zip(out_tokens.tolist(), out_mask.tolist())]
    return result

  @staticmethod
  def _row_keys(n: int, seed: int, seeds: Sequence[int] | None) -> jax.Array:
    if seeds is not None:
      return jax.vmap(jax.random.key)(jnp.asarray(seeds, jnp.uint32))
    return jax.vmap(lambda i: jax.random.fold_in(jax.random.key(seed), i))(jnp.arange(n))

  def generate(
      self,
      prompts: Sequence[str],
      params: SamplingParams = _DEFAULT_PARAMS,
      *,
      seed: int = 0,
      chat: bool = False,
  ) -> GenerationResult:
    """Generates from text prompts (``chat=True`` wraps each as one ChatML user turn)."""
    if self.tokenizer is None:
      raise ValueError("generate: text prompts need a tokenizer; use generate_ids")
    if isinstance(prompts, str):
      raise ValueError("generate: prompts must be a sequence of str, not a str")
    if chat:
      ids = [self.tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=True)
             for p in prompts]
    else:
      ids = [self.tokenizer.encode_prompt(p) for p in prompts]
    return self.generate_ids(ids, params, seed=seed)

  def score(
      self, prompts: Sequence[Sequence[int]], continuations: Sequence[Sequence[int]]
  ) -> ScoreResult:
    """``log p(continuation | prompt)`` per row (prompts must be non-empty)."""
    if len(prompts) != len(continuations):
      raise ValueError(
          f"score: {len(prompts)} prompts but {len(continuations)} continuations")
    self._check_ids("prompts", prompts, allow_empty=False)
    self._check_ids("continuations", continuations, allow_empty=True)
    c_bucket = bucket(max(len(c) for c in continuations), 8)
    full = [list(p) + list(c) for p, c in zip(prompts, continuations)]
    length = bucket(max(max(len(x) for x in full), c_bucket + 1), self.min_bucket)
    tokens, mask = self._pad(full, length)
    logp = np.asarray(self._run(self._score, self.state, jnp.asarray(tokens), jnp.asarray(mask),
                                cont_bucket=c_bucket))
    cmax = max(len(c) for c in continuations)
    per_token = np.zeros((len(prompts), max(cmax, 1)), np.float32)
    cmask = np.zeros_like(per_token, bool)
    for i, c in enumerate(continuations):
      n = len(c)
      if n:
        per_token[i, :n] = logp[i, c_bucket - n:]
        cmask[i, :n] = True
    return ScoreResult(total=per_token.sum(axis=1), per_token=per_token, mask=cmask)
