r"""Train-step and forward speed of the three BF-CNNs: JAX (each conv lowering) vs PyTorch.

  python benchmarks/bench_nets.py            # all cases
  python benchmarks/bench_nets.py --repeats=3 --cases=cond9
  python benchmarks/bench_nets.py --isa=generic     # the portable kernels instead of the CPU's best

Same machine, same run, same thread count, float32, medians after warm-up. A train step is
forward + loss + backward + Adam update on a given noisy batch. GFLOP/s counts the direct
convolution's 2 x multiply-adds (train step: 3 x forward), on both sides: the native 3x3
layers run as Winograd F(2x2, 3x3), which does 2.25x fewer multiplies, so JAX's figures are
effective rates and can exceed the matrix-product peak, measured here too for XLA and PyTorch.
impl 'auto' runs the native kernels of the ISA printed first (--isa forces one: avx512, avx2,
generic); 'xla' is XLA's convolutions.
"""
import argparse

from common import (add_isa_argument, calibrated_variables, gflops, jax_train_step,
                    median_time, rng_images, table, torch_net, torch_threads, use_isa)

import jax  # pylint: disable=g-import-not-at-top
import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
import numpy as np  # pylint: disable=g-import-not-at-top

from wcdm_jax import models  # pylint: disable=g-import-not-at-top

CASES = {
    "flat43": ("flat RF 43, 64x64, batch 16", models.flat_spec(43), 64, 16),
    "cond9": ("conditional RF 9, 80x80, batch 16", models.cond_spec(0, 9), 80, 16),
    "low41": ("low-pass RF 41, 40x40, batch 64", models.low_spec(2, 41), 40, 64),
}
IMPLS = ("auto", "xla")


def bench_jax(spec, size, batch, impl, repeats):
  v = models.init_net(jax.random.key(0), spec)
  noisy = jnp.asarray(rng_images((batch, size, size, spec.in_channels)))
  noise = jnp.asarray(rng_images((batch, size, size, spec.out_channels), 1))
  tx, step = jax_train_step(spec, impl)
  state = [v["params"], v["batch_stats"], tx.init(v["params"])]

  def train():
    state[0], state[1], state[2], loss = step(*state, noisy, noise)
    loss.block_until_ready()

  fwd = jax.jit(lambda v, x: models.apply_net(spec, v, x, conv_impl=impl))
  v_eval = calibrated_variables(spec, noisy)  # same weights as the torch net's
  forward = lambda: fwd(v_eval, noisy).block_until_ready()
  return median_time(train, repeats=repeats), median_time(forward, repeats=repeats)


def bench_torch(spec, size, batch, repeats):
  import torch  # pylint: disable=g-import-not-at-top
  x = jnp.asarray(rng_images((batch, size, size, spec.in_channels)))
  net = torch_net(spec, calibrated_variables(spec, x))
  opt = torch.optim.Adam(net.parameters(), 1e-3)
  noisy = torch.from_numpy(np.asarray(x).transpose(0, 3, 1, 2).copy())
  noise = torch.from_numpy(rng_images((batch, spec.out_channels, size, size), 1))

  def train():
    net.train()
    opt.zero_grad()
    loss = ((net(noisy) - noise) ** 2).sum() / batch
    loss.backward()
    opt.step()

  def forward():
    net.eval()
    with torch.inference_mode():
      net(noisy)

  return median_time(train, repeats=repeats), median_time(forward, repeats=repeats)


def same_weights_check(spec, size, batch):
  """Both sides run the same network: max output difference on the benchmark batch."""
  import torch  # pylint: disable=g-import-not-at-top
  x = jnp.asarray(rng_images((batch, size, size, spec.in_channels)))
  v = calibrated_variables(spec, x)
  with torch.inference_mode():
    theirs = torch_net(spec, v)(torch.from_numpy(np.asarray(x).transpose(0, 3, 1, 2).copy()))
  ours = np.asarray(models.apply_net(spec, v, x)).transpose(0, 3, 1, 2)
  return float(np.abs(ours - theirs.numpy()).max() / np.abs(ours).max())


def matmul_peak(repeats):
  import torch  # pylint: disable=g-import-not-at-top
  m, k, n = 16 * 64 * 64, 576, 64
  a, b = rng_images((m, k)), rng_images((k, n), 1)
  ja, jb = jnp.asarray(a), jnp.asarray(b)
  dot = jax.jit(jnp.dot)
  t_jax = median_time(lambda: dot(ja, jb).block_until_ready(), repeats=repeats)
  ta, tb = torch.from_numpy(a), torch.from_numpy(b)
  t_torch = median_time(lambda: ta @ tb, repeats=repeats)
  flops = 2.0 * m * k * n
  return gflops(flops, t_jax), gflops(flops, t_torch)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--cases", default=",".join(CASES))
  parser.add_argument("--impls", default=",".join(IMPLS))
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--tiny", action="store_true", help="smoke test: 3 layers, 16x16, batch 2")
  add_isa_argument(parser)
  args = parser.parse_args()
  print(use_isa(args.isa))
  if args.tiny:
    for k, (title, spec, _, _) in list(CASES.items()):
      small = models.NetSpec(spec.kind, spec.in_channels, spec.out_channels, (3, 3, 3), 8,
                             level=spec.level)
      CASES[k] = (title + " [tiny]", small, 16, 2)
  threads = torch_threads()
  peak_jax, peak_torch = matmul_peak(args.repeats)
  print(f"threads: {threads}; jax {jax.__version__} ({jax.devices()[0].platform}); "
        f"matmul (65536x576 @ 576x64) peak: XLA {peak_jax:.1f} GFLOP/s, PyTorch {peak_torch:.1f} GFLOP/s\n")
  train_rows, fwd_rows = [], []
  for key in args.cases.split(","):
    title, spec, size, batch = CASES[key]
    flops = spec.flops_per_pixel() * size * size * batch
    t_train, t_fwd = bench_torch(spec, size, batch, args.repeats)
    print(f"{title}: max |JAX - PyTorch| / max |JAX| forward {same_weights_check(spec, size, batch):.1e}")
    best = {}
    for impl in args.impls.split(","):
      j_train, j_fwd = bench_jax(spec, size, batch, impl, args.repeats)
      train_rows.append([title, f"jax/{impl}", batch / j_train, gflops(3 * flops, j_train),
                         f"{t_train / j_train:.2f}x", f"{gflops(3 * flops, j_train) / peak_jax:.0%}"])
      fwd_rows.append([title, f"jax/{impl}", batch / j_fwd, gflops(flops, j_fwd),
                       f"{t_fwd / j_fwd:.2f}x"])
      best[impl] = (j_train, j_fwd)
    train_rows.append([title, "pytorch", batch / t_train, gflops(3 * flops, t_train), "1.00x",
                       f"{gflops(3 * flops, t_train) / peak_jax:.0%}"])
    fwd_rows.append([title, "pytorch", batch / t_fwd, gflops(flops, t_fwd), "1.00x"])
  print("GFLOP/s: direct-convolution FLOPs / time (effective rates; Winograd does fewer)\n")
  print(table("Train step (forward + backward + Adam)",
              ["case", "impl", "images/s", "GFLOP/s", "vs PyTorch", "of XLA matmul peak"],
              train_rows))
  print()
  print(table("Denoiser forward (evaluation mode)",
              ["case", "impl", "images/s", "GFLOP/s", "vs PyTorch"], fwd_rows))


if __name__ == "__main__":
  main()
