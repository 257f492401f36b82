"""Sample quality without a ground truth: the multi-scale sliced Wasserstein distance (local
patches) and a layout distance (whole coarse images).

Synthesis has no reference image to compare a sample with, only a reference *set*. ``swd``
compares the distributions of local patches of two image sets, level by level of a Laplacian
pyramid (Karras, Aila, Laine, Lehtinen, "Progressive growing of GANs", ICLR 2018, §5):

- the pyramid: 5x5 binomial low-pass and 2x decimation, down to ``min_size``; each level is the
  difference between a Gaussian level and its upsampled coarser one (the coarsest level is the
  Gaussian level itself);
- descriptors: ``patch x patch`` neighbourhoods (7x7, all channels) at random positions,
  ``patches`` per level, drawn evenly over each set's images;
- each descriptor dimension normalised by the *reference* set's mean and std at that level, so
  a contrast or noise-level difference is measured, not normalised away;
- the distance: the mean over ``directions`` random unit directions of the 1-D Wasserstein-1
  distance between the two sets' projections (sorted values, mean absolute difference).

Figures are conventionally shown x 1e3. ``swd`` returns each level's distance, their mean, and
a bootstrap confidence interval (images resampled with replacement in both sets). Everything is
a function of the inputs and ``seed``.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

_BINOMIAL = np.array([1.0, 4.0, 6.0, 4.0, 1.0]) / 16.0


def _blur(x: jax.Array) -> jax.Array:  # (N, H, W, C): separable 5-tap binomial, reflected edges
  x = jnp.pad(x, ((0, 0), (2, 2), (2, 2), (0, 0)), mode="reflect")
  h, w = x.shape[1] - 4, x.shape[2] - 4
  x = sum(float(c) * x[:, i:i + h] for i, c in enumerate(_BINOMIAL))
  return sum(float(c) * x[:, :, i:i + w] for i, c in enumerate(_BINOMIAL))


def _upsample(x: jax.Array, size: tuple[int, int]) -> jax.Array:
  """2x zero-insertion then the binomial filter x 4: the Gaussian pyramid's expand."""
  n, h, w, c = x.shape
  up = jnp.zeros((n, 2 * h, 2 * w, c), x.dtype).at[:, ::2, ::2].set(4.0 * x)
  return _blur(up)[:, :size[0], :size[1]]


def laplacian_pyramid(images: jax.Array, min_size: int = 16) -> list[jax.Array]:
  """Laplacian levels of (N, H, W, C) images, finest first, down to the last Gaussian level
  whose smaller side is >= ``min_size`` (that level itself is the last entry)."""
  g = jnp.asarray(images, jnp.float32)
  levels = []
  while min(g.shape[1:3]) // 2 >= min_size:
    coarse = _blur(g)[:, ::2, ::2]
    levels.append(g - _upsample(coarse, g.shape[1:3]))
    g = coarse
  levels.append(g)
  return levels


def _descriptors(level: np.ndarray, count: int, patch: int, rng: np.random.Generator
                 ) -> np.ndarray:
  """``count`` patches (count, patch * patch * C) at random positions, images taken in turn."""
  n, h, w, _ = level.shape
  if h < patch or w < patch:
    raise ValueError(f"a {h}x{w} pyramid level is smaller than the {patch}x{patch} patches: "
                     f"give images of at least {patch}x{patch} or a smaller patch")
  idx = np.arange(count) % n
  ys = rng.integers(0, h - patch + 1, count)
  xs = rng.integers(0, w - patch + 1, count)
  rows = ys[:, None] + np.arange(patch)[None]          # (count, patch)
  cols = xs[:, None] + np.arange(patch)[None]
  out = level[idx[:, None, None], rows[:, :, None], cols[:, None, :]]  # (count, p, p, C)
  return out.reshape(count, -1)


def _sliced_w1(a: np.ndarray, b: np.ndarray, directions: np.ndarray) -> float:
  """Mean over unit ``directions`` (D, K) of W1 between the projections of a and b (M, D).
  (NumPy: XLA's CPU sort is about 10x slower on these (M, K) columns.)"""
  pa = np.sort(a @ directions, axis=0)
  pb = np.sort(b @ directions, axis=0)
  return float(np.mean(np.abs(pa - pb)))


@dataclasses.dataclass(frozen=True)
class SWD:
  """A multi-scale SWD (x 1e3 when shown). levels: (h, w) of each pyramid level, finest first;
  per_level: the distance at each; mean: their mean; per_level_ci, mean_ci: bootstrap
  intervals (``confidence``, e.g. 95%), None without bootstrap."""
  levels: tuple[tuple[int, int], ...]
  per_level: tuple[float, ...]
  mean: float
  per_level_ci: tuple[tuple[float, float], ...] | None = None
  mean_ci: tuple[float, float] | None = None
  confidence: float = 0.95


def _check_sets(*sets: np.ndarray) -> list[np.ndarray]:
  sets = [np.asarray(x, np.float32) for x in sets]
  shapes = [x.shape for x in sets]
  if any(x.ndim != 4 for x in sets) or len({sh[1:] for sh in shapes}) != 1:
    raise ValueError(f"the image sets {shapes} must be (N, H, W, C) of one image shape (same "
                     "size and channels)")
  if min(len(x) for x in sets) < 2:
    raise ValueError(f"each set needs at least 2 images, got {[len(x) for x in sets]}")
  if not all(np.isfinite(x).all() for x in sets):
    raise ValueError("the images hold NaN or inf")
  return sets


def _check_paired(images, baseline, reference) -> list[np.ndarray]:
  """``_check_sets``, and as many ``images`` as ``baseline`` (a paired comparison)."""
  images, baseline, reference = _check_sets(images, baseline, reference)
  if len(images) != len(baseline):
    raise ValueError(f"images ({len(images)}) and baseline ({len(baseline)}) must hold as many "
                     "images (paired by index)")
  return images, baseline, reference


class _Pyramids:
  """The sets' Laplacian pyramids and one set of directions per level, drawn from ``rng``."""

  def __init__(self, sets, rng, patch, patches, directions, min_size):
    self.pyr = [[np.asarray(l) for l in laplacian_pyramid(x, min_size)] for x in sets]
    self.patch, self.patches = patch, patches
    dim = patch * patch * sets[0].shape[3]
    self.dirs = []
    for _ in self.pyr[0]:
      d = rng.standard_normal((dim, directions)).astype(np.float32)
      self.dirs.append(d / np.linalg.norm(d, axis=0, keepdims=True))

  @property
  def levels(self) -> tuple[tuple[int, int], ...]:
    return tuple(tuple(l.shape[1:3]) for l in self.pyr[0])

  def distances(self, orders, seed: int) -> np.ndarray:
    """(sets - 1, levels): SWD of each set (its images ``orders[i]``) to the last set's."""
    draw = np.random.default_rng(seed)
    out = []
    for k, d in enumerate(self.dirs):
      desc = [_descriptors(p[k][o], self.patches, self.patch, draw)
              for p, o in zip(self.pyr, orders)]
      mu, sd = desc[-1].mean(0), desc[-1].std(0) + 1e-8
      ref = (desc[-1] - mu) / sd
      out.append([_sliced_w1((x - mu) / sd, ref, d) for x in desc[:-1]])
    return np.asarray(out).T


def _interval(draws: np.ndarray, confidence: float) -> tuple[float, float]:
  q = [(1 - confidence) / 2 * 100, (1 + confidence) / 2 * 100]
  return tuple(float(v) for v in np.percentile(draws, q))


def swd(images: jax.Array, reference: jax.Array, *, seed: int = 0, patch: int = 7,
        patches: int = 16384, directions: int = 512, min_size: int = 16, bootstrap: int = 20,
        confidence: float = 0.95) -> SWD:
  """The multi-scale sliced Wasserstein distance between two image sets.

  Args:
    images: (N, H, W, C) the set to judge (samples), values in [0, 1].
    reference: (M, H, W, C) the reference set (real images, same preprocessing).
    seed: patch positions, directions and bootstrap draws (the same seed, the same figure).
    patch: side of the square descriptors (7 as in Karras et al.).
    patches: descriptors per set and level, spread evenly over each set's images.
    directions: random projection directions per level.
    min_size: the pyramid stops at the last level whose smaller side is >= it.
    bootstrap: resamples for the confidence interval (0: none).
    confidence: the interval's coverage.

  Returns:
    An ``SWD`` (the same descriptors, normalised by the reference's statistics, for both sets).

  Raises:
    ValueError: sets of different image shapes, fewer than 2 images, or levels smaller than a
      patch.
  """
  images, reference = _check_sets(images, reference)
  rng = np.random.default_rng(seed)
  pyr = _Pyramids((images, reference), rng, patch, patches, directions, min_size)
  per_level = pyr.distances((np.arange(len(images)), np.arange(len(reference))),
                            int(rng.integers(2 ** 31)))[0]
  result = SWD(pyr.levels, tuple(float(v) for v in per_level), float(np.mean(per_level)),
               confidence=confidence)
  if not bootstrap:
    return result
  draws = np.asarray([pyr.distances((rng.integers(0, len(images), len(images)),
                                     rng.integers(0, len(reference), len(reference))),
                                    int(rng.integers(2 ** 31)))[0] for _ in range(bootstrap)])
  return dataclasses.replace(
      result, per_level_ci=tuple(_interval(draws[:, k], confidence)
                                 for k in range(draws.shape[1])),
      mean_ci=_interval(draws.mean(1), confidence))


def swd_difference(images: jax.Array, baseline: jax.Array, reference: jax.Array, *,
                   seed: int = 0, patch: int = 7, patches: int = 16384, directions: int = 512,
                   min_size: int = 16, bootstrap: int = 50, confidence: float = 0.95
                   ) -> tuple[float, tuple[float, float]]:
  """SWD(images) - SWD(baseline), both against ``reference``, and its paired bootstrap interval:
  every draw uses the same directions, patch positions and resampled reference for both, and
  the same resampled indices of ``images`` and ``baseline`` (sample i of each drawn with key
  i), so the interval measures the difference, not each set's own spread.

  Args: as ``swd``; ``images`` and ``baseline`` hold the same number of images.
  Returns: (difference of the level means, its interval).
  Raises: ValueError as ``swd``, or sets of different sizes.
  """
  images, baseline, reference = _check_paired(images, baseline, reference)
  rng = np.random.default_rng(seed)
  pyr = _Pyramids((images, baseline, reference), rng, patch, patches, directions, min_size)
  n, m = len(images), len(reference)
  diff = lambda d: float(d[0].mean() - d[1].mean())
  point = diff(pyr.distances((np.arange(n), np.arange(n), np.arange(m)),
                             int(rng.integers(2 ** 31))))
  draws = []
  for _ in range(bootstrap):
    idx = rng.integers(0, n, n)
    draws.append(diff(pyr.distances((idx, idx, rng.integers(0, m, m)),
                                    int(rng.integers(2 ** 31)))))
  return point, _interval(np.asarray(draws), confidence)


# --- Global layout: what a set's coarse images look like as wholes. ---

@dataclasses.dataclass(frozen=True)
class Layout:
  """A layout distance (x 1e3 when shown). distance: W1 between the residual fractions of the
  images and of the held-out reference half; ci: its bootstrap interval (None without
  bootstrap); residual, reference_residual: the two sets' mean residual fractions (above the
  reference's: layouts the reference never shows; below: too typical)."""
  distance: float
  residual: float
  reference_residual: float
  ci: tuple[float, float] | None = None
  confidence: float = 0.95


def layout_reference_size(components: int) -> int:
  """The fewest reference images ``layout`` takes.

  Args:
    components: the principal images it fits (on half the reference set).

  Returns:
    2 (components + 1): half fit the principal images, half are held out.
  """
  return 2 * (components + 1)


class _Eigenimages:
  """The first ``components`` principal images of half the reference set (drawn with ``rng``),
  of images resized to ``size`` x ``size``; the other half is held out."""

  def __init__(self, reference: np.ndarray, size: int, components: int,
               rng: np.random.Generator):
    if len(reference) < layout_reference_size(components):
      raise ValueError(f"layout: {len(reference)} reference images are too few for "
                       f"components={components}: give at least "
                       f"{layout_reference_size(components)} (half "
                       "fit the principal images, half are held out) or fewer components")
    self.size = size
    perm = rng.permutation(len(reference))
    half = len(reference) // 2
    fit = self._coarse(reference[perm[:half]])
    self.mean = fit.mean(0)
    self.basis = np.linalg.svd(fit - self.mean, full_matrices=False)[2][:components]  # (K, D)
    self.held = self.residuals(reference[perm[half:]])

  def _coarse(self, x: np.ndarray) -> np.ndarray:  # (N, H, W, C) -> (N, size * size * C)
    n, _, _, c = x.shape
    small = jax.image.resize(jnp.asarray(x), (n, self.size, self.size, c), "linear",
                             antialias=True)
    return np.asarray(small, np.float64).reshape(n, -1)

  def residuals(self, x: np.ndarray) -> np.ndarray:
    """(N,) the fraction of each image's mean-subtracted coarse energy outside the basis."""
    y = self._coarse(x) - self.mean
    rest = y - (y @ self.basis.T) @ self.basis
    return (rest ** 2).sum(1) / np.maximum((y ** 2).sum(1), 1e-12)


def _w1(a: np.ndarray, b: np.ndarray) -> float:
  """Exact 1-D Wasserstein-1 distance between two empirical distributions: the integral of
  |F_a - F_b| over the values."""
  t = np.sort(np.concatenate([a, b]))
  fa = np.searchsorted(np.sort(a), t[:-1], side="right") / len(a)
  fb = np.searchsorted(np.sort(b), t[:-1], side="right") / len(b)
  return float(np.sum(np.abs(fa - fb) * np.diff(t)))


def layout(images: jax.Array, reference: jax.Array, *, size: int = 20, components: int = 16,
           seed: int = 0, bootstrap: int = 200, confidence: float = 0.95) -> Layout:
  """How far a set's global layouts are from the reference's (a complement to ``swd``).

  SWD compares local patches and can miss what is wrong with a sample as a whole (a face whose
  parts are in the wrong places has plausible patches). This measures the whole coarse image:
  each image is resized to ``size`` x ``size`` and its energy outside the reference set's first
  ``components`` principal images ("eigenfaces", fitted on one half of the reference set) is
  taken as a fraction of its energy; the distance is the Wasserstein-1 distance between that
  fraction's distribution over ``images`` and over the reference's other, held-out half. It
  sees fine detail only through the coarse image (on smooth images little): use it with
  ``swd``.

  Args:
    images: (N, H, W, C) the set to judge, values in [0, 1].
    reference: (M, H, W, C) real images of the same preprocessing; M >= 2 (components + 1).
    size: the side of the coarse images.
    components: principal images that span the reference's layouts.
    seed: the reference's split and the bootstrap draws.
    bootstrap: resamples (images and held-out half) for the interval (0: none).
    confidence: the interval's coverage.

  Returns:
    A ``Layout``.

  Raises:
    ValueError: sets of different image shapes, fewer than 2 images, too few reference images.
  """
  images, reference = _check_sets(images, reference)
  rng = np.random.default_rng(seed)
  eig = _Eigenimages(reference, size, components, rng)
  r = eig.residuals(images)
  out = Layout(_w1(r, eig.held), float(r.mean()), float(eig.held.mean()),
               confidence=confidence)
  if not bootstrap:
    return out
  draws = [_w1(r[rng.integers(0, len(r), len(r))],
               eig.held[rng.integers(0, len(eig.held), len(eig.held))]) for _ in range(bootstrap)]
  return dataclasses.replace(out, ci=_interval(np.asarray(draws), confidence))


def layout_difference(images: jax.Array, baseline: jax.Array, reference: jax.Array, *,
                      size: int = 20, components: int = 16, seed: int = 0,
                      bootstrap: int = 200, confidence: float = 0.95
                      ) -> tuple[float, tuple[float, float]]:
  """layout(images) - layout(baseline), both against ``reference``, with a paired bootstrap
  interval (the same resampled indices of both sets and of the held-out half in every draw).

  Args: as ``layout``; ``images`` and ``baseline`` hold the same number of images.
  Returns: (the difference of the distances, its interval).
  Raises: ValueError as ``layout``, or sets of different sizes.
  """
  images, baseline, reference = _check_paired(images, baseline, reference)
  rng = np.random.default_rng(seed)
  eig = _Eigenimages(reference, size, components, rng)
  ra, rb, held = eig.residuals(images), eig.residuals(baseline), eig.held
  point = _w1(ra, held) - _w1(rb, held)
  draws = []
  for _ in range(bootstrap):
    i, j = rng.integers(0, len(ra), len(ra)), rng.integers(0, len(held), len(held))
    draws.append(_w1(ra[i], held[j]) - _w1(rb[i], held[j]))
  return point, _interval(np.asarray(draws), confidence)
