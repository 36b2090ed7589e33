"""EAGLE at paper scale on MovieLens 25M, for a TPU slice (validated by a dry run on fake devices).

Train on a TPU VM (see ``launch/tpu_vm.sh``)::

  python -m launch.train --config=configs/movielens_25m.py --workdir=/mnt/runs/ml25m \\
      --config.wals.data.source=/mnt/data/ml-25m --config.llm.server_url=http://ENV_HOST:8000 \\
      --config.llm.served_model=MODEL_NAME

Dry run (mesh, sharded shapes, AOT-compiled train step; no data, no models)::

  XLA_FLAGS=--xla_force_host_platform_device_count=8 \\
      python -m launch.train --config=configs/movielens_25m.py --dry_run

Differences from the smoke config, following the paper (PAPER_SPEC.md section 5): K = 100 candidate
actions with 10 LLM-written per anchor (raise ``actions.llm_calls`` with a larger environment LLM
behind ``llm.server_url``), horizon H = 5, m = 10 exploratory actions of the G-optimal design in raw
Z (K > d, so no projection), WALS rank 32 on the ML-25M GroupLens CSV folder, many anchors and users,
large batches over a (data, fsdp, tensor) mesh.
"""

import ml_collections

from configs import movielens_smoke


def get_config() -> ml_collections.ConfigDict:
  config = movielens_smoke.get_config()
  # Mesh: fsdp x tensor = 4 model shards; the rest of the slice is data parallel.
  config.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=2, tensor=2))
  # Multi-host: one process per TPU VM host.
  config.distributed = True
  # MovieLens 25M GroupLens folder (ratings.csv, movies.csv, tags.csv), local or mounted.
  config.wals.data.source = "/mnt/data/ml-25m"
  # Latent dimension of Z (the paper's WALS embeddings; rank + 3 augmented coordinates).
  config.wals.wals.rank = 32
  # More sweeps for 25M ratings.
  config.wals.wals.sweeps = 20
  # K candidate actions per anchor (paper: 100).
  config.actions.k = 100
  # LLM-written candidates per anchor (the rest from templates).
  config.actions.llm_calls = 10
  # Half of each action set personalised to a user profile (paper, App. C).
  config.actions.personalised = True
  # Profiles written by the environment LLM under the paper's headings.
  config.profiles.kind = "llm"
  config.profiles.titles = 5
  # Anchors and users.
  config.world.anchor_pool = 5000
  config.world.num_train_anchors = 2000
  config.world.num_heldout_anchors = 200
  config.world.num_train_users = 20000
  config.world.num_heldout_users = 1000
  config.world.min_user_ratings = 50
  # Policy width.
  config.policy.hidden = 1024
  # G-optimal design in raw Z (K = 100 > d = 35).
  config.reference.design_dim = 0
  # Exploratory actions of the design (paper: m = 10).
  config.reference.exploratory_m = 10
  config.reference.episodes = 20000
  config.reference.rollout_batch = 512
  config.reference.steps = 5000
  config.reference.batch_size = 1024
  # Transitions computed lazily (the tree of K = 100, H = 5 cannot be enumerated).
  config.env.prefetch_depth = 0
  # Horizon (paper: 5).
  config.rl.horizon = 5
  config.rl.steps = 20000
  config.rl.batch_size = 256
  config.checkpoint.every = 500
  config.checkpoint.max_to_keep = 3
  config.eval.samples = 8
  return config
