"""Progress bar, machine-readable metrics and image grids (PNG)."""
from __future__ import annotations

import json
import os
import sys
import time
from typing import Sequence

import numpy as np
from PIL import Image


class ProgressBar:
  """A one-line progress bar on a terminal (silent when stderr is not a TTY)."""

  def __init__(self, total: int, desc: str = "", stream=None, enabled: bool | None = None):
    self.total, self.desc, self.stream = max(total, 1), desc, stream or sys.stderr
    self.enabled = self.stream.isatty() if enabled is None else enabled
    self.start, self.n, self.postfix = time.time(), 0, ""

  def update(self, n: int, postfix: str = "") -> None:
    """Show ``n`` done of the total (and ``postfix``, kept until replaced)."""
    self.n, self.postfix = n, postfix or self.postfix
    if not self.enabled:
      return
    frac = min(self.n / self.total, 1.0)
    width = 30
    bar = "#" * int(frac * width) + "-" * (width - int(frac * width))
    rate = self.n / max(time.time() - self.start, 1e-9)
    self.stream.write(f"\r{self.desc} [{bar}] {self.n}/{self.total} {rate:.2f} it/s {self.postfix}"
                      "\x1b[K")
    self.stream.flush()

  def close(self) -> None:
    """End the bar's line."""
    if self.enabled:
      self.stream.write("\n")
      self.stream.flush()


class MetricsWriter:
  """Appends one JSON object per line to ``path`` (JSON Lines); ``enabled=False`` (the
  other processes of a multi-process run) writes nothing."""

  def __init__(self, path: str, enabled: bool = True):
    self.path, self.enabled = path, enabled
    if enabled:
      os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)

  def write(self, step: int, **metrics) -> None:
    """Append one record as a JSON line."""
    if not self.enabled:
      return
    row = {"step": int(step), "time": time.time()}
    row.update({k: (float(v) if np.ndim(v) == 0 else np.asarray(v).tolist())
                for k, v in metrics.items()})
    with open(self.path, "a") as f:
      f.write(json.dumps(row) + "\n")


def write_text_atomic(path: str, text: str) -> None:
  """Write ``path`` through a temporary file and a rename: readers see the old or the new
  content, never a partial one."""
  with open(path + ".tmp", "w", encoding="utf-8") as f:
    f.write(text)
  os.replace(path + ".tmp", path)


def read_metrics(path: str) -> list[dict]:
  """The records of a metrics.jsonl file, one dict per line."""
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def to_uint8(img: np.ndarray) -> np.ndarray:
  """Images in [0, 1] as uint8 (clipped, rounded)."""
  return (np.clip(np.asarray(img, np.float32), 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def image_grid(rows: Sequence[Sequence[np.ndarray]], pad: int = 2, upscale: int = 1) -> np.ndarray:
  """Rows of (h, w, C) images in [0, 1] (sizes may differ: each cell is resized to the
  largest by pixel repetition) -> one uint8 (H, W) or (H, W, 3) grid."""
  cells = [[np.asarray(c, np.float32) for c in row] for row in rows]
  size = max(c.shape[0] for row in cells for c in row) * upscale
  chans = max(c.shape[-1] for row in cells for c in row)
  h = len(cells) * (size + pad) + pad
  w = max(len(r) for r in cells) * (size + pad) + pad
  grid = np.ones((h, w, chans), np.float32)
  for i, row in enumerate(cells):
    for j, c in enumerate(row):
      rep = size // c.shape[0]
      c = np.repeat(np.repeat(c, rep, 0), rep, 1)
      if c.shape[-1] != chans:
        c = np.repeat(c, chans, -1)
      top, left = pad + i * (size + pad), pad + j * (size + pad)
      grid[top:top + c.shape[0], left:left + c.shape[1]] = c
  grid = to_uint8(grid)
  return grid[..., 0] if chans == 1 else grid


def save_png(path: str, image: np.ndarray) -> str:
  """Write an image array as a PNG; returns the path."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  arr = image if image.dtype == np.uint8 else to_uint8(image)
  if arr.ndim == 3 and arr.shape[-1] == 1:
    arr = arr[..., 0]
  Image.fromarray(arr).save(path)
  return path
