"""MovieLens through TensorFlow Datasets' ``movielens/*`` builders, without TensorFlow.

The builders are prepared in the ``array_record`` file format and read with ``tfds.data_source``
(random access, numpy/bytes records); neither needs TensorFlow. Two traps (ENVIRONMENT_FINDINGS.md):
tfds registers the movielens builder only if ``h5py`` imports, and imports ``importlib_resources``
unconditionally; both are runtime dependencies of eagle_jax.

The movielens builder has no manual-download mode: it always calls
``dl_manager.download_and_extract(<grouplens url>)``. ``prepare_from_folder`` routes that one call to
a local GroupLens folder (offline machines; TPU VMs with the zip in GCS can copy it first), and
everything else in tfds runs as usual.
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import tempfile
from unittest import mock

import numpy as np

from eagle_jax.data.types import DataFormatError, RatingsData

# tfds config name -> folder name inside the GroupLens zip.
_FOLDERS = {"25m": "ml-25m", "20m": "ml-20m", "latest-small": "ml-latest-small", "100k": "ml-100k",
            "1m": "ml-1m"}


def _tfds():
  import tensorflow_datasets as tfds  # Heavy import, only when this path is used.

  return tfds


def _version(name: str) -> str:
  if not name.startswith("movielens/") or not name.endswith("-ratings"):
    raise ValueError(f"dataset name {name!r}: expected 'movielens/<version>-ratings', e.g. "
                     "'movielens/latest-small-ratings'")
  version = name[len("movielens/"):-len("-ratings")]
  if version not in _FOLDERS:
    raise ValueError(f"dataset name {name!r}: unknown MovieLens version {version!r}; known: "
                     f"{sorted(_FOLDERS)}")
  return version


def prepare_from_folder(name: str, folder: str | os.PathLike, data_dir: str | os.PathLike) -> None:
  """Builds tfds dataset ``name`` (e.g. ``movielens/latest-small-ratings``) from a local folder.

  Args:
    name: a ``movielens/<version>-ratings`` dataset.
    folder: the extracted GroupLens folder for that version (``ratings.csv`` etc. inside).
    data_dir: the tfds data directory to write ``array_record`` files into.
  """
  tfds = _tfds()
  folder = pathlib.Path(folder).resolve()
  if not folder.is_dir():
    raise DataFormatError(folder, "not a folder")
  expected = _FOLDERS[_version(name)]
  with contextlib.ExitStack() as stack:
    if folder.name == expected:
      parent = folder.parent
    else:  # The builder looks for <extracted>/<expected>/: give it a link with that name.
      parent = pathlib.Path(stack.enter_context(tempfile.TemporaryDirectory()))
      (parent / expected).symlink_to(folder, target_is_directory=True)
    stack.enter_context(mock.patch.object(
        tfds.download.DownloadManager, "download_and_extract", lambda self, url: str(parent)))
    builder = tfds.builder(name, data_dir=os.fspath(data_dir), file_format="array_record")
    builder.download_and_prepare()


def load_tfds(name: str, data_dir: str | os.PathLike, split: str = "train") -> RatingsData:
  """Reads a prepared ``movielens/*-ratings`` dataset with ``tfds.data_source``.

  The item table is the set of rated movies (the ratings configs carry no unrated ones); movie ids
  are the GroupLens ones, so results can be compared with the CSV readers.
  """
  _version(name)
  tfds = _tfds()
  source = tfds.data_source(name, data_dir=os.fspath(data_dir), split=split)
  n = len(source)
  if n == 0:
    raise DataFormatError(f"{data_dir}/{name}", "the dataset has no records")
  records = source.__getitems__(list(range(n)))
  genre_names = source.dataset_info.features["movie_genres"].feature.names
  raw_user = np.array([int(r["user_id"]) for r in records], np.int64)
  raw_item = np.array([int(r["movie_id"]) for r in records], np.int64)
  rating = np.array([r["user_rating"] for r in records], np.float32)
  timestamp = np.array([r["timestamp"] for r in records], np.int64)
  item_ids, first = np.unique(raw_item, return_index=True)
  titles = [_text(records[j]["movie_title"]) for j in first]
  genres = [tuple(genre_names[int(g)] for g in records[j]["movie_genres"]) for j in first]
  user_ids, user = np.unique(raw_user, return_inverse=True)
  return RatingsData(
      user=user.astype(np.int32), item=np.searchsorted(item_ids, raw_item).astype(np.int32),
      rating=rating, timestamp=timestamp, user_ids=user_ids, item_ids=item_ids, titles=titles,
      genres=genres, tags=[()] * len(item_ids), source=f"tfds:{name}:{split}")


def _text(value) -> str:
  return value.decode("utf8") if isinstance(value, bytes) else str(value)
