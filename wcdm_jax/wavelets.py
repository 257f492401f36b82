"""Orthogonal 2-D wavelet pyramid on (B, H, W, C) batches, pure and jittable.

Normalisation (method.md §2): at pyramid level j (j = 0 finest, band size H / 2^(j+1))
the four orthonormal bands are divided by 2^(j+1), so every low-pass band is a local
*average* image in pixel units. Equivalently one level maps a normalised low-pass x to
``dwt(x) / 2`` and back with ``2 * idwt(...)``.

Band order follows PyWavelets: ``[low, H, V, D]`` with H = high-pass along rows (axis H),
V = high-pass along columns (axis W), D = both. Detail bands are stored band-major in the
channel axis: ``(B, h, w, 3C) = [H(C), V(C), D(C)]``.

Boundary modes: ``"periodization"`` (default) is implemented here with circular filtering
and is exactly orthonormal for every orthogonal PyWavelets wavelet (sizes halve). Other
modes (``"symmetric"``, ``"reflect"``, ``"zero"``) go through jaxwt; they are redundant
(sizes shrink by less than 2) and therefore not orthonormal except for Haar.
"""
from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import pywt
from flax import struct

from wcdm_jax import validation

PERIODIZATION = "periodization"
JAXWT_MODES = ("symmetric", "reflect", "zero")


@struct.dataclass
class Pyramid:
  """Multi-scale representation x_0 -> (x_J, xbar_1 .. xbar_J), normalised.

  low: (B, H/2^J, W/2^J, C) coarsest low-pass x_J.
  details: level j = 0 (finest) .. J-1, each (B, H/2^(j+1), W/2^(j+1), 3C).
  """
  low: jax.Array
  details: tuple[jax.Array, ...]
  wavelet: str = struct.field(pytree_node=False, default="haar")
  mode: str = struct.field(pytree_node=False, default=PERIODIZATION)
  sizes: tuple[tuple[int, int], ...] = struct.field(pytree_node=False, default=())

  @property
  def levels(self) -> int:
    return len(self.details)


@functools.lru_cache(maxsize=None)
def _filters(wavelet: str) -> tuple[np.ndarray, np.ndarray]:
  try:
    w = pywt.Wavelet(wavelet)
  except (ValueError, TypeError) as e:
    raise ValueError(f"unknown wavelet {wavelet!r}; use one of pywt.wavelist(kind='discrete')") from e
  if not w.orthogonal:
    raise ValueError(f"wavelet {wavelet!r} is not orthogonal; use e.g. 'haar', 'db2', 'sym4', 'coif1'")
  # float32 taps: a float32 image stays float32 with jax_enable_x64 on (float64 ones stay f64)
  return np.asarray(w.dec_lo, np.float32), np.asarray(w.dec_hi, np.float32)


def check_wavelet(wavelet: str, mode: str = PERIODIZATION) -> None:
  """Raise a ValueError naming what to use when ``wavelet`` / ``mode`` cannot be used."""
  _filters(wavelet)
  _check_mode(mode)


def _check_mode(mode: str) -> None:
  if mode != PERIODIZATION and mode not in JAXWT_MODES:
    raise ValueError(f"mode must be {PERIODIZATION!r} or one of {JAXWT_MODES}, got {mode!r}")


# --- periodised analysis / synthesis along one axis ---------------------------------------

def _analysis_1d(x: jax.Array, lo: np.ndarray, hi: np.ndarray, axis: int):
  """a[k] = sum_n lo[n] x[(2k + L/2 - n) mod N]; likewise d with hi (PyWavelets' alignment)."""
  n_taps = len(lo)
  if n_taps == 2:  # Haar: a reshape, no rolls.
    even = jax.lax.slice_in_dim(x, 0, None, 2, axis)
    odd = jax.lax.slice_in_dim(x, 1, None, 2, axis)
    return lo[1] * even + lo[0] * odd, hi[1] * even + hi[0] * odd
  a = d = 0.0
  for n in range(n_taps):
    xs = jax.lax.slice_in_dim(jnp.roll(x, n - n_taps // 2, axis), 0, None, 2, axis)
    a = a + lo[n] * xs
    d = d + hi[n] * xs
  return a, d


def _upsample(x: jax.Array, axis: int) -> jax.Array:
  """Interleave zeros after each sample along ``axis`` (length doubles)."""
  z = jnp.stack([x, jnp.zeros_like(x)], axis=axis + 1)
  shape = list(x.shape)
  shape[axis] *= 2
  return z.reshape(shape)


def _synthesis_1d(a: jax.Array, d: jax.Array, lo: np.ndarray, hi: np.ndarray, axis: int):
  """Adjoint (= inverse, the transform being orthonormal) of ``_analysis_1d``."""
  n_taps = len(lo)
  if n_taps == 2:
    even = lo[1] * a + hi[1] * d
    odd = lo[0] * a + hi[0] * d
    z = jnp.stack([even, odd], axis=axis + 1)
    shape = list(a.shape)
    shape[axis] *= 2
    return z.reshape(shape)
  ua, ud = _upsample(a, axis), _upsample(d, axis)
  x = 0.0
  for n in range(n_taps):
    x = x + jnp.roll(lo[n] * ua + hi[n] * ud, n_taps // 2 - n, axis)
  return x


def _dwt2_periodized(x: jax.Array, wavelet: str):
  lo, hi = _filters(wavelet)
  row_lo, row_hi = _analysis_1d(x, lo, hi, axis=1)  # along H
  ll, lh = _analysis_1d(row_lo, lo, hi, axis=2)      # along W
  hl, hh = _analysis_1d(row_hi, lo, hi, axis=2)
  # PyWavelets: cH = high along H, low along W; cV = low along H, high along W.
  return ll, (hl, lh, hh)


def _idwt2_periodized(ll, bands, wavelet: str):
  lo, hi = _filters(wavelet)
  hl, lh, hh = bands
  row_lo = _synthesis_1d(ll, lh, lo, hi, axis=2)
  row_hi = _synthesis_1d(hl, hh, lo, hi, axis=2)
  return _synthesis_1d(row_lo, row_hi, lo, hi, axis=1)


# --- jaxwt path (non-periodic boundary modes) ----------------------------------------------
# jaxwt breaks under jit when ``axes`` is not the default, so H and W are moved last here
# and batch/channels folded into one leading axis instead.

def _to_planes(x: jax.Array) -> jax.Array:  # (B, H, W, C) -> (B*C, H, W)
  b, h, w, c = x.shape
  return jnp.transpose(x, (0, 3, 1, 2)).reshape(b * c, h, w)


def _from_planes(p: jax.Array, b: int, c: int) -> jax.Array:  # (B*C, h, w) -> (B, h, w, C)
  return jnp.transpose(p.reshape(b, c, *p.shape[1:]), (0, 2, 3, 1))


def _dwt2_jaxwt(x: jax.Array, wavelet: str, mode: str):
  import jaxwt  # pylint: disable=g-import-not-at-top
  b, _, _, c = x.shape
  ll, bands = jaxwt.wavedec2(_to_planes(x), wavelet, mode=mode, level=1)
  return _from_planes(ll, b, c), tuple(_from_planes(t, b, c) for t in bands)


def _idwt2_jaxwt(ll, bands, wavelet: str, size: tuple[int, int]):
  import jaxwt  # pylint: disable=g-import-not-at-top
  b, _, _, c = ll.shape
  coeffs = [_to_planes(ll), tuple(_to_planes(t) for t in bands)]
  x = jaxwt.waverec2(coeffs, wavelet)
  return _from_planes(x[:, : size[0], : size[1]], b, c)


# --- public one-level and multi-level transforms -------------------------------------------

def band_scale(halvings: int) -> float:
  """What the normalisation multiplies the orthonormal bands by after ``halvings`` levels
  (the details of level j: j + 1; the low-pass x_J: J): 2^-halvings. Noise of std s on the
  image is s * band_scale on those bands; an error e on them is e / band_scale on the image."""
  return 2.0 ** -halvings


def dwt_level(x: jax.Array, wavelet: str = "haar", mode: str = PERIODIZATION):
  """One normalised level: x (B, H, W, C) -> (low (B, h, w, C), details (B, h, w, 3C))."""
  _check_mode(mode)
  _filters(wavelet)
  if mode == PERIODIZATION:
    ll, bands = _dwt2_periodized(x, wavelet)
  else:
    ll, bands = _dwt2_jaxwt(x, wavelet, mode)
  return ll / 2, jnp.concatenate(bands, axis=-1) / 2


def idwt_level(low: jax.Array, details: jax.Array, wavelet: str = "haar",
               mode: str = PERIODIZATION, size: tuple[int, int] | None = None) -> jax.Array:
  """Inverse of ``dwt_level``: (low (B, h, w, C), details (B, h, w, 3C)) -> (B, 2h, 2w, C).

  ``size`` is the (H, W) to crop to for the non-periodic modes (ignored for periodization).
  """
  _check_mode(mode)
  c = low.shape[-1]
  if details.shape[:-1] != low.shape[:-1] or details.shape[-1] != 3 * c:
    raise ValueError(f"details {details.shape} do not match low-pass {low.shape}: expected "
                     f"{low.shape[:-1] + (3 * c,)}")
  bands = tuple(2 * b for b in split_bands(details))
  if mode == PERIODIZATION:
    return _idwt2_periodized(2 * low, bands, wavelet)
  if size is None:
    size = (2 * low.shape[1], 2 * low.shape[2])
  return _idwt2_jaxwt(2 * low, bands, wavelet, size)


def mirror_signs(wavelet: str, channels: int) -> np.ndarray | None:
  """(3 C,) signs s such that the details of a left-right mirrored image are the mirrored
  details times s (band-major, as ``dwt_level`` concatenates them), or None for a wavelet
  whose bands do not mirror with the image. Only a two-tap wavelet (Haar) keeps each pair of
  pixels a pair under a mirror image, with its low-pass filter symmetric and its high-pass
  antisymmetric: the bands high-passed along the width change sign, the others do not."""
  lo, hi = _filters(wavelet)
  if lo.size != 2 or not (np.allclose(lo[::-1], lo) and np.allclose(hi[::-1], -hi)):
    return None
  return np.repeat(np.asarray([1.0, -1.0, -1.0], np.float32), channels)


def check_size(height: int, width: int, levels: int) -> None:
  """Raise a ValueError naming a workable size when (H, W) is not divisible by 2^levels."""
  m = 2 ** levels
  if height % m or width % m:
    down = (height // m * m, width // m * m)
    up = (-(-height // m) * m, -(-width // m) * m)
    raise ValueError(
        f"image size {height}x{width} is not divisible by 2**{levels}={m} as {levels} wavelet "
        f"levels need; crop to {down[0]}x{down[1]} or pad to {up[0]}x{up[1]}")


def analysis(images: jax.Array, levels: int, wavelet: str = "haar", mode: str = PERIODIZATION):
  """All levels: returns (lows, details), lists of length J, level 0 (finest) first.

  lows[j] is the normalised low-pass of level j, (B, H/2^(j+1), W/2^(j+1), C): the
  conditioning image of the level-j conditional denoiser; details[j] its detail bands.
  """
  validation.images(images, "images")
  validation.positive_int(levels, "levels")
  check_wavelet(wavelet, mode)
  if mode == PERIODIZATION:
    check_size(images.shape[1], images.shape[2], levels)
  lows, details = [], []
  x = images
  for _ in range(levels):
    x, d = dwt_level(x, wavelet, mode)
    lows.append(x)
    details.append(d)
  return lows, details


def decompose(images: jax.Array, levels: int, wavelet: str = "haar",
              mode: str = PERIODIZATION) -> Pyramid:
  """(B, H, W, C) images -> normalised ``Pyramid`` with ``levels`` detail levels.

  Args:
    images: (B, H, W, C) float images.
    levels: J >= 1 detail levels; with 'periodization' H and W must be multiples of 2^J.
    wavelet: an orthogonal PyWavelets wavelet ('haar', 'db2', 'sym4', ...).
    mode: 'periodization' (orthonormal, in this package) or a jaxwt boundary mode.

  Returns:
    ``Pyramid``: ``low`` (B, H/2^J, W/2^J, C), local averages in pixel units, and ``details``
    [(B, H/2, W/2, 3C), ..., (B, H/2^J, W/2^J, 3C)], finest first.

  Raises:
    ValueError: a size the transform cannot take (the message names the crop or pad that
      works), a wavelet that is not orthogonal, or an unknown mode.
  """
  lows, details = analysis(images, levels, wavelet, mode)
  sizes = tuple((x.shape[1], x.shape[2]) for x in [images] + lows[:-1])
  return Pyramid(low=lows[-1], details=tuple(details), wavelet=wavelet, mode=mode, sizes=sizes)


def reconstruct(pyramid: Pyramid, levels: int | None = None) -> jax.Array:
  """Inverse of ``decompose``.

  Args:
    pyramid: a ``Pyramid`` of J levels.
    levels: how many levels to invert (default J); fewer returns a coarser low-pass.

  Returns:
    (B, H, W, C) images (exactly ``decompose``'s input up to float32 rounding).
  """
  n = pyramid.levels if levels is None else levels
  x = pyramid.low
  for j in reversed(range(pyramid.levels - n, pyramid.levels)):
    size = pyramid.sizes[j] if pyramid.sizes else None
    x = idwt_level(x, pyramid.details[j], pyramid.wavelet, pyramid.mode, size)
  return x


def split_bands(details: jax.Array) -> Sequence[jax.Array]:
  """(..., 3C) band-major details -> (H, V, D), each (..., C)."""
  c = details.shape[-1] // 3
  return tuple(details[..., k * c:(k + 1) * c] for k in range(3))
