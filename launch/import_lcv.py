r"""Import the authors' released PyTorch denoisers (LCV) as wcdm_jax model directories.

  python launch/import_lcv.py --src=../shared/reference/lcv-denoisers --dst=models

Writes one model directory per flat denoiser (DST/flat_celebA_160x160_gray_rf9, ...) and one
per multi-scale model (DST/ms_celebA_160x160_gray_rf13: low-pass + conditional nets), each
loadable with ``wcdm_jax.load_params``. No torch needed: the files are read by a restricted
reader that accepts tensors only (see wcdm_jax/pretrained.py).
"""
import os
import shutil
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # pylint: disable=g-import-not-at-top

from launch import common  # pylint: disable=g-import-not-at-top

FLAGS = flags.FLAGS
flags.DEFINE_string("src", None, "Folder of the release (searched recursively for model.pt).")
flags.DEFINE_string("dst", None, "Output folder: one model directory per model.")
flags.DEFINE_list("models", [], "Only these model names (default: all found).")
flags.DEFINE_bool("overwrite", False, "Replace model directories that already exist in --dst "
                  "(atomically); by default an existing one is an error.")
flags.mark_flags_as_required(["src", "dst"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  common.setup_logging()
  import wcdm_jax  # pylint: disable=g-import-not-at-top
  from wcdm_jax import pretrained  # pylint: disable=g-import-not-at-top
  found = pretrained.find_release_models(FLAGS.src)
  if not found:
    raise app.UsageError(f"no released models (…/RF_*/model.pt) under {FLAGS.src}")
  names = FLAGS.models or sorted(found)
  missing = [n for n in names if n not in found]
  if missing:
    raise app.UsageError(f"unknown models {missing}; found {sorted(found)}")
  exist = [n for n in names if os.path.exists(os.path.join(FLAGS.dst, n))]
  if exist and not FLAGS.overwrite:
    raise app.UsageError(f"{', '.join(exist)} already exist in {FLAGS.dst}: pass --overwrite to "
                         "replace them, or choose another --dst")
  for name in names:
    try:
      params = pretrained.load_release_model(found[name])
    except (ValueError, FileNotFoundError) as e:
      common.fail(e)
    dst = os.path.join(FLAGS.dst, name)
    tmp, old = f"{dst}.importing-{os.getpid()}", f"{dst}.replaced-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    wcdm_jax.save_model(tmp, params, meta={"source": found[name]})
    if os.path.exists(dst):  # swap: the old model stays whole until the new one is complete
      os.replace(dst, old)
    os.replace(tmp, dst)
    shutil.rmtree(old, ignore_errors=True)
    nets = ", ".join(f"{n}: RF {s.rf}, {s.num_layers} layers" for n, s in params.spec.nets.items())
    common.log(f"{name} -> {dst} ({nets})")


if __name__ == "__main__":
  app.run(main)
