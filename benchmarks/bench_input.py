r"""Input pipeline throughput: images/s delivered from CelebA JPEGs, next to the synchronous path
and to what the celeba160 train step consumes on this host.

  python benchmarks/bench_input.py                       # ../shared/data/celeba-aligned
  python benchmarks/bench_input.py --folder=/data/img_align_celeba --batch_size=512

Rows, for 160x160 grey and colour with the paper's crop ([29:-29, 9:-9]):
- "synchronous": ``source.batch(step)`` on the training thread, decoding on demand (the path
  of the previous release for tfds sources), with the previous release's decode and with the
  new one (cropped before the float conversion);
- "eager decode": the former folder path, every image decoded once into a float32 array
  (its rate, and the memory that array takes for the whole folder);
- "pipeline, W worker threads / processes": ``wcdm_jax.pipeline.Batches``.
Memory: peak resident memory (VmHWM) of each worker process above its resident memory after
start-up (the imports), i.e. what the data side holds; the pipeline keeps at most
workers x buffer batches in flight. The train-step row times one step of the three celeba160
nets (batch --step_batch, XLA on this CPU) and reports images/s consumed.
"""
import argparse
import os
import time

from common import table

import numpy as np  # pylint: disable=g-import-not-at-top

from wcdm_jax import data, pipeline  # pylint: disable=g-import-not-at-top

SHARED = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..",
                      "shared", "data", "celeba-aligned")


def _children_mib() -> dict[str, tuple[float, float]]:
  """{pid: (VmHWM, VmRSS) in MiB} of this process's child processes."""
  out, me = {}, str(os.getpid())
  for pid in os.listdir("/proc"):
    if not pid.isdigit():
      continue
    try:
      with open(f"/proc/{pid}/stat") as f:
        if f.read().rsplit(")", 1)[1].split()[1] != me:
          continue
      with open(f"/proc/{pid}/status") as f:
        fields = dict(line.split(":", 1) for line in f if ":" in line)
      out[pid] = (int(fields["VmHWM"].split()[0]) / 1024, int(fields["VmRSS"].split()[0]) / 1024)
    except (OSError, IndexError, KeyError, ValueError):
      continue
  return out


def run_pipeline(src, workers: int, batches: int, warmup: int, processes: bool):
  with pipeline.Batches(src, 0, warmup + batches, workers=workers, processes=processes) as it:
    for _ in range(warmup):
      next(it)
    base = _children_mib()  # after start-up: imports and the first batches
    t0 = time.perf_counter()
    n = sum(len(next(it)) for _ in range(batches))
    dt = time.perf_counter() - t0
    peak = _children_mib()
  held = [peak[pid][0] - base[pid][1] for pid in peak if pid in base]
  return n / dt, max(held, default=0.0)


def run_sync(src, batches: int, former: bool = False) -> float:
  """Batches on this thread; ``former``: with the decode of the previous release
  (``preprocess(read_image(f))``: float32 conversion before the crop)."""
  if former:
    cfg, reader = src.cfg, src.fetch
    src.fetch = lambda idx: np.stack([data.preprocess(data.read_image(reader.files[int(i)]),
                                                      cfg.image_size, cfg.channels, cfg.crop)
                                      for i in idx])
  try:
    return _time_sync(src, batches)
  finally:
    if former:
      src.fetch = reader


def _time_sync(src, batches: int) -> float:
  src.batch(0)
  t0 = time.perf_counter()
  n = sum(len(src.batch(s)) for s in range(1, batches + 1))
  return n / (time.perf_counter() - t0)


def run_eager(folder: str, cfg: data.DataConfig, num: int):
  files = data.list_images(folder)[:num]
  t0 = time.perf_counter()
  for f in files:
    data.preprocess(data.read_image(f), cfg.image_size, cfg.channels, cfg.crop)
  return len(files) / (time.perf_counter() - t0)


def train_step_rate(batch: int, steps: int) -> float:
  """Images/s one celeba160 step (low + cond0 + cond1 nets) consumes here."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from wcdm_jax import models, training  # pylint: disable=g-import-not-at-top
  spec = models.multiscale_spec(2, 9, 41, 1, (160, 160))
  cfg = training.TrainConfig(batch_size=batch)
  mesh = training.make_mesh(jax.devices()[:1])
  fns, states = [], []
  for i, name in enumerate(spec.nets):
    tx = training.make_optimizer(spec, name, cfg)
    states.append(training.replicate(training.init_state(jax.random.key(i), spec.nets[name], tx,
                                                         cfg),
                                     mesh))
    fns.append(training.make_train_step(spec, name, tx, cfg, mesh))
  images = training.global_batch(np.random.default_rng(0).random((batch, 160, 160, 1),
                                                                  np.float32), mesh)

  def step(s):
    for i, fn in enumerate(fns):
      states[i], m = fn(states[i], images)
    jnp.asarray(m["loss"]).block_until_ready()

  step(0)
  t0 = time.perf_counter()
  for s in range(steps):
    step(s + 1)
  return batch * steps / (time.perf_counter() - t0)


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--folder", default=SHARED)
  p.add_argument("--batch_size", type=int, default=64)
  p.add_argument("--batches", type=int, default=40, help="timed batches per row")
  p.add_argument("--warmup", type=int, default=4)
  p.add_argument("--workers", default="", help="comma-separated (default 1,2,N cores)")
  p.add_argument("--step_batch", type=int, default=4, help="batch of the train-step timing")
  p.add_argument("--step_repeats", type=int, default=2)
  p.add_argument("--colour", action=argparse.BooleanOptionalAction, default=True)
  args = p.parse_args()
  if not os.path.isdir(args.folder):
    raise SystemExit(f"no image folder at {args.folder}: pass --folder")
  cores = len(os.sched_getaffinity(0))
  workers = sorted({int(w) for w in args.workers.split(",")} if args.workers else {1, 2, cores})
  print(f"{cores} cores; batch {args.batch_size}; {args.batches} timed batches per row; "
        f"folder {args.folder}")
  for channels in (1, 3) if args.colour else (1,):
    cfg = data.DataConfig(f"folder:{args.folder}", 160, channels, "celeba")
    src = data.make_source(cfg, args.batch_size, 0)
    batch_mib = args.batch_size * 160 * 160 * channels * 4 / 2 ** 20
    sync = run_sync(src, args.batches // 2, former=True)
    eager = run_eager(args.folder, cfg, 300)
    n = src.num_examples
    rows = [["synchronous, former decode (training thread)", sync, 1.0, "-"],
            ["eager decode (former folder path, up front)", eager, eager / sync,
             f"{n * 160 * 160 * channels * 4 / 2 ** 20:.0f} (float32 copy of {n} images)"],
            ["synchronous, new decode (training thread)", run_sync(src, args.batches // 2),
             None, "-"]]
    rows[-1][2] = rows[-1][1] / sync
    for kind in ("threads", "processes"):
      for w in workers:
        rate, held = run_pipeline(src, w, args.batches, args.warmup, kind == "processes")
        rows.append([f"pipeline, {w} worker {kind}", rate, rate / sync,
                     f"{held:.0f}" if kind == "processes" else "-"])
    print(table(f"160x160 {'grey' if channels == 1 else 'colour'}, paper crop (one batch = "
                f"{batch_mib:.1f} MiB float32; buffer 2 batches per worker)",
                ["path", "images/s", "x synchronous", "data-side memory, MiB"], rows))
    print()
  rate = train_step_rate(args.step_batch, args.step_repeats)
  print(f"celeba160 train step (low + cond0 + cond1, batch {args.step_batch}, this CPU): "
        f"{rate:.2f} images/s consumed")


if __name__ == "__main__":
  main()
