"""Test setup: 4 simulated CPU devices, and paths to ../shared (tests using it skip cleanly)."""
import os
import tempfile

if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             " --xla_force_host_platform_device_count=4").strip()
# The tests' programs are tiny and compiled once or twice each, so XLA's optimisation costs
# more than it saves: at LLVM level 0 a cold compile of a tiny 3-net training run takes half
# the time (53 s -> 26 s), and XLA:CPU's older elemental emitters (instead of its MLIR fusion
# emitters) compile a tiny 2-net train step in 2.6 s instead of 7.0 (24.4 s with neither).
# Results stay deterministic; the native kernels are unaffected.
FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false"
for _flag in FAST_COMPILE.split():
  if _flag.split("=")[0] not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] += " " + _flag
# The simulated devices are threads of one process: on 2 oversubscribed cores (several pytest
# workers, each with 4 devices) one device's thread can reach a collective long after the
# others, and XLA:CPU aborts the process when a rendezvous waits past its termination timeout
# (40 s by default). Real devices do not share cores; the tests wait longer instead.
if "xla_cpu_collective_call_terminate_timeout_seconds" not in os.environ["XLA_FLAGS"]:
  os.environ["XLA_FLAGS"] += (" --xla_cpu_collective_call_terminate_timeout_seconds=600"
                              " --xla_cpu_collective_call_warn_stuck_timeout_seconds=120")
# XLA:CPU sizes its thread pools to the CPUs this process may use (or to $NPROC). A pytest
# worker pinned to one core (below) then has fewer pool threads than simulated devices, and a
# 4-device program deadlocks: three devices' threads wait in an all-reduce for the fourth,
# whose work is queued behind them (seen: a trainer.train fixture hung for good, and CI stopped
# at its time limit). Enough threads for every device, whatever the pinning; the pinning still
# shares the cores.
os.environ.setdefault("NPROC", "8")  # 2 x the 4 simulated devices
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One persistent XLA compilation cache for the test processes and the CLIs they start: most
# tests compile the same small programs again (train.py runs, resumes, kills); results are the
# same either way, the cache only skips recompiling.
# Programs compiled in under a second are not stored (storing thousands of tiny ones costs a
# cold run more than it saves); `make test-fast` stores them all (its warm runs take 2 minutes
# instead of 3). No size limit for JAX to enforce: its LRU eviction scans the directory on every
# write (with the thousands of entries of test-fast, a cold `make test` took twice as long);
# the directory is emptied here instead, once it passes 2 GiB.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(
    tempfile.gettempdir(), f"wcdm_jax_test_xla_cache_{os.getuid()}"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "1")
CACHE_LIMIT = 2 << 30


def _prune_xla_cache(directory: str, limit: int = CACHE_LIMIT) -> None:
  """Empty the tests' XLA cache once it holds more than ``limit`` bytes (one pytest process,
  the xdist controller, does it before the workers start)."""
  try:
    entries = [e for e in os.scandir(directory) if e.is_file()]
  except OSError:
    return
  if sum(e.stat().st_size for e in entries) > limit:
    for e in entries:
      try:
        os.unlink(e.path)
      except OSError:
        pass


if "PYTEST_XDIST_WORKER" not in os.environ:
  _prune_xla_cache(os.environ["JAX_COMPILATION_CACHE_DIR"])


def _pin_xdist_worker() -> None:
  """Give each pytest-xdist worker its own share of the cores (children inherit it).

  Without it each worker's XLA:CPU thread pool (and those of the CLIs it starts) is sized to
  every core, so two workers oversubscribe the machine. Pinned, each worker's XLA sizes its
  pool to its share; tests that need every core (thread-count checks) widen their child
  process's affinity themselves (``all_cpus``).
  """
  worker, count = os.environ.get("PYTEST_XDIST_WORKER"), os.environ.get("PYTEST_XDIST_WORKER_COUNT")
  if not (worker and count and hasattr(os, "sched_setaffinity")):
    return
  cpus, n, i = sorted(os.sched_getaffinity(0)), int(count), int(worker.lstrip("gw"))
  os.environ.setdefault("WCDM_TEST_ALL_CPUS", ",".join(map(str, cpus)))
  share = cpus[i * len(cpus) // n:(i + 1) * len(cpus) // n] or [cpus[i % len(cpus)]]
  os.sched_setaffinity(0, share)


_pin_xdist_worker()

import pytest  # pylint: disable=g-import-not-at-top

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.environ.get("WCDM_SHARED", os.path.join(os.path.dirname(REPO), "shared"))
FIXTURES = os.path.join(SHARED, "reference", "fixtures")
RELEASE = os.path.join(SHARED, "reference", "lcv-denoisers")
DATA = os.path.join(SHARED, "data")


# The slowest files first, so that two workers (--dist loadfile) finish together.
_SLOW_FIRST = ("test_determinism", "test_reproduce", "test_training", "test_benchmarks",
               "test_multiprocess", "test_models", "test_inverse", "test_robustness", "test_api",
               "test_native_build", "test_launch_tools", "test_colab", "test_flags")


def pytest_collection_modifyitems(items):
  rank = lambda item: (_SLOW_FIRST.index(item.module.__name__)
                       if getattr(item, "module", None) and item.module.__name__ in _SLOW_FIRST
                       else len(_SLOW_FIRST))
  items.sort(key=rank)  # stable: the order within a file is kept


def native_variants() -> list[str]:
  """Every native kernel variant this machine can run: each ISA of its CPU (avx512, avx2,
  generic) and 'generic16', the portable source at the AVX-512 tile geometry. Empty only
  without a C++ compiler (then the native tests skip, saying so)."""
  from wcdm_jax import native_build  # pylint: disable=g-import-not-at-top
  isas = list(native_build.cpu_isas())
  return isas + ["generic16"] if isas else []


def all_cpus() -> list[int]:
  """The cores this test run may use (an xdist worker itself is pinned to its share)."""
  text = os.environ.get("WCDM_TEST_ALL_CPUS")
  return [int(c) for c in text.split(",")] if text else sorted(os.sched_getaffinity(0))


def cli_env(devices: int = 1, **extra: str) -> dict:
  """Environment of a CLI or script run by a test: CPU, ``devices`` simulated devices, the
  tests' fast compilation, plus ``extra``."""
  flags = FAST_COMPILE + (f" --xla_force_host_platform_device_count={devices}" if devices > 1
                          else "")
  env = dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS="cpu")
  env.pop("NPROC", None)  # one device: XLA's pools follow the CPUs; several: see the top
  if devices > 1:
    env["NPROC"] = str(2 * devices)
  return dict(env, **extra)


def shared_path(*parts: str) -> str:
  """Path inside ../shared, or skip the test when it is absent."""
  path = os.path.join(SHARED, *parts)
  if not os.path.exists(path):
    pytest.skip(f"{path} not available (../shared is absent)")
  return path


def write_random_images(folder, count: int, shape=(20, 20, 3), seed: int = 0) -> str:
  """``count`` random RGB PNGs im00.png, im01.png, ... of ``shape`` in ``folder``."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  from PIL import Image  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(seed)
  for i in range(count):
    Image.fromarray((rng.random(shape) * 255).astype(np.uint8)).save(
        os.path.join(str(folder), f"im{i:02d}.png"))
  return str(folder)
