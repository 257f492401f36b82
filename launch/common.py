"""Helpers shared by the absl entry points (logging, flag files). Not part of the library."""
import logging
import os
import sys

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


def write_flags(flag_values, path: str) -> None:
  """Save the entry point's own flags as a flagfile (``--flagfile=path`` reproduces it)."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  script = os.path.relpath(sys.argv[0])
  lines = [f"# python {script} --flagfile={path}"]
  lines += [f.serialize() for f in flag_values.get_flags_for_module(sys.argv[0])
            if f.value is not None]
  with open(path, "w") as f:
    f.write("\n".join(lines) + "\n")
