r"""Reproduce the paper's central result with models trained here, from scratch (method.md §6).

  python launch/reproduce.py --flagfile=launch/configs/repro80.flags

Trains, with the same budget of images seen per net:
  flat_rf{S}, flat_rf{L}  flat denoisers with a small (S, default 9) and a large (L, 43) RF;
  ms_rf{S}                a J-level model: the global low-pass net and conditional nets of RF S;
  ms_rf{L}                conditional nets of RF L sharing ms_rf{S}'s low-pass net (trained once);
  colour                  the J-level RF S model on 3 channels (its own, usually smaller, budget);
then evaluates every grey model on the held-out files (as launch/evaluate.py --split=eval) and
writes into --workdir: eval/psnr.json + psnr.png (output vs input PSNR), curves.png (each
net's per-scale PSNR against steps), colour/samples/ (denoising row, samples,
super-resolution) and summary.json, which marks the paper's three claims held / not held.
With --budget_runs (the workdirs of the same experiment run at other --num_steps), the
'budgets' stage adds budgets.md and budgets.png: each claim's worst-level difference against
the images seen per net.

Every stage runs in this process: the training stages call the library's trainer (each model
directory is what launch/train.py would write, with reproduce.flags as its record); 'evaluate'
and the samples of 'figures' call what launch/evaluate.py and sample.py call (launch/tasks.py).
Every stage's log is in --workdir/logs/; rerunning the command resumes the training runs and
redoes the rest.
"""
import contextlib
import json
import os
import shutil
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # pylint: disable=g-import-not-at-top

from launch import common, tasks  # pylint: disable=g-import-not-at-top

STAGES = ("flat_small", "flat_large", "ms_small", "ms_large", "colour", "evaluate", "figures",
          "budgets")

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Root directory of the experiment.")
flags.mark_flag_as_required("workdir")
flags.DEFINE_list("stages", list(STAGES), f"Stages to run, in this order: {','.join(STAGES)}.")
# Data.
flags.DEFINE_string("data", "folder:../shared/data/celeba-small", "Training images (train.py's "
                    "--data); the last --eval_fraction of a folder is held out for evaluation.")
flags.DEFINE_integer("image_size", 80, "Image size.", lower_bound=4)
flags.DEFINE_enum("crop", "celeba", ["none", "celeba", "center"], "Crop before resizing.")
flags.DEFINE_float("eval_fraction", 0.1, "Held-out share of the folder.", lower_bound=0.01,
                   upper_bound=0.5)
# Architecture.
flags.DEFINE_integer("levels", 2, "Wavelet levels J of the multi-scale models.", lower_bound=1)
flags.DEFINE_integer("small_rf", 9, "Small receptive field (flat and conditional nets).")
flags.DEFINE_integer("large_rf", 43, "Large receptive field (flat and conditional nets).")
flags.DEFINE_integer("low_rf", 41, "Receptive field of the low-pass net.")
flags.DEFINE_integer("num_layers", 21, "Layers of the flat and conditional nets.", lower_bound=2)
flags.DEFINE_integer("low_num_layers", 20, "Layers of the low-pass net.", lower_bound=2)
flags.DEFINE_integer("features", 64, "Hidden channels.", lower_bound=1)
# Optimisation: the same for every net (level_multiplier 1: the same images seen per net).
flags.DEFINE_integer("batch_size", 32, "Global batch size.", lower_bound=1)
flags.DEFINE_integer("num_steps", 1000, "Steps of every grey net.", lower_bound=1)
flags.DEFINE_enum("recipe", "default", ["default", "paper"], "train.py's --recipe.")
flags.DEFINE_integer("lr_halve_every", 300, "--recipe=paper: steps between learning-rate "
                     "halvings (scaled to each run's steps).", lower_bound=1)
flags.DEFINE_float("learning_rate", 1e-3, "Adam learning rate.", lower_bound=0.0)
flags.DEFINE_integer("colour_steps", 500, "Steps of every net of the colour model.",
                     lower_bound=1)
flags.DEFINE_integer("colour_num_layers", None, "Layers of the colour model's conditional nets "
                     "(default: --num_layers). At CPU budgets the 21-layer RF 9 colour nets "
                     "hardly learn where 10 layers do (docs/experiments/training_log.md, 'Colour').", lower_bound=2)
flags.DEFINE_integer("colour_low_num_layers", None, "Layers of the colour model's low-pass net, "
                     "all 3x3 (default: --low_num_layers, with --low_rf): like its conditional "
                     "nets, a 20-layer colour low-pass net hardly learns at CPU budgets where 10 "
                     "layers do (docs/experiments/training_log.md, 'Colour').", lower_bound=2)
flags.DEFINE_integer("seed", 0, "Seed of every run.")
flags.DEFINE_integer("log_every", 25, "Training: steps between log lines.", lower_bound=1)
flags.DEFINE_integer("eval_every", 50, "Training: steps between per-scale PSNR evaluations.",
                     lower_bound=1)
flags.DEFINE_integer("checkpoint_every", 250, "Training: steps between checkpoints.",
                     lower_bound=1)
flags.DEFINE_string("conv_impl", "auto", "train.py's --conv_impl.")
# Evaluation.
flags.DEFINE_integer("eval_images", 256, "Held-out images for the PSNR curves.", lower_bound=1)
flags.DEFINE_list("noise_levels", ["0", "20", "40", "60", "100", "160", "260", "400", "640"],
                  "Noise stds (/255) of the PSNR curves.")
flags.DEFINE_integer("colour_samples", 8, "Samples drawn from the colour model.", lower_bound=0)
flags.DEFINE_integer("low_max_steps", 3000, "Colour samples: low-pass ascent step cap.",
                     lower_bound=1)
flags.DEFINE_list("budget_runs", [], "Workdirs of this experiment at other budgets (each with "
                  "its summary.json): the 'budgets' stage tabulates and plots the claims over all.")


def _names():
  s, l = FLAGS.small_rf, FLAGS.large_rf
  return {"flat_small": f"flat_rf{s}", "flat_large": f"flat_rf{l}", "ms_small": f"ms_rf{s}",
          "ms_large": f"ms_rf{l}", "colour": f"colour_ms_rf{s}"}


@contextlib.contextmanager
def _stage_log(stage: str):
  """While open, every log line also goes to WORKDIR/logs/STAGE.log (appended); the stage's
  time is logged when it ends."""
  os.makedirs(os.path.join(FLAGS.workdir, "logs"), exist_ok=True)
  t0 = time.time()
  with common.also_log_to(os.path.join(FLAGS.workdir, "logs", stage + ".log")):
    yield
  common.log(f"{stage}: done in {time.time() - t0:.0f} s")


def _train(stage: str, name: str, steps: int, levels: int, rf: int, colour: bool = False,
           nets: tuple[str, ...] | None = None) -> None:
  """Train (or resume) model ``name`` with the library's trainer; levels = 0: a flat net of
  receptive field ``rf``, else conditional nets of ``rf`` under a ``levels``-level pyramid."""
  from wcdm_jax import data, models, trainer, training  # pylint: disable=g-import-not-at-top
  channels = 3 if colour else 1
  size = (FLAGS.image_size, FLAGS.image_size)
  layers = FLAGS.colour_num_layers if colour and FLAGS.colour_num_layers else FLAGS.num_layers
  low_layers, low_rf = FLAGS.low_num_layers, FLAGS.low_rf
  if colour and FLAGS.colour_low_num_layers:  # all 3x3: receptive field 2 L + 1
    low_layers = FLAGS.colour_low_num_layers
    low_rf = 2 * low_layers + 1
  workdir = os.path.join(FLAGS.workdir, name)
  recipe = {"lr_halve_every": FLAGS.lr_halve_every * steps // FLAGS.num_steps or 1} if (
      FLAGS.recipe == "paper") else {}
  try:
    spec = models.ModelConfig(levels=levels, cond_rf=rf, flat_rf=rf, low_rf=low_rf,
                              num_layers=layers, low_num_layers=low_layers,
                              features=FLAGS.features).spec(channels, size)
    data_cfg = data.DataConfig(FLAGS.data, FLAGS.image_size, channels, FLAGS.crop,
                               eval_fraction=FLAGS.eval_fraction)
    cfg = training.TrainConfig.from_recipe(
        FLAGS.recipe, batch_size=FLAGS.batch_size, num_steps=steps,
        learning_rate=FLAGS.learning_rate, level_multiplier=1, seed=FLAGS.seed,
        conv_impl=FLAGS.conv_impl, **recipe)
    run = trainer.RunConfig(workdir, nets=nets or (), log_every=FLAGS.log_every,
                            eval_every=FLAGS.eval_every, checkpoint_every=FLAGS.checkpoint_every,
                            record=(("reproduce.flags", common.flags_text(
                                FLAGS, os.path.join(FLAGS.workdir, "reproduce.flags"),
                                __name__)),))
  except ValueError as e:
    common.fail(f"{stage}: {e}")
  with _stage_log(stage):
    common.train_model(spec, data_cfg, cfg, run, lambda msg: common.log(f"{stage}: {msg}"),
                       what=f"stage {stage}: ")


def _copy_low_net(src_model: str, dst_model: str) -> None:
  """Give dst_model the low-pass net of src_model (the same spec), replacing an older copy."""
  src, dst = os.path.join(src_model, "low"), os.path.join(dst_model, "low")
  if not os.path.isdir(src):
    raise RuntimeError(f"{src} does not exist: run the ms_small stage first")
  tmp = dst + ".tmp"
  shutil.rmtree(tmp, ignore_errors=True)
  shutil.copytree(src, tmp)
  shutil.rmtree(dst, ignore_errors=True)
  os.replace(tmp, dst)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}; every option is a --flag")
  bad = [s for s in FLAGS.stages if s not in STAGES]
  if bad:
    raise app.UsageError(f"--stages: unknown {bad}; choose from {','.join(STAGES)}")
  if FLAGS.small_rf >= FLAGS.large_rf:
    raise app.UsageError(f"--small_rf ({FLAGS.small_rf}) must be below --large_rf "
                         f"({FLAGS.large_rf})")
  if common.set_explicitly(FLAGS, "lr_halve_every") and FLAGS.recipe != "paper":
    raise app.UsageError("--lr_halve_every applies to --recipe=paper (the default recipe decays "
                         "the learning rate on a cosine)")
  if not FLAGS.data.startswith("folder:"):
    raise app.UsageError("--data must be 'folder:/path': the held-out files of the folder are "
                         "the test set")
  common.setup_logging()
  common.check_native_setting()
  os.makedirs(FLAGS.workdir, exist_ok=True)
  full = set(FLAGS.stages) == set(STAGES)  # a partial rerun keeps the full run's record
  common.write_flags(FLAGS, os.path.join(FLAGS.workdir, "reproduce.flags" if full
                                         else "reproduce_partial.flags"), __name__)
  names = _names()
  path = lambda stage: os.path.join(FLAGS.workdir, names[stage])
  stages = [s for s in STAGES if s in FLAGS.stages]
  small, large, steps = FLAGS.small_rf, FLAGS.large_rf, FLAGS.num_steps
  for stage in stages:
    if stage == "flat_small":
      _train(stage, names[stage], steps, 0, small)
    elif stage == "flat_large":
      _train(stage, names[stage], steps, 0, large)
    elif stage == "ms_small":
      _train(stage, names[stage], steps, FLAGS.levels, small)
    elif stage == "ms_large":
      _train(stage, names[stage], steps, FLAGS.levels, large,
             nets=tuple(f"cond{j}" for j in range(FLAGS.levels)))
      _copy_low_net(path("ms_small"), path("ms_large"))
    elif stage == "colour":
      _train(stage, names[stage], FLAGS.colour_steps, FLAGS.levels, small, colour=True)
    elif stage == "evaluate":
      grey = ("flat_small", "flat_large", "ms_small", "ms_large")
      with _stage_log(stage):
        _evaluate({names[s]: path(s) for s in grey}, "eval", channels=1)
      if os.path.isdir(path("colour")):
        with _stage_log(stage + "_colour"):
          _evaluate({names["colour"]: path("colour")}, "eval_colour", channels=3)
    elif stage == "figures":
      _figures(names, path)
    elif stage == "budgets":
      _budgets()


def _evaluate(models: dict[str, str], out: str, channels: int) -> None:
  """The PSNR curves of ``models`` ({label: directory}) on the held-out images: WORKDIR/OUT."""
  mesh = common.local_mesh()
  loaded = {name: common.load_model(path, mesh) for name, path in models.items()}
  images = common.load_images(FLAGS.data, FLAGS.image_size, channels, FLAGS.crop,
                              FLAGS.eval_images, "eval", FLAGS.eval_fraction)
  common.log(f"{len(images)} held-out images of {FLAGS.image_size}x{FLAGS.image_size}")
  tasks.write_psnr(loaded, images, [float(v) for v in FLAGS.noise_levels],
                   os.path.join(FLAGS.workdir, out), seed=FLAGS.seed, mesh=mesh,
                   record={"images": FLAGS.data, "image_size": FLAGS.image_size,
                           "split": "eval"})


def _samples(model: str, log_name: str, **job) -> str:
  """Samples of ``model`` (flip-averaged ascents, see _figures) into MODEL/samples."""
  import dataclasses  # pylint: disable=g-import-not-at-top
  from wcdm_jax import sampling  # pylint: disable=g-import-not-at-top
  low = dataclasses.replace(sampling.RELEASE_LOW, beta=0.1, sigma_L=0.05, ascending=True,
                            max_steps=FLAGS.low_max_steps, flip_average=True)
  cond = dataclasses.replace(sampling.RELEASE_COND, sigma_L=0.05, flip_average=True)
  out = os.path.join(model, "samples")
  mesh = common.local_mesh()
  with _stage_log(log_name):
    try:
      tasks.write_samples(common.load_model(model, mesh), out, tasks.SampleJob(
          FLAGS.colour_samples, FLAGS.seed, low_config=low, cond_config=cond,
          low_rescale=(0.0, 0.8), **job), mesh)
    except ValueError as e:
      common.fail(f"{log_name}: {e}")
  return out


def _denoise_samples_figure(model: str, out: str) -> str:
  """Rows: the model's own samples, noisy (sigma 0.1, 0.2), denoised: a figure without any
  photograph of the data set (whose licence forbids redistribution)."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  import wcdm_jax  # pylint: disable=g-import-not-at-top
  from wcdm_jax import reporting  # pylint: disable=g-import-not-at-top
  params = common.load_model(model)
  clean = np.load(os.path.join(out, "samples.npz"))["samples"]
  rows = [list(clean)]
  for i, sigma in enumerate((0.1, 0.2)):
    noisy = clean + sigma * np.asarray(jax.random.normal(jax.random.key(50 + i), clean.shape))
    rows += [list(noisy), list(np.asarray(wcdm_jax.denoise(params, noisy)))]
  return reporting.save_png(os.path.join(out, "denoised_samples.png"),
                            reporting.image_grid(rows, upscale=2))


def _markdown(results: dict, summary: dict) -> str:
  """The PSNR table (models x noise levels) and the claims, as Markdown."""
  levels = summary["noise_std_255"]
  head = "| model | " + " | ".join(f"σ={s:g}" for s in levels) + " |\n"
  head += "|---|" + "---|" * len(levels) + "\n"
  show = lambda p: "∞" if p >= 150 else f"{p:.2f}"  # no noise: psnr() caps at 200 dB
  rows = ["| input PSNR | " + " | ".join(show(p) for p in summary["psnr_in"]) + " |"]
  rows += [f"| {name} | " + " | ".join(f"{p:.2f}" for p in r["psnr_out"]) + " |"
           for name, r in results.items()]
  claims = [f"- {'held' if c['held'] else 'not held'}: {c['claim']} ({c['detail']})"
            for c in summary["claims"]]
  return head + "\n".join(rows) + "\n\n" + "\n".join(claims) + "\n"


def _figures(names: dict, path) -> None:
  from wcdm_jax import reporting  # pylint: disable=g-import-not-at-top
  from launch import claims, plots  # pylint: disable=g-import-not-at-top
  metrics = {names[s]: reporting.read_metrics(os.path.join(path(s), "metrics.jsonl"))
             for s in names if os.path.exists(os.path.join(path(s), "metrics.jsonl"))}
  common.log("wrote " + plots.training_curves(metrics, os.path.join(FLAGS.workdir, "curves.png")))
  # Flip-averaged ascents (sample.py --flip_average): the nets train on randomly flipped
  # images, and without it the ascents grow their asymmetry into a border column. The
  # conditional ascents stop at noise std 0.05, above these nets' own error on clean details
  # (about 0.03 rms for cond0 after 64,000 images): below it their residual is mostly their
  # error, and a level-1 ascent run down to 0.01 draws vertical stripes (docs/experiments/training_log.md).
  if FLAGS.colour_samples:
    _samples(path("ms_small"), "grey_samples")
  if os.path.isdir(path("colour")) and FLAGS.colour_samples:
    out = _samples(path("colour"), "colour_samples", images=FLAGS.data, crop=FLAGS.crop,
                   num_images=6, noise_sigmas=(0.1, 0.2, 0.4))
    common.log("wrote " + _denoise_samples_figure(path("colour"), out))
  with open(os.path.join(FLAGS.workdir, "eval", "psnr.json")) as f:
    results = json.load(f)["models"]
  summary = claims.multiscale_claims(
      results, flat_small=names["flat_small"], flat_large=names["flat_large"],
      ms_small=names["ms_small"], ms_large=names["ms_large"])
  summary["budget"] = {"images_per_net": FLAGS.num_steps * FLAGS.batch_size,
                       "colour_images_per_net": FLAGS.colour_steps * FLAGS.batch_size,
                       "batch_size": FLAGS.batch_size, "features": FLAGS.features}
  with open(os.path.join(FLAGS.workdir, "summary.json"), "w") as f:
    json.dump(summary, f, indent=1)
  with open(os.path.join(FLAGS.workdir, "results.md"), "w") as f:
    f.write(_markdown(results, summary))
  for claim in summary["claims"]:
    common.log(f"{'HELD' if claim['held'] else 'NOT HELD'}: {claim['claim']} ({claim['detail']})")
  common.log(f"wrote {os.path.join(FLAGS.workdir, 'summary.json')}")


def _budgets() -> None:
  """budgets.md / budgets.png: the claims of this run and of --budget_runs by images seen."""
  from launch import plots  # pylint: disable=g-import-not-at-top
  if not FLAGS.budget_runs:
    common.log("budgets: no --budget_runs given, nothing to compare")
    return
  budgets = {}
  for run in [FLAGS.workdir] + FLAGS.budget_runs:
    path = os.path.join(run, "summary.json")
    try:
      with open(path) as f:
        summary = json.load(f)
      images = summary["budget"]["images_per_net"]
      for c in summary["claims"]:  # the fields the table and the figure read
        missing = {"claim", "held", "worst_db", "bound_db"} - set(c)
        if missing:
          raise KeyError(f"a claim without {sorted(missing)}")
    except FileNotFoundError:
      common.fail(f"{path} does not exist: run that budget's 'figures' stage first")
    except (OSError, ValueError, KeyError, TypeError) as e:
      common.fail(f"{path} is not a summary.json of this release's 'figures' stage "
                  f"({type(e).__name__}: {e}); rerun that stage")
    if images in budgets:
      common.fail(f"--budget_runs: two runs with {images:,} images per net ({run}); give each "
                  "budget once")
    budgets[images] = summary
  claims = budgets[max(budgets)]["claims"]
  lines = ["| images per net | " + " | ".join(
      f"claim {i + 1} (bound {c['bound_db']:+g} dB)" for i, c in enumerate(claims)) + " |",
           "|---|" + "---|" * len(claims)]
  for n in sorted(budgets):
    cells = [f"{c['worst_db']:+.2f} ({'held' if c['held'] else 'not held'})"
             for c in budgets[n]["claims"]]
    lines.append(f"| {n:,} | " + " | ".join(cells) + " |")
  text = "\n".join(lines) + "\n\n" + "\n".join(
      f"- claim {i + 1}: {c['claim']}" for i, c in enumerate(claims)) + "\n"
  with open(os.path.join(FLAGS.workdir, "budgets.md"), "w") as f:
    f.write(text)
  common.log("wrote " + plots.claim_budgets(budgets, os.path.join(FLAGS.workdir, "budgets.png")))


if __name__ == "__main__":
  app.run(main)
