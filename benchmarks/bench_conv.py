r"""Per-layer convolution speed: each native variant this CPU runs, XLA, and oneDNN.

  python benchmarks/bench_conv.py                 # the BF-CNN layers of the three benchmark nets
  python benchmarks/bench_conv.py --repeats=3 --variants=avx2,xla

The 64 -> 64 layers that dominate every BF-CNN, at the sizes bench_nets.py uses: forward, input
gradient and kernel gradient, NHWC float32, 2 x multiply-adds of the direct convolution per
second (the native 3x3 layers run as Winograd F(2x2, 3x3), so theirs are effective rates).
oneDNN is measured through PyTorch, whose CPU convolutions are oneDNN's (its verbose mode,
ONEDNN_VERBOSE=1, names the implementation, e.g. 'jit:avx2 ... alg:convolution_direct'), on
channels-last tensors, the layout an XLA FFI binding would hand it; the first lines print
oneDNN's version and the implementation it picks. Same process, same thread count.
"""
import argparse
import os
import re
import subprocess
import sys

from common import gflops, median_time, rng_images, table, torch_threads

import jax  # pylint: disable=g-import-not-at-top
import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

from wcdm_jax import conv, native_build  # pylint: disable=g-import-not-at-top

# (title, batch, size, k): the layers of flat RF 43 (64x64, b16), conditional RF 9 (80x80,
# b16: mostly 1x1) and low-pass RF 41 (40x40, b64) in bench_nets.py.
LAYERS = [("3x3 64->64, 64x64, b16", 16, 64, 3), ("3x3 64->64, 80x80, b16", 16, 80, 3),
          ("1x1 64->64, 80x80, b16", 16, 80, 1), ("3x3 64->64, 40x40, b64", 64, 40, 3)]
OPS = ("forward", "input grad", "kernel grad")


def jax_fns(variant, k):
  """(forward, input grad, kernel grad) of one implementation, jitted."""
  if variant == "xla":
    fwd = lambda x, w: conv.lax_conv(x, w)
    flip = lambda w: jnp.flip(w, (0, 1)).swapaxes(2, 3)
    dx = lambda g, w: conv.lax_conv(g, flip(w))
    dw = lambda x, g: conv.kernel_grad(x, g, k)
  else:
    fwd = lambda x, w: conv.native_conv(x, w, False, True, variant)
    dx = lambda g, w: conv.native_conv(g, jnp.flip(w, (0, 1)).swapaxes(2, 3), False, True,
                                       variant)
    dw = lambda x, g: conv.native_kernel_grad(x, g, k, variant)
  return jax.jit(fwd), jax.jit(dx), jax.jit(dw)


def bench_jax(variant, b, s, k, repeats):
  x = jnp.asarray(rng_images((b, s, s, 64)))
  g = jnp.asarray(rng_images((b, s, s, 64), 1))
  w = jnp.asarray(rng_images((k, k, 64, 64), 2)) / (8 * k)
  fwd, dx, dw = jax_fns(variant, k)
  return [median_time(lambda f=f, a=a: f(*a).block_until_ready(), repeats=repeats)
          for f, a in ((fwd, (x, w)), (dx, (g, w)), (dw, (x, g)))]


def bench_onednn(b, s, k, repeats):
  import torch  # pylint: disable=g-import-not-at-top
  from torch.nn import grad as tgrad  # pylint: disable=g-import-not-at-top
  cl = torch.channels_last
  x = torch.from_numpy(rng_images((b, 64, s, s))).contiguous(memory_format=cl)
  g = torch.from_numpy(rng_images((b, 64, s, s), 1)).contiguous(memory_format=cl)
  w = (torch.from_numpy(rng_images((64, 64, k, k), 2)) / (8 * k)).contiguous(memory_format=cl)
  p = k // 2
  with torch.no_grad():
    return [median_time(f, repeats=repeats) for f in (
        lambda: torch.nn.functional.conv2d(x, w, padding=p),
        lambda: tgrad.conv2d_input(x.shape, w, g, padding=p),
        lambda: tgrad.conv2d_weight(x, w.shape, g, padding=p))]


def onednn_implementation() -> str:
  """oneDNN's version and the implementation it runs for a 3x3 layer (from its verbose log)."""
  code = ("import torch; torch.set_num_threads(2); x = torch.randn(2, 64, 16, 16).contiguous("
          "memory_format=torch.channels_last); w = torch.randn(64, 64, 3, 3).contiguous("
          "memory_format=torch.channels_last); torch.nn.functional.conv2d(x, w, padding=1)")
  out = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, ONEDNN_VERBOSE="1"),
                       capture_output=True, text=True, check=False).stdout
  version = re.search(r"oneDNN v[\d.]+", out)
  impl = re.search(r"exec,cpu,convolution,([^,]+),.*alg:([a-z_]+)", out)
  return (f"{version.group(0) if version else 'oneDNN (version unknown)'}: "
          + (f"{impl.group(1)} {impl.group(2)}" if impl else "implementation not reported"))


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--variants", default=",".join(native_build.cpu_isas() + ("xla",)),
                      help="native variants (avx512, avx2, generic, generic16) and/or xla")
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--no_onednn", action="store_true", help="skip the oneDNN (PyTorch) rows")
  args = parser.parse_args()
  threads = torch_threads() if not args.no_onednn else os.cpu_count()
  print(f"CPU: {native_build.cpu_name()}; ISAs: {', '.join(native_build.cpu_isas())}; "
        f"threads: {threads}; jax {jax.__version__}")
  if not args.no_onednn:
    print(onednn_implementation())
  rows = []
  for title, b, s, k in LAYERS:
    flops = 2.0 * b * s * s * 64 * 64 * k * k
    impls = [v for v in args.variants.split(",") if v]
    results = {v: bench_jax(v, b, s, k, args.repeats) for v in impls}
    if not args.no_onednn:
      results["onednn"] = bench_onednn(b, s, k, args.repeats)
    for name, times in results.items():
      rows.append([title, name] + [gflops(flops, t) for t in times])
  print()
  print(table("GFLOP/s per layer (direct-convolution FLOPs / time)", ["layer", "impl", *OPS],
              rows))


if __name__ == "__main__":
  main()
