"""Building and loading the native CPU kernels: one library per instruction set, from one source.

``native/conv_cpu.cc`` is compiled on first use with the system C++ compiler (``$CXX``, default
``g++``) into a per-user cache (``$WCDM_JAX_CACHE``, default ``~/.cache/wcdm_jax``; the
temporary directory when that is not writable), once per *variant*:

- ``avx512``: ``-mavx512f -mavx2 -mfma``, 16-lane vectors; ``avx2``: ``-mavx2 -mfma``, 8 lanes;
- ``generic``: the architecture's baseline, no intrinsics (SSE2 on x86-64, NEON on aarch64);
- ``generic16``: the portable source at the AVX-512 variant's tile geometry in plain arrays
  (the code a compiler without vector extensions gets), so that the tests run that tiling and
  that code on any CPU (never chosen for speed).

Every variant is built with explicit target flags (never ``-march=native``), and the cache key
holds the source, the compiler's identity, the flags and the jax version: a cached library is
valid on any host whose CPU reports its instruction set. ``cpu_isas()`` asks the CPU itself
(cpuid and xgetbv, through a tiny baseline library), and ``load`` refuses a variant the CPU
cannot execute before the library is opened. Each library's SHA-256 is kept beside it and
checked before loading, and its exported ISA and build tag after: a stale, truncated or
foreign file in the cache is rebuilt, never run. The kernels are registered as XLA FFI targets
named ``wcdm_conv_{fwd,winograd,wgrad}_{variant}``; ``wcdm_jax.conv`` decides which runs.
"""
from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import fcntl
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile

import jax

_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "native")
SOURCE = os.path.join(_DIR, "conv_cpu.cc")
PROBE_SOURCE = os.path.join(_DIR, "cpu_features.cc")
_BASE_FLAGS = ("-O3", "-std=c++17", "-shared", "-fPIC", "-w")
KERNELS = {"fwd": "WcdmConvFwd", "winograd": "WcdmConvWinograd", "wgrad": "WcdmConvWgrad"}
ISAS = ("avx512", "avx2", "generic")  # fastest first


class NativeUnavailable(RuntimeError):
  """The native kernels cannot be built or loaded here (the message says why)."""


@dataclasses.dataclass(frozen=True)
class Variant:
  """One build of the kernel source: the ISA the CPU needs, target flags and defines."""
  name: str
  isa: str
  flags: tuple[str, ...] = ()
  defines: tuple[str, ...] = ()


VARIANTS = {
    "avx512": Variant("avx512", "avx512", ("-mavx512f", "-mavx2", "-mfma"), ("WCDM_ISA_AVX512",)),
    "avx2": Variant("avx2", "avx2", ("-mavx2", "-mfma"), ("WCDM_ISA_AVX2",)),
    "generic": Variant("generic", "generic"),
    "generic16": Variant("generic16", "generic",
                         defines=("WCDM_LANES=16", "WCDM_ACC=24", "WCDM_MAX_NV=4", "WCDM_PLAIN_CXX")),
}


def target_name(kernel: str, variant: str) -> str:
  """The FFI target of one kernel ('fwd' | 'winograd' | 'wgrad') of one variant."""
  return f"wcdm_conv_{kernel}_{variant}"


def cache_dir() -> str:
  """Where compiled kernels are cached ($WCDM_JAX_CACHE, else ~/.cache/wcdm_jax)."""
  return os.environ.get("WCDM_JAX_CACHE") or os.path.join(
      os.path.expanduser("~"), ".cache", "wcdm_jax")


@functools.lru_cache(maxsize=None)
def _compiler_identity(cxx: str) -> str:
  """``cxx --version`` and the target triple: two compilers never share a cache entry."""
  if shutil.which(cxx) is None:
    raise NativeUnavailable(f"no C++ compiler {cxx!r} on PATH (set CXX to one)")
  out = []
  for arg in ("--version", "-dumpmachine"):
    proc = subprocess.run([cxx, arg], capture_output=True, text=True, check=False)
    out.append(proc.stdout.strip())
  return "\n".join(out)


def _writable(out_dir: str) -> str:
  """out_dir if files can be created in it, else a per-user folder in the temporary directory."""
  try:
    os.makedirs(out_dir, exist_ok=True)
    fd, probe = tempfile.mkstemp(dir=out_dir)
    os.close(fd)
    os.unlink(probe)
    return out_dir
  except OSError:
    fallback = os.path.join(tempfile.gettempdir(), f"wcdm_jax_{os.getuid()}")
    os.makedirs(fallback, exist_ok=True)
    logging.info("wcdm_jax: %s is not writable; building the native kernels in %s", out_dir,
                 fallback)
    return fallback


def _sha256(path: str) -> str:
  with open(path, "rb") as f:
    return hashlib.sha256(f.read()).hexdigest()


def _intact(path: str) -> bool:
  """The library exists and its bytes are the ones its build recorded."""
  try:
    with open(path + ".sha256", encoding="ascii") as f:
      return f.read().strip() == _sha256(path)
  except OSError:
    return False


@contextlib.contextmanager
def _locked(path: str):
  """One builder of ``path`` at a time (other processes wait, then find it built)."""
  with open(path + ".lock", "a", encoding="ascii") as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


def _compile(cxx: str, args: list[str], source: str, path: str) -> None:
  """Compile into a temporary file, then move it and its checksum into place (atomically)."""
  out_dir = os.path.dirname(path)
  fd, tmp = tempfile.mkstemp(suffix=".so", dir=out_dir)
  os.close(fd)
  cmd = [cxx, *args, source, "-o", tmp]
  try:
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
      raise NativeUnavailable(f"compiling {source} failed:\n{' '.join(cmd)}\n"
                              f"{proc.stderr[-2000:]}")
    digest = _sha256(tmp)
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.unlink(tmp)
  fd, tmp = tempfile.mkstemp(suffix=".sha256", dir=out_dir)
  with os.fdopen(fd, "w", encoding="ascii") as f:
    f.write(digest + "\n")
  os.replace(tmp, path + ".sha256")


def build_tag(variant: Variant, cxx: str | None = None) -> str:
  """The cache key of a variant's build: source, compiler identity, flags, defines, jax."""
  cxx = cxx or os.environ.get("CXX", "g++")
  with open(SOURCE, "rb") as f:
    source = f.read()
  key = repr((_compiler_identity(cxx), _BASE_FLAGS, variant.flags, variant.defines,
              jax.__version__)).encode()
  return hashlib.sha256(source + key).hexdigest()[:16]


def build(variant: str = "generic", cache: str | None = None, cxx: str | None = None) -> str:
  """Compiles one variant of the kernels (once per cache key); returns the library's path.

  Compiling needs no CPU support for the variant (cross compilers and foreign ISAs are fine);
  loading does (``load``). Raises NativeUnavailable with the compiler's message on failure.
  """
  v = VARIANTS[variant]
  cxx = cxx or os.environ.get("CXX", "g++")
  tag = build_tag(v, cxx)
  out_dir = _writable(cache or cache_dir())
  path = os.path.join(out_dir, f"wcdm_conv_{v.name}_{tag}.so")
  if _intact(path):
    return path
  with _locked(path):
    if _intact(path):  # another process built it meanwhile
      return path
    if os.path.exists(path):
      logging.warning("wcdm_jax: the cached %s does not match its checksum; rebuilding it", path)
    defines = [f"-D{d}" for d in v.defines] + [f'-DWCDM_BUILD_TAG="{tag}"']
    _compile(cxx, [*_BASE_FLAGS, *v.flags, *defines, "-I", jax.ffi.include_dir()], SOURCE, path)
  logging.info("wcdm_jax: compiled the %s native CPU convolutions into %s", v.name, path)
  return path


@functools.lru_cache(maxsize=None)
def cpu_isas() -> tuple[str, ...]:
  """The ISAs of ``ISAS`` this CPU and OS can execute, fastest first (cpuid + xgetbv).

  'generic' is always there when a compiler is; () without a compiler.
  """
  cxx = os.environ.get("CXX", "g++")
  try:
    out_dir = _writable(cache_dir())
    tag = hashlib.sha256(open(PROBE_SOURCE, "rb").read() +
                         _compiler_identity(cxx).encode()).hexdigest()[:16]
    path = os.path.join(out_dir, f"wcdm_cpu_features_{tag}.so")
    with _locked(path):
      if not _intact(path):
        _compile(cxx, ["-O1", "-shared", "-fPIC", "-w"], PROBE_SOURCE, path)
    features = int(ctypes.cdll.LoadLibrary(path).WcdmCpuFeatures())
  except (NativeUnavailable, OSError, AttributeError) as e:
    logging.warning("wcdm_jax: cannot probe the CPU for the native kernels: %s", e)
    return ()
  return tuple(isa for isa, ok in (("avx512", features & 2), ("avx2", features & 1),
                                   ("generic", True)) if ok)


def cpu_name() -> str:
  """The CPU's model name (for messages and benchmark tables)."""
  try:
    with open("/proc/cpuinfo", encoding="utf-8") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


@functools.lru_cache(maxsize=None)
def load(variant: str) -> str:
  """Builds (if needed), checks and registers one variant's kernels; returns the library path.

  Raises NativeUnavailable when the CPU cannot execute the variant (the library is then
  never opened), when compiling fails, or when the library is not the build it claims to be.
  """
  v = VARIANTS[variant]
  isas = cpu_isas()
  if v.isa not in isas:
    raise NativeUnavailable(
        f"this CPU ({cpu_name()}) cannot run the {v.isa} kernels; it runs: "
        f"{', '.join(isas) or 'none (no compiler)'}")
  path = build(variant)
  try:
    lib = ctypes.cdll.LoadLibrary(path)
  except OSError:  # e.g. a library truncated after its checksum was written: build afresh
    os.unlink(path)
    path = build(variant)
    lib = ctypes.cdll.LoadLibrary(path)
  lib.WcdmIsa.restype = lib.WcdmBuildTag.restype = ctypes.c_char_p
  isa, tag = lib.WcdmIsa().decode(), lib.WcdmBuildTag().decode()
  if isa != v.isa or tag != build_tag(v):
    raise NativeUnavailable(f"{path} is a {isa} build tagged {tag}, not the {v.isa} build "
                            f"{build_tag(v)}: delete it")
  for kernel, symbol in KERNELS.items():
    jax.ffi.register_ffi_target(target_name(kernel, variant),
                                jax.ffi.pycapsule(getattr(lib, symbol)), platform="cpu")
  return path
