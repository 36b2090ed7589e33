"""EAGLE environment data on MovieLens-100K with SmolLM2-135M-Instruct (offline, CPU-sized).

Run: ``python -m launch.build_env_data --config=configs/env_ml100k.py --workdir=/tmp/envdata``
(override any field, e.g. ``--config.num_movies=200 --config.actions.llm_calls=50``).

Movies are the ``num_movies`` most-rated ones (deterministic; ties by item index), users the
``num_users`` most active ones. The defaults keep a full build to about fifteen minutes on two CPU
cores; a production run raises ``num_movies`` and ``actions.llm_calls`` (the paper: K = 100 actions,
all LLM-written) and points ``llm.gguf`` at a bigger model or uses a server.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()

  # "ml100k" (offline recbole copy via eagle_jax.assets) or a MovieLens folder path.
  config.data_source = "ml100k"
  # Movies to describe: the num_movies most-rated ones.
  config.num_movies = 24
  # Users to profile (the most active ones); action sets are personalised to them in turn.
  config.num_users = 8
  # Best and worst rated titles of a user shown to the profile prompt (each).
  config.profile_titles = 5

  config.llm = ml_collections.ConfigDict()
  # GGUF file of the environment LLM ("" = the pinned SmolLM2-135M-Instruct asset).
  config.llm.gguf = ""
  # Model id recorded in the response cache keys and provenance.
  config.llm.model_id = "smollm2-135m-instruct-q4_1"
  # Decode batch sizes of the local sampler (each size compiles once; one size = fewest compiles).
  config.llm.batch_buckets = (8,)

  config.generation = ml_collections.ConfigDict()
  # Base seed of every request seed (derive_seed(seed, purpose, id, index, attempt)).
  config.generation.seed = 0
  # Softmax temperature (0: greedy; the 135M model repeats itself when greedy).
  config.generation.temperature = 0.7
  # Nucleus mass (1: off).
  config.generation.top_p = 0.9
  # Top-k filter (0: off).
  config.generation.top_k = 0
  # > 1 discourages tokens already in the row.
  config.generation.repetition_penalty = 1.2
  # Forbid repeating any n-gram of this size (0: off).
  config.generation.no_repeat_ngram = 3
  # max_tokens of the plot request.
  config.generation.plot_tokens = 96
  # max_tokens of each reason-to-like/dislike request.
  config.generation.reason_tokens = 40
  # max_tokens of the user-profile request.
  config.generation.profile_tokens = 64
  # max_tokens of each action request.
  config.generation.action_tokens = 40
  # Reasons to like and (separately) to dislike per movie, one request each.
  config.generation.n_reasons = 5
  # Extra attempts (new seed) for an answer that does not parse.
  config.generation.retries = 1

  config.actions = ml_collections.ConfigDict()
  # K: candidate actions per state, about 20 per category; half personalised (the LLM-written ones
  # by the user profile, the templates by the user's favourite genres).
  config.actions.k = 100
  # LLM requests per action set; the rest of K comes from the template grammar
  # (eagle_jax/env/actions.py), which alone (llm_calls = 0) reaches K = 100 for every MovieLens-100K
  # movie.
  config.actions.llm_calls = 4
  # Cosine similarity (MiniLM) above which an action counts as a near-duplicate.
  config.actions.dedupe_threshold = 0.9
  return config
