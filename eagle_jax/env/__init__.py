"""The environment LLM: sampling protocol, backends (in-process JAX, OpenAI HTTP), cache, server.

Import the backends from their modules (``eagle_jax.env.local`` pulls in JAX and the model code,
``eagle_jax.env.openai`` and ``eagle_jax.env.server`` pull in aiohttp).
"""

from eagle_jax.env.cache import CachedClient, ResponseCache, cache_key
from eagle_jax.env.client import (
    Completion,
    MalformedResponseError,
    SamplingBackend,
    SamplingClient,
    SamplingError,
    SamplingParams,
    prompt_seed,
)

__all__ = [
    "CachedClient",
    "Completion",
    "MalformedResponseError",
    "ResponseCache",
    "SamplingBackend",
    "SamplingClient",
    "SamplingError",
    "SamplingParams",
    "cache_key",
    "prompt_seed",
]
