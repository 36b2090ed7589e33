"""MovieLens through TensorFlow Datasets' ``movielens/*`` builders, without TensorFlow.

The builders are prepared in the ``array_record`` file format and read with ``tfds.data_source``
(random access, numpy/bytes records); neither needs TensorFlow. Two traps (ENVIRONMENT_FINDINGS.md):
tfds registers the movielens builder only if ``h5py`` imports, and imports ``importlib_resources``
unconditionally. tensorflow-datasets, array-record, h5py and importlib_resources are therefore the
optional ``tfds`` extra (``pip install 'eagle_jax[tfds]'``), imported only when a tfds source is
used; without them the first call raises an ``ImportError`` naming the extra.

A job reads this source through ``config.data.source = "tfds:movielens/<version>-ratings"``
(``embed/wals_train.load_data``), with ``config.data.data_dir`` as the tfds data directory and,
offline, ``config.data.tfds_folder`` as the GroupLens folder to build the dataset from (``load``).

The movielens builder has no manual-download mode: it always calls
``dl_manager.download_and_extract(<grouplens url>)``. ``prepare_from_folder`` routes that one call to
a local GroupLens folder (offline machines; TPU VMs with the zip in GCS can copy it first), and
everything else in tfds runs as usual.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import pathlib
import tempfile
from unittest import mock

import numpy as np

from eagle_jax.data.types import DataFormatError, RatingsData, scale_of_release

# tfds config name -> folder name inside the GroupLens zip.
_FOLDERS = {"25m": "ml-25m", "20m": "ml-20m", "latest-small": "ml-latest-small", "100k": "ml-100k",
            "1m": "ml-1m"}


_EXTRA_MODULES = ("tensorflow_datasets", "array_record", "h5py", "importlib_resources")


def _tfds():
  """The ``tensorflow_datasets`` module (heavy: imported only when a tfds source is used).

  Raises:
    ImportError: a module of the ``tfds`` extra is missing; the message says how to install it.
  """
  for module in _EXTRA_MODULES:
    try:
      importlib.import_module(module)
    except ImportError as e:
      raise ImportError(
          f"the tfds MovieLens source needs {module!r} ({e}); install the optional dependencies "
          "with: pip install 'eagle_jax[tfds]'") from e
  import tensorflow_datasets as tfds  # noqa: PLC0415

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


def _data_dir(data_dir: str | os.PathLike | None) -> str | None:
  return None if data_dir is None or not os.fspath(data_dir) else os.fspath(data_dir)


def prepare_from_folder(name: str, folder: str | os.PathLike,
                        data_dir: str | os.PathLike | None) -> None:
  """Builds tfds dataset ``name`` (e.g. ``movielens/latest-small-ratings``) from a local folder.

  Idempotent: a dataset already prepared in ``data_dir`` is left as it is.

  Args:
    name: a ``movielens/<version>-ratings`` dataset.
    folder: the extracted GroupLens folder for that version (``ratings.csv`` etc. inside).
    data_dir: the tfds data directory to write ``array_record`` files into (None or "": tfds'
      default, ``~/tensorflow_datasets``).
  """
  expected = _FOLDERS[_version(name)]
  folder = pathlib.Path(folder).resolve()
  if not folder.is_dir():
    raise DataFormatError(folder, "not a folder")
  tfds = _tfds()
  with contextlib.ExitStack() as stack:
    if folder.name == expected:
      parent = folder.parent
    else:  # The builder looks for <extracted>/<expected>/: give it a link with that name.
      parent = pathlib.Path(stack.enter_context(tempfile.TemporaryDirectory()))
      (parent / expected).symlink_to(folder, target_is_directory=True)
    stack.enter_context(mock.patch.object(
        tfds.download.DownloadManager, "download_and_extract", lambda self, url: str(parent)))
    builder = tfds.builder(name, data_dir=_data_dir(data_dir), file_format="array_record")
    builder.download_and_prepare()


def load(name: str, *, data_dir: str | os.PathLike | None = None,
         folder: str | os.PathLike | None = None, split: str = "train") -> RatingsData:
  """``load_tfds``, first building the dataset from ``folder`` when one is given.

  Args:
    name: a ``movielens/<version>-ratings`` dataset.
    data_dir: the tfds data directory (None or "": tfds' default).
    folder: an extracted GroupLens folder to build the dataset from if ``data_dir`` does not hold
      it yet (None or "": tfds downloads it from GroupLens when it is missing).
    split: the tfds split.
  """
  if folder is not None and os.fspath(folder):
    prepare_from_folder(name, folder, data_dir)
  return load_tfds(name, data_dir, split)


def load_tfds(name: str, data_dir: str | os.PathLike | None = None, split: str = "train"
              ) -> RatingsData:
  """Reads a ``movielens/*-ratings`` dataset with ``tfds.data_source``.

  tfds downloads and prepares the dataset first when ``data_dir`` does not hold it. The item table
  is the set of rated movies (the ratings configs carry no unrated ones); movie ids are the
  GroupLens ones, so results can be compared with the CSV readers.

  Args:
    name: a ``movielens/<version>-ratings`` dataset.
    data_dir: the tfds data directory (None or "": tfds' default, ``~/tensorflow_datasets``).
    split: the tfds split.
  """
  _version(name)
  tfds = _tfds()
  source = tfds.data_source(name, data_dir=_data_dir(data_dir), split=split)
  n = len(source)
  if n == 0:
    raise DataFormatError(f"{_data_dir(data_dir) or '~/tensorflow_datasets'}/{name}",
                          "the dataset has no records")
  records = source.__getitems__(list(range(n)))
  genre_names = source.dataset_info.features["movie_genres"].feature.names
  raw_user = np.array([int(r["user_id"]) for r in records], np.int64)
  raw_item = np.array([int(r["movie_id"]) for r in records], np.int64)
  rating = np.array([r["user_rating"] for r in records], np.float32)
  scale_of_release(_version(name)).check(rating, f"tfds:{name}", first_line=0, field="user_rating")
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
