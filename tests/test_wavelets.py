import jax
import jax.numpy as jnp
import numpy as np
import pytest
import pywt

from conftest import shared_path
from wcdm_jax import wavelets


def _images(shape=(3, 32, 48, 2), seed=0):
  return jnp.asarray(np.random.RandomState(seed).rand(*shape).astype(np.float32))


@pytest.mark.parametrize("wavelet", ["haar", "db2", "sym4", "coif1"])
def test_matches_pywavelets(wavelet):
  x = _images()
  lows, details = wavelets.analysis(x, 3, wavelet)
  for b in range(x.shape[0]):
    for c in range(x.shape[-1]):
      img = np.asarray(x[b, :, :, c], np.float64)
      for j in range(3):
        ref = pywt.wavedec2(img, wavelet, mode="periodization", level=j + 1)
        scale = 2.0 ** (j + 1)
        np.testing.assert_allclose(lows[j][b, :, :, c], ref[0] / scale, atol=1e-6)
        bands = wavelets.split_bands(details[j][b])
        for band, r in zip(bands, ref[1]):
          np.testing.assert_allclose(band[..., c], r / scale, atol=1e-6)


def test_matches_authors_fixture():
  d = np.load(shared_path("reference", "fixtures", "wavelet_J3_160.npz"))
  img = jnp.asarray(d["image"].transpose(0, 2, 3, 1))
  lows, details = wavelets.analysis(img, 3)
  for j in range(3):
    ours = np.concatenate([lows[j], details[j]], -1).transpose(0, 3, 1, 2)
    np.testing.assert_allclose(ours, d[f"scale{j}"], atol=1e-6)


@pytest.mark.parametrize("wavelet,mode", [("haar", "periodization"), ("db2", "periodization"),
                                          ("sym4", "periodization"), ("db2", "symmetric"),
                                          ("haar", "zero")])
def test_perfect_reconstruction(wavelet, mode):
  x = _images()
  pyr = wavelets.decompose(x, 3, wavelet, mode)
  np.testing.assert_allclose(wavelets.reconstruct(pyr), x, atol=2e-6)


@pytest.mark.parametrize("wavelet", ["haar", "db3"])
def test_energy_identity(wavelet):
  """Orthonormal: ||x||^2 = sum_j 4^(j+1) ||details_j||^2 + 4^J ||low||^2 (normalisation)."""
  x = _images()
  pyr = wavelets.decompose(x, 3, wavelet)
  energy = 4.0 ** 3 * jnp.sum(pyr.low ** 2)
  energy += sum(4.0 ** (j + 1) * jnp.sum(d ** 2) for j, d in enumerate(pyr.details))
  np.testing.assert_allclose(energy, jnp.sum(x ** 2), rtol=1e-5)


def test_low_pass_is_local_average():
  x = _images((1, 16, 16, 1))
  pyr = wavelets.decompose(x, 2)
  np.testing.assert_allclose(pyr.low[0, 0, 0, 0], x[0, :4, :4, 0].mean(), atol=1e-6)


def test_jit_vmap_grad():
  x = _images((2, 16, 16, 1))
  f = lambda x: wavelets.reconstruct(wavelets.decompose(x, 2, "db2"))
  np.testing.assert_allclose(jax.jit(f)(x), x, atol=1e-6)
  # vmap over an extra leading axis.
  xs = jnp.stack([x, 2 * x])
  np.testing.assert_allclose(jax.vmap(jax.jit(f))(xs), xs, atol=1e-5)
  # grad: reconstruct(decompose(x)) = x, so the gradient of its sum is all ones; and the
  # gradient of the energy of the details is linear in x.
  g = jax.grad(lambda x: f(x).sum())(x)
  np.testing.assert_allclose(g, jnp.ones_like(x), atol=1e-6)
  e = lambda x: sum(jnp.sum(d ** 2) for d in wavelets.decompose(x, 2).details)
  np.testing.assert_allclose(jax.grad(e)(3 * x), 3 * jax.grad(e)(x), rtol=1e-5, atol=1e-7)


def test_jaxwt_modes_under_jit():
  x = _images((2, 32, 32, 3))
  f = jax.jit(lambda x: wavelets.decompose(x, 2, "db2", "symmetric"))
  pyr = f(x)
  assert pyr.details[0].shape[-1] == 9
  np.testing.assert_allclose(wavelets.reconstruct(pyr), x, atol=2e-6)


def test_bad_size_names_a_working_size():
  with pytest.raises(ValueError, match=r"crop to 96x88 or pad to 104x96"):
    wavelets.decompose(jnp.zeros((1, 100, 90, 1)), 3)


def test_bad_wavelet():
  with pytest.raises(ValueError, match="not orthogonal"):
    wavelets.decompose(jnp.zeros((1, 16, 16, 1)), 1, "bior2.2")


@pytest.mark.parametrize("channels", [1, 3])
def test_mirror_signs_relate_the_bands_of_a_mirrored_image(channels):
  x = _images((2, 16, 24, channels))
  signs = wavelets.mirror_signs("haar", channels)
  _, details = wavelets.dwt_level(x)
  _, mirrored = wavelets.dwt_level(x[:, :, ::-1])
  np.testing.assert_allclose(mirrored, details[:, :, ::-1] * signs, atol=1e-6)
  assert sorted(set(signs.tolist())) == [-1.0, 1.0]  # a band that changes sign, one that does not
  assert wavelets.mirror_signs("db1", channels) is not None  # Haar by another name
  for other in ("db2", "sym4", "coif1"):  # longer filters: no band-wise relation
    assert wavelets.mirror_signs(other, channels) is None
    _, d = wavelets.dwt_level(x, other)
    _, m = wavelets.dwt_level(x[:, :, ::-1], other)
    assert np.abs(np.abs(np.asarray(m)) - np.abs(np.asarray(d[:, :, ::-1]))).max() > 1e-2
