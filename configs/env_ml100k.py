"""EAGLE environment data on MovieLens-100K with SmolLM2-135M-Instruct (offline, CPU-sized).

Run: ``python -m launch.build_env_data --config=configs/env_ml100k.py --workdir=/tmp/envdata``
(override any field, e.g. ``--config.num_movies=200 --config.actions.llm_calls=50``).

Movies are the ``num_movies`` most-rated ones (deterministic; ties by item index), users the
``num_users`` most active ones. The defaults keep a full build small enough for two CPU cores; a
production run raises ``num_movies`` and ``actions.llm_calls`` (the paper: K = 100 actions, all
LLM-written) and points ``llm.gguf`` at a bigger model or ``llm.server_url`` at a server.
"""

import ml_collections

from configs.env_blocks import actions_config, descriptions_config, llm_config, profiles_config


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  # "ml100k" (offline recbole copy via eagle_jax.assets) or a MovieLens folder path.
  config.data_source = "ml100k"
  # Movies to describe: the num_movies most-rated ones.
  config.num_movies = 24
  # Users to profile (the most active ones); action sets are personalised to them in turn.
  config.num_users = 8
  # The environment LLM (eagle_jax/env/stack.py).
  config.llm = llm_config()
  # Plot plus five reasons to like and five to dislike per movie.
  config.descriptions = descriptions_config()
  # LLM-written profiles from each user's five best and five worst rated titles.
  config.profiles = profiles_config()
  # K = 100 actions per movie, half personalised to a profile.
  config.actions = actions_config()
  return config
