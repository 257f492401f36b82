"""Helpers shared by the absl entry points (logging, flag files). Not part of the library."""
import contextlib
import logging
import os
import sys
import traceback

from absl import logging as absl_logging

_LOGGER = logging.getLogger("wcdm_jax")
_FORMAT = logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S")


def setup_logging() -> None:
  """Our messages at INFO on stdout; other libraries' (orbax, absl) at WARNING."""
  absl_logging.set_verbosity(absl_logging.WARNING)
  logging.getLogger().setLevel(logging.WARNING)
  handler = logging.StreamHandler(sys.stdout)
  handler.setFormatter(_FORMAT)
  _LOGGER.handlers[:] = [handler]
  _LOGGER.setLevel(logging.INFO)
  _LOGGER.propagate = False


@contextlib.contextmanager
def also_log_to(path: str):
  """While open, every ``log`` line also goes to ``path`` (appended), in the console's format."""
  handler = logging.FileHandler(path)
  handler.setFormatter(_FORMAT)
  _LOGGER.addHandler(handler)
  try:
    yield
  finally:
    _LOGGER.removeHandler(handler)
    handler.close()


def local_mesh():
  """A mesh over every local device: the CLIs split their batches over all of them."""
  import jax  # pylint: disable=g-import-not-at-top
  from wcdm_jax import parallel  # pylint: disable=g-import-not-at-top
  return parallel.make_mesh(jax.local_devices())


def check_native_setting() -> None:
  """End the program with one line when WCDM_JAX_NATIVE_ISA is impossible on this CPU."""
  from wcdm_jax import conv  # pylint: disable=g-import-not-at-top
  try:
    conv.check_native_setting()
  except conv.NativeIsaError as e:
    fail(e)


def log(msg: str) -> None:
  _LOGGER.info(msg)


def load_model(path: str, mesh=None):
  """``wcdm_jax.load_params(path, mesh=mesh)`` (on every device of ``mesh``), ending the
  program with one line if it cannot."""
  import wcdm_jax  # pylint: disable=g-import-not-at-top
  from wcdm_jax import checkpoints  # pylint: disable=g-import-not-at-top
  try:
    return wcdm_jax.load_params(path, warn=lambda msg: log("warning: " + msg), mesh=mesh)
  except (FileNotFoundError, ValueError, checkpoints.CheckpointError) as e:
    fail(e)


def train_model(spec, data_cfg, cfg, run, log_fn=log, what: str = "") -> None:
  """``trainer.train(...)``, ending the program with one line (``what`` + the error) on a
  user's error (bad data, a checkpoint that cannot be resumed, a run that turned
  non-finite); logs each net's final PSNR and gains over the identity, and the held-out
  comparison with the best Gaussian filter, through ``log_fn``."""
  from wcdm_jax import checkpoints, pipeline, trainer  # pylint: disable=g-import-not-at-top
  try:
    final = trainer.train(spec, data_cfg, cfg, run, log=log_fn)
  except (ValueError, FileNotFoundError, checkpoints.CheckpointError,
          checkpoints.NonFiniteError, pipeline.InputError) as e:
    fail(f"{what}{e}" if what else e)  # the exception itself: WCDM_JAX_TRACEBACK shows it
  comparison = final.pop(trainer.DENOISING, None)
  for name, m in final.items():
    log_fn(f"final {name}: noisy {m['psnr_noisy']:.2f} dB -> denoised "
           f"{m['psnr_denoised']:.2f} dB")
    if m.get("identity_gains"):
      log_fn(f"  {name} while training, dB over its input by noise std (image units; < 0: "
             "worse than the identity): " + ", ".join(
                 f"<={hi:.2g} {g:+.1f}" for _, hi, g in m["identity_gains"]))
  for r in comparison or ():
    log_fn(f"held-out denoising, sigma {r['sigma']:g}: model {r['model']:.2f} dB, noisy "
           f"{r['noisy']:.2f} dB, best Gaussian filter {r['gaussian']:.2f} dB (std "
           f"{r['gaussian_width']:.2f} px): model - Gaussian {r['model'] - r['gaussian']:+.2f} dB")
    if len(r["bands"]) > 1:
      log_fn("  its squared error by scale, x 1e-4 (model / noisy / Gaussian): " + ", ".join(
          f"{band} {e['model'] * 1e4:.2f} / {e['noisy'] * 1e4:.2f} / {e['gaussian'] * 1e4:.2f}"
          for band, e in r["bands"].items()))


def cluster_detected(environ=os.environ) -> bool:
  """A multi-process launch that jax.distributed.initialize() detects on its own: Open MPI,
  SLURM with several tasks, or a multi-host Cloud TPU slice."""
  def count(name):
    try:
      return int(environ.get(name, "1"))
    except ValueError:
      return 1
  return (count("OMPI_COMM_WORLD_SIZE") > 1 or count("SLURM_NTASKS") > 1
          or "," in environ.get("TPU_WORKER_HOSTNAMES", ""))


def init_distributed(coordinator_address, num_processes, process_id) -> None:
  """Join the multi-process JAX runtime: with explicit settings when given (all three are
  needed), with JAX's own cluster detection under Open MPI, SLURM and on Cloud TPU pods; a
  single process otherwise. Must run before JAX touches a device."""
  given = [v is not None for v in (coordinator_address, num_processes, process_id)]
  if any(given) and not all(given):
    raise ValueError("give all of --coordinator_address, --num_processes and --process_id, or "
                     "none (then JAX detects Cloud TPU, SLURM and Open MPI clusters itself)")
  import jax  # pylint: disable=g-import-not-at-top
  if all(given):
    if process_id >= num_processes:
      raise ValueError(f"--process_id={process_id} must be < --num_processes={num_processes}")
    if num_processes == 1:
      return
    jax.distributed.initialize(coordinator_address, num_processes, process_id)
  elif cluster_detected():
    jax.distributed.initialize()
  else:
    return
  log(f"process {jax.process_index()} of {jax.process_count()}: "
      f"{jax.local_device_count()} local devices, {jax.device_count()} in all")


def load_images(images: str, size: int, channels: int, crop: str, num_images: int,
                split: str = "all", eval_fraction: float = 0.1):
  """The first ``num_images`` images (by file name) of a source as float32 (N, S, S, C);
  split='eval' takes them from the held-out last ``eval_fraction`` that train.py leaves out,
  split='train' from the rest (the embedded photographs and dead leaves: crops of either share;
  'all' = 'eval').
  'npz:PATH[:KEY]' reads an array (default key 'samples', e.g. sample.py's samples.npz).
  Ends the program with one line when the source cannot be read."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  from wcdm_jax import data  # pylint: disable=g-import-not-at-top
  if images.startswith("npz:"):  # e.g. sample.py's samples.npz: model samples, no photographs
    path, _, key = images[4:].partition(":")
    try:
      with np.load(path, allow_pickle=False) as f:
        x = np.asarray(f[key or "samples"], np.float32)[:num_images]
    except (OSError, KeyError, ValueError) as e:
      fail(f"--images={images}: {e}")
    if x.ndim != 4 or x.shape[1:] != (size, size, channels):
      fail(f"--images={images}: need (N, {size}, {size}, {channels}) images, got {x.shape}")
    return x
  split_off = split in ("eval", "train")
  is_folder = images.startswith("folder:")
  crops = images in data.CROP_SOURCES
  if crops:
    split = "train" if split == "train" else "eval"
  try:
    cfg = data.DataConfig(images, size, channels, crop,
                          eval_fraction=eval_fraction if split_off else 0.0, flips=False,
                          max_images=num_images if is_folder and split == "all" else 0)
    src = data.make_source(cfg, num_images, 0, split)
    if crops:
      return src.batch(0)
    return src.fetch(np.arange(min(num_images, src.num_examples)))
  except (ValueError, ImportError) as e:
    fail(f"--images={images}: {e}")


def require_finite(what: str, *arrays) -> None:
  """End the program (exit 1) when an output holds NaN or inf: never write garbage silently."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  for a in arrays:
    if not np.all(np.isfinite(np.asarray(a))):
      fail(f"{what} holds NaN or inf: the model's weights are probably corrupt or the settings "
           "diverge (check the model with wcdm_jax.load_params, or lower the step size)")


def fail(error, code: int = 1) -> None:
  """End the program with one line naming the problem (no traceback for a user's mistake;
  set WCDM_JAX_TRACEBACK=1 to see one)."""
  if os.environ.get("WCDM_JAX_TRACEBACK") and isinstance(error, BaseException):
    traceback.print_exception(error)
  print(f"error: {error}", file=sys.stderr)
  sys.exit(code)


def set_explicitly(flag_values, name: str) -> bool:
  """Whether flag ``name`` was given (command line or flagfile) with another value than its
  default: saved flagfiles list every flag, defaults included."""
  flag = flag_values[name]
  return flag.present and flag.value != flag.default


def entry_point(module_name: str) -> str:
  """Where absl files the flags an entry point defines: under the script's path when it runs
  as a program (``__main__``), under its module name when imported (its ``main`` called
  in-process, as the tests do)."""
  return sys.argv[0] if module_name == "__main__" else module_name


def flags_text(flag_values, path: str, module_name: str) -> str:
  """The flags of entry point ``module_name`` (its ``__name__``) as a flagfile whose first line
  is its command."""
  script = os.path.relpath(sys.argv[0])
  lines = [f"# python {script} --flagfile={path}"]
  lines += [f.serialize() for f in flag_values.get_flags_for_module(entry_point(module_name))
            if f.value is not None]
  return "\n".join(lines) + "\n"


def write_flags(flag_values, path: str, module_name: str) -> None:
  """Save an entry point's own flags as a flagfile (``--flagfile=path`` reproduces it)."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "w") as f:
    f.write(flags_text(flag_values, path, module_name))
