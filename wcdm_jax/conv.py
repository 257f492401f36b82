"""How a bias-free 'same' convolution runs: XLA, im2col, the native CPU kernels, their gradients.

``conv2d(x, kernel, impl)`` is the one entry point the networks call. ``impl``:

- 'auto' (default): on CPU, the native kernels of the ISA ``native_isa()`` picks, for the
  layers they handle (``native_supports``: odd k, Cout % 16 == 0, Cin >= 8, float32); XLA's
  convolution with a faster kernel gradient elsewhere, and on GPU and TPU.
- 'native': the native kernels (CPU only; layers they do not handle use 'xla').
- 'xla': ``lax.conv``; on CPU its kernel gradient is ``kernel_grad`` (same values, faster
  than XLA's own). 'xla_autodiff': ``lax.conv`` with XLA's gradients. 'matmul': one matrix
  product over the k^2 shifted copies of the input (im2col).

The native kernels (``native/conv_cpu.cc``, built by ``native_build``): Winograd F(2x2, 3x3)
for 3x3 layers with Cin % 16 == 0, a register-tiled direct convolution otherwise, the ReLU
fused, and a direct kernel gradient; bit-identical run to run and for any thread count.

Which ISA: ``WCDM_JAX_NATIVE_ISA`` = auto (default) | avx512 | avx2 | generic | off
(``WCDM_JAX_NATIVE=0`` is off too). 'auto' takes the fastest of ``AUTO_ISAS`` that the CPU
runs (cpuid): AVX-512, else AVX2 + FMA; where neither is there, XLA (the portable 'generic'
kernels are slower than XLA's convolutions on the CPUs measured, README "Benchmarks").
Forcing an ISA the CPU lacks is an error naming the CPU's ISAs.
"""
from __future__ import annotations

import functools
import logging
import os

import jax
import jax.numpy as jnp

from wcdm_jax import native_build

CONV_IMPLS = ("auto", "native", "xla", "xla_autodiff", "matmul")
AUTO_ISAS = ("avx512", "avx2")
ISA_CHOICES = ("auto",) + native_build.ISAS + ("off",)


class NativeIsaError(ValueError):
  """WCDM_JAX_NATIVE_ISA asks for something this machine cannot do."""


def _requested_isa() -> str:
  if os.environ.get("WCDM_JAX_NATIVE", "1") == "0":
    return "off"
  isa = os.environ.get("WCDM_JAX_NATIVE_ISA", "auto").strip().lower() or "auto"
  if isa not in ISA_CHOICES:
    raise NativeIsaError(f"WCDM_JAX_NATIVE_ISA={isa!r}: use one of {', '.join(ISA_CHOICES)}")
  return isa


@functools.lru_cache(maxsize=None)
def native_isa() -> str | None:
  """The native variant 'auto' and 'native' use here, or None for XLA's convolutions.

  Raises NativeIsaError when WCDM_JAX_NATIVE_ISA forces an ISA this CPU lacks or that cannot
  be built; with 'auto', a failed build is logged and XLA is used.
  """
  isa = _requested_isa()
  if isa == "off":
    return None
  if isa != "auto":
    if isa not in native_build.cpu_isas():
      have = ", ".join(native_build.cpu_isas()) or "none (no C++ compiler)"
      raise NativeIsaError(f"WCDM_JAX_NATIVE_ISA={isa}, but this CPU ({native_build.cpu_name()})"
                           f" runs: {have}; set one of those, auto or off")
    try:
      native_build.load(isa)
    except native_build.NativeUnavailable as e:
      raise NativeIsaError(f"WCDM_JAX_NATIVE_ISA={isa}: {e}".splitlines()[0]) from e
    return isa
  if not native_build.cpu_isas():  # no compiler: cpu_isas logged why
    return None
  usable = [i for i in AUTO_ISAS if i in native_build.cpu_isas()]
  if not usable:
    logging.info("wcdm_jax: no AVX2 or AVX-512 on this CPU (%s); using XLA's convolutions "
                 "(WCDM_JAX_NATIVE_ISA=generic forces the portable kernels)",
                 native_build.cpu_name())
    return None
  try:
    native_build.load(usable[0])
  except native_build.NativeUnavailable as e:
    logging.warning("wcdm_jax: native CPU convolutions unavailable, using XLA's: %s", e)
    return None
  return usable[0]


def check_native_setting() -> None:
  """Raises NativeIsaError when WCDM_JAX_NATIVE_ISA is unknown or names an ISA this CPU lacks.

  Builds nothing and touches no device: entry points call it first, to fail in one line.
  """
  isa = _requested_isa()
  if isa not in ("auto", "off") and isa not in native_build.cpu_isas():
    native_isa()  # raises, naming the CPU's ISAs


@functools.lru_cache(maxsize=None)
def native_available(isa: str | None = None) -> bool:
  """Whether the kernels of ``isa`` (default: the dispatched one) are built and registered."""
  if isa is None:
    return native_isa() is not None
  try:
    native_build.load(isa)
    return True
  except native_build.NativeUnavailable as e:
    logging.info("wcdm_jax: %s kernels unavailable: %s", isa, e)
    return False


def native_supports(x: jax.Array, kernel: jax.Array) -> bool:
  """Whether ``native_conv(x, kernel)`` handles the layer (else XLA's convolution runs)."""
  k, cin, cout = kernel.shape[0], kernel.shape[2], kernel.shape[3]
  # Few input channels (a net's first layer) leave the tiles too short: XLA does better.
  return (k % 2 == 1 and kernel.shape[1] == k and cout % 16 == 0 and cin >= 8 and x.ndim == 4
          and x.dtype == jnp.float32 and kernel.dtype == jnp.float32)


def uses_winograd(kernel: jax.Array) -> bool:
  """3x3 layers with Cin % 16 == 0 run as Winograd F(2x2, 3x3): 2.25x fewer multiplies."""
  return kernel.shape[0] == 3 and kernel.shape[2] % 16 == 0


def _variant(isa: str | None) -> str:
  isa = isa or native_isa()
  if isa is None or not native_available(isa):
    raise RuntimeError("native CPU convolutions are unavailable (see the logged warning); "
                       "use conv_impl='auto' or 'xla'")
  return isa


def _fwd_call(x, kernel, relu: bool, winograd: bool, isa: str | None) -> jax.Array:
  isa = _variant(isa)
  out = jax.ShapeDtypeStruct(x.shape[:-1] + kernel.shape[-1:], x.dtype)
  kind = "winograd" if winograd and uses_winograd(kernel) else "fwd"
  return jax.ffi.ffi_call(native_build.target_name(kind, isa), out, vmap_method="sequential")(
      x, kernel, relu=relu)


def native_kernel_grad(x: jax.Array, g: jax.Array, k: int, isa: str | None = None) -> jax.Array:
  """d conv / d kernel (k, k, Cin, Cout) of x (B, H, W, Cin) and g (B, H, W, Cout), natively."""
  isa = _variant(isa)
  out = jax.ShapeDtypeStruct((k, k, x.shape[-1], g.shape[-1]), x.dtype)
  return jax.ffi.ffi_call(native_build.target_name("wgrad", isa), out, vmap_method="sequential")(
      x, g, k=k)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def native_conv(x: jax.Array, kernel: jax.Array, relu: bool = False, winograd: bool = True,
                isa: str | None = None) -> jax.Array:
  """'same' convolution (B, H, W, Cin) x (k, k, Cin, Cout) -> (B, H, W, Cout), ReLU optional.

  Needs ``native_supports(x, kernel)``. winograd=False forces the direct form; isa names a
  variant of ``native_build.VARIANTS`` (default: ``native_isa()``). Differentiable in reverse
  mode: the input gradient is the same kernel with the flipped, transposed filter bank and the
  kernel gradient has its own kernel.
  """
  return _fwd_call(x, kernel, relu, winograd, isa)


def _native_fwd(x, kernel, relu, winograd, isa):
  y = _fwd_call(x, kernel, relu, winograd, isa)
  return y, (x, kernel, y if relu else None)  # y only for the ReLU mask


def _native_bwd(relu, winograd, isa, res, g):
  x, kernel, y = res
  if relu:
    g = jnp.where(y > 0, g, 0)
  flipped = jnp.flip(kernel, (0, 1)).swapaxes(2, 3)  # (k, k, Cout, Cin)
  dx = (_fwd_call(g, flipped, False, winograd, isa) if native_supports(g, flipped)
        else lax_conv(g, flipped))
  return dx, native_kernel_grad(x, g, kernel.shape[0], isa)


native_conv.defvjp(_native_fwd, _native_bwd)


def lax_conv(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """XLA's 'same' convolution, NHWC x HWIO."""
  return jax.lax.conv_general_dilated(x, kernel, (1, 1), "SAME",
                                      dimension_numbers=("NHWC", "HWIO", "NHWC"))


def im2col(x: jax.Array, k: int) -> jax.Array:
  """(B, H, W, C) -> (B, H, W, k*k*C): the k x k 'same'-padded neighbourhood of each pixel."""
  h, w, p = x.shape[1], x.shape[2], k // 2
  xp = jnp.pad(x, ((0, 0), (p, p), (p, p), (0, 0)))
  return jnp.concatenate([xp[:, i:i + h, j:j + w] for i in range(k) for j in range(k)], -1)


def kernel_grad(x: jax.Array, g: jax.Array, k: int) -> jax.Array:
  """d conv / d kernel: sum over images of im2col(x)^T @ g, a few images at a time.

  XLA:CPU lowers the autodiff kernel gradient to a convolution with an image-sized window,
  which runs several times slower than the forward pass; here it is a loop of matrix
  products whose im2col buffers stay small.
  """
  b, h, w, cin = x.shape
  chunk = 2 if b % 2 == 0 else 1
  xs = x.reshape(b // chunk, chunk, h, w, cin)
  gs = g.reshape(b // chunk, chunk, h, w, g.shape[-1])

  def body(acc, xg):
    xc, gc = xg
    cols = im2col(xc, k)
    return acc + jnp.einsum("nc,nd->cd", cols.reshape(-1, k * k * cin),
                            gc.reshape(-1, gc.shape[-1]), preferred_element_type=jnp.float32), None

  acc, _ = jax.lax.scan(body, jnp.zeros((k * k * cin, g.shape[-1]), jnp.float32), (xs, gs))
  return acc.reshape(k, k, cin, g.shape[-1])


@jax.custom_vjp
def _xla_cpu_conv(x: jax.Array, kernel: jax.Array) -> jax.Array:
  return lax_conv(x, kernel)


def _xla_cpu_fwd(x, kernel):
  return lax_conv(x, kernel), (x, kernel)


def _xla_cpu_bwd(res, g):
  x, kernel = res
  dx = lax_conv(g, jnp.flip(kernel, (0, 1)).swapaxes(2, 3))
  return dx, kernel_grad(x, g, kernel.shape[0]).astype(kernel.dtype)


_xla_cpu_conv.defvjp(_xla_cpu_fwd, _xla_cpu_bwd)


def uses_native(impl: str, x: jax.Array, kernel: jax.Array) -> bool:
  """Whether ``conv2d(x, kernel, impl)`` runs the native kernels."""
  on_cpu = jax.default_backend() == "cpu"
  if impl == "native" and not on_cpu:
    raise ValueError("conv_impl='native' is a CPU kernel; use 'auto' or 'xla' on "
                     f"{jax.default_backend()}")
  if impl not in ("auto", "native") or not on_cpu:
    return False
  if impl == "native" and not native_available():
    raise RuntimeError("conv_impl='native' but the native CPU kernels could not be built (see "
                       "the logged warning); use conv_impl='auto' to fall back to XLA")
  return native_supports(x, kernel) and native_available()


def conv2d(x: jax.Array, kernel: jax.Array, impl: str = "auto", relu: bool = False) -> jax.Array:
  """Bias-free 'same' convolution: x (B, H, W, Cin), kernel (k, k, Cin, Cout) -> (B, H, W, Cout).

  ``impl``: one of ``CONV_IMPLS`` (module docstring). Outside the native kernels, 1x1
  convolutions are matrix products. relu=True applies a ReLU (fused into the native kernel).
  """
  if impl not in CONV_IMPLS:
    raise ValueError(f"conv impl must be one of {CONV_IMPLS}, got {impl!r}")
  k = kernel.shape[0]
  kernel = kernel.astype(x.dtype)
  if uses_native(impl, x, kernel):
    return native_conv(x, kernel, relu)
  if k == 1:
    y = jnp.einsum("bhwc,cd->bhwd", x, kernel[0, 0])
  elif impl == "matmul":
    y = jnp.einsum("bhwc,cd->bhwd", im2col(x, k), kernel.reshape(-1, kernel.shape[-1]))
  elif impl in ("xla", "auto", "native") and jax.default_backend() == "cpu":
    y = _xla_cpu_conv(x, kernel)
  else:
    y = lax_conv(x, kernel)
  return jax.nn.relu(y) if relu else y
