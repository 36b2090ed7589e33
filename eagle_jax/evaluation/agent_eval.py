"""Evaluation of trained EAGLE agents on held-out (user, anchor) pairs, from their checkpoints.

Two held-out splits (``World.heldout_pairs``): ``new_users`` (held-out users on the training anchors)
and ``new_anchors`` (held-out users on held-out anchor movies with their own candidate actions). For
every policy the report gives, over a split's pairs:

* ``gain``: U(E_D(x_H)) - U(E_D(x_0)) for the pair's user, the utility of the final description over
  the anchor's, averaged over ``eval.samples`` sampled episodes per pair (greedy policies: one);
  mean with a normal-approximation confidence interval across pairs;
* ``fraction_improved``: share of episodes whose final utility beats the anchor's;
* ``final_distance``: summed distance of x_H to its 3 nearest existing items (novelty), and
  ``final_preference`` <z_u, E_D(x_H)>;
* paired differences (same pairs) of each trained agent against the random-action baseline and
  against its own untrained reference policy, with confidence intervals;
* ``anchor_bootstrap``: the gains and the differences again with intervals from a bootstrap over
  the split's anchors (``intervals.anchor_bootstrap``), the honest interval when few anchors are
  evaluated;
* ``by_anchor_rating``: the same over the pairs whose anchor's mean MovieLens rating is at most the
  median of the split's anchors (``low``: the paper's poorly rated anchors) and above it
  (``high``), with anchor-bootstrap intervals; ``final_utility`` (raw U(z) of x_H) sits beside
  every gain;
* ``tables``: the paper's Table 2 per split (``tables.table2``: random, references, agents, ELM
  baseline, anchor-bootstrap intervals; the AI rater's scores as columns when it ran), also
  written as ``tables.md``.

Policies: ``random`` (uniform over candidates), ``reference[kind]`` (the reference network before RL,
sampled), ``agent[kind]`` (after RL, sampled) and ``agent[kind]/greedy``; with
``eval.elm_workdir``, also ``elm_baseline`` (the paper's ELM baseline: the utility optimum of Z near
the anchor decoded by a trained ELM), compared pairwise with every agent. Plots: mean gain with
intervals per policy, and mean utility along the episode, one pair of PNGs per split.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
from typing import Any

import jax
import numpy as np

from eagle_jax import checks, paths, run_config, training
from eagle_jax.agent import agent_model, rollout
from eagle_jax.agent.trainer import AgentTrainer, Job, validate
from eagle_jax.agent.world import World, build_world
from eagle_jax.evaluation import rater as rater_lib
from eagle_jax.evaluation import tables
from eagle_jax.evaluation.intervals import anchor_bootstrap, mean_ci


@dataclasses.dataclass(frozen=True)
class EvalConfig:
  """``config.eval``'s fields the evaluation loop reads, checked once (``from_config``).

  Attributes:
    samples: sampled episodes per held-out pair and stochastic policy (greedy policies: one).
    seed: seed of the evaluation's action draws.
    confidence: level of the normal-approximation intervals, in (0, 1).
    trajectories: example trajectories of the main agent in the report.
    elm_workdir: an ELM run folder for the ELM baseline ("": no baseline).
    max_pairs: held-out pairs evaluated per split, a sample seeded by ``seed`` (0: all).
  """

  samples: int
  seed: int
  confidence: float
  trajectories: int
  elm_workdir: str
  max_pairs: int = 0

  @classmethod
  def from_config(cls, eval_config) -> EvalConfig:
    """Raises ``ConfigError`` naming the ``config.eval`` field that is out of range."""
    e = eval_config
    checks.check_numbers(e, [
        ("samples", dict(integer=True, lo=1)), ("seed", dict(integer=True, lo=0)),
        ("confidence", dict(lo=0.0, hi=1.0, lo_open=True, hi_open=True)),
        ("trajectories", dict(integer=True, lo=0)), ("elm_steps", dict(integer=True, lo=1)),
        ("elm_lr", dict(lo=0.0, lo_open=True)), ("max_pairs", dict(integer=True, lo=0))],
        prefix="config.eval")
    if e.elm_workdir:
      checks.check_input_path(e.elm_workdir, "config.eval.elm_workdir", kind="dir")
    out = cls(samples=int(e.samples), seed=int(e.seed), confidence=float(e.confidence),
              trajectories=int(e.trajectories), elm_workdir=str(e.elm_workdir or ""),
              max_pairs=int(e.get("max_pairs", 0)))
    return out


def sample_heldout(world: World, ev: EvalConfig) -> World:
  """``world`` with at most ``ev.max_pairs`` held-out pairs per split (a sample seeded by
  ``ev.seed``, in the split's order); every policy is then evaluated on the same pairs."""
  if not ev.max_pairs:
    return world
  pairs = {}
  for i, (split, p) in enumerate(sorted(world.heldout_pairs.items())):
    keep = np.random.default_rng([ev.seed, i]).permutation(len(p))[:ev.max_pairs]
    pairs[split] = p[np.sort(keep)]
  return dataclasses.replace(world, heldout_pairs=pairs)


async def _episodes(world, featurizer, policy, pairs, key, samples: int, greedy: bool,
                    writes: bool = False) -> rollout.Episodes:
  rep = np.repeat(pairs, 1 if greedy else samples, axis=0)
  return await rollout.collect(world, featurizer, policy, rep, key, reward="gain", greedy=greedy,
                               writes=writes)


def _summary(ep: rollout.Episodes, n_pairs: int, confidence: float) -> dict[str, Any]:
  per = ep.reward.reshape(n_pairs, -1).mean(1)
  return {
      "gain": mean_ci(per, confidence),
      "gain_per_pair": per.tolist(),
      "fraction_improved": float(np.mean(ep.utility[:, -1] > ep.utility[:, 0])),
      "final_utility": float(ep.utility[:, -1].mean()),
      "anchor_utility": float(ep.utility[:, 0].mean()),
      "final_distance": float(ep.distance[:, -1].mean()),
      "anchor_distance": float(ep.distance[:, 0].mean()),
      "final_preference": float(ep.preference[:, -1].mean()),
      "utility_by_step": ep.utility.mean(0).tolist(),
  }


SPLITS = ("new_users", "new_anchors")


def elm_baseline(config, world: World, pairs: np.ndarray, elm) -> dict[str, Any]:
  """The paper's ELM baseline on the same (user, anchor) pairs as the agents.

  Projected gradient ascent on U from the anchor's item vector (``elm_baseline``), the optimum
  decoded by a trained ELM, and the decoded text scored like an agent's final description:
  U(E_D(text)) - U(E_D(anchor plot)). ``latent_gain`` is U(z*) - U(z_anchor) before decoding (what
  the ascent promised; the gap to ``gain`` is what is lost going back to text).
  """
  from eagle_jax.evaluation import elm_baseline as baseline  # noqa: PLC0415

  items = np.asarray(world.env.item_table)
  users, anchors = pairs[:, 0], pairs[:, 1]
  zu = world.env.user_table[users]
  lam, k = float(config.utility.lam), int(config.utility.k)
  z_star, texts = baseline.decode_utility_optimum(elm, zu, items[anchors], items, lam=lam, k=k,
                                                  steps=int(config.eval.elm_steps),
                                                  lr=float(config.eval.elm_lr))
  final = world.env.text_utility(texts, users)
  start = world.env.text_utility([world.anchors[int(i)].state for i in anchors], users)
  gain = final["utility"] - start["utility"]
  latent = (baseline.utilities(z_star, zu, items, lam=lam, k=k)
            - baseline.utilities(items[anchors], zu, items, lam=lam, k=k))
  conf = float(config.eval.confidence)
  return {
      "gain": mean_ci(gain, conf), "gain_per_pair": gain.tolist(),
      "latent_gain": mean_ci(latent, conf),
      "fraction_improved": float(np.mean(gain > 0)),
      "final_utility": float(final["utility"].mean()),
      "anchor_utility": float(start["utility"].mean()),
      "final_distance": float(final["distance"].mean()),
      "anchor_distance": float(start["distance"].mean()),
      "final_preference": float(final["preference"].mean()),
      "utility_by_step": [float(start["utility"].mean()), float(final["utility"].mean())],
      "samples": [{"user": int(u), "anchor": world.anchors[int(i)].title, "text": t}
                  for (u, i), t in list(zip(pairs, texts))[:3]],
  }


def _load_elm(config, world: World):
  """The trained ELM of ``config.eval.elm_workdir``, checked to live in the world's latent space."""
  from eagle_jax.elm import job as elm_job  # noqa: PLC0415

  path = config.eval.elm_workdir
  report = os.path.join(path, "encoder", "report.json")
  if not paths.exists(report):
    raise training.ConfigError(f"config.eval.elm_workdir={path!r}: no ELM run there "
                               f"({report} missing)")
  emb = json.loads(paths.read_text(report))["embeddings"]
  with paths.open_file(emb, "rb") as f, np.load(f, allow_pickle=False) as z:
    theirs = np.asarray(z["item_factors"])
  ours = np.asarray(world.env.item_table)[:, : theirs.shape[1]]
  if theirs.shape[0] != ours.shape[0] or not np.allclose(theirs, ours, atol=1e-4):
    raise training.ConfigError(
        f"config.eval.elm_workdir={path!r}: the ELM was trained on other WALS factors ({emb}) "
        "than this run's latent space; train both with the same config.wals")
  return elm_job.load_elm(path)


def _split_report(job: Job, episodes: dict[str, rollout.Episodes], pairs: np.ndarray,
                  conf: float, extra: dict[str, Any] | None = None,
                  ratings: np.ndarray | None = None) -> dict[str, Any]:
  """One split's report. pairs: [P, 2] (user, anchor item); ratings: [P] the mean rating of each
  pair's anchor (None: no ``by_anchor_rating`` block)."""
  n_pairs, items = len(pairs), np.asarray(pairs)[:, 1]
  results = {name: _summary(ep, n_pairs, conf) for name, ep in episodes.items()}
  results.update(extra or {})
  gains = {name: np.asarray(r["gain_per_pair"]) for name, r in results.items()}
  diffs = {}
  for kind in (k.name for k in job.kinds):
    for other in ("random", f"reference[{kind}]") + (("elm_baseline",) if extra else ()):
      diffs[f"agent[{kind}] - {other}"] = gains[f"agent[{kind}]"] - gains[other]
  comparisons = {name: mean_ci(d, conf) for name, d in diffs.items()}
  boot = lambda x, mask=slice(None): anchor_bootstrap(x[mask], items[mask], conf)
  main = job.main.name
  report = {"pairs": n_pairs, "anchors": int(len(np.unique(items))), "policies": results,
            "comparisons": comparisons,
            "anchor_bootstrap": {"gain": {n: boot(g) for n, g in gains.items()},
                                 "comparisons": {n: boot(d) for n, d in diffs.items()}},
            "headline": {
                "agent_gain": results[f"agent[{main}]"]["gain"],
                "random_gain": results["random"]["gain"],
                "reference_gain": results[f"reference[{main}]"]["gain"],
                "agent_minus_random": comparisons[f"agent[{main}] - random"],
                "agent_minus_reference": comparisons[f"agent[{main}] - reference[{main}]"],
                "agent_final_utility": results[f"agent[{main}]"]["final_utility"],
                "random_final_utility": results["random"]["final_utility"],
                "agent_minus_random_anchors": boot(diffs[f"agent[{main}] - random"]),
                "agent_minus_reference_anchors": boot(diffs[f"agent[{main}] - reference[{main}]"]),
            }}
  if ratings is not None:
    ratings = np.asarray(ratings, np.float64)
    threshold = float(np.median(np.unique(np.stack([items, ratings], 1), axis=0)[:, 1]))
    report["by_anchor_rating"] = {"threshold": threshold}
    for half, mask in (("low", ratings <= threshold), ("high", ratings > threshold)):
      if mask.any():
        report["by_anchor_rating"][half] = {
            "pairs": int(mask.sum()), "anchors": int(len(np.unique(items[mask]))),
            "gain": {n: boot(g, mask) for n, g in gains.items()},
            "comparisons": {n: boot(d, mask) for n, d in diffs.items()}}
  return report


def _ratings(world: World, pairs: np.ndarray) -> np.ndarray:
  """[P] mean MovieLens rating of each pair's anchor."""
  return np.asarray([world.anchors[int(i)].mean_rating for i in np.asarray(pairs)[:, 1]])


async def _policy_episodes(world: World, job: Job, states: dict[str, Any], ev: EvalConfig,
                           key: jax.Array, progress) -> dict[str, dict[str, rollout.Episodes]]:
  """Episodes of every policy on both held-out splits in ``world`` (its environment LLM)."""
  featurizer = agent_model.featurizer(job.policy, world, job.horizon)
  episodes: dict[str, dict[str, rollout.Episodes]] = {s: {} for s in SPLITS}
  for j, ref in enumerate(job.kinds):
    kind, (trainer, state) = ref.name, states[ref.name]
    for name, params, greedy in ((f"reference[{kind}]", state["ref_params"], False),
                                 (f"agent[{kind}]", state["params"], False),
                                 (f"agent[{kind}]/greedy", state["params"], True)):
      for split in SPLITS:
        episodes[split][name] = await _episodes(
            world, featurizer, trainer.policy_fn(params), world.heldout_pairs[split],
            jax.random.fold_in(key, 1 + j), ev.samples, greedy, trainer.learner.writes)
        progress.update(1)
  for split in SPLITS:
    episodes[split]["random"] = await _episodes(world, featurizer, None,
                                                world.heldout_pairs[split], key, ev.samples, False)
    progress.update(1)
  return episodes


def evaluate(config, job: Job, ev: EvalConfig, workdir: str, world: World, *, mesh
             ) -> dict[str, Any]:
  """Runs every policy on both held-out splits; writes ``report.json`` and PNG plots.

  The folder is ``run_config.eval_dir``: ``<workdir>/eval`` under the evaluation settings the
  workdir was made with, ``eval-<hash>`` beside it under others. The report carries the config and
  the code version that produced it. With ``config.eval.transfer.enabled`` every policy runs again
  with another environment LLM (``transfer.py``; section ``transfer``); with
  ``config.eval.rater.enabled`` an AI rater answers the paper's pairwise questions about the
  episodes (``rater.py``; section ``rater``).

  Args:
    config: the run config (``eval`` for this loop, ``utility`` for the ELM baseline).
    job: the validated job (``trainer.validate``): reference kinds, main kind, horizon.
    ev: the validated ``config.eval`` (``EvalConfig.from_config``).
    workdir: the run folder holding ``agents/<kind>``.
    world: the run's world.
    mesh: the device mesh ``job`` was validated for.
  """
  from eagle_jax.evaluation import transfer  # noqa: PLC0415

  key = jax.random.key(ev.seed)
  world = sample_heldout(world, ev)
  out_dir = run_config.eval_dir(config, workdir)
  paths.makedirs(out_dir)
  tcfg = transfer.TransferConfig.from_config(config.eval.transfer)
  rcfg = rater_lib.RaterConfig.from_config(config.eval.rater)
  steps: dict[str, int] = {}
  states: dict[str, Any] = {}
  for ref in job.kinds:
    trainer = AgentTrainer(job, world, workdir, ref, mesh)
    step, state, _ = trainer.restore()
    steps[ref.name] = int(step)
    states[ref.name] = (trainer, state)
  # One unit per (policy, split) episode batch (3 policies per agent and the random one) per
  # environment, and one per split for the ELM baseline.
  per_env = (3 * len(job.kinds) + 1) * len(SPLITS)
  progress = training.Progress(per_env * (1 + tcfg.enabled) + bool(ev.elm_workdir) * len(SPLITS),
                               desc="evaluate")
  extra = {s: {} for s in SPLITS}
  transfer_report = None
  try:
    episodes = asyncio.run(_policy_episodes(world, job, states, ev, key, progress))
    if ev.elm_workdir:
      elm = _load_elm(config, world)
      for s in SPLITS:
        extra[s]["elm_baseline"] = elm_baseline(config, world, world.heldout_pairs[s], elm)
        progress.update(1)
    if tcfg.enabled:
      test_world = transfer.open_world(config, tcfg, world, workdir)
      try:
        t_episodes = asyncio.run(_policy_episodes(test_world, job, states, ev, key, progress))
        t_splits = {s: _split_report(job, t_episodes[s], world.heldout_pairs[s], ev.confidence)
                    for s in SPLITS}
        transfer_report = transfer.report(world, test_world, episodes, t_episodes, t_splits,
                                          ev.confidence, mean_ci)
      finally:
        asyncio.run(test_world.llm.aclose())
  finally:
    progress.close()
  splits = {s: _split_report(job, episodes[s], world.heldout_pairs[s], ev.confidence, extra[s],
                             _ratings(world, world.heldout_pairs[s]))
            for s in SPLITS}
  main = job.main.name
  trajectories = []
  for split in SPLITS:
    ep = episodes[split][f"agent[{main}]/greedy"]
    actions = ep.action_texts(world)
    for b in range(min(ev.trajectories // len(SPLITS), len(ep.pairs))):
      u, i = (int(x) for x in ep.pairs[b])
      trajectories.append({
          "split": split, "user": u, "profile": world.profiles[u],
          "anchor": world.anchors[i].title,
          "steps": [{"description": ep.texts[b][t], "utility": float(ep.utility[b, t]),
                     "action": actions[b][t] if t < len(actions[b]) else None}
                    for t in range(len(ep.texts[b]))]})
  report = {
      "samples_per_pair": ev.samples, "confidence": ev.confidence,
      "checkpoint_steps": steps, "main_reference": main, "splits": splits,
      "trajectories": trajectories,
      "env": {"model": world.llm.model_name, "transitions": world.env.steps,
              "parse_failures": world.env.parse_failures},
      "code_version": run_config.code_version(), "config": run_config.to_dict(config),
  }
  if transfer_report is not None:
    report["transfer"] = transfer_report
  if rcfg.enabled:
    report["rater"] = rate(config, rcfg, world, episodes, ev, workdir)
  report["tables"] = {"table2": {s: tables.table2(splits[s], tables.rater_split(report, s))
                                for s in SPLITS}}
  report_path = os.path.join(out_dir, "report.json")
  report["path"] = report_path
  if jax.process_index() == 0:  # every process of a multi-process run computes the same report
    paths.write_text(report_path, json.dumps({k: v for k, v in report.items() if k != "path"},
                                             indent=2))
    paths.write_text(os.path.join(out_dir, "tables.md"), "\n\n".join(
        f"Table 2, {split} (anchor-bootstrap {ev.confidence:.0%} intervals)\n\n"
        + tables.table2_markdown(splits[split], tables.rater_split(report, split))
        for split in SPLITS)
        + "\n")
    for split in SPLITS:
      _plots(splits[split]["policies"], out_dir, split)
  return report


def rate(config, rcfg: rater_lib.RaterConfig, world: World,
         episodes: dict[str, dict[str, rollout.Episodes]], ev: EvalConfig, workdir: str
         ) -> dict[str, Any]:
  """The AI rater's section of the report (``rater.py``) over a seeded sample of held-out pairs.

  Each rated pair contributes its first sampled episode per policy (the greedy one for greedy
  policies); the distance question compares it with the random policy's episode of the same pair
  and sample index. The rater is ``config.eval.rater.llm`` (the environment LLM's stack is reused
  when the block equals ``config.llm``)."""
  from eagle_jax.env import stack  # noqa: PLC0415

  for split in SPLITS:
    unknown = [p for p in rcfg.policies if p not in episodes[split]]
    if unknown:
      raise training.ConfigError(f"config.eval.rater.policies: unknown {unknown}; this run's "
                                 f"policies are {sorted(episodes[split])}")
  same = run_config.to_dict(config.eval.rater.llm) == run_config.to_dict(config.llm)
  llm = world.llm if same else stack.open_llm(
      config.eval.rater.llm, os.path.join(workdir, "env", "rater_cache.jsonl"),
      field="config.eval.rater.llm")
  rng = np.random.default_rng(rcfg.seed)
  out: dict[str, Any] = {"model": llm.model_name, "splits": {}}
  try:
    for split in SPLITS:
      pairs = world.heldout_pairs[split]
      pick = np.sort(rng.choice(len(pairs), size=min(rcfg.pairs, len(pairs)), replace=False))
      out["splits"][split] = asyncio.run(_rate_split(world, llm.client, rcfg, episodes[split],
                                                     pick, len(pairs), ev.confidence))
  finally:
    if not same:
      asyncio.run(llm.aclose())
  return out


async def _rate_split(world: World, client, rcfg: rater_lib.RaterConfig,
                      episodes: dict[str, rollout.Episodes], pick: np.ndarray, n_pairs: int,
                      confidence: float) -> dict[str, Any]:
  """One split's rater blocks; ``pick``: [N] indices of the rated pairs among ``n_pairs``."""

  def rows(ep: rollout.Episodes) -> np.ndarray:  # each picked pair's first episode
    return pick * (len(ep.pairs) // n_pairs)

  rand = episodes["random"]
  rr = rows(rand)
  anchors = [rand.texts[r][0] for r in rr]
  profiles = [world.profiles[int(u)] for u in rand.pairs[rr, 0]]
  z_anchor = world.env.embed(anchors)
  rand_final = [rand.texts[r][-1] for r in rr]
  rand_shift = np.linalg.norm(world.env.embed(rand_final) - z_anchor, axis=-1)
  blocks, items_all = [], []
  for name in rcfg.policies:
    ep = episodes[name]
    r = rows(ep)
    finals = [ep.texts[i][-1] for i in r]
    shift = np.linalg.norm(world.env.embed(finals) - z_anchor, axis=-1)
    for q in rcfg.questions:
      if q == "distance" and name == "random":
        continue
      items = rater_lib.build_items(q, anchors=anchors, variants=finals, randoms=rand_final,
                                    profiles=profiles, variant_utility=ep.utility[r, -1],
                                    anchor_utility=ep.utility[r, 0], variant_shift=shift,
                                    random_shift=rand_shift)
      blocks.append((q, name, len(items_all), len(items)))
      items_all.extend(items)
  letters = await rater_lib.ask(client, items_all, max_tokens=rcfg.max_tokens, seed=rcfg.seed)
  out: dict[str, Any] = {"pairs": int(len(pick)), "questions": {}}
  for q, name, start, n in blocks:
    out["questions"].setdefault(q, {})[name] = rater_lib.summarise(
        items_all[start:start + n], letters[start:start + n], confidence, mean_ci)
  return out


def _plots(results: dict[str, Any], out_dir: str, split: str) -> None:
  import matplotlib  # noqa: PLC0415

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # noqa: PLC0415

  names = list(results)
  means = [results[n]["gain"]["mean"] for n in names]
  lo = [results[n]["gain"]["mean"] - results[n]["gain"]["ci_low"] for n in names]
  fig, ax = plt.subplots(figsize=(8, 4))
  ax.barh(names, means, xerr=lo, color=["tab:gray" if n == "random" else "tab:blue" for n in names])
  ax.axvline(0.0, color="black", lw=0.8)
  ax.set_xlabel(f"utility gain over the anchor (held-out pairs: {split})")
  fig.tight_layout()
  with paths.open_file(os.path.join(out_dir, f"gain_{split}.png"), "wb") as f:
    fig.savefig(f, format="png", dpi=120)
  plt.close(fig)
  fig, ax = plt.subplots(figsize=(6, 4))
  for n in names:
    ax.plot(results[n]["utility_by_step"], marker="o", label=n)
  ax.set_xlabel("step t")
  ax.set_ylabel("mean utility U(E_D(x_t))")
  ax.legend(fontsize=7)
  fig.tight_layout()
  with paths.open_file(os.path.join(out_dir, f"utility_by_step_{split}.png"), "wb") as f:
    fig.savefig(f, format="png", dpi=120)
  plt.close(fig)


def run(config, workdir: str, world=None) -> dict:
  """Evaluates the agents of ``workdir`` (``world``: reuse an already built world)."""
  if not workdir or not paths.isdir(os.path.join(workdir, "agents")):
    raise training.ConfigError(f"--workdir={workdir!r} holds no trained agents (agents/ missing)")
  mesh = training.build_mesh(config.mesh)
  job = validate(config, mesh)
  ev = EvalConfig.from_config(config.eval)
  world = world or build_world(config, workdir)
  report = evaluate(config, job, ev, workdir, world, mesh=mesh)
  for split in SPLITS:
    h = report["splits"][split]["headline"]
    print(f"[evaluate] {split}: {report['splits'][split]['pairs']} held-out pairs, "
          f"agent[{report['main_reference']}] gain {h['agent_gain']['mean']:+.4f} "
          f"[{h['agent_gain']['ci_low']:+.4f}, {h['agent_gain']['ci_high']:+.4f}] vs random "
          f"{h['random_gain']['mean']:+.4f}, untrained reference "
          f"{h['reference_gain']['mean']:+.4f}", flush=True)
  print(f"[evaluate] report in {report['path']}", flush=True)
  return report
