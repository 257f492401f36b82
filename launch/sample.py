r"""Sample, super-resolve and denoise with a trained or imported model; writes PNGs and .npz.

  python launch/sample.py --flagfile=launch/configs/quickstart_sample.flags
  python launch/sample.py --flagfile=launch/configs/release_sample.flags \
      --model=models/ms_celebA_160x160_gray_rf13

Outputs in --out: samples.png (grid), progression.png (low-pass, then each finer scale),
superres.png and denoising.png when --images is given, samples.npz (raw arrays) and
samples.json (per scale: steps taken, how many samples stopped at the step cap before their
stop rule or aborted; the PSNRs).
"""
import dataclasses
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # pylint: disable=g-import-not-at-top

from launch import common, flagdefs, tasks  # pylint: disable=g-import-not-at-top
from wcdm_jax import sampling  # pylint: disable=g-import-not-at-top

FLAGS = flags.FLAGS
flags.DEFINE_string("model", None, "Model directory (training workdir or imported model).")
flags.mark_flag_as_required("model")
flags.DEFINE_string("out", None, "Output directory (default: MODEL/samples).")
flags.DEFINE_integer("num_samples", 8, "Unconditional samples to draw (0 = none).", lower_bound=0)
flags.DEFINE_integer("seed", 0, "Seed of the sampler.")
flags.DEFINE_integer("image_size", 0, "Sample size (0 = the model's training size).",
                     lower_bound=0)
flags.DEFINE_list("low_rescale", [], "Per-image min-max rescale of the sampled low-pass, e.g. "
                  "0,0.8 (the release's); empty = none.")
# Each scale's sampler: the stochastic ascent (sampling.AscentConfig's fields, launch/flagdefs.py)
# or the probability flow (sampling.FlowConfig's, as --*_flow_*): --low_* for the low-pass (or
# flat) scale, --cond_* for the conditional ones. Defaults: the library's (sampling.DEFAULT_LOW;
# the release's conditional ascents); the conditional flows' are sampling.FAST_COND's.
flags.DEFINE_enum("low_sampler", "ascent", ["ascent", "flow"], "Low-pass (or flat) scale: the "
                  "stochastic ascent (--low_*) or the probability flow (--low_flow_*).")
flags.DEFINE_enum("cond_sampler", "ascent", ["ascent", "flow"], "Conditional scales: the "
                  "stochastic ascent (--cond_*) or the probability flow (--cond_flow_*).")
flagdefs.define(sampling.AscentConfig, prefix="low_", skip=("flip_average",),
                defaults=sampling.DEFAULT_LOW, help_prefix="Low-pass ascent: ")
flagdefs.define(sampling.AscentConfig, prefix="cond_", skip=("flip_average", "mean_0"),
                defaults=sampling.RELEASE_COND, help_prefix="Conditional ascents: ")
flagdefs.define(sampling.FlowConfig, prefix="low_flow_", skip=("flip_average",),
                defaults=sampling.FlowConfig(mean_0=0.5), help_prefix="Low-pass flow: ")
flagdefs.define(sampling.FlowConfig, prefix="cond_flow_", skip=("flip_average", "mean_0"),
                defaults=sampling.FAST_COND, help_prefix="Conditional flows: ")
flags.DEFINE_float("cond_sigma_L_finest", sampling.RELEASE_COND_FINEST.sigma_L,
                   "Final noise level at the finest level.")
flags.DEFINE_bool("flip_average", False, "Every scale's ascent uses the net's residual averaged "
                  "with its mirror image's (the score of a left-right symmetric distribution; "
                  "removes a border column that undertrained nets' asymmetry grows; 2x the "
                  "cost; conditional scales need the Haar wavelet).")
flags.DEFINE_integer("time_repeats", 0, "Re-run the sampling this many times and report the "
                     "steady-state speed (without compilation).", lower_bound=0)
flags.DEFINE_string("images", "", "Images for super-resolution and denoising examples: "
                    "'embedded', 'deadleaves', 'folder:/path' or 'tfds:name[:split]' (empty = "
                    "skip).")
flags.DEFINE_integer("num_images", 4, "How many of --images to use.", lower_bound=1)
flags.DEFINE_enum("crop", "none", ["none", "celeba", "center"], "Crop of --images.")
flags.DEFINE_list("noise_sigmas", ["0.1", "0.2"], "Noise stds of the denoising examples.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}; every option is a --flag")
  common.setup_logging()
  common.check_native_setting()
  mesh = common.local_mesh()  # every local device: batches are split over them
  try:
    config = lambda cls, prefix, skip: flagdefs.build(
        cls, dict(flagdefs.overrides(cls, prefix=prefix, skip=skip),
                  flip_average=FLAGS.flip_average), flagdefs.flag_names(cls, prefix))
    low_cfg = (config(sampling.FlowConfig, "low_flow_", ("flip_average",))
               if FLAGS.low_sampler == "flow" else
               config(sampling.AscentConfig, "low_", ("flip_average",)))
    cond = (config(sampling.FlowConfig, "cond_flow_", ("flip_average", "mean_0"))
            if FLAGS.cond_sampler == "flow" else
            config(sampling.AscentConfig, "cond_", ("flip_average", "mean_0")))
    rescale = tuple(float(v) for v in FLAGS.low_rescale) or None
    sigmas = [float(s) for s in FLAGS.noise_sigmas]
  except ValueError as e:
    raise app.UsageError(str(e)) from e
  if rescale is not None and len(rescale) != 2:
    raise app.UsageError("--low_rescale takes two numbers, e.g. 0,0.8")
  params = common.load_model(FLAGS.model, mesh)
  conds = [dataclasses.replace(cond, sigma_L=FLAGS.cond_sigma_L_finest)
           if j == 0 and FLAGS.cond_sampler == "ascent" else cond
           for j in range(params.spec.levels)]
  # A model with recommended settings (sampling.json, e.g. an imported release model) samples
  # with them unless a flag of that scale is given.
  given = lambda *names: any(common.set_explicitly(FLAGS, n) for n in names if n in FLAGS)
  flag_names = lambda cls, prefix: flagdefs.flag_names(cls, prefix).values()
  if params.sampling is not None:
    if not given("low_sampler", "flip_average", *flag_names(sampling.AscentConfig, "low_"),
                 *flag_names(sampling.FlowConfig, "low_flow_")):
      low_cfg = None
    if not given("cond_sampler", "flip_average", "cond_sigma_L_finest",
                 *flag_names(sampling.AscentConfig, "cond_"),
                 *flag_names(sampling.FlowConfig, "cond_flow_")):
      conds = None
    if not given("low_rescale"):
      rescale = sampling.MODEL
    used = [k for k, v in (("the low-pass", low_cfg), ("the details", conds),
                           ("the rescale", rescale)) if v is None or v == sampling.MODEL]
    if used:
      common.log(f"{FLAGS.model} recommends its sampling settings (sampling.json); used for "
                 f"{', '.join(used)} (flags override them)")
  job = tasks.SampleJob(FLAGS.num_samples, FLAGS.seed, FLAGS.image_size, low_cfg, conds, rescale,
                        FLAGS.images, FLAGS.num_images, FLAGS.crop, sigmas, FLAGS.time_repeats)
  try:
    tasks.write_samples(params, FLAGS.out or os.path.join(FLAGS.model, "samples"), job, mesh)
  except ValueError as e:
    common.fail(e)


if __name__ == "__main__":
  app.run(main)
