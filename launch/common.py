"""Helpers shared by the absl entry points (logging, flag files). Not part of the library."""
import logging
import os
import sys
import traceback

from absl import logging as absl_logging

_LOGGER = logging.getLogger("wcdm_jax")


def setup_logging() -> None:
  """Our messages at INFO on stdout; other libraries' (orbax, absl) at WARNING."""
  absl_logging.set_verbosity(absl_logging.WARNING)
  logging.getLogger().setLevel(logging.WARNING)
  handler = logging.StreamHandler(sys.stdout)
  handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
  _LOGGER.handlers[:] = [handler]
  _LOGGER.setLevel(logging.INFO)
  _LOGGER.propagate = False


def log(msg: str) -> None:
  _LOGGER.info(msg)


def load_model(path: str):
  """``wcdm_jax.load_params(path)``, ending the program with one line if it cannot."""
  import wcdm_jax  # pylint: disable=g-import-not-at-top
  from wcdm_jax import checkpoints  # pylint: disable=g-import-not-at-top
  try:
    return wcdm_jax.load_params(path, warn=lambda msg: log("warning: " + msg))
  except (FileNotFoundError, ValueError, checkpoints.CheckpointError) as e:
    fail(e)


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


def flags_text(flag_values, path: str) -> str:
  """The entry point's own flags as a flagfile whose first line is its command."""
  script = os.path.relpath(sys.argv[0])
  lines = [f"# python {script} --flagfile={path}"]
  lines += [f.serialize() for f in flag_values.get_flags_for_module(sys.argv[0])
            if f.value is not None]
  return "\n".join(lines) + "\n"


def write_flags(flag_values, path: str) -> None:
  """Save the entry point's own flags as a flagfile (``--flagfile=path`` reproduces it)."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "w") as f:
    f.write(flags_text(flag_values, path))
