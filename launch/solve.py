r"""Linear inverse problems with one or several priors (flat and/or multi-scale); PNG + JSON.

  python launch/solve.py --flagfile=launch/configs/inverse_celeba.flags --task=inpaint
  python launch/solve.py --task=sr --factor=4 --models=models/flat_celebA_160x160_gray_rf43,\
models/ms_celebA_160x160_gray_rf13 --images=folder:../shared/data/celeba-aligned --crop=celeba \
      --image_size=160 --num_images=8 --out=inverse/sr4

Tasks: inpaint (a centred --box hole), pixels (--fraction of the pixels), sr (--factor x
block averages), deblur (the lowest --fraction of the DFT coefficients), cs (--fraction random
orthonormal projections). Writes OUT/grid_NNN.png per image (original, M M^T x, one column per
prior) and OUT/results.json (PSNR and SSIM per image and mean, the M M^T x baseline, steps,
aborted/converged counts and wall time per prior).
"""
import dataclasses
import functools
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # pylint: disable=g-import-not-at-top

from launch import common, flagdefs  # pylint: disable=g-import-not-at-top
from wcdm_jax import inverse, sampling  # pylint: disable=g-import-not-at-top
from wcdm_jax.inverse.solver import SolverConfig  # pylint: disable=g-import-not-at-top

FLAGS = flags.FLAGS
flags.DEFINE_enum("task", None, ["inpaint", "pixels", "sr", "deblur", "cs"], "The problem.")
flags.DEFINE_list("models", None, "Model directories (flat and/or multi-scale) = the priors.")
flags.DEFINE_list("names", [], "Labels of the models (default: directory names).")
flags.DEFINE_list("methods", [], "Per model: auto | plugin | coarse_to_fine (default auto: "
                  "coarse-to-fine for sr with factor 2^J on a J-level model).")
flags.DEFINE_string("images", "embedded", "'folder:/path', 'tfds:name[:split]', 'embedded', "
                    "'deadleaves', or 'npz:/path/samples.npz[:key]' (e.g. model samples from "
                    "sample.py).")
flags.DEFINE_enum("crop", "none", ["none", "celeba", "center"], "Crop before resizing.")
flags.DEFINE_integer("image_size", 0, "Image size (0 = the first model's training size).",
                     lower_bound=0)
flags.DEFINE_integer("num_images", 8, "How many images (first ones by name).", lower_bound=1)
flags.DEFINE_integer("batch_size", 8, "Images solved together (one lax.scan).", lower_bound=1)
flags.DEFINE_integer("box", 40, "inpaint: side of the centred hole (pixels).", lower_bound=1)
flags.DEFINE_float("fraction", 0.1, "pixels / deblur / cs: measured fraction, in (0, 1].")
flags.DEFINE_integer("factor", 4, "sr: block size.", lower_bound=2)
flags.DEFINE_enum("cs_kind", "auto", ["auto", "dense", "fast"], "cs: projection matrix.")
flags.DEFINE_enum("band", "hermitian", ["hermitian", "original"], "deblur: frequency band.")
flags.DEFINE_bool("original", False, "Use the original code's settings (beta 0.01, no final "
                  "projection, no abort) with --max_steps as the cap; solver flags given "
                  "explicitly override them.")
# The solver's settings (wcdm_jax.inverse.SolverConfig): --project, and its sampler: the
# constrained ascent (sampling.AscentConfig's fields, inverse.DEFAULT_ASCENT's values as
# defaults, --beta by operator unless given) or the constrained flow (--flow_*).
flagdefs.define(SolverConfig, skip=("method",))
flags.DEFINE_enum("sampler", "ascent", ["ascent", "flow"], "The constrained stochastic ascent "
                  "(--h0, --beta, ...) or the constrained probability flow (--flow_*).")
flagdefs.define(sampling.AscentConfig, skip=("beta", "flip_average"),
                defaults=inverse.DEFAULT_ASCENT, help_prefix="Ascent: ")
flags.DEFINE_string("beta", "auto", "Ascent: injected noise, in (0, 1] (1 = none); auto: by "
                    "operator (0.1 for a hole, 0.05 for spread measurements; the original's "
                    "0.01 with --original).")
flagdefs.define(sampling.FlowConfig, prefix="flow_", skip=("flip_average",),
                defaults=sampling.FlowConfig(mean_0=0.5), help_prefix="Flow: ")
flags.DEFINE_integer("seed", 0, "Seed of the operator (random tasks) and of the solver.")
flags.DEFINE_string("out", None, "Output directory.")
flags.mark_flags_as_required(["task", "models", "out"])


def make_operator(task: str, shape, key):
  """The task's operator for (H, W, C) images (flags give its parameters)."""
  from wcdm_jax import inverse  # pylint: disable=g-import-not-at-top
  if task == "inpaint":
    return inverse.Inpainting(inverse.box_mask(shape[:2], FLAGS.box), channels=shape[2])
  if task == "pixels":
    return inverse.RandomPixels(FLAGS.fraction, key, shape)
  if task == "sr":
    return inverse.BlockAverage(FLAGS.factor, shape)
  if task == "deblur":
    return inverse.SpectralLowpass(FLAGS.fraction, FLAGS.band, shape)
  return inverse.RandomProjection(FLAGS.fraction, key, shape, FLAGS.cs_kind)


def solver_config() -> tuple[SolverConfig, bool]:
  """The flags' SolverConfig, and whether its ascent's beta is still to be chosen by operator
  (--beta=auto without --original). A ValueError names the flag."""
  if FLAGS.sampler == "flow":
    sampler = flagdefs.build(sampling.FlowConfig, flagdefs.overrides(
        sampling.FlowConfig, prefix="flow_", skip=("flip_average",)),
                             flagdefs.flag_names(sampling.FlowConfig, "flow_"))
  else:
    given = flagdefs.overrides(sampling.AscentConfig, skip=("beta", "flip_average"))
    base = inverse.ORIGINAL.sampler if FLAGS.original else inverse.DEFAULT_ASCENT
    if FLAGS.original:  # the original code's settings, but the step cap and explicit flags
      given = {k: v for k, v in given.items()
               if k == "max_steps" or common.set_explicitly(FLAGS, k)}
    if FLAGS.beta != "auto":
      try:
        given["beta"] = float(FLAGS.beta)
      except ValueError:
        raise ValueError(f"--beta={FLAGS.beta}: give a number in (0, 1] or auto") from None
    sampler = flagdefs.build(functools.partial(dataclasses.replace, base), given)
  project = FLAGS.project if not FLAGS.original or common.set_explicitly(FLAGS, "project") \
      else inverse.ORIGINAL.project
  by_operator = FLAGS.sampler == "ascent" and FLAGS.beta == "auto" and not FLAGS.original
  return SolverConfig(sampler=sampler, project=project), by_operator


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}; every option is a --flag")
  common.setup_logging()
  common.check_native_setting()
  mesh = common.local_mesh()  # every local device: batches are split over them
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from wcdm_jax import evaluation, reporting  # pylint: disable=g-import-not-at-top

  names = FLAGS.names or [os.path.basename(os.path.normpath(m)) for m in FLAGS.models]
  if len(names) != len(FLAGS.models) or len(set(names)) != len(names):
    raise app.UsageError("--names needs one distinct label per --models entry")
  methods = FLAGS.methods or ["auto"] * len(FLAGS.models)
  if len(methods) != len(FLAGS.models):
    raise app.UsageError("--methods needs one entry per --models entry")
  try:
    base, by_operator = solver_config()
  except ValueError as e:
    raise app.UsageError(str(e)) from e
  priors = {n: common.load_model(m, mesh) for n, m in zip(names, FLAGS.models)}
  first = next(iter(priors.values())).spec
  size = FLAGS.image_size or first.image_size[0]
  shape = (size, size, first.channels)
  try:  # every check before any compute or output
    op = make_operator(FLAGS.task, shape, jax.random.key(FLAGS.seed))  # checked against each prior below
    if by_operator:  # --beta=auto
      base = dataclasses.replace(base, sampler=dataclasses.replace(
          base.sampler, beta=inverse.solver.default_beta(op)))
    configs = [dataclasses.replace(base, method=m) for m in methods]
    for (name, params), cfg in zip(priors.items(), configs):
      if params.spec.channels != first.channels:
        raise ValueError(f"model {name!r} takes {params.spec.channels} channels, the first "
                         f"{first.channels}: compare models of one kind")
      inverse.solver.check_problem(params, op, shape, cfg)
  except ValueError as e:
    common.fail(e)
  images = common.load_images(FLAGS.images, size, first.channels, FLAGS.crop, FLAGS.num_images)
  common.log(f"{len(images)} images of {size}x{size} from {FLAGS.images}; task {FLAGS.task}: "
             f"{op!r}")
  clean = jnp.asarray(images)
  measured = op.forward(clean)
  baseline = np.asarray(op.project(clean))
  task_args = {"inpaint": {"box": FLAGS.box}, "pixels": {"fraction": FLAGS.fraction},
               "sr": {"factor": FLAGS.factor}, "deblur": {"fraction": FLAGS.fraction,
                                                          "band": FLAGS.band},
               "cs": {"fraction": FLAGS.fraction, "cs_kind": FLAGS.cs_kind}}[FLAGS.task]
  results = {"task": FLAGS.task, "task_args": task_args, "operator": repr(op),
             "images": FLAGS.images,
             "num_images": len(images), "image_size": size, "seed": FLAGS.seed,
             "baseline": {"psnr": np.asarray(evaluation.psnr(baseline, clean)).tolist(),
                          "ssim": np.asarray(evaluation.ssim(baseline, clean)).tolist()},
             "priors": {}}
  outputs = {}
  keys = jax.random.split(jax.random.key(FLAGS.seed + 1), len(images))
  for (name, params), cfg in zip(priors.items(), configs):
    t0 = time.time()
    parts, steps, aborted, converged = [], [], 0, 0
    for start in range(0, len(images), FLAGS.batch_size):
      sl = slice(start, start + FLAGS.batch_size)
      x, info = inverse.solve(keys[sl], params, op, measured[sl], config=cfg, return_info=True,
                              mesh=mesh)
      infos = info if isinstance(info, list) else [info]
      parts.append(np.asarray(x))
      steps.append(np.sum([np.asarray(i.steps) for i in infos], 0))
      aborted += int(np.sum(np.any([np.asarray(i.aborted) for i in infos], 0)))
      converged += int(np.sum(np.all([np.asarray(i.converged) for i in infos], 0)))
    x = np.concatenate(parts)
    wall = time.time() - t0
    common.require_finite(f"the solutions of prior {name!r}", x)
    outputs[name] = x
    p = np.asarray(evaluation.psnr(x, clean))
    s = np.asarray(evaluation.ssim(x, clean))
    steps = np.concatenate(steps)
    results["priors"][name] = {
        "model": FLAGS.models[names.index(name)],
        "solver": ("coarse_to_fine (conditional ascents: cond_config, default the release's)"
                   if inverse.solver.uses_coarse_to_fine(params, op, cfg) else "plugin"),
        "config": dataclasses.asdict(inverse.solver.resolve(cfg, op)),
        "psnr": p.tolist(), "ssim": s.tolist(), "psnr_mean": float(p.mean()),
        "ssim_mean": float(s.mean()), "steps": steps.tolist(), "aborted": aborted,
        "converged": converged, "wall_s": wall, "s_per_image": wall / len(images),
        "consistency": float(np.mean(np.linalg.norm(np.asarray(
            op.forward(jnp.asarray(x)) - measured).reshape(len(x), -1), axis=1) / np.linalg.norm(
                np.asarray(measured).reshape(len(x), -1), axis=1)))}
    common.log(f"{name}: PSNR {p.mean():.2f} dB, SSIM {s.mean():.3f}, steps {steps.mean():.0f}, "
               f"aborted {aborted}, {wall / len(images):.2f} s/image (compilation included)")
  b = results["baseline"]
  results["baseline"].update(psnr_mean=float(np.mean(b["psnr"])),
                             ssim_mean=float(np.mean(b["ssim"])))
  common.log(f"M M^T x baseline: PSNR {b['psnr_mean']:.2f} dB, SSIM {b['ssim_mean']:.3f}")
  os.makedirs(FLAGS.out, exist_ok=True)
  for i in range(len(images)):
    row = [images[i], np.clip(baseline[i], 0, 1)] + [np.clip(o[i], 0, 1) for o in outputs.values()]
    reporting.save_png(os.path.join(FLAGS.out, f"grid_{i:03d}.png"),
                       reporting.image_grid([row], upscale=1))
  reporting.write_text_atomic(os.path.join(FLAGS.out, "results.json"),
                              json.dumps(results, indent=1))
  common.log(f"wrote {len(images)} grids (original, M M^T x, {', '.join(priors)}) and "
             f"{os.path.join(FLAGS.out, 'results.json')}")


if __name__ == "__main__":
  app.run(main)
