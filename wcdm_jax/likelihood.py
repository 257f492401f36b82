"""Log-likelihoods of images under a blind denoiser's prior: per image, per scale, in bits/pixel.

The bound (variational diffusion models, Kingma, Salimans, Poole & Ho 2021, continuous time,
variance-exploding form). For y_s = x + s z, z ~ N(0, I) and d coefficients,

  -log p(x) <= KL(N(x, s_max^2 I) || prior)                       (prior term)
             + d/2 log(2 pi e s_min^2)                             (reconstruction term)
             + int_{s_min}^{s_max} E_z ||x - D(y_s)||^2 / s^3 ds   (diffusion term)

with equality in expectation over x when D is the MMSE denoiser E[x | y_s] and the prior and
reconstruction terms are tight (the I-MMSE relation, Guo, Shamai & Verdu 2005). A blind
denoiser D(y) = y - f(y) estimates E[x | y] whatever s is (Miyasawa / Tweedie), so it is
used as is. The diffusion term is estimated by Monte Carlo in u = log s (the integrand
||x - D||^2 / s^2 is then nearly flat at small s): ``replicas`` independent randomly shifted
lattices of ``num_evals / replicas`` strata each (Cranley-Patterson rotation), unbiased, with
the standard error from the replicas' spread. All randomness comes from one key per image,
never from the model: two models given the same keys see the same noise levels, noise and
dequantisation (paired comparisons).

Discrete images. 8-bit values k / (bins - 1) are dequantised, x~ = x + (u - 1/2) / (bins - 1)
with u uniform (as in variational diffusion models and score_sde), so that
-log2 P(x) <= E_u[-log2 p(x~)] + d log2(bins - 1): bits per pixel comparable with the
density-model literature at the same bit depth.

Multi-scale. The normalised orthogonal pyramid (method.md §2: each level is an orthonormal
wavelet step scaled by 1/2) is a linear bijection with log|det| = -ln 2 per coefficient of
the level's input, so -log p(x) = -log p(x_J) + sum_j -log p(xbar_j | x_{j+1}) + ln 2 sum_j
n_j; each conditional term has the same bound with D_j(xbar_j + s z; x_{j+1}) (the clean
low-pass conditions). Per scale, s_min follows the coefficients' gain (2^-(j+1) for the
details of level j, 2^-J for the low-pass) and s_max stays the nets' training range.

The exact alternative, the probability-flow ODE dy/ds = (y - D(y)) / s with a Hutchinson
trace estimator (score_sde's likelihood), is not implemented here.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jax.sharding import Mesh

from wcdm_jax import models, parallel, settings, validation, wavelets

LN2 = math.log(2.0)
# denoiser(y (B, h, w, c), sigma (B,)) -> estimate of E[x | y] (B, h, w, c); blind ones ignore sigma
Denoiser = Callable[[jax.Array, jax.Array], jax.Array]
# conditional denoiser(ybar (B, h, w, 3c), low (B, h, w, c), sigma (B,)) -> E[xbar | ybar, low]
CondDenoiser = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]


@dataclasses.dataclass(frozen=True)
class LikelihoodConfig:
  """Settings of the bound (pixel units, images in [0, 1]).

  Attributes:
    num_evals: denoiser evaluations per image and scale (the cost); a multiple of replicas.
    replicas: independent shifted lattices; the standard error comes from their spread (>= 2).
    sigma_min: the smallest noise std of the diffusion term; below the dequantisation noise
      (std 0.29 / 255) it costs nothing when D is near the identity there.
    sigma_max: the largest, the nets' training range (noise_max / 255; 1.0 for the release).
    bins: levels per channel of the images (256 for 8 bits); 0 = continuous data (no
      dequantisation, bits of a density).
    prior_mean: the prior of y at sigma_max is N(prior_mean, sigma_max^2 + prior_var) per
      pixel for the low-pass (or flat) image, N(0, sigma_max^2) for wavelet details.
    prior_var: see prior_mean.
    scan: the cuts of the reconstruction term: sigma_min * 2^k, k < scan (``truncations``). A
      denoiser that is not the identity on clean images (an error floor, e.g. 40 dB) pays
      floor / (2 s^2) nats per pixel for every s below its floor; the bound is valid at every
      cut, ``LogProb.bits_per_pixel`` is at the cut the evaluations support best (chosen
      without selection bias), and that cut says at which noise level the model's fine-scale
      density stops being better than Gaussian noise of that width. scan = 1: at sigma_min.
  """
  num_evals: int = settings.setting(
      64, "Denoiser evaluations per image and scale (a multiple of replicas).", flag="evals")
  replicas: int = settings.setting(
      4, "Shifted lattices; the standard error comes from their spread.")
  sigma_min: float = settings.setting(
      0.25 / 255, "Smallest noise std; the bound is also reported with the reconstruction at "
      "2x, 4x, ... of it (scan).", scale=255)
  sigma_max: float = settings.setting(
      1.0, "Largest noise std: the nets' training range.", scale=255)
  bins: int = settings.setting(256, "Levels per channel of the images (0 = continuous).")
  prior_mean: float = settings.setting(0.5, "Mean of the low-pass (or flat) prior at sigma_max.")
  prior_var: float = settings.setting(
      1.0 / 12, "Variance of the low-pass (or flat) prior beyond sigma_max^2.")
  scan: int = settings.setting(8, "Reconstruction cuts sigma_min * 2^k, k < scan.")

  def __post_init__(self):
    if not isinstance(self.replicas, int) or self.replicas < 2:
      raise ValueError(f"replicas={self.replicas!r}: need an int >= 2 (the standard error comes "
                       "from their spread)")
    if not isinstance(self.num_evals, int) or self.num_evals < self.replicas or (
        self.num_evals % self.replicas):
      raise ValueError(f"num_evals={self.num_evals!r}: need a positive multiple of replicas="
                       f"{self.replicas} (denoiser evaluations per image and scale)")
    if not (np.isfinite(self.sigma_min) and np.isfinite(self.sigma_max)
            and 0 < self.sigma_min < self.sigma_max):
      raise ValueError(f"sigma range [{self.sigma_min}, {self.sigma_max}] is empty or not "
                       "positive: need 0 < sigma_min < sigma_max, e.g. 0.25/255 and 1.0")
    if not isinstance(self.bins, int) or self.bins == 1 or self.bins < 0:
      raise ValueError(f"bins={self.bins!r}: 256 for 8-bit images, 0 for continuous data")
    if not isinstance(self.scan, int) or self.scan < 1:
      raise ValueError(f"scan={self.scan!r}: need an int >= 1 (1 = the bound at sigma_min only)")
    if not (np.isfinite(self.prior_var) and self.prior_var >= 0 and np.isfinite(self.prior_mean)):
      raise ValueError(f"prior_mean={self.prior_mean}, prior_var={self.prior_var}: need finite "
                       "values and prior_var >= 0")

  @property
  def strata(self) -> int:
    return self.num_evals // self.replicas

  @property
  def truncations(self) -> tuple[float, ...]:
    """The reconstruction-term noise levels of ``LogProb.scan`` (pixel units)."""
    return tuple(min(self.sigma_min * 2 ** k, self.sigma_max) for k in range(self.scan))


@struct.dataclass
class LogProb:
  """Upper bound on -log2 P(x) per image, in bits per pixel (per channel value), with its
  Monte Carlo standard error; ``scales`` splits it into terms that sum to the total:
  'flat', or 'low' (x_J), 'cond{J-1}' .. 'cond0' (each level's details given its low-pass)
  and 'log_det' (the pyramid's scaling), all in bits per pixel of the full image, plus
  'dequantization' (log2(bins - 1), 0 for continuous data). ``scales_stderr``: per term.

  The reconstruction term sits at the cut of ``config.truncations`` that the evaluations
  support best, chosen without selection bias: each replica takes the cut where the other
  replicas' mean is lowest (``cross_fitted_cut``; ``cuts``: each replica's, pixel units),
  and the figures are the means of the replicas' values at their cuts.
  ``scan`` / ``scan_stderr``: the total at each cut (column 0: sigma_min, the bound of a
  perfect denoiser); ``scales_scan``: per term. Their minimum over cuts is optimistic by
  about a standard error; ``bits_per_pixel`` is not."""
  bits_per_pixel: jax.Array  # (B,)
  stderr: jax.Array  # (B,)
  scales: dict[str, jax.Array]  # each (B,)
  scales_stderr: dict[str, jax.Array]  # each (B,)
  cuts: jax.Array  # (B, R) pixel units
  scan: jax.Array  # (B, T)
  scan_stderr: jax.Array  # (B, T)
  scales_scan: dict[str, jax.Array]  # each (B, T)


def _prior_kl(x: jax.Array, sigma_max: float, mean: float, var: float) -> jax.Array:
  """KL(N(x, sigma_max^2 I) || N(mean, (sigma_max^2 + var) I)) summed per image, (B,)."""
  v = sigma_max ** 2 + var
  per = 0.5 * (jnp.log(v / sigma_max ** 2) + (sigma_max ** 2 + (x - mean) ** 2) / v - 1.0)
  return per.reshape(x.shape[0], -1).sum(-1)


def bound_scan(keys: jax.Array, denoiser: Denoiser, x: jax.Array, cfg: LikelihoodConfig,
               **kwargs) -> tuple[jax.Array, jax.Array]:
  """The bound on -log p(x) in nats for continuous x (B, h, w, c) with the reconstruction
  term at each of sigma_min * 2^k, k < cfg.scan: (estimates (B, T), stderrs (B, T)): the
  mean and standard error of ``replica_scan``'s replicas."""
  per = replica_scan(keys, denoiser, x, cfg, **kwargs)
  return per.mean(1), per.std(1, ddof=1) / math.sqrt(cfg.replicas)


def replica_scan(keys: jax.Array, denoiser: Denoiser, x: jax.Array, cfg: LikelihoodConfig, *,
                 sigma_min: float | None = None, prior_mean: float | None = None,
                 prior_var: float | None = None) -> jax.Array:
  """(B, R, T) nats: each of the R independent replicas' estimate of the bound on -log p(x)
  for continuous x (B, h, w, c), with the reconstruction term at each of sigma_min * 2^k,
  k < cfg.scan.

  keys: (B,) one key per image (its noise levels and noise); denoiser(y, sigma) -> E[x | y].
  sigma_min / prior_*: override the config's for this scale (the multi-scale gains). The
  evaluations are log-uniform on [sigma_min, sigma_max] (each replica a shifted lattice of
  cfg.strata levels); truncation t keeps those >= t (an unbiased estimate of the integral
  from t).
  """
  b = x.shape[0]
  d = math.prod(x.shape[1:])
  s_min = cfg.sigma_min if sigma_min is None else sigma_min
  s_max = cfg.sigma_max
  mean = cfg.prior_mean if prior_mean is None else prior_mean
  var = cfg.prior_var if prior_var is None else prior_var
  span = math.log(s_max / s_min)
  r, k = cfg.replicas, cfg.strata
  shift_keys, noise_keys = jnp.moveaxis(jax.vmap(lambda q: jax.random.split(q, 2))(keys), 1, 0)
  shifts = jax.vmap(lambda q: jax.random.uniform(q, (r,), jnp.float32))(shift_keys)  # (B, R)
  u = (jnp.arange(k)[None, :, None] + shifts[:, None, :]) / k  # (B, K, R) in [0, 1)
  log_sigmas = jnp.log(s_min) + span * u.reshape(b, k * r)  # (B, N), N = num_evals

  def one(_, n):  # one evaluation per image: (B,) integrand values
    sigma = jnp.exp(log_sigmas[:, n])
    z = jax.vmap(lambda q: jax.random.normal(jax.random.fold_in(q, n), x.shape[1:], x.dtype))(noise_keys)
    y = x + sigma[:, None, None, None] * z
    err = jnp.sum((x - denoiser(y, sigma)) ** 2, axis=(1, 2, 3))
    return None, span * err / sigma ** 2

  _, vals = jax.lax.scan(one, None, jnp.arange(k * r))  # (N, B)
  vals = vals.T.reshape(b, k, r)
  cuts = jnp.asarray([min(s_min * 2 ** i, s_max) for i in range(cfg.scan)], jnp.float32)  # (T,)
  keep = log_sigmas.reshape(b, k, r)[..., None] >= jnp.log(cuts)  # (B, K, R, T)
  diffusion = jnp.mean(jnp.where(keep, vals[..., None], 0.0), axis=1)  # (B, R, T)
  recon = 0.5 * d * jnp.log(2 * math.pi * math.e * cuts ** 2)  # (T,)
  return _prior_kl(x, s_max, mean, var)[:, None, None] + recon + diffusion


def _dequantize(keys: jax.Array, x: jax.Array, bins: int) -> jax.Array:
  """x (B, ...) + uniform noise over one quantisation bin, from one key per image."""
  if not bins:
    return x
  u = jax.vmap(lambda q: jax.random.uniform(q, x.shape[1:], x.dtype))(keys)
  return x + (u - 0.5) / (bins - 1)


def _image_keys(keys: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(B,) keys -> (dequantisation keys, per-scale base keys), both (B,)."""
  pair = jax.vmap(lambda q: jax.random.split(q, 2))(keys)
  return pair[:, 0], pair[:, 1]


def _per_scale(keys: jax.Array, scale: int) -> jax.Array:
  return jax.vmap(lambda q: jax.random.fold_in(q, scale))(keys)


def multiscale_nats(keys: jax.Array, low_denoiser: Denoiser,
                    cond_denoisers: Sequence[CondDenoiser], x: jax.Array, cfg: LikelihoodConfig,
                    wavelet: str = "haar") -> tuple[dict[str, jax.Array], dict[str, jax.Array]]:
  """Per-term nats (and stderrs), each (B, T) over ``cfg.truncations``: the mean and standard
  error of ``multiscale_replicas``' replicas."""
  per = multiscale_replicas(keys, low_denoiser, cond_denoisers, x, cfg, wavelet)
  return ({n: v.mean(1) for n, v in per.items()},
          {n: v.std(1, ddof=1) / math.sqrt(cfg.replicas) for n, v in per.items()})


def multiscale_replicas(keys: jax.Array, low_denoiser: Denoiser,
                        cond_denoisers: Sequence[CondDenoiser], x: jax.Array,
                        cfg: LikelihoodConfig, wavelet: str = "haar") -> dict[str, jax.Array]:
  """Per-term nats of each replica, each (B, R, T) over ``cfg.truncations``, of continuous x
  (B, H, W, C) under a pyramid of len(cond_denoisers) levels: 'low', 'cond{j}' and
  'log_det' (sum over terms = the bound). Truncation t is t 2^-(j+1) for the details of level
  j and t 2^-J for the low-pass: one pixel-domain noise level for every scale."""
  levels = len(cond_denoisers)
  lows, details = wavelets.analysis(x, levels, wavelet)
  nats = {"low": replica_scan(_per_scale(keys, 0), low_denoiser, lows[-1], cfg,
                              sigma_min=cfg.sigma_min * wavelets.band_scale(levels))}
  for j in reversed(range(levels)):
    f = functools.partial(lambda y, s, j: cond_denoisers[j](y, lows[j], s), j=j)
    nats[f"cond{j}"] = replica_scan(
        _per_scale(keys, j + 1), f, details[j], cfg,
        sigma_min=cfg.sigma_min * wavelets.band_scale(j + 1), prior_mean=0.0, prior_var=0.0)
  dims = sum(math.prod(v.shape[1:]) for v in [x] + lows[:-1])  # inputs of the J splits
  nats["log_det"] = jnp.full((x.shape[0], cfg.replicas, cfg.scan), LN2 * dims)
  return nats


def cross_fitted_cut(total: jax.Array) -> jax.Array:
  """(B, R, T) replicas' bounds at T cuts -> (B, R) the cut of each replica: the one with the
  lowest mean over the *other* replicas. A replica's value at its cut is then an unbiased
  estimate of the bound there (the cut was chosen without it), where the minimum of one
  estimate over the cuts would be optimistic."""
  r = total.shape[1]
  others = (total.sum(1, keepdims=True) - total) / (r - 1)  # (B, R, T)
  return jnp.argmin(others, axis=-1)


def _at_cut(v: jax.Array, cut: jax.Array) -> jax.Array:
  """(B, R, T) values at (B, R) cut indices -> (B, R)."""
  return jnp.take_along_axis(v, cut[..., None], axis=-1)[..., 0]


@functools.partial(jax.jit, static_argnames=("cfg", "conv_impl", "mesh"))
def _log_prob(keys, params: models.ModelParams, images, cfg: LikelihoodConfig, conv_impl: str,
              mesh=None):
  return parallel.map_batch(lambda k, x, p: _log_prob_local(k, p, x, cfg, conv_impl), mesh,
                            (keys, images), (params,))


@jax.jit
def _range_stats(images):  # (non-finite count, min, max): three scalars, not the images
  return jnp.sum(~jnp.isfinite(images)), jnp.min(images), jnp.max(images)


def _log_prob_local(keys, params: models.ModelParams, images, cfg: LikelihoodConfig,
                    conv_impl: str):
  spec = params.spec
  deq_keys, scale_keys = _image_keys(keys)
  x = _dequantize(deq_keys, images.astype(jnp.float32), cfg.bins)
  blind = lambda name: (lambda y, _s, f=params.residual_fn(name, conv_impl): y - f(y))
  if spec.levels == 0:
    nats = {"flat": replica_scan(_per_scale(scale_keys, 0), blind("flat"), x, cfg)}
  else:
    conds = [(lambda y, low, _s, f=params.residual_fn(f"cond{j}", conv_impl):
              y - f(jnp.concatenate([low, y], -1))) for j in range(spec.levels)]
    nats = multiscale_replicas(scale_keys, blind("low"), conds, x, cfg, spec.wavelet)
  pixels = math.prod(images.shape[1:])
  reps = {n: v / (pixels * LN2) for n, v in nats.items()}  # each (B, R, T) bits per pixel
  deq = math.log2(cfg.bins - 1) if cfg.bins else 0.0
  reps["dequantization"] = jnp.full((images.shape[0], cfg.replicas, cfg.scan), deq)
  sqrt_r = math.sqrt(cfg.replicas)
  se = lambda v: v.std(1, ddof=1) / sqrt_r  # over replicas: (B, R, ...) -> (B, ...)
  total = sum(reps.values())  # (B, R, T): replica r of every term, summed
  cut = cross_fitted_cut(total)  # (B, R)
  at_cut = {n: _at_cut(v, cut) for n, v in reps.items()}  # each (B, R)
  chosen = _at_cut(total, cut)
  return LogProb(chosen.mean(1), se(chosen), {n: v.mean(1) for n, v in at_cut.items()},
                 {n: se(v) for n, v in at_cut.items()}, jnp.asarray(cfg.truncations)[cut],
                 total.mean(1), se(total), {n: v.mean(1) for n, v in reps.items()})


def _check_images(params: models.ModelParams, images) -> jax.Array:
  spec = params.spec
  images = validation.images(images, "images", spec.channels)
  if not isinstance(images, jax.core.Tracer):
    bad, lo, hi = (float(v) for v in jax.device_get(_range_stats(images)))
    if bad:
      raise ValueError(f"images hold {int(bad)} non-finite values; pass finite images in [0, 1]")
    if lo < 0 or hi > 1:
      raise ValueError(f"images must lie in [0, 1], got values in [{lo:.4g}, {hi:.4g}]"
                       "; divide 8-bit images by 255")
  if spec.levels:
    if spec.mode != wavelets.PERIODIZATION:
      raise ValueError(f"log_prob needs the periodised pyramid (a bijection); this model uses "
                       f"mode {spec.mode!r}, whose boundary coefficients make it redundant")
    wavelets.check_size(images.shape[1], images.shape[2], spec.levels)
  return images


def log_prob(key: jax.Array, params: models.ModelParams, images: jax.Array, *,
             config: LikelihoodConfig | None = None, conv_impl: str = "auto",
             mesh: Mesh | None = None) -> LogProb:
  """Upper bound on the negative log-likelihood of (B, H, W, C) images in [0, 1], in bits
  per pixel, for a flat or a multi-scale model (see the module docstring for the bound).

  Costs num_evals * (J + 1) net evaluations per image.

  Args:
    key: one key (split into one per image) or a (B,) batch of keys; image i's estimate
      depends only on its key and its pixels, so the same keys give paired estimates across
      models and the figures do not depend on the batch's other images.
    params: a flat or multi-scale model.
    images: (B, H, W, C) in [0, 1] (8-bit values for the default dequantisation).
    config: ``LikelihoodConfig`` (default: 64 denoiser evaluations per image and scale in 4
      replicas, sigma in [0.25/255, 1], 8-bit dequantisation).
    conv_impl: how convolutions run.
    mesh: split the images over this mesh's 'data' axis; default: the mesh ``images`` is
      sharded on, if any.

  Returns:
    ``LogProb``: ``bits_per_pixel`` (B,) at the cut chosen without selection bias, ``stderr``
    (B,), ``scales`` {term: (B,)}, ``cuts`` and ``scan`` (the bound at every cut).

  Raises:
    ValueError, TypeError: images or keys of the wrong shape, or a bad config.
  """
  models.check_params(params)
  cfg = LikelihoodConfig() if config is None else config
  if not isinstance(cfg, LikelihoodConfig):
    raise TypeError(f"config must be a wcdm_jax.likelihood.LikelihoodConfig, got "
                    f"{type(cfg).__name__}")
  images = _check_images(params, images)
  keys = validation.keys(key, images.shape[0], "len(images)")
  mesh = parallel.resolve_mesh(mesh, images)
  keys, params, images = parallel.onto(mesh, keys, params, images)
  return _log_prob(keys, params, images, cfg, conv_impl, mesh)


def dataset_log_prob(params: models.ModelParams, images: np.ndarray, *, seed: int = 0,
                     config: LikelihoodConfig | None = None, batch_size: int = 16,
                     conv_impl: str = "auto", mesh: Mesh | None = None) -> dict:
  """``log_prob`` over (N, H, W, C) images in batches; image i uses fold_in(key(seed), i),
  so two models evaluated with one seed are paired and the batch size changes nothing. One
  jitted program for every batch (the last one padded); mesh: split each over its devices.

  Returns JSON-ready means over the images: 'bits_per_pixel' (``LogProb``'s: each replica at
  the cut chosen by the others), 'mc_stderr' (Monte Carlo error of that mean on these
  images), 'stderr_over_images' (the mean's error as an estimate over the image
  distribution), per term 'scales' / 'scales_mc_stderr', 'per_image', 'cut_255' (how often
  each cut, in /255, was chosen), and 'scan': the mean bound at each cut
  (``config.truncations``) and the best of them (a minimum over ``config.scan`` estimates:
  optimistic by at most about its standard error, unlike 'bits_per_pixel').
  """
  cfg = LikelihoodConfig() if config is None else config
  validation.positive_int(batch_size, "batch_size")
  base = jax.random.key(seed)
  parts = []
  for b in range(0, len(images), batch_size):
    x = jnp.asarray(images[b:b + batch_size], jnp.float32)
    rows = x.shape[0]  # the last batch is padded to batch_size: one program for every batch
    keys = jax.vmap(lambda i: jax.random.fold_in(base, i))(jnp.arange(b, b + batch_size))
    out = log_prob(keys, params, parallel.pad_to(x, batch_size), config=cfg,
                   conv_impl=conv_impl, mesh=mesh)
    parts.append(jax.device_get(jax.tree.map(lambda v: v[:rows], out)))
  cat = lambda get: np.concatenate([get(p) for p in parts]).astype(np.float64)
  bpp, se = cat(lambda p: p.bits_per_pixel), cat(lambda p: p.stderr)
  n = len(bpp)
  mc = lambda e: float(np.sqrt(np.sum(e ** 2)) / n)
  scan = np.concatenate([p.scan for p in parts]).astype(np.float64)  # (N, T)
  scan_se = np.concatenate([p.scan_stderr for p in parts]).astype(np.float64)
  best = int(np.argmin(scan.mean(0)))
  cuts = cat(lambda p: p.cuts)  # (N, R)
  scales_at = lambda k: {n: float(np.concatenate([p.scales_scan[n][:, k] for p in parts]).mean())
                         for n in parts[0].scales_scan}
  return {
      "scan": {"sigma_min_255": [t * 255 for t in cfg.truncations],
               "bits_per_pixel": scan.mean(0).tolist(),
               "mc_stderr": (np.sqrt((scan_se ** 2).sum(0)) / n).tolist(),
               "best": {"sigma_min_255": cfg.truncations[best] * 255,
                        "bits_per_pixel": float(scan[:, best].mean()),
                        "mc_stderr": float(np.sqrt((scan_se[:, best] ** 2).sum()) / n),
                        "stderr_over_images": float(scan[:, best].std(ddof=1) / np.sqrt(n))
                        if n > 1 else float("nan"),
                        "scales": scales_at(best)}},
      "bits_per_pixel": float(bpp.mean()), "mc_stderr": mc(se),
      "stderr_over_images": float(bpp.std(ddof=1) / np.sqrt(n)) if n > 1 else float("nan"),
      "scales": {k: float(cat(lambda p, k=k: p.scales[k]).mean()) for k in parts[0].scales},
      "scales_mc_stderr": {k: mc(cat(lambda p, k=k: p.scales_stderr[k]))
                           for k in parts[0].scales},
      "per_image": bpp.tolist(), "num_images": n,
      "cut_255": {f"{t * 255:g}": int(np.sum(np.isclose(cuts, t))) for t in cfg.truncations
                  if np.any(np.isclose(cuts, t))},
      "config": dataclasses.asdict(cfg), "seed": seed,
  }
