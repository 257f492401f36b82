"""The input pipeline: a source's batches decoded ahead of the train step, in parallel, on grain.

``Batches(source, start, stop, workers, processes)`` iterates this host's batches of steps
[start, stop): element s is ``source.batch(s)``, a pure function of (seed, step, host), so a
resumed run (start = the resumed step) sees exactly the batches of an uninterrupted one, and
the number or kind of workers never changes the data. grain runs ``source.batch`` in
``workers`` threads of this process, or ``workers`` processes (each on every ``workers``-th
step), with a bounded prefetch buffer: at most about ``workers * (buffer + 1)`` batches are in
memory at once, and nothing else of the dataset.

A worker that dies (killed, out of memory) or raises ends the iteration with an error in the
training process; nothing waits forever.
"""
from __future__ import annotations

import os
import time
from typing import Iterator

import grain
import numpy as np

from wcdm_jax import data


def _cores() -> int:
  cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
  return cores or 1


def default_workers(source: data.Source | None) -> int:
  """Parallel decoders that fit this host: one per core up to 16, leaving one core to the
  train step on hosts with more than two cores (1 for the sources that crop images held in
  memory, ``data.CropSource``, whose crops cost microseconds)."""
  if isinstance(source, data.CropSource):
    return 1
  cores = _cores()
  return max(1, min(16, cores - 1 if cores > 2 else cores))


def default_processes() -> bool:
  """Worker processes on hosts with more than 4 cores; threads below (decoding releases the
  GIL, and on a few cores processes' start-up and copies cost more than they give)."""
  return _cores() > 4


class InputError(RuntimeError):
  """The input pipeline failed (a worker died, too many unreadable files, ...)."""


class Batches:
  """Iterator over ``source.batch(s)`` for s in [start, stop), prefetched by grain.

  workers: parallel decoders: processes (``grain`` mp_prefetch) when ``processes``, else
  threads of this process. buffer: batches prefetched per worker. ``wait_s``: total seconds
  ``next`` waited for data. Use as a context manager (or call ``close``) to stop the workers.
  """

  def __init__(self, source: data.Source, start: int, stop: int, workers: int = 2,
               processes: bool = False, buffer: int = 2):
    if not 0 <= start <= stop:
      raise ValueError(f"need 0 <= start <= stop, got {start}, {stop}")
    if workers < 1 or buffer < 1:
      raise ValueError(f"workers and buffer must be >= 1, got {workers}, {buffer}")
    self.start, self.stop, self.workers, self.processes = start, stop, workers, processes
    ds = grain.MapDataset.range(start, stop).map(source.batch)
    it = ds.to_iter_dataset(grain.ReadOptions(num_threads=1 if processes else workers,
                                              prefetch_buffer_size=buffer * (
                                                  1 if processes else workers)))
    if processes:
      from absl import flags  # pylint: disable=g-import-not-at-top
      if not flags.FLAGS.is_parsed():  # grain's workers read its absl flags: use their defaults
        flags.FLAGS.mark_as_parsed()
      it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers,
                                                       per_worker_buffer_size=buffer))
    self._it = iter(it)
    self.step = start
    self.wait_s = 0.0

  def __iter__(self) -> Iterator[np.ndarray]:
    return self

  def __next__(self) -> np.ndarray:
    if self.step >= self.stop:
      raise StopIteration
    t0 = time.perf_counter()
    try:
      batch = next(self._it)
    except StopIteration:
      raise InputError(f"the input pipeline ended early at step {self.step} (expected "
                       f"{self.stop})") from None
    except Exception as e:  # a worker's error, or a dead worker: never wait on it
      raise InputError(f"the input pipeline failed at step {self.step}: {type(e).__name__}: "
                       f"{str(e).strip()[:2000]}. Nothing after the last checkpoint is lost: "
                       "fix the cause and rerun the same command to resume") from e
    self.wait_s += time.perf_counter() - t0
    self.step += 1
    return batch

  def close(self) -> None:
    """Stop the workers and release their resources."""
    close = getattr(self._it, "close", None)
    if close is not None:
      close()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()
