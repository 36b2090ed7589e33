"""ELM on MovieLens-100K with SmolLM2-135M-Instruct: CPU-sized defaults (about 10-15 minutes).

Run: ``python -m launch.train_elm --config=configs/elm_ml100k.py --workdir=/tmp/elm``
(override any field, e.g. ``--config.train.stage1_steps=400 --config.data.train_movies=200``).

Domain embeddings are the augmented WALS vectors (the latent space Z of EAGLE's utility): item
vectors ``[y_i, 1, c_i, 1]`` for movies, user vectors ``[x_u, b_u, 1, mu]`` for the profile task.
Targets are written by the environment LLM (the same SmolLM2) through an on-disk response cache.
Stage 1 trains the adapter only (decoder frozen); stage 2 (``stage2_steps > 0``) fine-tunes adapter
and decoder together. ``eagle_jax/elm/job.py`` documents the training and the report.
"""

import ml_collections

from configs import encoder_ml100k
from configs.env_blocks import llm_config


def get_config(variant: str = "rating") -> ml_collections.ConfigDict:
  """``variant`` picks the latent space and E_D (``configs/encoder_ml100k.py``): "rating" (the
  README's ELM numbers) or "implicit" (EAGLE's smoke Z; needed for the ELM baseline of
  ``launch.evaluate --config.eval.elm_workdir``): ``--config=configs/elm_ml100k.py:implicit``."""
  config = ml_collections.ConfigDict()

  # E_D checkpoint folder (a launch.train_encoder workdir); "" = train E_D into <workdir>/encoder.
  config.encoder_dir = ""
  # E_D (and WALS) job used when encoder_dir == ""; config.encoder.wals.data names the ratings.
  config.encoder = encoder_ml100k.get_config(variant)

  config.decoder = ml_collections.ConfigDict()
  # "gguf" (a llama-architecture GGUF) or "random" (random init of config.decoder.random; tests).
  config.decoder.kind = "gguf"
  # GGUF of the decoder and tokenizer ("" = the pinned SmolLM2-135M-Instruct asset).
  config.decoder.gguf = ""
  # Shape of the random decoder when kind == "random" (vocab_size 0: the tokenizer's).
  config.decoder.random = ml_collections.ConfigDict(dict(
      vocab_size=0, hidden=48, intermediate=80, layers=2, heads=6, kv_heads=2, head_dim=8))

  config.adapter = ml_collections.ConfigDict()
  # Hidden width of the two-layer MLP E_A.
  config.adapter.hidden = 256
  # Soft tokens per embedding.
  config.adapter.n_tokens = 1
  # Std of the initial soft tokens (near the decoder's token-embedding scale).
  config.adapter.out_scale = 0.05
  # Seed of the adapter initialisation.
  config.adapter.seed = 0

  config.data = ml_collections.ConfigDict()
  # Movie tasks per training movie (see eagle_jax/elm/tasks.py).
  config.data.movie_tasks = ("summary", "positive_review", "negative_review", "pitch")
  # Training movies: the most-rated movies among those E_D was trained on.
  config.data.train_movies = 48
  # Held-out movies for the SC report: the most-rated among E_D's held-out movies (never trained
  # on by the ELM nor by E_D).
  config.data.test_movies = 16
  # Comparison examples (pairs of training movies, two soft tokens).
  config.data.comparison_pairs = 24
  # Users with a profile target (from the most active users).
  config.data.train_users = 24
  # Held-out users for the BC report.
  config.data.test_users = 8
  # Seed of the user split and the comparison pairs.
  config.data.seed = 0
  # Longest target in tokens (eos included); targets are cut to whole sentences.
  config.data.target_tokens = 48

  # The environment LLM that writes the targets (eagle_jax/env/stack.py): "" gguf and server_url
  # = the ELM's own untrained decoder, in process (16 rows cost little more than 8 on a CPU);
  # server_url = a (larger) served model as the teacher.
  config.llm = llm_config(batch_buckets=(16,))

  config.targets = ml_collections.ConfigDict()
  # Response cache JSONL of the target requests ("" = <workdir>/responses.jsonl).
  config.targets.cache = ""
  # Base seed of the target requests.
  config.targets.seed = 0
  # Extra attempts (new seed) for an answer that does not parse.
  config.targets.retries = 1
  # Sampling of the target requests (max_tokens: new tokens per answer).
  config.targets.sampling = ml_collections.ConfigDict(dict(
      max_tokens=56, temperature=0.7, top_p=0.9, repetition_penalty=1.2, no_repeat_ngram=3))

  config.train = ml_collections.ConfigDict()
  # Stage 1 steps: adapter only, decoder frozen.
  config.train.stage1_steps = 150
  # Stage 2 steps after stage 1: adapter and decoder fine-tuned together (0 = off; TPU runs).
  config.train.stage2_steps = 0
  # Examples per step (a multiple of the mesh's data parallelism).
  config.train.batch_size = 4
  # Seed of the example order.
  config.train.seed = 0
  # Save a checkpoint every this many steps (and at the end of each stage).
  config.train.save_every = 50
  # Newest checkpoints kept.
  config.train.max_to_keep = 2
  # Log metrics every this many steps.
  config.train.log_every = 10
  # Optimizer of stage 1 (training.make_optimizer fields).
  config.train.stage1_optimizer = ml_collections.ConfigDict(dict(
      learning_rate=3e-3, warmup_steps=10, final_lr_fraction=0.1, weight_decay=0.0,
      grad_clip=1.0, b1=0.9, b2=0.99))
  # Optimizer of stage 2 (smaller learning rate: the decoder moves too).
  config.train.stage2_optimizer = ml_collections.ConfigDict(dict(
      learning_rate=5e-5, warmup_steps=10, final_lr_fraction=0.1, weight_decay=0.0,
      grad_clip=1.0, b1=0.9, b2=0.99))

  config.eval = ml_collections.ConfigDict()
  # Run the report after training (SC on held-out movies, BC on held-out users).
  config.eval.enabled = True
  # Decode batch size of the ELM and title-only generations.
  config.eval.batch = 16
  # New tokens per generated text.
  config.eval.max_new_tokens = 48
  # Repetition penalty and no-repeat n-gram of the (greedy) evaluation decoding.
  config.eval.repetition_penalty = 1.2
  config.eval.no_repeat_ngram = 3
  # Interpolated held-out pairs decoded at beta = 0.5.
  config.eval.interpolations = 8
  # Random embeddings (Gaussian fitted to the item table) decoded as a control.
  config.eval.random_embeddings = 16
  # Training movies also decoded (fit check).
  config.eval.train_movies = 8
  # Movies ranked for BC (the most rated ones).
  config.eval.bc_movies = 200
  # Seed of the random control embeddings.
  config.eval.seed = 0

  # Mesh shape over ("data", "fsdp", "tensor"); -1 = the remaining devices.
  config.mesh = ml_collections.ConfigDict(dict(data=-1))
  return config
