"""Argument checks at the public boundary: one-line errors naming the argument, the value
and what would work, raised before any JAX tracing (never a JAX-internal traceback for a
user's mistake). Tracers pass: the checks look at types, shapes and dtypes only.
"""
from __future__ import annotations

import numbers
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np


def _show(value: Any) -> str:
  text = repr(value)
  return text if len(text) <= 60 else text[:57] + "..."


def images(x: Any, name: str, channels: int | None = None) -> jax.Array:
  """A float (B, H, W, C) array (numpy or jax, tracers included) with ``channels`` channels."""
  if not isinstance(x, (jax.Array, np.ndarray)):
    raise TypeError(f"{name} must be a (B, H, W, C) float array, got {type(x).__name__} "
                    f"{_show(x)}; wrap it with jnp.asarray(...)")
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise TypeError(f"{name} must hold floats in [0, 1], got dtype {x.dtype}; convert integer "
                    "images with x.astype(np.float32) / 255 (or / 65535 for 16 bits)")
  if x.ndim != 4:
    raise ValueError(f"{name} must be (B, H, W, C), got shape {tuple(x.shape)}; add the batch "
                     "axis with x[None] or the channel axis with x[..., None]")
  if min(x.shape) == 0:
    raise ValueError(f"{name} is empty (shape {tuple(x.shape)})")
  if channels is not None and x.shape[-1] != channels:
    raise ValueError(f"{name} has {x.shape[-1]} channels but the model takes {channels}: shape "
                     f"{tuple(x.shape)} should be (B, H, W, {channels})")
  return x


def key(k: Any, name: str = "key") -> jax.Array:
  """A JAX PRNG key: a typed key (``jax.random.key``) or a legacy uint32 (..., 2) one."""
  if isinstance(k, (jax.Array, np.ndarray)):
    if jnp.issubdtype(k.dtype, jax.dtypes.prng_key):
      return k
    if k.dtype == jnp.uint32 and k.ndim >= 1 and k.shape[-1] == 2:
      return k
  raise TypeError(f"{name} must be a JAX random key, got {type(k).__name__} {_show(k)}; use "
                  "jax.random.key(seed)")


def positive_int(v: Any, name: str, minimum: int = 1) -> int:
  """An int >= minimum (numpy ints accepted; bools and floats refused)."""
  if isinstance(v, bool) or not isinstance(v, numbers.Integral):
    raise TypeError(f"{name} must be an int >= {minimum}, got {type(v).__name__} {_show(v)}")
  if v < minimum:
    raise ValueError(f"{name} must be an int >= {minimum}, got {v}")
  return int(v)


def keys(k: Any, num_samples: int | None, count_name: str = "num_samples") -> jax.Array:
  """A batch of keys: ``k`` itself when it is already (B,), else split into num_samples.
  ``count_name`` names the count in the error (callers whose count is a batch's size)."""
  k = key(k)
  if num_samples is not None:
    num_samples = positive_int(num_samples, "num_samples")
  one_key_ndim = 0 if jnp.issubdtype(k.dtype, jax.dtypes.prng_key) else 1  # legacy: (2,)
  if k.ndim == one_key_ndim + 1:
    if num_samples not in (None, k.shape[0]):
      raise ValueError(f"got {k.shape[0]} keys but {count_name}={num_samples}; pass one key "
                       f"or exactly {count_name} keys")
    return k
  if k.ndim > one_key_ndim:
    raise ValueError(f"key must be one key or a (B,) batch of keys, got shape {k.shape}")
  return jax.random.split(k, 1 if num_samples is None else num_samples)


def size(v: Any, name: str) -> tuple[int, int]:
  """(H, W) of positive ints; a single int means a square."""
  if isinstance(v, numbers.Integral) and not isinstance(v, bool):
    v = (v, v)
  if not isinstance(v, Sequence) or isinstance(v, str) or len(v) != 2:
    raise ValueError(f"{name} must be (height, width) or one int, got {_show(v)}")
  return tuple(positive_int(s, f"{name}[{i}]") for i, s in enumerate(v))


def float_range(v: Any, name: str) -> tuple[float, float]:
  """(lo, hi) with lo < hi, both finite numbers."""
  if not isinstance(v, Sequence) or isinstance(v, str) or len(v) != 2:
    raise ValueError(f"{name} must be a pair (lo, hi), e.g. (0.0, 0.8), got {_show(v)}")
  if not all(isinstance(x, numbers.Real) and not isinstance(x, bool) and np.isfinite(x)
             for x in v):
    raise TypeError(f"{name} must hold two finite numbers, got {_show(v)}")
  lo, hi = float(v[0]), float(v[1])
  if not lo < hi:
    raise ValueError(f"{name} must have lo < hi, got {_show(v)}")
  return lo, hi


def ascent_settings(cfg: Any) -> None:
  """An ascent's settings (sampling.AscentConfig): beta and h0 in (0, 1], max_steps >= 1,
  positive noise levels, a finite mean_0."""
  if not 0 < cfg.beta <= 1:
    raise ValueError(f"beta must be in (0, 1], got {cfg.beta}")
  if not 0 < cfg.h0 <= 1:
    raise ValueError(f"h0 must be in (0, 1], got {cfg.h0}")
  positive_int(cfg.max_steps, "max_steps")
  for name in ("sigma_0", "sigma_L", "abort_sigma"):
    if not getattr(cfg, name) > 0:
      raise ValueError(f"{name} must be > 0, got {getattr(cfg, name)}")
  if not np.isfinite(cfg.mean_0):
    raise ValueError(f"mean_0 must be a finite number, got {cfg.mean_0}")
  if not isinstance(cfg.flip_average, bool):
    raise TypeError(f"flip_average must be True or False, got {cfg.flip_average!r}")
