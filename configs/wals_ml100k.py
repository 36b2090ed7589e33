"""WALS behavioural embeddings on MovieLens-100K (offline recbole copy), per-user time split.

Run: ``python -m launch.wals --config=configs/wals_ml100k.py --workdir=/tmp/wals_ml100k``
(override any field, e.g. ``--config.wals.rank=32``).

Objective (``eagle_jax/embed/wals.py``): ``w_obs * sum_obs (r - mu - b_u - c_i - <x_u, y_i>)^2
+ w0 * sum_all <x_u, y_i>^2 + sum_u lam_u (|x_u|^2 + beta b_u^2) + same for items``, with
``lam_r = reg * n_r^reg_exponent``. The variant recorded here for the RMSE target is ALS-WR-style
(frequency-scaled penalty, ``reg_exponent=1``), centred ratings with biases and ``w0 = 0`` (the
unobserved pull only hurts rating RMSE). Tuned by hand on the split below (rank 4-32, reg, bias_reg,
reg_exponent 0/0.5/1, w0 0-0.01, with and without centring/biases); measured 2026-11-23:
test RMSE 0.969 (train 0.808), recall@10 ~0.001 (relevant: held-out ratings >= 4); the same config on
a random 80/20 split gives test RMSE 0.916. The issue's 0.95 target is not reached on the time split:
its test ratings average 3.32 stars against 3.58 in training (later ratings are lower), a drift no
static factor model sees. A small w0 without centring raises recall@10 to ~0.1 but costs RMSE.
Independent models on the same splits (``python -m benchmarks.wals_quality_bench``, scikit-surprise):
on the time split BaselineOnly 0.999, SVD 0.990 (tuned 0.976), KNNBaseline 0.985, SVD++ 0.972, all
above this config's 0.969; on the random split this config gives 0.913 against 0.914-0.940. The
0.95 target is below what any of them reach on the time split. A day-specific user bias (timeSVD
style, from training residuals on the test rating's day) reaches 0.965, an oracle per-popularity
bias correction 0.965: neither closes the gap, so neither is in the model.
"""

import ml_collections

# Variants (``--config=configs/wals_ml100k.py:implicit``): "rating" (default) is the RMSE-tuned
# explicit model above; "implicit" is the paper's Hu-Koren-Volinsky WALS (every unobserved entry
# pulled toward 0 with weight w0, raw ratings, no biases, plain L2), EAGLE's latent space Z on
# ML-100K: its rank-4 item vectors are what text can predict (E_D held-out R^2 0.3+, see
# configs/encoder_ml100k.py), at the price of rating RMSE (~2). Its recall@10 is 0.14.
VARIANTS = ("rating", "implicit")


def get_config(variant: str = "rating") -> ml_collections.ConfigDict:
  if variant not in VARIANTS:
    raise ValueError(f"configs/wals_ml100k.py: unknown variant {variant!r}, expected one of "
                     f"{VARIANTS}")
  config = ml_collections.ConfigDict()

  config.data = ml_collections.ConfigDict()
  # "ml100k" (offline recbole copy via eagle_jax.assets), "synthetic", or a MovieLens folder path.
  config.data.source = "ml100k"
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
