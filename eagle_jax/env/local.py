"""In-process environment LLM: the JAX KV-cache sampler behind the ``SamplingClient`` protocol.

``LocalSampler.generate`` turns prompts into token ids (raw text, or the chat template for
``chat=True`` and message lists), groups them by sampling parameters (everything but the seed must
match inside one decode batch, because temperature, top-k/p, penalties and the token budget are
per-call knobs of ``models.sampling``), cuts each group into chunks of at most
``max(batch_buckets)`` rows and pads every chunk to the next batch bucket by repeating some of its
rows, so the jitted decode compiles once per (batch bucket, prompt bucket, new-token bucket, mode)
instead of once per batch size. (First compiles of SmolLM2's decode take tens of seconds on a small
CPU: call ``warmup`` before timing anything.)

Per-row seeds: row ``i`` is decoded with ``Sampler.generate_ids(..., seeds=[...])``, which samples
each row from its own key ``jax.random.key(prompt_seed)``. Row ``i`` is then exactly
``Sampler.generate_ids([prompt_i], params, seeds=[prompt_seed_i])`` (same tokens, up to float
reassociation from the shared padding bucket), whatever else is in the batch: the guarantee
``client.py`` documents. With bf16 matmul operands (``precision="mixed"`` or ``"bfloat16"``,
``models.loading.PRECISIONS``) reassociation can flip a bf16 rounding, so "same tokens" holds up
to ties at bf16 resolution (log-probs a few hundredths of a nat apart), as in any bf16 server.

Prefix sharing (``share_prefix=True``, default off): each decode call prefills token prefixes
shared by its rows once (``models/prefix.py``: a state's transition prompts share the state text,
chat prompts the system prompt), with the same tokens as unshared decoding up to float
reassociation; rows of one parameter group are then ordered by their token ids, not their lengths,
so rows with a common prefix land in the same chunk.

Model calls run on one worker thread, so the asyncio loop (e.g. the HTTP server's) stays responsive
and calls never overlap on the device.

Continuous batching (``continuous=True``): instead of decoding each call's chunks to the end, every
prompt goes to a ``models.continuous.ContinuousBatcher`` of ``slots`` rows, whose worker admits
waiting prompts (of this call or of any call made meanwhile, e.g. the server's next requests) at
every ``chunk``-step boundary and answers each as soon as it is done; each answer is what a batch of
one gives (same tokens up to float reassociation).

Stop strings: a stop string that is a single token of the vocabulary is added to the decode's stop
ids (the row ends early); every answer is also cut before the first occurrence of any stop string,
which is exact for multi-token strings (later tokens cannot change earlier text).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import pathlib
from collections.abc import Sequence

from eagle_jax.env import client as client_lib
from eagle_jax.env.client import (
  Completion,
  Prompt,
  ResultCallback,
  SamplingBackend,
  SamplingParams,
)
from eagle_jax.models import prefix as prefix_lib
from eagle_jax.models import sampling as sampling_lib

DEFAULT_BATCH_BUCKETS = (1, 2, 4, 8)


@dataclasses.dataclass(frozen=True)
class TokenCompletion(Completion):
  """A ``Completion`` with the token-level detail the HTTP server reports (usage, logprobs).

  Attributes:
    prompt_tokens: tokens of the rendered prompt.
    tokens: every generated token as text (special tokens shown; stop token included).
    token_logprobs: the model's log-prob of each generated token (log-softmax of the raw logits).
  """

  prompt_tokens: int | None = None
  tokens: tuple[str, ...] = ()
  token_logprobs: tuple[float, ...] = ()


def shared_cuts(seqs: Sequence[Sequence[int]], step: int) -> list[int]:
  """Chunk ends for token sequences sorted by their ids: chunks of at most ``step`` rows, each
  ending, within its last half, at the latest row boundary that sits between prefix groups.

  Rows with a common prefix are adjacent once sorted; a chunk that ends inside such a group (a
  state's K transition prompts) makes both chunks prefill the group's prefix, and the extra
  distinct prefix can round the chunk's prefix batch up to the next bucket. A boundary counts as
  between groups when its two rows share at most twice the fewest tokens any candidate boundary
  shares (what every row has in common, e.g. the chat template, against a state's whole text).

  Returns: increasing ends, the last ``len(seqs)``.
  """
  ends, start = [], 0
  while len(seqs) - start > step:
    candidates = range(start + max(1, (step + 1) // 2), start + step + 1)
    shared = {e: prefix_lib.common_prefix(seqs[e - 1], seqs[e]) for e in candidates}
    least = min(shared.values())
    end = max(e for e in candidates if shared[e] <= 2 * least)
    ends.append(end)
    start = end
  return [*ends, len(seqs)]


class LocalSampler(SamplingBackend):
  """``SamplingBackend`` over an in-process ``models.sampling.Sampler``.

  Args:
    sampler: the JAX sampler (must have a tokenizer).
    model_id: name in cache keys and in the server's ``model`` field.
    batch_buckets: allowed decode batch sizes (ascending); the largest is the most rows per call.
    chat: ``default_chat`` for ``sample`` calls that do not pass ``chat``.
    max_len: longest prompt + max_tokens accepted (default: the model config's ``max_len``).
    share_prefix: prefill prefixes shared by the rows of a decode call once (see above); None:
      the sampler's ``share_prefix`` (off by default).
    continuous: continuous batching (see above) instead of per-call decode batches.
    slots: decode rows of the continuous batcher.
    chunk: decode steps between its admissions.
  """

  reports_logprobs = True  # answers are TokenCompletions (the server's ``logprobs``)

  def __init__(
      self,
      sampler: sampling_lib.Sampler,
      *,
      model_id: str = "smollm2-135m-instruct",
      batch_buckets: Sequence[int] = DEFAULT_BATCH_BUCKETS,
      chat: bool = False,
      max_len: int | None = None,
      share_prefix: bool | None = None,
      continuous: bool = False,
      slots: int = 16,
      chunk: int = 8,
  ):
    if sampler.tokenizer is None:
      raise ValueError("sampler: LocalSampler needs a Sampler built with a tokenizer")
    buckets = tuple(int(b) for b in batch_buckets)
    if not buckets or any(b < 1 for b in buckets) or list(buckets) != sorted(set(buckets)):
      raise ValueError(f"batch_buckets: expected ascending distinct ints >= 1, got {batch_buckets!r}")
    self.sampler = sampler
    self.tokenizer = sampler.tokenizer
    self.model_id = model_id
    self.default_chat = bool(chat)
    self.batch_buckets = buckets
    self.max_len = int(max_len or sampler.config.max_len)
    self.share_prefix = sampler.share_prefix if share_prefix is None else bool(share_prefix)
    self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="local-sampler")
    self.decode_calls = 0  # number of jitted decode calls (tests check batching with it)
    self.continuous = bool(continuous)
    self.batcher = None
    if self.continuous:
      from eagle_jax.models.continuous import ContinuousBatcher  # noqa: PLC0415
      self.batcher = ContinuousBatcher(sampler, slots=slots, chunk=chunk,
                                       share_prefix=self.share_prefix)

  @classmethod
  def from_gguf(
      cls, path: str | pathlib.Path | None = None, *, chat_template: str | None = None,
      scan_layers: bool = True, precision: str = "float32", **kwargs
  ) -> LocalSampler:
    """Loads a llama or gemma3 GGUF (default: the pinned SmolLM2-135M-Instruct asset).

    The architecture is dispatched by ``loading.load_llama_gguf``; the tokenizer is
    ``Tokenizer.from_gguf`` of the same file, with ``chat_template`` overriding the file's chat
    template (``models.chat_template.resolve``); ``scan_layers``: ``Sampler(scan_layers=)``;
    ``precision``: a name in ``loading.PRECISIONS`` (``"mixed"``: bf16 matmuls on a CPU).
    """
    from eagle_jax import assets
    from eagle_jax.models import loading
    from eagle_jax.models.tokenizer import Tokenizer

    dtypes = loading.precision_dtypes(precision)
    path = pathlib.Path(path) if path is not None else assets.smollm2_gguf()
    _, model = loading.load_llama_gguf(path, **dtypes)
    return cls(sampling_lib.Sampler(model, Tokenizer.from_gguf(path, chat_template),
                                    scan_layers=scan_layers), **kwargs)

  # ----------------------------------------------------------------------------------------------
  # Tokens.
  # ----------------------------------------------------------------------------------------------

  def encode(self, prompt: Prompt, params: SamplingParams) -> list[int]:
    """Prompt token ids (chat template when ``client.is_chat``; else the raw text, with the
    model's bos token when its tokenizer adds one)."""
    if client_lib.is_chat(prompt, params):
      messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
      return list(self.tokenizer.apply_chat_template(messages, tokenize=True))
    return self.tokenizer.encode_prompt(prompt)

  def _stop_ids(self, params: SamplingParams) -> tuple[int, ...]:
    ids = list(self.tokenizer.stop_ids)
    for s in params.stop:
      enc = self.tokenizer.encode(s)
      if len(enc) == 1 and self.tokenizer.decode(enc) == s and enc[0] not in ids:
        ids.append(enc[0])
    return tuple(ids)

  # ----------------------------------------------------------------------------------------------
  # Decoding (worker thread).
  # ----------------------------------------------------------------------------------------------

  def _bucket(self, n: int) -> int:
    return next(b for b in self.batch_buckets if b >= n)

  def _run_chunk(self, ids: list[list[int]], params: SamplingParams,
                 seeds: list[int]) -> list[Completion]:
    """Decodes one chunk of <= max bucket rows with the same params (but their own seeds)."""
    n = len(ids)
    b = self._bucket(n)
    prompt_lens = [len(x) for x in ids]
    # Padding rows copy rows spread over the chunk, so with prefix sharing no prefix group grows
    # by more than about b / n rows (its seats, read by every step, are bucketed to the largest).
    fill = [j * n // (b - n) for j in range(b - n)]
    ids = ids + [ids[j] for j in fill]
    seeds = seeds + [seeds[j] for j in fill]
    stop = self._stop_ids(params)
    out = self.sampler.generate_ids(
        ids, params.replace(stop_ids=stop), seeds=seeds, share_prefix=self.share_prefix)
    self.decode_calls += 1
    return [self._completion([t for t, m in zip(row, live) if m],
                             [lp for lp, m in zip(logp, live) if m], plen, params, stop)
            for row, live, logp, plen in zip(out.tokens[:n].tolist(), out.mask[:n].tolist(),
                                             out.logprobs[:n].tolist(), prompt_lens)]

  def _completion(self, gen: list[int], logprobs: list[float], prompt_len: int,
                  params: SamplingParams, stop: Sequence[int]) -> TokenCompletion:
    """A row's generated tokens (stop token included) -> its ``TokenCompletion``."""
    stopped = bool(gen) and gen[-1] in stop
    text = self.tokenizer.decode([t for t in gen if t not in stop])
    cut = [text.find(s) for s in params.stop if s in text]
    if cut:
      text = text[: min(cut)]
      stopped = True
    return TokenCompletion(
        text=text, finish_reason="stop" if stopped else "length", completion_tokens=len(gen),
        prompt_tokens=prompt_len,
        tokens=tuple(self.tokenizer.decode([t], skip_special_tokens=False) for t in gen),
        token_logprobs=tuple(logprobs))

  def generate_sync(
      self,
      prompts: Sequence[Prompt],
      params: Sequence[SamplingParams],
      on_result: ResultCallback | None = None,
  ) -> list[Completion]:
    """Blocking ``generate`` (runs on the caller's thread)."""
    encoded = self._encode_all(prompts, params)
    if self.batcher is not None:
      futures = self._submit(encoded, params)
      out: list[Completion | None] = [None] * len(prompts)
      where = {f: i for i, f in enumerate(futures)}
      for f in concurrent.futures.as_completed(futures):
        i = where[f]
        out[i] = self._answer(f.result(), encoded[i], params[i])
        if on_result is not None:
          on_result(i, out[i])
      return out  # type: ignore[return-value]
    groups: dict[SamplingParams, list[int]] = {}
    for i, q in enumerate(params):
      groups.setdefault(q.replace(seed=0), []).append(i)
    out = [None] * len(prompts)
    step = self.batch_buckets[-1]
    for group_params, rows in groups.items():
      # Similar lengths together keep the prompt bucket (and padding work) small; with prefix
      # sharing, sorted token ids keep rows with a common prefix together.
      rows = sorted(rows, key=(lambda i: encoded[i]) if self.share_prefix
                    else (lambda i: len(encoded[i])))
      cuts = (shared_cuts([encoded[i] for i in rows], step) if self.share_prefix
              else range(step, len(rows) + step, step))
      for start, end in zip([0, *cuts], cuts):
        chunk = rows[start:end]
        answers = self._run_chunk([encoded[i] for i in chunk], group_params,
                                  [params[i].seed for i in chunk])
        for i, c in zip(chunk, answers):
          out[i] = c
          if on_result is not None:
            on_result(i, c)
    return out  # type: ignore[return-value]

  def _submit(self, encoded: list[list[int]], params: Sequence[SamplingParams]) -> list:
    """Queues every prompt in the continuous batcher (sorted by token ids with prefix sharing,
    so prompts with a common prefix are admitted together): one future per prompt."""
    order = sorted(range(len(encoded)), key=lambda i: encoded[i]) if self.share_prefix else (
        range(len(encoded)))
    futures = [None] * len(encoded)
    for i in order:
      q = params[i]
      futures[i] = self.batcher.submit(encoded[i], q.replace(stop_ids=self._stop_ids(q)), q.seed)
    return futures

  def _answer(self, answer, ids: list[int], params: SamplingParams) -> TokenCompletion:
    """A batcher ``Answer`` -> its ``TokenCompletion``."""
    return self._completion(answer.tokens, answer.logprobs, len(ids), params,
                            self._stop_ids(params))

  def _encode_all(self, prompts: Sequence[Prompt],
                  params: Sequence[SamplingParams]) -> list[list[int]]:
    """Token ids of every prompt (checked against the model's length)."""
    client_lib.check_generate_args(prompts, params)
    encoded = []
    for i, (p, q) in enumerate(zip(prompts, params)):
      ids = self.encode(client_lib.canonical_prompt(p, f"prompts[{i}]"), q)
      if not ids:
        raise ValueError(f"prompts[{i}]: empty prompt (no tokens)")
      if len(ids) + q.max_tokens > self.max_len:
        raise ValueError(
            f"prompts[{i}]: {len(ids)} prompt tokens + max_tokens={q.max_tokens} exceed the "
            f"model's max_len={self.max_len}")
      encoded.append(ids)
    return encoded

  async def generate(
      self,
      prompts: Sequence[Prompt],
      params: Sequence[SamplingParams],
      *,
      on_result: ResultCallback | None = None,
  ) -> list[Completion]:
    loop = asyncio.get_running_loop()
    if self.batcher is not None:  # answered by the batcher's worker; the loop only waits
      prompts, params = list(prompts), list(params)
      encoded = self._encode_all(prompts, params)
      futures = self._submit(encoded, params)

      async def one(i: int) -> Completion:
        c = self._answer(await asyncio.wrap_future(futures[i]), encoded[i], params[i])
        if on_result is not None:
          on_result(i, c)
        return c

      return list(await asyncio.gather(*(one(i) for i in range(len(prompts)))))
    if on_result is not None:
      callback = on_result
      on_result = lambda i, c: loop.call_soon_threadsafe(callback, i, c)
    return await loop.run_in_executor(
        self._executor, self.generate_sync, list(prompts), list(params), on_result)

  def warmup(self, max_tokens: int, *, temperature: float = 0.0, prompt_len: int = 8,
             batch_sizes: Sequence[int] | None = None) -> None:
    """Compiles the decode for the given batch buckets (default: all) and one prompt bucket."""
    prompt = " ".join(["word"] * max(1, prompt_len))
    for b in batch_sizes or self.batch_buckets:
      params = [SamplingParams(max_tokens=max_tokens, temperature=temperature, seed=i)
                for i in range(b)]
      self.generate_sync([prompt] * b, params)

  async def aclose(self) -> None:
    self._executor.shutdown(wait=False)
    if self.batcher is not None:
      self.batcher.close()
