"""Runs a ``launch/`` entry point inside the test process, as its command line would.

``run("train.py", "--workdir=...", ...)`` parses the arguments with absl (flagfiles included),
calls the entry point's ``main`` and returns its exit code and what it printed, like a
subprocess would, in a fraction of the time (no new interpreter, no JAX start-up, programs
compiled once per test process). The differences from a real process, by design: the test
process's devices are used (4 simulated CPU devices), and an unexpected exception propagates
(the test fails with its traceback, as ``"Traceback" not in stderr`` would).
A few tests still start real processes, for exit codes, tracebacks and signals.
"""
from __future__ import annotations

import contextlib
import dataclasses
import importlib
import io
import os
import sys
from unittest import mock

from absl import app, flags

from conftest import REPO

FLAGS = flags.FLAGS
_CLI = ("train", "sample", "evaluate", "solve", "import_lcv", "reproduce")


@dataclasses.dataclass
class Result:
  returncode: int
  stdout: str
  stderr: str


def _entry_point(script: str):
  """The module of ``script`` with its own flags defined: a process runs one entry point, and
  two define some names alike (--workdir, --seed), so another's flags are removed first."""
  name = "launch." + script.removesuffix(".py")
  if name.split(".")[1] not in _CLI:
    raise ValueError(f"{script} is not an entry point of launch/")
  if name not in sys.modules:
    if REPO not in sys.path:
      sys.path.insert(0, REPO)
    for other in [f"launch.{m}" for m in _CLI if f"launch.{m}" in sys.modules]:
      for flag in FLAGS.get_flags_for_module(other):
        delattr(FLAGS, flag.name)
      del sys.modules[other]
  return importlib.import_module(name)


def parse(script: str, *args: str) -> None:
  """Parse ``args`` against ``script``'s flags (names, types, enums; flagfiles read) and
  restore the flags; raises absl's flags.Error for a bad one."""
  _entry_point(script)
  FLAGS.unparse_flags()
  try:
    FLAGS([os.path.join(REPO, "launch", script), *args])
  finally:
    FLAGS.unparse_flags()


def run(script: str, *args: str) -> Result:
  """``python launch/<script> *args``, in this process."""
  module = _entry_point(script)
  argv = [os.path.join(REPO, "launch", script), *args]
  out, err = io.StringIO(), io.StringIO()
  code = 0
  # Every flag back to its default before and after (absl's flagsaver would also delete the
  # flags a library defines on first import inside the run, e.g. grain's, for good).
  with mock.patch.object(sys, "argv", argv), \
      contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
    FLAGS.unparse_flags()
    try:
      try:
        rest = FLAGS(argv)
      except flags.Error as e:  # what absl's app.run prints for a bad flag
        print(f"FATAL Flags parsing error: {e}", file=sys.stderr)
        code = 1
      else:
        module.main(rest)
    except app.UsageError as e:  # app.run prints the usage, then the error
      print(f"{module.__doc__}\n{e}", file=sys.stderr)
      code = e.exitcode
    except SystemExit as e:
      code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
      FLAGS.unparse_flags()
  return Result(code, out.getvalue(), err.getvalue())
