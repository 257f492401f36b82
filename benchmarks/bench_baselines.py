r"""How high the quickstart's bar is: its held-out crops denoised by classical baselines.

  python benchmarks/bench_baselines.py                        # noisy, best Gaussian, BM3D
  python benchmarks/bench_baselines.py --models=workdirs/quickstart
  python benchmarks/bench_baselines.py --data=embedded        # the photographs' held-out crops

The images and noise are exactly those of the trainer's final comparison for ``--seed``
(``trainer.held_out_images``, ``trainer.comparison_key``, ``evaluation.noisy_copies``), so the
rows line up with the last lines of a training log. Baselines: the noisy input; the Gaussian
filter of the best of ``evaluation.GAUSSIAN_WIDTHS`` for these very images (the trainer's); and
BM3D (the ``bm3d`` package from PyPI, optional: ``pip install bm3d``) given the true noise std,
an oracle-σ classical denoiser that a learned blind denoiser trained for minutes is not
expected to reach. ``--models``: trained workdirs (or release names) denoised on the same images.
"""
import argparse

from common import table

import jax  # pylint: disable=g-import-not-at-top
import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
import numpy as np  # pylint: disable=g-import-not-at-top

import wcdm_jax  # pylint: disable=g-import-not-at-top
from wcdm_jax import data, evaluation, trainer  # pylint: disable=g-import-not-at-top


def bm3d_denoiser():
  """BM3D on (B, H, W, 1) float arrays at a known std, or None when the package is absent."""
  try:
    import bm3d  # pylint: disable=g-import-not-at-top
  except ImportError:
    return None
  return lambda y, s: np.stack([bm3d.bm3d(im[..., 0], s)[..., None] for im in np.asarray(y)])


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--data", default="deadleaves", help="the run's --data (the quickstart's)")
  parser.add_argument("--image_size", type=int, default=64)
  parser.add_argument("--num_images", type=int, default=16, help="the trainer's eval_batch_size")
  parser.add_argument("--seed", type=int, default=0, help="the training run's --seed")
  parser.add_argument("--sigmas", default="0.02,0.05,0.1,0.2")
  parser.add_argument("--models", default="", help="comma-separated workdirs or release names")
  args = parser.parse_args()
  sigmas = [float(s) for s in args.sigmas.split(",")]
  cfg = data.DataConfig(args.data, args.image_size, 1)
  clean = trainer.held_out_images(cfg, args.num_images, args.seed)
  noisy = evaluation.noisy_copies(clean, sigmas, trainer.comparison_key(args.seed))
  score = lambda x: float(evaluation.psnr(jnp.asarray(x, jnp.float32), clean).mean())
  rows = {"noisy": [score(y) for y in noisy],
          "best Gaussian filter": [evaluation.best_gaussian_psnr(y, clean)[0] for y in noisy]}
  bm3d = bm3d_denoiser()
  if bm3d is None:
    print("bm3d not installed (pip install bm3d): its row is left out")
  else:
    rows["BM3D (true noise std)"] = [score(bm3d(y, s)) for y, s in zip(noisy, sigmas)]
  for name in filter(None, args.models.split(",")):
    try:
      params = wcdm_jax.load_params(name)
    except (OSError, ValueError) as e:
      parser.error(f"--models: {e}")
    den = jax.jit(lambda y, p=params: wcdm_jax.denoise(p, y))
    rows[name] = [score(den(y)) for y in noisy]
  gauss = rows["best Gaussian filter"]
  print(table(f"{args.num_images} held-out crops of {args.data} at {args.image_size}x"
              f"{args.image_size}, the trainer's noise for seed {args.seed}: PSNR (dB) "
              "(minus the Gaussian filter's)", ["denoiser"] + [f"σ={s}" for s in sigmas],
              [[name] + [f"{v:.2f} ({v - g:+.2f})" for v, g in zip(vals, gauss)]
               for name, vals in rows.items()]))


if __name__ == "__main__":
  main()
