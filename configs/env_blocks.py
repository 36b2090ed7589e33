"""Config blocks shared by every job that talks to the environment LLM or writes environment data.

Not a launchable config: ``configs/movielens_smoke.py``, ``configs/env_ml100k.py``,
``configs/elm_ml100k.py`` and ``configs/movielens_25m.py`` build their ``llm``, ``descriptions``,
``profiles`` and ``actions`` blocks here, so one field means one thing in every job.
``eagle_jax/env/stack.py`` and ``eagle_jax/env/build.py`` validate them.
"""

import ml_collections


def _sampling(**fields) -> ml_collections.ConfigDict:
  # Any field of eagle_jax.models.sampling_params.SamplingParams but seed and chat (set per request).
  return ml_collections.ConfigDict(dict(fields))


def llm_config(**overrides) -> ml_collections.ConfigDict:
  """``config.llm``: which environment LLM answers and how it is reached."""
  c = ml_collections.ConfigDict()
  # Local GGUF of the environment LLM: a path or a pinned asset ("smollm2", "gemma3"; "" = smollm2).
  c.gguf = ""
  # Chat template of the local model: "" = the GGUF's tokenizer.chat_template (ChatML when it has
  # none), a bundled template's name ("gemma") or a .jinja file.
  c.chat_template = ""
  # OpenAI-compatible server (vLLM, JetStream, llama.cpp, launch.serve_env) instead of the local
  # sampler, e.g. "http://127.0.0.1:8000".
  c.server_url = ""
  # The model name the server serves (its /v1/models id); required with server_url.
  c.served_model = ""
  # Environment variable holding the server's API key (never logged).
  c.api_key_env = "OPENAI_API_KEY"
  # Most requests in flight to the server.
  c.concurrency = 8
  # Per-request timeout in seconds.
  c.timeout_s = 120.0
  # Retries of a failed request (connection errors, timeouts, 429, 5xx), with backoff.
  c.retries = 4
  # Decode batch sizes of the local sampler (each size compiles once; one size: fewest compiles).
  c.batch_buckets = (8,)
  # Prefill token prefixes shared by a decode's rows once (a state's K transitions, the system
  # prompt); same tokens as without, up to float reassociation (models/prefix.py).
  c.share_prefix = False
  # Continuous batching of the local sampler: prompts join free decode rows between chunks of
  # decode steps instead of waiting for a whole batch (models/continuous.py).
  c.continuous = False
  # Decode rows of the continuous batcher.
  c.slots = 16
  # Decode steps between its admissions of waiting prompts.
  c.chunk = 8
  # Run the local model's decoder blocks as one lax.scan: each prompt bucket and sharing plan
  # compiles several times faster, each decode step is a little slower (models/layer_scan.py).
  c.scan_layers = True
  # Dtypes of the local model: "float32"; "bfloat16" (accelerators); "mixed": bfloat16 weights and
  # matmul operands, float32 activations (CPUs with bf16 units: AMX, AVX512-BF16).
  c.precision = "float32"
  c.update(overrides)
  return c


def descriptions_config(sampling=None, **overrides) -> ml_collections.ConfigDict:
  """``config.descriptions``: a plot plus reasons to like and to dislike each movie."""
  c = ml_collections.ConfigDict()
  # Sampling of the plot and reason requests (the 135M model repeats itself when greedy).
  c.sampling = _sampling(**(sampling or dict(temperature=0.7, top_p=0.9,
                                             repetition_penalty=1.2, no_repeat_ngram=3)))
  # max_tokens of the plot request.
  c.plot_tokens = 96
  # max_tokens of each reason request.
  c.reason_tokens = 40
  # Reasons to like and (separately) to dislike per movie, one request each (paper: 5 and 5).
  c.n_reasons = 5
  # Sentences kept of a plot.
  c.max_sentences = 4
  # Extra attempts (new seed) for an answer that does not parse.
  c.retries = 1
  # Fall back to "<title>, a <genres> film." when no plot parses (False: the movie is dropped).
  c.fallback = False
  # Base seed of the request seeds (derive_seed(seed, purpose, movie id, index, attempt)).
  c.seed = 0
  c.update(overrides)
  return c


def profiles_config(**overrides) -> ml_collections.ConfigDict:
  """``config.profiles``: textual user profiles."""
  c = ml_collections.ConfigDict()
  # "llm": written by the environment LLM from the user's best and worst rated titles, one
  # sentence per heading; "template": "Loved: a; b. Disliked: c; d." (no LLM call).
  c.kind = "llm"
  # The profile's sections (the paper's headings, eagle_jax.prompts.PROFILE_HEADINGS); the first
  # one must parse for a profile to exist.
  c.headings = ("Overall", "Genre", "Director", "Aesthetic", "Other")
  # Best and worst rated titles of a user shown to the profile (each).
  c.titles = 5
  # Sampling of the profile request (kind "llm").
  c.sampling = _sampling(temperature=0.7, top_p=0.9, repetition_penalty=1.2, no_repeat_ngram=3)
  # max_tokens of each section's request.
  c.tokens = 32
  # Extra attempts (new seed) for an answer that does not parse.
  c.retries = 1
  # Base seed of the request seeds.
  c.seed = 0
  c.update(overrides)
  return c


def actions_config(sampling=None, **overrides) -> ml_collections.ConfigDict:
  """``config.actions``: K candidate actions per movie."""
  c = ml_collections.ConfigDict()
  # K: candidate actions per movie, about K/5 per category of the paper.
  c.k = 100
  # LLM requests per set (categories in turn); the rest of K comes from the template grammar
  # (eagle_jax/env/actions.py), which alone reaches K = 100 for every MovieLens-100K movie.
  c.llm_calls = 4
  # Personalise each movie's set to a randomly drawn profile: half of its LLM requests carry the
  # profile and about half of its templates name the user's favourite genres (the paper: 50 of 100).
  c.personalised = True
  # The action space of a state (the paper's Table 4, eagle_jax/env/actions.py:action_space):
  # "default" (K single actions), "macro" (K tuples of macro_size actions applied in one step) or
  # "combined" (K - macro_k single actions and macro_k macro actions).
  c.space = "default"
  # Actions per macro action (the Table 4 caption: three; the section 6 text says five).
  c.macro_size = 3
  # Macro actions among the K of the "combined" space.
  c.macro_k = 0
  # Sampling of an action request (max_tokens included; varied candidates need temperature).
  c.sampling = _sampling(**(sampling or dict(max_tokens=40, temperature=0.7)))
  # MiniLM cosine similarity above which two actions are near-duplicates.
  c.dedupe_threshold = 0.9
  # Base seed of the request seeds and template shuffles.
  c.seed = 0
  c.update(overrides)
  return c
