r"""Speed of wcdm_jax.log_prob: images per minute at 160x160, flat RF 43 and multi-scale RF 13.

  python benchmarks/bench_likelihood.py                      # the released nets, batch 16, 64 evaluations
  python benchmarks/bench_likelihood.py --num_evals=16 --tiny   # smoke test: random nets, 32x32

Uses the authors' released weights from ../shared when present, else random weights of the same architecture (speed does not depend on the weights). Prints the CPU and
the ISA of the convolutions, the compile time and the steady-state images/min (median of
--repeats calls); the cost is num_evals x (J + 1) net evaluations per image.
"""
import argparse
import sys
import time

from common import add_isa_argument, median_time, release_or_random, table, use_isa


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--batch", type=int, default=16)
  parser.add_argument("--num_evals", type=int, default=64)
  parser.add_argument("--repeats", type=int, default=2)
  parser.add_argument("--tiny", action="store_true", help="smoke test: 3-layer random nets, 32x32")
  add_isa_argument(parser)
  args = parser.parse_args()
  print(use_isa(args.isa))
  import jax  # pylint: disable=g-import-not-at-top
  import wcdm_jax  # pylint: disable=g-import-not-at-top
  from wcdm_jax import models  # pylint: disable=g-import-not-at-top
  size = 32 if args.tiny else 160
  small = dict(num_layers=3, features=16) if args.tiny else {}
  cases = {"flat_celebA_160x160_gray_rf43": models.ModelSpec(
               low=models.flat_spec(5 if args.tiny else 43, **small), image_size=(size, size)),
           "ms_celebA_160x160_gray_rf13": models.multiscale_spec(
               2, cond_rf=5 if args.tiny else 13, low_rf=5 if args.tiny else 41,
               image_size=(size, size), **small,
               **({"low_num_layers": 3} if args.tiny else {}))}
  cfg = wcdm_jax.LikelihoodConfig(num_evals=args.num_evals)
  images = jax.random.uniform(jax.random.key(0), (args.batch, size, size, 1))
  rows = []
  for name, spec in cases.items():
    params, source = release_or_random(name, spec) if not args.tiny else (
        models.init_model(jax.random.key(0), spec), "random")
    run = lambda: wcdm_jax.log_prob(jax.random.key(1), params, images,
                                    config=cfg).bits_per_pixel.block_until_ready()
    t0 = time.perf_counter()
    run()
    compile_s = time.perf_counter() - t0
    dt = median_time(run, warmup=0, repeats=args.repeats)
    rows.append([f"{name} ({source})", f"{size}x{size}", args.batch, args.num_evals,
                 spec.levels + 1, f"{compile_s:.1f}", f"{dt:.1f}", 60 * args.batch / dt])
  print(table("log_prob speed", ["model", "size", "batch", "evals/scale", "scales",
                                 "first call s", "s per batch", "images/min"], rows))


if __name__ == "__main__":
  sys.exit(main())
