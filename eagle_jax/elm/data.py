"""ELM training data: E_D and its held-out movies, the domain tables, examples and their targets.

* ``load_encoder``: E_D (texts -> Z) of ``encoder_dir``, or trained (with WALS) into
  ``<workdir>/encoder``; ``encoder_heldout`` reads the movies E_D never saw (``split.npz``).
* ``domain_tables``: the adapter reads each domain's vectors standardised per column
  (``adapter.standardisation`` over the whole table of the domain).
* ``prepare``: train/held-out movies from the most-rated ones, users from the most active ones;
  every target written by the environment LLM through the given client.
* ``Dataset`` / ``make_dataset``: the encoded examples and the batch of a training step.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from absl import logging

from eagle_jax import paths, training
from eagle_jax.data import catalog
from eagle_jax.elm import adapter as adapter_lib
from eagle_jax.elm import tasks as tasks_lib
from eagle_jax.elm.model import Parts
from eagle_jax.models.tokenizer import Tokenizer

ConfigError = training.ConfigError


def load_encoder(encoder_dir: str, encoder_config, workdir: str):
  """E_D, training it (and WALS) into ``<workdir>/encoder`` when ``encoder_dir`` is empty.

  Args:
    encoder_dir: ``config.encoder_dir``: a ``launch.train_encoder`` run folder, or "".
    encoder_config: ``config.encoder`` (the E_D job's config; ``minilm``).
    workdir: the ELM run folder.

  Returns:
    ``(ed, meta, folder)``: ``ed`` maps N texts to [N, d] float32 points of Z, ``meta`` is E_D's
    checkpoint metadata (``embeddings``: the WALS ``embeddings.npz``), ``folder`` its run folder.
  """
  from eagle_jax.embed import encoder_train  # noqa: PLC0415

  directory = encoder_dir
  if not directory:
    directory = os.path.join(workdir, "encoder")
    if not paths.isdir(os.path.join(directory, "checkpoints")):
      logging.info("no encoder_dir: training E_D into %s", directory)
      encoder_train.run(encoder_config, directory)
  ckpt_dir = os.path.join(directory, "checkpoints")
  if not paths.isdir(ckpt_dir):
    raise ConfigError(f"config.encoder_dir: {directory!r} has no checkpoints/ (not an E_D run)")
  ed, meta = encoder_train.load_encoder(ckpt_dir, minilm=encoder_config.minilm or None)
  if meta.get("target") != "augmented":
    raise ConfigError(f"config.encoder_dir: E_D in {directory!r} regresses {meta.get('target')!r},"
                      " expected 'augmented' WALS vectors")
  return ed, meta, directory


def encoder_heldout(directory: str, num_items: int) -> np.ndarray:
  """[I] bool: the movies E_D never saw in training (``split.npz`` of its run folder)."""
  path = os.path.join(directory, "split.npz")
  if not paths.exists(path):
    raise ConfigError(f"config.encoder_dir: {directory!r} has no split.npz (E_D's held-out movies)")
  with paths.open_file(path, "rb") as f, np.load(f, allow_pickle=False) as z:
    held = np.asarray(z["heldout_item"], bool)
  if held.shape != (num_items,):
    raise ConfigError(f"config.encoder_dir: {path} covers {held.shape[0]} items, the ratings "
                      f"have {num_items} (another data set?)")
  return held


def domain_tables(item_z: np.ndarray, user_z: np.ndarray
                  ) -> tuple[dict[int, tuple[np.ndarray, np.ndarray]], dict[int, np.ndarray]]:
  """Per-domain standardisation and standardised tables (domain 0: movies, 1: users).

  Args:
    item_z: [I, d] float32 augmented item vectors.
    user_z: [U, d] float32 augmented user vectors.

  Returns:
    ``(norms, tables)``: domain -> (mean [d], scale [d]) and domain -> [N, d] float32.
  """
  norms = {0: adapter_lib.standardisation(item_z), 1: adapter_lib.standardisation(user_z)}
  tables = {d: ((z - norms[d][0]) / norms[d][1]).astype(np.float32)
            for d, z in ((0, item_z), (1, user_z))}
  return norms, tables


def prepare(data_config, env_client, ratings, *, tokenizer: Tokenizer,
            sampling: Mapping[str, Any], seed: int, retries: int,
            ed_heldout: np.ndarray | None = None
            ) -> tuple[dict[str, Any], list[tasks_lib.Example], list[dict[str, Any]]]:
  """Splits movies and users, and asks the environment for every target.

  Movies: the ``test_movies`` most-rated movies among those E_D was *not* trained on
  (``ed_heldout``; E_D would otherwise recognise a title mentioned in a text and favour the
  title-only baseline), and the ``train_movies`` most-rated of the rest. Users: a seeded split of
  the most active users.

  Args:
    data_config: ``config.data``.
    env_client: the environment LLM (a ``SamplingClient``).
    ratings: ``RatingsData``.
    tokenizer: the decoder's tokenizer (targets are cut to ``target_tokens`` of it).
    sampling, seed, retries: the target requests' sampling fields, base seed and extra attempts.
    ed_heldout: [I] bool, E_D's held-out movies (None: a seeded split of the most-rated ones).

  Returns:
    ``(split, examples with targets, provenance records)``; ``split`` has ``train_movies``,
    ``test_movies``, ``train_users``, ``test_users`` (index arrays), ``pairs`` and the eval-only
    reference examples under ``reference``.
  """
  dc = data_config
  by_count = catalog.most_rated_items(ratings, ratings.num_items)
  if ed_heldout is None:
    ed_heldout = np.zeros(ratings.num_items, bool)
    ed_heldout[tasks_lib.split_indices(by_count[:dc.train_movies + dc.test_movies],
                                       dc.train_movies, dc.test_movies, dc.seed)[1]] = True
  test_m = np.sort(by_count[ed_heldout[by_count]][:dc.test_movies])
  train_m = np.sort(by_count[~ed_heldout[by_count]][:dc.train_movies])
  if len(test_m) < dc.test_movies or len(train_m) < dc.train_movies:
    raise ConfigError(f"config.data: {len(test_m)} held-out / {len(train_m)} training movies "
                      f"available, asked for {dc.test_movies} / {dc.train_movies}")
  n_users = dc.train_users + dc.test_users
  users = catalog.most_active_users(ratings, n_users) if n_users else np.zeros(0, np.int64)
  train_u, test_u = tasks_lib.split_indices(users, dc.train_users, dc.test_users, dc.seed)
  pair_list = tasks_lib.pairs(train_m, dc.comparison_pairs, dc.seed) if dc.comparison_pairs else []
  examples = [tasks_lib.Example(t, (int(i),)) for i in train_m for t in dc.movie_tasks]
  examples += [tasks_lib.Example("comparison", p) for p in pair_list]
  examples += [tasks_lib.Example("user_profile", (int(u),)) for u in train_u]
  reference = [tasks_lib.Example("summary", (int(i),)) for i in test_m]
  reference += [tasks_lib.Example("user_profile", (int(u),)) for u in test_u]
  user_titles = {u.user_index: u for u in catalog.users_from_ratings(
      ratings, np.concatenate([train_u, test_u]))} if n_users else None
  done, records = tasks_lib.run_async(tasks_lib.generate_targets(
      env_client, examples + reference, ratings, tokenizer=tokenizer,
      target_tokens=dc.target_tokens, sampling=sampling, seed=seed, retries=retries,
      user_titles=user_titles))
  ref_keys = {(e.task, e.slots) for e in reference}
  train_keys = {(e.task, e.slots) for e in examples}
  train_ex = [e for e in done if (e.task, e.slots) in train_keys]
  ref_ex = [e for e in done if (e.task, e.slots) in ref_keys and (e.task, e.slots)
            not in train_keys]
  split = {"train_movies": train_m, "test_movies": test_m, "train_users": train_u,
           "test_users": test_u, "pairs": pair_list, "reference": ref_ex}
  return split, train_ex, records


@dataclasses.dataclass
class Dataset:
  """Encoded training examples and the standardised domain tables.

  Attributes:
    rows: encoded examples (``tasks.Encoded``).
    tables: domain index -> [N, d] standardised embeddings.
    prompt_len: P, the padded prompt length (the longest prompt).
    target_len: L, the padded target length.
  """

  rows: list[tasks_lib.Encoded]
  tables: dict[int, np.ndarray]
  prompt_len: int
  target_len: int

  def batch(self, step: int, batch_size: int, seed: int, pad_id: int) -> dict[str, np.ndarray]:
    """The batch of training step ``step`` (``tasks.epoch_order``; ``tasks.collate`` arrays)."""
    idx = tasks_lib.epoch_order(len(self.rows), batch_size, step, seed)
    return tasks_lib.collate([self.rows[i] for i in idx], self.tables,
                             prompt_len=self.prompt_len, target_len=self.target_len,
                             pad_id=pad_id)


def make_dataset(examples: Sequence[tasks_lib.Example], parts: Parts, tables: Mapping[int, Any],
                 target_tokens: int) -> Dataset:
  """Encodes examples for ``parts``' tokenizer and soft-token count.

  Args:
    examples: examples with targets (``prepare``).
    parts: the ELM's static pieces (tokenizer, ``n_tokens``, ``placeholder_id``).
    tables: domain index -> [N, d] float32 standardised table (``domain_tables``).
    target_tokens: L, the longest target in tokens.

  Raises:
    ValueError: no example survived encoding.
  """
  rows = tasks_lib.encode_examples(examples, parts.tokenizer, n_tokens=parts.n_tokens,
                                   target_tokens=target_tokens,
                                   placeholder_id=parts.placeholder_id,
                                   domains=adapter_lib.DOMAINS)
  if not rows:
    raise ValueError("no training examples (every target failed to parse?)")
  prompt_len = max(len(r.prompt) for r in rows)
  return Dataset(rows, dict(tables), prompt_len, target_tokens)
