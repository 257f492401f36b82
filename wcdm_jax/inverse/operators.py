"""Linear measurement operators with orthonormal columns (method.md §7).

An operator is a JAX pytree (its arrays are leaves, its sizes static) with
``forward(x) = M^T x`` (images (B, H, W, C) -> measurements (B, *measurement_shape)) and
``adjoint(c) = M c``. M has orthonormal columns, so ``forward(adjoint(c)) == c`` and
``project(x) = M M^T x`` is the orthogonal projection onto the measured subspace.

- ``Inpainting(mask)``: the pixels where mask == 1 (``box_mask`` makes a hole).
- ``RandomPixels(fraction, key, shape)``: a random subset of the pixels.
- ``BlockAverage(factor)``: s x s block sums / s (= s x the block mean): super-resolution.
- ``SpectralLowpass(fraction)``: the lowest 2-D DFT frequencies (deblurring). The default
  band is Hermitian-symmetric, so the measurements are real and M M^T a real projector;
  ``band='original'`` keeps the original code's band and complex measurements (parity only).
- ``RandomProjection(fraction, key, shape)``: compressive sensing; 'dense' (QR of a
  Gaussian matrix) or 'fast' (random signs, a permutation, then a random subset of an
  orthonormal DCT), 'auto' picks dense up to 4096 coefficients per channel.

Every operator knows (or, for the shape-agnostic ones, is told) the image shape (H, W, C)
and checks images and measurements against it with an error that says what to change.
"""
from __future__ import annotations

import math
import numbers
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

Shape = tuple[int, int, int]
DENSE_LIMIT = 4096  # coefficients per channel up to which RandomProjection('auto') is dense


def _fraction(fraction: Any) -> float:
  if isinstance(fraction, bool) or not isinstance(fraction, numbers.Real) or not (
      0 < fraction <= 1):
    raise ValueError(f"fraction must be a number in (0, 1], got {fraction!r}")
  return float(fraction)


def _shape(shape: Any, name: str = "shape") -> Shape:
  """(H, W, C) of positive ints; (H, W) means one channel."""
  if not isinstance(shape, Sequence) or len(shape) not in (2, 3) or not all(
      isinstance(s, numbers.Integral) and not isinstance(s, bool) and s > 0 for s in shape):
    raise ValueError(f"{name} must be (H, W) or (H, W, C) of positive ints, got {shape!r}")
  return tuple(int(s) for s in shape) + ((1,) if len(shape) == 2 else ())


class Operator:
  """Base class: subclasses set ``_leaves`` (names of array fields) and ``_static``."""
  _leaves: tuple[str, ...] = ()
  _static: tuple[str, ...] = ()
  shape: Shape | None = None  # (H, W, C) of the images, None for shape-agnostic operators

  def __init_subclass__(cls, **kwargs):
    super().__init_subclass__(**kwargs)
    jax.tree_util.register_pytree_node(
        cls, lambda op: (tuple(getattr(op, n) for n in cls._leaves),
                         tuple(getattr(op, n) for n in cls._static)),
        lambda aux, leaves: cls._rebuild(aux, leaves))

  @classmethod
  def _rebuild(cls, aux, leaves):
    op = object.__new__(cls)
    for n, v in zip(cls._static, aux):
      object.__setattr__(op, n, v)
    for n, v in zip(cls._leaves, leaves):
      object.__setattr__(op, n, v)
    return op

  def __repr__(self):
    return f"{type(self).__name__}({', '.join(f'{n}={getattr(self, n)!r}' for n in self._static)})"

  # --- the linear map ------------------------------------------------------------------------
  def forward(self, x: jax.Array) -> jax.Array:
    """M^T x: (B, H, W, C) -> (B, *measurement_shape)."""
    raise NotImplementedError

  def adjoint(self, c: jax.Array) -> jax.Array:
    """M c: (B, *measurement_shape) -> (B, H, W, C)."""
    raise NotImplementedError

  def project(self, x: jax.Array) -> jax.Array:
    """M M^T x: the orthogonal projection onto the measured subspace."""
    return self.adjoint(self.forward(x))

  # --- shapes and checks ---------------------------------------------------------------------
  def measurement_shape(self, image_shape: Shape) -> tuple[int, ...]:
    """The shape of one image's measurements (without the batch axis)."""
    raise NotImplementedError

  def image_shape(self, measurement_shape: Sequence[int] | None = None,
                  default: Shape | None = None) -> Shape:
    """The images' (H, W, C): the operator's own, else ``default``."""
    shape = self.shape or default
    if shape is None:
      raise ValueError(f"{self!r} needs the image shape: pass shape=(H, W, C)")
    return shape

  def check(self, image_shape: Shape) -> None:
    """ValueError unless images of ``image_shape`` (H, W, C) can be measured."""
    image_shape = _shape(image_shape, "image shape")
    if self.shape is not None and tuple(image_shape) != tuple(self.shape):
      raise ValueError(f"{type(self).__name__} was built for images of shape (H, W, C) = "
                       f"{self.shape}, got {image_shape}; build it for the images' shape")

  def check_measurements(self, c: Any, image_shape: Shape) -> None:
    """ValueError unless ``c`` is a batch of this operator's measurements of such images."""
    want = self.measurement_shape(image_shape)
    shape = tuple(getattr(c, "shape", ()))
    if len(shape) != 1 + len(want) or shape[1:] != tuple(want):
      raise ValueError(f"measurements of {self!r} on {image_shape[0]}x{image_shape[1]}x"
                       f"{image_shape[2]} images must have shape (B, {', '.join(map(str, want))}),"
                       f" got {shape}; compute them with op.forward(images)")
    if shape[0] == 0:
      raise ValueError("measurements hold no images (batch size 0)")


class _Subset(Operator):
  """Keeps the pixels (entries of the flattened (H, W, C) image) at ``index``."""
  _leaves = ("index",)
  _static = ("shape",)

  def _init(self, keep: np.ndarray, what: str):
    keep = np.asarray(keep, bool)
    n = int(keep.sum())
    if n == 0:
      raise ValueError(f"{what} measures nothing (no pixel is kept); keep at least one")
    self.shape = keep.shape
    self.index = jnp.asarray(np.flatnonzero(keep.reshape(-1)), jnp.int32)

  @property
  def mask(self) -> jax.Array:
    """(H, W, C) float: 1 where measured."""
    return jnp.zeros(math.prod(self.shape), jnp.float32).at[self.index].set(1.0).reshape(
        self.shape)

  def forward(self, x):  # (B, H, W, C) -> (B, m)
    return x.reshape(x.shape[0], -1)[:, self.index]

  def adjoint(self, c):  # (B, m) -> (B, H, W, C)
    out = jnp.zeros((c.shape[0], math.prod(self.shape)), c.dtype).at[:, self.index].set(c)
    return out.reshape((c.shape[0],) + tuple(self.shape))

  def measurement_shape(self, image_shape):
    """The shape of one image's measurements (without the batch axis)."""
    return (int(self.index.shape[0]),)


class Inpainting(_Subset):
  """Measure the pixels where ``mask`` (H, W) or (H, W, C) is nonzero; 0 marks the hole."""

  def __init__(self, mask: Any, channels: int = 1):
    mask = np.asarray(mask)
    if mask.ndim == 2:
      mask = np.repeat(mask[..., None], channels, -1)
    if mask.ndim != 3 or mask.size == 0:
      raise ValueError(f"mask must be (H, W) or (H, W, C), got shape {mask.shape}")
    if not np.all(np.isin(mask, (0, 1))):
      raise ValueError("mask must hold only 0 (unknown) and 1 (measured)")
    if mask.all():
      raise ValueError("mask measures everything (no 0 in it): there is nothing to inpaint")
    self._init(mask, "mask")


def box_mask(shape: Sequence[int], box: Sequence[int] | int, center: Sequence[int] | None = None
             ) -> np.ndarray:
  """(H, W) mask of ones with a zero box (the hole), centred by default.

  Its float32 values match the original's hole: ``box_mask((160, 160), 40)`` is 0 on rows and
  columns 60:100.

  Args:
    shape: (H, W) of the images.
    box: the hole's (h, w), or one int for a square.
    center: the hole's (row, column) centre (default: the image's).

  Returns:
    (H, W) float32 array: 0 in the hole, 1 elsewhere (``Inpainting``'s mask).
  """
  h, w = _shape(shape)[:2]
  bh, bw = (box, box) if isinstance(box, numbers.Integral) else tuple(box)
  if not (0 < bh <= h and 0 < bw <= w):
    raise ValueError(f"box {bh}x{bw} must fit in the {h}x{w} image and be non-empty")
  cy, cx = (h // 2, w // 2) if center is None else center
  top, left = cy - bh // 2, cx - bw // 2
  if top < 0 or left < 0 or top + bh > h or left + bw > w:
    raise ValueError(f"box {bh}x{bw} centred at {(cy, cx)} leaves the {h}x{w} image")
  mask = np.ones((h, w), np.float32)
  mask[top:top + bh, left:left + bw] = 0
  return mask


class RandomPixels(_Subset):
  """Measure a random ``fraction`` of the pixels of (H, W, C) images (the same pixels in
  every channel); the subset is a pure function of ``key``."""

  def __init__(self, fraction: float, key: jax.Array, shape: Sequence[int]):
    fraction = _fraction(fraction)
    h, w, c = _shape(shape)
    m = max(1, int(round(fraction * h * w)))
    chosen = np.asarray(jax.random.permutation(key, h * w))[:m]
    keep = np.zeros(h * w, bool)
    keep[chosen] = True
    self._init(np.repeat(keep.reshape(h, w, 1), c, -1), "RandomPixels")


class BlockAverage(Operator):
  """s x s block sums / s: measurements (B, H/s, W/s, C) = s x block means (super-resolution).

  With the Haar wavelet the block mean of a 2^J x 2^J block is the J-level low-pass, so for
  ``factor = 2^J`` a J-level model can solve it coarse to fine.
  """
  _static = ("factor", "shape")

  def __init__(self, factor: int, shape: Sequence[int] | None = None):
    if isinstance(factor, bool) or not isinstance(factor, numbers.Integral) or factor < 2:
      raise ValueError(f"factor must be an int >= 2, got {factor!r}")
    self.factor = int(factor)
    self.shape = None if shape is None else _shape(shape)
    if self.shape is not None:
      self.check(self.shape)

  def forward(self, x):
    b, h, w, c = x.shape
    s = self.factor
    return x.reshape(b, h // s, s, w // s, s, c).sum((2, 4)) / s

  def adjoint(self, c):
    s = self.factor
    return jnp.repeat(jnp.repeat(c, s, 1), s, 2) / s

  def measurement_shape(self, image_shape):
    """The shape of one image's measurements (without the batch axis)."""
    h, w, c = image_shape
    return (h // self.factor, w // self.factor, c)

  def image_shape(self, measurement_shape=None, default=None):
    if self.shape is None and measurement_shape is not None and len(measurement_shape) == 3:
      h, w, c = measurement_shape
      return (h * self.factor, w * self.factor, c)
    return super().image_shape(measurement_shape, default)

  def check(self, image_shape):
    super().check(image_shape)
    h, w, _ = image_shape
    if h % self.factor or w % self.factor:
      raise ValueError(f"BlockAverage factor {self.factor} does not divide the image size "
                       f"{h}x{w}; crop the images to a multiple of {self.factor}")


def _signed(n: int) -> np.ndarray:
  """DFT frequency indices 0..n-1 as signed frequencies."""
  k = np.arange(n)
  return np.where(k <= n // 2, k, k - n)


class SpectralLowpass(Operator):
  """Keep about ``fraction`` of the 2-D DFT coefficients, the lowest frequencies (deblurring).

  band='hermitian' (default): ``|u| <= r_h`` and ``|v| <= r_w`` in signed frequency, a band closed under
  negation; measurements (B, m, C) are real orthonormal coordinates (Re, and sqrt2 Re / sqrt2
  Im of one of each conjugate pair), so M M^T x is real and a projector.
  band='original': the original code's band (rows/cols k < r or k >= n - r with
  r = round(n sqrt(fraction) / 2)), measurements = mask * fft2(x, 'ortho') (B, H, W, C) complex
  and M c = real(ifft2(c)); not symmetric, so M M^T is not exactly a projector (parity only).
  """
  _static = ("fraction", "band", "shape")

  def __init__(self, fraction: float, band: str = "hermitian", shape: Sequence[int] | None = None):
    self.fraction = _fraction(fraction)
    if band not in ("hermitian", "original"):
      raise ValueError(f"band must be 'hermitian' or 'original', got {band!r}")
    self.band = band
    self.shape = None if shape is None else _shape(shape)

  def band_mask(self, h: int, w: int) -> np.ndarray:
    """(H, W) bool: the kept DFT coefficients."""
    root = math.sqrt(self.fraction)
    if self.band == "original":
      rh, rw = max(1, round(h * root / 2)), max(1, round(w * root / 2))
      rows, cols = np.arange(h), np.arange(w)
      return ((rows < rh) | (rows >= h - rh))[:, None] & ((cols < rw) | (cols >= w - rw))[None]
    rh = max(0, int(round((h * root - 1) / 2)))
    rw = max(0, int(round((w * root - 1) / 2)))
    return (np.abs(_signed(h)) <= rh)[:, None] & (np.abs(_signed(w)) <= rw)[None]

  def _coords(self, h: int, w: int):
    """Flat indices of self-conjugate kept frequencies, and of one of each conjugate pair."""
    keep = self.band_mask(h, w)
    u, v = np.nonzero(keep)
    flat = u * w + v
    conj = ((-u) % h) * w + (-v) % w
    own = flat[flat == conj]
    pairs = flat[flat < conj]
    return own, pairs

  def forward(self, x):
    b, h, w, c = x.shape
    spec = jnp.fft.fft2(x, axes=(1, 2), norm="ortho")  # (B, H, W, C) complex
    if self.band == "original":
      return spec * jnp.asarray(self.band_mask(h, w), jnp.float32)[None, :, :, None]
    own, pairs = self._coords(h, w)
    flat = spec.reshape(b, h * w, c)
    return jnp.concatenate([flat[:, own].real, math.sqrt(2) * flat[:, pairs].real,
                            math.sqrt(2) * flat[:, pairs].imag], 1)  # (B, m, C)

  def adjoint(self, c):
    if self.band == "original":
      return jnp.fft.ifft2(c, axes=(1, 2), norm="ortho").real
    h, w, _ = self.image_shape()
    b, _, ch = c.shape
    own, pairs = self._coords(h, w)
    n_own, n_pair = len(own), len(pairs)
    a, im = c[:, n_own:n_own + n_pair] / math.sqrt(2), c[:, n_own + n_pair:] / math.sqrt(2)
    conj = ((-(pairs // w)) % h) * w + (-(pairs % w)) % w
    z = jnp.zeros((b, h * w, ch), jnp.complex64)
    z = z.at[:, own].set(c[:, :n_own].astype(jnp.complex64))
    z = z.at[:, pairs].set(a + 1j * im).at[:, conj].set(a - 1j * im)
    return jnp.fft.ifft2(z.reshape(b, h, w, ch), axes=(1, 2), norm="ortho").real

  def measurement_shape(self, image_shape):
    """The shape of one image's measurements (without the batch axis)."""
    h, w, c = image_shape
    if self.band == "original":
      return (h, w, c)
    own, pairs = self._coords(h, w)
    return (len(own) + 2 * len(pairs), c)

  def check(self, image_shape):
    super().check(image_shape)
    h, w, _ = image_shape
    if self.band_mask(h, w).all():
      raise ValueError(f"SpectralLowpass fraction {self.fraction} keeps every frequency of "
                       f"{h}x{w} images: nothing to recover; use a smaller fraction")

  def bind(self, image_shape: Shape) -> "SpectralLowpass":
    """This operator with its image shape fixed (the Hermitian adjoint needs it)."""
    return SpectralLowpass(self.fraction, self.band, image_shape)


def _check_key(key: Any) -> jax.Array:
  from wcdm_jax import validation  # pylint: disable=g-import-not-at-top
  return validation.key(key)


class RandomProjection(Operator):
  """Compressive sensing: m = round(fraction N) orthonormal random projections of each
  channel's N = H W pixels (the same projections for every channel); measurements (B, m, C).

  kind='dense': M = Q of a Gaussian (N, m) matrix (as the original; memory N m).
  kind='fast': M^T x = subset(DCT(permute(signs * x))): orthonormal, O(N log N), no matrix.
  kind='auto': dense up to ``DENSE_LIMIT`` pixels, fast above.
  ``RandomProjection.from_matrix(U, shape)`` wraps a given (N, m) orthonormal U (row-major vec).
  """
  _leaves = ("matrix", "signs", "perm", "index")
  _static = ("fraction", "kind", "shape")

  def __init__(self, fraction: float, key: jax.Array, shape: Sequence[int], kind: str = "auto"):
    self.fraction = _fraction(fraction)
    key = _check_key(key)
    self.shape = _shape(shape)
    h, w, _ = self.shape
    n = h * w
    if kind == "auto":
      kind = "dense" if n <= DENSE_LIMIT else "fast"
    if kind not in ("dense", "fast"):
      raise ValueError(f"kind must be 'auto', 'dense' or 'fast', got {kind!r}")
    self.kind = kind
    m = max(1, int(round(self.fraction * n)))
    k1, k2, k3 = jax.random.split(key, 3)
    self.matrix = self.signs = self.perm = self.index = None
    if kind == "dense":
      g = np.asarray(jax.random.normal(k1, (n, m)), np.float64)
      q, r = np.linalg.qr(g)
      self.matrix = jnp.asarray(q * np.sign(np.diag(r))[None], jnp.float32)  # (N, m)
    else:
      self.signs = jnp.asarray(np.where(np.asarray(jax.random.bernoulli(k1, 0.5, (n,))), 1., -1.),
                               jnp.float32)
      self.perm = jnp.asarray(jax.random.permutation(k2, n), jnp.int32)
      self.index = jnp.asarray(np.sort(np.asarray(jax.random.permutation(k3, n))[:m]), jnp.int32)

  @classmethod
  def from_matrix(cls, matrix: Any, shape: Sequence[int]) -> "RandomProjection":
    """Wrap a given (N, m) matrix with orthonormal columns for (H, W) or (H, W, C) images."""
    shape = _shape(shape)
    matrix = np.asarray(matrix, np.float32)
    n = shape[0] * shape[1]
    if matrix.ndim != 2 or matrix.shape[0] != n or not 0 < matrix.shape[1] <= n:
      raise ValueError(f"matrix must be (H*W, m) = ({n}, m) with 0 < m <= {n}, got "
                       f"{matrix.shape}")
    gram = matrix.T.astype(np.float64) @ matrix
    if not np.allclose(gram, np.eye(matrix.shape[1]), atol=1e-4):
      raise ValueError("matrix columns are not orthonormal (M^T M != I); orthonormalise it, "
                       "e.g. with np.linalg.qr")
    return cls._rebuild((matrix.shape[1] / n, "dense", shape),
                        (jnp.asarray(matrix), None, None, None))

  def _planes(self, x):  # (B, H, W, C) -> (B, C, N)
    b, h, w, c = x.shape
    return jnp.moveaxis(x, 3, 1).reshape(b, c, h * w)

  def forward(self, x):
    p = self._planes(x)
    if self.kind == "dense":
      out = p @ self.matrix  # (B, C, m)
    else:
      out = jax.scipy.fft.dct((p * self.signs)[..., self.perm], norm="ortho")[..., self.index]
    return jnp.moveaxis(out, 1, 2)  # (B, m, C)

  def adjoint(self, c):
    h, w, ch = self.shape
    n = h * w
    planes = jnp.moveaxis(c, 2, 1)  # (B, C, m)
    if self.kind == "dense":
      p = planes @ self.matrix.T
    else:
      full = jnp.zeros(planes.shape[:2] + (n,), planes.dtype).at[..., self.index].set(planes)
      p = jnp.zeros_like(full).at[..., self.perm].set(jax.scipy.fft.idct(full, norm="ortho"))
      p = p * self.signs
    return jnp.moveaxis(p.reshape(c.shape[0], ch, h, w), 1, 3)

  def measurement_shape(self, image_shape):
    """The shape of one image's measurements (without the batch axis)."""
    m = self.matrix.shape[1] if self.kind == "dense" else self.index.shape[0]
    return (int(m), image_shape[2])
