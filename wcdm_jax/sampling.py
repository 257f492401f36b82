"""Sampling by stochastic coarse-to-fine gradient ascent (method.md §5).

``ascent`` runs one scale for a batch in a single ``lax.scan`` over ``max_steps``; every
sample stops on its own rule (it freezes; once all have stopped, the scan body skips the
network). Sample b only ever uses its own key, so a batch equals the same samples drawn one
at a time. ``sample``, ``super_resolve`` chain the scales coarse to fine.
"""
from __future__ import annotations

import dataclasses
import functools
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


@struct.dataclass
class AscentInfo:
  """Per-sample diagnostics. steps: (B,) steps taken; sigmas: (B, max_steps) sigma_t (NaN
  after the sample stopped); aborted: (B,) sigma_t exceeded abort_sigma; converged: (B,)
  met the stop rule within max_steps."""
  steps: jax.Array
  sigmas: jax.Array
  aborted: jax.Array
  converged: jax.Array


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


def _cond_residual(net: models.NetSpec, variables, cond: jax.Array, cfg: AscentConfig,
                   signs, conv_impl: str) -> Callable[[jax.Array], jax.Array]:
  """y (details) -> the conditional net's residual given ``cond`` (flip-averaged per cfg)."""
  f = lambda c, y: models.apply_net(net, variables, jnp.concatenate([c, y], -1),
                                    conv_impl=conv_impl)
  return mirrored_residual(f, signs, cond) if cfg.flip_average else lambda y: f(cond, y)


def _per_sample_normal(keys: jax.Array, t, shape) -> jax.Array:
  return jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, t), shape, jnp.float32))(keys)


def ascent(keys: jax.Array, residual_fn: Callable[[jax.Array], jax.Array], shape: Sequence[int],
           cfg: AscentConfig, y0: jax.Array | None = None) -> tuple[jax.Array, AscentInfo]:
  """Stochastic gradient ascent on log p for a batch; jittable.

  keys: (B,) one key per sample. residual_fn: y (B, *shape) -> f(y), the denoiser's noise
  estimate (conditioning already bound in). shape: one sample's shape. y0: optional initial
  state (B, *shape); default mean_0 + sigma_0 * N(0, I) from each sample's key.
  Returns (y - f(y) at each sample's final state, AscentInfo).
  """
  b = keys.shape[0]
  shape = tuple(shape)
  n = float(np.prod(shape))
  axes = tuple(range(1, 1 + len(shape)))
  if y0 is None:
    y0 = cfg.mean_0 + cfg.sigma_0 * _per_sample_normal(keys, 0, shape)
  elif y0.shape != (b,) + shape:
    raise ValueError(f"y0 must have shape {(b,) + shape}, got {y0.shape}")
  snr_stop = 20.0 * np.log10(1.0 / cfg.sigma_L)
  bshape = (b,) + (1,) * len(shape)

  def active_step(carry, t):
    y, active, steps, aborted = carry
    d = residual_fn(y)
    sigma = jnp.sqrt(jnp.sum(jnp.square(d), axes)) / float(np.sqrt(n))  # (B,)
    h = step_size(t, cfg)
    gamma = noise_amplitude(sigma, h, cfg.beta)
    z = _per_sample_normal(keys, t, shape)
    y_new = y - h * d + gamma.reshape(bshape) * z
    std = jnp.std(y_new, axis=axes, ddof=1)
    stop = 20.0 * jnp.log10(std / sigma) >= snr_stop
    abort = (sigma > cfg.abort_sigma) | ~jnp.isfinite(sigma)  # diverged, or NaN / inf weights
    move = active & ~abort
    y = jnp.where(move.reshape(bshape), y_new, y)
    steps = jnp.where(move, t, steps)
    aborted = aborted | (active & abort)
    new_active = move & ~stop
    return (y, new_active, steps, aborted), jnp.where(active, sigma, jnp.nan)

  def body(carry, t):
    active = carry[1]
    return jax.lax.cond(jnp.any(active), active_step,
                        lambda c, t: (c, jnp.full((b,), jnp.nan, jnp.float32)), carry, t)

  init = (y0.astype(jnp.float32), jnp.ones((b,), bool), jnp.zeros((b,), jnp.int32),
          jnp.zeros((b,), bool))
  (y, active, steps, aborted), sigmas = jax.lax.scan(
      body, init, jnp.arange(1, cfg.max_steps + 1, dtype=jnp.int32))
  info = AscentInfo(steps=steps, sigmas=sigmas.T, aborted=aborted, converged=~active & ~aborted)
  return y - residual_fn(y), info


def _check_config(cfg, name: str) -> AscentConfig:
  if not isinstance(cfg, AscentConfig):
    raise TypeError(f"{name} must be a wcdm_jax.AscentConfig, got {type(cfg).__name__}")
  return cfg


def _cond_configs(spec: models.ModelSpec, cond: AscentConfig | Sequence[AscentConfig] | None
                  ) -> tuple[AscentConfig, ...]:
  if cond is None:
    return tuple(RELEASE_COND_FINEST if j == 0 else RELEASE_COND for j in range(spec.levels))
  if isinstance(cond, AscentConfig):
    cond = (cond,) * spec.levels
  elif not isinstance(cond, Sequence):
    raise TypeError(f"cond_config must be an AscentConfig or one per level, got "
                    f"{type(cond).__name__}")
  cond = tuple(_check_config(c, f"cond_config[{j}]") for j, c in enumerate(cond))
  if len(cond) != spec.levels:
    raise ValueError(f"need {spec.levels} conditional configs (finest first), got {len(cond)}")
  if any(c.flip_average for c in cond) and wavelets.mirror_signs(spec.wavelet, 1) is None:
    raise ValueError(f"flip_average of the conditional scales needs a wavelet whose bands "
                     f"mirror with the image (Haar); this model's is {spec.wavelet!r}: set "
                     "flip_average=False in cond_config (the low-pass scale may keep it)")
  return cond


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
           image_size: Sequence[int] | None = None, low_config: AscentConfig = RELEASE_LOW,
           cond_config: AscentConfig | Sequence[AscentConfig] | None = None,
           low_rescale: tuple[float, float] | None = None, return_intermediates: bool = False,
           conv_impl: str = "auto", mesh: Mesh | None = None):
  """Unconditional samples (N, H, W, C), coarse to fine.

  key: one key (then ``num_samples``, default 1) or a (N,) batch of keys; sample i depends
  only on its own key. image_size: (H, W), default the model's training size. low_config:
  ascent of the low-pass net (flat models: of the flat net); default the release's (beta
  0.01, fixed h 0.01, sigma_L 0.1). cond_config: one config or one per level (finest
  first); default h0 0.01 ascending, beta 0.5, sigma_L 0.01 (0.015 at the finest level).
  low_rescale: e.g. (0, 0.8), the release's per-image min-max rescale of the sampled
  low-pass before the details are synthesised (it compensates the low-pass net's intensity
  augmentation); None keeps the sampled low-pass as is.
  return_intermediates: also return ([x_J, ..., x_0], per-scale AscentInfo list, coarse
  first).
  mesh: split the samples over this mesh's 'data' axis (``parallel.make_mesh()``: every
  device), each device running the ascent of its own samples; default: the mesh ``key`` is
  sharded on, if it is a sharded batch of keys, else one device. Results equal one device's.
  """
  models.check_params(params)
  spec = params.spec
  keys = validation.keys(key, num_samples)
  mesh = parallel.resolve_mesh(mesh, keys)
  keys, params = parallel.onto(mesh, keys, params)
  h, w = validation.size(spec.image_size if image_size is None else image_size, "image_size")
  if spec.levels and spec.mode == wavelets.PERIODIZATION:
    wavelets.check_size(h, w, spec.levels)
  if low_rescale is not None:
    low_rescale = validation.float_range(low_rescale, "low_rescale")
  _check_config(low_config, "low_config")
  shape = (h // 2 ** spec.levels, w // 2 ** spec.levels, spec.channels)
  low, low_info = _global_ascent(keys, params, shape, low_config, conv_impl, mesh)
  if low_rescale is not None:
    low = rescale_min_max(low, *low_rescale)
  outs, infos = _refine(keys, params, low, _cond_configs(spec, cond_config), conv_impl, mesh)
  if return_intermediates:
    return outs[-1], outs, [low_info] + infos
  return outs[-1]


def super_resolve(key: jax.Array, params: models.ModelParams, low_res: jax.Array, *,
                  cond_config: AscentConfig | Sequence[AscentConfig] | None = None,
                  return_intermediates: bool = False, conv_impl: str = "auto",
                  mesh: Mesh | None = None):
  """Synthesise the details of J levels given low-pass images: (B, h, w, C) -> (B, 2^J h,
  2^J w, C), i.e. 4x with J = 2, 8x with J = 3.

  low_res: the normalised low-pass x_J (local averages, pixel units), e.g.
  ``wavelets.decompose(images, J).low``. key: one key or a (B,) batch of keys. mesh: split
  the batch over this mesh's 'data' axis; default: the mesh ``low_res`` is sharded on, if
  any (``parallel``).
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
  keys = validation.keys(key, low_res.shape[0])
  mesh = parallel.resolve_mesh(mesh, low_res)
  keys, params, low_res = parallel.onto(mesh, keys, params, low_res)
  outs, infos = _refine(keys, params, jnp.asarray(low_res, jnp.float32),
                        _cond_configs(spec, cond_config), conv_impl, mesh)
  return (outs[-1], outs, infos) if return_intermediates else outs[-1]
