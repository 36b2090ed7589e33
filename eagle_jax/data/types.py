"""The one in-memory form every MovieLens reader returns, and the error it raises on bad input."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from eagle_jax.checks import InputError


class DataFormatError(InputError):
  """Malformed ratings data. The message names the file, the 1-based line and the field."""

  def __init__(self, path, message: str, *, line: int | None = None, field: str | None = None):
    self.path, self.line, self.field = str(path), line, field
    where = str(path)
    if line is not None:
      where += f", line {line}"
    if field is not None:
      where += f", field {field!r}"
    super().__init__(f"{where}: {message}")


@dataclasses.dataclass(frozen=True)
class RatingScale:
  """The ratings a MovieLens release can hold: ``lo..hi`` in steps of ``step``.

  Attributes:
    lo, hi: smallest and largest rating.
    step: spacing of the allowed values from ``lo``.
    releases: which releases use it (for messages).
  """

  lo: float
  hi: float
  step: float
  releases: str

  def describe(self) -> str:
    return f"{self.lo:g} to {self.hi:g} in steps of {self.step:g} ({self.releases})"

  def check(self, rating: np.ndarray, path, *, first_line: int, field: str = "rating") -> None:
    """Raises ``DataFormatError`` at the first rating off this scale (row ``n`` is line
    ``n + first_line``)."""
    rating = np.asarray(rating, np.float64)
    units = (rating - self.lo) / self.step
    bad = ~((rating >= self.lo) & (rating <= self.hi) & (np.abs(units - np.round(units)) < 1e-6))
    if bad.any():
      row = int(np.argmax(bad))
      raise DataFormatError(path, f"rating {rating[row]:g} is off the scale: expected "
                            f"{self.describe()}", line=row + first_line, field=field)


# ml-latest, ML-25M, ML-20M and ML-10M: half stars. ML-100K and ML-1M: whole stars.
HALF_STARS = RatingScale(0.5, 5.0, 0.5, "ml-latest, ML-25M, ML-20M, ML-10M")
WHOLE_STARS = RatingScale(1.0, 5.0, 1.0, "ML-100K, ML-1M")
_WHOLE_STAR_RELEASES = ("100k", "1m")


def scale_of_release(name: str) -> RatingScale:
  """The scale of a release named like ``ml-100k``, ``100k``, ``ml-25m`` or ``latest-small``."""
  key = name.lower().removeprefix("ml-").removeprefix("movielens/").removesuffix("-ratings")
  return WHOLE_STARS if key in _WHOLE_STAR_RELEASES else HALF_STARS


@dataclasses.dataclass(frozen=True, eq=False)
class RatingsData:
  """Explicit ratings with contiguous ids and item metadata.

  Users are numbered ``0..num_users-1`` in increasing order of their raw id, items likewise over the
  union of the item table and the rated items. Row ``n`` of the rating arrays is one rating.

  Attributes:
    user: [N] int32 contiguous user index.
    item: [N] int32 contiguous item index.
    rating: [N] float32 rating (MovieLens: 0.5..5 in half stars, or 1..5).
    timestamp: [N] int64 seconds since the epoch.
    user_ids: [U] int64 raw user id of each user index.
    item_ids: [I] int64 raw item (movie) id of each item index.
    titles: [I] titles, ``"Toy Story (1995)"`` form ("" when unknown).
    genres: [I] tuples of genre names.
    tags: [I] tuples of user tags, most frequent first (empty when the source has none).
    user_features: optional per-user columns, each [U] (ML-100K: age, gender, occupation, zip_code).
    source: where the data was read from (for provenance in reports).
  """

  user: np.ndarray
  item: np.ndarray
  rating: np.ndarray
  timestamp: np.ndarray
  user_ids: np.ndarray
  item_ids: np.ndarray
  titles: Sequence[str]
  genres: Sequence[tuple[str, ...]]
  tags: Sequence[tuple[str, ...]]
  user_features: dict[str, np.ndarray] | None = None
  source: str = ""

  def __post_init__(self):
    n = self.user.shape[0]
    for name in ("item", "rating", "timestamp"):
      if getattr(self, name).shape != (n,):
        raise ValueError(f"RatingsData.{name} has shape {getattr(self, name).shape}, expected ({n},)")
    num_items = self.item_ids.shape[0]
    for name in ("titles", "genres", "tags"):
      if len(getattr(self, name)) != num_items:
        raise ValueError(f"RatingsData.{name} has {len(getattr(self, name))} entries, expected "
                         f"{num_items} (one per item)")

  @property
  def num_users(self) -> int:
    return int(self.user_ids.shape[0])

  @property
  def num_items(self) -> int:
    return int(self.item_ids.shape[0])

  @property
  def num_ratings(self) -> int:
    return int(self.user.shape[0])

  def subset(self, index: np.ndarray) -> RatingsData:
    """The ratings at ``index`` (an int array or a boolean mask [N]); ids and metadata are kept."""
    return dataclasses.replace(
        self, user=self.user[index], item=self.item[index], rating=self.rating[index],
        timestamp=self.timestamp[index])

  def summary(self) -> str:
    return (f"{self.num_ratings:,} ratings, {self.num_users:,} users, {self.num_items:,} items"
            f" ({self.source})")
