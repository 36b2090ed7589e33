"""The EAGLE agent trainer: reference phase, then RL with KL to the reference, resumable.

``validate`` is the job's one entry check: it reads every field of the run config the trainer and the
evaluation use, resolves the reference kinds in the registry (``reference.REFERENCES``) and returns a
``Job`` of typed values. ``Learner``, ``AgentTrainer`` and the reference labelling take the ``Job``
(or a part of it), never the raw config; code that holds a ``World`` takes K from
``world.num_actions``.

One run trains one agent for one reference policy ``kind`` in ``<workdir>/agents/<kind>``:

1. **Reference phase** (global steps ``[0, reference.steps)``): the agent network learns the
   reference targets (``agent/reference.py``) by cross-entropy on minibatches.
2. **RL phase** (steps ``[reference.steps, reference.steps + rl.steps)``): the agent starts from the
   reference network, which is frozen as pi_ref; each step collects ``rl.batch_size`` episodes and
   minimises ``losses.eagle_loss`` (REINFORCE with the learned value baseline or GAE, + alpha
   KL(pi || pi_ref)).

Sharding: parameters are created directly sharded (``training.FunctionalModel``: ``nnx.eval_shape``,
then one jitted init with ``out_shardings`` from the logical axes); every batch array has the logical
``batch`` axis first and is placed with ``parallel.named_sharding`` before a ``jax.jit`` step whose
in/out shardings are explicit (``agent/learner.py``). The same code runs on one CPU device, 8 forced
host devices, or a TPU slice (``config.mesh``).

Overlap: with ``rl.overlap``, the episodes of step i+1 are collected (environment calls in flight)
while the learner runs step i, with the parameters from before step i: behaviour lags the learner by
one step and the policy-gradient term carries the truncated importance ratio (``eagle_loss``). The
lagged parameters are part of the checkpoint, so a resumed run collects exactly what an uninterrupted
one would have.

Checkpoint (orbax, every ``checkpoint.every`` steps, at the phase boundary, at the end and on SIGTERM,
then ``preemption.Preempted``; newest ``checkpoint.max_to_keep`` kept): agent, reference and
behaviour parameters, optimizer state, the run's PRNG key; the metadata holds the step, which is also
the data iterator's state (batch i's pairs and draws are functions of (seed, i)). Rerunning resumes
from the newest intact checkpoint; the environment replays from the response cache, so the resumed
run's metrics equal an uninterrupted run's.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from eagle_jax import checkpoint, checks, hosts, paths, preemption, run_config, training
from eagle_jax.agent import agent_model, reference, rollout
from eagle_jax.agent.learner import Learner
from eagle_jax.agent.world import World, cache_stats
from eagle_jax.agent.world import check_config as check_world_config
from eagle_jax.embed import encoder_train, wals_train


def agent_dir(workdir: str, kind: str) -> str:
  return os.path.join(workdir, "agents", kind)


@dataclasses.dataclass(frozen=True)
class PhaseConfig:
  """One training phase's schedule.

  Attributes:
    steps: train steps of the phase.
    batch_size: rows per step (states in the reference phase, episodes in RL).
    optim: the optimizer's config (``training.make_optimizer``).
  """

  steps: int
  batch_size: int
  optim: Any


@dataclasses.dataclass(frozen=True)
class RLConfig(PhaseConfig):
  """The RL phase: its schedule and the settings of ``losses.eagle_loss``.

  Attributes:
    gamma, gae_lambda, kl_coef, value_coef, entropy_coef: ``losses.eagle_loss``'s coefficients.
    overlap: collect step i+1's episodes while step i trains (importance-corrected).
    microbatches: slices the step's episodes are processed in, one after another (gradient
      accumulation: the same gradient, the activation memory of B / M episodes).
  """

  gamma: float
  gae_lambda: float
  kl_coef: float
  value_coef: float
  entropy_coef: float
  overlap: bool
  microbatches: int = 1


@dataclasses.dataclass(frozen=True)
class Job:
  """The EAGLE training/evaluation job's config, checked once (``validate``).

  Attributes:
    kinds: the reference policies to train, in config order (``config.reference.kinds``).
    main: the headline reference (``config.reference.main``; one of ``kinds``).
    seed: the run seed.
    horizon: H, steps per episode (``config.rl.horizon``).
    num_actions: K as configured (``config.actions.k``); code holding a ``World`` uses
      ``world.num_actions``.
    text_dim: F, width of the policy's text features (``config.policy.text_dim``).
    policy: the agent network (``config.policy``: pooled head or language model).
    reward: terminal reward kind, one of ``rollout.REWARDS`` (``config.utility.reward``).
    reference: the reference phase (``config.reference.steps``, ``batch_size``, ``optim``).
    labels: how the reference states are visited and labelled (``config.reference``).
    rl: the RL phase (``config.rl``).
    checkpoint_every, max_to_keep: ``config.checkpoint``.
    tensorboard: also write TensorBoard events.
    profile_start, profile_steps: the RL steps ``[start, start + steps)`` traced by
      ``jax.profiler`` (``config.profile``; start -1: none).
  """

  kinds: tuple[reference.ReferenceKind, ...]
  main: reference.ReferenceKind
  seed: int
  horizon: int
  num_actions: int
  text_dim: int
  policy: agent_model.AgentSpec
  reward: str
  reference: PhaseConfig
  labels: reference.LabelConfig
  rl: RLConfig
  checkpoint_every: int
  max_to_keep: int
  tensorboard: bool
  profile_start: int = -1
  profile_steps: int = 0


def validate(config, mesh: jax.sharding.Mesh, inputs: bool = True) -> Job:
  """Checks every field the trainer and the evaluation read, before any compute (``inputs``: also
  that the input files and folders the config names exist; ``dry_run`` reads none).

  Returns:
    The ``Job`` every later stage reads.

  Raises:
    ConfigError: naming the field and what was expected.
  """
  checks.check_number(config, "actions.k", integer=True, lo=2)
  checks.check_numbers(config, [
      ("seed", dict(integer=True, lo=0)),
      ("rl.horizon", dict(integer=True, lo=1)),
      ("rl.steps", dict(integer=True, lo=0)),
      ("rl.gamma", dict(lo=0.0, hi=1.0, lo_open=True)),
      ("rl.gae_lambda", dict(lo=0.0, hi=1.0)),
      ("rl.kl_coef", dict(lo=0.0)),
      ("rl.value_coef", dict(lo=0.0)),
      ("rl.entropy_coef", dict(lo=0.0)),
      ("rl.microbatches", dict(integer=True, lo=1)),
      ("reference.steps", dict(integer=True, lo=0)),
      ("reference.episodes", dict(integer=True, lo=1)),
      ("reference.rollout_batch", dict(integer=True, lo=1)),
      ("reference.design_dim", dict(integer=True, lo=0)),
      ("reference.exploratory_m", dict(integer=True, lo=1, hi=int(config.actions.k))),
      ("reference.design_eps", dict(lo=0.0, lo_open=True)),
      ("reference.design_max_iters", dict(integer=True, lo=1)),
      ("reference.design_ridge", dict(lo=0.0)),
      ("policy.text_dim", dict(integer=True, lo=1)),
      ("policy.hidden", dict(integer=True, lo=1)),
      ("checkpoint.every", dict(integer=True, lo=1)),
      ("checkpoint.max_to_keep", dict(integer=True, lo=1)),
      ("profile.start", dict(integer=True, lo=-1)),
      ("profile.steps", dict(integer=True, lo=1)),
  ])
  checks.check_optimizer(config, "rl.optim")
  checks.check_optimizer(config, "reference.optim")
  checks.check_choice(config, "utility.reward", rollout.REWARDS)
  kinds = tuple(reference.lookup(k, "config.reference.kinds") for k in config.reference.kinds)
  main = reference.lookup(config.reference.main, "config.reference.main")
  if main not in kinds:
    raise training.ConfigError(
        f"config.reference.main={main.name!r} must be one of config.reference.kinds="
        f"{tuple(k.name for k in kinds)} (the evaluation's headline agent)")
  training.check_divisible(int(config.rl.batch_size), mesh, "config.rl.batch_size",
                           int(config.rl.microbatches))
  training.check_divisible(int(config.reference.batch_size), mesh, "config.reference.batch_size")
  check_world_config(config)
  policy = agent_model.check_policy(config)
  wals_train.check_config(config.wals, "config.wals", inputs)
  encoder_train.check_config(config.encoder, "config.encoder", inputs)
  rl, ref = config.rl, config.reference
  return Job(
      kinds=kinds, main=main, seed=int(config.seed), horizon=int(rl.horizon),
      num_actions=int(config.actions.k), text_dim=int(config.policy.text_dim),
      policy=policy, reward=str(config.utility.reward),
      reference=PhaseConfig(int(ref.steps), int(ref.batch_size), ref.optim),
      labels=reference.LabelConfig.from_config(ref),
      rl=RLConfig(int(rl.steps), int(rl.batch_size), rl.optim, gamma=float(rl.gamma),
                  gae_lambda=float(rl.gae_lambda), kl_coef=float(rl.kl_coef),
                  value_coef=float(rl.value_coef), entropy_coef=float(rl.entropy_coef),
                  overlap=bool(rl.overlap), microbatches=int(rl.microbatches)),
      checkpoint_every=int(config.checkpoint.every),
      max_to_keep=int(config.checkpoint.max_to_keep), tensorboard=bool(config.tensorboard),
      profile_start=int(config.profile.start), profile_steps=int(config.profile.steps))


class AgentTrainer:
  """Trains one agent (one reference ``kind``) on a ``World``; see module docstring.

  Args:
    job: the validated job (``validate``).
    world: the run's world.
    workdir: the run folder; the agent lives in ``<workdir>/agents/<kind.name>``.
    kind: the reference policy (an entry of ``reference.REFERENCES``).
    mesh: the device mesh ``job`` was validated for.
  """

  def __init__(self, job: Job, world: World, workdir: str, kind: reference.ReferenceKind,
               mesh: jax.sharding.Mesh):
    self.job = job
    self.world = world
    self.kind = kind
    self.workdir = agent_dir(workdir, kind.name)
    self.mesh = mesh
    self.featurizer = agent_model.featurizer(job.policy, world, job.horizon)
    decoder = None
    if job.policy.kind != "head":
      from eagle_jax.agent import lm_features  # noqa: PLC0415

      decoder = lm_features.load_decoder(job.policy.decoder, job.policy.chat_template)
    self.learner = Learner(job, self.featurizer.state_dim, self.featurizer.action_dim, mesh,
                           decoder)
    self.rows = hosts.process_rows(mesh, job.rl.batch_size)  # the episodes this process runs
    self.ref_steps = self.learner.ref_steps
    self.rl_steps = self.learner.rl_steps
    self.total_steps = self.ref_steps + self.rl_steps

  def restore(self, step: int | None = None) -> tuple[int, dict[str, Any], dict[str, Any]]:
    """(step, state, metadata) of this agent's checkpoint (default: the newest)."""
    with checkpoint.Checkpointer(os.path.join(self.workdir, "checkpoints")) as ckpt:
      return ckpt.restore(step, target=self.learner.abstract_state())

  def policy_fn(self, params) -> rollout.PolicyFn | rollout.WriterFn:
    return self.learner.policy_fn(params)

  # -- loop ----------------------------------------------------------------------------------------

  def train(self) -> dict[str, Any]:
    """Runs (or resumes) the whole schedule; returns a summary."""
    return asyncio.run(self._train())

  async def _train(self) -> dict[str, Any]:
    job = self.job
    name = self.kind.name
    paths.makedirs(self.workdir)
    ckpt = checkpoint.Checkpointer(os.path.join(self.workdir, "checkpoints"),
                                   max_to_keep=job.max_to_keep)
    resumed = ckpt.latest_step() is not None
    step, state, meta = ckpt.restore_or_init(lambda: (0, self.learner.init_state(), {}),
                                             target=self.learner.abstract_state())
    if resumed:
      logging.info("agent %s: resumed from step %d in %s", name, step, ckpt.directory)
    writer = training.MetricsWriter(self.workdir, resume_step=step if resumed else None,
                                    tensorboard=job.tensorboard)
    progress = training.Progress(self.total_steps, initial=step, desc=f"agent[{name}]",
                                 keys=("loss", "reward", "kl"))
    key = jax.random.wrap_key_data(jnp.asarray(state["rng"]))
    t_start = time.perf_counter()
    last: dict[str, Any] = {}
    guard = preemption.Guard().__enter__()  # SIGTERM: save this step, raise Preempted

    def save(step: int, state: dict, force: bool = False) -> None:
      if step == ckpt.latest_step():
        return
      if force or step % job.checkpoint_every == 0:
        ckpt.save(step, state, {"step": step, "kind": name,
                                "phase": "reference" if step < self.ref_steps else "rl",
                                "data_state": {"next_batch": step}}, force=force)

    def stop_if_preempted(step: int, state: dict, *in_flight: asyncio.Future) -> None:
      if guard.should_stop(step):
        for task in in_flight:  # the next step's collection (a no-op once awaited)
          task.cancel()
        save(step, state, force=True)
        ckpt.wait()
        raise preemption.Preempted(step, ckpt.directory)

    try:
      if step < self.ref_steps:
        data = await reference.reference_dataset(
            self.kind, self.world, self.featurizer, job.labels, seed=job.seed,
            reward=job.reward, key=jax.random.fold_in(key, 1))
        logging.info("reference[%s]: %d states %s", name, len(data), data.stats)
        batch_size = job.reference.batch_size
        while step < self.ref_steps:
          rng = np.random.default_rng([job.seed, 11, step])
          idx = rng.choice(len(data), batch_size, replace=len(data) < batch_size)
          batch = {"state": data.state[idx], "action_feats": data.action_feats[idx],
                   "mask": data.mask[idx], "targets": data.targets[idx]}
          params, opt, m = self.learner.reference_step(state["params"], state["opt_state"], batch)
          state = dict(state, params=params, opt_state=opt)
          step += 1
          last = writer.write(step, {**m, **{f"ref_{k}": v for k, v in data.stats.items()
                                              if isinstance(v, float)}}, phase="reference")
          progress.update(1, last)
          if step == self.ref_steps:
            state = self.learner.start_rl(state)
          save(step, state, force=step == self.ref_steps)
          stop_if_preempted(step, state)
      elif step == self.ref_steps == 0 and not resumed:
        state = self.learner.start_rl(state)
      state, step, last = await self._rl_loop(state, step, key, writer, progress, save,
                                              stop_if_preempted)
      save(step, state, force=True)
    finally:
      guard.__exit__()
      ckpt.close()
      writer.close()
      progress.close()
    return {"kind": name, "step": step, "seconds": time.perf_counter() - t_start,
            "last_metrics": last, "env_transitions": hosts.total(self.world.env.steps)}

  async def _collect(self, i: int, params, key) -> rollout.Episodes:
    """This process's rows (``hosts.process_rows``) of RL batch ``i``'s episodes."""
    pairs = rollout.sample_pairs(self.world.train_pairs, self.job.rl.batch_size, self.job.seed, i)
    return await rollout.collect(self.world, self.featurizer, self.policy_fn(params), pairs,
                                 jax.random.fold_in(jax.random.fold_in(key, 2), i),
                                 reward=self.job.reward, writes=self.learner.writes,
                                 rows=self.rows)

  def _learn(self, state: dict, episodes: rollout.Episodes):
    out = self.learner.rl_step(state["params"], state["opt_state"], state["ref_params"],
                               episodes.batch(), global_rows=self.job.rl.batch_size)
    return jax.block_until_ready(out)

  def _episode_metrics(self, episodes: rollout.Episodes) -> dict[str, float]:
    """Means over the global batch's episodes (every process's rows)."""
    n = self.job.rl.batch_size
    g = {k: hosts.gather_rows(getattr(episodes, k), self.rows, n)
         for k in ("reward", "utility", "distance", "preference")}
    return {"reward": g["reward"].mean(), "final_utility": g["utility"][:, -1].mean(),
            "anchor_utility": g["utility"][:, 0].mean(),
            "final_distance": g["distance"][:, -1].mean(),
            "final_preference": g["preference"][:, -1].mean()}

  async def _rl_loop(self, state, step, key, writer, progress, save, stop_if_preempted):
    overlap = self.job.rl.overlap
    i = step - self.ref_steps
    last: dict[str, Any] = {}
    if i >= self.rl_steps:
      return state, step, last
    pending = asyncio.ensure_future(self._collect(i, state["behaviour_params"], key))
    trace = range(self.job.profile_start, self.job.profile_start + self.job.profile_steps)
    tracing = False
    while i < self.rl_steps:
      if i == trace.start:
        jax.profiler.start_trace(os.path.join(self.workdir, "profile"))
        tracing = True
      t0 = time.perf_counter()
      episodes = await pending
      t_env = time.perf_counter() - t0
      old_params = state["params"]
      if overlap and i + 1 < self.rl_steps:  # collect step i+1 with theta_i while step i trains
        pending = asyncio.ensure_future(self._collect(i + 1, old_params, key))
        if hosts.is_multiprocess():
          # Collection runs collectives (acting on all processes' states): with two programs in
          # flight, processes could launch them in different orders. Same episodes, no overlap.
          await asyncio.wait([pending])
      t0 = time.perf_counter()
      params, opt, m = await asyncio.to_thread(self._learn, state, episodes)
      t_learn = time.perf_counter() - t0
      behaviour = old_params if overlap else params
      state = dict(state, params=params, opt_state=opt, behaviour_params=behaviour)
      i += 1
      step += 1
      if not overlap and i < self.rl_steps:
        pending = asyncio.ensure_future(self._collect(i, params, key))
      last = writer.write(step, {
          **m, **self._episode_metrics(episodes),
          "env_seconds": t_env, "learner_seconds": t_learn,
          "env_transitions": hosts.total(self.world.env.steps),
          **{k: hosts.total(v) for k, v in cache_stats(self.world).items()}}, phase="rl")
      progress.update(1, {**last, "loss": last["total"]})
      if tracing and (i not in trace or i == self.rl_steps):
        jax.profiler.stop_trace()
        tracing = False
        logging.info("agent %s: profile of RL steps %s in %s/profile", self.kind.name,
                     list(trace), self.workdir)
      save(step, state)
      stop_if_preempted(step, state, pending)
    return state, step, last


def check_prepared(workdir: str) -> None:
  """A multi-process run restores a prepared world: every process would otherwise train WALS and
  E_D into the same folders at once.

  Raises:
    ConfigError: several processes and no ``<workdir>/world.json``.
  """
  if hosts.is_multiprocess() and not paths.exists(os.path.join(workdir, "world.json")):
    raise training.ConfigError(
        f"{workdir}: a multi-process run restores a prepared world, and this workdir has none "
        "(no world.json); build it once on one process with `python -m launch.train "
        "--prepare_only` and the same --config and --workdir, then start every process")


def run(config, workdir: str, *, world: World | None = None) -> dict[str, Any]:
  """Trains one agent per ``config.reference.kinds`` in ``workdir`` (resuming each)."""
  import json  # noqa: PLC0415

  from eagle_jax.agent.world import build_world  # noqa: PLC0415

  training.check_workdir(workdir)
  if config.distributed:
    hosts.initialize()  # a no-op when the launcher started it (its coordinator flags)
  mesh = training.build_mesh(config.mesh)
  job = validate(config, mesh)
  if world is None:
    check_prepared(workdir)
  t0 = time.perf_counter()
  world = world or build_world(config, workdir)
  world_seconds = time.perf_counter() - t0
  summary = {"world_seconds": world_seconds, "agents": {},
             "code_version": run_config.code_version(), "config": run_config.to_dict(config)}
  for kind in job.kinds:
    summary["agents"][kind.name] = AgentTrainer(job, world, workdir, kind, mesh).train()
  summary["env_transitions"] = hosts.total(world.env.steps)
  summary["env_parse_failures"] = hosts.total(world.env.parse_failures)
  summary["seconds"] = time.perf_counter() - t0
  if jax.process_index() == 0:
    paths.write_text(os.path.join(workdir, "train_summary.json"),
                     json.dumps(summary, indent=2, default=float))
  return summary
