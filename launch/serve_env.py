r"""Serves the in-process environment LLM over an OpenAI-compatible HTTP API.

  python -m launch.serve_env --port=8000                       # SmolLM2-135M-Instruct (offline asset)
  python -m launch.serve_env --gguf=/path/model.gguf --model_name=my-llm --max_batch=16
  curl -s localhost:8000/v1/completions -d '{"model": "smollm2-135m-instruct", "prompt": "Hi",
      "max_tokens": 8, "temperature": 0}'

Clients: ``eagle_jax.env.openai.OpenAIClient(base_url="http://HOST:PORT", model=...)``. Concurrent
requests are batched into one decode call (``eagle_jax.env.server``). ``--warmup_tokens`` compiles
the decode for every batch bucket before the port opens, so the first requests are not slow.
The port is bound before the model loads: a busy port fails at once with one line naming it.
Prints ``serving <model> on http://HOST:PORT`` once the port accepts connections.
"""

import asyncio
import errno
import socket
from collections.abc import Sequence

from absl import app, flags

from eagle_jax import checks, cli
from eagle_jax.env import server

_HOST = flags.DEFINE_string("host", "127.0.0.1", "Interface to bind.")
_PORT = flags.DEFINE_integer("port", 8000, "Port to bind (0: any free port).")
_MODEL = flags.DEFINE_enum("model", "smollm2", ["smollm2"], "Offline model asset to serve.")
_GGUF = flags.DEFINE_string("gguf", None, "A llama-architecture GGUF file instead of --model.")
_MODEL_NAME = flags.DEFINE_string("model_name", "smollm2-135m-instruct", "Served model name.")
_SHARE = flags.DEFINE_bool("share_prefix", False, "Prefill prefixes shared by a decode's rows once.")
_CONTINUOUS = flags.DEFINE_bool(
    "continuous", False, "Continuous batching: requests join free decode rows every --chunk steps.")
_SLOTS = flags.DEFINE_integer("slots", 16, "Decode rows of the continuous batcher.")
_PRECISION = flags.DEFINE_enum("precision", "float32", ["float32", "bfloat16", "mixed"],
                               "Model dtypes (models/loading.py PRECISIONS; mixed: bf16 matmuls).")
_CHUNK = flags.DEFINE_integer("chunk", 8, "Decode steps between admissions (continuous batching).")
_MAX_BATCH = flags.DEFINE_integer("max_batch", 8, "Most prompts per decode batch.")
_MAX_QUEUE = flags.DEFINE_integer("max_queue", 256, "Most queued prompts before 503.")
_BATCH_WAIT_MS = flags.DEFINE_float("batch_wait_ms", 5.0, "Idle wait for more prompts (ms).")
_MAX_TOKENS = flags.DEFINE_integer("max_tokens_limit", 1024, "Largest accepted max_tokens.")
_WARMUP = flags.DEFINE_integer("warmup_tokens", 0, "If > 0, compile greedy decodes of this many "
                               "tokens for every batch bucket before serving.")


def _buckets(max_batch: int) -> tuple[int, ...]:
  out, b = [], 1
  while b < max_batch:
    out.append(b)
    b *= 2
  return (*out, max_batch)


async def _serve(backend, sock: socket.socket) -> None:
  srv = server.EnvServer(backend, model=_MODEL_NAME.value, max_batch=_MAX_BATCH.value,
                         max_queue=_MAX_QUEUE.value, batch_wait_ms=_BATCH_WAIT_MS.value,
                         max_tokens_limit=_MAX_TOKENS.value)
  port = await srv.start(sock=sock)
  print(f"serving {srv.model} on http://{_HOST.value}:{port}", flush=True)
  try:
    await asyncio.Event().wait()
  finally:
    await srv.stop()


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  for flag in (_SLOTS, _CHUNK):
    if flag.value < 1:
      raise app.UsageError(f"--{flag.name}: expected >= 1, got {flag.value}")
  if _MAX_BATCH.value < 1:
    raise app.UsageError(f"--max_batch: expected >= 1, got {_MAX_BATCH.value}")
  if _GGUF.value is not None:
    checks.check_input_path(_GGUF.value, "--gguf")
  try:
    sock = server.bind_socket(_HOST.value, _PORT.value)
  except OSError as e:
    why = "is already in use" if e.errno == errno.EADDRINUSE else f"cannot be bound ({e})"
    cli.fail(f"--port={_PORT.value} on --host={_HOST.value} {why}; "
             "stop the other server or pick another port")
  from eagle_jax.env import local  # after the port check: imports JAX and the model code

  backend = local.LocalSampler.from_gguf(
      _GGUF.value, model_id=_MODEL_NAME.value, batch_buckets=_buckets(_MAX_BATCH.value),
      share_prefix=_SHARE.value, continuous=_CONTINUOUS.value, slots=_SLOTS.value,
      chunk=_CHUNK.value, precision=_PRECISION.value)
  if _WARMUP.value > 0:
    backend.warmup(_WARMUP.value)
  asyncio.run(_serve(backend, sock))


if __name__ == "__main__":
  cli.run(main)
