"""The one place that builds the environment LLM's client stack from a ``config.llm`` block.

Every job (EAGLE world, environment data, ELM targets) calls ``open_llm`` and gets an ``LLMStack``::

    BatchingClient(CachedClient(backend, ResponseCache(cache_path)))

where ``backend`` is the in-process JAX sampler (``LocalSampler`` over a GGUF, or over a decoder the
caller already holds) or an OpenAI-compatible server (``OpenAIClient``: vLLM, JetStream,
``launch.serve_env``, llama.cpp). Batching sits outside the cache so concurrent one-prompt calls
become one decode; the cache sits outside the backend so every answer is kept as it arrives.

The response-cache key names the model that answers, never a hand-typed id: ``local-jax:<sha256 of
the GGUF file, 16 hex>`` for the local sampler, ``openai:<served model name>`` for a server. A local
and a remote model thus never share cache entries, and a server serving the model under its real
name is asked for that name.

``config.llm`` fields (``check_llm_config`` validates them, naming the field):
  gguf: local GGUF path, or a pinned asset's name ("smollm2", "gemma3"); "" = SmolLM2-135M-Instruct.
  chat_template: the local model's chat template: "" = the GGUF's (ChatML when it has none), a
    bundled template's name or a .jinja file (``models.chat_template``).
  server_url: OpenAI-compatible server base URL ("" = the local sampler).
  served_model: the model name the server serves (required with ``server_url``).
  api_key_env: environment variable holding the server's API key.
  concurrency: most requests in flight to the server.
  timeout_s: per-request timeout in seconds.
  retries: retries of a failed request (connection errors, 429, 5xx).
  batch_buckets: decode batch sizes of the local sampler (each size compiles once).
  share_prefix: the local sampler prefills token prefixes shared by a decode's rows once.
  precision: the local model's dtypes (``models.loading.PRECISIONS``: "float32", "bfloat16",
    "mixed"); part of the cache identity, since it changes the answers.
  continuous: the local sampler batches continuously (``models.continuous``) in ``slots`` rows,
    admitting waiting prompts every ``chunk`` decode steps.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import os
import pathlib

from absl import logging

from eagle_jax import assets, paths
from eagle_jax.env import cache as cache_lib
from eagle_jax.env.batching import BatchingClient
from eagle_jax.env.client import SamplingBackend
from eagle_jax.models.sampling_params import check_int

FIELDS = ("gguf", "chat_template", "server_url", "served_model", "api_key_env", "concurrency",
          "timeout_s", "retries", "batch_buckets", "share_prefix", "continuous", "slots", "chunk",
          "scan_layers", "precision")
LATER_FIELDS = {"scan_layers": True, "precision": "float32"}  # value in configs saved without


def check_llm_config(llm, field: str = "config.llm") -> None:
  """Validates a ``config.llm`` block; ValueError naming ``field.<name>`` and what was expected."""
  keys = set(llm.keys())
  # Added later than the rest: configs saved by earlier runs lack them (their default applies).
  missing = sorted(set(FIELDS) - keys - set(LATER_FIELDS))
  unknown = sorted(keys - set(FIELDS))
  if missing or unknown:
    raise ValueError(f"{field}: missing fields {missing} / unknown fields {unknown}; expected "
                     f"exactly {list(FIELDS)}")
  for name in ("gguf", "chat_template", "server_url", "served_model", "api_key_env"):
    if not isinstance(llm[name], str):
      raise ValueError(f"{field}.{name}: expected a string, got {llm[name]!r}")
  if llm.server_url:
    if not llm.server_url.startswith(("http://", "https://")):
      raise ValueError(f"{field}.server_url: expected an http(s):// URL, got {llm.server_url!r}")
    if not llm.served_model:
      raise ValueError(f"{field}.served_model: required with server_url (the name the server "
                       "lists under /v1/models)")
    if llm.gguf:
      raise ValueError(f"{field}: set gguf (local sampler) or server_url (server), not both")
    if llm.chat_template:
      raise ValueError(f"{field}.chat_template: a server applies its own chat template; leave it "
                       "empty with server_url")
  elif llm.gguf and not assets.is_gguf_asset(llm.gguf) and not os.path.isfile(llm.gguf):
    raise ValueError(f"{field}.gguf: no such file {llm.gguf!r} (nor a pinned asset's name: "
                     f"{sorted(assets.GGUF_ASSETS)})")
  for name in ("share_prefix", "continuous", "scan_layers"):
    if not isinstance(llm.get(name, LATER_FIELDS.get(name)), bool):
      raise ValueError(f"{field}.{name}: expected a bool, got {llm[name]!r}")
  from eagle_jax.models.loading import precision_dtypes  # noqa: PLC0415 (JAX model code)

  precision_dtypes(llm.get("precision", LATER_FIELDS["precision"]), f"{field}.precision")
  for name, lo in (("concurrency", 1), ("retries", 0), ("slots", 1), ("chunk", 1)):
    check_int(f"{field}.{name}", llm[name], lo)
  if isinstance(llm.timeout_s, bool) or not isinstance(llm.timeout_s, (int, float)) or not (
      llm.timeout_s > 0):
    raise ValueError(f"{field}.timeout_s: expected a number > 0, got {llm.timeout_s!r}")
  buckets = tuple(llm.batch_buckets)
  if not buckets or any(isinstance(b, bool) or not isinstance(b, int) or b < 1 for b in buckets) \
      or list(buckets) != sorted(set(buckets)):
    raise ValueError(f"{field}.batch_buckets: expected ascending distinct ints >= 1, got "
                     f"{llm.batch_buckets!r}")


@functools.lru_cache(maxsize=16)
def _file_sha256(path: str, size: int, mtime_ns: int) -> str:
  del size, mtime_ns  # part of the memo key only
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 22), b""):
      h.update(chunk)
  return h.hexdigest()


def local_model_name(gguf: str | os.PathLike) -> str:
  """Cache identity of a local model file: ``local-jax:<first 16 hex of its sha256>``."""
  st = os.stat(gguf)
  return f"local-jax:{_file_sha256(str(gguf), st.st_size, st.st_mtime_ns)[:16]}"


def chat_template_id(chat_template: str) -> str:
  """Cache-identity suffix of a chat-template override ("" for the model file's own): the
  response cache keys messages, so a model rendered with another template is another model."""
  if not chat_template:
    return ""
  data = (pathlib.Path(chat_template).read_bytes() if os.path.isfile(chat_template)
          else chat_template.encode())
  return f"+chat:{hashlib.sha256(data).hexdigest()[:8]}"


def process_cache_path(path: str, process_index: int, process_count: int) -> str:
  """The response-cache file of one process: ``path`` itself on one process, after merging into
  it the per-process files an earlier multi-process run left (``cache.merge_into``); on several,
  ``<stem>.<index>.jsonl`` seeded from the shared file (no concurrent appends to one file)."""
  p = paths.path(path)
  if process_count <= 1:
    if p.parent.exists():
      own = sorted(x for x in p.parent.glob(f"{p.stem}.*{p.suffix}")
                   if x.name[len(p.stem) + 1:-len(p.suffix)].isdigit())
      if own:
        n = cache_lib.merge_into(path, own)
        logging.info("response cache %s: %d answers merged from %s", path, n,
                     [x.name for x in own])
    return path
  own = p.with_name(f"{p.stem}.{process_index}{p.suffix}")
  if not own.exists() and p.exists():
    paths.write_bytes(own, p.read_bytes())
  return os.fspath(own)


@dataclasses.dataclass
class LLMStack:
  """The client stack of one job.

  Attributes:
    client: what callers sample from (``BatchingClient`` over ``cached``).
    cached: the ``CachedClient`` (``hits`` / ``misses``).
    backend: the ``LocalSampler`` or ``OpenAIClient`` that answers misses.
    model_name: the cache identity of the answering model.
  """

  client: BatchingClient
  cached: cache_lib.CachedClient
  backend: SamplingBackend
  model_name: str

  @property
  def local(self):
    """The in-process ``LocalSampler``, or None for a server."""
    from eagle_jax.env.local import LocalSampler  # noqa: PLC0415 (JAX model code)

    return self.backend if isinstance(self.backend, LocalSampler) else None

  def counters(self) -> dict[str, int]:
    """Response-cache hits and misses so far."""
    return {"cache_hits": self.cached.hits, "cache_misses": self.cached.misses}

  async def aclose(self) -> None:
    await self.client.aclose()
    self.cached.cache.close()


def open_llm(llm, cache_path: str, *, sampler=None, model_file: str | os.PathLike | None = None,
             model_name: str | None = None, chat: bool = True,
             field: str = "config.llm", cache_memory: int = 0) -> LLMStack:
  """Builds the stack of a validated ``config.llm`` block (module docstring).

  Args:
    llm: the block (``check_llm_config`` is run here too).
    cache_path: the response-cache JSONL file.
    sampler: a ``models.sampling.Sampler`` the caller already holds (the ELM's own decoder): used
      instead of loading ``llm.gguf``; ``model_file`` then names the file its weights came from.
    model_file: the GGUF ``sampler`` was loaded from (its hash is the cache identity).
    model_name: the cache identity of ``sampler``'s weights when they come from no file (a
      random decoder: a hash of its config), instead of ``model_file``.
    chat: ``default_chat`` of the backend (string prompts rendered as one user turn).
    field: the block's path in errors.
    cache_memory: most answers the response cache keeps in memory (0: all; ``ResponseCache``).
  """
  check_llm_config(llm, field)
  if llm.server_url:
    if sampler is not None:
      raise ValueError(f"{field}.server_url: this job decodes locally; leave server_url empty")
    from eagle_jax.env.openai import OpenAIClient  # noqa: PLC0415 (the openai package)

    backend = OpenAIClient(llm.server_url, llm.served_model, api_key_env=llm.api_key_env,
                           max_concurrency=int(llm.concurrency), timeout_s=float(llm.timeout_s),
                           max_retries=int(llm.retries), default_chat=chat)
  else:
    from eagle_jax.env.local import LocalSampler  # noqa: PLC0415 (JAX model code)

    precision = llm.get("precision", LATER_FIELDS["precision"])
    if sampler is not None and model_name is not None:
      name = model_name
    else:
      path = model_file or assets.resolve_gguf(llm.gguf)
      name = local_model_name(path) + chat_template_id(llm.chat_template)
      if sampler is None and precision != "float32":
        name += f"+{precision}"  # other dtypes give other answers
    options = dict(model_id=name, batch_buckets=tuple(int(b) for b in llm.batch_buckets),
                   chat=chat, share_prefix=llm.share_prefix, continuous=llm.continuous,
                   slots=int(llm.slots), chunk=int(llm.chunk))
    if sampler is None:
      scan = llm.get("scan_layers", LATER_FIELDS["scan_layers"])
      backend = LocalSampler.from_gguf(path, chat_template=llm.chat_template or None,
                                       scan_layers=scan, precision=precision, **options)
    else:
      backend = LocalSampler(sampler, **options)
  return stack_over(backend, cache_path, cache_memory)


def stack_over(backend: SamplingBackend, cache_path: str, cache_memory: int = 0) -> LLMStack:
  """The client stack over a backend the caller built (``open_llm``'s last step; also how a
  benchmark puts ``env.standin.StandInBackend`` under the real cache and batching layers)."""
  cached = cache_lib.CachedClient(
      backend, cache_lib.ResponseCache(cache_path, max_entries=int(cache_memory)))
  return LLMStack(BatchingClient(cached), cached, backend, backend.model_id)
