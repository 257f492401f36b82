r"""Peak memory of one training step of the conditional RF 9 net at 80x80, batch 512.

  python benchmarks/bench_memory.py [--batch=512] [--size=80]

Figures come from XLA's buffer assignment of the compiled step (no execution, so the paper's
batch fits any machine): temporaries (activations kept for the backward pass and workspace)
plus arguments and outputs not aliased by donation. With --remat each block's activations are
recomputed in the backward pass instead of kept.
"""
import argparse

from common import jax_train_step, table

import jax  # pylint: disable=g-import-not-at-top
import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

from wcdm_jax import models  # pylint: disable=g-import-not-at-top


def step_memory(spec, batch, size, remat):
  tx, step = jax_train_step(spec, remat=remat)
  v = jax.eval_shape(lambda: models.init_net(jax.random.key(0), spec))
  opt = jax.eval_shape(tx.init, v["params"])
  noisy = jax.ShapeDtypeStruct((batch, size, size, spec.in_channels), jnp.float32)
  noise = jax.ShapeDtypeStruct((batch, size, size, spec.out_channels), jnp.float32)
  m = step.lower(v["params"], v["batch_stats"], opt, noisy, noise).compile().memory_analysis()
  peak = m.temp_size_in_bytes + m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
  return m.temp_size_in_bytes, peak


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--batch", type=int, default=512)
  parser.add_argument("--size", type=int, default=80)
  args = parser.parse_args()
  spec = models.cond_spec(0, 9)
  rows, peaks = [], {}
  for remat in (False, True):
    temp, peak = step_memory(spec, args.batch, args.size, remat)
    peaks[remat] = peak
    rows.append(["remat" if remat else "no remat", f"{temp / 2**30:.2f}", f"{peak / 2**30:.2f}"])
  rows[1].append(f"{1 - peaks[True] / peaks[False]:.0%} less")
  rows[0].append("")
  print(table(f"Train step memory, conditional RF 9, {args.size}x{args.size}, batch {args.batch} "
              f"({jax.devices()[0].platform})", ["", "temporaries (GiB)", "peak (GiB)", "saving"], rows))


if __name__ == "__main__":
  main()
