r"""Accelerator figures in one run (see accelerator_check.sh): train-step images/s and model FLOP
utilisation of the three celeba160 nets in float32 and bfloat16, the step's images/s on 1, 2,
4, ... local devices (scaling efficiency) with the bytes each compiled step communicates, the
input pipeline's images/s on this host, and multi-scale synthesis images/min at 160x160 on
all local devices.

  python benchmarks/accelerator_check.py            # batch 512, release synthesis settings
  python benchmarks/accelerator_check.py --tiny     # a CPU-sized smoke run of every part

MFU = model FLOPs (3 x the forward's direct-convolution FLOPs per training image) / time /
the device's peak for that dtype (known devices below, or --peak_tflops).
"""
import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # pylint: disable=g-import-not-at-top
import numpy as np  # pylint: disable=g-import-not-at-top

from wcdm_jax import data, models, parallel, pipeline, sampling, training  # pylint: disable=g-import-not-at-top

# Dense peak TFLOP/s per device: (float32 as XLA runs it by default, i.e. TF32 on NVIDIA
# tensor cores; bfloat16).
PEAKS = {"H200": (494.0, 989.0), "H100": (494.0, 989.0), "A100": (156.0, 312.0),
         "TPU v4": (275.0, 275.0), "TPU v5 lite": (197.0, 197.0), "TPU v5p": (459.0, 459.0)}
SHARED = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..",
                      "shared", "data", "celeba-aligned")


def peak_tflops(dtype: str, override: float):
  if override:
    return override
  kind = jax.devices()[0].device_kind
  for name, (f32, bf16) in PEAKS.items():
    if name.lower() in kind.lower():
      return f32 if dtype == "float32" else bf16
  return None


def train_figures(spec, batch, steps, dtype, devices=None):
  """(images/s, model FLOP/s, last loss, bytes the compiled steps' collectives move)."""
  cfg = training.TrainConfig(batch_size=batch, dtype=dtype)
  mesh = training.make_mesh(devices)
  fns, states, flops, moved = [], [], 0.0, 0
  for i, (name, net) in enumerate(spec.nets.items()):
    tx = training.make_optimizer(spec, name, cfg)
    states.append(training.replicate(training.init_state(jax.random.key(i), net, tx, cfg),
                                     mesh))
    fns.append(training.train_step(spec, name, cfg, mesh))  # made once per (settings, mesh)
    shape = jax.ShapeDtypeStruct((batch,) + spec.image_size + (1,), np.float32,
                                 sharding=parallel.batch_sharding(mesh))
    hlo = fns[-1].lower(states[-1], shape).compile().as_text()
    moved += sum(b for _, b in parallel.collective_summary(hlo).values())
    side = spec.image_size[0] // 2 ** (spec.levels if net.kind == "low" else net.level + 1)
    flops += 3.0 * net.flops_per_pixel() * side * side  # per training image
  images = training.global_batch(
      np.random.default_rng(0).random((batch,) + spec.image_size + (1,), np.float32), mesh)

  def run(n, offset):
    for s in range(n):
      for i, fn in enumerate(fns):
        states[i], m = fn(states[i], images)
    jax.block_until_ready(m["loss"])
    return float(m["loss"])

  run(2, 0)  # compile and warm up
  t0 = time.perf_counter()
  loss = run(steps, 10)
  dt = (time.perf_counter() - t0) / steps
  return batch / dt, flops * batch / dt, loss, moved


def input_rate(folder, batch, batches, workers, processes):
  cfg = data.DataConfig(f"folder:{folder}", 160, 1, "celeba")
  src = data.make_source(cfg, batch, 0)
  with pipeline.Batches(src, 0, batches + 2, workers, processes) as it:
    next(it)
    next(it)
    t0 = time.perf_counter()
    n = sum(len(next(it)) for _ in range(batches))
  return n / (time.perf_counter() - t0)


def synthesis_rate(spec, batch, low_steps, cond_steps):
  params = models.init_model(jax.random.key(0), spec)
  low = sampling.AscentConfig(h0=0.01, beta=0.01, sigma_L=1e-9, ascending=False,
                              max_steps=low_steps, abort_sigma=1e9)
  cond = sampling.AscentConfig(h0=0.01, beta=0.5, sigma_L=1e-9, max_steps=cond_steps,
                               abort_sigma=1e9)
  mesh = parallel.make_mesh(jax.local_devices())
  run = lambda seed: sampling.sample(jax.random.key(seed), params, batch, low_config=low,
                                     cond_config=cond, mesh=mesh).block_until_ready()
  run(0)
  t0 = time.perf_counter()
  run(1)
  return batch * 60 / (time.perf_counter() - t0)


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--tiny", action="store_true", help="CPU-sized smoke run of every part")
  p.add_argument("--peak_tflops", type=float, default=0.0)
  p.add_argument("--folder", default=SHARED)
  args = p.parse_args()
  dev = jax.devices()
  print(f"devices: {len(dev)} x {dev[0].device_kind} ({dev[0].platform}); jax {jax.__version__}")
  if args.tiny:
    spec = models.multiscale_spec(2, 9, 11, 1, (32, 32), num_layers=5, low_num_layers=5,
                                  features=8)
    batch, steps, in_batch, in_batches, syn_batch, low_steps, cond_steps = 8, 2, 16, 4, 2, 20, 10
  else:
    spec = models.multiscale_spec(2, 9, 41, 1, (160, 160))
    # Release settings: fixed-h low-pass ascent (the release's runs stop after 5,000-15,000
    # steps; 8,521 was measured with sigma_L 0.1), 100 ascending steps per conditional scale.
    batch, steps, in_batch, in_batches, syn_batch, low_steps, cond_steps = (
        512, 10, 512, 8, 64, 8521, 100)
  for dtype in ("float32", "bfloat16"):
    rate, flops, loss, moved = train_figures(spec, batch, steps, dtype)
    peak = peak_tflops(dtype, args.peak_tflops)
    mfu = (f"{flops / 1e12 / peak / len(dev):.1%}" if peak
           else "n/a (unknown peak: --peak_tflops)")
    print(f"train step, {dtype}: {rate:.0f} images/s (low + cond0 + cond1, batch {batch}, "
          f"{len(dev)} devices), {flops / 1e12:.1f} model TFLOP/s, MFU {mfu}, loss {loss:.3g}, "
          f"{moved / 2**20:.2f} MiB communicated per step")
  counts = [n for n in (1, 2, 4, 8, 16, 32, 64) if n <= len(jax.local_devices())]
  base = None
  for n in counts:  # the global batch per device fixed: weak scaling
    rate, _, _, moved = train_figures(spec, batch // max(counts) * n, steps, "float32",
                                      jax.local_devices()[:n])
    base = base or rate
    print(f"scaling, float32: {n} devices {rate:.0f} images/s, efficiency "
          f"{rate / (base * n):.0%}, {moved / 2**20:.2f} MiB communicated per step")
  if os.path.isdir(args.folder):
    cores = len(os.sched_getaffinity(0))
    for workers, processes in ((pipeline.default_workers(None), pipeline.default_processes()),):
      r = input_rate(args.folder, in_batch, in_batches, workers, processes)
      print(f"input pipeline: {r:.0f} images/s ({workers} "
            f"{'processes' if processes else 'threads'}, {cores} cores; 160 grey, paper crop)")
  else:
    print(f"input pipeline: skipped (no folder {args.folder})")
  r = synthesis_rate(spec, syn_batch, low_steps, cond_steps)
  print(f"synthesis: {r:.2f} images/min ({spec.image_size[0]}x{spec.image_size[1]}, batch "
        f"{syn_batch}, {low_steps} low-pass + {cond_steps} x 2 conditional steps)")


if __name__ == "__main__":
  main()
