r"""Train a multi-scale (or flat) wavelet-conditional denoiser model.

  python launch/train.py --flagfile=launch/configs/quickstart.flags
  python launch/train.py --flagfile=launch/configs/celeba160.flags --workdir=/ckpt/ms160
  python launch/train.py --flagfile=launch/configs/celeba160.flags --nets=cond0  # one scale

Runs data-parallel over every device of every host. Re-running the same command resumes
from the latest checkpoints in --workdir. Several hosts: run the same command on every host
(Cloud TPU pods, SLURM and Open MPI need nothing more); elsewhere add
--coordinator_address=HOST0:PORT --num_processes=N --process_id=I.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # pylint: disable=g-import-not-at-top

from launch import common  # pylint: disable=g-import-not-at-top

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics.jsonl and figures.")
flags.mark_flag_as_required("workdir")
# Data.
flags.DEFINE_string("data", "embedded",
                    "'embedded' (PyWavelets' photographs), 'deadleaves' (dead-leaves images, "
                    "rendered), 'folder:/path' or 'tfds:name[:split]'.")
flags.DEFINE_integer("image_size", 64, "Training image size (square).", lower_bound=4)
flags.DEFINE_enum("color", "grey", ["grey", "colour"], "Grey (mean of RGB) or colour images.")
flags.DEFINE_enum("crop", "none", ["none", "celeba", "center"], "Crop before resizing.")
flags.DEFINE_float("eval_fraction", 0.1, "Held-out share of a folder for evaluation.",
                   lower_bound=0.0, upper_bound=0.5)
flags.DEFINE_integer("max_images", 0, "Use at most this many images (0 = all).", lower_bound=0)
flags.DEFINE_bool("flips", True, "Random horizontal flips.")
flags.DEFINE_float("max_bad_fraction", 0.01, "Share of a folder's files that may be unreadable "
                   "(skipped with a warning naming them); more is an error.", lower_bound=0.0,
                   upper_bound=1.0)
# Model.
flags.DEFINE_integer("levels", 2, "Wavelet levels J; 0 trains a flat denoiser.", lower_bound=0)
flags.DEFINE_string("wavelet", "haar", "Orthogonal PyWavelets wavelet.")
flags.DEFINE_enum("wavelet_mode", "periodization", ["periodization", "symmetric", "reflect", "zero"],
                  "Boundary mode (periodization is the orthonormal one).")
flags.DEFINE_integer("cond_rf", 9, "Receptive field of the conditional nets.")
flags.DEFINE_integer("low_rf", 41, "Receptive field of the low-pass net.")
flags.DEFINE_integer("flat_rf", 43, "Receptive field of a flat net (levels=0).")
flags.DEFINE_integer("num_layers", 21, "Layers of the conditional / flat nets.", lower_bound=2)
flags.DEFINE_integer("low_num_layers", 20, "Layers of the low-pass net.", lower_bound=2)
flags.DEFINE_integer("features", 64, "Channels of the hidden layers.", lower_bound=1)
# Optimisation.
flags.DEFINE_enum("recipe", "default", ["default", "paper"], "Optimisation recipe: 'paper' is "
                  "method.md §4 exactly (Adam, halvings, no warm-up, no EMA); 'default' adds a "
                  "warm-up, a cosine decay and an EMA of the weights (wcdm_jax.training.RECIPES, "
                  "docs/training.md). The flags below override single settings of it.")
flags.DEFINE_enum("schedule", None, ["halving", "cosine"], "Learning-rate decay (default: the "
                  "recipe's): halving every --lr_halve_every steps, or cosine to 1% over the run.")
flags.DEFINE_integer("warmup_steps", None, "Linear warm-up steps of the finest net (default: the "
                     "recipe's; -1 = min(200, num_steps // 10)).", lower_bound=-1)
flags.DEFINE_string("clip_factor", None, "Clip the gradient norm at this many times its running "
                    "mean ('none': no clipping; default: the recipe's).")
flags.DEFINE_float("ema_decay", None, "Decay of the weights' moving average used for evaluation, "
                   "sampling and the saved model (0: none; default: the recipe's).")
flags.DEFINE_string("gain_init", None, "Initial batch-norm gains: 'paper' (N(0,1) 2/9/64, "
                    "clipped to 0.025) or a constant (default: the recipe's).")
flags.DEFINE_bool("zero_init_output", None, "Start the last convolution at zero (the "
                  "denoiser starts as the identity; default: the recipe's, off in both).")
flags.DEFINE_float("bn_momentum", None, "Batch-norm running-std momentum (default: the "
                   "recipe's, 0.1).")
flags.DEFINE_enum("loss_weighting", None, ["none", "snr", "balanced"], "Per-image loss "
                  "weight (default: the recipe's): 'none' = summed squared error (the paper's); "
                  "'snr' = each image's error / (std^2 + floor^2); 'balanced' = / (the net's "
                  "running error at that noise level + floor^2), so small noise counts as much "
                  "as large (docs/training.md).")
flags.DEFINE_float("loss_weight_floor", None, "Floor of the weighted losses' noise std, /255 "
                   "(image units for every net; default 4).")
flags.DEFINE_float("loss_weight_power", None, "Raise the loss weights to this power, in [0, 1] "
                   "(0: unweighted; default: the recipe's).")
flags.DEFINE_enum("noise_sampling", None, ["independent", "stratified"], "A batch's noise "
                  "levels (default: the recipe's): drawn independently per image (the paper's), "
                  "or 'stratified', one in each 1/batch of the range at a random shift.")
flags.DEFINE_integer("batch_size", 512, "Global batch size.", lower_bound=1)
flags.DEFINE_float("learning_rate", 1e-3, "Adam learning rate.", lower_bound=0.0)
flags.DEFINE_integer("num_steps", 10000, "Steps of the finest net.", lower_bound=1)
flags.DEFINE_integer("lr_halve_every", 1000, "Finest net's steps between lr halvings "
                     "(--schedule=halving).", lower_bound=1)
flags.DEFINE_float("level_multiplier", 4.0, "Net at level j trains multiplier**j x longer.",
                   lower_bound=0.0)
flags.DEFINE_integer("noise_min", 0, "Smallest noise std, /255.", lower_bound=0)
flags.DEFINE_integer("noise_max", 255, "Largest noise std, /255.", lower_bound=0)
flags.DEFINE_bool("quadratic_noise", True, "Square the sampled std (favours small noise).")
flags.DEFINE_bool("intensity_augmentation", True, "Scale each image's clean signal by "
                  "U(0, 1) for the nets --intensity_augmentation_nets names.")
flags.DEFINE_enum("intensity_augmentation_nets", None, ["low", "multiscale", "all"], "Nets "
                  "whose images are intensity-augmented (default: the recipe's): 'low' = the "
                  "low-pass net only (the paper's); 'multiscale' = also the conditional nets "
                  "(details with their conditioning low-pass), which then denoise noise above "
                  "their range (the default recipe's); 'all' = also flat nets.")
flags.DEFINE_integer("seed", 0, "Seed of initialisation, noise and data order.")
flags.DEFINE_enum("conv_impl", "auto", ["auto", "native", "xla", "xla_autodiff", "matmul"],
                  "How convolutions run: auto = the native kernels of the CPU's ISA (AVX-512, "
                  "AVX2) where built, else XLA; WCDM_JAX_NATIVE_ISA forces one (wcdm_jax.conv).")
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Compute dtype of the nets' "
                  "convolutions (parameters, statistics and the loss stay float32).")
flags.DEFINE_integer("data_workers", -1, "Parallel input decoders (-1 = one per core up to "
                     "16, one for the embedded data).", lower_bound=-1)
flags.register_validator("data_workers", lambda v: v != 0,
                         "--data_workers must be -1 (automatic) or >= 1")
flags.DEFINE_enum("data_worker_kind", "auto", ["auto", "threads", "processes"], "Decoders as "
                  "threads of the training process or as processes (auto: processes above 4 "
                  "cores).")
flags.DEFINE_string("coordinator_address", None, "Multi-process runs: host:port of process 0 "
                    "(not needed on Cloud TPU or under SLURM / Open MPI, where JAX finds it).")
flags.DEFINE_integer("num_processes", None, "Multi-process runs: number of processes.",
                     lower_bound=1)
flags.DEFINE_integer("process_id", None, "Multi-process runs: this process's index.",
                     lower_bound=0)
flags.DEFINE_bool("remat", False, "Rematerialise each block in the backward pass (less memory).")
# Run.
flags.DEFINE_list("nets", [], "Nets to train (default all): flat | low,cond0,cond1,...")
flags.DEFINE_integer("log_every", 50, "Steps between log lines.", lower_bound=1)
flags.DEFINE_integer("eval_every", 200, "Steps between per-scale PSNR evaluations.", lower_bound=1)
flags.DEFINE_float("eval_sigma", 0.1, "Noise std of the per-scale PSNR.", lower_bound=0.0)
flags.DEFINE_integer("checkpoint_every", 500, "Steps between checkpoints.", lower_bound=1)
flags.DEFINE_integer("keep_checkpoints", 3, "Checkpoints kept per net.", lower_bound=1)
flags.DEFINE_bool("dry_run", False, "Check the flags, print the model and exit.")
flags.DEFINE_bool("allow_config_change", False, "Resume checkpoints made with other training "
                  "settings (batch, seed, learning rate, noise, data); by default that is an error.")
flags.DEFINE_integer("stop_after", 0, "Stop after this many steps of this run (0 = never).",
                     lower_bound=0)


def _number_or(text: str, word: str, flag: str) -> float | None:
  """``word`` -> None, else the number (a UsageError naming the flag otherwise)."""
  if text.strip().lower() == word:
    return None
  try:
    return float(text)
  except ValueError:
    raise app.UsageError(f"--{flag}={text!r}: give a number or '{word}'") from None


def _recipe_overrides() -> dict:
  """The recipe settings given on the command line (the others stay the recipe's)."""
  names = ("schedule", "warmup_steps", "ema_decay", "bn_momentum", "zero_init_output",
           "loss_weighting", "loss_weight_floor", "loss_weight_power", "noise_sampling",
           "intensity_augmentation_nets")
  out = {k: getattr(FLAGS, k) for k in names if getattr(FLAGS, k) is not None}
  if FLAGS.clip_factor is not None:
    out["clip_factor"] = _number_or(FLAGS.clip_factor, "none", "clip_factor")
  if FLAGS.gain_init is not None:
    out["gain_init"] = _number_or(FLAGS.gain_init, "paper", "gain_init")
  return out


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}; every option is a --flag")
  common.setup_logging()
  common.check_native_setting()
  # pylint: disable-next=g-import-not-at-top
  from wcdm_jax import checkpoints, data, models, pipeline, trainer, training
  if FLAGS.noise_max < FLAGS.noise_min:
    raise app.UsageError("--noise_max must be >= --noise_min")
  channels = 1 if FLAGS.color == "grey" else 3
  size = (FLAGS.image_size, FLAGS.image_size)
  try:
    if FLAGS.levels == 0:
      spec = models.ModelSpec(low=models.flat_spec(FLAGS.flat_rf, channels, FLAGS.num_layers,
                                                   FLAGS.features), image_size=size)
    else:
      spec = models.multiscale_spec(FLAGS.levels, FLAGS.cond_rf, FLAGS.low_rf, channels, size,
                                    FLAGS.wavelet, FLAGS.num_layers, FLAGS.low_num_layers,
                                    FLAGS.features, FLAGS.wavelet_mode)
    data_cfg = data.DataConfig(FLAGS.data, FLAGS.image_size, channels, FLAGS.crop,
                               FLAGS.eval_fraction, FLAGS.flips, FLAGS.max_images,
                               FLAGS.max_bad_fraction)
    cfg = training.TrainConfig.from_recipe(
        FLAGS.recipe, **_recipe_overrides(), batch_size=FLAGS.batch_size,
        learning_rate=FLAGS.learning_rate, num_steps=FLAGS.num_steps, lr_halve_every=FLAGS.lr_halve_every, level_multiplier=FLAGS.level_multiplier,
        noise_min=FLAGS.noise_min, noise_max=FLAGS.noise_max,
        quadratic_noise=FLAGS.quadratic_noise,
        intensity_augmentation=FLAGS.intensity_augmentation, seed=FLAGS.seed,
        conv_impl=FLAGS.conv_impl, remat=FLAGS.remat, dtype=FLAGS.dtype)
    run = trainer.RunConfig(
        workdir=FLAGS.workdir, nets=tuple(FLAGS.nets), log_every=FLAGS.log_every,
        eval_every=FLAGS.eval_every, eval_sigma=FLAGS.eval_sigma,
        checkpoint_every=FLAGS.checkpoint_every, keep_checkpoints=FLAGS.keep_checkpoints,
        stop_after=FLAGS.stop_after, allow_config_change=FLAGS.allow_config_change,
        data_workers=FLAGS.data_workers,
        data_processes={"auto": -1, "threads": 0, "processes": 1}[FLAGS.data_worker_kind],
        record=(("train.flags", common.flags_text(
            FLAGS, os.path.join(FLAGS.workdir, "train.flags"))),))
  except ValueError as e:
    raise app.UsageError(str(e)) from e
  if common.set_explicitly(FLAGS, "lr_halve_every") and cfg.schedule != "halving":
    raise app.UsageError(f"--lr_halve_every applies to --schedule=halving, but this run's schedule "
                         f"is {cfg.schedule!r} (--recipe={FLAGS.recipe}); drop it or add "
                         "--schedule=halving")
  for name in ("loss_weight_floor", "loss_weight_power"):
    if getattr(FLAGS, name) is not None and cfg.loss_weighting == "none":
      raise app.UsageError(f"--{name} applies to a weighted loss, but this run's loss_weighting "
                           f"is 'none' (--recipe={FLAGS.recipe}); drop it or add "
                           "--loss_weighting=balanced (or snr)")
  if FLAGS.dry_run:
    for name, net in spec.nets.items():
      common.log(f"{name}: RF {net.rf}, {net.num_layers} layers, {net.features} features, "
                 f"{net.in_channels}->{net.out_channels} channels, "
                 f"{training.net_num_steps(spec, name, cfg)} steps")
    common.log(f"data: {data_cfg}")
    return
  try:
    common.init_distributed(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
  except (ValueError, RuntimeError) as e:
    common.fail(f"cannot start the multi-process runtime: {e}")
  try:
    final = trainer.train(spec, data_cfg, cfg, run, log=common.log)
  except (ValueError, FileNotFoundError, checkpoints.CheckpointError,
          checkpoints.NonFiniteError, pipeline.InputError) as e:
    common.fail(e)
  comparison = final.pop(trainer.DENOISING, None)
  for name, m in final.items():
    common.log(f"final {name}: noisy {m['psnr_noisy']:.2f} dB -> denoised "
               f"{m['psnr_denoised']:.2f} dB")
    if m.get("identity_gains"):
      common.log(f"  {name} while training, dB over its input by noise std (image units; < 0: "
                 "worse than the identity): " + ", ".join(
                     f"<={hi:.2g} {g:+.1f}" for _, hi, g in m["identity_gains"]))
  for r in comparison or ():
    common.log(f"held-out denoising, sigma {r['sigma']:g}: model {r['model']:.2f} dB, noisy "
               f"{r['noisy']:.2f} dB, best Gaussian filter {r['gaussian']:.2f} dB (std "
               f"{r['gaussian_width']:.2f} px): model - Gaussian {r['model'] - r['gaussian']:+.2f} dB")
    if len(r["bands"]) > 1:
      common.log("  its squared error by scale, x 1e-4 (model / noisy / Gaussian): " + ", ".join(
          f"{band} {e['model'] * 1e4:.2f} / {e['noisy'] * 1e4:.2f} / {e['gaussian'] * 1e4:.2f}"
          for band, e in r["bands"].items()))


if __name__ == "__main__":
  app.run(main)
