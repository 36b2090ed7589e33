"""MovieLens readers (good and malformed files), cross-reader agreement, split, synthetic data."""

import csv
import pathlib
import sys

import numpy as np
import pytest

from configs import wals_ml100k
from eagle_jax import data
from eagle_jax.data import synthetic, tfds_source
from eagle_jax.embed import wals_train


@pytest.fixture(scope="module")
def ml100k():
  return data.load_ml100k_assets()


@pytest.fixture(scope="module")
def small():
  return synthetic.generate_ratings(num_users=40, num_items=60, num_ratings=500, seed=7)


def _triples(d: data.RatingsData) -> np.ndarray:
  """[N, 4] (raw user, raw item, rating, time) rows in a canonical order."""
  t = np.stack([d.user_ids[d.user], d.item_ids[d.item], d.rating, d.timestamp]).T
  return t[np.lexsort(t.T[::-1])]


def test_ml100k_from_recbole_wheel(ml100k):
  assert (ml100k.num_ratings, ml100k.num_users, ml100k.num_items) == (100_000, 943, 1_682)
  # The published ML-100K rating histogram (GroupLens README statistics).
  values, counts = np.unique(ml100k.rating, return_counts=True)
  assert dict(zip(values.tolist(), counts.tolist())) == {
      1.0: 6110, 2.0: 11370, 3.0: 27145, 4.0: 34174, 5.0: 21201}
  assert ml100k.titles[0] == "Toy Story (1995)"
  assert ml100k.genres[0] == ("Animation", "Children's", "Comedy")
  assert ml100k.user_features["occupation"][0] == "technician"
  assert (np.bincount(ml100k.user) >= 20).all()  # ML-100K: every user rated >= 20 movies


def test_recbole_rows_match_a_plain_csv_parse(ml100k):
  from eagle_jax import assets

  with open(assets.ml100k_dir() / "ml-100k.inter") as f:
    rows = list(csv.reader(f, delimiter="\t"))[1:]
  expected = {(int(u), int(i)): (float(r), int(float(t))) for u, i, r, t in rows}
  raw = _triples(ml100k)
  got = {(int(u), int(i)): (float(r), int(t)) for u, i, r, t in raw}
  assert got == expected


def test_ml100k_reader_equals_recbole_reader(ml100k, tmp_path):
  synthetic.write_ml100k(ml100k, tmp_path)
  other = data.load_ml100k(tmp_path)
  for field in ("user", "item", "rating", "timestamp", "user_ids", "item_ids"):
    np.testing.assert_array_equal(getattr(other, field), getattr(ml100k, field), err_msg=field)
  assert list(other.titles) == list(ml100k.titles)
  assert list(other.genres) == list(ml100k.genres)
  for key in ("age", "gender", "occupation", "zip_code"):
    np.testing.assert_array_equal(other.user_features[key], ml100k.user_features[key])


def test_csv_round_trip_and_auto_detection(small, tmp_path):
  synthetic.write_movielens_csv(small, tmp_path)
  back = data.load_movielens(tmp_path)
  np.testing.assert_array_equal(_triples(back), _triples(small))
  assert list(back.titles) == list(small.titles) and list(back.genres) == list(small.genres)
  assert [set(t) for t in back.tags] == [set(t) for t in small.tags]
  synthetic.write_recbole(small, tmp_path / "rb", "synth")
  np.testing.assert_array_equal(_triples(data.load_movielens(tmp_path / "rb")), _triples(small))


def test_csv_quoted_titles_tags_and_unrated_movies(tmp_path):
  (tmp_path / "ratings.csv").write_text("userId,movieId,rating,timestamp\n7,10,4.5,100\n"
                                        "3,10,1.0,50\n3,20,3.5,60\n")
  (tmp_path / "movies.csv").write_text(
      'movieId,title,genres\n10,"Good, the Bad (1966)",Western\n20,Plain (2000),'
      "(no genres listed)\n30,Unrated (2001),Drama|Comedy\n")
  (tmp_path / "tags.csv").write_text('userId,movieId,tag,timestamp\n3,10,"gritty, long",1\n'
                                     "7,10,Western,2\n3,10,western,3\n")
  d = data.load_movielens_csv(tmp_path)
  assert d.titles == ["Good, the Bad (1966)", "Plain (2000)", "Unrated (2001)"]
  assert d.genres == [("Western",), (), ("Drama", "Comedy")]
  assert d.tags[0] == ("western", "gritty, long") and d.tags[2] == ()
  assert d.num_items == 3 and d.num_users == 2  # the unrated movie is in the item table
  assert d.user_ids.tolist() == [3, 7] and d.user.tolist() == [1, 0, 0]
  dense = np.zeros((d.num_users, d.num_items))
  dense[d.user, d.item] = d.rating
  np.testing.assert_array_equal(dense, [[1.0, 3.5, 0.0], [4.5, 0.0, 0.0]])


def _write_movies(folder: pathlib.Path):
  (folder / "movies.csv").write_text("movieId,title,genres\n1,A (1990),Drama\n2,B (1991),Comedy\n")


@pytest.mark.parametrize("ratings, match", [
    ("userId,movieId,timestamp\n1,1,5\n", r"ratings\.csv, line 1, field 'rating'.*missing column"),
    ("userId,movieId,rating,timestamp\n1,1,4,5\n1,2,abc,6\n",
     r"ratings\.csv, line 3, field 'rating'.*expected a number, got 'abc'"),
    ("userId,movieId,rating,timestamp\n1,1,4,5\nx,2,3,6\n",
     r"line 3, field 'userId'.*expected an integer"),
    ("userId,movieId,rating,timestamp\n1,1,4,5\n1,2,,6\n", r"line 3, field 'rating'.*empty"),
    ("userId,movieId,rating,timestamp\n1,1,4,5\n1,2,nan,6\n", r"line 3, field 'rating'.*non-finite"),
    ("userId,movieId,rating,timestamp\n1,1,4,5\n2,99,3,6\n", r"line 3, field 'movieId'.*unknown id 99"),
    ("userId,movieId,rating,timestamp\n1,1,4,5\n1,1,3,6\n",
     r"line 3: duplicate rating of userId 1, movieId 1 \(first at line 2\)"),
    ("userId,movieId,rating,timestamp\n1,1,4,5\n1,2,3\n", r"line 3.*expected 4 fields, found 3"),
    ("", r"ratings\.csv, line 1: file is empty"),
    ("userId,movieId,rating,timestamp\n", r"ratings\.csv, line 2: no data rows"),
])
def test_malformed_csv_names_file_line_and_field(tmp_path, ratings, match):
  _write_movies(tmp_path)
  (tmp_path / "ratings.csv").write_text(ratings)
  with pytest.raises(data.DataFormatError, match=match):
    data.load_movielens_csv(tmp_path)


def test_malformed_ml100k_and_recbole(tmp_path, ml100k):
  synthetic.write_ml100k(ml100k.subset(np.arange(50)), tmp_path / "a")
  lines = (tmp_path / "a" / "u.data").read_text().splitlines()
  lines[9] = lines[9].replace("\t", "\tx", 1)
  (tmp_path / "a" / "u.data").write_text("\n".join(lines) + "\n")
  with pytest.raises(data.DataFormatError, match=r"u\.data, line 10, field 'item'"):
    data.load_ml100k(tmp_path / "a")
  synthetic.write_recbole(ml100k.subset(np.arange(50)), tmp_path / "b", "x")
  (tmp_path / "b" / "x.item").unlink()
  with pytest.raises(data.DataFormatError, match=r"x\.item: file not found"):
    data.load_recbole(tmp_path / "b")
  with pytest.raises(data.DataFormatError, match="not a MovieLens folder"):
    data.load_movielens(tmp_path)


def test_tfds_array_record_path_equals_csv_path(small, tmp_path):
  folder = synthetic.write_movielens_csv(small, tmp_path / "ml-latest-small")
  tfds_source.prepare_from_folder("movielens/latest-small-ratings", folder, tmp_path / "tfds")
  via_tfds = tfds_source.load_tfds("movielens/latest-small-ratings", tmp_path / "tfds")
  via_csv = data.load_movielens_csv(folder)
  np.testing.assert_array_equal(_triples(via_tfds), _triples(via_csv))
  rated = np.unique(via_csv.item)
  assert list(via_tfds.titles) == [via_csv.titles[i] for i in rated]
  with pytest.raises(ValueError, match="unknown MovieLens version"):
    tfds_source.load_tfds("movielens/3m-ratings", tmp_path / "tfds")


def test_tfds_source_is_reachable_from_a_job_config(small, tmp_path):
  folder = synthetic.write_movielens_csv(small, tmp_path / "ml-latest-small")
  cfg = wals_ml100k.get_config().data
  cfg.source = "tfds:movielens/latest-small-ratings"
  cfg.data_dir = str(tmp_path / "tfds")
  cfg.tfds_folder = str(folder)  # offline: the dataset is built from this folder
  built = wals_train.load_data(cfg)
  via_csv = data.load_movielens_csv(folder)
  np.testing.assert_array_equal(_triples(built), _triples(via_csv))
  assert built.source == "tfds:movielens/latest-small-ratings:train"
  cfg.tfds_folder = ""  # already prepared in data_dir: read as it is
  np.testing.assert_array_equal(_triples(wals_train.load_data(cfg)), _triples(via_csv))
  cfg.source = "tfds:movielens/3m-ratings"
  with pytest.raises(ValueError, match="unknown MovieLens version"):
    wals_train.load_data(cfg)
  cfg.source = str(tmp_path / "nowhere")
  with pytest.raises(ValueError, match=r"config.data.source .*nowhere'?: no such folder"):
    wals_train.load_data(cfg)


def test_tfds_source_without_the_extra_names_it(monkeypatch):
  cfg = wals_ml100k.get_config().data
  cfg.source = "tfds:movielens/100k-ratings"
  monkeypatch.setitem(sys.modules, "h5py", None)  # as if h5py were not installed
  with pytest.raises(ImportError, match=r"'h5py'.*pip install 'eagle_jax\[tfds\]'"):
    wals_train.load_data(cfg)


def test_split_is_a_deterministic_per_user_time_holdout(ml100k):
  train, test = data.holdout_by_time(ml100k, test_fraction=0.2, min_train=1)
  assert np.intersect1d(train, test).size == 0 and train.size + test.size == ml100k.num_ratings
  # Every held-out rating is no older than any training rating of the same user.
  t = ml100k.timestamp
  last_train = np.full(ml100k.num_users, -1)
  np.maximum.at(last_train, ml100k.user[train], t[train])
  first_test = np.full(ml100k.num_users, np.iinfo(np.int64).max)
  np.minimum.at(first_test, ml100k.user[test], t[test])
  assert (first_test >= last_train).all()
  n_u = np.bincount(ml100k.user)
  np.testing.assert_array_equal(np.bincount(ml100k.user[test], minlength=943),
                                np.floor(0.2 * n_u).astype(int))
  # The same rows, shuffled, give the same split (as sets of raw (user, item) pairs).
  perm = np.random.default_rng(0).permutation(ml100k.num_ratings)
  shuffled = ml100k.subset(perm)
  _, test2 = data.holdout_by_time(shuffled, test_fraction=0.2, min_train=1)
  key = lambda d, idx: set(zip(d.user[idx].tolist(), d.item[idx].tolist()))
  assert key(shuffled, test2) == key(ml100k, test)


def test_split_keeps_min_train():
  d = synthetic.generate_ratings(num_users=20, num_items=50, num_ratings=120, min_per_user=5,
                                 seed=1)
  train, test = data.holdout_by_time(d, test_fraction=0.9, min_train=4)
  assert (np.bincount(d.user[train], minlength=20) >= 4).all()
  assert (np.bincount(d.user[test], minlength=20) >= 1).all()
  with pytest.raises(ValueError, match="test_fraction"):
    data.holdout_by_time(d, test_fraction=1.0)


def test_synthetic_is_deterministic_and_structured():
  a = synthetic.generate_ratings(num_users=200, num_items=300, num_ratings=6000, seed=5)
  b = synthetic.generate_ratings(num_users=200, num_items=300, num_ratings=6000, seed=5)
  c = synthetic.generate_ratings(num_users=200, num_items=300, num_ratings=6000, seed=6)
  np.testing.assert_array_equal(_triples(a), _triples(b))
  assert not np.array_equal(a.rating, c.rating)
  assert a.num_ratings == 6000 and len(set(zip(a.user.tolist(), a.item.tolist()))) == 6000
  assert set(np.unique(a.rating).tolist()) <= {x / 2 for x in range(1, 11)}
  with pytest.raises(ValueError, match="num_ratings"):
    synthetic.generate_ratings(num_users=10, num_items=10, num_ratings=90)
