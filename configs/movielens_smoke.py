"""EAGLE CPU smoke run (the embedded default): MovieLens-100K, SmolLM2 environment, MiniLM E_D.

Run: ``python -m launch.train --config=configs/movielens_smoke.py --workdir=runs/smoke`` then
``python -m launch.evaluate --workdir=runs/smoke`` (``python -m launch.main`` does both). Override any
field with ``--config.rl.steps=60`` etc.

Sized for 2 CPU cores (timings: README, Quick start): the cost is the environment LLM writing the
world (descriptions, profiles, action sets and transitions), so the smoke keeps it small: K = 5
candidates, horizon H = 2 (the paper and ``movielens_25m.py``: H = 5), 5 train and 3 held-out
anchors, K + K^2 = 30 transitions each, computed up front (``env.prefetch_depth``) and replayed
from the response cache by training.
Every choice the papers leave open is recorded next to its field.

The world is the paper's (``paper_world``, applied last): states are descriptions (plot, five
reasons to like, five to dislike), profiles are LLM-written under the paper's headings, half of each
anchor's action set is personalised to a randomly drawn profile, E_D also trains on descriptions.
The fields below are written for the fast plot-only world, ``configs/movielens_smoke.py:plot``
(two-sentence plot states, template profiles, generic actions, E_D on metadata), which
``paper_world`` then overrides. ``:paper`` names the default. ``configs/movielens_smoke.py:gemma3``
is the plot-only run with Gemma 3 270M (base) as the environment LLM, e.g. for environment
transfer in the other direction (``--config.eval.transfer.enabled=True`` tests it with SmolLM2);
``:lm`` is the plot-only run with a language-model agent.
"""

import ml_collections

from configs import encoder_ml100k, wals_ml100k
from configs.env_blocks import actions_config, descriptions_config, llm_config, profiles_config

VARIANTS = ("", "paper", "plot", "gemma3", "lm")


def get_config(variant: str = "") -> ml_collections.ConfigDict:
  """The smoke run in the paper's world; ``variant``: "plot" (the plot-only world), "gemma3"
  (plot-only, Gemma 3 environment), "lm" (plot-only, language-model agent); "paper" = ""."""
  if variant not in VARIANTS:
    raise ValueError(f"configs/movielens_smoke.py:{variant}: unknown variant; expected one of "
                     f"{VARIANTS[1:]} or none")
  config = ml_collections.ConfigDict()
  # Seed of parameters, pair sampling and action draws.
  config.seed = 0
  # Write TensorBoard event files next to metrics.jsonl.
  config.tensorboard = True
  # Call jax.distributed.initialize() first (multi-host TPU pods).
  config.distributed = False
  # Mesh over ("data", "fsdp", "tensor"); -1 takes the remaining devices.
  config.mesh = ml_collections.ConfigDict(dict(data=-1))
  # Persistent XLA compilation cache folder, relative to the workdir or absolute ("" off), set by
  # the launchers: identical programs compile once per folder (the agents' shared steps, reruns,
  # resumes and every host).
  config.compilation_cache = "xla_cache"
  # jax.profiler trace of RL steps [start, start + steps) into <workdir>/agents/<kind>/profile
  # (TensorBoard's profile plugin / Perfetto); start = -1: no trace.
  config.profile = ml_collections.ConfigDict(dict(start=-1, steps=3))

  # Behavioural latent space: the paper's implicit-feedback WALS on ML-100K (rank 4, time split).
  config.wals = wals_ml100k.get_config("implicit")
  # E_D: MiniLM fine-tuned with a linear head onto the augmented WALS item vectors (metadata text).
  config.encoder = encoder_ml100k.get_config("implicit")
  # ... fine-tuned in mixed precision: bf16 operands of MiniLM's dense products, forward and
  # backward, summed in float32 (this CPU job's bf16 matrix units; E_D infers the same way).
  config.encoder.finetune.precision = "mixed"

  # The environment LLM (eagle_jax/env/stack.py; the same block in every job's config). Decode
  # batches of up to 64 rows (a call's last chunk padded to 16, 32 or 64): one step reads every
  # weight once for all its rows. "mixed" precision: bf16 weights and matmul operands, float32
  # activations (this CPU job's matmuls run on bf16 units where the cores have them).
  config.llm = llm_config(batch_buckets=(16, 32, 64), precision="mixed")

  config.env = ml_collections.ConfigDict()
  # Sampling of a transition (rewritten plot): greedy, so a transition is a function of (state,
  # action); the repetition penalty and no-repeat n-grams keep the 135M model from looping.
  config.env.sampling = ml_collections.ConfigDict(dict(
      max_tokens=40, temperature=0.0, repetition_penalty=1.2, no_repeat_ngram=3, seed=0))
  # Sentences kept of a rewritten plot (shorter states: shorter transition prompts; prefill
  # dominates on CPU).
  config.env.max_sentences = 2
  # A state is the anchor's "plot" (fast) or, as in the paper, its "description": plot plus the
  # descriptions block's reasons to like and dislike it (the environment rewrites the plot and keeps
  # the reasons, eagle_jax/agent/env.py).
  config.env.states = "plot"
  # Compute every state within this many steps of every anchor up front (0: lazily, as episodes
  # reach them). The smoke tree is small (K + K^2 per anchor); at scale leave it 0.
  config.env.prefetch_depth = 2
  # Most transition requests outstanding at once (sub-calls of <= 256; 0: each call's all at once).
  config.env.max_in_flight = 256
  # Environment answers the response cache keeps in memory, least recently used dropped (0: all;
  # every answer stays in env/cache.jsonl either way).
  config.env.cache_memory = 0

  # Anchor descriptions (eagle_jax/env/build.py): plot only here (n_reasons = 0), written like a
  # transition (greedy) and cut to the same length as rewritten plots.
  config.descriptions = descriptions_config(
      sampling=dict(temperature=0.0, repetition_penalty=1.2, no_repeat_ngram=3),
      plot_tokens=48, n_reasons=0, max_sentences=2, retries=0, fallback=True)
  # User profiles: "template" ("Loved: ...; Disliked: ...") or "llm"-written.
  config.profiles = profiles_config(kind="template", titles=3)

  config.world = ml_collections.ConfigDict()
  # Seed of the anchor and user draws.
  config.world.seed = 0
  # Anchors are drawn from the anchor_pool most-rated movies.
  config.world.anchor_pool = 100
  # Anchors of training episodes.
  config.world.num_train_anchors = 5
  # Anchors of held-out evaluation pairs (disjoint from train).
  config.world.num_heldout_anchors = 3
  # Users of training episodes.
  config.world.num_train_users = 32
  # Users of held-out pairs (disjoint from train).
  config.world.num_heldout_users = 16
  # Users need at least this many ratings to be drawn.
  config.world.min_user_ratings = 40
  # E_D's description rows: 0 = E_D on metadata text only; N > 0 = the anchors' descriptions and
  # N more movies' (about 20% of them in E_D's held-out movies), rows as the states read.
  config.world.ed_descriptions = 0
  # Texts whose features each memo (policy features, E_D outputs) keeps; least recently used are
  # dropped and encoded again when met (0: keep all).
  config.world.feature_memo = 100_000

  # K candidate actions per anchor, offered at every step (the paper: K = 100, new per state):
  # 3 LLM-written (categories in turn, varied by temperature), the rest from templates; generic
  # (not personalised to a profile).
  config.actions = actions_config(k=5, llm_calls=3, personalised=False,
                                  sampling=dict(max_tokens=32, temperature=0.9))
  # False: every state of an episode offers its anchor's set; True: every state gets its own set,
  # written on its text on first visit, as the paper does (eagle_jax/agent/action_book.py):
  # llm_calls more requests per distinct state visited before the horizon.
  config.actions.per_state = False

  config.utility = ml_collections.ConfigDict()
  # lambda of U(z) = <z_u, z> + lambda * sum_{3-NN} ||z - z_k|| (paper: unspecified). Rule: weigh
  # the two terms equally across the candidate actions of the training pairs. In this Z the
  # preference of next states spreads 0.176 (s.d.) and the summed 3-NN distance 0.097, so 1.8.
  config.utility.lam = 1.8
  # Nearest existing items in the novelty term (paper: 3).
  config.utility.k = 3
  # Terminal reward: "gain" = U(x_H) - U(x_0) (default), or "utility" = U(x_H).
  config.utility.reward = "gain"

  config.policy = ml_collections.ConfigDict()
  # The agent network: "head" (a pooled head over frozen text features, the fast CPU path) or
  # "lm_choice" (a LoRA-adapted decoder scoring the K candidates; the ":lm" variant).
  config.policy.kind = "head"
  # Width of the pooled head's projections and MLPs.
  config.policy.hidden = 128
  # Frozen text features the policy reads: "minilm" (shared with E_D) or "decoder" (SmolLM2's
  # mean-pooled final hidden states, the agent-as-LM reading; 576 wide).
  config.policy.backbone = "minilm"
  # Width of those features (MiniLM 384, SmolLM2 576; checked when the world is built).
  config.policy.text_dim = 384
  # The language-model policy (eagle_jax/agent/lm_policy.py), read when kind is "lm_choice".
  config.policy.lm = ml_collections.ConfigDict()
  # Agent decoder: a GGUF asset name or path, or a safetensors folder ("": config.llm.gguf).
  config.policy.lm.decoder = ""
  # Published decoder shapes for a dry run without weights (eagle_jax/models/configs.py PRESETS;
  # "": the decoder file's own shapes).
  config.policy.lm.shapes = ""
  # Chat template override of the agent's prompts ("": the decoder file's own).
  config.policy.lm.chat_template = ""
  # Candidate score: "sum" or per-token "mean" of the action tokens' log-probabilities.
  config.policy.lm.score = "mean"
  # Agent prompt length P in tokens (longer prompts keep their last P tokens).
  config.policy.lm.prompt_tokens = 160
  # Action length L in tokens, end-of-turn included (longer actions are cut).
  config.policy.lm.action_tokens = 24
  # Train every decoder weight instead of LoRA adapters.
  config.policy.lm.full_finetune = False
  # LoRA rank r.
  config.policy.lm.lora_rank = 8
  # LoRA scale alpha (update B A alpha / r).
  config.policy.lm.lora_alpha = 16.0
  # Decoder modules with adapters (regex over module paths): attention and MLP of every block.
  config.policy.lm.lora_modules = r"backbone/layers/\d+/(attn|mlp)"
  # Sampling temperature of the agent writing actions (lm_generate).
  config.policy.lm.temperature = 1.0
  # Candidates attend the prompt's cached keys once per state instead of K cache copies (same
  # numbers up to float reassociation; for large K).
  config.policy.lm.prefix_attention = False
  # States per policy call when acting (fixed: one compiled program, bounded memory).
  config.policy.lm.act_batch = 8
  # Candidates scored per pass against the prompt's cache (0: all K at once; bounds the logits).
  config.policy.lm.candidate_chunk = 0
  # Recompute the prompt's and each candidate chunk's forward in the backward pass (memory).
  config.policy.lm.remat = False
  # Activation dtype: "float32" or "bfloat16" (accelerators).
  config.policy.lm.compute_dtype = "float32"

  config.reference = ml_collections.ConfigDict()
  # Reference policies to train an agent against (one agent each): uniform, optimistic, g_optimal.
  config.reference.kinds = ("uniform", "optimistic", "g_optimal")
  # Reference policy whose agent is the headline of the evaluation.
  config.reference.main = "g_optimal"
  # Uniformly random episodes whose visited states are labelled with reference targets.
  config.reference.episodes = 64
  # Episodes per rollout batch while labelling.
  config.reference.rollout_batch = 32
  # States labelled: "rollout" (every distinct state the random episodes visit) or "anchors" (the
  # paper's q(x) for the dataset's movies: each training anchor with users_per_anchor users).
  config.reference.states = "rollout"
  # Users paired with each training anchor when states is "anchors".
  config.reference.users_per_anchor = 1
  # States labelled together: their features, K children and targets exist one chunk at a time.
  config.reference.chunk = 4096
  # Cross-entropy steps of the reference network.
  config.reference.steps = 150
  # Minibatch of labelled states.
  config.reference.batch_size = 32
  # G-optimal design: top principal directions of Z it runs in (0: raw Z; see agent/reference.py).
  config.reference.design_dim = 3
  # G-optimal design: exploratory actions m drawn from the design (paper: 10 of K = 100).
  config.reference.exploratory_m = 3
  # Frank-Wolfe stopping tolerance: g <= (1 + eps) * rank.
  config.reference.design_eps = 1e-3
  # Frank-Wolfe iteration cap.
  config.reference.design_max_iters = 1000
  # Ridge added to V(pi).
  config.reference.design_ridge = 0.0
  config.reference.optim = ml_collections.ConfigDict(dict(
      learning_rate=3e-3, warmup_steps=10, final_lr_fraction=0.1, weight_decay=1e-4,
      grad_clip=1.0, b1=0.9, b2=0.999))  # AdamW of the reference phase.

  config.rl = ml_collections.ConfigDict()
  # Horizon H (paper: 5; the smoke uses 2 to keep the transition tree small).
  config.rl.horizon = 2
  # RL steps (one batch of episodes each).
  config.rl.steps = 200
  # Episodes per RL step.
  config.rl.batch_size = 32
  # Discount gamma.
  config.rl.gamma = 1.0
  # GAE lambda (1: REINFORCE with the learned value baseline).
  config.rl.gae_lambda = 1.0
  # alpha: weight of KL(pi || pi_ref).
  config.rl.kl_coef = 0.1
  # Weight of the value regression.
  config.rl.value_coef = 0.5
  # Weight of the entropy bonus.
  config.rl.entropy_coef = 0.0
  # Collect step i+1's episodes while step i trains (importance-weighted; see agent/trainer.py).
  config.rl.overlap = True
  # Slices each RL step's episodes are processed in (gradient accumulation; bounds memory).
  config.rl.microbatches = 1
  config.rl.optim = ml_collections.ConfigDict(dict(
      learning_rate=1e-3, warmup_steps=5, final_lr_fraction=0.1, weight_decay=1e-4,
      grad_clip=1.0, b1=0.9, b2=0.999))  # AdamW of the RL phase.

  config.checkpoint = ml_collections.ConfigDict()
  # Save every this many steps (phase boundary and last step always).
  config.checkpoint.every = 25
  # Newest checkpoints kept.
  config.checkpoint.max_to_keep = 2

  config.eval = ml_collections.ConfigDict()
  # Sampled episodes per held-out pair and stochastic policy.
  config.eval.samples = 4
  # Seed of evaluation draws.
  config.eval.seed = 123
  # Held-out pairs evaluated per split: a seeded sample of this many (0: all of them).
  config.eval.max_pairs = 0
  # Sample trajectories written as text into the report.
  config.eval.trajectories = 6
  # Confidence level of the reported intervals.
  config.eval.confidence = 0.95
  # Workdir of a trained ELM (launch.train_elm, same config.wals) for the paper's ELM baseline;
  # "" skips it.
  config.eval.elm_workdir = ""
  # Gradient-ascent steps on U in Z for the ELM baseline.
  config.eval.elm_steps = 100
  # Step size of that ascent.
  config.eval.elm_lr = 0.05
  # Environment transfer (the paper's Table 3): run every policy again with another environment LLM
  # on the anchors, actions and profiles frozen from training (eagle_jax/evaluation/transfer.py).
  config.eval.transfer = ml_collections.ConfigDict()
  # Run the transfer section.
  config.eval.transfer.enabled = False
  # The test environment LLM (a config.llm block): Gemma 3 270M base, with Gemma's chat template.
  config.eval.transfer.llm = llm_config(gguf="gemma3", chat_template="gemma",
                                        batch_buckets=config.llm.batch_buckets,
                                        precision=config.llm.precision)
  # AI rater (eagle_jax/evaluation/rater.py): the paper's pairwise rater questions, both orders.
  config.eval.rater = ml_collections.ConfigDict()
  # Run the rater section.
  config.eval.rater.enabled = False
  # The rater model (a config.llm block; equal to config.llm: the environment LLM itself).
  config.eval.rater.llm = llm_config(batch_buckets=config.llm.batch_buckets,
                                     precision=config.llm.precision)
  # Held-out pairs rated per split (a seeded sample).
  config.eval.rater.pairs = 24
  # Report policies rated (the distance question compares each with "random").
  config.eval.rater.policies = ("random", "reference[g_optimal]", "agent[g_optimal]")
  # Questions asked: "user" (User Utility), "overall", "distance" (Distance Score).
  config.eval.rater.questions = ("user", "overall", "distance")
  # Tokens of each answer (one letter is asked for).
  config.eval.rater.max_tokens = 6
  # Seed of the pair sample.
  config.eval.rater.seed = 0
  if variant == "gemma3":
    _gemma3_environment(config)
  elif variant == "lm":
    _lm_agent(config)
  elif variant in ("", "paper"):
    paper_world(config)
  return config


def paper_world(config: ml_collections.ConfigDict) -> None:
  """The default world (and ``movielens_study.py``'s and ``movielens_25m.py``'s): the paper's world
  (PAPER_SPEC.md 1.5, 1.6) at the smoke size, over the plot-only fields. States are descriptions
  (plot, five reasons to like, five to dislike; sampled, since greedy decoding repeats one reason),
  profiles are LLM-written under the paper's five headings, half of each anchor's K actions are
  personalised to a randomly drawn profile, and E_D trains on the anchors' descriptions and 24
  more movies' as well as metadata. The environment LLM prefills a state's shared prompt once
  (``llm.share_prefix``)."""
  config.env.states = "description"
  config.descriptions.n_reasons = 5
  config.descriptions.sampling.temperature = 0.7
  config.profiles.kind = "llm"
  config.actions.personalised = True
  config.world.ed_descriptions = 24
  # A description state's K transition prompts share its 500-odd tokens: prefill them once.
  config.llm.share_prefix = True


def _lm_agent(config: ml_collections.ConfigDict) -> None:
  """The ``:lm`` variant: the agent is SmolLM2 itself with LoRA adapters (``lm_choice``), trained
  against the G-optimal reference on the smoke world; one agent, shorter schedules and smaller
  batches (every step runs the decoder forward and backward over B x H prompts and their K
  candidates)."""
  config.policy.kind = "lm_choice"
  config.reference.kinds = ("g_optimal",)
  config.reference.main = "g_optimal"
  config.policy.lm.prompt_tokens = 192
  config.reference.steps = 20
  config.reference.batch_size = 8
  config.reference.optim.learning_rate = 5e-4
  config.rl.steps = 20
  config.rl.batch_size = 8
  config.rl.optim.learning_rate = 2e-4
  config.checkpoint.every = 5
  config.eval.samples = 2
  config.eval.max_pairs = 32


def _gemma3_environment(config: ml_collections.ConfigDict) -> None:
  """The ``:gemma3`` variant: Gemma 3 270M (base) writes the world and the transitions; the
  transfer test environment is SmolLM2 (the default world's environment), i.e. Table 3 "back"."""
  config.llm.gguf = "gemma3"
  config.llm.chat_template = "gemma"
  config.eval.transfer.llm = llm_config(batch_buckets=config.llm.batch_buckets,
                                        precision=config.llm.precision)
  config.eval.rater.llm = llm_config(gguf="gemma3", chat_template="gemma",
                                     batch_buckets=config.llm.batch_buckets,
                                     precision=config.llm.precision)
