"""Readers for the MovieLens layouts; each returns a ``RatingsData``.

* ``load_movielens_csv``: GroupLens CSV folders of ML-25M, ML-20M and ml-latest(-small):
  ``ratings.csv`` (userId,movieId,rating,timestamp), ``movies.csv`` (movieId,title,genres with ``|``),
  optional ``tags.csv`` (userId,movieId,tag,timestamp).
* ``load_ml100k``: the ML-100K folder: ``u.data`` (tab separated user, item, rating, timestamp),
  ``u.item`` (``|`` separated, latin-1, 19 genre flags), optional ``u.user``.
* ``load_recbole``: RecBole atomic files ``<name>.inter`` / ``.item`` / ``.user`` (tab separated with
  typed headers such as ``user_id:token``); the recbole wheel ships ML-100K in this form.
* ``load_movielens``: picks the reader from the folder's contents.

Ids: users are numbered by increasing raw id; items by increasing raw id over the item table (every
movie in ``movies.csv``, rated or not, as the paper counts 62,423 ML-25M movies). A rating of an item
missing from the item table, a duplicated (user, item) rating or a duplicated item id is an error that
names the file and line.

Ratings: each reader checks them against its release's scale (``types.RatingScale``): half stars
0.5..5 for the GroupLens CSV releases, whole stars 1..5 for ML-100K (either layout); a value off the
scale is refused naming the file, line, value and the expected scale.
"""

from __future__ import annotations

import os
import pathlib
from collections.abc import Sequence

import numpy as np

from eagle_jax.data.tables import read_header, read_table
from eagle_jax.data.types import (
    HALF_STARS,
    WHOLE_STARS,
    DataFormatError,
    RatingScale,
    RatingsData,
    scale_of_release,
)

ML100K_GENRES = (
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary",
    "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi",
    "Thriller", "War", "Western")
NO_GENRES = "(no genres listed)"


def _index_of(ids_sorted: np.ndarray, raw: np.ndarray, path, field: str, header_lines: int):
  """Maps raw ids to positions in ``ids_sorted``; an unknown id raises naming its line."""
  if len(ids_sorted) and 0 <= ids_sorted[0] and ids_sorted[-1] < 50_000_000:
    # Dense lookup table: one gather instead of a binary search per rating (matters at 25M).
    table = np.full(int(ids_sorted[-1]) + 2, -1, np.int64)
    table[ids_sorted] = np.arange(len(ids_sorted))
    pos = table[np.clip(raw, -1, len(table) - 1)]  # out-of-range ids land on the -1 sentinel
    bad = pos < 0
  else:
    pos = np.searchsorted(ids_sorted, raw)
    clipped = np.minimum(pos, max(len(ids_sorted) - 1, 0))
    bad = ((pos >= len(ids_sorted)) | (ids_sorted[clipped] != raw) if len(ids_sorted)
           else np.ones(raw.shape, bool))
  if bad.any():
    row = int(np.argmax(bad))
    raise DataFormatError(
        path, f"unknown id {int(raw[row])}: not in the item table", line=row + 1 + header_lines,
        field=field)
  return pos.astype(np.int32)


def _first_duplicate(key: np.ndarray) -> tuple[int, int] | None:
  """Rows (first, second) of the earliest-repeated value of ``key``, or None."""
  order = np.argsort(key, kind="stable")
  dup = np.flatnonzero(key[order][1:] == key[order][:-1])
  if not dup.size:
    return None
  seconds = order[dup + 1]
  j = int(np.argmin(seconds))
  return int(order[dup[j]]), int(seconds[j])


def _check_unique(raw: np.ndarray, path, field: str, header_lines: int) -> None:
  rows = _first_duplicate(raw)
  if rows is not None:
    first, second = rows
    raise DataFormatError(path, f"duplicated id {int(raw[second])} (first at line "
                          f"{first + 1 + header_lines})", line=second + 1 + header_lines,
                          field=field)


def _check_unique_ratings(raw_user, raw_item, user, item, num_items: int, path, user_field: str,
                          item_field: str, header_lines: int) -> None:
  """Refuses a second rating of one (user, item) pair, naming both lines and the file's ids."""
  rows = _first_duplicate(user.astype(np.int64) * num_items + item)
  if rows is not None:
    first, second = rows
    raise DataFormatError(
        path, f"duplicate rating of {user_field} {int(raw_user[second])}, {item_field} "
        f"{int(raw_item[second])} (first at line {first + 1 + header_lines}); expected one rating "
        "per pair", line=second + 1 + header_lines)


def _assemble(
    *,
    raw_user: np.ndarray,
    raw_item: np.ndarray,
    rating: np.ndarray,
    timestamp: np.ndarray,
    item_ids: np.ndarray,
    titles: Sequence[str],
    genres: Sequence[tuple[str, ...]],
    ratings_path,
    item_path,
    header_lines: int,
    user_field: str,
    item_field: str,
    item_header_lines: int,
    scale: RatingScale,
    tags: dict[int, tuple[str, ...]] | None = None,
    user_table: tuple[np.ndarray, dict[str, np.ndarray]] | None = None,
    source: str = "",
) -> RatingsData:
  """Builds ``RatingsData`` from raw columns, validating ids (see module docstring)."""
  _check_unique(item_ids, item_path, item_field, item_header_lines)
  order = np.argsort(item_ids, kind="stable")
  item_ids = item_ids[order]
  titles = [titles[i] for i in order]
  genres = [genres[i] for i in order]
  item = _index_of(item_ids, raw_item, ratings_path, item_field, header_lines)
  user_ids, user = np.unique(raw_user, return_inverse=True)
  user = user.astype(np.int32)
  for values, field, first_line in ((raw_user, user_field, 1 + header_lines),
                                    (timestamp, "timestamp", 1 + header_lines)):
    if values.size and values.min() < 0:
      row = int(np.argmin(values))
      raise DataFormatError(ratings_path, f"negative value {values[row]}; expected >= 0",
                            line=row + first_line, field=field)
  _check_unique_ratings(raw_user, raw_item, user, item, len(item_ids), ratings_path, user_field,
                        item_field, header_lines)
  scale.check(rating, ratings_path, first_line=1 + header_lines)
  features = None
  if user_table is not None:
    table_ids, columns = user_table
    pos = np.searchsorted(table_ids, user_ids)
    if not (pos < len(table_ids)).all() or not (table_ids[np.minimum(pos, len(table_ids) - 1)]
                                                == user_ids).all():
      raise DataFormatError(ratings_path, "some rating users are missing from the user table",
                            field="user_id")
    features = {k: v[pos] for k, v in columns.items()}
  tag_list = [tags.get(int(i), ()) for i in item_ids] if tags else [()] * len(item_ids)
  return RatingsData(
      user=user, item=item, rating=rating.astype(np.float32), timestamp=timestamp.astype(np.int64),
      user_ids=user_ids.astype(np.int64), item_ids=item_ids.astype(np.int64), titles=titles,
      genres=genres, tags=tag_list, user_features=features, source=source)


def _tags_by_item(path: pathlib.Path, item_field: str) -> dict[int, tuple[str, ...]]:
  """Per raw item id: distinct tags (stripped, lower-cased), most frequent first, then a-z."""
  cols = read_table(path, {item_field: "int", "tag": "str"}, allow_empty=True)
  counts: dict[int, dict[str, int]] = {}
  for item, tag in zip(cols[item_field].tolist(), cols["tag"].tolist()):
    tag = str(tag).strip().lower()
    if tag:
      per_item = counts.setdefault(item, {})
      per_item[tag] = per_item.get(tag, 0) + 1
  return {item: tuple(sorted(c, key=lambda t, c=c: (-c[t], t))) for item, c in counts.items()}


def load_movielens_csv(folder: str | os.PathLike, scale: RatingScale = HALF_STARS) -> RatingsData:
  """Reads a GroupLens CSV folder (ML-25M, ML-20M, ml-latest, ml-latest-small; half stars)."""
  folder = pathlib.Path(folder)
  ratings_path, movies_path, tags_path = (folder / n for n in ("ratings.csv", "movies.csv",
                                                                 "tags.csv"))
  r = read_table(ratings_path, {"userId": "int", "movieId": "int", "rating": "float",
                                "timestamp": "int"})
  m = read_table(movies_path, {"movieId": "int", "title": "str", "genres": "str"})
  genres = [tuple(g for g in s.split("|") if g and g != NO_GENRES) for s in m["genres"].tolist()]
  tags = _tags_by_item(tags_path, "movieId") if tags_path.is_file() else None
  return _assemble(
      raw_user=r["userId"], raw_item=r["movieId"], rating=r["rating"], timestamp=r["timestamp"],
      item_ids=m["movieId"], titles=[str(t).strip() for t in m["title"].tolist()], genres=genres,
      ratings_path=ratings_path, item_path=movies_path, header_lines=1, user_field="userId",
      item_field="movieId", item_header_lines=1, scale=scale, tags=tags, source=f"movielens-csv:{folder}")


def load_ml100k(folder: str | os.PathLike, scale: RatingScale = WHOLE_STARS) -> RatingsData:
  """Reads the original ML-100K folder (``u.data``, ``u.item``, optional ``u.user``)."""
  folder = pathlib.Path(folder)
  data_path, item_path, user_path = folder / "u.data", folder / "u.item", folder / "u.user"
  r = read_table(data_path, {"user": "int", "item": "int", "rating": "float", "timestamp": "int"},
                 delimiter="\t", names=("user", "item", "rating", "timestamp"), quoting=False)
  flag_names = [f"g{i}" for i in range(len(ML100K_GENRES))]
  names = ("item", "title", "release", "video_release", "url", *flag_names)
  it = read_table(item_path, {"item": "int", "title": "str", **{g: "int" for g in flag_names}},
                  delimiter="|", names=names, quoting=False, encoding="latin-1")
  flags = np.stack([it[g] for g in flag_names], axis=1)
  genres = [tuple(ML100K_GENRES[j] for j in np.flatnonzero(row)) for row in flags]
  user_table = None
  if user_path.is_file():
    u = read_table(user_path, {"user": "int", "age": "int", "gender": "str", "occupation": "str",
                               "zip_code": "str"}, delimiter="|",
                   names=("user", "age", "gender", "occupation", "zip_code"), quoting=False)
    user_table = _sorted_user_table(u, "user", user_path)
  return _assemble(
      raw_user=r["user"], raw_item=r["item"], rating=r["rating"], timestamp=r["timestamp"],
      item_ids=it["item"], titles=[str(t).strip() for t in it["title"].tolist()], genres=genres,
      ratings_path=data_path, item_path=item_path, header_lines=0, user_field="user",
      item_field="item", item_header_lines=0, scale=scale, user_table=user_table, source=f"ml-100k:{folder}")


def _sorted_user_table(cols: dict[str, np.ndarray], id_field: str, path):
  ids = cols[id_field]
  _check_unique(ids, path, id_field, 1)
  order = np.argsort(ids, kind="stable")
  return ids[order], {k: v[order] for k, v in cols.items() if k != id_field}


def _recbole_aliases(path: pathlib.Path) -> dict[str, str]:
  """Maps recbole's typed headers (``user_id:token``) to bare names (``user_id``)."""
  header = read_header(path, delimiter="\t", quoting=False)
  return {h: h.split(":", 1)[0] for h in header}


def load_recbole(folder: str | os.PathLike, name: str | None = None,
                 scale: RatingScale | None = None) -> RatingsData:
  """Reads RecBole atomic files ``<name>.inter``, ``<name>.item`` and optional ``<name>.user``.

  The rating scale defaults to the release ``name`` names (``scale_of_release``: whole stars for
  ``ml-100k`` and ``ml-1m``, half stars otherwise).

  Titles are written back in the ``"Title (year)"`` form of the GroupLens files from recbole's
  ``movie_title`` and ``release_year`` columns; genres come from its ``class`` column.
  """
  folder = pathlib.Path(folder)
  if name is None:
    inters = sorted(folder.glob("*.inter"))
    if len(inters) != 1:
      raise DataFormatError(folder, f"expected exactly one *.inter file, found {len(inters)}")
    name = inters[0].stem
  inter_path, item_path, user_path = (folder / f"{name}.{ext}" for ext in ("inter", "item", "user"))
  for p in (inter_path, item_path):
    if not p.is_file():
      raise DataFormatError(p, "file not found")
  r = read_table(inter_path, {"user_id": "int", "item_id": "int", "rating": "float",
                              "timestamp": "float64"}, delimiter="\t", quoting=False,
                 header_aliases=_recbole_aliases(inter_path))
  it = read_table(item_path, {"item_id": "int", "movie_title": "str", "release_year": "str",
                              "class": "str"}, delimiter="\t", quoting=False,
                  header_aliases=_recbole_aliases(item_path))
  titles = [f"{t.strip()} ({y.strip()})" if y.strip() else t.strip()
            for t, y in zip(it["movie_title"].tolist(), it["release_year"].tolist())]
  genres = [tuple(c.split()) for c in it["class"].tolist()]
  user_table = None
  if user_path.is_file():
    u = read_table(user_path, {"user_id": "int", "age": "int", "gender": "str",
                               "occupation": "str", "zip_code": "str"}, delimiter="\t",
                   quoting=False, header_aliases=_recbole_aliases(user_path))
    user_table = _sorted_user_table(u, "user_id", user_path)
  return _assemble(
      raw_user=r["user_id"], raw_item=r["item_id"], rating=r["rating"],
      timestamp=r["timestamp"].astype(np.int64), item_ids=it["item_id"], titles=titles,
      genres=genres, ratings_path=inter_path, item_path=item_path, header_lines=1,
      user_field="user_id", item_field="item_id", item_header_lines=1,
      scale=scale or scale_of_release(name), user_table=user_table,
      source=f"recbole:{inter_path}")


def load_movielens(path: str | os.PathLike) -> RatingsData:
  """Reads any supported MovieLens folder, choosing the reader (and so the rating scale: half
  stars for the CSV releases, whole stars for ML-100K) from the files present."""
  folder = pathlib.Path(path)
  if not folder.is_dir():
    raise DataFormatError(folder, "no such folder")
  if (folder / "ratings.csv").is_file():
    return load_movielens_csv(folder)
  if (folder / "u.data").is_file():
    return load_ml100k(folder)
  if list(folder.glob("*.inter")):
    return load_recbole(folder)
  raise DataFormatError(
      folder, "not a MovieLens folder: expected ratings.csv + movies.csv (ML-25M/20M/latest), "
      "u.data + u.item (ML-100K) or <name>.inter + <name>.item (recbole atomic files)")


def load_ml100k_assets() -> RatingsData:
  """ML-100K from the cached recbole wheel (fetched on first use)."""
  from eagle_jax import assets  # Local import: readers do not need the asset machinery.

  return load_recbole(assets.ml100k_dir(), "ml-100k")
