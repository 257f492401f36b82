"""Dead-leaves images: opaque discs of power-law radii, each hiding what lies beneath.

Matheron's dead-leaves model (Lee, Mumford & Huang, IJCV 2001) is the classic procedural model
of natural images: occlusion makes sharp edges, and with radii distributed as r^-3 the images
are scale invariant (power spectrum ~ 1/f^2, like photographs') between the smallest and the
largest disc. Its local structure is learnable by a small net in minutes while a linear filter
cannot preserve its edges, and its samples are recognisable, so it is the quickstart's data:
a deterministic stand-in for photographs, as many images as wanted, that needs no download
(docs/experiments/training_log.md, "The quickstart").

``render`` draws one image from a ``numpy.random.Generator``: discs back to front until the
canvas is covered (a pixel stays uncovered with probability e^-COVERAGE), on a grid
``supersample`` times finer, averaged down (anti-aliased edges). Radii are fractions of a
length ``unit`` in pixels (the side of the images a model is trained on), so one ensemble
serves every resolution, and a canvas larger than ``unit`` holds the same statistics as its
crops. Grey levels (or RGB colours) are uniform in [0, 1].
"""
from __future__ import annotations

import dataclasses

import numpy as np
from PIL import Image, ImageDraw

COVERAGE = 8.0  # expected discs over a point: a pixel is uncovered with probability e^-8


@dataclasses.dataclass(frozen=True)
class DeadLeaves:
  """The ensemble. Radii as fractions of the unit length: r in [r_min, r_max], density
  ~ r^-exponent (3: scale invariant)."""
  r_min: float = 1 / 16
  r_max: float = 3 / 4
  exponent: float = 3.0
  supersample: int = 2

  def __post_init__(self):
    if not 0 < self.r_min < self.r_max:
      raise ValueError(f"need 0 < r_min < r_max, got r_min={self.r_min}, r_max={self.r_max}")
    if self.exponent <= 1 or self.supersample < 1:
      raise ValueError(f"need exponent > 1 and supersample >= 1, got {self.exponent}, "
                       f"{self.supersample}")

  def radii(self, u: np.ndarray) -> np.ndarray:
    """Uniform draws u in [0, 1) -> radii (fractions of the unit) by the inverse CDF."""
    a = 1.0 - self.exponent
    lo, hi = self.r_min ** a, self.r_max ** a
    return (lo + u * (hi - lo)) ** (1.0 / a)

  def mean_area(self) -> float:
    """E[pi r^2] of one disc (in units squared)."""
    a, k = self.r_min, self.exponent
    norm = (self.r_max ** (1 - k) - a ** (1 - k)) / (1 - k)
    second = (np.log(self.r_max / a) if k == 3 else
              (self.r_max ** (3 - k) - a ** (3 - k)) / (3 - k))
    return float(np.pi * second / norm)

  def num_discs(self, height: float, width: float) -> int:
    """Discs whose centres fall on a canvas of height x width units grown by r_max on every
    side: COVERAGE of them over each point on average."""
    return int(np.ceil(COVERAGE * (height + 2 * self.r_max) * (width + 2 * self.r_max)
                       / self.mean_area()))


def render(rng: np.random.Generator, height: int, width: int, unit: float, channels: int = 1,
           model: DeadLeaves = DeadLeaves()) -> np.ndarray:
  """One (height, width, channels) float32 image in [0, 1], a pure function of ``rng``'s
  state; radii are ``model``'s fractions of ``unit`` pixels."""
  k = model.supersample
  n = model.num_discs(height / unit, width / unit)
  r = model.radii(rng.random(n)) * unit * k
  pad = model.r_max * unit
  cy = rng.uniform(-pad, height + pad, n) * k
  cx = rng.uniform(-pad, width + pad, n) * k
  colours = rng.random((n + 1, channels)).astype(np.float32)  # row n: the background
  index = Image.new("I", (width * k, height * k), n)
  draw = ImageDraw.Draw(index)
  for i in range(n - 1, -1, -1):  # back to front: disc 0 is on top
    draw.ellipse((cx[i] - r[i], cy[i] - r[i], cx[i] + r[i], cy[i] + r[i]), fill=i)
  fine = colours[np.asarray(index)]  # (height k, width k, channels)
  return fine.reshape(height, k, width, k, channels).mean((1, 3))
