"""Bias-free CNN denoisers (BF-CNN) and the specs/params that describe a whole model.

A net outputs the *noise* (residual); the denoised image is ``input - output``. Nothing in
it adds a constant, so f(a y) = a f(y) for a > 0 (method.md §3).

- ``NetSpec``: one network's architecture (hashable: a static argument of jitted code).
- ``ModelSpec``: a whole model: a flat denoiser (levels = 0) or a multi-scale model
  (low-pass net + one conditional net per level), plus the wavelet and image size.
- ``ModelParams``: a pytree holding the spec (static) and every net's variables
  ``{'params': ..., 'batch_stats': ...}``; it is what ``sample``/``denoise`` take.
"""
from __future__ import annotations

import dataclasses
import functools
import json
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from wcdm_jax import settings, wavelets
from wcdm_jax.conv import conv2d

Variables = dict[str, Any]

# Which of the 21 layers are 3x3 in the authors' released nets (others are 1x1).
_RELEASED_3x3 = {
    5: (0, 20),
    9: (0, 8, 16, 20),
    13: (0, 4, 8, 12, 16, 20),
    23: (0,) + tuple(range(2, 19, 2)) + (20,),
    43: tuple(range(21)),
}
BN_EPS = 1e-5
BN_MOMENTUM = 0.1


def kernel_sizes_for_rf(rf: int, num_layers: int = 21) -> tuple[int, ...]:
  """Per-layer kernel sizes (3 or 1) giving receptive field ``rf`` = 1 + 2 * (#3x3 layers).

  The released layouts are used for 21 layers; otherwise the middle 3x3 layers are spread
  evenly. The first and last layers are always 3x3.
  """
  n3 = (rf - 1) // 2
  if rf % 2 == 0 or n3 < 2 or n3 > num_layers:
    raise ValueError(f"receptive field {rf} is impossible with {num_layers} layers: it must be "
                     f"odd and within 5..{2 * num_layers + 1}")
  if num_layers == 21 and rf in _RELEASED_3x3:
    big = set(_RELEASED_3x3[rf])
  else:
    middle = np.linspace(0, num_layers - 1, n3)[1:-1] if n3 > 2 else []
    big = {0, num_layers - 1} | {int(round(m)) for m in middle}
    free = [l for l in range(1, num_layers - 1) if l not in big]
    while len(big) < n3:  # rounding collisions: fill the nearest free layers
      big.add(free.pop(len(free) // 2))
  return tuple(3 if l in big else 1 for l in range(num_layers))


@dataclasses.dataclass(frozen=True)
class NetSpec:
  """Architecture of one BF-CNN. ``kind``: 'flat' | 'low' | 'cond' (conditional)."""
  kind: str
  in_channels: int
  out_channels: int
  kernel_sizes: tuple[int, ...]
  features: int = 64
  first_relu: bool = False
  level: int = -1  # pyramid level for 'cond' nets (0 finest); J for 'low'; -1 for 'flat'

  def __post_init__(self):
    if self.kind not in ("flat", "low", "cond"):
      raise ValueError(f"kind must be 'flat', 'low' or 'cond', got {self.kind!r}")
    if len(self.kernel_sizes) < 2:
      raise ValueError("a BF-CNN needs at least 2 layers")
    object.__setattr__(self, "kernel_sizes", tuple(int(k) for k in self.kernel_sizes))

  @property
  def num_layers(self) -> int:
    return len(self.kernel_sizes)

  @property
  def rf(self) -> int:
    return 1 + sum(k - 1 for k in self.kernel_sizes)

  @property
  def name(self) -> str:
    return {"flat": "flat", "low": "low"}.get(self.kind, f"cond{self.level}")

  def flops_per_pixel(self) -> int:
    """Multiply-adds x 2 of one forward pass, per output pixel."""
    chans = [self.in_channels] + [self.features] * (self.num_layers - 1) + [self.out_channels]
    return sum(2 * k * k * ci * co for k, ci, co in zip(self.kernel_sizes, chans[:-1], chans[1:]))


def flat_spec(rf: int = 43, channels: int = 1, num_layers: int = 21, features: int = 64,
              first_relu: bool = False) -> NetSpec:
  """The ``NetSpec`` of a flat denoiser of receptive field ``rf``."""
  return NetSpec("flat", channels, channels, kernel_sizes_for_rf(rf, num_layers), features,
                 first_relu)


def low_spec(levels: int, rf: int = 41, channels: int = 1, num_layers: int = 20,
             features: int = 64, first_relu: bool = False) -> NetSpec:
  """The ``NetSpec`` of the low-pass net of a ``levels``-level model."""
  return NetSpec("low", channels, channels, kernel_sizes_for_rf(rf, num_layers), features,
                 first_relu, level=levels)


def cond_spec(level: int, rf: int = 9, channels: int = 1, num_layers: int = 21,
              features: int = 64, first_relu: bool = False) -> NetSpec:
  """The ``NetSpec`` of the conditional net of ``level`` (input: low-pass and details, output:
  details)."""
  return NetSpec("cond", 4 * channels, 3 * channels, kernel_sizes_for_rf(rf, num_layers),
                 features, first_relu, level=level)


@dataclasses.dataclass(frozen=True)
class ModelSpec:
  """A flat denoiser (``levels == 0``, ``low`` is the flat net) or a multi-scale model."""
  low: NetSpec
  conditionals: tuple[NetSpec, ...] = ()
  wavelet: str = "haar"
  mode: str = "periodization"
  image_size: tuple[int, int] = (64, 64)

  def __post_init__(self):
    object.__setattr__(self, "conditionals", tuple(self.conditionals))
    object.__setattr__(self, "image_size", tuple(int(s) for s in self.image_size))
    for j, c in enumerate(self.conditionals):
      if c.kind != "cond" or c.level != j:
        raise ValueError(f"conditionals[{j}] must be a 'cond' net of level {j}, got {c}")
    if self.conditionals and self.low.kind != "low":
      raise ValueError("a multi-scale model needs a 'low' net")
    if not self.conditionals and self.low.kind != "flat":
      raise ValueError("a model without conditional nets needs a 'flat' net")
    if self.conditionals:
      wavelets.check_wavelet(self.wavelet, self.mode)
    if self.conditionals and self.mode == wavelets.PERIODIZATION:
      wavelets.check_size(*self.image_size, self.levels)

  @property
  def levels(self) -> int:
    return len(self.conditionals)

  @property
  def channels(self) -> int:
    return self.low.in_channels

  @property
  def nets(self) -> dict[str, NetSpec]:
    """All nets by name: 'flat' or 'low', 'cond0', ..., 'cond{J-1}'."""
    return {n.name: n for n in (self.low,) + self.conditionals}

  def net_size(self, name: str, image_size: Sequence[int] | None = None) -> tuple[int, int]:
    """(h, w) of the arrays the named net sees for images of ``image_size``."""
    h, w = image_size or self.image_size
    net = self.nets[name]
    k = self.levels if net.kind == "low" else (0 if net.kind == "flat" else net.level + 1)
    return h // 2 ** k, w // 2 ** k

  def to_json(self) -> str:
    """The spec as JSON (``from_json`` reads it back)."""
    return json.dumps(dataclasses.asdict(self), indent=1)

  @classmethod
  def from_json(cls, text: str) -> "ModelSpec":
    try:
      d = json.loads(text)
      return cls(low=NetSpec(**d["low"]),
                 conditionals=tuple(NetSpec(**c) for c in d["conditionals"]),
                 wavelet=d["wavelet"], mode=d["mode"], image_size=tuple(d["image_size"]))
    except (ValueError, KeyError, TypeError, AttributeError) as e:
      what = f"missing key {e}" if isinstance(e, KeyError) else f"{type(e).__name__}: {e}"
      raise ValueError(f"not a wcdm_jax model spec ({what})") from e


def multiscale_spec(levels: int, cond_rf: int = 9, low_rf: int = 41, channels: int = 1,
                    image_size: Sequence[int] = (160, 160), wavelet: str = "haar",
                    num_layers: int = 21, low_num_layers: int = 20, features: int = 64,
                    mode: str = "periodization") -> ModelSpec:
  """The paper's multi-scale model: low-pass net (RF ``low_rf``) + J conditional nets."""
  if levels < 1:
    raise ValueError("a multi-scale model needs levels >= 1; use flat_spec for a flat denoiser")
  return ModelSpec(
      low=low_spec(levels, low_rf, channels, low_num_layers, features),
      conditionals=tuple(cond_spec(j, cond_rf, channels, num_layers, features)
                         for j in range(levels)),
      wavelet=wavelet, mode=mode, image_size=tuple(image_size))


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """A model's shape as settings (the flags of ``launch/train.py``); ``spec`` builds it.

  ``levels == 0`` is a flat denoiser of receptive field ``flat_rf`` (``num_layers`` layers);
  otherwise a ``levels``-level wavelet pyramid with conditional nets of ``cond_rf`` and a
  low-pass net of ``low_rf``.
  """
  levels: int = settings.setting(2, "Wavelet levels J; 0 trains a flat denoiser.")
  wavelet: str = settings.setting("haar", "Orthogonal PyWavelets wavelet.")
  wavelet_mode: str = settings.setting(
      "periodization", "Boundary mode (periodization is the orthonormal one).",
      choices=("periodization", "symmetric", "reflect", "zero"))
  cond_rf: int = settings.setting(9, "Receptive field of the conditional nets.")
  low_rf: int = settings.setting(41, "Receptive field of the low-pass net.")
  flat_rf: int = settings.setting(43, "Receptive field of a flat net (levels=0).")
  num_layers: int = settings.setting(21, "Layers of the conditional / flat nets.")
  low_num_layers: int = settings.setting(20, "Layers of the low-pass net.")
  features: int = settings.setting(64, "Channels of the hidden layers.")

  def __post_init__(self):
    for name, low in (("levels", 0), ("num_layers", 2), ("low_num_layers", 2), ("features", 1)):
      if getattr(self, name) < low:
        raise ValueError(f"{name} must be >= {low}, got {getattr(self, name)}")

  def spec(self, channels: int, image_size: Sequence[int]) -> ModelSpec:
    """The ``ModelSpec`` of this shape for ``channels``-channel images of ``image_size``."""
    if self.levels == 0:
      return ModelSpec(low=flat_spec(self.flat_rf, channels, self.num_layers, self.features),
                       image_size=tuple(image_size))
    return multiscale_spec(self.levels, self.cond_rf, self.low_rf, channels, image_size,
                           self.wavelet, self.num_layers, self.low_num_layers, self.features,
                           self.wavelet_mode)


# --- pure building blocks ---------------------------------------------------------------------

def batch_sd(h: jax.Array, axis_name: str | None = None) -> jax.Array:
  """Per-channel std over (B, H, W), biased, with eps: the training-mode normaliser.

  h: (B, H, W, C) -> (C,) float32. Inside ``shard_map`` over the batch, ``axis_name`` names
  the mesh axis the batch is split on: the statistics are then the *global* batch's (two
  all-reduces of C values), as on one device.
  """
  h = h.astype(jnp.float32)
  if axis_name is None:
    return jnp.sqrt(jnp.var(h, axis=(0, 1, 2)) + BN_EPS)
  # One all-reduce of (mean, mean of squares) per layer, not two: every device then meets the
  # collectives of a step in one order (independent collectives may run in any order, and
  # devices that share a thread pool, as simulated CPU devices do, could wait on each other).
  moments = jax.lax.pmean(jnp.stack([jnp.mean(h, axis=(0, 1, 2)),
                                     jnp.mean(jnp.square(h), axis=(0, 1, 2))]), axis_name)
  var = jnp.maximum(moments[1] - jnp.square(moments[0]), 0.0)
  return jnp.sqrt(var + BN_EPS)


def block_train(x, kernel, gain, impl: str = "auto", axis_name: str | None = None):
  """conv -> bias-free batch norm (batch statistics) -> ReLU; returns (y, sd)."""
  h = conv2d(x, kernel, impl)
  sd = batch_sd(h, axis_name)
  return nn.relu(h * (gain / sd).astype(h.dtype)), jax.lax.stop_gradient(sd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def block_train_remat(x, kernel, gain, impl="auto", axis_name=None):
  """``block_train`` keeping only its input for the backward pass, which recomputes the rest.

  (jax.checkpoint's optimisation barriers are dropped by XLA:CPU, whose CSE then merges the
  recomputation back into the forward pass; a conditional on a runtime predicate keeps the
  recomputation separate on every backend.)
  """
  return block_train(x, kernel, gain, impl, axis_name)


def _remat_fwd(x, kernel, gain, impl, axis_name):
  return block_train(x, kernel, gain, impl, axis_name), (x, kernel, gain)


def _remat_bwd(impl, axis_name, res, cotangents):
  x, kernel, gain = res
  gy, _ = cotangents  # sd is a statistic, not differentiated

  def recompute(operands):
    x, kernel, gain, gy = operands
    _, vjp = jax.vjp(lambda *a: block_train(*a, impl, axis_name)[0], x, kernel, gain)
    return vjp(gy)

  def non_finite(operands):  # a non-finite cotangent: NaN gradients, as without remat
    return tuple(jnp.full_like(a, jnp.nan) for a in operands[:3])

  ok = jnp.isfinite(jnp.sum(gy))
  if axis_name is not None:  # one branch on every device: the recomputation has collectives
    ok = jax.lax.pmin(ok.astype(jnp.int32), axis_name) > 0
  return jax.lax.cond(ok, recompute, non_finite, (x, kernel, gain, gy))


block_train_remat.defvjp(_remat_fwd, _remat_bwd)


# --- Flax modules ----------------------------------------------------------------------------

def _kaiming_normal(key, shape, dtype=jnp.float32):
  return nn.initializers.variance_scaling(2.0, "fan_in", "normal")(key, shape, dtype)


class Conv(nn.Module):
  """Bias-free 'same' convolution, NHWC, param 'kernel' (k, k, in, out), Kaiming normal."""
  features: int
  kernel_size: int
  impl: str = "auto"

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:  # (B, H, W, Cin) -> (B, H, W, Cout)
    kernel = self.param("kernel", _kaiming_normal,
                        (self.kernel_size, self.kernel_size, x.shape[-1], self.features))
    return conv2d(x, kernel, self.impl)


def paper_gain_init(key, shape, dtype=jnp.float32):
  """The authors' gain initialisation: N(0, 1) * 2/9/64, clipped to +-0.025."""
  return jnp.clip(jax.random.normal(key, shape, dtype) * (2.0 / 9.0 / 64.0), -0.025, 0.025)


def gain_initializer(gain_init: float | None) -> Callable:
  """None: ``paper_gain_init``; a number: every gain starts at that constant."""
  if gain_init is None:
    return paper_gain_init
  return nn.initializers.constant(gain_init)


class Block(nn.Module):
  """conv -> bias-free batch norm -> ReLU (method.md §3).

  Params 'kernel' (k, k, in, out) and 'gammas' (out,); batch_stats 'running_sd' (out,). The
  norm divides each channel by its std over (B, H, W) while training (and updates the
  running std with momentum 0.1) or by the running std at evaluation, then multiplies by
  the learned gain; it subtracts nothing, so the block stays positively homogeneous.
  """
  features: int
  kernel_size: int
  conv_impl: str = "auto"
  remat: bool = False
  bn_momentum: float = BN_MOMENTUM
  gain_init: float | None = None  # see gain_initializer
  axis_name: str | None = None  # the mesh axis of the batch inside shard_map (see batch_sd)

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    kernel = self.param("kernel", _kaiming_normal,
                        (self.kernel_size, self.kernel_size, x.shape[-1], self.features))
    gain = self.param("gammas", gain_initializer(self.gain_init), (self.features,))
    running_sd = self.variable("batch_stats", "running_sd", jnp.ones, (self.features,),
                               jnp.float32)
    if not train:  # the norm's per-channel scale folded into the kernel, ReLU fused
      return conv2d(x, kernel * (gain / running_sd.value), self.conv_impl, relu=True)
    fn = block_train_remat if self.remat else block_train
    y, sd = fn(x, kernel, gain, self.conv_impl, self.axis_name)
    if not self.is_initializing():
      running_sd.value = (1 - self.bn_momentum) * running_sd.value + self.bn_momentum * sd
    return y


class BFCNN(nn.Module):
  """Bias-free CNN: conv, (conv -> BF-BN -> ReLU) x (L - 2), conv. Returns the residual."""
  spec: NetSpec
  conv_impl: str = "auto"
  remat: bool = False
  dtype: Any = jnp.float32
  bn_momentum: float = BN_MOMENTUM
  gain_init: float | None = None  # None: the paper's (see gain_initializer)
  axis_name: str | None = None  # training inside shard_map: the batch's mesh axis (batch_sd)

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    s = self.spec
    if x.shape[-1] != s.in_channels:
      raise ValueError(f"{s.name} net expects {s.in_channels} input channels, got shape {x.shape}")
    out_dtype = x.dtype
    x = x.astype(self.dtype)
    x = Conv(s.features, s.kernel_sizes[0], self.conv_impl, name="conv_0")(x)
    if s.first_relu:
      x = nn.relu(x)
    for l in range(1, s.num_layers - 1):
      x = Block(s.features, s.kernel_sizes[l], self.conv_impl, self.remat, self.bn_momentum,
                self.gain_init, self.axis_name, name=f"block_{l}")(x, train)
    x = Conv(s.out_channels, s.kernel_sizes[-1], self.conv_impl, name=f"conv_{s.num_layers - 1}")(x)
    return x.astype(out_dtype)


def init_net(key: jax.Array, spec: NetSpec, size: tuple[int, int] = (16, 16),
             gain_init: float | None = None) -> Variables:
  """Fresh variables {'params', 'batch_stats'} for ``spec`` (gains: see gain_initializer)."""
  x = jnp.zeros((1, *size, spec.in_channels), jnp.float32)
  # A 2-layer net (conv, conv) has no batch norm: its 'batch_stats' is empty, not missing.
  return {"batch_stats": {}, **BFCNN(spec, gain_init=gain_init).init(key, x, train=False)}


def apply_net(spec: NetSpec, variables: Variables, x: jax.Array, *, conv_impl: str = "auto",
              dtype: Any = jnp.float32) -> jax.Array:
  """Evaluation-mode residual f(x) of one net; pure: (B, H, W, Cin) -> (B, H, W, Cout)."""
  return BFCNN(spec, conv_impl=conv_impl, dtype=dtype).apply(variables, x, train=False)


# --- the whole model -------------------------------------------------------------------------

@struct.dataclass
class ModelParams:
  """Everything sampling and denoising need: the spec (static) and each net's variables.

  Attributes:
    low: variables of the low-pass net (or of the flat net when ``spec.levels == 0``).
    conditionals: variables of the conditional nets, level 0 (finest) first.
    spec: the architecture (static: a change recompiles).
    sampling: the model's recommended sampling settings (``sampling.Recommended``, static),
      used by ``sample`` and ``super_resolve`` where an argument does not override them;
      None: the library's defaults.
  """
  low: Variables
  conditionals: tuple[Variables, ...]
  spec: ModelSpec = struct.field(pytree_node=False)
  sampling: Any = struct.field(pytree_node=False, default=None)

  def net(self, name: str) -> tuple[NetSpec, Variables]:
    """(spec, variables) of the net named as in ``ModelSpec.nets``: 'flat' or 'low' (both
    held in ``low``: the model's first net), 'cond0', ..."""
    net = self.spec.nets.get(name)
    if net is None:
      raise KeyError(f"no net named {name!r}; nets are {list(self.spec.nets)}")
    return net, (self.low if net.kind != "cond" else self.conditionals[net.level])

  def residual_fn(self, name: str, conv_impl: str = "auto") -> Callable[[jax.Array], jax.Array]:
    """x -> f(x) of the named net in evaluation mode."""
    spec, variables = self.net(name)
    return lambda x: apply_net(spec, variables, x, conv_impl=conv_impl)


def check_params(params: Any) -> None:
  """A TypeError saying what to pass unless ``params`` is a ``ModelParams``."""
  if not isinstance(params, ModelParams):
    raise TypeError(f"params must be wcdm_jax.ModelParams (from wcdm_jax.load_params(path)), "
                    f"got {type(params).__name__}")


def init_model(key: jax.Array, spec: ModelSpec) -> ModelParams:
  """Random variables for every net of ``spec``."""
  keys = jax.random.split(key, 1 + spec.levels)
  low = init_net(keys[0], spec.low)
  conds = tuple(init_net(k, c) for k, c in zip(keys[1:], spec.conditionals))
  return ModelParams(low=low, conditionals=conds, spec=spec)
