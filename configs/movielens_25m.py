"""EAGLE at paper scale on MovieLens 25M, for a TPU slice (validated by a dry run on fake devices).

Train on a TPU VM (see ``launch/tpu_vm.sh``)::

  python -m launch.train --config=configs/movielens_25m.py --workdir=/mnt/runs/ml25m \\
      --config.wals.data.source=/mnt/data/ml-25m --config.llm.server_url=http://ENV_HOST:8000 \\
      --config.llm.served_model=MODEL_NAME

Dry run (mesh, sharded shapes, AOT-compiled train step; no data, no models)::

  XLA_FLAGS=--xla_force_host_platform_device_count=8 \\
      python -m launch.train --config=configs/movielens_25m.py --dry_run

The agent is a language model (``policy.kind="lm_choice"``): a Llama-family decoder with LoRA
adapters scores the K candidates. The dry run reads no weights: ``policy.lm.shapes`` names the
published shapes it compiles for (Llama 3.2 1B by default, or
``--config.policy.lm.shapes=llama-3.2-3b``), and reports the per-device memory, the parameter
counts, the FLOPs and what fits on a v5e-8. Real runs add
``--config.policy.lm.decoder=/mnt/models/Llama-3.2-1B`` (a safetensors folder).
``configs/movielens_25m.py:head`` is the same run with the pooled head agent. E_D is a decoder too
(``encoder.backbone="decoder"``: LoRA, mean pooling, linear head; shapes ``encoder.decoder.shapes``,
weights ``--config.encoder.decoder.source``).

Differences from the smoke config, following the paper (PAPER_SPEC.md section 5): K = 100 candidate
actions with 10 LLM-written per anchor (raise ``actions.llm_calls`` with a larger environment LLM
behind ``llm.server_url``), horizon H = 5, m = 10 exploratory actions of the G-optimal design in raw
Z (K > d, so no projection), WALS rank 32 on the ML-25M GroupLens CSV folder, many anchors and users,
large batches over a (data, fsdp, tensor) mesh.
"""

import ml_collections

from configs import movielens_smoke


def get_config(variant: str = "") -> ml_collections.ConfigDict:
  """The paper-scale run; ``variant="head"`` (``movielens_25m.py:head``): the pooled head agent."""
  if variant not in ("", "head"):
    raise ValueError(f"configs/movielens_25m.py:{variant}: unknown variant; expected '' or 'head'")
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
  # E_D with a decoder backbone (the paper fine-tunes a decoder onto the WALS vectors;
  # eagle_jax/embed/decoder_encoder.py): LoRA on a Llama-family decoder, mean-pooled, linear head.
  config.encoder.backbone = "decoder"
  # (finetune.precision is MiniLM's; the decoder E_D's activations: decoder.compute_dtype below.)
  config.encoder.finetune.precision = "float32"
  # Shapes the dry run compiles E_D's step for; real runs give the weights
  # (--config.encoder.decoder.source=/mnt/models/Llama-3.2-1B, a safetensors folder).
  config.encoder.decoder.shapes = "llama-3.2-1b"
  # bfloat16 activations on accelerators.
  config.encoder.decoder.compute_dtype = "bfloat16"
  # E_D's step sharded like the agent's: fsdp x tensor = 4 model shards, the rest data parallel.
  config.encoder.decoder.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=2, tensor=2))
  # K candidate actions per anchor (paper: 100).
  config.actions.k = 100
  # LLM-written candidates per anchor (the rest from templates).
  config.actions.llm_calls = 10
  # The world is the smoke run's default, the paper's (movielens_smoke.paper_world): description
  # states (plot, 5 + 5 reasons), LLM profiles under the paper's headings, half of each action set
  # personalised to a random profile (App. C). Profiles list 5 titles.
  config.profiles.titles = 5
  # Anchors and users.
  config.world.anchor_pool = 5000
  config.world.num_train_anchors = 2000
  config.world.num_heldout_anchors = 200
  config.world.num_train_users = 20000
  config.world.num_heldout_users = 1000
  config.world.min_user_ratings = 50
  # Texts per feature memo (policy features, E_D outputs), least recently used dropped.
  config.world.feature_memo = 100_000
  # The agent is a language model: a LoRA-adapted Llama-family decoder scoring the K candidates.
  config.policy.kind = "lm_choice"
  # Width of the pooled head (policy.kind="head", the ":head" variant).
  config.policy.hidden = 1024
  # The language-model policy: the smoke config's block (eagle_jax/agent/lm_policy.py) with these
  # changes. Real runs give the decoder's safetensors folder
  # (--config.policy.lm.decoder=/mnt/models/Llama-3.2-1B); the dry run reads no file and compiles
  # for the published shapes named here (eagle_jax/models/configs.py PRESETS: "llama-3.2-1b",
  # "llama-3.2-3b"; bfloat16 parameters).
  config.policy.lm.shapes = "llama-3.2-1b"
  # P: an LLM-written profile under five headings, a two-sentence plot and the instruction.
  config.policy.lm.prompt_tokens = 512
  # L: the longer actions a larger environment LLM writes.
  config.policy.lm.action_tokens = 48
  # LoRA rank r (a 1B decoder).
  config.policy.lm.lora_rank = 16
  # LoRA scale alpha (alpha / r = 2, as in the smoke config).
  config.policy.lm.lora_alpha = 32.0
  # bfloat16 activations on accelerators.
  config.policy.lm.compute_dtype = "bfloat16"
  # prefix_attention stays off: with chunks the K cache copies are only C, and the dry run measured
  # the shared-prefix path at more temporary memory (12.1 against 11.3 GiB per device).
  # Candidates scored 4 at a time against the prompt's cache: the step's memory is the chunk's
  # full-vocabulary logits (temporaries grow ~1.1 GiB per candidate in the chunk).
  config.policy.lm.candidate_chunk = 4
  # Recompute the prompt's and each chunk's forward pass in the backward pass.
  config.policy.lm.remat = True
  # G-optimal design in raw Z (K = 100 > d = 35).
  config.reference.design_dim = 0
  # Exploratory actions of the design (paper: m = 10).
  config.reference.exploratory_m = 10
  # The paper's targets: q(x) for each training anchor x (anchors x K = 200k transitions) rather
  # than every state of random rollouts (~100k states x K = 10M transitions).
  config.reference.states = "anchors"
  # Each anchor with 4 of its users (the optimistic target depends on the user).
  config.reference.users_per_anchor = 4
  # 256 states (64 anchors, 6,400 transitions) labelled at a time.
  config.reference.chunk = 256
  # Random episodes of states="rollout" (unused with "anchors").
  config.reference.episodes = 20000
  config.reference.rollout_batch = 512
  config.reference.steps = 5000
  config.reference.batch_size = 1024
  # Transitions computed lazily (the tree of K = 100, H = 5 cannot be enumerated).
  config.env.prefetch_depth = 0
  # Most transition requests outstanding at once (the server's own limit is llm.concurrency).
  config.env.max_in_flight = 1024
  # Answers the response cache keeps in memory (~0.5 KB each; a run makes ~26M): 2M, ~1 GiB.
  config.env.cache_memory = 2_000_000
  # Horizon (paper: 5).
  config.rl.horizon = 5
  config.rl.steps = 20000
  # Episodes per RL step: B x H prompts and B x H x K candidates of L tokens, read twice (agent and
  # reference).
  config.rl.batch_size = 256
  # The step's episodes in 64 slices of 4 (one per data shard of a v5e-8 at fsdp 2 x tensor 2):
  # the dry run fits it in ~12 GiB per chip; one slice of all 256 episodes needs ~7 TiB.
  config.rl.microbatches = 64
  config.checkpoint.every = 500
  config.checkpoint.max_to_keep = 3
  config.eval.samples = 8
  if variant == "head":
    config.policy.kind = "head"
  return config
