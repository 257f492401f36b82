"""The image metrics against closed forms: PSNR and SSIM (Wang et al. 2004)."""
import numpy as np

from wcdm_jax import evaluation


def test_psnr_closed_form_and_identical_images():
  x = np.full((2, 8, 8, 1), 0.5, np.float32)
  np.testing.assert_allclose(evaluation.psnr(x + 0.1, x), [20.0, 20.0], rtol=1e-5)  # 10 log10(1/0.01)
  np.testing.assert_allclose(evaluation.psnr(x + 0.1, x, peak=2.0), 20 + 20 * np.log10(2), rtol=1e-5)
  assert np.all(np.asarray(evaluation.psnr(x, x)) == 200.0)  # capped, finite


def test_ssim_closed_forms():
  """Constant images a, b: the variances and covariance vanish and SSIM is
  (2ab + C1) / (a^2 + b^2 + C1); an image with itself: 1; symmetric in its arguments."""
  a, b = 0.3, 0.6
  x, y = np.full((1, 16, 16, 1), a, np.float32), np.full((1, 16, 16, 1), b, np.float32)
  c1 = 0.01 ** 2
  np.testing.assert_allclose(evaluation.ssim(x, y), [(2 * a * b + c1) / (a * a + b * b + c1)],
                             rtol=1e-5)
  rng = np.random.default_rng(0)
  img = rng.random((2, 20, 20, 3)).astype(np.float32)
  other = np.clip(img + 0.1 * rng.standard_normal(img.shape), 0, 1).astype(np.float32)
  np.testing.assert_allclose(evaluation.ssim(img, img), [1.0, 1.0], rtol=1e-5)
  np.testing.assert_allclose(evaluation.ssim(img, other), evaluation.ssim(other, img), rtol=1e-5)
  assert np.all(np.asarray(evaluation.ssim(img, other)) < 0.99)
  # Uncorrelated noise around one constant: the structure term (2 cov + C2) / (vx + vy + C2)
  # is C2 / (vx + C2) for a constant reference.
  flat = np.full((1, 16, 16, 1), 0.5, np.float32)
  noisy = flat + 0.05 * np.sign(rng.standard_normal(flat.shape)).astype(np.float32)
  s = float(evaluation.ssim(noisy, flat)[0])
  assert 0.0 < s < 0.5
