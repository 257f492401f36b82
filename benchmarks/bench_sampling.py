r"""Multi-scale synthesis of 160x160 images (J = 2): JAX, batched, vs the PyTorch loop run the
way the authors run it (one image at a time).

  python benchmarks/bench_sampling.py                 # 200 low-pass + 80 + 80 steps per image
  python benchmarks/bench_sampling.py --low_steps=8521  # the release's full low-pass ascent
  python benchmarks/bench_sampling.py --isa=avx2        # another ISA's native kernels

Both sides run the release's algorithm and settings (method.md §5: low-pass beta 0.01, fixed
h 0.01; conditional scales h0 0.01 ascending, beta 0.5) with the same nets (the released RF 13
weights when ../shared is present, else random ones of the same shapes) and exactly the same
number of denoiser evaluations per image (the stop rules are disabled, so every image runs the
given steps). Per-image time of the full release run is extrapolated from the per-step costs.
GFLOP/s: the low-pass net's direct-convolution FLOPs per step and image / time (effective).
"""
import argparse
import dataclasses
import statistics
import time

from common import (add_isa_argument, release_or_random, table, torch_net, torch_threads,
                    use_isa)

import jax  # pylint: disable=g-import-not-at-top
import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
import numpy as np  # pylint: disable=g-import-not-at-top

from wcdm_jax import models, sampling, wavelets  # pylint: disable=g-import-not-at-top

def load_model():
  params, which = release_or_random("ms_celebA_160x160_gray_rf13",
                                    models.multiscale_spec(2, cond_rf=13, image_size=(160, 160)))
  return params, f"{which} RF 13"


def torch_ascent(net, shape, steps, h0, beta, ascending, cond=None, seed=0):
  """The authors' loop for one image: y <- y - h f(y) + gamma z, with a .item() per step."""
  import torch  # pylint: disable=g-import-not-at-top
  g = torch.Generator().manual_seed(seed)
  y = torch.randn(1, *shape, generator=g)
  n = float(np.prod(shape))
  with torch.inference_mode():
    for t in range(1, steps + 1):
      h = h0 * t / (1 + h0 * (t - 1)) if ascending else h0
      d = net(y if cond is None else torch.cat([cond, y], 1))
      sigma = torch.norm(d) / np.sqrt(n)
      gamma = sigma * np.sqrt((1 - beta * h) ** 2 - (1 - h) ** 2)
      y = y - h * d + gamma * torch.randn(1, *shape, generator=g)
      snr = 20 * torch.log10(y.std() / sigma).item()  # the stop test (disabled here)
      del snr
    return y - net(y if cond is None else torch.cat([cond, y], 1))


def torch_synthesis(nets, low_steps, cond_steps, seed):
  import torch  # pylint: disable=g-import-not-at-top
  low = torch_ascent(nets["low"], (1, 40, 40), low_steps, 0.01, 0.01, False, seed=seed)
  low = (low - low.min()) / (low.max() - low.min()) * 0.8
  for j, size in ((1, 40), (0, 80)):
    det = torch_ascent(nets[f"cond{j}"], (3, size, size), cond_steps, 0.01, 0.5, True, low, seed)
    x = jnp.asarray(np.concatenate([low.numpy(), det.numpy()], 1).transpose(0, 2, 3, 1))
    low = torch.from_numpy(np.asarray(wavelets.idwt_level(x[..., :1], x[..., 1:])).transpose(0, 3, 1, 2).copy())
  return low


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--low_steps", type=int, default=200)
  parser.add_argument("--cond_steps", type=int, default=80)
  parser.add_argument("--torch_images", type=int, default=1)
  parser.add_argument("--release_low_steps", type=int, default=8521)
  parser.add_argument("--repeats", type=int, default=3, help="alternating timing rounds")
  add_isa_argument(parser)
  args = parser.parse_args()
  print(use_isa(args.isa))
  threads = torch_threads()
  params, which = load_model()
  never = dict(sigma_L=1e-30, abort_sigma=float("inf"))  # fixed step counts on both sides
  low_cfg = dataclasses.replace(sampling.RELEASE_LOW, max_steps=args.low_steps, **never)
  cond_cfg = dataclasses.replace(sampling.RELEASE_COND, max_steps=args.cond_steps, **never)

  def run_jax(low_steps, cond_steps, n):
    lc = dataclasses.replace(low_cfg, max_steps=low_steps)
    cc = dataclasses.replace(cond_cfg, max_steps=cond_steps)
    return sampling.sample(jax.random.key(0), params, n, low_config=lc, cond_config=cc,
                           low_rescale=(0.0, 0.8)).block_until_ready()

  nets = {n: torch_net(*params.net(n)) for n in params.spec.nets}

  def run_torch(low_steps, cond_steps, n):
    for i in range(n):
      torch_synthesis(nets, low_steps, cond_steps, i)

  # Compile / warm up, then time both sides in alternation (the machine's speed drifts), each
  # run once in full and once with a single low-pass step: the difference is the low-pass
  # cost, used to extrapolate to the release's step count. Medians over --repeats rounds.
  run_jax(args.low_steps, args.cond_steps, args.batch)
  run_jax(1, args.cond_steps, args.batch)
  run_torch(2, 2, 1)
  times = {k: [] for k in ("jax", "jax_cond", "torch", "torch_cond")}
  for _ in range(args.repeats):
    for name, fn, n in (("jax", run_jax, args.batch), ("torch", run_torch, args.torch_images)):
      t = time.perf_counter(); fn(args.low_steps, args.cond_steps, n)
      times[name].append((time.perf_counter() - t) / n)
      t = time.perf_counter(); fn(1, args.cond_steps, n)
      times[name + "_cond"].append((time.perf_counter() - t) / n)
  j_total, j_cond, t_total, t_cond = (statistics.median(times[k]) for k in
                                      ("jax", "jax_cond", "torch", "torch_cond"))
  j_low_step = (j_total - j_cond) / max(args.low_steps - 1, 1)
  t_low_step = (t_total - t_cond) / max(args.low_steps - 1, 1)

  full = lambda cond, step: cond + step * (args.release_low_steps - 1)
  j_full, t_full = full(j_cond, j_low_step), full(t_cond, t_low_step)
  low_flops = params.spec.low.flops_per_pixel() * 40 * 40  # one low-pass evaluation, one image
  rows = [
      [f"JAX, batch {args.batch}", f"{j_total:.2f}", f"{1e3 * j_low_step:.2f}",
       f"{low_flops / j_low_step / 1e9:.0f}", f"{j_cond:.2f}", f"{j_full:.1f}",
       f"{j_total / t_total:.2f}x", f"{j_full / t_full:.2f}x"],
      ["PyTorch, one image at a time", f"{t_total:.2f}", f"{1e3 * t_low_step:.2f}",
       f"{low_flops / t_low_step / 1e9:.0f}", f"{t_cond:.2f}", f"{t_full:.1f}", "1.00x", "1.00x"],
  ]
  print(f"threads: {threads}; nets: {which}; steps per image: low-pass {args.low_steps}, "
        f"conditional {args.cond_steps} + {args.cond_steps}; medians of {args.repeats} "
        "alternating rounds\n")
  print(table("Multi-scale synthesis, 160x160, per image",
              ["", "measured run (s)", "low-pass step (ms)", "low-pass step GFLOP/s",
               "both conditional scales (s)",
               f"release run, {args.release_low_steps} low-pass steps (s, extrapolated)",
               "time vs PyTorch (measured)", "time vs PyTorch (release run)"], rows))


if __name__ == "__main__":
  main()
