r"""Denoising PSNR of any set of models over a range of noise levels; JSON + figure.

  python launch/evaluate.py --models=models/flat_celebA_160x160_gray_rf9,models/ms_celebA_160x160_gray_rf9 \
      --images=folder:../shared/data/celeba-aligned --crop=celeba --image_size=160 --num_images=128 \
      --out=eval/celeba

Images are the first --num_images files (sorted by name) with the given preprocessing. Noise is
Gaussian with std --noise_levels (/255), drawn from fixed seeds, so runs are comparable. Writes
OUT/psnr.json, OUT/psnr.png (output PSNR against input PSNR, identity line, one curve per model,
flat and multi-scale panels) and, with --filters, OUT/filters.png (rows of each model's
Jacobian: the adaptive averaging it applies around a few pixels).

With --swd_samples, instead: the multi-scale sliced Wasserstein distance of sample sets
(sample.py's samples.npz) against --images, a sample-quality figure without ground truth, and
the layout distance (quality.layout: the coarse images' energy outside the reference's principal
images, which patches miss; needs 2 (--layout_components + 1) images):

  python launch/evaluate.py --swd_samples=models/ms_rf13/samples/samples.npz \
      --images=folder:../shared/data/celeba-aligned --crop=celeba --split=eval --num_images=256

With --nll, also the negative log-likelihood bound of every model on the same images, in bits
per pixel with its per-scale breakdown and standard errors (wcdm_jax.likelihood; the same
noise for every model, so differences are paired): OUT/nll.json and OUT/nll.png.

  python launch/evaluate.py --models=models/flat_celebA_160x160_gray_rf43,models/ms_celebA_160x160_gray_rf13 \
      --images=folder:../shared/data/celeba-aligned --crop=celeba --image_size=160 --num_images=32 \
      --nll --nopsnr --out=eval/nll
"""
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # pylint: disable=g-import-not-at-top

from launch import common, flagdefs, tasks  # pylint: disable=g-import-not-at-top
from wcdm_jax import likelihood  # pylint: disable=g-import-not-at-top

FLAGS = flags.FLAGS
flags.DEFINE_list("models", None, "Model directories (flat and/or multi-scale).")
flags.DEFINE_list("names", [], "Labels of the models (default: directory names).")
flags.DEFINE_string("images", "embedded", "'folder:/path', 'tfds:name[:split]', 'embedded' or "
                    "'deadleaves'.")
flags.DEFINE_enum("crop", "none", ["none", "celeba", "center"], "Crop before resizing.")
flags.DEFINE_integer("image_size", 0, "Image size (0 = the first model's training size).",
                     lower_bound=0)
flags.DEFINE_integer("num_images", 128, "How many images (first ones by name).", lower_bound=1)
flags.DEFINE_enum("split", "all", ["all", "eval", "train"], "Images of a folder or tfds "
                  "source: 'all' from the first file, 'eval', the held-out last --eval_fraction "
                  "that train.py leaves out, or 'train', the rest (to measure the gap). The "
                  "embedded photographs: crops of their held-out bottom quarters unless 'train'.")
flags.DEFINE_float("eval_fraction", 0.1, "With --split=eval: train.py's --eval_fraction.",
                   lower_bound=0.0, upper_bound=0.5)
flags.DEFINE_list("noise_levels", ["0", "5", "10", "20", "40", "60", "100", "160", "260", "400",
                                   "640"], "Noise stds in /255 units.")
flags.DEFINE_integer("seed", 0, "Noise seed.")
flags.DEFINE_integer("batch_size", 8, "Images per denoiser call.", lower_bound=1)
flags.DEFINE_string("out", "eval", "Output directory.")
flags.DEFINE_bool("filters", False, "Also plot adaptive filters (Jacobian rows).")
flags.DEFINE_float("filter_sigma", 60.0, "Noise std (/255) of the adaptive-filter figure.")
flags.DEFINE_bool("psnr", True, "Denoising PSNR curves (psnr.json, psnr.png).")
flags.DEFINE_bool("gaussian", True, "With --psnr: also the curve of the best Gaussian filter per "
                  "noise level (tuned on these very images), the baseline a denoiser must beat.")
flags.DEFINE_bool("nll", False, "Negative log-likelihood bound in bits per pixel (nll.json, "
                  "nll.png).")
flagdefs.define(likelihood.LikelihoodConfig, prefix="nll_", help_prefix="--nll: ")
flags.DEFINE_list("swd_samples", [], "Sample sets to judge instead of models: the multi-scale "
                  "sliced Wasserstein distance (wcdm_jax.quality) of each against --images "
                  "(same preprocessing): sample.py's samples.npz files (comma-separated). "
                  "Writes swd.json.")
flags.DEFINE_integer("swd_patches", 16384, "--swd_samples: 7x7 descriptors per set and level.",
                     lower_bound=1)
flags.DEFINE_integer("swd_directions", 512, "--swd_samples: random directions per level.",
                     lower_bound=1)
flags.DEFINE_integer("swd_bootstrap", 50, "--swd_samples: bootstrap resamples of the 95% "
                     "interval (0: none).", lower_bound=0)
flags.DEFINE_integer("layout_components", 16, "--swd_samples: principal images of the layout "
                     "distance (0: no layout distance).", lower_bound=0)


def _swd() -> None:
  """--swd_samples: each set's SWD against --images, into OUT/swd.json."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  from wcdm_jax import quality  # pylint: disable=g-import-not-at-top
  sets = {}
  for path in FLAGS.swd_samples:
    try:
      with np.load(path) as z:
        sets[path] = np.asarray(z["samples"], np.float32)
    except (OSError, ValueError, KeyError) as e:
      common.fail(f"--swd_samples={path}: not a samples.npz of sample.py with a 'samples' "
                  f"array ({type(e).__name__}: {e})")
  first = next(iter(sets.values()))
  size, channels = FLAGS.image_size or first.shape[1], first.shape[3]
  images = common.load_images(FLAGS.images, size, channels, FLAGS.crop, FLAGS.num_images,
                              FLAGS.split, FLAGS.eval_fraction)
  common.log(f"reference: {len(images)} images of {size}x{size} from {FLAGS.images}")
  need = quality.layout_reference_size(FLAGS.layout_components)
  if FLAGS.layout_components and len(images) < need:
    common.fail(f"--layout_components={FLAGS.layout_components} needs at least {need} reference "
                f"images, --images gave {len(images)}: raise --num_images or set "
                "--layout_components=0 (no layout distance)")
  out = {}
  for path, x in sets.items():
    try:
      d = quality.swd(x, images, seed=FLAGS.seed, patches=FLAGS.swd_patches,
                      directions=FLAGS.swd_directions, bootstrap=FLAGS.swd_bootstrap)
    except ValueError as e:
      common.fail(f"--swd_samples={path}: {e}")
    out[path] = {"swd": d.mean, "swd_ci": d.mean_ci, "per_level": d.per_level,
                 "per_level_ci": d.per_level_ci, "levels": d.levels, "num_samples": len(x)}
    ci = f" [{d.mean_ci[0] * 1e3:.2f}, {d.mean_ci[1] * 1e3:.2f}]" if d.mean_ci else ""
    line = f"{path}: SWD x1e3 {d.mean * 1e3:.2f}{ci}"
    if FLAGS.layout_components:
      lay = quality.layout(x, images, components=FLAGS.layout_components, seed=FLAGS.seed,
                           bootstrap=4 * FLAGS.swd_bootstrap)
      out[path].update(layout=lay.distance, layout_ci=lay.ci, layout_residual=lay.residual,
                       reference_residual=lay.reference_residual)
      line += (f"; layout x1e3 {lay.distance * 1e3:.1f} (residual {lay.residual:.3f}, the "
               f"reference's {lay.reference_residual:.3f})")
    common.log(line + "; SWD per level (finest first) " +
               " ".join(f"{v * 1e3:.2f}" for v in d.per_level))
  os.makedirs(FLAGS.out, exist_ok=True)
  with open(os.path.join(FLAGS.out, "swd.json"), "w") as f:
    json.dump({"images": FLAGS.images, "num_images": len(images), "image_size": size,
               "split": FLAGS.split, "seed": FLAGS.seed, "sets": out}, f, indent=1)
  common.log(f"wrote {os.path.join(FLAGS.out, 'swd.json')}")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  common.setup_logging()
  common.check_native_setting()
  mesh = common.local_mesh()  # every local device: batches are split over them
  from launch import plots  # pylint: disable=g-import-not-at-top
  if FLAGS.swd_samples:
    if FLAGS.models:
      raise app.UsageError("--swd_samples judges sample sets, --models models: give one of them")
    return _swd()
  if not FLAGS.models:
    raise app.UsageError("--models is required (or --swd_samples to judge sample sets)")
  if not (FLAGS.psnr or FLAGS.nll):
    raise app.UsageError("--nopsnr without --nll leaves nothing to evaluate")
  nll_cfg = None
  if FLAGS.nll:
    try:
      nll_cfg = flagdefs.build(likelihood.LikelihoodConfig, flagdefs.overrides(
          likelihood.LikelihoodConfig, prefix="nll_"), flagdefs.flag_names(
              likelihood.LikelihoodConfig, "nll_"))
    except ValueError as e:
      raise app.UsageError(str(e)) from e
  names = FLAGS.names or [os.path.basename(os.path.normpath(m)) for m in FLAGS.models]
  if len(names) != len(FLAGS.models):
    raise app.UsageError("--names needs one label per --models entry")
  try:
    levels = [float(v) for v in FLAGS.noise_levels]
  except ValueError as e:
    raise app.UsageError(f"--noise_levels: {e}") from e
  models = {n: common.load_model(m, mesh) for n, m in zip(names, FLAGS.models)}
  size = FLAGS.image_size or next(iter(models.values())).spec.image_size[0]
  channels = next(iter(models.values())).spec.channels
  images = common.load_images(FLAGS.images, size, channels, FLAGS.crop, FLAGS.num_images,
                              FLAGS.split, FLAGS.eval_fraction)
  common.log(f"{len(images)} images of {size}x{size} from {FLAGS.images}")
  os.makedirs(FLAGS.out, exist_ok=True)
  if FLAGS.nll:
    nll = {}
    for name, params in models.items():
      r = likelihood.dataset_log_prob(params, images, seed=FLAGS.seed, config=nll_cfg,
                                      batch_size=FLAGS.batch_size, mesh=mesh)
      common.require_finite(f"the log-likelihood of model {name!r}", r["bits_per_pixel"])
      r["kind"] = "multi-scale" if params.spec.levels else "flat"
      nll[name] = r
      terms = ", ".join(f"{k} {v:.3f}" for k, v in r["scales"].items())
      common.log(f"{name}: {r['bits_per_pixel']:.4f} bits/pixel (Monte Carlo s.e. "
                 f"{r['mc_stderr']:.4f}, over images {r['stderr_over_images']:.4f}; "
                 f"reconstruction cuts chosen, /255: {r['cut_255']}); {terms}; "
                 f"at each cut: " + " ".join(f"{t:g}:{v:.3f}" for t, v in zip(
                     r["scan"]["sigma_min_255"], r["scan"]["bits_per_pixel"])))
    with open(os.path.join(FLAGS.out, "nll.json"), "w") as f:
      json.dump({"images": FLAGS.images, "num_images": len(images), "image_size": size,
                 "split": FLAGS.split, "models": nll}, f, indent=1)
    common.log("wrote " + plots.likelihood_bars(nll, os.path.join(FLAGS.out, "nll.png")))
    common.log(f"wrote {os.path.join(FLAGS.out, 'nll.json')}")
  if not FLAGS.psnr:
    return
  tasks.write_psnr(models, images, levels, FLAGS.out, seed=FLAGS.seed,
                   batch_size=FLAGS.batch_size, gaussian=FLAGS.gaussian, mesh=mesh,
                   record={"images": FLAGS.images, "image_size": size, "split": FLAGS.split})
  if FLAGS.filters:
    path = plots.adaptive_filter_figure(models, images[0], FLAGS.filter_sigma / 255,
                                        os.path.join(FLAGS.out, "filters.png"), FLAGS.seed)
    common.log("wrote " + path)


if __name__ == "__main__":
  app.run(main)
