"""MovieLens data: readers for every layout, one typed in-memory form, a deterministic split."""

from eagle_jax.data.movielens import (
    load_ml100k,
    load_ml100k_assets,
    load_movielens,
    load_movielens_csv,
    load_recbole,
)
from eagle_jax.data.split import holdout_by_time, split
from eagle_jax.data.types import DataFormatError, RatingsData

__all__ = [
    "DataFormatError",
    "RatingsData",
    "holdout_by_time",
    "load_ml100k",
    "load_ml100k_assets",
    "load_movielens",
    "load_movielens_csv",
    "load_recbole",
    "split",
]
