"""Image sources: deterministic, stateless batches ``source.batch(step)`` in [0, 1].

Every source is a pure function of (seed, step, process index): the batch at step s never
depends on what was read before, so a resumed run sees exactly the batches an uninterrupted
run would. Each host reads only its share of the global batch.

Sources (``make_source(spec)``):
- ``"embedded"``: random crops and flips of the natural photographs bundled with PyWavelets
  (``camera``, ``ascent``, ``aero``), at scales 1 and 1/2; no download. The bottom quarter of
  each photograph is held out for the ``eval`` split.
- ``"deadleaves"``: random crops and flips of dead-leaves canvases (``wcdm_jax.dead_leaves``),
  rendered once when the source is made: a fixed data set (the same canvases for every run
  and host), grey or colour, its ``eval`` split other canvases; no download.
- ``"folder:/path"``: every PNG/JPEG below a folder, decoded on demand (nothing of the dataset
  is held in memory; ``wcdm_jax.pipeline`` decodes in parallel workers ahead of the step).
- ``"tfds:name[:split]"``: a tensorflow-datasets source read by random access
  (``tfds.data_source``, no TensorFlow needed).
Decoding (``read_image``): EXIF orientation applied; palette, CMYK, YCbCr and other PIL
modes converted to RGB; 16-bit images scaled by 65535 (not clipped at 255); alpha dropped.
A folder's unreadable files are skipped with one warning naming them, unless more than
``max_bad_fraction`` of the files are bad (then an error): files whose header cannot be read
are dropped when the source is made; a file that fails to decode later (e.g. truncated) is
replaced, deterministically, by the next readable file of the folder.
Epoch order: a fresh permutation per epoch (grain's random-access shuffle); the global batch
of step s is positions [s B, (s + 1) B) of that order and host h reads its rows of it.
Preprocessing (folder and tfds): grey = mean of RGB or colour; ``crop="celeba"`` is the
paper's crop ([29:-29, 9:-9] of 218x178, [14:-15, 4:-5] of the 109x89 half-size set),
``"center"`` a centre square; then a bicubic resize to ``image_size``.
"""
from __future__ import annotations

import dataclasses
import glob
import logging
import os
from typing import Callable, Sequence

import grain
import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from wcdm_jax import dead_leaves
from wcdm_jax.settings import setting

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
_SPLIT_IDS = {"train": 0, "eval": 1, "all": 2}
CROP_SOURCES = ("embedded", "deadleaves")  # in-memory sources whose batches are random crops
_CELEBA_CROPS = {(218, 178): (29, 29, 9, 9), (109, 89): (14, 15, 4, 5)}
CROPS = ("none", "celeba", "center")


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """Where training images come from and how they are prepared."""
  source: str = setting("embedded", "'embedded' (PyWavelets' photographs), 'deadleaves' "
                        "(dead-leaves images, rendered), 'folder:/path' or 'tfds:name[:split]'.",
                        flag="data")
  image_size: int = setting(64, "Training image size (square).")
  channels: int = 1  # 1 = grey (mean of RGB), 3 = colour (the CLIs' --color)
  crop: str = setting("none", "Crop before resizing.", choices=CROPS)
  eval_fraction: float = setting(0.1, "Held-out share of a folder for evaluation (its last "
                                 "files by name).")
  flips: bool = setting(True, "Random horizontal flips.")
  max_images: int = setting(0, "Use at most this many images (0 = all).")
  max_bad_fraction: float = setting(0.01, "Share of a folder's files that may be unreadable "
                                    "(skipped with a warning naming them); more is an error.",
                                    resumable=True)

  def __post_init__(self):
    if self.channels not in (1, 3):
      raise ValueError(f"channels must be 1 (grey) or 3 (colour), got {self.channels}")
    if not 0 <= self.eval_fraction < 1:
      raise ValueError(f"eval_fraction must be in [0, 1), got {self.eval_fraction}")
    if self.image_size < 1 or self.max_images < 0:
      raise ValueError(f"image_size must be >= 1 and max_images >= 0, got {self.image_size}, "
                       f"{self.max_images}")
    if self.crop not in CROPS:
      raise ValueError(f"crop must be one of {CROPS}, got {self.crop!r}")
    if not 0 <= self.max_bad_fraction <= 1:
      raise ValueError(f"max_bad_fraction must be in [0, 1], got {self.max_bad_fraction}")


# What PIL raises for a file that is not a (complete) image.
_DECODE_ERRORS = (OSError, ValueError, SyntaxError, UnidentifiedImageError,
                  Image.DecompressionBombError, EOFError)
_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def image_to_array(img: Image.Image) -> np.ndarray:
  """A PIL image -> float32 (H, W, 1 | 3) in [0, 1], whatever its mode.

  EXIF orientation is applied; 16-bit and 32-bit integer grey images are scaled by 65535,
  float ('F') images taken as they are; palette, CMYK, YCbCr, LAB, HSV, bilevel become RGB or
  grey; alpha is dropped (the colour values are kept).
  """
  img = ImageOps.exif_transpose(img)
  mode = img.mode
  if mode in _SIXTEEN_BIT:
    return (np.asarray(img).astype(np.float32) / 65535.0)[..., None]
  if mode == "F":
    return np.asarray(img, np.float32)[..., None]
  if mode in ("1", "L", "LA", "La"):
    return (np.asarray(img.convert("L"), np.float32) / 255.0)[..., None]
  if mode in ("P", "PA"):
    img = img.convert("RGBA")
  return np.asarray(img.convert("RGB"), np.float32) / 255.0


def _cannot_decode(path: str, e: BaseException) -> ValueError:
  return ValueError(f"{path}: cannot decode it as an image ({type(e).__name__}: {e})")


def read_image(path: str) -> np.ndarray:
  """Decode one image file -> float32 (H, W, 1 | 3) in [0, 1]; errors name the file."""
  try:
    with Image.open(path) as img:
      img.load()
      return image_to_array(img)
  except _DECODE_ERRORS as e:
    raise _cannot_decode(path, e) from e


def load_preprocessed(path: str, image_size: int, channels: int, crop: str) -> np.ndarray:
  """``preprocess(read_image(path), ...)``, with the same values, but cropped before the
  float conversion for 8-bit RGB / grey files (most of a dataset): about 2x faster."""
  try:
    with Image.open(path) as img:
      if img.mode not in ("RGB", "L") or img.getexif().get(0x0112, 1) != 1:
        img.load()
        return preprocess(image_to_array(img), image_size, channels, crop)
      img.load()
      x = np.asarray(img)
  except _DECODE_ERRORS as e:
    raise _cannot_decode(path, e) from e
  x = crop_image(x[..., None] if x.ndim == 2 else x, crop)
  if x.shape[0] != x.shape[1]:
    x = crop_image(x, "center")
  return preprocess(x, image_size, channels, "none")


def to_unit(img: np.ndarray) -> np.ndarray:
  """Any image array -> float32 in [0, 1]: uint8 / 255, uint16 / 65535, floats as they are."""
  img = np.asarray(img)
  if img.dtype == np.uint8:
    return img.astype(np.float32) / 255.0
  if img.dtype == np.uint16:
    return img.astype(np.float32) / 65535.0
  if np.issubdtype(img.dtype, np.floating):
    return img.astype(np.float32)
  raise ValueError(f"unsupported image dtype {img.dtype}: use uint8, uint16 or float in [0, 1]")


def to_channels(img: np.ndarray, channels: int) -> np.ndarray:
  """(H, W[, 1|3|4]) image -> float32 (H, W, channels) in [0, 1]; grey is the mean of R, G, B."""
  x = to_unit(img)
  if x.ndim == 2:
    x = x[..., None]
  x = x[..., :3]
  if channels == 1:  # the mean of R, G, B (summed in this order, as np.mean does), but faster
    return x.mean(-1, keepdims=True) if x.shape[-1] != 3 else (
        (x[..., 0] + x[..., 1] + x[..., 2]) / np.float32(3))[..., None]
  if channels == 3:
    return np.repeat(x, 3, -1) if x.shape[-1] == 1 else x
  raise ValueError(f"channels must be 1 (grey) or 3 (colour), got {channels}")


def crop_image(x: np.ndarray, crop: str) -> np.ndarray:
  """The crop of a (H, W, C) image named by ``crop`` ('none', 'celeba': the paper's, 'center':
  the central square)."""
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
  """Image (uint8, uint16 or float in [0, 1]) -> float32 (S, S, channels) in [0, 1]:
  channels, crop, square, bicubic resize."""
  x = crop_image(to_channels(img, channels), crop)
  h, w = x.shape[:2]
  if h != w:
    x = crop_image(x, "center")
  if x.shape[0] != image_size:
    planes = [np.asarray(Image.fromarray(x[..., c]).resize((image_size, image_size),
                                                          Image.BICUBIC)) for c in range(x.shape[-1])]
    x = np.stack(planes, -1)
  return np.clip(x, 0.0, 1.0).astype(np.float32)


def _flip(rng: np.random.Generator, batch: np.ndarray, global_size: int | None = None,
          rows: slice = slice(None)) -> np.ndarray:
  """Flip each image of ``batch`` with probability 1/2. The batch is rows ``rows`` of a
  global batch of ``global_size``: the draws are made for the whole global batch and then
  sliced, so the hosts' shares together are exactly the single-host batch."""
  mask = (rng.random(global_size or batch.shape[0]) < 0.5)[rows]
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
    """Batch ``step``: (B, S, S, C) float32, a pure function of the source's seed and ``step``."""
    raise NotImplementedError


class CropSource(Source):
  """Random (S, S) crops of images held in memory (``self.images``, each (h, w, C)), flipped
  at random when the config says so; the batch of a step is a pure function of (seed, split,
  step). Crops cost microseconds: such sources need no parallel decoders."""
  images: list[np.ndarray]

  def __init__(self, cfg: DataConfig, *args, **kwargs):
    super().__init__(cfg, *args, **kwargs)
    if cfg.crop != "none":
      raise ValueError(f"crop={cfg.crop!r} applies to folder and tfds sources; the "
                       f"{cfg.source!r} source crops at random: use crop='none'")

  def batch(self, step: int) -> np.ndarray:
    """Batch ``step``: (B, S, S, C) float32, a pure function of the source's seed and ``step``."""
    s, c = self.cfg.image_size, self.images[0].shape[-1]
    rng = self._rng(step)
    out = np.empty((self.batch_size, s, s, c), np.float32)
    idx = rng.integers(len(self.images), size=self.batch_size)
    for b, i in enumerate(idx):
      im = self.images[i]
      top = rng.integers(im.shape[0] - s + 1)
      left = rng.integers(im.shape[1] - s + 1)
      out[b] = im[top:top + s, left:left + s]
    if self.cfg.flips:
      out = _flip(rng, out)
    return out[self.host_slice]


class EmbeddedSource(CropSource):
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


class DeadLeavesSource(CropSource):
  """Random crops and flips of dead-leaves canvases of CANVAS image sides, rendered once from
  fixed seeds (CANVASES[split] of them; 'all' = both splits'). The discs' radii are fractions
  of the image size (``dead_leaves.DeadLeaves``), so every ``image_size`` sees the same
  ensemble at its own resolution."""
  CANVAS = 4
  CANVASES = {"train": 48, "eval": 8}
  SEED = 20230501  # the data set's, not a run's: every run and host renders the same canvases

  def __init__(self, cfg: DataConfig, *args, **kwargs):
    super().__init__(cfg, *args, **kwargs)
    s = cfg.image_size
    model = dead_leaves.DeadLeaves()
    splits = ("train", "eval") if self.split == "all" else (self.split,)
    self.images = [
        dead_leaves.render(np.random.default_rng([self.SEED, _SPLIT_IDS[split], i]),
                           self.CANVAS * s, self.CANVAS * s, s, cfg.channels, model)
        for split in splits for i in range(self.CANVASES[split])]


class ArraySource(Source):
  """Epoch-wise shuffled batches of preprocessed images fetched by index."""

  def __init__(self, cfg: DataConfig, fetch: Callable[[np.ndarray], np.ndarray], num: int,
               *args, **kwargs):
    super().__init__(cfg, *args, **kwargs)
    if num == 0:
      raise ValueError(f"no images in split {self.split!r} of {cfg.source!r}")
    self.fetch, self.num_examples = fetch, num
    seed = int(np.random.SeedSequence([self.seed, _SPLIT_IDS[self.split]]).generate_state(1)[0])
    self._order = grain.MapDataset.range(num).shuffle(seed=seed).repeat()  # per-epoch reshuffle

  def indices(self, step: int) -> np.ndarray:
    """Global example indices of step ``step``: a fresh permutation every epoch."""
    start = step * self.batch_size
    return np.asarray([self._order[p] for p in range(start, start + self.batch_size)], np.int64)

  def batch(self, step: int) -> np.ndarray:
    """Batch ``step``: (B, S, S, C) float32, a pure function of the source's seed and ``step``."""
    idx = self.indices(step)[self.host_slice]
    out = self.fetch(idx)
    if self.cfg.flips and self.split == "train":
      out = _flip(self._rng(step, 1), out, self.batch_size, self.host_slice)
    return out


def list_images(folder: str) -> list[str]:
  """The image files under ``folder`` (recursively), sorted by path."""
  if not os.path.isdir(folder):
    raise ValueError(f"image folder {folder!r} does not exist (or is not a folder)")
  files = sorted(f for f in glob.glob(os.path.join(folder, "**", "*"), recursive=True)
                 if f.lower().endswith(IMAGE_EXTENSIONS))
  if not files:
    raise ValueError(f"no PNG/JPEG images found under {folder!r}")
  return files


def _folder_files(folder: str, cfg: DataConfig) -> list[str]:
  """The folder's image files by name, the first ``cfg.max_images`` of them when set."""
  files = list_images(folder)
  return files[: cfg.max_images] if cfg.max_images else files


def _bad_listing(bad: Sequence[str]) -> str:
  return "; ".join(bad[:5]) + (f"; ... ({len(bad) - 5} more)" if len(bad) > 5 else "")


def _check_bad(bad: Sequence[str], total: int, folder: str, cfg: DataConfig,
               warn: Callable[[str], None]) -> None:
  """Warn about the skipped files, or raise when more than cfg.max_bad_fraction are bad."""
  if not bad:
    return
  if len(bad) > cfg.max_bad_fraction * total:
    raise ValueError(f"{len(bad)} of {total} images under {folder!r} cannot be used (more "
                     f"than max_bad_fraction={cfg.max_bad_fraction:g}): {_bad_listing(bad)}")
  warn(f"skipped {len(bad)} of {total} images under {folder!r}: {_bad_listing(bad)}")


def load_folder(folder: str, cfg: DataConfig, warn: Callable[[str], None] = logging.warning
                ) -> np.ndarray:
  """All images of a folder, decoded and preprocessed at once: (N, S, S, C) float32.

  Unreadable files (truncated, corrupt, not an image, a size the crop cannot take) are
  skipped with one warning naming them; more than ``cfg.max_bad_fraction`` of them is an
  error. (Training streams folders instead: ``make_source``.)
  """
  files = _folder_files(folder, cfg)
  images, bad = [], []
  for f in files:
    try:
      images.append(preprocess(read_image(f), cfg.image_size, cfg.channels, cfg.crop))
    except ValueError as e:
      bad.append(str(e) if str(e).startswith(f) else f"{f}: {e}")
  _check_bad(bad, len(files), folder, cfg, warn)
  return np.stack(images)


def _check_header(path: str, crop: str) -> None:
  """ValueError unless ``path`` opens as an image the crop can take (no pixel decoding)."""
  try:
    with Image.open(path) as img:
      size = ImageOps.exif_transpose(img).size if img.getexif() else img.size
  except _DECODE_ERRORS as e:
    raise _cannot_decode(path, e) from e
  if crop == "celeba" and (size[1], size[0]) not in _CELEBA_CROPS:
    raise ValueError(f"{path}: crop='celeba' needs aligned CelebA images of 218x178 or 109x89, "
                     f"got {size[1]}x{size[0]}")


class FolderReader:
  """Decodes a folder's images on demand: ``reader(indices)`` -> (n, S, S, C) float32.

  A file that fails to decode is replaced by the next readable file (a fixed rule, so batches
  stay a pure function of the step), with one warning naming it; more than
  ``cfg.max_bad_fraction`` unreadable files seen by a process is an error.
  """

  def __init__(self, files: Sequence[str], cfg: DataConfig, total: int, folder: str,
               known_bad: int = 0):
    self.files, self.cfg, self.total, self.folder = list(files), cfg, total, folder
    self.known_bad = known_bad  # dropped when the header was scanned
    self.bad: dict[int, str] = {}

  def read(self, i: int) -> np.ndarray:
    """The preprocessed image of file ``i``."""
    n = len(self.files)
    for k in range(n):
      j = (i + k) % n
      if j in self.bad:
        continue
      try:
        return load_preprocessed(self.files[j], self.cfg.image_size, self.cfg.channels,
                                 self.cfg.crop)
      except ValueError as e:
        self.bad[j] = str(e)
        if self.known_bad + len(self.bad) > self.cfg.max_bad_fraction * self.total:
          raise ValueError(
              f"{self.known_bad + len(self.bad)} of {self.total} images under {self.folder!r} "
              f"cannot be used (more than max_bad_fraction={self.cfg.max_bad_fraction:g}); the "
              f"latest: {e}") from e
        logging.warning("skipping an unreadable image, replaced by the next one (%d so far): %s",
                        self.known_bad + len(self.bad), e)
    raise ValueError(f"no readable image under {self.folder!r}")

  def __call__(self, idx: np.ndarray) -> np.ndarray:
    return np.stack([self.read(int(i)) for i in idx])


def folder_reader(folder: str, cfg: DataConfig, warn: Callable[[str], None] = logging.warning
                  ) -> FolderReader:
  """A ``FolderReader`` of the folder's files (first ``cfg.max_images``), after a header scan
  that drops (and names) files that do not open as images the crop can take."""
  files = _folder_files(folder, cfg)
  good, bad = [], []
  for f in files:
    try:
      _check_header(f, cfg.crop)
      good.append(f)
    except ValueError as e:
      bad.append(str(e))
  _check_bad(bad, len(files), folder, cfg, warn)
  return FolderReader(good, cfg, len(files), folder, len(bad))


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
  """The source named by ``cfg.source`` ('embedded', 'deadleaves', 'folder:PATH' or
  'tfds:NAME[:SPLIT]')."""
  args = (batch_size, seed, split, process_index, process_count)
  if cfg.source == "embedded":
    return EmbeddedSource(cfg, *args)
  if cfg.source == "deadleaves":
    return DeadLeavesSource(cfg, *args)
  if cfg.source.startswith("folder:"):
    reader = folder_reader(cfg.source[len("folder:"):], cfg)
    rows = _split_range(len(reader.files), split, cfg.eval_fraction)
    reader.files = [reader.files[r] for r in rows]
    return ArraySource(cfg, reader, len(reader.files), *args)
  if cfg.source.startswith("tfds:"):
    return _tfds_source(cfg, split, args)
  raise ValueError(f"unknown data source {cfg.source!r}: use 'embedded', 'deadleaves', "
                   "'folder:/path/to/images' or 'tfds:name[:split]'")


def _tfds_source(cfg: DataConfig, split: str, args: Sequence) -> Source:
  try:
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError("tfds sources need tensorflow-datasets: pip install 'wcdm_jax[tfds]'") from e
  parts = cfg.source.split(":")
  name = parts[1]
  tfds_split = parts[2] if len(parts) > 2 else {"train": "train", "eval": "validation",
                                               "all": "train"}[split]
  try:  # download=False: never start a download from inside a training run
    ds = tfds.data_source(name, split=tfds_split, download=False)
  except tfds.core.registered.DatasetNotFoundError as e:
    raise ValueError(f"unknown tfds dataset {name!r} in data source {cfg.source!r}") from e
  except (KeyError, FileNotFoundError, AssertionError) as e:
    raise ValueError(f"tfds dataset {name!r} (split {tfds_split!r}) is not prepared: prepare it "
                     f"once with `tfds build {name}` (some datasets need a manual download), or "
                     f"point TFDS_DATA_DIR at where it is prepared ({str(e)[:200]})") from e
  n = len(ds) if not cfg.max_images else min(len(ds), cfg.max_images)

  def fetch(idx: np.ndarray) -> np.ndarray:
    return np.stack([preprocess(np.asarray(ds[int(i)]["image"]), cfg.image_size, cfg.channels,
                                cfg.crop) for i in idx])

  return ArraySource(cfg, fetch, n, *args)
