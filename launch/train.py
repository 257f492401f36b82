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

from launch import common, flagdefs  # pylint: disable=g-import-not-at-top
from wcdm_jax import data, models, trainer, training  # pylint: disable=g-import-not-at-top

FLAGS = flags.FLAGS
# Every setting of the run is a field of a library config, and its flag is derived from it
# (name, type, default, help, allowed values: launch/flagdefs.py); only the few CLI-only choices
# are defined here.
flagdefs.define(trainer.RunConfig, skip=("data_processes", "record"))
flags.mark_flag_as_required("workdir")
flagdefs.define(data.DataConfig, skip=("channels",))
flags.DEFINE_enum("color", "grey", ["grey", "colour"], "Grey (mean of RGB) or colour images.")
flags.DEFINE_enum("recipe", "default", sorted(training.RECIPES), "Optimisation recipe: 'paper' "
                  "is method.md §4 exactly (Adam, halvings, no warm-up, no EMA); 'default' adds "
                  "a warm-up, a cosine decay and an EMA of the weights (wcdm_jax.training.RECIPES,"
                  " docs/experiments/training_log.md). The flags below override single settings of it.")
flagdefs.define(training.TrainConfig, unset=training.RECIPE_FIELDS,
                unset_help="(default: the recipe's)")
flags.DEFINE_enum("data_worker_kind", "auto", ["auto", "threads", "processes"], "Decoders as "
                  "threads of the training process or as processes (auto: processes above 4 "
                  "cores).")
flagdefs.define(models.ModelConfig)
# Several hosts, and the CLI itself.
flags.DEFINE_string("coordinator_address", None, "Multi-process runs: host:port of process 0 "
                    "(not needed on Cloud TPU or under SLURM / Open MPI, where JAX finds it).")
flags.DEFINE_integer("num_processes", None, "Multi-process runs: number of processes.",
                     lower_bound=1)
flags.DEFINE_integer("process_id", None, "Multi-process runs: this process's index.",
                     lower_bound=0)
flags.DEFINE_bool("dry_run", False, "Check the flags, print the model and exit.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}; every option is a --flag")
  common.setup_logging()
  common.check_native_setting()
  channels = 1 if FLAGS.color == "grey" else 3
  size = (FLAGS.image_size, FLAGS.image_size)
  try:
    spec = flagdefs.build(models.ModelConfig, flagdefs.overrides(models.ModelConfig)).spec(
        channels, size)
    data_cfg = flagdefs.build(data.DataConfig, dict(
        flagdefs.overrides(data.DataConfig, skip=("channels",)), channels=channels),
        flagdefs.flag_names(data.DataConfig))
    cfg = flagdefs.build(lambda **kw: training.TrainConfig.from_recipe(FLAGS.recipe, **kw),
                         flagdefs.overrides(training.TrainConfig))
    run = flagdefs.build(trainer.RunConfig, dict(
        flagdefs.overrides(trainer.RunConfig, skip=("data_processes", "record")),
        data_processes={"auto": -1, "threads": 0, "processes": 1}[FLAGS.data_worker_kind],
        record=(("train.flags", common.flags_text(
            FLAGS, os.path.join(FLAGS.workdir, "train.flags"), __name__)),)))
  except ValueError as e:
    raise app.UsageError(str(e)) from e
  if common.set_explicitly(FLAGS, "lr_halve_every") and cfg.schedule != "halving":
    raise app.UsageError(f"--lr_halve_every applies to --schedule=halving, but this run's schedule "
                         f"is {cfg.schedule!r} (--recipe={FLAGS.recipe}); drop it or add "
                         "--schedule=halving")
  for name in ("loss_weight_floor", "loss_weight_power"):
    if common.set_explicitly(FLAGS, name) and cfg.loss_weighting == "none":
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
  common.train_model(spec, data_cfg, cfg, run)

if __name__ == "__main__":
  app.run(main)
