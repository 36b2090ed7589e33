r"""Trains an ELM (adapter E_A into SmolLM2) and reports semantic / behavioural consistency.

  python -m launch.train_elm --config=configs/elm_ml100k.py --workdir=/tmp/elm \
      [--config.train.stage1_steps=300 --config.encoder_dir=/tmp/encoder ...]

Outputs in ``--workdir``: ``checkpoints/<step>/`` (orbax; a rerun resumes from the latest),
``metrics.jsonl`` and ``tensorboard/``, ``responses.jsonl`` (the environment LLM's response cache of
the targets), ``examples.jsonl`` (training targets), ``report.json`` (SC of the trained ELM vs the
title-only prompt vs a random-embedding control on held-out movies, interpolations, BC of user
profiles) and ``encoder/`` when E_D was trained here. ``eagle_jax/elm/job.py`` documents it.
"""

from __future__ import annotations

import json
import os

from absl import app, flags

from eagle_jax import assets, cli, training
from eagle_jax.elm import job
from eagle_jax.env import stack
from launch import job as launch_job

_CONFIG = cli.define_config(
    "config", os.path.join(os.path.dirname(__file__), "..", "configs", "elm_ml100k.py"),
    "ELM configuration file.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Run folder (checkpoints, metrics, report).")


def _env_opener(config, workdir: str):
  """The target writer: a server (``config.llm.server_url``, e.g. a larger teacher model, as the
  paper's PaLM 2-L wrote PaLM 2-XS's targets) or the ELM's own untrained decoder, locally."""
  stack.check_llm_config(config.llm)
  path = config.targets.cache or os.path.join(workdir, "responses.jsonl")
  if config.llm.server_url:
    return lambda sampler, name: stack.open_llm(config.llm, path)
  if config.llm.gguf:
    raise ValueError("config.llm.gguf: the ELM's local environment is its own decoder "
                     "(config.decoder.gguf); leave config.llm.gguf empty or set server_url")
  model_file = config.decoder.gguf or (assets.smollm2_gguf() if config.decoder.kind == "gguf"
                                       else None)
  return lambda sampler, name: stack.open_llm(config.llm, path, sampler=sampler,
                                              model_file=model_file, model_name=name)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  training.quiet_library_logs()
  config, workdir = _CONFIG.value, _WORKDIR.value
  report = launch_job.run(
      workdir, lambda: job.run(config, workdir, open_env=_env_opener(config, workdir)),
      name="train_elm", config=config, usage_errors=(training.ConfigError, ValueError))
  print(json.dumps({"headline": report.get("headline"), "seconds": report["seconds"],
                    "bc": report.get("eval", {}).get("behavioural_consistency", {}).get("elm")},
                   indent=2))


if __name__ == "__main__":
  cli.run(main, required=["workdir"])
