"""The public entry points: sample, super_resolve, denoise (tiny random models)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import wcdm_jax
from wcdm_jax import models, sampling

SPEC = models.multiscale_spec(2, cond_rf=5, low_rf=7, image_size=(16, 16), num_layers=4,
                              low_num_layers=4, features=8)
FAST = dict(low_config=sampling.AscentConfig(h0=0.05, beta=0.5, sigma_L=0.1, max_steps=60),
            cond_config=sampling.AscentConfig(h0=0.05, beta=0.5, sigma_L=0.05, max_steps=60))


@pytest.fixture(scope="module")
def params():
  p = models.init_model(jax.random.key(0), SPEC)
  # Larger gains so the random nets have a non-trivial residual (~ a fraction of the input).
  boost = lambda v: jax.tree_util.tree_map_with_path(
      lambda path, x: x * 60 if "gammas" in jax.tree_util.keystr(path) else x, v)
  return models.ModelParams(low=boost(p.low), conditionals=tuple(map(boost, p.conditionals)),
                            spec=SPEC)


def test_sample_with_only_key_and_params(params):
  x = wcdm_jax.sample(jax.random.key(0), params)
  assert x.shape == (1, 16, 16, 1) and bool(jnp.all(jnp.isfinite(x)))


def test_sample_determinism_and_batching(params):
  key = jax.random.key(1)
  a = wcdm_jax.sample(key, params, 3, **FAST)
  b = wcdm_jax.sample(key, params, 3, **FAST)
  np.testing.assert_array_equal(a, b)
  keys = jax.random.split(key, 3)
  np.testing.assert_allclose(wcdm_jax.sample(keys, params, **FAST), a, rtol=1e-5, atol=1e-6)
  for i in range(3):
    one = wcdm_jax.sample(keys[i:i + 1], params, **FAST)
    np.testing.assert_allclose(one[0], a[i], rtol=1e-4, atol=1e-5)
  assert not np.allclose(a[0], a[1])
  jitted = jax.jit(lambda k, p: wcdm_jax.sample(k, p, 3, **FAST))(key, params)
  np.testing.assert_allclose(jitted, a, rtol=1e-4, atol=1e-5)


def test_sample_intermediates_and_rescale(params):
  x, scales, infos = wcdm_jax.sample(jax.random.key(2), params, 2, low_rescale=(0.0, 0.8),
                                     return_intermediates=True, image_size=(32, 32), **FAST)
  assert [s.shape[1] for s in scales] == [8, 16, 32] and x.shape == (2, 32, 32, 1)
  np.testing.assert_allclose(scales[0].min((1, 2, 3)), 0.0, atol=1e-6)
  np.testing.assert_allclose(scales[0].max((1, 2, 3)), 0.8, atol=1e-6)
  assert len(infos) == 3 and infos[0].sigmas.shape == (2, 60)
  # The finest level's details were synthesised on top of the given low-pass: invert-consistent.
  low = wcdm_jax.decompose(x, 1).low
  np.testing.assert_allclose(low, scales[1], atol=1e-5)


def test_super_resolve(params):
  low = jnp.full((2, 4, 4, 1), 0.5)
  out, scales, _ = wcdm_jax.super_resolve(jax.random.key(0), params, low, return_intermediates=True,
                                          cond_config=FAST["cond_config"])
  assert out.shape == (2, 16, 16, 1)
  # The synthesised image keeps the given low-pass exactly.
  np.testing.assert_allclose(wcdm_jax.decompose(out, 2).low, low, atol=1e-5)
  again = wcdm_jax.super_resolve(jax.random.key(0), params, low, cond_config=FAST["cond_config"])
  np.testing.assert_array_equal(out, again)


def test_bad_inputs(params):
  with pytest.raises(ValueError, match="num_samples must be an int >= 1, got 0"):
    wcdm_jax.sample(jax.random.key(0), params, 0)
  with pytest.raises(ValueError, match=r"pass its 2-level low-pass \(4x4\)"):
    wcdm_jax.super_resolve(jax.random.key(0), params, jnp.zeros((1, 16, 16, 1)))
  with pytest.raises(ValueError, match=r"low_res must be \(B, H, W, C\), got shape \(1, 4, 4\)"):
    wcdm_jax.super_resolve(jax.random.key(0), params, jnp.zeros((1, 4, 4)))
  with pytest.raises(ValueError, match="not divisible"):
    wcdm_jax.sample(jax.random.key(0), params, image_size=(18, 18))
  with pytest.raises(ValueError, match="noisy has 3 channels but the model takes 1"):
    wcdm_jax.denoise(params, jnp.zeros((1, 16, 16, 3)))
  flat = models.init_model(jax.random.key(0), models.ModelSpec(low=models.flat_spec(5, 1, 3, 4)))
  with pytest.raises(ValueError, match="needs a multi-scale model"):
    wcdm_jax.super_resolve(jax.random.key(0), flat, jnp.zeros((1, 4, 4, 1)))


def test_denoise_flat_and_multiscale(params):
  y = jax.random.uniform(jax.random.key(0), (2, 16, 16, 1))
  out, scales = jax.jit(lambda p, y: wcdm_jax.denoise(p, y, return_scales=True))(params, y)
  assert out.shape == y.shape and [s.shape[1] for s in scales] == [4, 8, 16]
  # Positive homogeneity carries over to the whole multi-scale pipeline.
  np.testing.assert_allclose(wcdm_jax.denoise(params, 2.0 * y), 2.0 * out, rtol=1e-4, atol=1e-5)
  flat = models.init_model(jax.random.key(0), models.ModelSpec(low=models.flat_spec(5, 1, 3, 4)))
  assert wcdm_jax.denoise(flat, y).shape == y.shape
  x = wcdm_jax.sample(jax.random.key(0), flat, 2, low_config=FAST["low_config"])
  assert x.shape == (2, 64, 64, 1)  # flat models sample at their image size with their one net


def test_colour_model_end_to_end_by_value():
  """3 channels: a colour image whose channels differ keeps them apart everywhere."""
  spec = models.multiscale_spec(2, cond_rf=5, low_rf=5, channels=3, image_size=(16, 16),
                                num_layers=3, low_num_layers=3, features=8)
  p = models.init_model(jax.random.key(0), spec)
  img = jnp.stack([jnp.full((16, 16), 0.8), jnp.full((16, 16), 0.4), jnp.full((16, 16), 0.1)],
                  -1)[None] + 0.05 * jax.random.normal(jax.random.key(1), (1, 16, 16, 3))
  low = wcdm_jax.decompose(img, 2).low  # (1, 4, 4, 3)
  sr = wcdm_jax.super_resolve(jax.random.key(2), p, low, cond_config=FAST["cond_config"])
  assert sr.shape == (1, 16, 16, 3)
  np.testing.assert_allclose(wcdm_jax.decompose(sr, 2).low, low, atol=1e-5)  # per channel
  means = np.asarray(sr.mean((0, 1, 2)))
  np.testing.assert_allclose(means, np.asarray(img.mean((0, 1, 2))), atol=1e-5)
  den = wcdm_jax.denoise(p, img)
  assert den.shape == img.shape and float(jnp.abs(den[..., 0] - den[..., 2]).mean()) > 0.1
  x = wcdm_jax.sample(jax.random.key(3), p, 2, **FAST)
  assert x.shape == (2, 16, 16, 3) and bool(jnp.all(jnp.isfinite(x)))
