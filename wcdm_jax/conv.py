"""How a bias-free 'same' convolution is lowered: XLA, im2col, the native CPU kernels, their
derivatives, per platform.

``conv2d(x, kernel, impl)`` is the one entry point the networks call. ``impl``:

- 'auto' (default): on CPU, the native kernels of the ISA ``native_isa()`` picks, for the
  layers they handle (``native_supports``: odd k, Cout % 16 == 0, Cin >= 8, float32); XLA's
  convolution with a faster kernel gradient elsewhere on CPU; XLA's convolutions and
  gradients on GPU and TPU.
- 'native': the native kernels on CPU (layers they do not handle use 'xla').
- 'xla': ``lax.conv``; on CPU its kernel gradient is ``kernel_grad`` (same values, faster
  than XLA's own). 'xla_autodiff': ``lax.conv`` with XLA's gradients everywhere. 'matmul':
  one matrix product over the k^2 shifted copies of the input (im2col).

The platform is chosen when the program is *lowered*, not when it is traced: 'auto',
'native' and 'xla' bind two primitives, ``conv_p`` (the convolution, ReLU optionally fused)
and ``wgrad_p`` (its kernel gradient), whose CPU lowering calls the native kernels (or
``kernel_grad``) and whose lowering for every other platform is XLA's convolution. So one
traced program exports for ``('cuda',)`` or ``('tpu',)`` from a CPU host and holds no CPU
custom call there. Both primitives are bilinear: forward mode (``jax.jvp``, ``jacfwd``,
``linearize``) and reverse mode come from one JVP rule and its transposes, which call the
same primitives (the input gradient is the convolution with the flipped, transposed filter
bank; the kernel gradient is ``wgrad_p``), so reverse mode keeps the native kernels. Under
``vmap`` a batched input folds into the image batch.

The native kernels (``native/conv_cpu.cc``, built by ``native_build``): Winograd F(2x2, 3x3)
for 3x3 layers with Cin % 16 == 0, a register-tiled direct convolution otherwise, the ReLU
fused, and a direct kernel gradient; bit-identical run to run and for any thread count.
They see one device's shard only: a data-parallel program runs them inside ``shard_map``
(``wcdm_jax.parallel``), where each device convolves its own images.

Which ISA: ``WCDM_JAX_NATIVE_ISA`` = auto (default) | avx512 | avx2 | generic | off
(``WCDM_JAX_NATIVE=0`` is off too). 'auto' takes the fastest of ``AUTO_ISAS`` that the CPU
runs (cpuid): AVX-512, else AVX2 + FMA; where neither is there, XLA (the portable 'generic'
kernels are slower than XLA's convolutions on the CPUs measured, docs/benchmarks.md).
Forcing an ISA the CPU lacks is an error naming the CPU's ISAs.
"""
from __future__ import annotations

import functools
import logging
import os

import jax
import jax.numpy as jnp
from jax._src import core as _jax_core  # auto_insert_reshard: see _unify
from jax.extend import core as jex_core
from jax.interpreters import ad, batching, mlir

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


# --- the XLA forms (every platform) -----------------------------------------------------------

def lax_conv(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """XLA's 'same' convolution, NHWC x HWIO."""
  return jax.lax.conv_general_dilated(x, kernel, (1, 1), "SAME",
                                      dimension_numbers=("NHWC", "HWIO", "NHWC"))


def flip_kernel(kernel: jax.Array) -> jax.Array:
  """(k, k, Cin, Cout) -> (k, k, Cout, Cin): the filter bank of the input gradient."""
  return jnp.flip(kernel, (0, 1)).swapaxes(2, 3)


def im2col(x: jax.Array, k: int) -> jax.Array:
  """(B, H, W, C) -> (B, H, W, k*k*C): the k x k 'same'-padded neighbourhood of each pixel."""
  h, w, p = x.shape[1], x.shape[2], k // 2
  xp = jnp.pad(x, ((0, 0), (p, p), (p, p), (0, 0)))
  return jnp.concatenate([xp[:, i:i + h, j:j + w] for i in range(k) for j in range(k)], -1)


def kernel_grad(x: jax.Array, g: jax.Array, k: int) -> jax.Array:
  """d conv / d kernel: sum over images of im2col(x)^T @ g, a few images at a time.

  XLA:CPU lowers the autodiff kernel gradient to a convolution with an image-sized window,
  which runs several times slower than the forward pass; here it is a loop of matrix
  products whose im2col buffers stay small. (CPU lowering of ``wgrad_p`` for 'xla'.)
  """
  b, h, w, cin = x.shape
  chunk = 2 if b % 2 == 0 else 1
  xs = x.reshape(b // chunk, chunk, h, w, cin)
  gs = g.reshape(b // chunk, chunk, h, w, g.shape[-1])

  def product(xc, gc):
    cols = im2col(xc, k)
    return jnp.einsum("nc,nd->cd", cols.reshape(-1, k * k * cin), gc.reshape(-1, gc.shape[-1]),
                      preferred_element_type=jnp.float32)

  # The first product starts the sum (not a zero constant: inside shard_map the carry must
  # vary over devices like the operands do).
  acc, _ = jax.lax.scan(lambda acc, xg: (acc + product(*xg), None), product(xs[0], gs[0]),
                        (xs[1:], gs[1:]))
  return acc.reshape(k, k, cin, g.shape[-1]).astype(x.dtype)


def xla_kernel_grad(x: jax.Array, g: jax.Array, k: int) -> jax.Array:
  """d conv / d kernel as XLA's autodiff writes it (one convolution over the batch)."""
  zero = jnp.zeros((k, k, x.shape[-1], g.shape[-1]), x.dtype)
  return jax.vjp(lambda w: lax_conv(x, w), zero)[1](g)[0]


# --- the primitives: per-platform lowering, bilinear derivatives -------------------------------

conv_p = jex_core.Primitive("wcdm_conv")      # (x, kernel; relu, winograd, isa) -> y
wgrad_p = jex_core.Primitive("wcdm_conv_wgrad")  # (x, g; k, isa) -> d y / d kernel


# Inside shard_map, operands that vary over devices and replicated ones are cast to one type
# first, as jax.lax does for its own binary primitives.
_unify = getattr(_jax_core, "auto_insert_reshard", lambda *args: args)


def _bind_conv(x, kernel, relu=False, winograd=True, isa=None):
  x, kernel = _unify(x, kernel)
  return conv_p.bind(x, kernel, relu=relu, winograd=winograd, isa=isa)


def _bind_wgrad(x, g, k, isa=None):
  x, g = _unify(x, g)
  return wgrad_p.bind(x, g, k=k, isa=isa)


def _eager(prim):
  # Outside jit a primitive runs as a one-op jitted program (lowered for the device's platform).
  @functools.lru_cache(maxsize=None)
  def jitted(**params):
    return jax.jit(functools.partial(prim.bind, **params))
  return lambda *args, **params: jitted(**params)(*args)


conv_p.def_impl(_eager(conv_p))
wgrad_p.def_impl(_eager(wgrad_p))
# Outputs keep the operands' type (dtype, and inside shard_map their variation over devices).
conv_p.def_abstract_eval(lambda x, kernel, **_: x.update(shape=x.shape[:-1] + kernel.shape[-1:]))
wgrad_p.def_abstract_eval(
    lambda x, g, *, k, **_: x.update(shape=(k, k, x.shape[-1], g.shape[-1])))


def _xla_conv_rule(x, kernel, *, relu, winograd, isa):
  del winograd, isa
  y = lax_conv(x, kernel)
  return jax.nn.relu(y) if relu else y


def _xla_wgrad_rule(x, g, *, k, isa):
  del isa
  return xla_kernel_grad(x, g, k)


def _cpu_conv_rule(x, kernel, *, relu, winograd, isa):
  if isa is None:
    return _xla_conv_rule(x, kernel, relu=relu, winograd=winograd, isa=isa)
  kind = "winograd" if winograd and uses_winograd(kernel) else "fwd"
  out = jax.ShapeDtypeStruct(x.shape[:-1] + kernel.shape[-1:], x.dtype)
  return jax.ffi.ffi_call(native_build.target_name(kind, isa), out)(x, kernel, relu=relu)


def _cpu_wgrad_rule(x, g, *, k, isa):
  if isa is None:
    return kernel_grad(x, g, k)
  out = jax.ShapeDtypeStruct((k, k, x.shape[-1], g.shape[-1]), x.dtype)
  return jax.ffi.ffi_call(native_build.target_name("wgrad", isa), out)(x, g, k=k)


mlir.register_lowering(conv_p, mlir.lower_fun(_xla_conv_rule, multiple_results=False))
mlir.register_lowering(wgrad_p, mlir.lower_fun(_xla_wgrad_rule, multiple_results=False))
mlir.register_lowering(conv_p, mlir.lower_fun(_cpu_conv_rule, multiple_results=False),
                       platform="cpu")
mlir.register_lowering(wgrad_p, mlir.lower_fun(_cpu_wgrad_rule, multiple_results=False),
                       platform="cpu")


def _dx_isa(g, kernel, isa):
  """The input gradient's convolution runs natively when the flipped layer is supported."""
  return isa if isa is not None and native_supports(g, flip_kernel(kernel)) else None


# conv(x, kernel) with relu=False is bilinear: its transposes are the input gradient (the
# convolution with the flipped bank) and the kernel gradient (wgrad_p).
def _conv_jvp(primals, tangents, *, relu, winograd, isa):
  x, kernel = primals
  dx, dk = tangents
  y = _bind_conv(x, kernel, relu, winograd, isa)
  lin = dict(relu=False, winograd=winograd, isa=isa)
  terms = []
  if type(dx) is not ad.Zero:
    terms.append(_bind_conv(dx, kernel, **lin))
  if type(dk) is not ad.Zero:
    terms.append(_bind_conv(x, dk, **lin))
  if not terms:
    return y, ad.Zero.from_primal_value(y)
  t = terms[0] if len(terms) == 1 else terms[0] + terms[1]
  return y, (jnp.where(y > 0, t, jnp.zeros_like(t)) if relu else t)


def _conv_transpose_x(ct, x, kernel, *, relu, winograd, isa):
  assert not relu
  if type(ct) is ad.Zero:
    return ad.Zero(x.aval)
  return _bind_conv(ct, flip_kernel(kernel), False, winograd, _dx_isa(ct, kernel, isa))


def _conv_transpose_kernel(ct, x, kernel, *, relu, winograd, isa):
  assert not relu
  if type(ct) is ad.Zero:
    return ad.Zero(kernel.aval)
  return _bind_wgrad(x, ct, kernel.aval.shape[0], isa)


def _conv_transpose(ct, x, kernel, **params):
  if ad.is_undefined_primal(x):
    return [_conv_transpose_x(ct, x, kernel, **params), None]
  return [None, _conv_transpose_kernel(ct, x, kernel, **params)]


ad.primitive_jvps[conv_p] = _conv_jvp
ad.primitive_transposes[conv_p] = _conv_transpose


# wgrad(x, g) = sum over images and pixels of x-neighbourhoods times g: bilinear too.
def _wgrad_jvp(primals, tangents, *, k, isa):
  x, g = primals
  dx, dg = tangents
  y = _bind_wgrad(x, g, k, isa)
  terms = []
  if type(dx) is not ad.Zero:
    terms.append(_bind_wgrad(dx, g, k, isa))
  if type(dg) is not ad.Zero:
    terms.append(_bind_wgrad(x, dg, k, isa))
  if not terms:
    return y, ad.Zero.from_primal_value(y)
  return y, terms[0] if len(terms) == 1 else terms[0] + terms[1]


def _wgrad_transpose(ct, x, g, *, k, isa):
  if type(ct) is ad.Zero:
    return [None if not ad.is_undefined_primal(x) else ad.Zero(x.aval),
            None if not ad.is_undefined_primal(g) else ad.Zero(g.aval)]
  if ad.is_undefined_primal(g):  # d <ct, wgrad(x, g)> / d g = conv(x, ct)
    return [None, _bind_conv(x, ct, False, True, isa if native_supports(x, ct) else None)]
  # d / d x: the convolution of g with the flipped, transposed ct
  f = flip_kernel(ct)
  return [_bind_conv(g, f, False, True, isa if native_supports(g, f) else None), None]


ad.primitive_jvps[wgrad_p] = _wgrad_jvp
ad.primitive_transposes[wgrad_p] = _wgrad_transpose


def _fold(a, d):
  """Batched operand (vmapped at axis d) -> (V*B, ...) and V."""
  a = jnp.moveaxis(a, d, 0)
  return a.reshape((-1,) + a.shape[2:]), a.shape[0]


def _conv_batch(args, dims, **params):
  x, kernel = args
  dx, dk = dims
  if dk is None:  # fold the vmapped axis into the image batch
    xf, v = _fold(x, dx)
    y = conv_p.bind(xf, kernel, **params)
    return y.reshape((v, -1) + y.shape[1:]), 0
  xs = jnp.moveaxis(x, dx, 0) if dx is not None else None
  ks = jnp.moveaxis(kernel, dk, 0)
  if xs is None:
    return jax.lax.map(lambda k: conv_p.bind(x, k, **params), ks), 0
  return jax.lax.map(lambda a: conv_p.bind(a[0], a[1], **params), (xs, ks)), 0


def _wgrad_batch(args, dims, **params):
  x, g = args
  xs = (jnp.moveaxis(x, dims[0], 0) if dims[0] is not None else None)
  gs = (jnp.moveaxis(g, dims[1], 0) if dims[1] is not None else None)
  if xs is None:
    return jax.lax.map(lambda b: wgrad_p.bind(x, b, **params), gs), 0
  if gs is None:
    return jax.lax.map(lambda a: wgrad_p.bind(a, g, **params), xs), 0
  return jax.lax.map(lambda a: wgrad_p.bind(a[0], a[1], **params), (xs, gs)), 0


batching.primitive_batchers[conv_p] = _conv_batch
batching.primitive_batchers[wgrad_p] = _wgrad_batch


# --- the public forms ---------------------------------------------------------------------

def native_conv(x: jax.Array, kernel: jax.Array, relu: bool = False, winograd: bool = True,
                isa: str | None = None) -> jax.Array:
  """'same' convolution (B, H, W, Cin) x (k, k, Cin, Cout) -> (B, H, W, Cout), ReLU optional,
  by the native kernels when lowered for CPU (XLA's convolution on other platforms).

  Needs ``native_supports(x, kernel)``. winograd=False forces the direct form; isa names a
  variant of ``native_build.VARIANTS`` (default: ``native_isa()``). Differentiable in both
  modes (module docstring).
  """
  return _bind_conv(x, kernel, relu, winograd, _variant(isa))


def native_kernel_grad(x: jax.Array, g: jax.Array, k: int, isa: str | None = None) -> jax.Array:
  """d conv / d kernel (k, k, Cin, Cout) of x (B, H, W, Cin) and g (B, H, W, Cout), natively."""
  return _bind_wgrad(x, g, k, _variant(isa))


def uses_native(impl: str, x: jax.Array, kernel: jax.Array) -> bool:
  """Whether ``conv2d(x, kernel, impl)`` runs the native kernels when lowered for CPU."""
  if impl not in ("auto", "native"):
    return False
  if impl == "native" and not native_available():
    raise RuntimeError("conv_impl='native' but the native CPU kernels could not be built (see "
                       "the logged warning); use conv_impl='auto' to fall back to XLA")
  return native_supports(x, kernel) and native_available()


def conv2d(x: jax.Array, kernel: jax.Array, impl: str = "auto", relu: bool = False) -> jax.Array:
  """Bias-free 'same' convolution: x (B, H, W, Cin), kernel (k, k, Cin, Cout) -> (B, H, W, Cout).

  ``impl``: one of ``CONV_IMPLS`` (module docstring). Outside the native kernels, 1x1
  convolutions are matrix products. relu=True applies a ReLU (fused into the native kernel).
  Output dtype: x's (the kernel is cast to it).
  """
  if impl not in CONV_IMPLS:
    raise ValueError(f"conv impl must be one of {CONV_IMPLS}, got {impl!r}")
  k = kernel.shape[0]
  kernel = kernel.astype(x.dtype)
  if uses_native(impl, x, kernel):
    return _bind_conv(x, kernel, relu, True, native_isa())
  if k == 1:
    y = jnp.einsum("bhwc,cd->bhwd", x, kernel[0, 0])
  elif impl == "matmul":
    y = jnp.einsum("bhwc,cd->bhwd", im2col(x, k), kernel.reshape(-1, kernel.shape[-1]))
  elif impl == "xla_autodiff":
    y = lax_conv(x, kernel)
  else:
    return _bind_conv(x, kernel, relu, True, None)
  return jax.nn.relu(y) if relu else y
