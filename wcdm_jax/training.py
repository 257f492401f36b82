"""Training the per-scale denoisers (method.md §4), data-parallel over every device.

Two recipes (``RECIPES``): 'paper' is method.md §4 exactly; 'default' adds a linear warm-up,
a cosine decay, an exponential moving average of the weights, a loss balanced over noise
levels and noise levels stratified over each batch, which do better at the budgets of a CPU
or of one accelerator-hour, where the paper's recipe, tuned for 500 epochs at batch 512,
leaves the nets far from the identity at small noise (docs/experiments/training_log.md,
benchmarks/bench_training.py).

One jitted step per net. Batches are global ``jax.Array``s sharded along the batch axis of
a 1-D device mesh (``"data"``) spanning all devices of all hosts; params are replicated.
Batch-norm statistics and gradients are means over the *global* batch, so one step gives
the same result on any number of devices.

Each net sees its part of the wavelet pyramid of the clean batch:
- flat: the image; low: the coarsest low-pass x_J;
- cond j: input [clean low-pass at level j, noisy details of level j]; noise only on the
  details, its range scaled by the largest detail magnitude of the training data.
Intensity augmentation scales each image's clean signal by U(0, 1): the paper's for the
low-pass net only; the default also for the conditional nets, which teaches them noise above
their range, where multi-scale denoising at high noise takes them (docs/experiments/training_log.md).
Noise: per image std = (k / 255), k ~ U{lo..hi} (independently per image, the paper's; or, the
default, stratified: one k in each 1/B of the range, so that every batch spans it), squared
when ``quadratic``; the loss is the summed squared error between the net's output and the
noise, divided by the batch size (``loss_weighting='none'``, the paper's); or each image's
error divided by an estimate of the net's current error at its noise level (``'balanced'``,
the default: a running mean per band of noise levels, kept in the train state), so that every
noise level counts by its *relative* error, which is what a PSNR averaged over noise levels
measures; or divided by the noise variance (``'snr'``). See ``loss_weights``.
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

from wcdm_jax import conv, models, parallel, wavelets
from wcdm_jax.settings import setting


# The optimisation recipes: the paper's (method.md §4) and this project's default, chosen by
# measurement with benchmarks/bench_training.py (docs/experiments/training_log.md has the figures). A recipe
# sets these TrainConfig fields (RECIPE_FIELDS); ``TrainConfig.from_recipe`` takes it and any
# overrides. TrainConfig's own defaults are the 'default' recipe's (a test checks it).
RECIPES = {
    "paper": dict(schedule="halving", warmup_steps=0, clip_factor=None, ema_decay=0.0,
                  gain_init=None, bn_momentum=0.1, zero_init_output=False,
                  loss_weighting="none", noise_sampling="independent",
                  intensity_augmentation_nets="low"),
    "default": dict(schedule="cosine", warmup_steps=-1, clip_factor=None, ema_decay=0.999,
                    gain_init=None, bn_momentum=0.1, zero_init_output=False,
                    loss_weighting="balanced", noise_sampling="stratified",
                    intensity_augmentation_nets="multiscale"),
}
SCHEDULES = ("halving", "cosine")
LOSS_WEIGHTINGS = ("none", "snr", "balanced")
NOISE_SAMPLINGS = ("independent", "stratified")
# intensity_augmentation_nets -> the kinds of net it augments
AUGMENTED_KINDS = {"low": ("low",), "multiscale": ("low", "cond"), "all": ("low", "cond", "flat")}
AUGMENTED_NETS = tuple(AUGMENTED_KINDS)
RECIPE_FIELDS = tuple(RECIPES["default"])
LOSS_BINS = 16            # 'balanced': bands of noise levels k with one running error each
LOSS_STATS_DECAY = 0.99   # their moving average's decay per step
COSINE_END = 0.01       # the cosine schedule ends at this fraction of the learning rate
AUTO_WARMUP_MAX = 200   # warmup_steps=-1: min(AUTO_WARMUP_MAX, num_steps // 10) steps


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """Optimisation settings shared by all nets of a run (defaults: RECIPES['default']).

  ``TrainConfig.from_recipe('paper', **overrides)`` gives another recipe's settings; the
  fields a recipe sets are ``RECIPE_FIELDS``. Step counts (num_steps, lr_halve_every,
  warmup_steps) are the finest net's; a net at pyramid level j runs level_multiplier**j times
  as many of each. Parameters, batch-norm statistics, the loss and Adam are float32 whatever
  ``dtype`` is.
  """
  batch_size: int = setting(512, "Global batch size (split over every device of every host).")
  learning_rate: float = setting(1e-3, "Adam learning rate.")
  num_steps: int = setting(10_000, "Steps of the finest net; a net at level j runs "
                           "level_multiplier**j times as many.", resumable=True)
  lr_halve_every: int = setting(1_000, "Finest net's steps between learning-rate halvings "
                                "(schedule 'halving').")
  level_multiplier: float = setting(4.0, "A net at pyramid level j trains multiplier**j times "
                                    "longer.")
  noise_min: int = setting(0, "Smallest training noise std, /255.")
  noise_max: int = setting(255, "Largest training noise std, /255.")
  quadratic_noise: bool = setting(True, "Square the sampled std (favours small noise).")
  intensity_augmentation: bool = setting(True, "Scale each image's clean signal by U(0, 1) "
                                         "for the nets intensity_augmentation_nets names.")
  seed: int = setting(0, "Seed of initialisation, noise and data order.")
  conv_impl: str = setting("auto", "How convolutions run: auto = the native kernels of the "
                           "CPU's ISA (AVX-512, AVX2) where built, else XLA; "
                           "WCDM_JAX_NATIVE_ISA forces one (wcdm_jax.conv).",
                           choices=conv.CONV_IMPLS, resumable=True)
  remat: bool = setting(False, "Rematerialise each block in the backward pass (less memory).",
                        resumable=True)
  dtype: str = setting("float32", "Compute dtype of the nets' convolutions (parameters, "
                       "statistics, the loss and Adam stay float32).",
                       choices=("float32", "bfloat16"), resumable=True)
  schedule: str = setting("cosine", "Learning-rate decay: 'halving' every lr_halve_every steps "
                          "(the paper's) or 'cosine' to 1% over the net's steps.",
                          choices=SCHEDULES)
  warmup_steps: int = setting(-1, "Linear warm-up steps of the finest net (-1: min(200, "
                              "num_steps // 10)).")
  clip_factor: float | None = setting(None, "Clip the gradient's global norm at this many "
                                      "times its running mean (None: no clipping).")
  ema_decay: float = setting(0.999, "Decay of the weights' moving average used for "
                             "evaluation, sampling and the saved model (0: none).")
  gain_init: float | None = setting(None, "Initial batch-norm gains: a constant, or None for "
                                    "the paper's N(0, 1) 2/9/64 clipped to 0.025.",
                                    none_word="paper")
  zero_init_output: bool = setting(False, "Start the last convolution at zero (the denoiser "
                                   "starts as the identity).")
  bn_momentum: float = setting(0.1, "Batch-norm running-std momentum.")
  loss_weighting: str = setting("balanced", "Per-image loss weight: 'none' = summed squared "
                                "error (the paper's); 'snr' = each image's error / (std^2 + "
                                "floor^2); 'balanced' = / (the net's running error at that "
                                "noise level + floor^2) (loss_weights).",
                                choices=LOSS_WEIGHTINGS)
  loss_weight_floor: float = setting(4.0, "Floor of the weighted losses' noise std, /255 (image "
                                     "units for every net).")
  loss_weight_power: float = setting(0.5, "Raise the loss weights to this power, in [0, 1] (0: "
                                     "unweighted).")
  noise_sampling: str = setting("stratified", "A batch's noise levels: 'independent' draws (the "
                                "paper's) or 'stratified', one in each 1/batch of the range at "
                                "a random shift, shuffled.", choices=NOISE_SAMPLINGS)
  intensity_augmentation_nets: str = setting(
      "multiscale", "Nets whose images are intensity-augmented: 'low' = the low-pass net only "
      "(the paper's); 'multiscale' = also the conditional nets (details with their "
      "conditioning low-pass); 'all' = also flat nets.", choices=AUGMENTED_NETS)

  def __post_init__(self):
    for name, low in (("batch_size", 1), ("num_steps", 1), ("lr_halve_every", 1),
                      ("noise_min", 0)):
      if getattr(self, name) < low:
        raise ValueError(f"{name} must be >= {low}, got {getattr(self, name)}")
    if self.noise_max < self.noise_min:
      raise ValueError(f"noise_max ({self.noise_max}) must be >= noise_min ({self.noise_min})")
    if not self.learning_rate >= 0:  # (inf is allowed: the loop stops at the non-finite loss)
      raise ValueError(f"learning_rate must be >= 0, got {self.learning_rate}")
    if not (np.isfinite(self.level_multiplier) and self.level_multiplier >= 0):
      raise ValueError(f"level_multiplier must be a finite number >= 0, got "
                       f"{self.level_multiplier}")
    if self.dtype not in ("float32", "bfloat16"):
      raise ValueError(f"dtype must be 'float32' or 'bfloat16', got {self.dtype!r}")
    if self.conv_impl not in conv.CONV_IMPLS:
      raise ValueError(f"conv_impl must be one of {conv.CONV_IMPLS}, got {self.conv_impl!r}")
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
    if self.loss_weighting not in LOSS_WEIGHTINGS:
      raise ValueError(f"loss_weighting must be one of {LOSS_WEIGHTINGS}, "
                       f"got {self.loss_weighting!r}")
    if self.noise_sampling not in NOISE_SAMPLINGS:
      raise ValueError(f"noise_sampling must be one of {NOISE_SAMPLINGS}, "
                       f"got {self.noise_sampling!r}")
    if self.intensity_augmentation_nets not in AUGMENTED_NETS:
      raise ValueError(f"intensity_augmentation_nets must be one of {AUGMENTED_NETS}, "
                       f"got {self.intensity_augmentation_nets!r}")
    if not (np.isfinite(self.loss_weight_power) and 0 <= self.loss_weight_power <= 1):
      raise ValueError(f"loss_weight_power must be in [0, 1], got {self.loss_weight_power}")
    if not (np.isfinite(self.loss_weight_floor) and self.loss_weight_floor > 0):
      raise ValueError(f"loss_weight_floor must be > 0 (/255 units), got {self.loss_weight_floor}")
    if self.gain_init is not None and not np.isfinite(self.gain_init):
      raise ValueError(f"gain_init must be a finite number or None, got {self.gain_init}")

  @classmethod
  def from_recipe(cls, recipe: str = "default", **overrides) -> "TrainConfig":
    """The recipe's settings (``RECIPES``), then ``overrides`` (any TrainConfig fields)."""
    if recipe not in RECIPES:
      raise ValueError(f"recipe must be one of {sorted(RECIPES)}, got {recipe!r}")
    return cls(**dict(RECIPES[recipe], **overrides))

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
  """The number of steps net ``name`` trains for under ``cfg`` (level multipliers applied)."""
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
  loss_stats: Any = None  # (LOSS_BINS,) running errors of the 'balanced' loss weighting

  def variables(self) -> models.Variables:
    """The weights being optimised."""
    return {"params": self.params, "batch_stats": self.batch_stats}

  def eval_variables(self) -> models.Variables:
    """What evaluation, sampling and checkpoints' 'model' use: the EMA when there is one."""
    return self.ema if self.ema is not None else self.variables()

  def as_dict(self) -> dict[str, Any]:
    """The state as a plain dict (what a checkpoint stores)."""
    d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
    for optional in ("ema", "loss_stats"):  # runs without keep the layout they always had
      if d[optional] is None:
        del d[optional]
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
                    ema=jax.tree.map(jnp.copy, v) if cfg.ema_decay else None,
                    loss_stats=init_loss_stats(cfg))


def ema_update(ema: Any, variables: Any, step: jax.Array, decay: float) -> Any:
  """One EMA step after optimiser step ``step`` (0-based): short runs average few steps."""
  d = jnp.minimum(decay, (1.0 + step) / (10.0 + step)).astype(jnp.float32)
  return jax.tree.map(lambda e, v: d * e + (1 - d) * v, ema, variables)


def net_scale(spec: models.ModelSpec, name: str) -> float:
  """The size of one unit of the named net's coefficients in image units' terms: the
  normalised pyramid divides level j's bands by 2^(j+1) (wavelets), so noise of std s on the
  image is s / 2^(j+1) on the details of level j and s / 2^J on the low-pass x_J."""
  net = spec.nets[name]
  if net.kind == "flat":
    return 1.0
  return wavelets.band_scale(spec.levels if net.kind == "low" else net.level + 1)


def noise_level(k, cfg: TrainConfig):
  """Noise level k (/255 units; a jax or numpy int array) -> (its noise std in units of the
  clean signal's range, its band of the LOSS_BINS equal ranges of noise_min..noise_max)."""
  std = k / 255.0
  band = (k - cfg.noise_min) * LOSS_BINS // (cfg.noise_max - cfg.noise_min + 1)
  return (std * std if cfg.quadratic_noise else std), band


def noise_draws(key: jax.Array, n: int, cfg: TrainConfig) -> tuple[jax.Array, jax.Array]:
  """(n,) per-image noise std, in units of the clean signal's range, and (n,) its band of
  noise levels (``noise_level``): k ~ U{noise_min..noise_max}, independent per image; or,
  'stratified', the n images' levels one in each n-th of the range, at one random shift,
  in random order (each k still uniform, but every batch spans the whole range, so its loss
  and gradient vary less from batch to batch)."""
  if cfg.noise_sampling == "independent":
    k = jax.random.randint(key, (n,), cfg.noise_min, cfg.noise_max + 1)
  else:
    k_shift, k_order = jax.random.split(key)
    u = (jnp.arange(n) + jax.random.uniform(k_shift, (), jnp.float32)) / n  # (n,) in [0, 1)
    width = cfg.noise_max - cfg.noise_min + 1
    k = cfg.noise_min + jnp.minimum(jnp.floor(u * width).astype(jnp.int32), width - 1)
    k = jax.random.permutation(k_order, k)
  std, band = noise_level(k, cfg)
  return std.astype(jnp.float32), band.astype(jnp.int32)


class Example(NamedTuple):
  noisy: jax.Array  # (B, H, W, C_in) the net's input
  noise: jax.Array  # (B, H, W, C_out) its target
  std: jax.Array    # (B,) the noise std of each image
  level: jax.Array  # (B,) int32: the band of noise levels it was drawn from (0..LOSS_BINS-1)


def augmented(kind: str, cfg: TrainConfig) -> bool:
  """Whether a net of ``kind`` ('flat' | 'low' | 'cond') has its images intensity-augmented."""
  return cfg.intensity_augmentation and kind in AUGMENTED_KINDS[cfg.intensity_augmentation_nets]


def net_example(spec: models.ModelSpec, name: str, images: jax.Array, key: jax.Array,
                cfg: TrainConfig, noise_scale: float = 1.0) -> Example:
  """The named net's example (noisy input, target noise, noise std, noise band) for a clean
  batch (B, H, W, C).

  Intensity augmentation multiplies each image's clean signal by a ~ U(0, 1) (a conditional
  net's details and its conditioning low-pass alike). The nets are homogeneous, f(a y) =
  a f(y), so an image dimmed by a under noise s is the image under noise s / a: the
  augmented nets see every signal-to-noise ratio down to 0, and beyond the top of the noise
  range they denoise as they were trained to instead of extrapolating (docs/experiments/training_log.md).
  """
  net = spec.nets[name]
  k_std, k_noise, k_int = jax.random.split(key, 3)
  b = images.shape[0]
  std, level = noise_draws(k_std, b, cfg)
  std = std * noise_scale
  if net.kind == "flat":
    clean, cond = images, None
  else:
    lows, details = wavelets.analysis(images, spec.levels, spec.wavelet, spec.mode)
    if net.kind == "low":
      clean, cond = lows[-1], None
    else:
      clean, cond = details[net.level], lows[net.level]
  if augmented(net.kind, cfg):
    a = jax.random.uniform(k_int, (b, 1, 1, 1), jnp.float32)
    clean = clean * a
    cond = None if cond is None else cond * a
  noise = jax.random.normal(k_noise, clean.shape, clean.dtype) * std[:, None, None, None]
  noisy = clean + noise
  return Example(noisy if cond is None else jnp.concatenate([cond, noisy], -1), noise, std,
                 level)


def loss_weights(ex: Example, cfg: TrainConfig, loss_stats: jax.Array | None = None,
                 scale: float = 1.0) -> jax.Array | None:
  """(B,) per-image loss weights of ``ex`` (None: unweighted).

  The unweighted loss (the paper's) is dominated by the noisiest images, whose error is
  largest; at a finite budget the nets then stay far from the identity at small noise (25 dB
  on clean images, docs/experiments/training_log.md). 'snr': 1 / (std^2 + floor^2), every level by its error
  relative to its noise; at high noise that under-weights what a denoiser can still gain.
  'balanced': 1 / (m + floor^2), m the net's running mean squared error per pixel at the
  image's band of noise levels (``loss_stats``, (LOSS_BINS,), < 0 where none yet, which
  falls back to 'snr'): every level counts by its error relative to the net's own, so the
  gradient is that of the mean over levels of log MSE (the mean PSNR over noise levels). The
  floor (``loss_weight_floor`` / 255 in image units) bounds the weights, and
  with them the gradient noise of nearly clean images; ``scale`` (``net_scale``) turns it
  into the net's coefficient units, so one floor means one image noise level for every net. Weights are per pixel of the target,
  then raised to ``loss_weight_power`` (between the unweighted loss, 0, and the weighting, 1).
  """
  if cfg.loss_weighting == "none":
    return None
  floor2 = jnp.square(cfg.loss_weight_floor / 255.0 * scale)
  pixels = float(np.prod(ex.noise.shape[1:]))
  err = pixels * (jnp.square(ex.std) + floor2)  # (B,) the expected error of the identity
  if cfg.loss_weighting == "balanced":
    est = loss_stats[ex.level]
    err = jnp.where(est >= 0, pixels * (est + floor2), err)
  return err ** -cfg.loss_weight_power


def init_loss_stats(cfg: TrainConfig) -> jax.Array | None:
  """The 'balanced' weighting's running errors before any step (none yet: -1)."""
  return -jnp.ones((LOSS_BINS,), jnp.float32) if cfg.loss_weighting == "balanced" else None


def update_loss_stats(stats: jax.Array, level: jax.Array, errors: jax.Array) -> jax.Array:
  """Fold one batch's per-pixel squared errors (B,) into the running mean of their bands."""
  sums = jax.ops.segment_sum(errors, level, LOSS_BINS)
  counts = jax.ops.segment_sum(jnp.ones_like(errors), level, LOSS_BINS)
  mean = sums / jnp.maximum(counts, 1.0)
  moved = jnp.where(stats >= 0, LOSS_STATS_DECAY * stats + (1 - LOSS_STATS_DECAY) * mean, mean)
  return jnp.where(counts > 0, moved, stats)


def identity_gains(cfg: TrainConfig, loss_stats: Any, noise_scale: float = 1.0,
                   scale: float = 1.0) -> list[tuple[float, float, float]]:
  """Per band of noise levels, (lowest, highest noise std in image units, the net's gain over
  the identity in dB) from the 'balanced' weighting's running errors (``loss_stats``): 10
  log10(the identity's mean squared error per pixel at that band / the net's). Negative: the
  net returns its input *worse* than it received it at those levels, the failure that makes a
  cascade of nets lose to its noisy input at small noise. NaN where a band has no error yet.
  ``noise_scale`` is the net's noise scale (the checkpoint meta's), ``scale`` its
  ``net_scale``; the stds are the training draws' (intensity augmentation changes the signal,
  not the noise)."""
  stats = np.asarray(loss_stats, np.float64)
  std, band = noise_level(np.arange(cfg.noise_min, cfg.noise_max + 1), cfg)
  std = std * noise_scale  # the net's units
  out = []
  for b in range(LOSS_BINS):
    s = std[band == b]
    if not s.size:
      continue
    with np.errstate(divide="ignore"):
      gain = (10 * np.log10(np.mean(np.square(s)) / stats[b]) if stats[b] >= 0 else np.nan)
    out.append((float(s.min() / scale), float(s.max() / scale), float(gain)))
  return out


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


def loss_fn(params, batch_stats, net: models.NetSpec, noisy, noise, *, weights=None,
            return_errors=False, conv_impl="auto", remat=False, dtype="float32",
            bn_momentum=models.BN_MOMENTUM, axis_name: str | None = None,
            batch_size: int | None = None):
  """Summed squared error between the net's output and ``noise`` (per image times
  ``weights`` (B,) when given), divided by the batch size; and the new batch statistics
  (with ``return_errors``: (them, (B,) each image's mean squared error per pixel)).

  Inside ``shard_map`` over the batch: ``axis_name`` is the batch's mesh axis (the batch
  norm's statistics are then the global batch's) and ``batch_size`` the global batch size
  (the result is this shard's part of the loss; their sum over the shards is the loss).
  """
  model = models.BFCNN(net, conv_impl=conv_impl, remat=remat, dtype=jnp.dtype(dtype),
                       bn_momentum=bn_momentum, axis_name=axis_name)
  pred, updates = model.apply({"params": params, "batch_stats": batch_stats}, noisy, train=True,
                              mutable=["batch_stats"])
  sq = jnp.square(pred - noise)
  aux = updates.get("batch_stats", {})
  if return_errors:
    aux = (aux, jax.lax.stop_gradient(jnp.mean(sq, axis=(1, 2, 3))))
  if weights is not None:
    sq = jnp.sum(sq, axis=(1, 2, 3)) * weights  # (B,)
  return jnp.sum(sq) / (batch_size or noisy.shape[0]), aux


make_mesh = parallel.make_mesh  # the training's names for the mesh helpers
global_batch = parallel.global_batch
replicate = parallel.replicate


def sharded_loss_and_grad(net: models.NetSpec, cfg: TrainConfig, mesh: Mesh,
                          weighted: bool) -> Callable:
  """``f(params, batch_stats, noisy, noise[, weights]) -> (loss, grads, batch_stats, errors)``
  for the global batch's ``loss_fn``, computed data-parallel (pmap semantics): each device
  runs the net forward and backward on its own shard inside ``shard_map``; the batch norm's
  statistics are all-reduced layer by layer (``models.batch_sd``) and the loss and the
  gradients of the replicated parameters in one all-reduce at the end. Nothing of the size
  of an activation crosses devices."""
  axis = parallel.DATA_AXIS if parallel.data_size(mesh) > 1 else None

  def value_and_grad(params, batch_stats, noisy, noise, *weights):
    # axis None (one device): the plain program, no size-1 collectives.
    def shard_loss(p):
      return loss_fn(p, batch_stats, net, noisy, noise, weights=weights[0] if weights else None,
                     return_errors=True, conv_impl=cfg.conv_impl, remat=cfg.remat,
                     dtype=cfg.dtype, bn_momentum=cfg.bn_momentum, axis_name=axis,
                     batch_size=cfg.batch_size if axis else None)
    if axis:
      # The parameters as this device's copy: their gradient is this shard's part, and the
      # parts are summed by the one psum below (not one all-reduce per parameter).
      params = jax.lax.pcast(params, axis, to="varying")
    (loss, (stats, errors)), grads = jax.value_and_grad(shard_loss, has_aux=True)(params)
    if axis:
      loss, grads = jax.lax.psum((loss, grads), axis)
    return loss, grads, stats, errors

  if axis is None:
    return value_and_grad
  data, rep = P(parallel.DATA_AXIS), P()
  return jax.shard_map(value_and_grad, mesh=mesh, in_specs=(rep, rep, data, data) + ((data,) * weighted),
                       out_specs=(rep, rep, rep, data))


def check_batch(cfg: TrainConfig, mesh: Mesh) -> None:
  """ValueError naming the sizes unless the training batch divides over the mesh's devices."""
  n = parallel.data_size(mesh)
  if cfg.batch_size % n:
    raise ValueError(f"batch_size {cfg.batch_size} does not divide over the {n} devices "
                     f"({mesh.devices.flat[0].platform}); use a multiple of {n}, e.g. "
                     f"{max(n, cfg.batch_size // n * n)} or {(cfg.batch_size // n + 1) * n}")


def make_train_step(spec: models.ModelSpec, name: str, tx: optax.GradientTransformation,
                    cfg: TrainConfig, mesh: Mesh, noise_scale: float = 1.0,
                    net_index: int | None = None) -> Callable:
  """Jitted ``step(state, images) -> (state, metrics)`` for one net.

  images: global (B, H, W, C) array sharded on the mesh's 'data' axis; state replicated
  and donated. The step's RNG key is ``step_key(cfg.seed, state.step, net_index)``, folded
  in on the device (net_index: the net's index in ``spec.nets`` unless given), so the host
  never waits for the step counter. The forward and backward passes run data-parallel
  (``sharded_loss_and_grad``).
  """
  parallel.check_mesh(mesh)
  check_batch(cfg, mesh)
  net = spec.nets[name]
  scale = net_scale(spec, name)
  index = list(spec.nets).index(name) if net_index is None else net_index
  data = NamedSharding(mesh, P(parallel.DATA_AXIS))
  weighted = cfg.loss_weighting != "none"
  loss_and_grad = sharded_loss_and_grad(net, cfg, mesh, weighted)

  def step(state: TrainState, images: jax.Array):
    key = step_key(cfg.seed, state.step, index)
    ex = net_example(spec, name, images, key, cfg, noise_scale)
    noisy = jax.lax.with_sharding_constraint(ex.noisy, data)
    noise = jax.lax.with_sharding_constraint(ex.noise, data)
    weights = loss_weights(ex, cfg, state.loss_stats, scale)
    args = (noisy, noise) + ((jax.lax.with_sharding_constraint(weights, data),) if weighted else ())
    value, grads, batch_stats, errors = loss_and_grad(state.params, state.batch_stats, *args)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    ema = state.ema
    if ema is not None:
      ema = ema_update(ema, {"params": params, "batch_stats": batch_stats}, state.step,
                       cfg.ema_decay)
    loss_stats = state.loss_stats
    if loss_stats is not None:
      loss_stats = update_loss_stats(loss_stats, ex.level, errors)
    new = TrainState(step=state.step + 1, params=params, batch_stats=batch_stats,
                     opt_state=opt_state, ema=ema, loss_stats=loss_stats)
    return new, {"loss": value, "grad_norm": optax.tree.norm(grads)}

  replicated = NamedSharding(mesh, P())
  return jax.jit(step, in_shardings=(replicated, data), out_shardings=(replicated, replicated),
                 donate_argnums=(0,))


def train_step(spec: models.ModelSpec, name: str, cfg: TrainConfig, mesh: Mesh,
               noise_scale: float = 1.0, net_index: int | None = None) -> Callable:
  """``make_train_step`` with the net's optimiser (``make_optimizer(spec, name, cfg)``), made
  once per process for these arguments: another run with the same settings (a resumed run, a
  sweep in a notebook) reuses its trace and compilation instead of redoing them."""
  parallel.check_mesh(mesh)  # its message, not the cache's "unhashable type"
  return _cached_train_step(spec, name, cfg, mesh, noise_scale, net_index)


@functools.lru_cache(maxsize=8)
def _cached_train_step(spec, name, cfg, mesh, noise_scale, net_index):
  return make_train_step(spec, name, make_optimizer(spec, name, cfg), cfg, mesh, noise_scale,
                         net_index)


def step_key(seed: int, step, net_index: int) -> jax.Array:
  """The RNG key of one net's step: a pure function of (seed, step, net), so resumable.
  ``step`` may be a traced scalar (the train step folds it in on the device)."""
  return jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), step), net_index)
