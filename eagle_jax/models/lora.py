"""A module over a frozen decoder base as two pure pytrees: trainable parameters and the base.

Fine-tuning a decoder-backed module (the encoder E_D's ``DecoderRegressor``; the same pattern as
the agent's ``agent/lm_policy.LMPolicyModel``) trains either

* LoRA adapters through ``qwix`` (``qwix.LoraProvider`` on the modules whose path matches a regex;
  the update of a weight ``W`` is ``A B * alpha / r`` with ``B = 0`` at init, so the module starts
  as its base) plus the module's own heads, while the decoder weights stay a frozen pytree; or
* every parameter (``full_finetune``), with no frozen part.

``FrozenBaseModel`` holds the module's graph and the abstract split of its state into
``(trainable, frozen)``, both with ``NamedSharding`` from the variables' logical axes
(``training.state_shardings``). The frozen base is an *argument* of every jitted step (never
closed over, never donated, never checkpointed: it is reloaded from its file), and
``module(params, frozen)`` merges the two inside ``jax.jit``.

qwix intercepts only the contractions made inside the module's ``__call__``: a module trained
with LoRA must route every computation through ``__call__`` (flags select what it returns).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from eagle_jax import parallel, training
from eagle_jax.checks import ConfigError


def apply_lora(module: nnx.Module, example: tuple, *, rank: int, alpha: float, modules: str,
               seed: int) -> nnx.Module:
  """``module`` with qwix LoRA adapters on the sub-modules whose path matches ``modules``
  (traced once on ``example`` inputs; adapters drawn from ``seed``)."""
  import qwix  # noqa: PLC0415

  provider = qwix.LoraProvider(module_path=modules, rank=rank, alpha=alpha)
  return qwix.apply_lora_to_model(module, provider, *example, rngs=nnx.Rngs(seed))


def trainable_filter(full_finetune: bool, heads: Sequence[str]):
  """The ``nnx`` filter of the trainable variables: every ``nnx.Param``, or the LoRA adapters plus
  the parameters under ``heads`` (``nnx.LoRAParam`` subclasses ``nnx.Param``, so the adapters are
  matched before the base)."""
  if full_finetune:
    return nnx.Param
  return nnx.Any(nnx.LoRAParam, *(nnx.PathContains(h) for h in heads))


def _abstract(tree: dict, shardings: dict) -> dict:
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree,
                      shardings)


def _count(tree) -> int:
  return int(sum(math.prod(x.shape) for x in jax.tree.leaves(tree)))


class FrozenBaseModel:
  """A module built by ``build`` as ``module(params, frozen)`` over pure, sharded pytrees.

  Args:
    build: constructs the module (adapters already applied); called under ``nnx.eval_shape``
      and inside ``jax.jit``, so it must be a pure function of its closure.
    trainable: the filter of the trainable variables (``trainable_filter``).
    mesh: device mesh; parameters and the base are placed by their logical axes.
    base: pure-dict weights of the sub-module ``base_key`` (the decoder), or None for
      abstract-only use (the dry run). With full fine-tuning they seed ``init`` instead.
    base_key: attribute name of the decoder inside the module.
    full_finetune: whether ``trainable`` is every parameter.
    rules: logical axis rules.

  Attributes:
    shardings, frozen_shardings: pure-dict ``NamedSharding`` of the trainable and frozen parts.
    frozen: the frozen pytree (placed arrays, or ``ShapeDtypeStruct`` when ``base`` is None).
  """

  def __init__(self, build: Callable[[], nnx.Module], trainable, mesh: jax.sharding.Mesh, *,
               base: dict | None = None, base_key: str = "backbone", full_finetune: bool = False,
               rules=parallel.DEFAULT_RULES):
    self._build, self._trainable = build, trainable
    self.mesh, self.rules, self.base_key = mesh, rules, base_key
    self.full_finetune = full_finetune
    with nnx.use_eager_sharding(False):
      abstract = nnx.eval_shape(build)
    self.graphdef, t_state, f_state = nnx.split(abstract, trainable, ...)
    self._t_abstract, self._f_abstract = t_state, f_state
    self.shardings = training.state_shardings(t_state, mesh, rules)
    self.frozen_shardings = training.state_shardings(f_state, mesh, rules)
    self._base_init = None
    f_pure = nnx.to_pure_dict(f_state)
    if base is None:
      self.frozen = _abstract(f_pure, self.frozen_shardings)
    elif full_finetune:
      self._check_base(base, nnx.to_pure_dict(t_state)[base_key])
      self._base_init = base
      self.frozen = _abstract(f_pure, self.frozen_shardings)  # no parameters left frozen
    else:
      want = f_pure[base_key]
      self._check_base(base, want)
      placed = jax.tree.map(lambda x, w, s: jax.device_put(jnp.asarray(x, w.dtype), s), base,
                            want, self.frozen_shardings[base_key])
      self.frozen = dict(f_pure, **{base_key: placed})

  @staticmethod
  def _check_base(base: dict, want: dict) -> None:
    """Raises ``ConfigError`` unless ``base`` has exactly the paths and shapes of ``want``."""
    flat_w = dict(jax.tree_util.tree_flatten_with_path(want)[0])
    flat_b = dict(jax.tree_util.tree_flatten_with_path(base)[0])
    if set(flat_w) != set(flat_b):
      missing = sorted(map(jax.tree_util.keystr, set(flat_w) ^ set(flat_b)))[:3]
      raise ConfigError(f"decoder weights do not match its config (differing: {missing})")
    for path, x in flat_w.items():
      if tuple(flat_b[path].shape) != tuple(x.shape):
        raise ConfigError(f"decoder weight {jax.tree_util.keystr(path)}: shape "
                          f"{tuple(flat_b[path].shape)}, expected {tuple(x.shape)}")

  def init(self) -> dict:
    """Fresh trainable parameters created with their shardings (adapters with ``B = 0``; with
    full fine-tuning the loaded base weights)."""
    seeded = self._base_init is not None
    shardings = dict(self.shardings)
    if seeded:  # the loaded weights replace the base: never initialised (XLA drops its init)
      shardings.pop(self.base_key)

    def make():
      with nnx.use_eager_sharding(False):
        _, t_state, _ = nnx.split(self._build(), self._trainable, ...)
      params = nnx.to_pure_dict(t_state)
      return {k: v for k, v in params.items() if not (seeded and k == self.base_key)}

    params = jax.jit(make, out_shardings=shardings)()
    if seeded:
      want = nnx.to_pure_dict(self._t_abstract)[self.base_key]
      params[self.base_key] = jax.tree.map(
          lambda x, w, s: jax.device_put(jnp.asarray(x, w.dtype), s), self._base_init, want,
          self.shardings[self.base_key])
    return params

  def abstract_params(self) -> dict:
    """``ShapeDtypeStruct`` pytree of the trainable parameters, with their shardings."""
    return _abstract(nnx.to_pure_dict(self._t_abstract), self.shardings)

  def module(self, params: dict, frozen: dict) -> nnx.Module:
    """The module with ``params`` over the frozen base (usable inside ``jax.jit``)."""
    t = jax.tree.map(lambda x: x, self._t_abstract)
    nnx.replace_by_pure_dict(t, params)
    f = jax.tree.map(lambda x: x, self._f_abstract)
    nnx.replace_by_pure_dict(f, frozen)
    return nnx.merge(self.graphdef, t, f)

  def num_params(self) -> int:
    return _count(nnx.to_pure_dict(self._t_abstract))

  def num_frozen(self) -> int:
    return _count(nnx.to_pure_dict(self._f_abstract))
