r"""The paper-scale pipeline's host memory and overhead per environment call, with a stand-in
environment.

  python -m benchmarks.scale_bench            # 2,000-anchor per-anchor labelling + 5 RL steps
  python -m benchmarks.scale_bench --quick    # 100 anchors labelled (projected) + 3 RL steps

The world is ``configs/movielens_25m.py:head`` at its sizes (2,000 train and 200 held-out anchors,
20,000 train and 1,000 held-out users: 40M training pairs; K = 100, H = 5, 256 episodes per RL
step), built in memory, not by ``build_world``:

* the environment LLM is ``env.standin.StandInBackend`` (a pure function of the prompt: a load
  instrument, not a model) under the real response cache and batching layers;
* E_D and the policy's text features are stand-in encoders too (hashed bag of words through fixed
  random projections: not MiniLM, not a decoder), so that the pipeline, not a CPU model, is timed;
* Z is random factors in place of WALS on MovieLens-25M (not available offline); anchor plots,
  candidate actions and profiles are stand-in texts.

Then the real code runs: ``world.write_world`` (pairs streamed to ``.npy``), the reference dataset
of the G-optimal kind with per-anchor states (``reference.reference_dataset``, chunks of
``reference.chunk`` states, ``env.max_in_flight`` requests in flight), and RL steps of the head
agent (``rollout.collect`` + ``Learner.rl_step``). RSS (psutil) is sampled every 20 ms.

Printed: peak RSS per phase and after every RL step (the run fails if the peak reaches
``--max_rss_gib`` or the RL steps grow it by more than ``--max_growth_mib``), the pipeline's
overhead per environment call (wall time minus the stand-in environment's and the stand-in
encoders' own time, over the calls), and the projected wall time of a paper-scale run (reference
labelling + ``rl.steps`` RL collections) for a given environment throughput: this machine's
SmolLM2-135M (``--smollm2_calls_per_s``; the smoke config measured 0.6-1 s per transition at batch
16 on 2 cores) and an assumed served model (``--served_calls_per_s``). The learner's steps run on
accelerators in a real run and are reported, not projected.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import os
import re
import sys
import tempfile
import threading
import time
import types

import jax
import numpy as np
import psutil
from absl import app, flags

from configs import movielens_25m
from eagle_jax import parallel, training
from eagle_jax.agent import action_book, reference, rollout, trainer
from eagle_jax.agent import world as world_lib
from eagle_jax.agent.env import ContentGapEnv
from eagle_jax.agent.features import TextFeatures
from eagle_jax.agent.learner import Learner
from eagle_jax.env import stack, standin

_QUICK = flags.DEFINE_bool("quick", False, "Label 100 anchors and run 3 RL steps.")
_REF_ANCHORS = flags.DEFINE_integer("ref_anchors", 0, "Anchors labelled (0: all 2,000; quick: "
                                    "100); the rest is projected.")
_RL_STEPS = flags.DEFINE_integer("rl_steps", 0, "RL steps run (0: 5; quick: 3).")
_SMOLLM2 = flags.DEFINE_float("smollm2_calls_per_s", 1.2, "Transitions/s of SmolLM2-135M on this "
                              "machine (smoke config: 0.6-1 s per transition at batch 16).")
_SERVED = flags.DEFINE_float("served_calls_per_s", 100.0, "Transitions/s of an assumed served "
                             "model (an assumption, not a measurement).")
_MAX_RSS = flags.DEFINE_float("max_rss_gib", 8.0, "Fail when peak RSS reaches this.")
_MAX_GROWTH = flags.DEFINE_float("max_growth_mib", 256.0, "Fail when RSS after the last RL step "
                                 "exceeds RSS after the first by more than this.")

GIB = 1 << 30


class RSSMonitor:
  """Samples this process's RSS every ``period`` seconds in a thread; ``peak()`` since ``reset``."""

  def __init__(self, period: float = 0.02):
    self._proc = psutil.Process()
    self._period = period
    self._peak = self.now()
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._run, daemon=True)
    self._thread.start()

  def now(self) -> int:
    return self._proc.memory_info().rss

  def _run(self) -> None:
    while not self._stop.wait(self._period):
      self._peak = max(self._peak, self.now())

  def reset(self) -> None:
    self._peak = self.now()

  def peak(self) -> int:
    return max(self._peak, self.now())

  def close(self) -> None:
    self._stop.set()
    self._thread.join()


class HashEncoder:
  """Stand-in text encoder (not a model): texts -> [N, dim] float32, the mean of fixed random
  vectors of the text's words (hashed into 4,096 buckets), L2-normalised. ``busy_s`` is its own
  time."""

  def __init__(self, dim: int, seed: int, scale: float = 1.0):
    self.dim = dim
    self._table = (np.random.default_rng(seed).normal(size=(4096, dim)) * scale).astype(np.float32)
    self.busy_s = 0.0

  def __call__(self, texts) -> np.ndarray:
    t0 = time.perf_counter()
    out = np.zeros((len(texts), self.dim), np.float32)
    for n, t in enumerate(texts):
      ids = [int.from_bytes(hashlib.blake2b(w.encode(), digest_size=4).digest(), "big") & 4095
             for w in re.findall(r"\w+", t.lower())] or [0]
      out[n] = self._table[ids].mean(0)
    out /= np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-6)
    self.busy_s += time.perf_counter() - t0
    return out


def build(config, workdir: str):
  """The paper-scale world of ``config`` in memory, over the stand-ins (module docstring)."""
  w, k = config.world, int(config.actions.k)
  rng = np.random.default_rng(0)
  d = int(config.wals.wals.rank) + 3
  n_items, n_users = int(w.anchor_pool), int(w.num_train_users + w.num_heldout_users)
  z_items = (rng.normal(size=(n_items, d)) / np.sqrt(d)).astype(np.float32)
  z_users = (rng.normal(size=(n_users, d)) / np.sqrt(d)).astype(np.float32)
  pool = rng.permutation(n_items)
  held_items = np.sort(pool[: w.num_heldout_anchors])
  train_items = np.sort(pool[w.num_heldout_anchors: w.num_heldout_anchors + w.num_train_anchors])
  train_users, held_users = np.arange(w.num_train_users), np.arange(w.num_train_users, n_users)
  backend = standin.StandInBackend()
  llm = stack.stack_over(backend, os.path.join(workdir, "env", "cache.jsonl"),
                         int(config.env.cache_memory))
  words = standin.VOCAB

  def text(seed: int, n: int) -> str:
    idx = np.random.default_rng(seed).integers(0, len(words), n)
    return " ".join(words[i] for i in idx).capitalize() + "."

  anchors = {int(i): world_lib.Anchor(int(i), f"Movie {i}", text(int(i), 24),
                                      [f"Change {j}: {text(10**6 + int(i) * k + j, 10)}"
                                       for j in range(k)], ["standin:none"] * k)
             for i in np.concatenate([train_items, held_items])}
  profiles = {int(u): f"Likes: {text(10**8 + int(u), 12)}" for u in range(n_users)}
  ed_enc = HashEncoder(d, 1, scale=0.5)
  phi_enc = HashEncoder(int(config.policy.text_dim), 2)
  memo = int(config.world.feature_memo)
  env = ContentGapEnv(llm.client, world_lib.transition_params(config), ed_enc, z_items, z_users,
                      lam=float(config.utility.lam), k=int(config.utility.k),
                      max_sentences=int(config.env.max_sentences),
                      reasons=world_lib.description_states(config),
                      max_in_flight=int(config.env.max_in_flight), memo_size=memo)
  phi = TextFeatures(phi_enc, phi_enc.dim, max_entries=memo)
  world = world_lib.World(
      env=env, llm=llm, features=phi, policy_features=phi, anchors=anchors, profiles=profiles,
      train_pairs=world_lib._pairs(train_users, train_items),  # noqa: SLF001
      heldout_pairs={"new_users": world_lib._pairs(held_users, train_items),  # noqa: SLF001
                     "new_anchors": world_lib._pairs(held_users, held_items)},  # noqa: SLF001
      num_actions=k, info={"latent_dim": d, "env_model": backend.model_id},
      actions=action_book.ActionBook.for_anchors(anchors, k))
  data = types.SimpleNamespace(
      descriptions=[{"movie_id": i, "item_index": i, "source": "standin"} for i in anchors],
      action_sets=[{"movie_id": i, "user_id": None, "actions": []} for i in anchors],
      profiles=[{"user_index": u, "source": "standin"} for u in profiles])
  return world, backend, (ed_enc, phi_enc), data, types.SimpleNamespace(user_ids=np.arange(n_users))


def _gib(x: float) -> str:
  return f"{x / GIB:.2f} GiB"


def _hours(s: float) -> str:
  return f"{s / 3600:,.1f} h" if s >= 3600 else f"{s / 60:,.1f} min"


async def run(argv_quick: bool) -> int:
  config = movielens_25m.get_config("head")
  config.mesh = {"data": -1}
  mesh = parallel.make_mesh({"data": -1})
  job = trainer.validate(config, mesh, inputs=False)
  n_ref = _REF_ANCHORS.value or (100 if argv_quick else int(config.world.num_train_anchors))
  rl_steps = _RL_STEPS.value or (3 if argv_quick else 5)
  print(f"load average at start: {os.getloadavg()}")
  print("environment: env.standin.StandInBackend (a load instrument, not a model); E_D and policy "
        "features: hashed bag-of-words stand-ins; Z: random factors (MovieLens-25M is not "
        "available offline)")
  mon = RSSMonitor()
  rows = []
  with tempfile.TemporaryDirectory() as workdir:
    t0 = time.perf_counter()
    world, backend, encoders, data, ratings = build(config, workdir)
    world_lib.write_world(world, workdir, ratings, data)
    size = sum(os.path.getsize(os.path.join(workdir, f))
               for f in ["world.json"] + [f"world/{s}_pairs.npy" for s in
                                          ("train", "new_users", "new_anchors")])
    print(f"world: {len(world.anchors):,} anchors, {len(world.profiles):,} users, "
          f"{len(world.train_pairs):,} train pairs, K={world.num_actions}, H={job.horizon}; "
          f"record {size / 2**20:.0f} MiB (world.json "
          f"{os.path.getsize(os.path.join(workdir, 'world.json')) / 2**20:.1f} MiB); "
          f"{time.perf_counter() - t0:.1f} s")
    rows.append(("build world + record", time.perf_counter() - t0, 0, mon.peak()))
    featurizer = rollout.Featurizer(world, job.horizon)

    # Reference labelling: the paper's per-anchor targets of n_ref anchors (g_optimal).
    mon.reset()
    anchors = np.unique(world.train_pairs[:, 1])[:n_ref]
    sub = dataclasses.replace(world, train_pairs=world.train_pairs[
        np.isin(world.train_pairs[:, 1], anchors)])
    labels = dataclasses.replace(job.labels)
    busy0, enc0, calls0 = backend.busy_s, sum(e.busy_s for e in encoders), backend.calls
    t0 = time.perf_counter()
    ref = await reference.reference_dataset(job.main, sub, featurizer, labels, seed=job.seed,
                                            reward=job.reward, key=jax.random.key(0))
    wall = time.perf_counter() - t0
    calls = backend.calls - calls0
    stand = (backend.busy_s - busy0) + (sum(e.busy_s for e in encoders) - enc0)
    ref_over = (wall - stand) / max(calls, 1)
    rows.append((f"reference[{job.main.name}] {n_ref} anchors x {labels.users_per_anchor} users",
                 wall, calls, mon.peak()))
    print(f"reference: {len(ref):,} states, {calls:,} transitions in {wall:.1f} s "
          f"(stand-ins {stand:.1f} s); design g/rank {ref.stats.get('design_g_over_rank', 0):.3f}")
    del ref, sub

    # RL steps of the head agent.
    learner = Learner(job, featurizer.state_dim, featurizer.action_dim, mesh)
    state = learner.start_rl(learner.init_state())
    per_step, coll_wall, coll_stand, coll_calls, learn_wall = [], 0.0, 0.0, 0, 0.0
    coll_agent = 0.0
    agent = [0.0]  # seconds in the agent's forward passes (its compute, not the pipeline's)

    def timed(fn):
      def call(*args):
        t = time.perf_counter()
        out = fn(*args)
        agent[0] += time.perf_counter() - t
        return out
      return call

    mon.reset()
    for i in range(rl_steps):
      pairs = rollout.sample_pairs(world.train_pairs, job.rl.batch_size, job.seed, i)
      busy0, enc0, calls0 = backend.busy_s, sum(e.busy_s for e in encoders), backend.calls
      agent0 = agent[0]
      t0 = time.perf_counter()
      ep = await rollout.collect(world, featurizer, timed(learner.policy_fn(state["params"])),
                                 pairs, jax.random.key(i), reward=job.reward)
      t1 = time.perf_counter()
      params, opt, _ = learner.rl_step(state["params"], state["opt_state"], state["ref_params"],
                                       ep.batch())
      jax.block_until_ready(params)
      state = dict(state, params=params, opt_state=opt)
      t2 = time.perf_counter()
      del ep
      if i:  # step 0 compiles
        coll_wall += t1 - t0
        coll_stand += (backend.busy_s - busy0) + (sum(e.busy_s for e in encoders) - enc0)
        coll_agent += agent[0] - agent0
        coll_calls += backend.calls - calls0
        learn_wall += t2 - t1
      per_step.append((i, t1 - t0, t2 - t1, backend.calls - calls0, mon.now(), mon.peak()))
    cache = world.llm.cached.cache
    sample = [(key, cache.get(key)) for key in list(cache._entries)[:2000]]  # noqa: SLF001
    per_entry = sum(sys.getsizeof(key) + sys.getsizeof(c) + sys.getsizeof(c.text) + 2 * 8 + 100
                    for key, c in sample) / max(len(sample), 1)  # + dict slot, object fields
    cache_entries = len(cache)
    rows.append((f"RL {rl_steps} steps x {job.rl.batch_size} episodes", sum(
        s[1] + s[2] for s in per_step), sum(s[3] for s in per_step), mon.peak()))
  mon.close()

  print("\nphase                                        wall s      env calls   peak RSS")
  for name, wall, calls, peak in rows:
    print(f"{name:<44} {wall:>8.1f} {calls:>14,} {_gib(peak):>10}")
  print("\nRL step  collect s  learn s  env calls  RSS after  peak in step")
  for i, c, lrn, calls, now, peak in per_step:
    print(f"{i:>7} {c:>10.1f} {lrn:>8.1f} {calls:>10,} {_gib(now):>10} {_gib(peak):>13}")
  peak = max(r[3] for r in rows)
  # Flat across steps: RSS after the last step against after the second (the first compiles).
  growth = per_step[-1][4] - per_step[min(1, len(per_step) - 1)][4]
  n_rl = max(rl_steps - 1, 1)
  rl_over = (coll_wall - coll_stand - coll_agent) / max(coll_calls, 1)
  print(f"\npeak RSS {_gib(peak)} (limit {_MAX_RSS.value} GiB); RSS growth from RL step 1 to "
        f"the last {growth / 2**20:+.0f} MiB (limit {_MAX_GROWTH.value:.0f} MiB)")
  print(f"pipeline overhead per environment call (wall minus stand-in env and encoders): "
        f"reference labelling {ref_over * 1e3:.3f} ms, RL collection {rl_over * 1e3:.3f} ms "
        f"(steps after the first; the agent's forward passes excluded: "
        f"{coll_agent / n_rl:.1f} s per step); learner step on this CPU {learn_wall / n_rl:.1f} s")
  c = config
  ref_calls = int(c.world.num_train_anchors) * int(c.actions.k)
  rl_calls = int(c.rl.steps) * int(c.rl.batch_size) * int(c.rl.horizon)
  print(f"\nprojected paper-scale run ({c.world.num_train_anchors:,} anchors x K={c.actions.k} "
        f"reference transitions = {ref_calls:,}; {c.rl.steps:,} RL steps x {c.rl.batch_size} x "
        f"H={c.rl.horizon} = {rl_calls:,}; learner and evaluation not included):")
  over_s = ref_calls * ref_over + rl_calls * rl_over
  print(f"  pipeline overhead alone: {_hours(over_s)}")
  for name, rate in (("SmolLM2-135M on this machine", _SMOLLM2.value),
                     ("assumed served model", _SERVED.value)):
    env_s = (ref_calls + rl_calls) / rate
    print(f"  {name} at {rate:g} calls/s: environment {_hours(env_s)} + overhead "
          f"{_hours(over_s)} = {_hours(env_s + over_s)} (overhead {over_s / env_s:.1%} of it)")
  cap = int(c.env.cache_memory) or ref_calls + rl_calls
  print(f"  response cache in memory: {cache_entries:,} answers here, ~{per_entry:.0f} B each; "
        f"a paper-scale run's ~{ref_calls + rl_calls:,} answers, at most env.cache_memory="
        f"{c.env.cache_memory:,} kept: ~{min(cap, ref_calls + rl_calls) * per_entry / GIB:.1f} GiB "
        f"(all of them: ~{(ref_calls + rl_calls) * per_entry / GIB:.1f} GiB)")
  print(f"  (rollout-state labelling instead: ~{c.reference.episodes * c.rl.horizon:,} states x "
        f"K = {c.reference.episodes * c.rl.horizon * c.actions.k:,} transitions)")
  print(f"load average at end: {os.getloadavg()}")
  ok = peak < _MAX_RSS.value * GIB and growth <= _MAX_GROWTH.value * 2**20
  print("PASS" if ok else "FAIL: peak RSS or its growth over the limit")
  return 0 if ok else 1


def main(argv) -> int:
  del argv
  training.quiet_library_logs()
  return asyncio.run(run(_QUICK.value))


if __name__ == "__main__":
  app.run(main)
