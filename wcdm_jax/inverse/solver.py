"""Solving linear inverse problems with the prior implicit in a denoiser (method.md §7).

Given measurements x_c = M^T x, ``solve`` runs the constrained stochastic ascent of Kadkhodaie
& Simoncelli (2021) for a batch in one ``lax.scan``: every sample has its own key and stops on
its own rule, so a batch equals its samples solved one at a time.

  y_0 ~ N(0.5 (I - M M^T) 1 + M x_c, sigma_0^2 I)
  d_t = (I - M M^T) f(y) + M (M^T y - x_c);  sigma_t = ||d_t|| / sqrt(N)
  y <- y - h_t d_t + gamma_t z;  stop once sigma_t <= sigma_L;  x = y - f(y)

f is the residual of a blind denoiser: the flat net, or the whole multi-scale denoiser
(low-pass net, then the conditional nets; ``denoising.denoise``). For ``BlockAverage(2^J)`` on
a J-level Haar model the measurements are the low-pass itself, and the coarse-to-fine
conditional synthesis (``super_resolve``) solves the problem exactly consistent.

Beyond the original: a step cap, an abort on divergence or non-finite states, and an optional
final projection onto the measurements (x <- x - M M^T x + M x_c: exact consistency).
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jax.sharding import Mesh

from wcdm_jax import denoising, models, parallel, sampling, validation, wavelets
from wcdm_jax.settings import setting
from wcdm_jax.inverse import operators as ops


# The solver's ascent: SolverConfig(sampler=None) runs it with beta chosen by operator
# (default_beta). It starts at mean 0.5 off the measurements, as the original does.
DEFAULT_ASCENT = sampling.AscentConfig(h0=0.01, beta=0.05, sigma_0=1.0, sigma_L=0.01,
                                       ascending=True, max_steps=3000, abort_sigma=3.0,
                                       mean_0=0.5)


@dataclasses.dataclass(frozen=True)
class SolverConfig:
  """Settings of the inverse-problem solver.

  sampler: the iteration, constrained to the measurements: a ``sampling.AscentConfig`` (the
  constrained stochastic ascent of the module docstring: its h0, beta, sigma_0, sigma_L,
  ascending, max_steps, abort_sigma; mean_0 is the initial state's value off the
  measurements) or a ``sampling.FlowConfig`` (the constrained probability flow: dy/dsigma =
  d(y) / sigma on its noise schedule, d the constrained residual below, its last step y - d(y)
  the denoised image with the measured part replaced by the measurements). None:
  ``DEFAULT_ASCENT`` with beta by operator (``default_beta``), measured in
  docs/inverse_problems.md: 0.1 for a hole (the original's 0.01 fills a 40x40 hole in a face
  far too bright and ends no better than zero-filling), 0.05 for measurements spread over the
  image (random pixels, block averages, low frequencies, random projections), which converge
  better with less injected noise.
  project: end with the exact projection onto the measurements.
  method: 'auto' (coarse-to-fine for BlockAverage(2^J) on a J-level Haar model, else the
  plug-in iteration), 'plugin' or 'coarse_to_fine'.
  cond_config: the conditional samplers of the coarse-to-fine solver (None: ``sampler`` if it
  is a FlowConfig, else ``super_resolve``'s default).
  """
  sampler: Any = None
  project: bool = setting(True, "End with the exact projection onto the measurements.")
  method: str = setting("auto", "auto (coarse-to-fine where the model and operator allow it), "
                        "plugin or coarse_to_fine.", choices=("auto", "plugin", "coarse_to_fine"))
  cond_config: Any = None

  def __post_init__(self):
    if self.sampler is not None and not isinstance(
        self.sampler, (sampling.AscentConfig, sampling.FlowConfig)):
      raise TypeError(f"sampler must be a wcdm_jax.AscentConfig, FlowConfig or None, got "
                      f"{type(self.sampler).__name__}")
    if self.sampler is not None and self.sampler.flip_average:
      raise ValueError("sampler: flip_average does not apply to inverse problems (the "
                       "measurements are not mirror-symmetric): set flip_average=False")
    if self.method not in ("auto", "plugin", "coarse_to_fine"):
      raise ValueError(f"method must be 'auto', 'plugin' or 'coarse_to_fine', got "
                       f"{self.method!r}")


# The original code's settings: no projection, no cap in spirit (a generous one here), no abort.
ORIGINAL = SolverConfig(
    sampler=dataclasses.replace(DEFAULT_ASCENT, beta=0.01, max_steps=20000,
                                abort_sigma=math.inf),
    project=False, method="plugin")


def default_beta(op: ops.Operator) -> float:
  """The injected noise of ``SolverConfig(sampler=None)``'s ascent for an operator."""
  return 0.1 if isinstance(op, ops.Inpainting) else 0.05


def default_sampler(op: ops.Operator, **changes: Any) -> sampling.AscentConfig:
  """The ascent ``SolverConfig(sampler=None)`` runs for ``op``.

  Args:
    op: the measurement operator (a hole gets beta 0.1, spread measurements 0.05).
    **changes: ``AscentConfig`` fields to change, e.g. ``max_steps=400``.

  Returns:
    ``DEFAULT_ASCENT`` with ``default_beta(op)``, then ``changes``.
  """
  return dataclasses.replace(DEFAULT_ASCENT, beta=default_beta(op), **changes)


def resolve(cfg: SolverConfig, op: ops.Operator) -> SolverConfig:
  """``cfg`` with its sampler filled in for ``op`` when it is None."""
  return cfg if cfg.sampler is not None else dataclasses.replace(cfg, sampler=default_sampler(op))


def constrained_ascent(keys: jax.Array, residual_fn, op: ops.Operator, measurements: jax.Array,
                       y0: jax.Array, cfg: sampling.AscentConfig):
  """The constrained stochastic ascent for a batch (the module docstring's iteration); jittable.

  Args:
    keys: (B,) one key per image.
    residual_fn: y (B, H, W, C) -> f(y), the prior denoiser's residual (``residual``).
    op: the measurement operator.
    measurements: (B, ...) ``op.forward`` of the images.
    y0: (B, H, W, C) initial states (``initial_state``).
    cfg: the ascent's settings (``SolverConfig.sampler``).

  Returns:
    (y - f(y) at each image's final state, ``sampling.AscentInfo``).
  """
  d_fn = constrained_residual(residual_fn, op, measurements)

  def step(y, t):
    y_new, sigma = sampling.ascent_move(keys, y, d_fn(y), t, cfg)
    return y_new, sigma, sigma <= cfg.sigma_L, jnp.zeros_like(sigma, bool)

  sigma0 = sampling.rms(residual_fn(y0))
  # (the original's first check uses ||f(y_0)||)
  y, active, steps, aborted, sigmas = sampling.iterate(
      step, y0, cfg.max_steps, cfg.abort_sigma, active=sigma0 > cfg.sigma_L,
      aborted=~jnp.isfinite(sigma0))
  info = sampling.AscentInfo(steps=steps, sigmas=sigmas, aborted=aborted,
                             converged=~active & ~aborted, evals=steps + 2)
  return y - residual_fn(y), info


def constrained_residual(residual_fn, op: ops.Operator, measurements: jax.Array):
  """y -> d(y) = (I - M M^T) f(y) + M (M^T y - x_c): the prior's residual off the measured
  subspace, the distance to the measurements on it; y - d(y) is the denoised image with its
  measured part replaced by the measurements."""
  m_xc = op.adjoint(measurements)  # M x_c

  def d(y):
    f = residual_fn(y)
    return f - op.project(f) + op.project(y) - m_xc
  return d


def initial_state(keys: jax.Array, op: ops.Operator, measurements: jax.Array,
                  image_shape: ops.Shape, sigma_0: float, mean_0: float = 0.5) -> jax.Array:
  """y_0 = mean_0 (I - M M^T) 1 + M x_c + sigma_0 z, z from each sample's key: (B, H, W, C)."""
  b = measurements.shape[0]
  ones = jnp.ones((b,) + tuple(image_shape), jnp.float32)
  mean = mean_0 * (ones - op.project(ones)) + op.adjoint(measurements)
  z = jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, 0), tuple(image_shape), jnp.float32))(keys)
  return mean + sigma_0 * z


def residual(params: models.ModelParams, conv_impl: str = "auto"):
  """The prior's denoiser residual f(y) = y - D(y): the flat net, or the multi-scale denoiser."""
  if params.spec.levels == 0:
    return params.residual_fn("flat", conv_impl)
  return lambda y: y - denoising.denoise(params, y, conv_impl=conv_impl)


@functools.partial(jax.jit, static_argnames=("cfg", "conv_impl", "mesh"))
def _plugin(keys, params, op, measurements, cfg, conv_impl, mesh=None):
  return parallel.map_batch(lambda k, m, p, o: _plugin_local(k, p, o, m, cfg, conv_impl), mesh,
                            (keys, measurements), (params, op))


def _plugin_local(keys, params, op, measurements, cfg, conv_impl):
  shape = op.image_shape()
  s = cfg.sampler  # resolved: not None
  if isinstance(s, sampling.AscentConfig):
    y0 = initial_state(keys, op, measurements, shape, s.sigma_0, s.mean_0)
    x, info = constrained_ascent(keys, residual(params, conv_impl), op, measurements, y0, s)
  else:
    y0 = initial_state(keys, op, measurements, shape, s.sigma_max, s.mean_0)
    x, info = sampling.ascent(keys, constrained_residual(residual(params, conv_impl), op,
                                                         measurements), shape, s, y0)
  if cfg.project:
    x = x - op.project(x) + op.adjoint(measurements)
  return x, info


def uses_coarse_to_fine(params: models.ModelParams, op: ops.Operator, cfg: SolverConfig) -> bool:
  """Whether ``solve`` runs the coarse-to-fine solver; a ValueError when cfg asks for it and it
  does not apply."""
  spec = params.spec
  fits = (isinstance(op, ops.BlockAverage) and spec.levels >= 1
          and op.factor == 2 ** spec.levels and spec.wavelet == "haar")
  if cfg.method == "coarse_to_fine" and not fits:
    if spec.levels == 0:
      raise ValueError("method='coarse_to_fine' needs a multi-scale model; these params hold a "
                       "flat denoiser: use method='plugin'")
    raise ValueError(f"method='coarse_to_fine' solves BlockAverage(factor=2^J) with a J-level "
                     f"Haar model; got {op!r} and a {spec.levels}-level {spec.wavelet} model "
                     f"(factor {2 ** spec.levels} needed); use method='plugin'")
  return cfg.method == "coarse_to_fine" or (cfg.method == "auto" and fits)


def check_problem(params: models.ModelParams, op: ops.Operator, image_shape: ops.Shape,
                  config: SolverConfig) -> ops.Operator:
  """Everything ``solve`` checks before compute, without measurements.

  Args:
    params: the prior.
    op: the measurement operator.
    image_shape: the images' (H, W, C).
    config: the solver's settings.

  Returns:
    The operator with its image shape bound.

  Raises:
    TypeError: params, op or config of the wrong type.
    ValueError: an operator that cannot measure such images, images the model cannot take, or
      a method that does not apply; the message says what would.
  """
  models.check_params(params)
  if not isinstance(config, SolverConfig):
    raise TypeError(f"config must be a wcdm_jax.inverse.SolverConfig, got "
                    f"{type(config).__name__}")
  if not isinstance(op, ops.Operator):
    raise TypeError(f"op must be a wcdm_jax.inverse operator (Inpainting, RandomPixels, "
                    f"BlockAverage, SpectralLowpass, RandomProjection), got {type(op).__name__}")
  spec = params.spec
  op.check(image_shape)
  if image_shape[2] != spec.channels:
    raise ValueError(f"the operator measures {image_shape[2]}-channel images but the model takes "
                     f"{spec.channels}; build the operator for (H, W, {spec.channels})")
  if spec.levels and spec.mode == wavelets.PERIODIZATION:
    wavelets.check_size(image_shape[0], image_shape[1], spec.levels)
  uses_coarse_to_fine(params, op, config)
  if isinstance(op, ops.SpectralLowpass) and op.shape is None:
    return op.bind(image_shape)
  if isinstance(op, ops.BlockAverage) and op.shape is None:
    return ops.BlockAverage(op.factor, image_shape)
  return op


def solve(key: jax.Array, params: models.ModelParams, op: ops.Operator, measurements: jax.Array,
          *, config: SolverConfig | None = None, return_info: bool = False,
          conv_impl: str = "auto", mesh: Mesh | None = None):
  """Images (B, H, W, C) consistent with ``measurements`` = ``op.forward(images)``, drawn
  with the prior of ``params`` (flat or multi-scale).

  The image shape is the operator's, else (for BlockAverage) the measurements' times the
  factor, else the model's training size.

  Args:
    key: one key or a (B,) batch of keys (sample b depends only on its own).
    params: the prior, flat or multi-scale.
    op: ``Inpainting``, ``RandomPixels``, ``BlockAverage``, ``SpectralLowpass`` or
      ``RandomProjection``.
    measurements: (B, ...) ``op.forward(images)``.
    config: a ``SolverConfig`` (default: ours; ``inverse.ORIGINAL`` for the original's
      settings; ``SolverConfig(sampler=FlowConfig(...))`` for the constrained probability
      flow).
    return_info: also return a ``sampling.AscentInfo`` (for the coarse-to-fine solver, a list
      of one per level, coarse first).
    conv_impl: how convolutions run.
    mesh: split the batch over this mesh's 'data' axis; default: the mesh ``measurements``
      is sharded on, if any.

  Returns:
    (B, H, W, C) float32 images; with ``return_info``, (images, info).

  Raises:
    TypeError, ValueError: as ``check_problem``, or measurements of the wrong shape.
  """
  models.check_params(params)
  cfg = SolverConfig() if config is None else config
  if not isinstance(measurements, (jax.Array, np.ndarray)):
    raise TypeError(f"measurements must be an array (op.forward(images)), got "
                    f"{type(measurements).__name__}")
  spec = params.spec
  if not isinstance(op, ops.Operator):
    check_problem(params, op, (1, 1, 1), cfg)  # raises the TypeError
  shape = op.image_shape(tuple(measurements.shape[1:]),
                         tuple(spec.image_size) + (spec.channels,))
  op = check_problem(params, op, shape, cfg)
  op.check_measurements(measurements, shape)
  cfg = resolve(cfg, op)
  keys = validation.keys(key, measurements.shape[0])
  mesh = parallel.resolve_mesh(mesh, measurements)
  keys, params, op, measurements = parallel.onto(mesh, keys, params, op, measurements)
  measurements = jnp.asarray(measurements)
  if not jnp.iscomplexobj(measurements):
    measurements = measurements.astype(jnp.float32)
  if uses_coarse_to_fine(params, op, cfg):
    low = measurements / op.factor  # block means = the J-level Haar low-pass
    flow = cfg.sampler if isinstance(cfg.sampler, sampling.FlowConfig) else None
    out = sampling.super_resolve(keys, params, low, cond_config=cfg.cond_config or flow,
                                 return_intermediates=return_info, conv_impl=conv_impl,
                                 mesh=mesh)
    return (out[0], out[2]) if return_info else out
  x, info = _plugin(keys, params, op, measurements, cfg, conv_impl, mesh)
  return (x, info) if return_info else x
