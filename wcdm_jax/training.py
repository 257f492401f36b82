"""Training the per-scale denoisers (method.md §4), data-parallel over every device.

Two recipes (``RECIPES``): 'paper' is method.md §4 exactly; 'default' adds a linear warm-up,
a cosine decay and an exponential moving average of the weights, which converge at the budgets
of a CPU or of one accelerator-hour where the paper's recipe, tuned for 500 epochs at batch
512, does not (docs/training.md, benchmarks/bench_training.py).

One jitted step per net. Batches are global ``jax.Array``s sharded along the batch axis of
a 1-D device mesh (``"data"``) spanning all devices of all hosts; params are replicated.
Batch-norm statistics and gradients are means over the *global* batch, so one step gives
the same result on any number of devices.

Each net sees its part of the wavelet pyramid of the clean batch:
- flat: the image; low: the coarsest low-pass x_J times U(0, 1) (intensity augmentation);
- cond j: input [clean low-pass at level j, noisy details of level j]; noise only on the
  details, its range scaled by the largest detail magnitude of the training data.
Noise: per image std = (k / 255), k ~ U{lo..hi}, squared when ``quadratic``; the loss is the
summed squared error between the net's output and the noise, divided by the batch size.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from wcdm_jax import models, wavelets


# The optimisation recipes: the paper's (method.md §4) and this project's default, chosen by
# measurement with benchmarks/bench_training.py (docs/training.md has the figures). A recipe
# sets these TrainConfig fields; ``TrainConfig.from_recipe`` takes it and any overrides.
RECIPES = {
    "paper": dict(schedule="halving", warmup_steps=0, clip_factor=None, ema_decay=0.0,
                  gain_init=None, bn_momentum=0.1, zero_init_output=False),
    "default": dict(schedule="cosine", warmup_steps=-1, clip_factor=None, ema_decay=0.999,
                    gain_init=None, bn_momentum=0.1, zero_init_output=False),
}
# What checkpoints written before the recipe fields existed were trained with.
LEGACY_RECIPE = "paper"
SCHEDULES = ("halving", "cosine")
COSINE_END = 0.01       # the cosine schedule ends at this fraction of the learning rate
AUTO_WARMUP_MAX = 200   # warmup_steps=-1: min(AUTO_WARMUP_MAX, num_steps // 10) steps


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """Optimisation settings shared by all nets of a run (defaults: RECIPES['default']).

  Step counts (num_steps, lr_halve_every, warmup_steps) are the finest net's; a net at
  pyramid level j runs level_multiplier**j times as many of each.
  """
  batch_size: int = 512
  learning_rate: float = 1e-3
  num_steps: int = 10_000          # steps of the finest net; coarser nets get more (below)
  lr_halve_every: int = 1_000      # 'halving' schedule: steps between learning-rate halvings
  level_multiplier: float = 4.0    # net at pyramid level j trains multiplier**j x longer
  noise_min: int = 0               # noise std range in /255 units
  noise_max: int = 255
  quadratic_noise: bool = True
  intensity_augmentation: bool = True  # low-pass net only
  seed: int = 0
  conv_impl: str = "auto"
  remat: bool = False
  dtype: str = "float32"           # compute dtype of the convolutions: float32 | bfloat16
  # (parameters, batch-norm statistics, the loss and Adam stay float32)
  recipe: str = "default"          # the recipe the fields below came from (bookkeeping)
  schedule: str = "cosine"         # 'halving': lr / 2 every lr_halve_every steps (the paper's);
  # 'cosine': cosine decay from learning_rate to COSINE_END of it over the net's steps
  warmup_steps: int = -1           # linear warm-up from 0; -1: min(200, num_steps // 10)
  clip_factor: float | None = None  # clip the gradient's global norm at clip_factor x its
  # running mean (clip_by_running_norm); None: no clipping
  ema_decay: float = 0.999         # EMA of the weights for evaluation, sampling and the
  # checkpoints' 'model' item (decay min(ema_decay, (1 + t) / (10 + t)) at step t); 0: none
  gain_init: float | None = None   # batch-norm gains at init: None = the paper's, else constant
  zero_init_output: bool = False   # last conv starts at 0: the denoiser starts as the identity
  bn_momentum: float = 0.1         # running-std momentum of the batch norm

  def __post_init__(self):
    if self.dtype not in ("float32", "bfloat16"):
      raise ValueError(f"dtype must be 'float32' or 'bfloat16', got {self.dtype!r}")
    if self.recipe not in RECIPES:
      raise ValueError(f"recipe must be one of {sorted(RECIPES)}, got {self.recipe!r}")
    if self.schedule not in SCHEDULES:
      raise ValueError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
    if self.warmup_steps < -1:
      raise ValueError(f"warmup_steps must be >= 0 (or -1: automatic), got {self.warmup_steps}")
    if self.warmup_steps >= self.num_steps:
      raise ValueError(f"warmup_steps ({self.warmup_steps}) must be shorter than the run "
                       f"(num_steps {self.num_steps})")
    if self.clip_factor is not None and not self.clip_factor > 0:
      raise ValueError(f"clip_factor must be > 0 (or None: no clipping), got {self.clip_factor}")
    if not (self.ema_decay == 0 or 0 < self.ema_decay < 1):
      raise ValueError(f"ema_decay must be in (0, 1), or 0 for no EMA, got {self.ema_decay}")
    if not 0 < self.bn_momentum <= 1:
      raise ValueError(f"bn_momentum must be in (0, 1], got {self.bn_momentum}")
    if self.gain_init is not None and not np.isfinite(self.gain_init):
      raise ValueError(f"gain_init must be a finite number or None, got {self.gain_init}")

  @classmethod
  def from_recipe(cls, recipe: str = "default", **overrides) -> "TrainConfig":
    """The recipe's settings, then ``overrides`` (any TrainConfig fields)."""
    if recipe not in RECIPES:
      raise ValueError(f"recipe must be one of {sorted(RECIPES)}, got {recipe!r}")
    return cls(**dict(RECIPES[recipe], recipe=recipe, **overrides))

  def warmup(self) -> int:
    """Warm-up steps of the finest net (resolving -1)."""
    if self.warmup_steps == -1:
      return min(AUTO_WARMUP_MAX, self.num_steps // 10)
    return self.warmup_steps


def net_level(spec: models.ModelSpec, name: str) -> int:
  """Pyramid level of a net for the schedule: cond j -> j, low -> J - 1, flat -> 0."""
  net = spec.nets[name]
  return {"flat": 0, "low": max(spec.levels - 1, 0)}.get(net.kind, net.level)


def _net_steps(spec: models.ModelSpec, name: str, cfg: TrainConfig, steps: int) -> int:
  return int(round(steps * cfg.level_multiplier ** net_level(spec, name)))


def net_num_steps(spec: models.ModelSpec, name: str, cfg: TrainConfig) -> int:
  return _net_steps(spec, name, cfg, cfg.num_steps)


def learning_rate_schedule(spec: models.ModelSpec, name: str, cfg: TrainConfig) -> optax.Schedule:
  """The named net's learning rate against its step: linear warm-up, then halving or cosine."""
  total = max(1, net_num_steps(spec, name, cfg))
  warm = min(_net_steps(spec, name, cfg, cfg.warmup()), total - 1)
  if cfg.schedule == "cosine":
    decay = optax.cosine_decay_schedule(cfg.learning_rate, total - warm, COSINE_END)
  else:
    every = max(1, _net_steps(spec, name, cfg, cfg.lr_halve_every))
    decay = optax.exponential_decay(cfg.learning_rate, every, 0.5, staircase=True)
  if warm == 0:
    return decay
  return optax.join_schedules([optax.linear_schedule(0.0, cfg.learning_rate, warm), decay], [warm])


class RunningNormState(NamedTuple):
  mean: jax.Array   # running mean of the (clipped) gradient norms
  count: jax.Array


def clip_by_running_norm(factor: float, decay: float = 0.99) -> optax.GradientTransformation:
  """Scale the gradient down to ``factor`` x the running mean of past gradient norms.

  The threshold follows the gradients' own scale (which grows with the image size and the
  noise level), so one factor serves every net; the first step sets the reference.
  """
  def init(params):
    del params
    return RunningNormState(jnp.zeros((), jnp.float32), jnp.zeros((), jnp.int32))

  def update(updates, state, params=None):
    del params
    norm = optax.tree.norm(updates)
    ref = jnp.where(state.count == 0, norm, state.mean)
    limit = factor * ref
    scale = jnp.where(norm > limit, limit / jnp.maximum(norm, 1e-30), 1.0)
    updates = jax.tree.map(lambda g: g * scale.astype(g.dtype), updates)
    mean = decay * ref + (1 - decay) * jnp.minimum(norm, limit)
    return updates, RunningNormState(mean, state.count + 1)

  return optax.GradientTransformation(init, update)


def make_optimizer(spec: models.ModelSpec, name: str, cfg: TrainConfig) -> optax.GradientTransformation:
  """Adam on ``learning_rate_schedule``, after clipping when the recipe clips."""
  adam = optax.adam(learning_rate_schedule(spec, name, cfg))
  if cfg.clip_factor is None:
    return adam
  return optax.chain(clip_by_running_norm(cfg.clip_factor), adam)


@struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any
  ema: Any = None  # {'params', 'batch_stats'}: the weights' moving average (ema_decay > 0)

  def variables(self) -> models.Variables:
    """The weights being optimised."""
    return {"params": self.params, "batch_stats": self.batch_stats}

  def eval_variables(self) -> models.Variables:
    """What evaluation, sampling and checkpoints' 'model' use: the EMA when there is one."""
    return self.ema if self.ema is not None else self.variables()

  def as_dict(self) -> dict[str, Any]:
    d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
    if d["ema"] is None:  # runs without EMA keep the checkpoint layout they always had
      del d["ema"]
    return d


def init_state(key: jax.Array, net: models.NetSpec, tx: optax.GradientTransformation,
               cfg: TrainConfig) -> TrainState:
  """Fresh variables (gains per ``cfg.gain_init``; the last convolution zero with
  ``cfg.zero_init_output``, so that y - f(y) starts as the identity and never destroys a clean
  image while it learns), optimiser state, and the EMA if any."""
  v = models.init_net(key, net, gain_init=cfg.gain_init)
  if cfg.zero_init_output:
    last = f"conv_{net.num_layers - 1}"
    v["params"] = {**v["params"], last: {"kernel": jnp.zeros_like(v["params"][last]["kernel"])}}
  return TrainState(step=jnp.zeros((), jnp.int32), params=v["params"],
                    batch_stats=v["batch_stats"], opt_state=tx.init(v["params"]),
                    ema=jax.tree.map(jnp.copy, v) if cfg.ema_decay else None)


def ema_update(ema: Any, variables: Any, step: jax.Array, decay: float) -> Any:
  """One EMA step after optimiser step ``step`` (0-based): short runs average few steps."""
  d = jnp.minimum(decay, (1.0 + step) / (10.0 + step)).astype(jnp.float32)
  return jax.tree.map(lambda e, v: d * e + (1 - d) * v, ema, variables)


def noise_stds(key: jax.Array, n: int, cfg: TrainConfig) -> jax.Array:
  """(n,) per-image noise std, in units of the clean signal's range."""
  k = jax.random.randint(key, (n,), cfg.noise_min, cfg.noise_max + 1)
  std = k.astype(jnp.float32) / 255.0
  return jnp.square(std) if cfg.quadratic_noise else std


def net_example(spec: models.ModelSpec, name: str, images: jax.Array, key: jax.Array,
                cfg: TrainConfig, noise_scale: float = 1.0) -> tuple[jax.Array, jax.Array]:
  """(noisy input, target noise) of the named net for a clean batch (B, H, W, C)."""
  net = spec.nets[name]
  k_std, k_noise, k_int = jax.random.split(key, 3)
  b = images.shape[0]
  std = noise_stds(k_std, b, cfg) * noise_scale
  if net.kind == "flat":
    clean, cond = images, None
  else:
    lows, details = wavelets.analysis(images, spec.levels, spec.wavelet, spec.mode)
    if net.kind == "low":
      clean, cond = lows[-1], None
      if cfg.intensity_augmentation:
        clean = clean * jax.random.uniform(k_int, (b, 1, 1, 1))
    else:
      clean, cond = details[net.level], lows[net.level]
  noise = jax.random.normal(k_noise, clean.shape, clean.dtype) * std[:, None, None, None]
  noisy = clean + noise
  return (noisy if cond is None else jnp.concatenate([cond, noisy], -1)), noise


def detail_noise_scales(spec: models.ModelSpec, batches: list[np.ndarray]) -> dict[str, float]:
  """Largest |detail coefficient| per level over some training batches: cond nets' noise scale."""
  scales = {c.name: 0.0 for c in spec.conditionals}
  analyse = jax.jit(functools.partial(wavelets.analysis, levels=spec.levels,
                                      wavelet=spec.wavelet, mode=spec.mode))
  for batch in batches:
    _, details = analyse(jnp.asarray(batch))
    for c in spec.conditionals:
      scales[c.name] = max(scales[c.name], float(jnp.max(jnp.abs(details[c.level]))))
  return scales


def loss_fn(params, batch_stats, net: models.NetSpec, noisy, noise, *, conv_impl="auto",
            remat=False, dtype="float32", bn_momentum=models.BN_MOMENTUM):
  model = models.BFCNN(net, conv_impl=conv_impl, remat=remat, dtype=jnp.dtype(dtype),
                       bn_momentum=bn_momentum)
  pred, updates = model.apply({"params": params, "batch_stats": batch_stats}, noisy, train=True,
                              mutable=["batch_stats"])
  loss = jnp.sum(jnp.square(pred - noise)) / noisy.shape[0]
  return loss, updates["batch_stats"]


def make_mesh(devices=None) -> Mesh:
  """1-D mesh over all devices of all hosts (or ``devices``), axis 'data'."""
  return Mesh(np.asarray(devices if devices is not None else jax.devices()), ("data",))


def make_train_step(spec: models.ModelSpec, name: str, tx: optax.GradientTransformation,
                    cfg: TrainConfig, mesh: Mesh, noise_scale: float = 1.0) -> Callable:
  """Jitted ``step(state, images, key) -> (state, metrics)`` for one net.

  images: global (B, H, W, C) array sharded on the mesh's 'data' axis; state replicated
  and donated.
  """
  net = spec.nets[name]

  def step(state: TrainState, images: jax.Array, key: jax.Array):
    noisy, noise = net_example(spec, name, images, key, cfg, noise_scale)
    noisy = jax.lax.with_sharding_constraint(noisy, NamedSharding(mesh, P("data")))
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    (loss, batch_stats), grads = grad_fn(state.params, state.batch_stats, net, noisy, noise,
                                         conv_impl=cfg.conv_impl, remat=cfg.remat,
                                         dtype=cfg.dtype, bn_momentum=cfg.bn_momentum)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    ema = state.ema
    if ema is not None:
      ema = ema_update(ema, {"params": params, "batch_stats": batch_stats}, state.step,
                       cfg.ema_decay)
    new = TrainState(step=state.step + 1, params=params, batch_stats=batch_stats,
                     opt_state=opt_state, ema=ema)
    return new, {"loss": loss, "grad_norm": optax.tree.norm(grads)}

  replicated = NamedSharding(mesh, P())
  return jax.jit(step, in_shardings=(replicated, NamedSharding(mesh, P("data")), replicated),
                 out_shardings=(replicated, replicated), donate_argnums=(0,))


def global_batch(host_batch: np.ndarray, mesh: Mesh) -> jax.Array:
  """This host's share of the batch -> the global array sharded along 'data'."""
  return jax.make_array_from_process_local_data(NamedSharding(mesh, P("data")), host_batch)


def replicate(tree: Any, mesh: Mesh) -> Any:
  return jax.device_put(tree, NamedSharding(mesh, P()))


def step_key(seed: int, step: int, net_index: int) -> jax.Array:
  """The RNG key of one net's step: a pure function of (seed, step, net), so resumable."""
  return jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), step), net_index)
