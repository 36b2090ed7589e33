"""E_D with a decoder backbone: a Llama-family decoder, mean-pooled, and a linear head onto Z.

The paper's E_D is a fine-tuned decoder regressing a movie's text onto its WALS vector with an l2
loss. ``DecoderRegressor`` is that model over the project's ``Llama``::

  ids [N, T] int32 (left-padded with PAD) -> final-norm hidden states [N, T, D]
    -> mean over the real tokens [N, D] float32 -> linear head -> [N, d] (standardised targets)

It is the accelerator configs' E_D (``configs/movielens_25m.py``;
``configs/encoder_ml100k.py:decoder`` runs it on CPU with SmolLM2); MiniLM
(``encoder.TextRegressor``) stays the CPU default. ``encoder_train.run`` picks it with
``config.backbone = "decoder"`` and reads ``config.decoder`` (``DecoderEncoderConfig``) on the same
rows, targets and split.

Training. LoRA adapters (qwix, ``models/lora.py``) on the decoder's projections plus the head, or
every weight (``full_finetune``); the frozen base is one pytree passed to the jitted step as an
argument. The step is a ``jax.jit`` with named shardings on a (data, fsdp, tensor) mesh
(``config.decoder.mesh``): parameters by their logical axes, rows over data x fsdp; AdamW (optax) on
the mean squared l2 error, with the optimizer state donated. As with MiniLM, the head starts at the
ridge solution on the frozen decoder's pooled features of the training rows, so epoch 0 is that
ridge model; after every epoch the pooled R^2 on the validation rows is measured and the best epoch
is kept.

Shapes. Texts are tokenised without a chat template (with bos when the tokenizer adds one), keep
their first ``max_tokens`` ids and are padded to the smallest multiple of ``decoder.BUCKET`` tokens
that holds the call's longest row: one program per width. Predictions run in calls of a fixed
row count (padding rows hold no token), each call holding rows of one width, so a text's output
does not depend on the texts it shares a call with.

Checkpoint (``encoder_train.save_encoder``, kind "decoder"): the trainable parameters (adapters and
head, or every weight with full fine-tuning); ``restore`` reloads the base from ``source``.
``dry_run_report`` AOT-compiles the sharded step for a ``shapes`` preset without reading weights.
"""

from __future__ import annotations

import dataclasses
import math
import re
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from eagle_jax import checkpoint, checks, parallel, training
from eagle_jax.checks import ConfigError
from eagle_jax.embed import encoder
from eagle_jax.models import configs as model_configs
from eagle_jax.models import decoder as decoder_lib
from eagle_jax.models import files, lora
from eagle_jax.models import llama as llama_lib

DTYPES = ("float32", "bfloat16")


@dataclasses.dataclass(frozen=True)
class DecoderEncoderConfig:
  """The decoder E_D (``config.decoder`` of an E_D job; see ``configs/encoder_ml100k.py``).

  Attributes:
    source: GGUF asset name or path ("" = SmolLM2), or a safetensors folder.
    shapes: a ``models.configs.PRESETS`` name for abstract use (``dry_run_report``); "" = the
      shapes of ``source``.
    max_tokens: T, a text's first tokens kept.
    full_finetune: train every decoder weight instead of LoRA adapters.
    lora_rank, lora_alpha: adapter rank r and scale alpha (update ``A B * alpha / r``).
    lora_modules: regex over module paths that get adapters.
    compute_dtype: ``float32`` or ``bfloat16`` activations (parameters keep their dtype).
    learning_rate, weight_decay: AdamW.
    batch_size: rows per step (a multiple of the mesh's data parallelism).
    epochs: most epochs; the best on the validation rows is kept (0: the ridge head only).
    ridge_reg: ridge weight of the head's warm start on the frozen pooled features.
    seed: PRNG seed of the head and adapters and of the minibatch order.
    mesh: {axis: size} over ("data", "fsdp", "tensor"); -1 takes the remaining devices.
  """

  source: str = ""
  shapes: str = ""
  max_tokens: int = 128
  full_finetune: bool = False
  lora_rank: int = 8
  lora_alpha: float = 16.0
  lora_modules: str = r"backbone/layers/\d+/(attn|mlp)"
  compute_dtype: str = "float32"
  learning_rate: float = 1e-4
  weight_decay: float = 0.01
  batch_size: int = 16
  epochs: int = 3
  ridge_reg: float = 100.0
  seed: int = 0
  mesh: dict = dataclasses.field(default_factory=lambda: {"data": -1})

  @classmethod
  def from_config(cls, block, field: str = "config.decoder") -> DecoderEncoderConfig:
    """Reads and checks ``block`` (a ConfigDict or dict); ``ConfigError`` naming the field."""
    out = cls(**checks.typed_fields(cls, block, field, {"mesh": _mesh_shape}))
    for name, lo in (("max_tokens", 1), ("lora_rank", 1), ("batch_size", 1), ("epochs", 0),
                     ("seed", 0)):
      if getattr(out, name) < lo:
        raise ConfigError(f"{field}.{name}={getattr(out, name)}: expected an int >= {lo}")
    for name in ("lora_alpha", "learning_rate", "ridge_reg", "weight_decay"):
      v = getattr(out, name)
      if not math.isfinite(v) or v < 0 or (v == 0 and name != "weight_decay"):
        raise ConfigError(f"{field}.{name}={v}: expected a finite number "
                          f"{'>= 0' if name == 'weight_decay' else '> 0'}")
    if out.compute_dtype not in DTYPES:
      raise ConfigError(f"{field}.compute_dtype={out.compute_dtype!r}: expected one of {DTYPES}")
    if out.shapes and out.shapes not in model_configs.PRESETS:
      raise ConfigError(f"{field}.shapes={out.shapes!r}: expected '' or one of "
                        f"{sorted(model_configs.PRESETS)}")
    try:
      re.compile(out.lora_modules)
    except re.error as e:
      raise ConfigError(f"{field}.lora_modules={out.lora_modules!r}: not a regex ({e})") from e
    return out


def _mesh_shape(value, field: str) -> dict:
  """``{axis: size}`` of a mesh field (axes of ``parallel.MESH_AXES``, sizes >= 1 or -1)."""
  try:
    shape = {str(k): v for k, v in dict(value).items()}
  except (TypeError, ValueError):
    raise ConfigError(f"{field}={value!r}: expected a mapping axis -> size") from None
  for k, v in shape.items():
    if k not in parallel.MESH_AXES or type(v) is not int or (v < 1 and v != -1):
      raise ConfigError(f"{field}: {k}={v!r}; expected axes of {parallel.MESH_AXES} with sizes "
                        ">= 1 or -1")
  return shape


class DecoderRegressor(nnx.Module):
  """Decoder -> mean pool over real tokens -> linear head: ``ids [N, T] int32 -> [N, d]``."""

  def __init__(self, config: llama_lib.LlamaConfig, out_dim: int, *, rngs: nnx.Rngs):
    self.backbone = llama_lib.Llama(config, rngs=rngs)
    with nnx.use_eager_sharding(False):
      self.head = nnx.Linear(
          config.hidden, out_dim, rngs=rngs,
          kernel_init=nnx.with_partitioning(nnx.initializers.lecun_normal(), ("embed", None)),
          bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), (None,)))

  def __call__(self, ids: jax.Array, pooled: bool = False) -> jax.Array:
    """ids: [N, T] int32, left-padded with ``PAD`` -> [N, d] float32 (``pooled``: the pooled
    hidden states [N, D] instead). The one entry point: qwix's LoRA intercepts calls made inside
    ``__call__`` only."""
    x = decoder_lib.pooled_hidden(self.backbone, ids)
    return x if pooled else self.head(x)


class DecoderRegressorModel:
  """``DecoderRegressor`` over a frozen base, with its jitted, sharded step and forward pass.

  Args:
    llm_config: the decoder's shapes.
    cfg: the decoder E_D config.
    out_dim: d.
    mesh: device mesh.
    base: pure-dict decoder weights, or None for abstract use (``dry_run_report``).

  Attributes:
    model: the ``lora.FrozenBaseModel`` (``init``, ``module(params, frozen)``, ``shardings``).
    frozen: the frozen base (an argument of every call).
    tx, opt_shardings: AdamW and the shardings of its state.
    step_fn: ``(params, opt_state, frozen, ids [B, T], y [B, d]) -> (params, opt_state, loss)``,
      ``opt_state`` donated.
  """

  def __init__(self, llm_config: llama_lib.LlamaConfig, cfg: DecoderEncoderConfig, out_dim: int,
               mesh: jax.sharding.Mesh, *, base: dict | None = None):
    self.cfg, self.out_dim, self.mesh = cfg, int(out_dim), mesh
    self.llm_config = llm_config.replace(dtype=jnp.dtype(cfg.compute_dtype))
    example = (jnp.zeros((1, 4), jnp.int32),)

    def build() -> DecoderRegressor:
      module = DecoderRegressor(self.llm_config, self.out_dim, rngs=nnx.Rngs(cfg.seed))
      if cfg.full_finetune:
        return module
      return lora.apply_lora(module, example, rank=cfg.lora_rank, alpha=cfg.lora_alpha,
                             modules=cfg.lora_modules, seed=cfg.seed + 1)

    self.model = lora.FrozenBaseModel(
        build, lora.trainable_filter(cfg.full_finetune, ("head",)), mesh, base=base,
        full_finetune=cfg.full_finetune)
    self.frozen = self.model.frozen
    self.tx = optax.adamw(cfg.learning_rate, weight_decay=cfg.weight_decay)
    repl = parallel.replicated(mesh)
    abstract_opt = jax.eval_shape(self.tx.init, self.model.abstract_params())
    self.opt_shardings = optax.tree_map_params(self.tx, lambda _, s: s, abstract_opt,
                                               self.model.shardings,
                                               transform_non_params=lambda _: repl)
    self.batch_sharding = parallel.named_sharding(mesh, ("batch", None))
    self.call_rows = -(-cfg.batch_size // training.data_parallelism(mesh)) * \
        training.data_parallelism(mesh)
    p_sh, b_sh = self.model.shardings, self.batch_sharding
    self.step_fn = jax.jit(
        self._update, in_shardings=(p_sh, self.opt_shardings, self.model.frozen_shardings, b_sh,
                                    b_sh),
        out_shardings=(p_sh, self.opt_shardings, repl), donate_argnums=1)
    self._outputs = jax.jit(lambda p, f, ids: self.model.module(p, f)(ids), out_shardings=b_sh)
    self._features = jax.jit(lambda p, f, ids: self.model.module(p, f)(ids, pooled=True),
                             out_shardings=b_sh)

  def loss(self, params: dict, frozen: dict, ids: jax.Array, y: jax.Array) -> jax.Array:
    """Mean over rows of the squared l2 error: ids [B, T], y [B, d] -> scalar."""
    pred = self.model.module(params, frozen)(ids)
    return jnp.mean(jnp.sum(jnp.square(pred - y), axis=-1))

  def _update(self, params, opt_state, frozen, ids, y):
    loss, grads = jax.value_and_grad(self.loss)(params, frozen, ids, y)
    updates, opt_state = self.tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  def init(self) -> dict:
    """Fresh trainable parameters, created with their shardings."""
    return self.model.init()

  def init_opt(self, params: dict):
    """AdamW's state for ``params``, created with its shardings."""
    return jax.jit(self.tx.init, out_shardings=self.opt_shardings)(params)

  def put(self, x: np.ndarray) -> jax.Array:
    """A host batch (rows first) placed over the mesh's data axes."""
    return jax.device_put(np.asarray(x), self.batch_sharding)

  def step(self, params, opt_state, ids: np.ndarray, y: np.ndarray):
    """One AdamW step on ``ids [B, T] int32`` and ``y [B, d]``: -> (params, opt_state, loss)."""
    with jax.set_mesh(self.mesh):
      return self.step_fn(params, opt_state, self.frozen, self.put(ids),
                          self.put(np.asarray(y, np.float32)))

  def with_head(self, params: dict, w: np.ndarray, b: np.ndarray) -> dict:
    """``params`` with the head set to ``w [D, d]``, ``b [d]`` (placed like the head)."""
    sh = self.model.shardings["head"]
    head = {"kernel": jax.device_put(np.asarray(w, np.float32), sh["kernel"]),
            "bias": jax.device_put(np.asarray(b, np.float32), sh["bias"])}
    return dict(params, head=head)

  def apply(self, params: dict, rows: Sequence[Sequence[int]], pooled: bool = False,
            desc: str | None = None) -> np.ndarray:
    """Token id lists -> [N, d] predictions (``pooled``: [N, D] pooled features), float32.

    Rows are grouped by their own padded width and run ``call_rows`` at a time (see the module
    docstring), so a row's output does not depend on the other rows. ``desc``: show a
    ``training.Progress`` bar under that name."""
    fn = self._features if pooled else self._outputs
    dim = self.llm_config.hidden if pooled else self.out_dim
    out = np.zeros((len(rows), dim), np.float32)
    widths = np.array([decoder_lib.bucket_width([r], self.cfg.max_tokens) for r in rows])
    progress = training.Progress(len(rows), desc=desc) if desc else None
    with jax.set_mesh(self.mesh):
      for width in sorted(set(widths.tolist())):
        members = np.flatnonzero(widths == width)
        for start in range(0, len(members), self.call_rows):
          idx = members[start:start + self.call_rows]
          ids = decoder_lib.left_pad([rows[i] for i in idx] + [[]] * (self.call_rows - len(idx)),
                                     width)
          out[idx] = np.asarray(fn(params, self.frozen, self.put(ids)))[:len(idx)]
          if progress:
            progress.update(len(idx))
    if progress:
      progress.close()
    return out


def fit(model: DecoderRegressorModel, params: dict, rows: Sequence[Sequence[int]], y: np.ndarray,
        train_rows: np.ndarray, val_rows: np.ndarray, field: str = "config.decoder"
        ) -> tuple[dict, list[dict[str, float]]]:
  """Trains ``params`` for ``cfg.epochs`` epochs of full minibatches; keeps the best epoch.

  Args:
    model: the regressor.
    params: starting trainable parameters (the head warm-started).
    rows: [R] token id lists.
    y: [R, d] standardised targets.
    train_rows, val_rows: disjoint row indices.
    field: the config block's name, for errors.

  Returns:
    ``(best_params, history)``: the parameters of the epoch (0 = ``params``) with the best pooled
    R^2 on ``val_rows``, and per epoch ``{"epoch", "train_loss", "val_r2"}``.
  """
  cfg = model.cfg
  if len(val_rows) == 0 or len(train_rows) < cfg.batch_size:
    raise ConfigError(f"{field}.batch_size={cfg.batch_size}: fine-tuning needs that many training "
                      f"rows and a validation row (got {len(train_rows)} and {len(val_rows)})")

  def val_r2(p) -> float:
    return encoder.r2_score(y[val_rows], model.apply(p, [rows[i] for i in val_rows]))

  state = {"params": params, "opt_state": model.init_opt(params)}

  def train(idx: np.ndarray) -> float:
    batch = [rows[i] for i in idx]
    ids = decoder_lib.left_pad(batch, decoder_lib.bucket_width(batch, cfg.max_tokens))
    state["params"], state["opt_state"], loss = model.step(state["params"], state["opt_state"],
                                                           ids, y[idx])
    return float(loss)

  # Parameters are never donated: a kept snapshot stays valid.
  return encoder.best_epoch(train, lambda: val_r2(state["params"]), lambda: state["params"],
                            train_rows, epochs=cfg.epochs, batch_size=cfg.batch_size,
                            seed=cfg.seed, desc="E_D decoder fine-tuning")


def finetune(cfg: DecoderEncoderConfig, texts: Sequence[str], y: np.ndarray,
             train_rows: np.ndarray, val_rows: np.ndarray, *, field: str = "config.decoder"
             ) -> tuple[Callable[[Sequence[str]], np.ndarray], dict, list[dict[str, float]]]:
  """Fits the decoder E_D on ``texts`` ([R]) and standardised targets ``y`` ([R, d]).

  Returns:
    ``(predict, state, history)``: ``texts -> [N, d]`` standardised predictions of the best epoch,
    ``{"regressor": host copy of its trainable parameters}`` and the per-epoch history.
  """
  dec = decoder_lib.load_decoder(cfg.source)
  if cfg.shapes:  # the dry run's shapes must be the weights' (a run must not train another model)
    want = model_configs.preset(cfg.shapes)
    got = dec.config.hidden, dec.config.layers, dec.config.vocab_size
    if got != (want.hidden, want.layers, want.vocab_size):
      raise ConfigError(f"{field}.shapes={cfg.shapes!r} but {field}.source={cfg.source!r} "
                        f"holds a decoder of (hidden, layers, vocab) {got}")
  mesh = training.build_mesh(cfg.mesh, f"{field}.mesh")
  training.check_divisible(cfg.batch_size, mesh, f"{field}.batch_size")
  model = DecoderRegressorModel(dec.config, cfg, y.shape[1], mesh, base=dec.params)
  rows = decoder_lib.tokenize(dec.tokenizer, texts, cfg.max_tokens)
  params = model.init()
  train_rows = np.asarray(train_rows)
  feats = model.apply(params, [rows[i] for i in train_rows], pooled=True,
                      desc="E_D decoder features (ridge warm start)")
  w, b = encoder.ridge_weights(feats.astype(np.float64), y[train_rows].astype(np.float64),
                               cfg.ridge_reg)
  params = model.with_head(params, w, b)
  best, history = fit(model, params, rows, y, train_rows, np.asarray(val_rows), field)

  def predict(ts: Sequence[str]) -> np.ndarray:
    rows = decoder_lib.tokenize(dec.tokenizer, list(ts), cfg.max_tokens)
    return model.apply(best, rows, desc="E_D decoder predict" if len(rows) > 256 else None)

  return predict, {"regressor": jax.device_get(best)}, history


def restore(ckpt: checkpoint.Checkpointer, meta: dict[str, Any]
            ) -> tuple[Callable[[Sequence[str]], np.ndarray], dict]:
  """Restores a decoder E_D saved by ``encoder_train.save_encoder`` (``meta["decoder"]``: its
  config; the base reloaded from its ``source``).

  Returns:
    ``(predict, state)``: ``texts -> [N, d]`` standardised predictions and the restored state
    (``regressor``, ``y_mean``, ``y_scale``).
  """
  cfg = DecoderEncoderConfig.from_config(meta["decoder"], "E_D checkpoint: decoder")
  dec = decoder_lib.load_decoder(cfg.source)
  d = int(meta["out_dim"])
  mesh = training.build_mesh(cfg.mesh, "E_D checkpoint: decoder.mesh")  # calls round rows up
  model = DecoderRegressorModel(dec.config, cfg, d, mesh, base=dec.params)
  target = {"regressor": model.model.abstract_params(),
            "y_mean": jax.ShapeDtypeStruct((d,), jnp.float32),
            "y_scale": jax.ShapeDtypeStruct((), jnp.float32)}
  _, state, _ = ckpt.restore(target=target)

  def predict(texts: Sequence[str]) -> np.ndarray:
    rows = decoder_lib.tokenize(dec.tokenizer, list(texts), cfg.max_tokens)
    return model.apply(state["regressor"], rows)

  return predict, state


def _count(tree, pred=lambda name: True) -> int:
  return int(sum(math.prod(x.shape) for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]
                 if pred(jax.tree_util.keystr(path))))


def dry_run_report(cfg, mesh: jax.sharding.Mesh, batch: int, *, out_dim: int = 35,
                   field: str = "config.encoder.decoder") -> dict[str, Any]:
  """AOT-compiles the sharded training step for abstract shapes (no weight is read).

  Args:
    cfg: a ``DecoderEncoderConfig`` or its ConfigDict; the shapes come from ``cfg.shapes`` (a
      preset) or the ``config.json`` of the safetensors folder ``cfg.source``.
    mesh: the device mesh (fake CPU devices work).
    batch: rows per step B (a multiple of the mesh's data parallelism); T = ``cfg.max_tokens``.
    out_dim: d.
    field: the config block's name, for errors.

  Returns:
    Parameter counts (trainable: adapters and head, or everything; frozen base), the compiled
    step's per-device memory (``memory_analysis()``: argument, output, alias, temp, generated code,
    total) and FLOPs (``cost_analysis()`` of one device's partitioned program; x devices).
  """
  if not isinstance(cfg, DecoderEncoderConfig):
    cfg = DecoderEncoderConfig.from_config(cfg, field)
  try:
    llm = decoder_lib.abstract_config(cfg.shapes, cfg.source)
  except files.LoadingError as e:
    raise ConfigError(f"{field}: decoder shapes: {e}") from e
  if llm is None:
    raise ConfigError(f"{field}.shapes: the dry run needs the decoder's shapes: a preset "
                      f"{sorted(model_configs.PRESETS)} or a safetensors folder with config.json "
                      f"in {field}.source (got {cfg.source!r})")
  training.check_divisible(batch, mesh, f"{field}.batch_size")
  model = DecoderRegressorModel(llm, cfg, out_dim, mesh)
  params = model.model.abstract_params()
  opt = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                     jax.eval_shape(model.tx.init, params), model.opt_shardings)
  ids = jax.ShapeDtypeStruct((batch, cfg.max_tokens), jnp.int32, sharding=model.batch_sharding)
  y = jax.ShapeDtypeStruct((batch, out_dim), jnp.float32, sharding=model.batch_sharding)
  t0 = time.perf_counter()
  with jax.set_mesh(mesh):
    compiled = model.step_fn.lower(params, opt, model.frozen, ids, y).compile()
  seconds = time.perf_counter() - t0
  m = compiled.memory_analysis()
  mem = {k: int(getattr(m, f"{k}_size_in_bytes"))
         for k in ("argument", "output", "alias", "temp", "generated_code")}
  mem["total"] = (mem["argument"] + mem["output"] - mem["alias"] + mem["generated_code"]
                  + mem["temp"])
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) and cost else cost
  flops = float(cost.get("flops", float("nan"))) if isinstance(cost, dict) else float("nan")
  trainable, frozen = _count(params), _count(model.frozen)
  return {
      "mesh": dict(mesh.shape), "devices": int(mesh.size), "batch": int(batch),
      "tokens": cfg.max_tokens, "out_dim": int(out_dim),
      "decoder": {"source": f"preset:{cfg.shapes}" if cfg.shapes else cfg.source,
                  "hidden": llm.hidden, "layers": llm.layers, "vocab_size": llm.vocab_size,
                  "param_dtype": str(jnp.dtype(llm.param_dtype)),
                  "compute_dtype": cfg.compute_dtype, "full_finetune": cfg.full_finetune},
      "param_counts": {"trainable": trainable, "lora": _count(params, lambda p: "lora" in p),
                       "head": _count(params, lambda p: "'head'" in p), "frozen_base": frozen,
                       "total": trainable + frozen},
      "per_device_bytes": mem, "flops_per_step_per_device": flops,
      "flops_per_step": flops * mesh.size, "compile_seconds": round(seconds, 2)}
