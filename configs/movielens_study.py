"""The paper's world at a size that can test transfer to new anchors on 2 CPU cores.

Run (one world per action space, the rows of the paper's Table 4; the default row is also the
Table 2 run, with the ELM baseline from an ``elm_ml100k.py:implicit`` run):

  python -m launch.train_elm --config=configs/elm_ml100k.py:implicit --workdir=runs/elm
  python -m launch.main --config=configs/movielens_study.py --workdir=runs/study \
      --config.eval.elm_workdir=runs/elm
  python -m launch.main --config=configs/movielens_study.py:no_personal --workdir=runs/study_np
  python -m launch.main --config=configs/movielens_study.py:macro --workdir=runs/study_macro
  python -m launch.main --config=configs/movielens_study.py:combined --workdir=runs/study_comb

The smoke run's settings (``movielens_smoke.py``) with the paper's world (PAPER_SPEC.md 1.5, 1.6):
states are descriptions (plot, five reasons to like, five to dislike), profiles are LLM-written
under the paper's headings, each anchor's K actions are half personalised to a randomly drawn
profile. 40 training and 12 held-out anchors (the held-out ones never seen in training), K = 10,
H = 2; the depth-2 tree (K + K^2 = 110 transitions per anchor) is computed up front.
"""

import ml_collections

from configs import movielens_smoke

VARIANTS = ("", "default", "no_personal", "macro", "combined")


def get_config(variant: str = "") -> ml_collections.ConfigDict:
  """The study; ``variant``: the action space of Table 4 ("" / "default", "no_personal",
  "macro", "combined")."""
  if variant not in VARIANTS:
    raise ValueError(f"configs/movielens_study.py:{variant}: unknown variant; expected one of "
                     f"{VARIANTS[1:]}")
  config = movielens_smoke.get_config()
  # float32 environment LLM: the recorded runs (results/study, their response caches) decoded in
  # float32, and the precision is part of the cache identity.
  for llm in (config.llm, config.eval.transfer.llm, config.eval.rater.llm):
    llm.precision = "float32"
  # float32 E_D fine-tuning, as the recorded runs trained it.
  config.encoder.finetune.precision = "float32"
  # Anchors: 40 for training, 12 held out (new anchors), from the 200 most rated movies.
  config.world.anchor_pool = 200
  config.world.num_train_anchors = 40
  config.world.num_heldout_anchors = 12
  # Users: every one gets an LLM profile (5 requests each).
  config.world.num_train_users = 64
  config.world.num_heldout_users = 24
  # The world is the smoke run's default, the paper's (movielens_smoke.paper_world): description
  # states with 5 + 5 reasons, LLM profiles under the paper's headings, personalised action sets.
  # E_D also trains on descriptions: the 52 anchors' and 60 more movies' (about 12 held out by E_D).
  config.world.ed_descriptions = 60
  # K = 10 candidates per anchor, half personalised to a randomly drawn profile.
  config.actions.k = 10
  config.actions.llm_calls = 4
  # Horizon 2 and the whole depth-2 tree computed before training.
  config.rl.horizon = 2
  config.env.prefetch_depth = 2
  # Evaluation: every held-out pair, 4 sampled episodes each.
  config.eval.max_pairs = 0
  config.eval.samples = 4
  if variant == "no_personal":
    # Table 4 row 2: no personalised actions.
    config.actions.personalised = False
  elif variant == "macro":
    # Table 4 row 3: K macro actions (tuples of 3 applied in one step), H = 1.
    config.actions.space = "macro"
    config.actions.macro_size = 3
    config.rl.horizon = 1
    config.env.prefetch_depth = 1
  elif variant == "combined":
    # Table 4 row 4: 5 single actions and 5 macro actions of 3 (K stays 10).
    config.actions.space = "combined"
    config.actions.macro_size = 3
    config.actions.macro_k = 5
  return config
