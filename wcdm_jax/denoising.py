"""Denoising with a flat or a multi-scale model (method.md §5, last paragraph)."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jax.sharding import Mesh

from wcdm_jax import models, parallel, validation, wavelets


def _check_images(spec: models.ModelSpec, images: jax.Array, what: str) -> jax.Array:
  images = validation.images(images, what, spec.channels)
  if spec.levels and spec.mode == wavelets.PERIODIZATION:
    wavelets.check_size(images.shape[1], images.shape[2], spec.levels)
  return images


def denoise(params: models.ModelParams, noisy: jax.Array, *, return_scales: bool = False,
            conv_impl: str = "auto", mesh: Mesh | None = None):
  """Blind denoising of (B, H, W, C) images; one jitted program per shape, and jittable.

  Flat model: ``y - f(y)``. Multi-scale: decompose, denoise x_J with the low-pass net, then
  for each finer level denoise the details conditioned on the *denoised* low-pass and invert
  one level.

  Args:
    params: a flat or multi-scale model (``load_params``).
    noisy: (B, H, W, C) float images in pixel units (clean images in [0, 1]); any noise level
      the nets were trained for, unknown to the call.
    return_scales: also return the denoised low-pass of every level, coarse to fine.
    conv_impl: how convolutions run ('auto', 'xla', ...; ``wcdm_jax.conv``).
    mesh: split the batch over this mesh's 'data' axis (each device denoising its own images);
      default: the mesh ``noisy`` is sharded on, if it is sharded along its batch axis, else
      one device.

  Returns:
    (B, H, W, C) float32 denoised images; with ``return_scales``, (images, [x_J, ..., x_0]).

  Raises:
    ValueError, TypeError: images of the wrong rank, channels or size for the model.
  """
  models.check_params(params)
  noisy = _check_images(params.spec, noisy, "noisy")
  mesh = parallel.resolve_mesh(mesh, noisy)
  params, noisy = parallel.onto(mesh, params, noisy)
  return _denoise_jit(params, noisy, return_scales, conv_impl, mesh)


@functools.partial(jax.jit, static_argnums=(2, 3, 4))
def _denoise_jit(params, noisy, return_scales, conv_impl, mesh):
  return parallel.map_batch(lambda y, p: _denoise(p, y, return_scales, conv_impl), mesh,
                            (noisy,), (params,))


def _denoise(params: models.ModelParams, noisy: jax.Array, return_scales: bool, conv_impl: str):
  spec = params.spec
  if spec.levels == 0:
    out = noisy - params.residual_fn("flat", conv_impl)(noisy)
    return (out, [out]) if return_scales else out
  pyr = wavelets.decompose(noisy, spec.levels, spec.wavelet, spec.mode)
  low = pyr.low - params.residual_fn("low", conv_impl)(pyr.low)
  scales = [low]
  for j in reversed(range(spec.levels)):
    det = pyr.details[j]
    det = det - params.residual_fn(f"cond{j}", conv_impl)(jnp.concatenate([low, det], -1))
    low = wavelets.idwt_level(low, det, spec.wavelet, spec.mode, pyr.sizes[j])
    scales.append(low)
  return (low, scales) if return_scales else low
