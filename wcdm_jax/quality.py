"""Sample quality without a ground truth: the multi-scale sliced Wasserstein distance.

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
    raise ValueError(f"a {h}x{w} pyramid level is smaller than the {patch}x{patch} patches; "
                     "lower min_size's effect by giving larger images or a smaller patch")
  idx = np.arange(count) % n
  ys = rng.integers(0, h - patch + 1, count)
  xs = rng.integers(0, w - patch + 1, count)
  rows = ys[:, None] + np.arange(patch)[None]          # (count, patch)
  cols = xs[:, None] + np.arange(patch)[None]
  out = level[idx[:, None, None], rows[:, :, None], cols[:, None, :]]  # (count, p, p, C)
  return out.reshape(count, -1)


@jax.jit
def _sliced_w1(a: jax.Array, b: jax.Array, directions: jax.Array) -> jax.Array:
  """Mean over unit ``directions`` (D, K) of W1 between the projections of a and b (M, D)."""
  pa = jnp.sort(a @ directions, axis=0)
  pb = jnp.sort(b @ directions, axis=0)
  return jnp.mean(jnp.abs(pa - pb))


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
  images, reference = np.asarray(images, np.float32), np.asarray(reference, np.float32)
  if images.ndim != 4 or reference.ndim != 4 or images.shape[1:] != reference.shape[1:]:
    raise ValueError(f"images {images.shape} and reference {reference.shape} must be (N, H, W, C)"
                     " sets of the same image shape")
  if len(images) < 2 or len(reference) < 2:
    raise ValueError("each set needs at least 2 images")
  if not (np.isfinite(images).all() and np.isfinite(reference).all()):
    raise ValueError("the images hold NaN or inf")
  rng = np.random.default_rng(seed)
  pyr_a = [np.asarray(l) for l in laplacian_pyramid(images, min_size)]
  pyr_b = [np.asarray(l) for l in laplacian_pyramid(reference, min_size)]
  dim = patch * patch * images.shape[3]
  dirs = []
  for _ in pyr_a:
    d = rng.standard_normal((dim, directions)).astype(np.float32)
    dirs.append(jnp.asarray(d / np.linalg.norm(d, axis=0, keepdims=True)))

  def distances(order_a: np.ndarray, order_b: np.ndarray, draw: np.random.Generator):
    out = []
    for la, lb, d in zip(pyr_a, pyr_b, dirs):
      da = _descriptors(la[order_a], patches, patch, draw)
      db = _descriptors(lb[order_b], patches, patch, draw)
      mu, sd = db.mean(0), db.std(0) + 1e-8
      out.append(float(_sliced_w1(jnp.asarray((da - mu) / sd), jnp.asarray((db - mu) / sd), d)))
    return out

  base_seed = int(rng.integers(2 ** 31))
  per_level = distances(np.arange(len(images)), np.arange(len(reference)),
                        np.random.default_rng(base_seed))
  levels = tuple(tuple(l.shape[1:3]) for l in pyr_a)
  result = SWD(levels, tuple(per_level), float(np.mean(per_level)), confidence=confidence)
  if not bootstrap:
    return result
  draws = []
  for _ in range(bootstrap):
    ia = rng.integers(0, len(images), len(images))
    ib = rng.integers(0, len(reference), len(reference))
    draws.append(distances(ia, ib, np.random.default_rng(int(rng.integers(2 ** 31)))))
  draws = np.asarray(draws)                                   # (bootstrap, levels)
  q = [(1 - confidence) / 2 * 100, (1 + confidence) / 2 * 100]
  level_ci = tuple(tuple(float(v) for v in np.percentile(draws[:, k], q))
                   for k in range(draws.shape[1]))
  mean_ci = tuple(float(v) for v in np.percentile(draws.mean(1), q))
  return dataclasses.replace(result, per_level_ci=level_ci, mean_ci=mean_ci)
