"""The native CPU kernels at production shapes, for every variant this machine runs: value,
input gradient and kernel gradient against a float64 reference, over every leftover row count
of every register tile.

Tiles (wcdm_jax/native/conv_cpu.cc), with L lanes a vector and A accumulators: the direct
forward runs rows of n pixels in tiles of R = A / NV pixels, NV vectors of output channels
(widest of 4, 2, 1 dividing Cout / L), n = W - |dx - p|; the kernel gradient runs Cin rows in
tiles of min(8, A / NV) (K-major); Winograd runs tiles = (tile rows per item) x ceil(W / 2)
through the same forward tiles. AVX-512 and 'generic16': L 16, A 24 (R = 6, 12, 24); AVX2:
L 8, A 12 (R = 6, 12); generic: L 4, A 12 on x86-64 (R = 3, 6, 12). Small heights, many widths
and channel counts: shapes, not sizes.
"""
import jax
import numpy as np
import pytest

from conftest import native_variants
from wcdm_jax import conv

VARIANTS = native_variants()
pytestmark = [pytest.mark.skipif(not VARIANTS, reason="no C++ compiler: no native kernels"),
              pytest.mark.parametrize("isa", VARIANTS or ["none"])]


def _reference(x, w, cot, mask):
  """float64 'same' conv y, and the gradients of sum(cot * y) (cot masked by ``mask``)."""
  x, w, g = (np.asarray(a, np.float64) for a in (x, w, cot))
  g = g * mask
  k = w.shape[0]
  p = k // 2
  b, h, wd, _ = x.shape
  xp = np.pad(x, ((0, 0), (p, p), (p, p), (0, 0)))
  gp = np.pad(g, ((0, 0), (p, p), (p, p), (0, 0)))
  y = np.zeros((b, h, wd, w.shape[3]))
  dx = np.zeros_like(x)
  dw = np.zeros_like(w)
  for i in range(k):
    for j in range(k):
      win = xp[:, i:i + h, j:j + wd]
      y += win @ w[i, j]
      dw[i, j] = np.einsum("bhwc,bhwo->co", win, g)
      dx += gp[:, k - 1 - i:k - 1 - i + h, k - 1 - j:k - 1 - j + wd] @ w[i, j].T
  return y, dx, dw


def _check(isa, batch, height, width, cin, cout, k, relu, winograd, seed=0):
  rng = np.random.default_rng(seed + 1000 * width + cin + 7 * cout + k)
  x = rng.standard_normal((batch, height, width, cin)).astype(np.float32)
  w = (rng.standard_normal((k, k, cin, cout)) / np.sqrt(k * k * cin)).astype(np.float32)
  cot = rng.standard_normal((batch, height, width, cout)).astype(np.float32)
  f = lambda x, w: conv.native_conv(x, w, relu, winograd, isa)
  fn = jax.jit(lambda x, w, c: jax.vjp(f, x, w)[1](c) + (f(x, w),))
  dx, dw, y = (np.asarray(a) for a in fn(x, w, cot))
  mask = (y > 0) if relu else 1.0
  ry, rdx, rdw = _reference(x, w, cot, mask)
  if relu:
    ry = np.maximum(ry, 0)
  what = f"{isa}: B={batch} H={height} W={width} {cin}->{cout} k={k} relu={relu} winograd={winograd}"
  for name, a, r in (("value", y, ry), ("input grad", dx, rdx), ("kernel grad", dw, rdw)):
    scale = float(np.abs(r).max()) or 1.0
    np.testing.assert_allclose(a, r, rtol=0, atol=1e-4 * scale, err_msg=f"{name}: {what}")


# (i) Direct forward tails: k = 5 gives n in {W-2, W-1, W}; these widths cover every
# remainder mod 24, 12 and 6, plus full tiles (W = 41).
DIRECT = [(w, co) for co in (16, 32, 64) for w in (2, 5, 8, 11, 14, 17, 20, 23, 41)]


@pytest.mark.parametrize("width,cout", DIRECT)
def test_direct_forward_tails(isa, width, cout):
  _check(isa, 1 + width % 2 * 2, 2, width, 16, cout, 5, relu=width % 3 == 0, winograd=False)


@pytest.mark.parametrize("width,k,cin", [(1, 1, 16), (7, 1, 32), (24, 1, 64), (25, 1, 8),
                                         (40, 1, 64), (1, 3, 16), (2, 3, 24), (13, 3, 32),
                                         (25, 3, 64), (40, 3, 12)])
def test_direct_kernel_sizes(isa, width, k, cin):
  for cout in (16, 64):
    _check(isa, 3, 2, width, cin, cout, k, relu=cout == 64, winograd=False)


# (ii) Kernel-gradient tails: Cin rows in tiles of 8 or 6 (AVX-512: Cout 16, 32 / 64), 6
# (AVX2), 3 (generic): Cin 8..16 leaves every remainder.
@pytest.mark.parametrize("cin", [8, 9, 10, 11, 12, 13, 14, 15, 16, 32, 64])
def test_kernel_gradient_tails(isa, cin):
  for cout in (16, 64):
    _check(isa, 3, 3, 9, cin, cout, 3, relu=cin % 2 == 0, winograd=False)


# (iii) Winograd: tiles = ceil(W / 2) for H <= 2; every remainder of 24, 12, 6 tiles.
WINO = ([(2 * t, 16) for t in range(1, 26)] + [(2 * t - 1, 32) for t in range(1, 14)] +
        [(2 * t, 64) for t in range(1, 8)])


@pytest.mark.parametrize("width,cout", WINO)
def test_winograd_tails(isa, width, cout):
  _check(isa, 1 + width % 2 * 2, 2, width, 16, cout, 3, relu=width % 4 == 0, winograd=True)


@pytest.mark.parametrize("height,width,cin,cout", [(7, 41, 32, 64), (5, 13, 64, 32),
                                                   (9, 6, 64, 64), (1, 1, 64, 16)])
def test_winograd_several_work_items(isa, height, width, cin, cout):
  _check(isa, 3, height, width, cin, cout, 3, relu=True, winograd=True)
  _check(isa, 1, height, width, cin, cout, 3, relu=False, winograd=True)


# (iv) The released nets' layers (64 -> 64, 3x3 and 1x1) at the widths they see.
@pytest.mark.parametrize("width", [160, 80, 40, 20])
def test_released_net_layers(isa, width):
  for k in (3, 1):
    _check(isa, 1, 2, width, 64, 64, k, relu=True, winograd=True)
  _check(isa, 1, 2, width, 64, 64, 3, relu=False, winograd=False)
