"""The agent's jitted, sharded train steps: parameters, optimizers and one update per batch.

``Learner`` holds the agent network (``agent_model``: pooled head or language model), the optimizers
of the reference and RL phases, and their ``jax.jit`` steps with explicit in/out shardings; the
optimizer state is donated. Activations are not constrained by logical axes (the steps do not run
under ``jax.set_mesh``, so ``parallel.constrain`` is the identity): XLA propagates the shardings of
the parameters and the batch, which the paper config's dry run measured at less memory per device
than with the decoder's activation constraints. The RL step processes its episodes in
``rl.microbatches`` slices (``training.microbatched_value_and_grad``). It does no environment
calls and no I/O: the trainer (``agent/trainer.py``) feeds it batches.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from eagle_jax import hosts, parallel, training
from eagle_jax.agent import agent_model, rollout


def reference_loss(model, params, frozen, batch) -> tuple[jax.Array, dict]:
  return model.reference_loss(params, frozen, batch)


def rl_loss(model, rl, params, frozen, ref_params, batch) -> tuple[jax.Array, dict]:
  terms = model.rl_terms(params, frozen, ref_params, batch, rl)
  return terms.total, terms._asdict()


def _update(grad_fn, tx, params, opt_state, *args):
  (_, metrics), grads = grad_fn(params, *args)
  updates, opt_state = tx.update(grads, opt_state, params)
  params = optax.apply_updates(params, updates)
  metrics = dict(metrics, grad_norm=training.global_norm(grads))
  return params, opt_state, metrics


class Learner:
  """The agent's parameters, optimizers and jitted, sharded train steps (no environment).

  Args:
    job: the validated ``trainer.Job`` (``policy``, ``seed``, the ``reference`` and ``rl``
      phases).
    state_dim, action_dim: S and A of the head's features (``rollout.feature_dims``).
    mesh: the device mesh.
    decoder: the language-model agent's ``lm_features.AgentDecoder`` (``params=None``: abstract).

  Attributes:
    model: the network (``agent_model``); ``model.frozen`` is an argument of every step.
  """

  def __init__(self, job, state_dim: int, action_dim: int, mesh: jax.sharding.Mesh,
               decoder=None):
    self.job = job
    self.mesh = mesh
    self.model = agent_model.build(job.policy, state_dim=state_dim, action_dim=action_dim,
                                   mesh=mesh, seed=job.seed, decoder=decoder)
    self.ref_steps = job.reference.steps
    self.rl_steps = job.rl.steps
    self.tx_ref = training.make_optimizer(job.reference.optim, max(self.ref_steps, 1))
    self.tx_rl = training.make_optimizer(job.rl.optim, max(self.rl_steps, 1))
    self._ref_loss = functools.partial(reference_loss, self.model)
    self._rl_loss = functools.partial(rl_loss, self.model, job.rl)
    p_sh = self.model.shardings
    self.opt_shardings = self._opt_shardings()
    # The optimizer state is donated (updated in place); parameters are not: with rl.overlap the
    # pre-step parameters still drive the next step's collection.
    ref_grad = jax.value_and_grad(self._ref_loss, has_aux=True)
    rl_grad = training.microbatched_value_and_grad(self._rl_loss, job.rl.microbatches, mesh, p_sh)
    self._ref_update = jax.jit(functools.partial(_update, ref_grad, self.tx_ref),
                               out_shardings=(p_sh, self.opt_shardings, None), donate_argnums=1)
    self._rl_update = jax.jit(functools.partial(_update, rl_grad, self.tx_rl),
                              out_shardings=(p_sh, self.opt_shardings, None), donate_argnums=1)
    # Replicated logits: every process reads all rows (``rollout.collect`` draws from them).
    self._policy = jax.jit(lambda p, f, s, a: self.model.scores(p, f, s, a)[0],
                           out_shardings=parallel.replicated(mesh))
    self._copy = jax.jit(lambda p: jax.tree.map(jnp.copy, p), out_shardings=p_sh)

  def _opt_shardings(self):
    abstract = jax.eval_shape(self.tx_ref.init, self.model.abstract_params())
    repl = parallel.replicated(self.mesh)
    return optax.tree_map_params(self.tx_ref, lambda _, s: s, abstract, self.model.shardings,
                                 transform_non_params=lambda _: repl)

  def init_state(self) -> dict[str, Any]:
    """Fresh train state, every array created with its sharding."""
    params = self.model.init()
    return {"params": params, "ref_params": self._copy(params),
            "behaviour_params": self._copy(params),
            "opt_state": jax.jit(self.tx_ref.init, out_shardings=self.opt_shardings)(params),
            "rng": jax.device_put(np.asarray(jax.random.key_data(jax.random.key(self.job.seed))),
                                  parallel.replicated(self.mesh))}

  def abstract_state(self) -> dict[str, Any]:
    """``ShapeDtypeStruct`` pytree (with shardings) of ``init_state``: restore target, AOT input."""
    p = self.model.abstract_params()
    opt = jax.eval_shape(self.tx_ref.init, p)
    opt = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), opt,
                       self.opt_shardings)
    rng = jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=parallel.replicated(self.mesh))
    return {"params": p, "ref_params": p, "behaviour_params": p, "opt_state": opt, "rng": rng}

  def start_rl(self, state: dict) -> dict:
    """Freezes the reference network and starts the agent from it (fresh optimizer)."""
    opt = jax.jit(self.tx_rl.init, out_shardings=self.opt_shardings)(state["params"])
    return dict(state, ref_params=self._copy(state["params"]),
                behaviour_params=self._copy(state["params"]), opt_state=opt)

  @property
  def writes(self) -> bool:
    """The policy writes its actions (``lm_generate``): ``policy_fn`` is a ``rollout.WriterFn``."""
    return self.model.writes

  def policy_fn(self, params) -> rollout.PolicyFn | rollout.WriterFn:
    """Host-callable logits of a parameter set, ([N, S], [N, K, A]) -> [N, K], or the writer."""
    if self.model.writes:
      return self.model.writer(params)

    chunk = getattr(self.model, "act_batch", 0)

    def fn(state, actions):
      if not chunk:
        return np.asarray(self._policy(params, self.model.frozen, np.asarray(state),
                                       np.asarray(actions)))
      # Fixed-size chunks of states: one compiled shape and bounded memory whatever N is.
      n = len(state)
      pad = -n % chunk
      state = np.concatenate([state, np.repeat(state[-1:], pad, 0)])
      actions = np.concatenate([actions, np.repeat(actions[-1:], pad, 0)])
      out = [np.asarray(self._policy(params, self.model.frozen, state[i:i + chunk],
                                     actions[i:i + chunk]))
             for i in range(0, n + pad, chunk)]
      return np.concatenate(out)[:n]
    return fn

  def put(self, batch: dict, global_rows: int | None = None) -> dict:
    """Places a host batch on the mesh, sharded over its leading axis: the whole batch, or (with
    ``global_rows``) this process's rows of a global batch of that many (``hosts.process_rows``)."""
    if global_rows is not None and hosts.is_multiprocess():
      return hosts.global_batch(batch, self.mesh, global_rows)
    return jax.device_put({k: np.asarray(v) for k, v in batch.items()},
                          training.batch_shardings(batch, self.mesh))

  def reference_step(self, params, opt_state, batch):
    """One cross-entropy step: -> (params, opt_state, metrics)."""
    return self._ref_update(params, opt_state, self.model.frozen, self.put(batch))

  def rl_step(self, params, opt_state, ref_params, batch, global_rows: int | None = None):
    """One EAGLE-loss step on a batch of episodes (all, or this process's rows of
    ``global_rows``): -> (params, opt_state, metrics)."""
    return self._rl_update(params, opt_state, self.model.frozen, ref_params,
                           self.put(batch, global_rows))

  def lower_rl_step(self, batch_size: int, horizon: int, num_actions: int):
    """AOT-lowers the RL step for abstract inputs (the dry run of paper-scale configs). A policy
    that writes its actions (``lm_generate``) holds one candidate per step, the written one."""
    b, h, k = batch_size, horizon, 1 if self.model.writes else num_actions
    shapes = {**self.model.input_shapes((b, h), k),
              "mask": ((b, h, k), jnp.bool_), "actions": ((b, h), jnp.int32),
              "behaviour_logp": ((b, h), jnp.float32), "reward": ((b,), jnp.float32)}
    batch = {n: jax.ShapeDtypeStruct(shp, dt, sharding=parallel.named_sharding(
        self.mesh, ("batch",) + (None,) * (len(shp) - 1))) for n, (shp, dt) in shapes.items()}
    st = self.abstract_state()
    return self._rl_update.lower(st["params"], st["opt_state"], self.model.frozen,
                                 st["ref_params"], batch)
