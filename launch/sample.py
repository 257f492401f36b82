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
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # pylint: disable=g-import-not-at-top

from launch import common, flagdefs  # pylint: disable=g-import-not-at-top
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
# The ascents' settings are sampling.AscentConfig's fields (launch/flagdefs.py), with the
# release's values as defaults: --low_* for the low-pass (or flat) scale, --cond_* for the
# conditional ones.
flagdefs.define(sampling.AscentConfig, prefix="low_", skip=("flip_average",),
                defaults=sampling.RELEASE_LOW, help_prefix="Low-pass ascent: ")
flagdefs.define(sampling.AscentConfig, prefix="cond_", skip=("flip_average", "mean_0"),
                defaults=sampling.RELEASE_COND, help_prefix="Conditional ascents: ")
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
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  import wcdm_jax  # pylint: disable=g-import-not-at-top
  from wcdm_jax import data, evaluation, reporting  # pylint: disable=g-import-not-at-top

  try:
    ascent = lambda prefix, skip: flagdefs.build(
        sampling.AscentConfig, dict(flagdefs.overrides(sampling.AscentConfig, prefix=prefix,
                                                       skip=skip),
                                    flip_average=FLAGS.flip_average),
        flagdefs.flag_names(sampling.AscentConfig, prefix))
    low_cfg = ascent("low_", ("flip_average",))
    cond = ascent("cond_", ("flip_average", "mean_0"))
    rescale = tuple(float(v) for v in FLAGS.low_rescale) or None
    sigmas = [float(s) for s in FLAGS.noise_sigmas]
  except ValueError as e:
    raise app.UsageError(str(e)) from e
  if rescale is not None and len(rescale) != 2:
    raise app.UsageError("--low_rescale takes two numbers, e.g. 0,0.8")
  params = common.load_model(FLAGS.model, mesh)
  spec = params.spec
  conds = [dataclasses.replace(cond, sigma_L=FLAGS.cond_sigma_L_finest) if j == 0 else cond
           for j in range(spec.levels)]
  size = (FLAGS.image_size,) * 2 if FLAGS.image_size else spec.image_size
  if spec.levels and spec.mode == wcdm_jax.wavelets.PERIODIZATION:
    try:  # before anything is written
      wcdm_jax.wavelets.check_size(*size, spec.levels)
    except ValueError as e:
      common.fail(f"--image_size={size[0]}: {e}")
  if (FLAGS.flip_average and spec.levels
      and wcdm_jax.wavelets.mirror_signs(spec.wavelet, spec.channels) is None):
    common.fail(f"--flip_average: the conditional scales need a wavelet whose bands mirror "
                f"with the image (Haar); this model's is {spec.wavelet!r}")
  out = FLAGS.out or os.path.join(FLAGS.model, "samples")
  os.makedirs(out, exist_ok=True)

  def save_grid(name, rows):  # rows of (h, w, C) images -> OUT/name
    rows = [[np.asarray(img) for img in row] for row in rows]
    common.log("wrote " + reporting.save_png(os.path.join(out, name),
                                             reporting.image_grid(rows, upscale=2)))

  src = None
  if FLAGS.images:  # checked before the (long) sampling
    try:
      src = data.make_source(data.DataConfig(FLAGS.images, size[0], spec.channels, FLAGS.crop,
                                             flips=False), FLAGS.num_images, FLAGS.seed, "eval")
    except (ValueError, ImportError) as e:
      common.fail(f"--images={FLAGS.images}: {e}")
  arrays, summary = {}, {}

  def ascent_report(what, infos, names, caps):  # per-scale convergence: log + samples.json
    scales = []
    for info, name, cap in zip(infos, names, caps):
      steps = np.asarray(info.steps)
      capped = int(np.sum(~np.asarray(info.converged) & ~np.asarray(info.aborted)))
      scales.append(dict(scale=name, max_steps=cap, steps=steps.tolist(), hit_step_cap=capped,
                         aborted=int(np.sum(info.aborted)), converged=int(np.sum(info.converged))))
    summary[what] = scales
    line = "; ".join(f"{s['scale']}: steps {min(s['steps'])}-{max(s['steps'])}" +
                     (f", {s['hit_step_cap']} of {len(s['steps'])} hit the step cap "
                      f"{s['max_steps']} before sigma_L" if s["hit_step_cap"] else "") +
                     (f", {s['aborted']} aborted" if s["aborted"] else "") for s in scales)
    common.log(f"{what} (coarse first): {line}")
    bad = [s["scale"] for s in scales if s["hit_step_cap"] or s["aborted"]]
    if bad:
      common.log(f"warning: {what} did not converge at {', '.join(bad)} for some samples; raise "
                 "--low_max_steps / --cond_max_steps or the step size h0")
    return bool(bad)

  level_names = [f"level {j}" for j in reversed(range(spec.levels))]
  level_caps = [c.max_steps for c in reversed(conds)]
  stages = (1 if FLAGS.num_samples else 0) + (2 if FLAGS.images else 0)
  bar = reporting.ProgressBar(stages, "sample")
  done = 0
  if FLAGS.num_samples:
    t0 = time.time()
    common.log(f"sampling {FLAGS.num_samples} images of {size[0]}x{size[1]} "
               f"({spec.levels} levels)")
    run = lambda: sampling.sample(
        jax.random.key(FLAGS.seed), params, FLAGS.num_samples, image_size=size,
        low_config=low_cfg, cond_config=conds, low_rescale=rescale, return_intermediates=True,
        mesh=mesh)
    images, scales, infos = run()
    images.block_until_ready()
    dt = time.time() - t0
    common.require_finite("the samples", images)
    common.log(f"{FLAGS.num_samples} samples in {dt:.1f} s, compilation included "
               f"({60 * FLAGS.num_samples / dt:.1f} images/min)")
    ascent_report("sampling", infos, ["low-pass" if spec.levels else "flat"] + level_names,
                  [low_cfg.max_steps] + level_caps)
    if FLAGS.time_repeats:
      t0 = time.time()
      for _ in range(FLAGS.time_repeats):
        run()[0].block_until_ready()
      dt = (time.time() - t0) / FLAGS.time_repeats
      common.log(f"steady state: {dt:.2f} s per batch of {FLAGS.num_samples} = "
                 f"{60 * FLAGS.num_samples / dt:.1f} images/min")
    arrays.update(samples=np.asarray(images), **{f"scale_{k}": np.asarray(s)
                                                 for k, s in enumerate(scales)})
    save_grid("samples.png", [images])
    save_grid("progression.png", [[s[i] for s in scales] for i in range(min(4, FLAGS.num_samples))])
    done += 1
    bar.update(done)
  if FLAGS.images:
    clean = jnp.asarray(src.batch(0))
    arrays["clean"] = np.asarray(clean)
    rows = [clean]
    if spec.levels:
      low = wcdm_jax.decompose(clean, spec.levels, spec.wavelet, spec.mode).low
      sr, _, sr_infos = sampling.super_resolve(jax.random.key(FLAGS.seed + 1), params, low,
                                               cond_config=conds, return_intermediates=True,
                                               mesh=mesh)
      common.require_finite("the super-resolved images", sr)
      arrays.update(low_res=np.asarray(low), super_resolved=np.asarray(sr))
      rows += [low, sr]
      capped = ascent_report(f"super-resolution x{2 ** spec.levels}", sr_infos, level_names,
                             level_caps)
      sr_psnr = float(evaluation.psnr(sr, clean).mean())
      summary["superres_psnr"] = sr_psnr
      common.log(f"super-resolution x{2 ** spec.levels}: PSNR {sr_psnr:.2f} dB (a sample, not an "
                 "estimate" + ("; NOT converged, see above)" if capped else ")"))
      save_grid("superres.png", rows)
    done += 1
    bar.update(done)
    rows = [clean]
    for i, s in enumerate(sigmas):
      noisy = clean + s * jax.random.normal(jax.random.key(100 + i), clean.shape)
      den = wcdm_jax.denoise(params, noisy, mesh=mesh)
      common.require_finite(f"the denoised images (sigma {s})", den)
      arrays[f"noisy_{s}"], arrays[f"denoised_{s}"] = np.asarray(noisy), np.asarray(den)
      rows += [noisy, den]
      p_in, p_out = (float(evaluation.psnr(v, clean).mean()) for v in (noisy, den))
      summary.setdefault("denoising", []).append(dict(sigma=s, noisy_psnr=p_in, psnr=p_out))
      common.log(f"denoising sigma={s}: {p_in:.2f} dB -> {p_out:.2f} dB")
    save_grid("denoising.png", rows)
    done += 1
    bar.update(done)
  bar.close()
  np.savez(os.path.join(out, "samples.npz"), **arrays)
  with open(os.path.join(out, "samples.json"), "w") as f:
    json.dump(summary, f, indent=1)
  common.log(f"wrote {os.path.join(out, 'samples.npz')} and samples.json")


if __name__ == "__main__":
  app.run(main)
