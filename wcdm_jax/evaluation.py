"""Metrics: PSNR, SSIM, per-scale denoising PSNR, multi-scale PSNR curves, Jacobians."""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from wcdm_jax import denoising, models, parallel, wavelets


def psnr(x: jax.Array, ref: jax.Array, peak: float = 1.0) -> jax.Array:
  """Per-image PSNR in dB of (B, H, W, C) ``x`` against ``ref``."""
  mse = jnp.mean(jnp.square(x - ref), axis=tuple(range(1, x.ndim)))
  return 10.0 * jnp.log10(peak ** 2 / jnp.maximum(mse, 1e-20))


def ssim(x: jax.Array, ref: jax.Array, peak: float = 1.0) -> jax.Array:
  """Per-image SSIM of (B, H, W, C) ``x`` against ``ref`` (Wang et al. 2004: Gaussian window
  11 x 11, std 1.5, K1 0.01, K2 0.03, 'valid' borders, mean over pixels and channels)."""
  t = np.arange(11) - 5.0
  g = np.exp(-t ** 2 / (2 * 1.5 ** 2))
  g = jnp.asarray(g / g.sum(), jnp.float32)

  def blur(a):  # (B, H, W, C) -> (B, H - 10, W - 10, C), separable Gaussian per channel
    b, h, w, c = a.shape
    p = jnp.moveaxis(a, 3, 1).reshape(b * c, h, w, 1)
    kernel = (g[:, None] * g[None, :])[:, :, None, None]
    out = jax.lax.conv_general_dilated(p, kernel, (1, 1), "VALID",
                                       dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return jnp.moveaxis(out.reshape(b, c, h - 10, w - 10), 1, 3)

  x, ref = jnp.asarray(x, jnp.float32), jnp.asarray(ref, jnp.float32)
  c1, c2 = (0.01 * peak) ** 2, (0.03 * peak) ** 2
  mx, my = blur(x), blur(ref)
  vx, vy = blur(x * x) - mx * mx, blur(ref * ref) - my * my
  cov = blur(x * ref) - mx * my
  s = ((2 * mx * my + c1) * (2 * cov + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
  return s.mean(axis=(1, 2, 3))


GAUSSIAN_WIDTHS = tuple(float(w) for w in np.geomspace(0.25, 4.0, 17))  # std in pixels


def gaussian_blur(images: jax.Array, width: float) -> jax.Array:
  """(B, H, W, C) images filtered by a Gaussian of std ``width`` pixels (reflected borders)."""
  r = max(1, int(np.ceil(3 * width)))
  t = np.arange(-r, r + 1, dtype=np.float64)
  g = np.exp(-t ** 2 / (2 * width ** 2))
  g = jnp.asarray(g / g.sum(), jnp.float32)
  b, h, w, c = images.shape
  x = jnp.moveaxis(images, 3, 1).reshape(b * c, h, w, 1)
  x = jnp.pad(x, ((0, 0), (r, r), (r, r), (0, 0)), mode="reflect" if min(h, w) > r else "edge")
  conv = lambda a, k: jax.lax.conv_general_dilated(a, k, (1, 1), "VALID",
                                                   dimension_numbers=("NHWC", "HWIO", "NHWC"))
  x = conv(conv(x, g[:, None, None, None]), g[None, :, None, None])
  return jnp.moveaxis(x.reshape(b, c, h, w), 1, 3)


def best_gaussian_psnr(noisy: jax.Array, clean: jax.Array,
                       widths: Sequence[float] = GAUSSIAN_WIDTHS) -> tuple[float, float]:
  """(mean PSNR, width) of the Gaussian filter whose width is best for these very images: an
  oracle-tuned linear baseline that any useful denoiser must beat."""
  scores = [float(psnr(gaussian_blur(noisy, w), clean).mean()) for w in widths]
  best = int(np.argmax(scores))
  return scores[best], float(widths[best])


def band_mse(x: jax.Array, ref: jax.Array, spec: models.ModelSpec) -> dict[str, jax.Array]:
  """Mean squared error of (B, H, W, C) ``x`` against ``ref`` split by the bands of ``spec``'s
  pyramid, in image units: {'low': (B,), 'cond{J-1}': (B,), ..., 'cond0': (B,)}, named by the
  net that denoises the band (a flat model: {'flat': the whole MSE}). With the orthonormal
  periodized wavelets the terms add up to the image's MSE (other modes: approximately), so
  they show which net of a multi-scale denoiser the error of its output comes from."""
  axes = tuple(range(1, x.ndim))
  if spec.levels == 0:
    return {"flat": jnp.mean(jnp.square(x - ref), axis=axes)}
  px, pr = (wavelets.decompose(a, spec.levels, spec.wavelet, spec.mode) for a in (x, ref))
  n = float(np.prod(x.shape[1:]))
  sq = lambda a, b, halvings: (jnp.sum(jnp.square(a - b), axis=axes)
                               / (n * wavelets.band_scale(halvings) ** 2))  # in image units
  out = {"low": sq(px.low, pr.low, spec.levels)}
  for j in reversed(range(spec.levels)):
    out[f"cond{j}"] = sq(px.details[j], pr.details[j], j + 1)
  return out


def noisy_copies(clean: jax.Array, sigmas: Sequence[float], key: jax.Array) -> list[jax.Array]:
  """``clean`` (B, H, W, C) plus Gaussian noise of each std in ``sigmas``, the i-th from
  ``key`` folded with i: the noisy inputs of ``compare_with_gaussian``."""
  return [clean + s * jax.random.normal(jax.random.fold_in(key, i), clean.shape)
          for i, s in enumerate(sigmas)]


def compare_with_gaussian(params: models.ModelParams, clean: jax.Array,
                          sigmas: Sequence[float], key: jax.Array) -> list[dict]:
  """For each noise std: mean PSNR of the noisy images, of the model's denoising and of the
  best Gaussian filter (``best_gaussian_psnr``), on (B, H, W, C) ``clean`` images; and under
  'bands' each band's mean squared error (``band_mse``) for the three, so that a model that
  loses can be traced to the net that loses."""
  den = jax.jit(lambda y: denoising.denoise(params, y))
  rows = []
  for s, y in zip(sigmas, noisy_copies(clean, sigmas, key)):
    gauss, width = best_gaussian_psnr(y, clean)
    out = den(y)
    errs = {what: band_mse(a, clean, params.spec)
            for what, a in (("model", out), ("noisy", y), ("gaussian", gaussian_blur(y, width)))}
    bands = {band: {what: float(errs[what][band].mean()) for what in errs}
             for band in errs["model"]}
    rows.append({"sigma": float(s), "noisy": float(psnr(y, clean).mean()),
                 "model": float(psnr(out, clean).mean()), "gaussian": gauss,
                 "gaussian_width": width, "bands": bands})
  return rows


def scale_psnr(spec: models.ModelSpec, name: str, variables: models.Variables,
               images: jax.Array, sigma: float, key: jax.Array,
               conv_impl: str = "auto") -> tuple[jax.Array, jax.Array]:
  """(noisy, denoised) mean PSNR of one net on its part of the pyramid of clean ``images``.

  ``sigma`` is the noise std added to the net's input (image, low-pass, or detail
  coefficients). flat/low: PSNR of the image / low-pass. cond j: PSNR of the level's
  one-level reconstruction from the clean low-pass and the noisy / denoised details.
  """
  net = spec.nets[name]
  f = lambda x: models.apply_net(net, variables, x, conv_impl=conv_impl)
  if net.kind == "flat":
    noisy = images + sigma * jax.random.normal(key, images.shape)
    return psnr(noisy, images).mean(), psnr(noisy - f(noisy), images).mean()
  lows, details = wavelets.analysis(images, spec.levels, spec.wavelet, spec.mode)
  if net.kind == "low":
    clean = lows[-1]
    noisy = clean + sigma * jax.random.normal(key, clean.shape)
    return psnr(noisy, clean).mean(), psnr(noisy - f(noisy), clean).mean()
  cond, det = lows[net.level], details[net.level]
  noisy = det + sigma * jax.random.normal(key, det.shape)
  den = noisy - f(jnp.concatenate([cond, noisy], -1))
  up = lambda d: wavelets.idwt_level(cond, d, spec.wavelet, spec.mode)
  ref = up(det)
  return psnr(up(noisy), ref).mean(), psnr(up(den), ref).mean()


@jax.jit
def _add_noise(x, sigma, seed, i, b):
  key = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), i), b)
  return x + sigma * jax.random.normal(key, x.shape, x.dtype)


def _noisy_batches(images: np.ndarray, sigmas: Sequence[float], seed: int, batch_size: int):
  """(level index, clean batch, noisy batch, rows) over every level and batch: the noise of
  level i and batch b from ``jax.random.key(seed)`` folded with (i, b), the same for every
  caller. Every batch has ``batch_size`` rows (the last one padded with copies of its last
  image, so that nothing recompiles for it); ``rows`` of them are real."""
  for i, s in enumerate(sigmas):
    for b in range(0, len(images), batch_size):
      real = jnp.asarray(images[b:b + batch_size], jnp.float32)
      noisy = _add_noise(real, s, seed, i, b)  # the noise of the real rows as before
      yield (i, parallel.pad_to(real, batch_size), parallel.pad_to(noisy, batch_size),
             real.shape[0])


def denoising_curve(params: models.ModelParams, images: np.ndarray, sigmas: Sequence[float],
                    seed: int = 0, batch_size: int = 16, mesh=None) -> dict:
  """Mean input and output PSNR of ``denoising.denoise`` over noise stds ``sigmas``; for a
  multi-scale model also each band's mean squared error (``band_mse``, image units) of the
  output ('band_mse_out') and of the input ('band_mse_in'), {band: [one per sigma]}, and the
  clean bands' energy ('band_energy', {band: float}: the error of returning the band as 0),
  so that a loss can be traced to the net of its band.

  Noise is drawn from ``jax.random.key(seed)`` folded with the noise level and batch index,
  so runs are comparable across models (and with ``gaussian_curve``). One jitted program
  per batch shape; mesh: split each batch over its devices (``parallel``).
  """
  spec = params.spec

  @jax.jit
  def measure(params, x, y):
    out = denoising.denoise(params, y, mesh=mesh)
    if not spec.levels:
      return psnr(y, x), psnr(out, x), None, None, None
    return (psnr(y, x), psnr(out, x), band_mse(y, x, spec), band_mse(out, x, spec),
            band_mse(jnp.zeros_like(x), x, spec))

  pin, pout = [[] for _ in sigmas], [[] for _ in sigmas]
  bin_, bout = [[] for _ in sigmas], [[] for _ in sigmas]
  energy = []
  for i, x, y, rows in _noisy_batches(images, sigmas, seed, batch_size):
    a, b, c, d, e = jax.tree.map(lambda v: v[:rows], measure(params, x, y))
    pin[i].append(a)
    pout[i].append(b)
    if spec.levels:
      bin_[i].append(c)
      bout[i].append(d)
      if i == 0:
        energy.append(e)
  mean = lambda parts: [float(jnp.concatenate(p).mean()) for p in parts]
  result = {"sigma": [float(s) for s in sigmas], "psnr_in": mean(pin), "psnr_out": mean(pout)}
  if spec.levels:
    band_mean = lambda parts, band: float(jnp.concatenate([p[band] for p in parts]).mean())
    bands = ["low"] + [f"cond{j}" for j in reversed(range(spec.levels))]  # coarse first
    result["band_mse_in"] = {b: [band_mean(bin_[i], b) for i in range(len(sigmas))] for b in bands}
    result["band_mse_out"] = {b: [band_mean(bout[i], b) for i in range(len(sigmas))]
                              for b in bands}
    result["band_energy"] = {b: band_mean(energy, b) for b in bands}
  return result


def gaussian_curve(images: np.ndarray, sigmas: Sequence[float], seed: int = 0,
                   batch_size: int = 16, widths: Sequence[float] = GAUSSIAN_WIDTHS
                   ) -> dict[str, list[float]]:
  """``denoising_curve``'s figures for the best Gaussian filter at each noise level (its
  width, under 'width', chosen on these very images: an oracle-tuned linear baseline), on the
  same noise draws."""
  measure = jax.jit(lambda x, y, w: psnr(gaussian_blur(y, w), x), static_argnums=2)
  pin = [[] for _ in sigmas]
  pout = [[[] for _ in widths] for _ in sigmas]
  for i, x, y, rows in _noisy_batches(images, sigmas, seed, batch_size):
    pin[i].append(psnr(y, x)[:rows])
    for k, w in enumerate(widths):
      pout[i][k].append(measure(x, y, w)[:rows])
  out = {"sigma": [float(s) for s in sigmas], "psnr_in": [], "psnr_out": [], "width": []}
  for i in range(len(sigmas)):
    scores = [float(jnp.concatenate(p).mean()) for p in pout[i]]
    best = int(np.argmax(scores))
    out["psnr_in"].append(float(jnp.concatenate(pin[i]).mean()))
    out["psnr_out"].append(scores[best])
    out["width"].append(float(widths[best]))
  return out


def adaptive_filters(params: models.ModelParams, noisy: jax.Array,
                     pixels: Sequence[tuple[int, int]]) -> jax.Array:
  """Rows of the denoiser's Jacobian: the weights it averages around each given pixel.

  noisy: (H, W, C) one image. Returns (len(pixels), H, W): d denoised[p] / d noisy, summed
  over channels; for a bias-free denoiser denoised = J(y) y, so each row is the adaptive
  filter applied at that pixel (Mohan et al. 2020; the paper's analysis).

  A few rows of an (HWC x HWC) Jacobian: reverse mode, one pullback per pixel (forward mode
  would need HWC tangents), all pixels in one jitted, vmapped program.
  """
  noisy = jnp.asarray(noisy)
  sel = jnp.asarray(pixels, jnp.int32).reshape(-1, 2)  # (P, 2)

  @jax.jit
  def rows(params, y, sel):
    out, pullback = jax.vjp(lambda y: denoising.denoise(params, y[None])[0], y)
    def row(p):
      ct = jnp.zeros_like(out).at[p[0], p[1]].set(1.0)
      return pullback(ct)[0].sum(-1)
    return jax.vmap(row)(sel)

  return rows(params, noisy, sel)
