r"""Fetches the pinned offline assets into the cache (idempotent).

  python -m launch.fetch_assets                 # all assets
  python -m launch.fetch_assets --assets=recbole
  EAGLE_JAX_CACHE=/mnt/cache python -m launch.fetch_assets
"""

from collections.abc import Sequence

from absl import app, flags

from eagle_jax import assets, cli

_ASSETS = flags.DEFINE_list(
    "assets", [a.name for a in assets.ALL_ASSETS],
    f"Assets to fetch, from {[a.name for a in assets.ALL_ASSETS]}.")


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  by_name = {a.name: a for a in assets.ALL_ASSETS}
  unknown = [n for n in _ASSETS.value if n not in by_name]
  if unknown:
    raise app.UsageError(f"--assets: unknown {unknown}; expected names from {sorted(by_name)}")
  for name in _ASSETS.value:
    assets.fetch(by_name[name], progress=lambda msg: print(msg, flush=True))


if __name__ == "__main__":
  cli.run(main)
