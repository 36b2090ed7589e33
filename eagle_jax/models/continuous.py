"""Continuous batching: decode slots that requests join and leave between chunks of decode steps.

``ContinuousBatcher`` owns ``slots`` decode rows of one ``Sampler``'s model and a worker thread.
Requests (token ids, sampling parameters, seed) are submitted from any thread and answered through
``concurrent.futures.Future``; the worker runs the decode in chunks of ``chunk`` steps and, between
chunks, retires finished rows and admits waiting requests into the free rows, so a request that
arrives while others decode starts at the next chunk boundary, and a short request never waits for
the longest row of a batch.

**Layout.** The slots share one KV cache of ``W = P_own + N_cap + chunk`` slots and one write
index ``I`` (``llama.KVCache``). A request joins by a prefill of its prompt (left-padded to a bucket
``P``) whose ``P`` cache slots are written into its row at ``[I - P, I)`` (the index first moves up
to ``P`` when it is lower: slots at and after ``I`` are masked in every row). Each decode step then
writes every row at ``I``. When the next chunk would pass ``W``, the cache is shifted left by ``I``
minus the oldest live row's span (``compact``): spans are at most ``P_own + N_cap - 1``, so the
chunk then fits. RoPE positions count each row's real tokens (the cache mask), so neither the slot a
row starts at nor a shift changes them; attention ignores masked slots. Models with sliding-window
layers measure windows in slots and are refused.

**Shared prefixes.** Without sharing, ``P_own = P_cap`` and each row holds its whole prompt. With
``share_prefix``, the requests admitted together are grouped by shared token prefix
(``prefix.plan``); each group's prefix is prefilled once into an entry of a pool
(``prefix_pool.py``) and each row keeps only its suffix (at most ``suffix_cap`` tokens:
``P_own``) in its own row, so a state's K transitions hold its text once, and every decode step reads
each live prefix once for all of its rows (``attention.attend_shared_prefix``), not once per row.
A row whose suffix would be longer gets a prefix of its own. Entries are freed when their last
row leaves.

**Exactness.** Each row goes through the computations of ``Sampler.generate_ids`` on that prompt
alone: the same prefill, the same logit processing (repetition penalty over its own prompt and
tokens, n-gram bans over its own history), its own key ``key(seed)`` folded with its own step
count, its own token budget and stop ids. Only array shapes differ (batch ``slots``, cache width
``W``, masked slots), so logits can differ in the last float bits; tests count token mismatches
against batches of one.

**Groups and compiles.** One decode runs one sampling mode and one set of knobs (all
``SamplingParams`` fields but ``seed`` and ``max_tokens``, which are per row). The worker serves
the oldest request's group; requests of another group, or longer than the running ``P_cap`` /
``N_cap``, wait until the slots drain, and no more requests are admitted meanwhile. Programs
compile once per (admission bucket, prompt bucket) for prefills, per ``W`` for inserts, shifts and
decode chunks, and per mode (with sharing, per shape of the live prefixes, ``G`` prefixes of ``R``
seats, both powers of two); a group keeps the last caps of its mode when they are at most twice
its own, so alternating groups do not recompile. ``compile_counts`` reports them.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import functools
import threading
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from eagle_jax.models import llama as llama_lib
from eagle_jax.models import logits as logits_lib
from eagle_jax.models import prefix as prefix_lib
from eagle_jax.models import prefix_pool
from eagle_jax.models import sampling as sampling_lib
from eagle_jax.models.sampling_params import SamplingParams


class Slots(NamedTuple):
  """Device state of the decode rows (a pytree).

  Attributes:
    cache: k, v [L, B, W, KVH, hd]; mask [B, W]; index [] int32.
    logits: [B, V] float32 next-token logits of each row.
    keys: [B] PRNG keys.
    step: [B] int32 tokens generated so far.
    max_new: [B] int32 token budget.
    done: [B] bool, finished or free.
    presence: [B, V] bool tokens already in the row (repetition penalty), or None.
    hist: [B, H] int32 prompt (right-aligned at ``P_cap``) then generated tokens (n-gram ban), or
      None; ``H = P_cap + N_cap``.
    hist_ok: [B, H] bool real tokens of ``hist``, or None.
    pool: the shared prefixes the rows read (``prefix_pool.Pool``), or None without sharing.
  """

  cache: llama_lib.KVCache
  logits: jax.Array
  keys: jax.Array
  step: jax.Array
  max_new: jax.Array
  done: jax.Array
  presence: jax.Array | None
  hist: jax.Array | None
  hist_ok: jax.Array | None
  pool: prefix_pool.Pool | None = None


@dataclasses.dataclass
class Answer:
  """One request's generated tokens (stop token included) and their model log-probs."""

  tokens: list[int]
  logprobs: list[float]


@dataclasses.dataclass
class _Request:
  ids: list[int]
  params: SamplingParams
  seed: int
  future: concurrent.futures.Future
  tokens: list[int] = dataclasses.field(default_factory=list)
  logprobs: list[float] = dataclasses.field(default_factory=list)
  start: int = 0  # cache slot of its first prompt slot


def _group(params: SamplingParams) -> SamplingParams:
  """The fields one decode shares (everything but the per-row seed and budget)."""
  return params.replace(seed=0, max_tokens=1)


def _prefill(graphdef, state, tokens, mask, shared):
  """[n, P] left-padded prompts, or a prefix-shared plan (``tokens`` then unused) -> (logits
  [n, V], the rows' own cache of P (or suffix ``Ps``) slots, the prefixes or None)."""
  model = nnx.merge(graphdef, state)
  if shared is not None:
    return prefix_lib.shared_prefill(model, shared, 0)
  cache = llama_lib.KVCache.for_decoding(model.config, tokens.shape[0], tokens.shape[1])
  hidden, cache = model.hidden_states(tokens, attention_mask=mask, cache=cache)
  return model.logits(hidden[:, -1:])[:, 0], cache, None


def _insert(slots: Slots, rows, logits, pcache, tokens, mask, keys, max_new, prefix, entries, *,
            p_cap: int):
  """Writes n prefilled rows into slots ``rows`` ([n] int32; index ``B`` = padding, dropped):
  their own cache ``pcache``, their prompts ``tokens``, ``mask`` [n, <= P_cap] (penalty and
  n-gram history) and, with ``prefix``, its prefixes into pool ``entries`` ([G] int32)."""
  cache = slots.cache
  n, width = pcache.mask.shape
  w = cache.mask.shape[1]
  index = jnp.maximum(cache.index, width)
  start = index - width

  def place(x, axis):  # [.., n, width, ..] -> [.., n, W, ..] at slots [start, start + width)
    shape = list(x.shape)
    shape[axis] = w
    origin = [0] * x.ndim
    origin[axis] = start
    return jax.lax.dynamic_update_slice(jnp.zeros(shape, x.dtype), x, origin)

  put = lambda a, x, axis=0: a.at[(slice(None),) * axis + (rows,)].set(x, mode="drop")
  new_cache = llama_lib.KVCache(
      k=put(cache.k, place(pcache.k, llama_lib.SLOT_AXIS).astype(cache.k.dtype), 1),
      v=put(cache.v, place(pcache.v, llama_lib.SLOT_AXIS).astype(cache.v.dtype), 1),
      mask=put(cache.mask, place(pcache.mask, 1)), index=index)
  presence = hist = hist_ok = None
  if slots.presence is not None:
    v = slots.presence.shape[1]
    own = jnp.zeros((n, v), jnp.int8).at[jnp.arange(n)[:, None], tokens].max(
        mask.astype(jnp.int8)).astype(bool)
    presence = put(slots.presence, own)
  if slots.hist is not None:
    h = slots.hist.shape[1]
    pad = lambda x: jnp.pad(x, ((0, 0), (p_cap - x.shape[1], h - p_cap)))
    hist, hist_ok = put(slots.hist, pad(tokens)), put(slots.hist_ok, pad(mask))
  pool = slots.pool if prefix is None else prefix_pool.put(slots.pool, prefix, entries)
  return Slots(new_cache, put(slots.logits, logits), put(slots.keys, keys),
               put(slots.step, jnp.zeros((n,), jnp.int32)), put(slots.max_new, max_new),
               put(slots.done, jnp.zeros((n,), bool)), presence, hist, hist_ok, pool)


def _compact(slots: Slots, shift) -> Slots:
  """Moves every row's slots ``shift`` to the left (the freed tail is masked)."""
  cache = slots.cache
  w = cache.mask.shape[1]
  keep = jnp.arange(w) < w - shift
  roll = lambda x, axis: jnp.roll(x, -shift, axis=axis)
  slot = llama_lib.SLOT_AXIS
  cache = llama_lib.KVCache(k=roll(cache.k, slot), v=roll(cache.v, slot),
                            mask=roll(cache.mask, 1) & keep[None], index=cache.index - shift)
  return slots._replace(cache=cache)


def _run(graphdef, state, slots: Slots, knobs: logits_lib.Knobs, prefix, *,
         mode: logits_lib.Mode, steps: int, pad_id: int, p_cap: int):
  """Up to ``steps`` decode steps (fewer when every row is done); the rows read ``prefix``
  (``prefix_pool.view``), or None.

  Returns:
    (slots, tokens [B, steps] int32, live [B, steps] bool, logprobs [B, steps] float32, steps run).
  """
  model = nnx.merge(graphdef, state)
  b, v = slots.logits.shape
  rows = jnp.arange(b)

  def body(carry):
    t, s, out_tok, out_ok, out_lp = carry
    banned = None
    if mode.ngram:
      one = lambda seq, ok, cur: logits_lib.ngram_bans(seq[None], ok[None], cur, mode.ngram, v)[0]
      banned = jax.vmap(one)(s.hist, s.hist_ok, p_cap + s.step)
    scores = logits_lib.process_logits(s.logits, mode, knobs, s.presence, banned)
    if mode.greedy:
      tok = jnp.argmax(scores, axis=-1).astype(jnp.int32)
    else:
      tok = logits_lib.draw(scores, s.keys, s.step)
    logp = jnp.take_along_axis(jax.nn.log_softmax(s.logits), tok[:, None], axis=-1)[:, 0]
    live = ~s.done
    tok = jnp.where(live, tok, pad_id)
    out_tok = out_tok.at[:, t].set(tok)
    out_ok = out_ok.at[:, t].set(live)
    out_lp = out_lp.at[:, t].set(jnp.where(live, logp, 0.0))
    presence, hist, hist_ok = s.presence, s.hist, s.hist_ok
    if mode.penalty:
      presence = presence.at[rows, tok].max(live)
    if mode.ngram:
      cur = jnp.where(live, p_cap + s.step, hist.shape[1])  # done rows: dropped
      hist = hist.at[rows, cur].set(tok, mode="drop")
      hist_ok = hist_ok.at[rows, cur].set(True, mode="drop")
    step = s.step + live
    stop = jnp.any(tok[:, None] == knobs.stop_ids[None, :], axis=-1)
    done = s.done | (live & (stop | (step >= s.max_new)))
    logits, cache = model(tok[:, None], attention_mask=live[:, None], cache=s.cache,
                          prefix=prefix)
    s = Slots(cache, logits[:, 0], s.keys, step, s.max_new, done, presence, hist, hist_ok,
              s.pool)
    return t + 1, s, out_tok, out_ok, out_lp

  cond = lambda c: (c[0] < steps) & ~jnp.all(c[1].done)
  carry = (jnp.zeros((), jnp.int32), slots, jnp.full((b, steps), pad_id, jnp.int32),
           jnp.zeros((b, steps), bool), jnp.zeros((b, steps), jnp.float32))
  t, slots, out_tok, out_ok, out_lp = jax.lax.while_loop(cond, body, carry)
  return slots, out_tok, out_ok, out_lp, t


class ContinuousBatcher:
  """Continuous batching over a ``Sampler``'s model (the module docstring).

  Args:
    sampler: the sampler whose model, tokenizer (stop and pad ids), mesh and buckets are used.
    slots: decode rows.
    chunk: decode steps between admissions.
    share_prefix: prefill the prefixes shared by requests admitted together once (``prefix.py``)
      and keep them in a pool that the decode steps read once per prefix (``prefix_pool.py``).
    suffix_cap: with sharing, the longest suffix (tokens after a row's shared prefix) kept in the
      rows' own cache, whose width is this bucket plus the new tokens; a longer one makes the
      row's prompt but its last token a prefix of its own.
  """

  def __init__(self, sampler: sampling_lib.Sampler, *, slots: int = 16, chunk: int = 8,
               share_prefix: bool = False, suffix_cap: int = 64):
    if slots < 1 or chunk < 1 or suffix_cap < 1:
      raise ValueError(f"slots, chunk and suffix_cap must be >= 1, got {slots}, {chunk}, "
                       f"{suffix_cap}")
    if not prefix_lib.supports(sampler.config):
      raise ValueError("continuous batching needs full attention (sliding windows count slots)")
    self.sampler = sampler
    self.slots = int(slots)
    self.chunk = int(chunk)
    self.share_prefix = bool(share_prefix)
    self.suffix_cap = sampling_lib.bucket(suffix_cap, sampler.min_bucket)
    self.chunks = 0  # decode chunks run (stats)
    self.admissions = 0  # prefill calls
    self.compactions = 0  # cache shifts
    self.admitted = 0  # requests admitted
    self.shared_rows = 0  # of which prefilled on top of a prefix shared with others
    self._queue: collections.deque[_Request] = collections.deque()
    self._caps: dict[logits_lib.Mode, tuple[int, int]] = {}  # last (P_cap, N_cap) per mode
    self._taken: list[_Request] = []  # out of the queue, not answered yet (failed on an error)
    self._cv = threading.Condition()
    self._closed = False
    g = sampler.graphdef
    self._prefill = jax.jit(functools.partial(_prefill, g))
    # Own partials: compile counts are this batcher's.
    self._insert = jax.jit(functools.partial(_insert), static_argnames=("p_cap",),
                           donate_argnums=(0,))
    self._compact = jax.jit(functools.partial(_compact), donate_argnums=(0,))
    self._run = jax.jit(functools.partial(_run, g), donate_argnums=(1,),
                        static_argnames=("mode", "steps", "pad_id", "p_cap"))
    self._view = jax.jit(prefix_pool.view)
    self._thread = threading.Thread(target=self._loop, name="continuous-batcher", daemon=True)
    self._thread.start()

  def stats(self) -> dict[str, int]:
    """Counters: decode chunks, admissions (prefill calls), requests admitted, of which prefilled
    on a shared prefix, and cache shifts."""
    return {"chunks": self.chunks, "admissions": self.admissions, "admitted": self.admitted,
            "shared_rows": self.shared_rows, "compactions": self.compactions}

  def compile_counts(self) -> dict[str, int]:
    """Compiled programs so far, per jitted function."""
    return {name: fn._cache_size() for name, fn in (
        ("prefill", self._prefill), ("insert", self._insert), ("compact", self._compact),
        ("decode", self._run), ("view", self._view))}

  def submit(self, ids: Sequence[int], params: SamplingParams, seed: int) -> concurrent.futures.Future:
    """Queues one request; the future's result is an ``Answer``.

    ``params.stop_ids`` must be resolved (not None): they are the decode's stop ids.
    """
    if params.stop_ids is None:
      raise ValueError("params.stop_ids: resolve the stop ids before submitting")
    ids = [int(t) for t in ids]
    if not ids:
      raise ValueError("ids: empty prompt")
    if min(ids) < 0 or max(ids) >= self.sampler.config.vocab_size:
      raise ValueError(f"ids: token ids must be in [0, {self.sampler.config.vocab_size})")
    future: concurrent.futures.Future = concurrent.futures.Future()
    with self._cv:
      if self._closed:
        raise RuntimeError("ContinuousBatcher is closed")
      self._queue.append(_Request(ids, params, int(seed), future))
      self._cv.notify()
    return future

  def close(self) -> None:
    """Stops the worker after the running requests; queued ones fail."""
    with self._cv:
      self._closed = True
      self._cv.notify()
    self._thread.join()

  # ----------------------------------------------------------------------------------------------
  # Worker thread.
  # ----------------------------------------------------------------------------------------------

  def _loop(self) -> None:
    while True:
      with self._cv:
        while not self._queue and not self._closed:
          self._cv.wait()
        if self._closed:
          for r in self._queue:
            r.future.set_exception(RuntimeError("ContinuousBatcher closed"))
          return
      try:
        self._serve_group()
      except Exception as e:  # noqa: BLE001 (handed to every waiting caller)
        with self._cv:
          failed, self._queue = self._taken + list(self._queue), collections.deque()
          self._taken = []
        for r in failed:
          if not r.future.done():
            r.future.set_exception(e)

  def _fits(self, r: _Request, group, p_cap: int, n_cap: int) -> bool:
    return (_group(r.params) == group and len(r.ids) <= p_cap and r.params.max_tokens <= n_cap)

  def _take(self, group, p_cap: int, n_cap: int, n: int) -> list[_Request]:
    """Up to n queued requests that fit, oldest first; none once a non-fitting one is oldest."""
    out = []
    with self._cv:
      while self._queue and len(out) < n and self._fits(self._queue[0], group, p_cap, n_cap):
        out.append(self._queue.popleft())
      self._taken += out
    return out

  def _serve_group(self) -> None:
    """Serves the oldest request's group until its rows drain."""
    s = self.sampler
    with self._cv:
      head = self._queue[0]
      group = _group(head.params)
      same = [r for r in self._queue if _group(r.params) == group]
    p_cap = sampling_lib.bucket(max(len(r.ids) for r in same), s.min_bucket)
    n_cap = sampling_lib.bucket(max(r.params.max_tokens for r in same), s.min_bucket)
    mode, knobs = sampling_lib.mode_and_knobs(group, group.stop_ids)
    # The last caps of this mode when they cover these and are at most twice as wide: the
    # programs of that width are compiled already (a SmolLM2 decode compile takes ~20 s on 2
    # cores; attention over a wider cache costs less than that for a group or two).
    last = self._caps.get(mode)
    if last is not None and p_cap <= last[0] <= 2 * p_cap and n_cap <= last[1] <= 2 * n_cap:
      p_cap, n_cap = last
    self._caps[mode] = (p_cap, n_cap)
    b, cfg = self.slots, s.config
    # With sharing, a row's own cache holds its suffix (the prefix sits in the pool).
    own = min(self.suffix_cap, p_cap) if self.share_prefix else p_cap
    w = own + n_cap + self.chunk
    cache = llama_lib.KVCache.for_decoding(cfg, b, w)
    ledger = prefix_pool.Ledger(b, b) if self.share_prefix else None
    h = p_cap + n_cap
    slots = Slots(
        cache, jnp.zeros((b, cfg.vocab_size), jnp.float32),
        jax.vmap(jax.random.key)(jnp.zeros((b,), jnp.uint32)), jnp.zeros((b,), jnp.int32),
        jnp.ones((b,), jnp.int32), jnp.ones((b,), bool),
        jnp.zeros((b, cfg.vocab_size), bool) if mode.penalty else None,
        jnp.full((b, h), s.pad_id, jnp.int32) if mode.ngram else None,
        jnp.zeros((b, h), bool) if mode.ngram else None,
        prefix_pool.Pool.empty(cfg, b, p_cap) if ledger is not None else None)
    active: dict[int, _Request] = {}
    index = 0
    view, view_key = None, None
    while True:
      if index + self.chunk > w:  # shift so the next chunk fits
        span = max((index - r.start for r in active.values()), default=0)
        slots = s._run(self._compact, slots, jnp.int32(index - span))
        self.compactions += 1
        for r in active.values():
          r.start -= index - span
        index = span
      free = [i for i in range(b) if i not in active]
      new = self._take(group, p_cap, n_cap, len(free))
      if new:
        slots, index = self._admit(slots, new, free, active, p_cap, own, index, ledger)
        view_key = None  # an entry may hold another prefix for the same rows
      if not active:
        return
      if ledger is not None and ledger.key() != view_key:
        arrays, view_key = ledger.arrays(), ledger.key()
        view = None if arrays is None else s._run(self._view, slots.pool,
                                                  *map(jnp.asarray, arrays))
      slots, tok, ok, lp, t = s._run(self._run, s.state, slots, knobs, view, mode=mode,
                                     steps=self.chunk, pad_id=s.pad_id, p_cap=p_cap)
      self.chunks += 1
      tok, ok, lp, done = map(np.asarray, (tok, ok, lp, slots.done))
      index += int(t)
      for i, r in list(active.items()):
        keep = ok[i]
        r.tokens += tok[i][keep].tolist()
        r.logprobs += lp[i][keep].tolist()
        if done[i]:
          del active[i]
          if ledger is not None:
            ledger.retire(i)
          with self._cv:
            self._taken.remove(r)
          r.future.set_result(Answer(r.tokens, r.logprobs))

  def _admit(self, slots: Slots, new: list[_Request], free: list[int],
             active: dict[int, _Request], p_cap: int, own: int, index: int,
             ledger: prefix_pool.Ledger | None) -> tuple[Slots, int]:
    """Prefills ``new`` (together) and writes them into free rows (own caches of ``own`` slots;
    with sharing, their prefixes into the pool's entries)."""
    s = self.sampler
    n = len(new)
    nb = prefix_pool.pow2(n)  # admission bucket
    ids = [r.ids for r in new] + [new[0].ids] * (nb - n)
    groups = []
    if ledger is not None:
      plan = prefix_lib.plan(ids, min_shared=s.min_shared, min_bucket=s.min_bucket,
                             pad_id=s.pad_id, bucket=sampling_lib.bucket)
      groups = prefix_pool.admission_groups(
          ids, [] if plan is None else list(zip(plan.groups, plan.prefix_lengths)), own)
    rows = np.full((nb,), self.slots, np.int32)
    rows[:n] = free[:n]
    shared, entries = None, None
    if groups:
      inputs = prefix_lib.build_inputs(ids, groups, pad_id=s.pad_id, min_bucket=s.min_bucket,
                                       bucket=sampling_lib.bucket)
      shared = prefix_lib.SharedInputs(*map(jnp.asarray, inputs))
      entries = np.full((inputs.prefix_tokens.shape[0],), self.slots, np.int32)
      for k, (members, _) in enumerate(groups):
        real = [i for i in members if i < n]
        if real:  # a group of padding rows only is not kept
          entries[k] = ledger.allocate()
          for i in real:
            ledger.assign(int(rows[i]), int(entries[k]))
      width = inputs.suffix_tokens.shape[1]
      tokens, mask = s._pad(ids, p_cap)  # the penalty's and n-gram ban's history
      entries = jnp.asarray(entries)
    else:
      width = sampling_lib.bucket(max(map(len, ids)), s.min_bucket)
      tokens, mask = s._pad(ids, width)
    logits, pcache, prefix = s._run(self._prefill, s.state, jnp.asarray(tokens),
                                    jnp.asarray(mask), shared)
    self.admissions += 1
    self.admitted += n
    self.shared_rows += sum(1 for members, _ in groups for i in members if i < n)
    keys = jax.vmap(jax.random.key)(jnp.asarray([r.seed for r in new] + [0] * (nb - n), jnp.uint32))
    max_new = jnp.asarray([r.params.max_tokens for r in new] + [1] * (nb - n), jnp.int32)
    slots = s._run(self._insert, slots, jnp.asarray(rows), logits, pcache, jnp.asarray(tokens),
                   jnp.asarray(mask), keys, max_new, prefix, entries, p_cap=p_cap)
    index = max(index, width)
    for i, r in zip(free, new):
      r.start = index - width
      active[i] = r
    return slots, index
