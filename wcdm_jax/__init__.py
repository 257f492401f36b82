"""wcdm_jax: multi-scale local conditional probability models of images in JAX/Flax.

Kadkhodaie, Guth, Mallat, Simoncelli, "Learning multi-scale local conditional probability
models of images", ICLR 2023. Public entry points:

- ``wavelets.decompose`` / ``wavelets.reconstruct``: the normalised orthogonal pyramid.
- ``load_params(path)``: a trained or imported model directory -> ``ModelParams``.
- ``sample(key, params)``, ``super_resolve(key, params, low_res)``, ``denoise(params, noisy)``;
  ``AscentConfig`` (the stochastic ascent) or ``FlowConfig`` (the probability flow, far fewer
  network calls) per scale.
- ``log_prob(key, params, images)``: bits per pixel (a bound) per image, scale by scale.
"""
from wcdm_jax import wavelets
from wcdm_jax.checkpoints import load_params, save_model
from wcdm_jax.denoising import denoise
from wcdm_jax.likelihood import LikelihoodConfig, log_prob
from wcdm_jax.models import ModelParams, ModelSpec, NetSpec
from wcdm_jax.sampling import AscentConfig, FlowConfig, sample, super_resolve
from wcdm_jax.wavelets import Pyramid, decompose, reconstruct

__all__ = ["AscentConfig", "FlowConfig", "LikelihoodConfig", "ModelParams", "ModelSpec",
           "NetSpec", "Pyramid", "decompose", "denoise", "load_params", "log_prob",
           "reconstruct", "sample", "save_model", "super_resolve", "wavelets"]
__version__ = "0.1.0"
