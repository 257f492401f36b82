"""Native CPU convolutions: an AVX-512 direct 'same' convolution called through the XLA FFI.

XLA:CPU lowers these 3x3, 64-channel convolutions to Eigen at 90-150 GFLOP/s on a 2-core
AVX-512 machine, where a register-tiled direct convolution reaches 200+. The kernels live in
``native/conv_cpu.cc``; the first call compiles them with the system C++ compiler into a
per-user cache (``$WCDM_JAX_CACHE``, default ``~/.cache/wcdm_jax``) and registers them as
FFI targets. ``available()`` says whether that worked; ``models.conv2d(impl='auto')`` falls
back to XLA's convolution when it did not (no compiler, no AVX-512, not a CPU backend) or
when a layer is outside what the kernel does (even kernel sizes, Cout not a multiple of 16,
Cin < 8, other dtypes). Set ``WCDM_JAX_NATIVE=0`` to never build or use it.

3x3 layers with Cin % 16 == 0 use Winograd F(2x2, 3x3) (2.25x fewer multiplies; float32
round-off of the same order as the direct form), others a register-tiled direct convolution.
``conv(x, kernel, relu)`` is differentiable in reverse mode: the input gradient is the same
kernel with the flipped, transposed filter bank and the kernel gradient has its own kernel.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile

import jax
import jax.numpy as jnp

_SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "native", "conv_cpu.cc")
_FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-w")
_TARGETS = {"wcdm_conv_fwd": "WcdmConvFwd", "wcdm_conv_winograd": "WcdmConvWinograd",
            "wcdm_conv_wgrad": "WcdmConvWgrad"}


def _cache_dir() -> str:
  return os.environ.get("WCDM_JAX_CACHE") or os.path.join(
      os.path.expanduser("~"), ".cache", "wcdm_jax")


def _cpu_has_avx512() -> bool:
  try:
    with open("/proc/cpuinfo", encoding="utf-8") as f:
      return " avx512f" in f.read()
  except OSError:
    return False


def build(cache_dir: str | None = None) -> str:
  """Compiles the kernels (once per source, compiler flags and jax version); returns the .so path.

  Raises RuntimeError with the compiler's message when compiling fails.
  """
  cxx = os.environ.get("CXX", "g++")
  if shutil.which(cxx) is None:
    raise RuntimeError(f"no C++ compiler {cxx!r} on PATH (set CXX to one)")
  with open(_SOURCE, "rb") as f:
    source = f.read()
  tag = hashlib.sha256(source + repr((cxx, _FLAGS, jax.__version__)).encode()).hexdigest()[:16]
  out_dir = cache_dir or _cache_dir()
  path = os.path.join(out_dir, f"wcdm_conv_cpu_{tag}.so")
  if os.path.exists(path):
    return path
  try:
    os.makedirs(out_dir, exist_ok=True)
  except OSError:  # e.g. a read-only home: build in the temporary directory instead
    out_dir = os.path.join(tempfile.gettempdir(), f"wcdm_jax_{os.getuid()}")
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, os.path.basename(path))
  fd, tmp = tempfile.mkstemp(suffix=".so", dir=out_dir)
  os.close(fd)
  cmd = [cxx, *_FLAGS, "-I", jax.ffi.include_dir(), _SOURCE, "-o", tmp]
  proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
  if proc.returncode != 0:
    os.unlink(tmp)
    raise RuntimeError(f"compiling {_SOURCE} failed:\n{' '.join(cmd)}\n{proc.stderr[-2000:]}")
  os.replace(tmp, path)  # atomic: concurrent builders are safe
  logging.info("wcdm_jax: compiled the native CPU convolutions into %s", path)
  return path


@functools.lru_cache(maxsize=None)
def _load() -> str | None:
  """Builds and registers the kernels once; returns None (and logs why) when unavailable."""
  if os.environ.get("WCDM_JAX_NATIVE", "1") == "0":
    return None
  if not _cpu_has_avx512():
    logging.info("wcdm_jax: CPU without AVX-512; using XLA's convolutions")
    return None
  try:
    path = build()
    lib = ctypes.cdll.LoadLibrary(path)
    for target, symbol in _TARGETS.items():
      jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(lib, symbol)), platform="cpu")
  except (RuntimeError, OSError, AttributeError) as e:
    logging.warning("wcdm_jax: native CPU convolutions unavailable, using XLA's: %s", e)
    return None
  return path


def available() -> bool:
  """Whether the native kernels are built and registered (builds them on the first call)."""
  return _load() is not None


def supports(x: jax.Array, kernel: jax.Array) -> bool:
  """Whether ``conv(x, kernel)`` is handled natively (else use XLA's convolution)."""
  k, cin, cout = kernel.shape[0], kernel.shape[2], kernel.shape[3]
  # Few input channels (a net's first layer) leave the tiles too short: XLA does better.
  return (k % 2 == 1 and kernel.shape[1] == k and cout % 16 == 0 and cin >= 8 and x.ndim == 4
          and x.dtype == jnp.float32 and kernel.dtype == jnp.float32)


def _require() -> None:
  if not available():
    raise RuntimeError("native CPU convolutions are unavailable (see the logged warning); "
                       "use conv_impl='auto' or 'xla'")


def uses_winograd(x: jax.Array, kernel: jax.Array) -> bool:
  """3x3 layers with Cin % 16 == 0 run as Winograd F(2x2, 3x3): 2.25x fewer multiplies."""
  return kernel.shape[0] == 3 and kernel.shape[2] % 16 == 0


def _fwd_call(x: jax.Array, kernel: jax.Array, relu: bool, winograd: bool = True) -> jax.Array:
  _require()
  out = jax.ShapeDtypeStruct(x.shape[:-1] + kernel.shape[-1:], x.dtype)
  if winograd and uses_winograd(x, kernel):
    return jax.ffi.ffi_call("wcdm_conv_winograd", out, vmap_method="sequential")(
        x, kernel, relu=relu)
  return jax.ffi.ffi_call("wcdm_conv_fwd", out, vmap_method="sequential")(x, kernel, relu=relu)


def _wgrad_call(x: jax.Array, g: jax.Array, k: int) -> jax.Array:
  _require()
  out = jax.ShapeDtypeStruct((k, k, x.shape[-1], g.shape[-1]), x.dtype)
  return jax.ffi.ffi_call("wcdm_conv_wgrad", out, vmap_method="sequential")(x, g, k=k)


def lax_conv(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """XLA's 'same' convolution, NHWC x HWIO: the fallback for layers the kernels do not handle."""
  return jax.lax.conv_general_dilated(x, kernel, (1, 1), "SAME",
                                      dimension_numbers=("NHWC", "HWIO", "NHWC"))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def conv(x: jax.Array, kernel: jax.Array, relu: bool = False, winograd: bool = True) -> jax.Array:
  """'same' convolution (B, H, W, Cin) x (k, k, Cin, Cout) -> (B, H, W, Cout), ReLU optional.

  Needs ``available()`` and ``supports(x, kernel)``. winograd=False forces the direct form.
  """
  return _fwd_call(x, kernel, relu, winograd)


def _conv_fwd(x, kernel, relu, winograd):
  y = _fwd_call(x, kernel, relu, winograd)
  return y, (x, kernel, y if relu else None)  # y only for the ReLU mask


def _conv_bwd(relu, winograd, res, g):
  x, kernel, y = res
  if relu:
    g = jnp.where(y > 0, g, 0)
  flipped = jnp.flip(kernel, (0, 1)).swapaxes(2, 3)  # (k, k, Cout, Cin)
  dx = _fwd_call(g, flipped, False, winograd) if supports(g, flipped) else lax_conv(g, flipped)
  return dx, _wgrad_call(x, g, kernel.shape[0])


conv.defvjp(_conv_fwd, _conv_bwd)
