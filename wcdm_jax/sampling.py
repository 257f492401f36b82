"""Sampling by stochastic coarse-to-fine gradient ascent (method.md §5).

``ascent`` runs one scale for a batch in a single ``lax.scan`` over ``max_steps``; every
sample stops on its own rule (it freezes; once all have stopped, the scan body skips the
network). Sample b only ever uses its own key, so a batch equals the same samples drawn one
at a time. ``sample``, ``super_resolve`` chain the scales coarse to fine.
"""
from __future__ import annotations

import dataclasses
import functools
import json
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jax.sharding import Mesh

from wcdm_jax import models, parallel, validation, wavelets
from wcdm_jax.settings import setting


@dataclasses.dataclass(frozen=True)
class AscentConfig:
  """Settings of one scale's ascent.

  h0: step size (first step when ``ascending``); beta in (0, 1]: injected noise (1 = none);
  sigma_0: std of the initial state; sigma_L: stop once 20 log10(std(y) / sigma_t) >=
  20 log10(1 / sigma_L); abort_sigma: stop and flag a sample whose sigma_t exceeds it (or is
  not finite); mean_0: mean of the initial state, y_0 ~ N(mean_0, sigma_0^2). The authors
  start every scale at 0 and rescale the sampled low-pass afterwards (``low_rescale``): a
  bias-free net keeps the mean grey it is given, so a low-pass ascent started at 0 leaves
  black regions. Starting it at the data's mean grey (e.g. 0.5) gives the samples their
  intensities without a rescale; the details' ascents start at 0, their mean.
  flip_average: use the average of the net's residual and its mirror image's, mirrored back
  (``mirrored_residual``): the score of a distribution that left-right mirroring leaves
  unchanged, as training with random flips makes it. A trained net is never exactly
  symmetric, and a long ascent amplifies its asymmetry (a bright-and-dark column at one
  border of undertrained models' samples); the average removes it at twice the cost per step.
  Conditional scales need a wavelet whose bands mirror with the image (Haar).
  """
  h0: float = setting(0.01, "Step size (the first step's when ascending).")
  beta: float = setting(0.5, "Injected noise, in (0, 1] (1 = none).")
  sigma_0: float = setting(1.0, "Std of the initial state.")
  sigma_L: float = setting(0.01, "Stop once the effective noise level falls below it.")
  ascending: bool = setting(True, "Ascending step sizes h_t = h0 t / (1 + h0 (t - 1)).")
  max_steps: int = setting(1000, "Maximum steps (a sample that reaches it is not converged).")
  abort_sigma: float = setting(1.5, "Stop and flag a sample whose noise level exceeds it.")
  mean_0: float = setting(0.0, "Mean of the initial state (the authors': 0).")
  flip_average: bool = setting(False, "Average each step's residual with the mirrored "
                               "state's (Haar for the conditional scales).")

  def __post_init__(self):
    if self.beta is None:
      raise ValueError("beta must be in (0, 1], got None")
    validation.ascent_settings(self)


# The release's settings (method.md §5 and the performance issue).
RELEASE_LOW = AscentConfig(h0=0.01, beta=0.01, sigma_L=0.1, ascending=False, max_steps=15000)
RELEASE_COND = AscentConfig(h0=0.01, beta=0.5, sigma_L=0.01, ascending=True, max_steps=1000)
RELEASE_COND_FINEST = dataclasses.replace(RELEASE_COND, sigma_L=0.015)


@dataclasses.dataclass(frozen=True)
class FlowConfig:
  """Settings of one scale's probability-flow sampler: a blind denoiser's ODE on a noise schedule.

  For a denoiser D with residual f(y) = y - D(y) ~ sigma^2 grad log p_sigma(y) (Miyasawa), the
  probability-flow ODE of Karras et al. (2022, "EDM") is dy/dsigma = f(y) / sigma. It runs from
  y ~ N(mean_0, sigma_max^2) down the schedule sigma_i = (sigma_max^(1/rho) + i / (num_steps - 1)
  (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho, with Euler or Heun (2nd order) steps, and ends
  with one denoising step D(y) at sigma_min. A blind net takes no noise level: the schedule's
  sigma stands in for it in the update, and the net's own estimate ||f(y)|| / sqrt(N) is
  recorded (``AscentInfo.sigmas``) and guards against divergence (``abort_ratio``: an
  estimate above abort_ratio * sigma_max).

  churn >= 0: EDM's stochastic variant; before each step the noise is raised from sigma to
  sigma (1 + churn) with fresh Gaussian noise (0: the deterministic ODE).

  sigma_max: the ODE is exact only from p_data * N(0, sigma_max^2), which N(mean_0,
  sigma_max^2) approximates only where sigma_max dominates the data's variance in every
  component; natural images' low frequencies hold far more (a 40x40 face low-pass: a DC
  component of std ~11 in an orthonormal basis), while the released nets were trained up to
  sigma = 1 and extrapolate badly far beyond it: sigma_max = 1 leaves samples with a third of
  the data's contrast, sigma_max >= 5 too much. The defaults (sigma_max 3, churn 0.1) score
  best by the patch SWD on the released CelebA model's low-pass, but its faces are visibly
  distorted where the ascent's are not (docs/sampling.md). For the conditional scales, whose
  details have mean 0 and small variance, the flow works: 16 Euler steps (``FAST_COND``) match
  the release's conditional ascents on the released models at a fifth of their cost.
  Cost: Heun 2 (num_steps - 1) + 1 denoiser evaluations, Euler num_steps (x 2 with
  flip_average). Every sample takes the same steps: there is no stop rule.
  """
  method: str = setting("heun", "ODE solver: heun (2nd order) or euler.", choices=("heun", "euler"))
  num_steps: int = setting(18, "Noise levels of the schedule (Heun: 2 num_steps - 1 denoiser "
                           "evaluations, Euler: num_steps).")
  sigma_max: float = setting(3.0, "Std of the initial state (the schedule's start).")
  sigma_min: float = setting(0.01, "The schedule's last noise level, removed by a final "
                             "denoising step.")
  rho: float = setting(7.0, "Schedule exponent (large: more steps at small noise levels).")
  churn: float = setting(0.1, "Noise re-injected per step, relative to sigma (0: deterministic).")
  mean_0: float = setting(0.0, "Mean of the initial state.")
  abort_ratio: float = setting(1.5, "Stop and flag a sample whose noise estimate exceeds this "
                               "multiple of sigma_max (it diverges).")
  flip_average: bool = setting(False, "Average each step's residual with the mirrored "
                               "state's (Haar for the conditional scales).")

  def __post_init__(self):
    if self.method not in ("heun", "euler"):
      raise ValueError(f"method must be 'heun' or 'euler', got {self.method!r}")
    validation.positive_int(self.num_steps, "num_steps")
    if self.num_steps < 2:
      raise ValueError(f"num_steps must be >= 2 (sigma_max and sigma_min), got {self.num_steps}")
    if not 0 < self.sigma_min < self.sigma_max < np.inf:
      raise ValueError(f"need 0 < sigma_min < sigma_max, got sigma_min={self.sigma_min}, "
                       f"sigma_max={self.sigma_max}")
    for name in ("rho", "abort_ratio"):
      if not getattr(self, name) > 0:
        raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
    if not (np.isfinite(self.churn) and self.churn >= 0):
      raise ValueError(f"churn must be >= 0, got {self.churn}")
    if not np.isfinite(self.mean_0):
      raise ValueError(f"mean_0 must be a finite number, got {self.mean_0}")
    if not isinstance(self.flip_average, bool):
      raise TypeError(f"flip_average must be True or False, got {self.flip_average!r}")

  @property
  def max_steps(self) -> int:
    """Updates taken (num_steps - 1); ``AscentInfo.steps`` counts the same."""
    return self.num_steps - 1

  def schedule(self) -> np.ndarray:
    """(num_steps,) float32: the noise levels, sigma_max first, sigma_min last."""
    i = np.arange(self.num_steps) / (self.num_steps - 1)
    a, b = self.sigma_max ** (1 / self.rho), self.sigma_min ** (1 / self.rho)
    return ((a + i * (b - a)) ** self.rho).astype(np.float32)

  def evals(self, steps):
    """Denoiser evaluations of a sample that took ``steps`` updates, the final one included."""
    return (steps * (2 if self.method == "heun" else 1) + 1) * (2 if self.flip_average else 1)


Sampler = AscentConfig | FlowConfig  # one scale's settings

# Chosen by measurement (benchmarks/bench_sample_quality.py, docs/sampling.md).
# The low-pass default: the ascending ascent with beta 0.05 (about 150 steps; the release's
# fixed step takes about 8,500), as good by the patch SWD and the layout distance (within the
# real-vs-real tolerance) on the released CelebA 160 model (beta 0.1: smoother, worse layouts;
# 0.03: worse layouts again); better by the SWD on the quickstart's. It starts
# at mid-grey (a model trained here needs no rescale; the released models' recommendation starts
# at 0 and rescales, as the release does).
DEFAULT_LOW = AscentConfig(h0=0.01, beta=0.05, sigma_L=0.05, ascending=True, max_steps=3000,
                           mean_0=0.5)
# The conditional scales of the released models: 16 Euler steps of the probability flow from
# sigma 3 with a little churn (4x super-resolution at the release's PSNR with 1/5 of its network
# calls). Not the library's default: on the quickstart's model it loses 1.6 dB against the
# release's conditional ascents, which stay the default for models without a recommendation.
FAST_COND = FlowConfig(method="euler", num_steps=16, sigma_max=3.0, churn=0.1)


@dataclasses.dataclass(frozen=True)
class Recommended:
  """A model's recommended sampling settings (``ModelParams.sampling``, DIR/sampling.json).

  Attributes:
    low: the low-pass (or flat) scale's sampler.
    cond: the conditional scales' samplers, finest first (None: the library's default).
    low_rescale: the per-image min-max rescale of the sampled low-pass, or None.
  """
  low: Sampler
  cond: tuple[Sampler, ...] | None = None
  low_rescale: tuple[float, float] | None = None

  def to_json(self) -> str:
    """The settings as JSON (``from_json`` reads them back; DIR/sampling.json)."""
    enc = lambda c: {"sampler": "flow" if isinstance(c, FlowConfig) else "ascent",
                     **dataclasses.asdict(c)}
    return json.dumps({"low": enc(self.low),
                       "cond": None if self.cond is None else [enc(c) for c in self.cond],
                       "low_rescale": self.low_rescale}, indent=1)

  @classmethod
  def from_json(cls, text: str) -> "Recommended":
    """Raises ValueError for a file that is not one of ``to_json``'s."""
    def dec(d):
      kind = d.pop("sampler")
      return {"flow": FlowConfig, "ascent": AscentConfig}[kind](**d)
    try:
      d = json.loads(text)
      return cls(low=dec(dict(d["low"])),
                 cond=None if d.get("cond") is None else tuple(dec(dict(c)) for c in d["cond"]),
                 low_rescale=None if d.get("low_rescale") is None else tuple(
                     float(v) for v in d["low_rescale"]))
    except (ValueError, KeyError, TypeError, AttributeError) as e:
      raise ValueError(f"not a wcdm_jax sampling.json ({type(e).__name__}: {e})") from e


MODEL = "model"  # sample(low_rescale=MODEL): the model's recommendation


def release_recommended(levels: int) -> Recommended:
  """What the released J-level models sample best with, as measured
  (benchmarks/bench_sample_quality.py, docs/sampling.md): the default samplers, the low-pass
  ascent started at 0 and rescaled to [0, 0.8] as the release does (its low-pass nets were
  trained with intensity augmentation), ``FAST_COND`` for the details. The release's own
  settings: ``release_settings``."""
  return Recommended(dataclasses.replace(DEFAULT_LOW, mean_0=0.0),
                     (FAST_COND,) * levels or None, (0.0, 0.8) if levels else None)


def _release_conds(levels: int) -> tuple[AscentConfig, ...]:
  """The release's conditional ascents, finest first (sigma_L 0.015 at the finest level)."""
  return tuple(RELEASE_COND_FINEST if j == 0 else RELEASE_COND for j in range(levels))


def release_settings(levels: int) -> Recommended:
  """The authors' released settings for a J-level model: the fixed-step low-pass ascent
  (about 8,500 steps), the conditional ascents, the low-pass rescale to [0, 0.8]."""
  return Recommended(RELEASE_LOW, _release_conds(levels) or None,
                     (0.0, 0.8) if levels else None)


@struct.dataclass
class AscentInfo:
  """Per-sample diagnostics. steps: (B,) steps taken; sigmas: (B, max_steps) sigma_t (NaN
  after the sample stopped); aborted: (B,) sigma_t exceeded abort_sigma; converged: (B,)
  met the stop rule within max_steps; evals: (B,) denoiser evaluations (network calls, the
  final denoising included: the cost)."""
  steps: jax.Array
  sigmas: jax.Array
  aborted: jax.Array
  converged: jax.Array
  evals: jax.Array


def step_size(t: jax.Array, cfg: AscentConfig) -> jax.Array:
  """h_t = h0 t / (1 + h0 (t - 1)) (ascending) or h0."""
  t = jnp.asarray(t, jnp.float32)
  return cfg.h0 * t / (1.0 + cfg.h0 * (t - 1.0)) if cfg.ascending else jnp.full_like(t, cfg.h0)


def noise_amplitude(sigma: jax.Array, h: jax.Array, beta: float) -> jax.Array:
  """gamma_t = sigma_t sqrt((1 - beta h_t)^2 - (1 - h_t)^2): the injected noise's std."""
  return sigma * jnp.sqrt(jnp.maximum((1 - beta * h) ** 2 - (1 - h) ** 2, 0.0))


def _mirror(x: jax.Array) -> jax.Array:  # (B, H, W, C): left-right
  return x[:, :, ::-1]


def mirrored_residual(fn: Callable, signs: jax.Array | None = None,
                      cond: jax.Array | None = None) -> Callable[[jax.Array], jax.Array]:
  """y -> (fn(y) + M fn(M y)) / 2, M the left-right mirror (times ``signs`` on the channels:
  wavelets.mirror_signs for detail bands): a residual that commutes with M. With ``cond``,
  ``fn`` takes (cond, y) and the conditioning is mirrored along with y."""
  s = 1.0 if signs is None else jnp.asarray(signs)
  call = (lambda c, y: fn(y)) if cond is None else fn
  mirrored_cond = None if cond is None else _mirror(cond)
  return lambda y: 0.5 * (call(cond, y) + _mirror(call(mirrored_cond, _mirror(y) * s)) * s)


def _cond_residual(net: models.NetSpec, variables, cond: jax.Array, cfg: Sampler,
                   signs, conv_impl: str) -> Callable[[jax.Array], jax.Array]:
  """y (details) -> the conditional net's residual given ``cond`` (flip-averaged per cfg)."""
  f = lambda c, y: models.apply_net(net, variables, jnp.concatenate([c, y], -1),
                                    conv_impl=conv_impl)
  return mirrored_residual(f, signs, cond) if cfg.flip_average else lambda y: f(cond, y)


def _per_sample_normal(keys: jax.Array, t, shape) -> jax.Array:
  return jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, t), shape, jnp.float32))(keys)


def iterate(step: Callable, y0: jax.Array, max_steps: int, abort_sigma: float,
            active: jax.Array | None = None, aborted: jax.Array | None = None
            ) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array, jax.Array]:
  """The loop of every sampler and solver: a ``lax.scan`` over t = 1 .. max_steps in which
  each sample of the batch moves until its own stop rule holds, then freezes.

  step: (y (B, ...), t) -> (y_new, sigma (B,), stop (B,), bad (B,)): one update of the whole
  batch, its noise level, whether each sample stops after it and whether it diverges. A sample
  that is bad, whose sigma exceeds ``abort_sigma`` or is not finite keeps its state and is
  flagged aborted. Once every sample
  has stopped, the scan body skips ``step`` (no network call). active, aborted: (B,) initial
  flags (default all active, none aborted).
  Returns (y, active, steps, aborted, sigmas (B, max_steps), NaN after a sample stopped).
  """
  b = y0.shape[0]
  bshape = (b,) + (1,) * (y0.ndim - 1)
  active = jnp.ones((b,), bool) if active is None else active
  aborted = jnp.zeros((b,), bool) if aborted is None else aborted

  def active_step(carry, t):
    y, active, steps, aborted = carry
    y_new, sigma, stop, bad = step(y, t)
    abort = bad | (sigma > abort_sigma) | ~jnp.isfinite(sigma)  # diverged, NaN / inf weights
    move = active & ~abort
    y = jnp.where(move.reshape(bshape), y_new, y)
    steps = jnp.where(move, t, steps)
    aborted = aborted | (active & abort)
    return (y, move & ~stop, steps, aborted), jnp.where(active, sigma, jnp.nan)

  def body(carry, t):
    return jax.lax.cond(jnp.any(carry[1]), active_step,
                        lambda c, t: (c, jnp.full((b,), jnp.nan, jnp.float32)), carry, t)

  init = (y0.astype(jnp.float32), active & ~aborted, jnp.zeros((b,), jnp.int32), aborted)
  (y, active, steps, aborted), sigmas = jax.lax.scan(
      body, init, jnp.arange(1, max_steps + 1, dtype=jnp.int32))
  return y, active, steps, aborted, sigmas.T


def rms(v: jax.Array) -> jax.Array:
  """(B, ...) -> (B,): ||v|| / sqrt(N) per sample (a residual's noise level)."""
  return jnp.sqrt(jnp.sum(jnp.square(v), tuple(range(1, v.ndim)))) / float(np.sqrt(
      np.prod(v.shape[1:])))


def ascent(keys: jax.Array, residual_fn: Callable[[jax.Array], jax.Array], shape: Sequence[int],
           cfg: Sampler, y0: jax.Array | None = None) -> tuple[jax.Array, AscentInfo]:
  """One scale's sampler for a batch; jittable: the stochastic ascent (``AscentConfig``) or the
  probability flow (``FlowConfig``).

  keys: (B,) one key per sample. residual_fn: y (B, *shape) -> f(y), the denoiser's noise
  estimate (conditioning already bound in). shape: one sample's shape. y0: optional initial
  state (B, *shape); default mean_0 + sigma_0 (sigma_max) * N(0, I) from each sample's key.
  Returns (y - f(y) at each sample's final state, AscentInfo).
  """
  b = keys.shape[0]
  shape = tuple(shape)
  if y0 is None:
    std = cfg.sigma_max if isinstance(cfg, FlowConfig) else cfg.sigma_0
    y0 = cfg.mean_0 + std * _per_sample_normal(keys, 0, shape)
  elif y0.shape != (b,) + shape:
    raise ValueError(f"y0 must have shape {(b,) + shape}, got {y0.shape}")
  step = (_flow_step if isinstance(cfg, FlowConfig) else _ascent_step)(keys, residual_fn, cfg)
  abort_sigma = np.inf if isinstance(cfg, FlowConfig) else cfg.abort_sigma
  y, active, steps, aborted, sigmas = iterate(step, y0, cfg.max_steps, abort_sigma)
  if isinstance(cfg, FlowConfig):
    evals = cfg.evals(steps)
  else:
    evals = (steps + 1) * (2 if cfg.flip_average else 1)
  info = AscentInfo(steps=steps, sigmas=sigmas, aborted=aborted, converged=~active & ~aborted,
                    evals=evals)
  return y - residual_fn(y), info


def ascent_move(keys: jax.Array, y: jax.Array, d: jax.Array, t: jax.Array,
                cfg: AscentConfig) -> tuple[jax.Array, jax.Array]:
  """One ascent update of a batch along its residual d (method.md §5): y - h_t d + gamma_t z,
  z from each sample's key and step t. Returns (the new y, sigma_t = ||d|| / sqrt(N): (B,))."""
  sigma = rms(d)
  h = step_size(t, cfg)
  gamma = noise_amplitude(sigma, h, cfg.beta)
  return y - h * d + _bcast(gamma, y) * _per_sample_normal(keys, t, y.shape[1:]), sigma


def _ascent_step(keys, residual_fn, cfg: AscentConfig):
  """``ascent_move`` along f(y); stop once std(y) / sigma_t >= 1 / sigma_L."""
  snr_stop = 20.0 * np.log10(1.0 / cfg.sigma_L)

  def step(y, t):
    y_new, sigma = ascent_move(keys, y, residual_fn(y), t, cfg)
    std = jnp.std(y_new, axis=tuple(range(1, y.ndim)), ddof=1)
    return y_new, sigma, 20.0 * jnp.log10(std / sigma) >= snr_stop, jnp.zeros_like(sigma, bool)
  return step


def _bcast(v: jax.Array, like: jax.Array) -> jax.Array:  # (B,) -> (B, 1, ..., 1)
  return v.reshape((-1,) + (1,) * (like.ndim - 1))


def _flow_step(keys, residual_fn, cfg: FlowConfig):
  """Euler / Heun step of dy/dsigma = f(y) / sigma from the schedule's sigma_{t-1} to sigma_t
  (after EDM's churn when cfg.churn > 0); stops after the last interval."""
  sched = jnp.asarray(cfg.schedule())

  def step(y, t):
    s, s_next = sched[t - 1], sched[t]
    if cfg.churn:
      s_hat = s * (1.0 + cfg.churn)
      y = y + jnp.sqrt(s_hat ** 2 - s ** 2) * _per_sample_normal(keys, t, y.shape[1:])
      s = s_hat
    f = residual_fn(y)
    y_new = y + (s_next - s) * f / s
    if cfg.method == "heun":
      y_new = y + (s_next - s) * 0.5 * (f / s + residual_fn(y_new) / s_next)
    sigma = rms(f)
    # Diverging: the estimate grows past the start's (not: above the schedule's sigma, which a
    # net's own error floor exceeds near sigma_min).
    bad = sigma > cfg.abort_ratio * cfg.sigma_max * (1.0 + cfg.churn)
    return y_new, sigma, jnp.full(sigma.shape, t >= cfg.max_steps), bad
  return step


def _check_config(cfg, name: str) -> Sampler:
  if not isinstance(cfg, (AscentConfig, FlowConfig)):
    raise TypeError(f"{name} must be a wcdm_jax.AscentConfig or FlowConfig, got "
                    f"{type(cfg).__name__}")
  return cfg


def _cond_configs(spec: models.ModelSpec, cond: Sampler | Sequence[Sampler] | None
                  ) -> tuple[Sampler, ...]:
  if cond is None:
    return _release_conds(spec.levels)
  if isinstance(cond, (AscentConfig, FlowConfig)):
    cond = (cond,) * spec.levels
  elif not isinstance(cond, Sequence):
    raise TypeError(f"cond_config must be an AscentConfig / FlowConfig or one per level, got "
                    f"{type(cond).__name__}")
  cond = tuple(_check_config(c, f"cond_config[{j}]") for j, c in enumerate(cond))
  if len(cond) != spec.levels:
    raise ValueError(f"need {spec.levels} conditional configs (finest first), got {len(cond)}")
  if any(c.flip_average for c in cond) and wavelets.mirror_signs(spec.wavelet, 1) is None:
    raise ValueError(f"flip_average of the conditional scales needs a wavelet whose bands "
                     f"mirror with the image (Haar); this model's is {spec.wavelet!r}: set "
                     "flip_average=False in cond_config (the low-pass scale may keep it)")
  return cond


def resolve_settings(params: models.ModelParams, low_config: Sampler | None = None,
                     cond_config: Sampler | Sequence[Sampler] | None = None,
                     low_rescale: tuple[float, float] | None | str = MODEL
                     ) -> tuple[Sampler, tuple[Sampler, ...], tuple[float, float] | None]:
  """The settings ``sample`` runs with, checked: arguments first, then the model's
  recommendation (``params.sampling``), then the defaults (``DEFAULT_LOW``, the release's
  conditional ascents).

  Returns:
    (the low-pass sampler, one conditional sampler per level finest first, the low-pass
    rescale or None).

  Raises:
    TypeError, ValueError: a config of the wrong type, the wrong number of conditional
      configs, or a bad ``low_rescale``.
  """
  rec = params.sampling
  if isinstance(low_rescale, str):
    if low_rescale != MODEL:
      raise ValueError(f"low_rescale must be (lo, hi), None or 'model', got {low_rescale!r}")
    low_rescale = rec.low_rescale if rec is not None else None
  if low_rescale is not None:
    low_rescale = validation.float_range(low_rescale, "low_rescale")
  if low_config is None:
    low_config = rec.low if rec is not None else DEFAULT_LOW
  if cond_config is None and rec is not None:
    cond_config = rec.cond
  return (_check_config(low_config, "low_config"), _cond_configs(params.spec, cond_config),
          low_rescale)


def rescale_min_max(x: jax.Array, lo: float, hi: float) -> jax.Array:
  """Per-image affine map of (B, ...) onto [lo, hi] (the release's low-pass rescale)."""
  axes = tuple(range(1, x.ndim))
  mn, mx = x.min(axes, keepdims=True), x.max(axes, keepdims=True)
  return lo + (hi - lo) * (x - mn) / jnp.maximum(mx - mn, 1e-12)


@functools.partial(jax.jit, static_argnames=("cond_cfgs", "conv_impl", "mesh"))
def _refine(keys, params: models.ModelParams, low, cond_cfgs, conv_impl="auto", mesh=None):
  """Details of levels J-1 .. 0 given the low-pass x_J: returns [x_J, ..., x_0], infos; the
  batch split over ``mesh`` when given (``parallel.map_batch``)."""
  return parallel.map_batch(
      lambda k, lo, p: _refine_local(k, p, lo, cond_cfgs, conv_impl), mesh, (keys, low), (params,))


def _refine_local(keys, params: models.ModelParams, low, cond_cfgs, conv_impl):
  spec = params.spec
  signs = wavelets.mirror_signs(spec.wavelet, spec.channels)
  outs, infos = [low], []
  for j in reversed(range(spec.levels)):
    net, variables = params.net(f"cond{j}")
    f = _cond_residual(net, variables, low, cond_cfgs[j], signs, conv_impl)
    level_keys = jax.vmap(lambda k, j=j: jax.random.fold_in(k, j + 1))(keys)
    shape = low.shape[1:3] + (3 * spec.channels,)
    det, info = ascent(level_keys, f, shape, cond_cfgs[j])
    low = wavelets.idwt_level(low, det, spec.wavelet, spec.mode)
    outs.append(low)
    infos.append(info)
  return outs, infos


@functools.partial(jax.jit, static_argnames=("shape", "cfg", "conv_impl", "mesh"))
def _global_ascent(keys, params: models.ModelParams, shape, cfg, conv_impl="auto", mesh=None):
  def local(keys, params):
    level_keys = jax.vmap(lambda k: jax.random.fold_in(k, 0))(keys)
    f = params.residual_fn(params.spec.low.name, conv_impl)
    return ascent(level_keys, mirrored_residual(f) if cfg.flip_average else f, shape, cfg)
  return parallel.map_batch(local, mesh, (keys,), (params,))


def sample(key: jax.Array, params: models.ModelParams, num_samples: int | None = None, *,
           image_size: Sequence[int] | None = None, low_config: Sampler | None = None,
           cond_config: Sampler | Sequence[Sampler] | None = None,
           low_rescale: tuple[float, float] | None | str = MODEL,
           return_intermediates: bool = False,
           conv_impl: str = "auto", mesh: Mesh | None = None):
  """Unconditional samples (N, H, W, C), coarse to fine.

  Args:
    key: one key (then ``num_samples``, default 1) or a (N,) batch of keys; sample i depends
      only on its own key.
    params: a flat or multi-scale model.
    num_samples: N, with a single key.
    image_size: (H, W), default the model's training size.
    low_config: sampler of the low-pass net (flat models: of the flat net): an
      ``AscentConfig`` (the stochastic ascent) or a ``FlowConfig`` (the probability flow,
      10-100x fewer network calls); default the model's recommendation
      (``params.sampling``), else ``DEFAULT_LOW`` (the ascending ascent, about 150 calls;
      ``RELEASE_LOW`` is the release's, about 8,500).
    cond_config: one config or one per level (finest first); default the model's
      recommendation (``FAST_COND`` for the released models), else the release's ascents (h0
      0.01 ascending, beta 0.5, sigma_L 0.01; 0.015 at the finest level).
    low_rescale: e.g. (0, 0.8), the release's per-image min-max rescale of the sampled
      low-pass before the details are synthesised (it compensates the low-pass net's
      intensity augmentation); None keeps the sampled low-pass as is; 'model' (default): the
      model's recommendation (none without one).
    return_intermediates: also return the scales and the per-scale diagnostics.
    conv_impl: how convolutions run.
    mesh: split the samples over this mesh's 'data' axis (``parallel.make_mesh()``: every
      device); default: the mesh ``key`` is sharded on, if it is a sharded batch of keys,
      else one device. Results equal one device's.

  Returns:
    (N, H, W, C) float32 samples; with ``return_intermediates``, (samples, [x_J, ..., x_0],
    [AscentInfo per scale, coarse first]).

  Raises:
    TypeError, ValueError: a config of the wrong type, a size the wavelet transform cannot
      take, or keys of the wrong shape.
  """
  models.check_params(params)
  spec = params.spec
  keys = validation.keys(key, num_samples)
  mesh = parallel.resolve_mesh(mesh, keys)
  keys, params = parallel.onto(mesh, keys, params)
  h, w = validation.size(spec.image_size if image_size is None else image_size, "image_size")
  if spec.levels and spec.mode == wavelets.PERIODIZATION:
    wavelets.check_size(h, w, spec.levels)
  low_config, conds, low_rescale = resolve_settings(params, low_config, cond_config,
                                                    low_rescale)
  shape = (h // 2 ** spec.levels, w // 2 ** spec.levels, spec.channels)
  low, low_info = _global_ascent(keys, params, shape, low_config, conv_impl, mesh)
  if low_rescale is not None:
    low = rescale_min_max(low, *low_rescale)
  outs, infos = _refine(keys, params, low, conds, conv_impl, mesh)
  if return_intermediates:
    return outs[-1], outs, [low_info] + infos
  return outs[-1]


def super_resolve(key: jax.Array, params: models.ModelParams, low_res: jax.Array, *,
                  cond_config: Sampler | Sequence[Sampler] | None = None,
                  return_intermediates: bool = False, conv_impl: str = "auto",
                  mesh: Mesh | None = None):
  """Synthesise the details of J levels given low-pass images: (B, h, w, C) -> (B, 2^J h,
  2^J w, C), i.e. 4x with J = 2, 8x with J = 3.

  Args:
    key: one key or a (B,) batch of keys.
    params: a multi-scale model.
    low_res: (B, h, w, C) the normalised low-pass x_J (local averages, pixel units), e.g.
      ``wavelets.decompose(images, J).low``.
    cond_config: one ``AscentConfig`` / ``FlowConfig`` or one per level (finest first);
      default the model's recommendation (``FAST_COND`` for the released models), else the
      release's ascents.
    return_intermediates: also return [x_J, ..., x_0] and the per-level diagnostics.
    conv_impl: how convolutions run.
    mesh: split the batch over this mesh's 'data' axis; default: the mesh ``low_res`` is
      sharded on, if any.

  Returns:
    (B, 2^J h, 2^J w, C) float32 images whose J-level low-pass is ``low_res``; with
    ``return_intermediates``, (images, scales, infos).

  Raises:
    ValueError: a flat model, or ``low_res`` at the model's full image size.
  """
  models.check_params(params)
  spec = params.spec
  if spec.levels == 0:
    raise ValueError("super_resolve needs a multi-scale model (levels >= 1); these params hold "
                     "a flat denoiser")
  low_res = validation.images(low_res, "low_res", spec.channels)
  if tuple(low_res.shape[1:3]) == tuple(spec.image_size):
    s = spec.image_size
    raise ValueError(
        f"low_res has the model's full image size {s[0]}x{s[1]}; pass its {spec.levels}-level "
        f"low-pass ({s[0] // 2 ** spec.levels}x{s[1] // 2 ** spec.levels}), e.g. "
        f"wcdm_jax.decompose(images, {spec.levels}).low")
  _, conds, _ = resolve_settings(params, cond_config=cond_config, low_rescale=None)
  keys = validation.keys(key, low_res.shape[0])
  mesh = parallel.resolve_mesh(mesh, low_res)
  keys, params, low_res = parallel.onto(mesh, keys, params, low_res)
  outs, infos = _refine(keys, params, jnp.asarray(low_res, jnp.float32), conds, conv_impl, mesh)
  return (outs[-1], outs, infos) if return_intermediates else outs[-1]
