"""WALS behavioural embeddings on MovieLens-100K (offline recbole copy), per-user time split.

Run: ``python -m launch.wals --config=configs/wals_ml100k.py --workdir=/tmp/wals_ml100k``
(override any field, e.g. ``--config.wals.rank=32``).

Objective (``eagle_jax/embed/wals.py``): ``w_obs * sum_obs (r - mu - b_u - c_i - <x_u, y_i>)^2
+ w0 * sum_all <x_u, y_i>^2 + sum_u lam_u (|x_u|^2 + beta b_u^2) + same for items``, with
``lam_r = reg * n_r^reg_exponent``.

The default "rating" variant targets held-out rating RMSE on the per-user time split below, so it is
ALS-WR-style: a penalty proportional to each row's number of ratings (``reg_exponent=1``), so the
regularisation per rating is the same for every user and movie; centred ratings with user and item
biases (much of a rating is the user's and the movie's offset); and ``w0 = 0``, since pulling
unobserved entries toward 0 only moves the predictions of observed ratings away from them. Its
values were chosen by hand on that split.
The time split holds out each user's latest ratings, and later ratings drift lower than earlier
ones, which no static factor model sees; the README compares this config with independent rating
models on the same split (``python -m benchmarks.wals_quality_bench``) and with a random split.
Time-dependent biases are deliberately left out of the model: they did not close that gap.
"""

import ml_collections

# Variants (``--config=configs/wals_ml100k.py:implicit``): "rating" (default) is the RMSE-tuned
# explicit model above; "implicit" is the paper's Hu-Koren-Volinsky WALS (every unobserved entry
# pulled toward 0 with weight w0, raw ratings, no biases, plain L2), EAGLE's latent space Z on
# ML-100K: modelling what users rate at all (exposure) rather than how they rate it gives item
# vectors that text can predict (configs/encoder_ml100k.py), at the price of rating RMSE.
VARIANTS = ("rating", "implicit")


def get_config(variant: str = "rating") -> ml_collections.ConfigDict:
  if variant not in VARIANTS:
    raise ValueError(f"configs/wals_ml100k.py: unknown variant {variant!r}, expected one of "
                     f"{VARIANTS}")
  config = ml_collections.ConfigDict()

  config.data = ml_collections.ConfigDict()
  # "ml100k" (offline recbole copy via eagle_jax.assets), "synthetic", a TensorFlow Datasets name
  # "tfds:movielens/<version>-ratings" (needs the tfds extra), or a MovieLens folder path.
  config.data.source = "ml100k"
  # tfds data directory of a "tfds:" source ("" = tfds' default, ~/tensorflow_datasets).
  config.data.data_dir = ""
  # GroupLens folder (e.g. an extracted ml-100k) to build a "tfds:" source from when data_dir does
  # not hold it yet, for offline machines ("" = tfds downloads it).
  config.data.tfds_folder = ""
  # Share of each user's latest ratings held out for testing (data.split, deterministic).
  config.data.test_fraction = 0.2
  # Ratings every user keeps in training.
  config.data.min_train = 1
  # Shape of data.synthetic.generate_ratings when source == "synthetic".
  config.data.synthetic = ml_collections.ConfigDict(
      dict(num_users=2_000, num_items=1_000, num_ratings=100_000, rank=16, seed=0))

  config.wals = ml_collections.ConfigDict()
  # Factor dimension k of the behavioural latent space Z.
  config.wals.rank = 8
  # L2 weight reg > 0; with reg_exponent=1 a row's penalty is reg * (its number of ratings).
  config.wals.reg = 0.15
  # Unobserved weight w0 >= 0 pulling every <x_u, y_i> toward 0 (0: pure explicit-rating fit).
  config.wals.unobserved_weight = 0.0
  # Weight of each observed squared error.
  config.wals.observed_weight = 1.0
  # nu in lam_r = reg * max(n_r, 1)^nu (0: TF WALSModel's plain L2, 1: ALS-WR).
  config.wals.reg_exponent = 1.0
  # Learn user and item biases b_u, c_i.
  config.wals.use_bias = True
  # L2 weight of the biases (scaled like reg); None means reg.
  config.wals.bias_reg = 0.05
  # Subtract the global mean of the training ratings.
  config.wals.center = True
  # Sweeps (all users, then all items).
  config.wals.sweeps = 15
  # Initial item factors ~ N(0, init_scale^2 / rank).
  config.wals.init_scale = 0.1
  # Seed of the initial item factors.
  config.wals.seed = 0
  # Entries per row segment L of the padded layout.
  config.wals.segment_length = 32
  # Segment slots S per block (one block gathers S * L * (rank + 1) floats).
  config.wals.block_segments = 1024
  # Row slots R per block (linear systems solved per block).
  config.wals.block_rows = 512

  # Mesh shape over ("data", "fsdp", "tensor"); rows are split over data x fsdp. -1: all devices.
  config.mesh = ml_collections.ConfigDict(dict(data=-1))

  config.eval = ml_collections.ConfigDict()
  # k of recall@k on held-out items.
  config.eval.recall_k = 10
  # Held-out items rated at least this are relevant for recall@k (None: every held-out item).
  config.eval.relevant_min_rating = 4.0
  # Rating scale used for the clipped RMSE (reported next to the unclipped one).
  config.eval.clip_min = 1.0
  config.eval.clip_max = 5.0

  if variant == "implicit":
    config.wals.update(dict(rank=4, reg=1.0, unobserved_weight=0.1, reg_exponent=0.0,
                            use_bias=False, bias_reg=None, center=False))

  config.checkpoint = ml_collections.ConfigDict()
  # Newest checkpoints kept in <workdir>/checkpoints.
  config.checkpoint.max_to_keep = 2
  # Save every this many sweeps (the last sweep is always saved).
  config.checkpoint.every = 1
  return config
