"""Image sources: deterministic, stateless batches ``source.batch(step)`` in [0, 1].

Every source is a pure function of (seed, step, process index): the batch at step s never
depends on what was read before, so a resumed run sees exactly the batches an uninterrupted
run would. Each host reads only its share of the global batch.

Sources (``make_source(spec)``):
- ``"embedded"``: random crops and flips of the natural photographs bundled with PyWavelets
  (``camera``, ``ascent``, ``aero``), at scales 1 and 1/2; no download. The bottom quarter of
  each photograph is held out for the ``eval`` split.
- ``"folder:/path"``: every PNG/JPEG below a folder (decoded once into memory).
- ``"tfds:name[:split]"``: a tensorflow-datasets source read by random access
  (``tfds.data_source``, no TensorFlow needed).
Preprocessing (folder and tfds): grey = mean of RGB or colour; ``crop="celeba"`` is the
paper's crop ([29:-29, 9:-9] of 218x178, [14:-15, 4:-5] of the 109x89 half-size set),
``"center"`` a centre square; then a bicubic resize to ``image_size``.
"""
from __future__ import annotations

import dataclasses
import glob
import os
from typing import Callable, Sequence

import numpy as np
from PIL import Image

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
_SPLIT_IDS = {"train": 0, "eval": 1, "all": 2}
_CELEBA_CROPS = {(218, 178): (29, 29, 9, 9), (109, 89): (14, 15, 4, 5)}


@dataclasses.dataclass(frozen=True)
class DataConfig:
  source: str = "embedded"
  image_size: int = 64
  channels: int = 1  # 1 = grey (mean of RGB), 3 = colour
  crop: str = "none"  # "none" | "celeba" | "center"
  eval_fraction: float = 0.1  # held-out share of a folder (last files by name)
  flips: bool = True
  max_images: int = 0  # 0 = all


def to_channels(img: np.ndarray, channels: int) -> np.ndarray:
  """uint8 (H, W[, 3|4]) -> float32 (H, W, channels); grey is the mean of R, G, B."""
  x = img.astype(np.float32)
  if x.ndim == 2:
    x = x[..., None]
  x = x[..., :3]
  if channels == 1:
    return x.mean(-1, keepdims=True)
  if channels == 3:
    return np.repeat(x, 3, -1) if x.shape[-1] == 1 else x
  raise ValueError(f"channels must be 1 (grey) or 3 (colour), got {channels}")


def crop_image(x: np.ndarray, crop: str) -> np.ndarray:
  h, w = x.shape[:2]
  if crop == "none":
    return x
  if crop == "center":
    s = min(h, w)
    top, left = (h - s) // 2, (w - s) // 2
    return x[top:top + s, left:left + s]
  if crop == "celeba":
    if (h, w) not in _CELEBA_CROPS:
      raise ValueError(f"crop='celeba' needs aligned CelebA images of 218x178 or 109x89, got "
                       f"{h}x{w}; use crop='center' for other images")
    t, b, l, r = _CELEBA_CROPS[(h, w)]
    return x[t:h - b, l:w - r]
  raise ValueError(f"crop must be 'none', 'celeba' or 'center', got {crop!r}")


def preprocess(img: np.ndarray, image_size: int, channels: int, crop: str) -> np.ndarray:
  """uint8 image -> float32 (S, S, channels) in [0, 1]: channels, crop, square, resize."""
  x = crop_image(to_channels(img, channels), crop)
  h, w = x.shape[:2]
  if h != w:
    x = crop_image(x, "center")
  if x.shape[0] != image_size:
    planes = [np.asarray(Image.fromarray(x[..., c]).resize((image_size, image_size),
                                                          Image.BICUBIC)) for c in range(x.shape[-1])]
    x = np.stack(planes, -1)
  return np.clip(x / 255.0, 0.0, 1.0).astype(np.float32)


def _flip(rng: np.random.Generator, batch: np.ndarray) -> np.ndarray:
  mask = rng.random(batch.shape[0]) < 0.5
  batch[mask] = batch[mask, :, ::-1]
  return batch


class Source:
  """Base: ``batch(step)`` -> this host's (b, S, S, C) float32 share of the global batch."""

  def __init__(self, cfg: DataConfig, batch_size: int, seed: int, split: str,
               process_index: int = 0, process_count: int = 1):
    if split not in _SPLIT_IDS:
      raise ValueError(f"split must be one of {sorted(_SPLIT_IDS)}, got {split!r}")
    if batch_size % process_count:
      raise ValueError(f"batch size {batch_size} is not divisible by the {process_count} hosts")
    self.cfg, self.batch_size, self.seed, self.split = cfg, batch_size, seed, split
    self.process_index, self.process_count = process_index, process_count

  @property
  def host_slice(self) -> slice:
    n = self.batch_size // self.process_count
    return slice(self.process_index * n, (self.process_index + 1) * n)

  def _rng(self, *keys: int) -> np.random.Generator:
    return np.random.default_rng([self.seed, _SPLIT_IDS[self.split], *keys])

  def batch(self, step: int) -> np.ndarray:
    raise NotImplementedError


class EmbeddedSource(Source):
  """Random crops and flips of PyWavelets' bundled photographs (grey)."""
  NAMES = ("camera", "ascent", "aero")

  def __init__(self, cfg: DataConfig, *args, **kwargs):
    super().__init__(cfg, *args, **kwargs)
    if cfg.channels != 1:
      raise ValueError("the embedded photographs are grey: use channels=1, or a folder/tfds "
                       "source for colour")
    import pywt.data  # pylint: disable=g-import-not-at-top
    self.images = []
    for name in self.NAMES:
      img = getattr(pywt.data, name)().astype(np.float32) / 255.0  # (512, 512)
      cut = img.shape[0] * 3 // 4
      img = {"train": img[:cut], "eval": img[cut:], "all": img}[self.split]
      half = img[: img.shape[0] // 2 * 2].reshape(img.shape[0] // 2, 2, -1, 2).mean((1, 3))
      for im in (img, half):
        if min(im.shape) >= cfg.image_size:
          self.images.append(im[..., None])
    if not self.images:
      raise ValueError(f"image_size {cfg.image_size} is too large for the embedded data (max 128)")
    self.num_examples = 10_000  # nominal epoch length, for epoch-based schedules

  def batch(self, step: int) -> np.ndarray:
    s = self.cfg.image_size
    rng = self._rng(step)
    out = np.empty((self.batch_size, s, s, 1), np.float32)
    idx = rng.integers(len(self.images), size=self.batch_size)
    for b, i in enumerate(idx):
      im = self.images[i]
      top = rng.integers(im.shape[0] - s + 1)
      left = rng.integers(im.shape[1] - s + 1)
      out[b] = im[top:top + s, left:left + s]
    if self.cfg.flips:
      out = _flip(rng, out)
    return out[self.host_slice]


class ArraySource(Source):
  """Epoch-wise shuffled batches of preprocessed images fetched by index."""

  def __init__(self, cfg: DataConfig, fetch: Callable[[np.ndarray], np.ndarray], num: int,
               *args, **kwargs):
    super().__init__(cfg, *args, **kwargs)
    if num == 0:
      raise ValueError(f"no images in split {self.split!r} of {cfg.source!r}")
    self.fetch, self.num_examples = fetch, num

  def indices(self, step: int) -> np.ndarray:
    """Global example indices of step ``step``: a fresh permutation every epoch."""
    start = step * self.batch_size
    out = []
    while len(out) < self.batch_size:
      epoch, pos = divmod(start + len(out), self.num_examples)
      perm = self._rng(epoch).permutation(self.num_examples)
      out.extend(perm[pos:pos + self.batch_size - len(out)])
    return np.asarray(out)

  def batch(self, step: int) -> np.ndarray:
    idx = self.indices(step)[self.host_slice]
    out = self.fetch(idx)
    if self.cfg.flips and self.split == "train":
      out = _flip(self._rng(step, 1), out)
    return out


def list_images(folder: str) -> list[str]:
  files = sorted(f for f in glob.glob(os.path.join(folder, "**", "*"), recursive=True)
                 if f.lower().endswith(IMAGE_EXTENSIONS))
  if not files:
    raise ValueError(f"no PNG/JPEG images found under {folder!r}")
  return files


def load_folder(folder: str, cfg: DataConfig) -> np.ndarray:
  """All images of a folder, preprocessed: (N, S, S, C) float32."""
  files = list_images(folder)
  if cfg.max_images:
    files = files[: cfg.max_images]
  return np.stack([preprocess(np.asarray(Image.open(f)), cfg.image_size, cfg.channels, cfg.crop)
                   for f in files])


def _split_range(n: int, split: str, eval_fraction: float) -> range:
  n_eval = max(1, int(round(n * eval_fraction))) if eval_fraction > 0 else 0
  if split == "train":
    return range(0, n - n_eval)
  if split == "eval":
    return range(n - n_eval, n) if n_eval else range(0, n)
  if split == "all":
    return range(0, n)
  raise ValueError(f"split must be 'train', 'eval' or 'all', got {split!r}")


def make_source(cfg: DataConfig, batch_size: int, seed: int = 0, split: str = "train",
                process_index: int = 0, process_count: int = 1) -> Source:
  """The source named by ``cfg.source`` ('embedded', 'folder:PATH' or 'tfds:NAME[:SPLIT]')."""
  args = (batch_size, seed, split, process_index, process_count)
  if cfg.source == "embedded":
    return EmbeddedSource(cfg, *args)
  if cfg.source.startswith("folder:"):
    images = load_folder(cfg.source[len("folder:"):], cfg)
    rows = np.asarray(_split_range(len(images), split, cfg.eval_fraction))
    images = images[rows]
    return ArraySource(cfg, lambda idx: images[idx].copy(), len(images), *args)
  if cfg.source.startswith("tfds:"):
    return _tfds_source(cfg, split, args)
  raise ValueError(f"unknown data source {cfg.source!r}: use 'embedded', 'folder:/path/to/images'"
                   " or 'tfds:name[:split]'")


def _tfds_source(cfg: DataConfig, split: str, args: Sequence) -> Source:
  try:
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError("tfds sources need tensorflow-datasets: pip install 'wcdm_jax[tfds]'") from e
  parts = cfg.source.split(":")
  name = parts[1]
  tfds_split = parts[2] if len(parts) > 2 else {"train": "train", "eval": "validation",
                                               "all": "train"}[split]
  ds = tfds.data_source(name, split=tfds_split)
  n = len(ds) if not cfg.max_images else min(len(ds), cfg.max_images)

  def fetch(idx: np.ndarray) -> np.ndarray:
    return np.stack([preprocess(np.asarray(ds[int(i)]["image"]), cfg.image_size, cfg.channels,
                                cfg.crop) for i in idx])

  return ArraySource(cfg, fetch, n, *args)
