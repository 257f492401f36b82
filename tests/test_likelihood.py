"""wcdm_jax.likelihood: the denoising bound against closed forms on a Gaussian image model,
the multi-scale decomposition (log-determinant included), pairing, batch invariance and errors."""
import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from wcdm_jax import likelihood, models, wavelets

SIZE = 4  # 4x4x1 images: d = 16, a covariance small enough for exact MMSE denoisers
D = SIZE * SIZE
CFG = likelihood.LikelihoodConfig(num_evals=16, replicas=4, sigma_min=1e-3, sigma_max=20.0,
                                  bins=0, prior_mean=0.0, prior_var=0.1)


def _bound_at_sigma_min(keys, denoiser, x, cfg, **kwargs):
  """``bound_scan`` at the smallest cut: (estimate (B,), stderr (B,)) in nats."""
  est, se = likelihood.bound_scan(keys, denoiser, x, cfg, **kwargs)
  return est[:, 0], se[:, 0]


@pytest.fixture(scope="module")
def gaussian():
  """x ~ N(0, C) with C = U diag(lam) U^T, eigenvalues log-spread over [0.005, 0.3]."""
  rng = np.random.default_rng(0)
  u, _ = np.linalg.qr(rng.normal(size=(D, D)))
  lam = np.exp(rng.uniform(np.log(0.005), np.log(0.3), D))
  cov = (u * lam) @ u.T
  x = (rng.normal(size=(512, D)) * np.sqrt(lam)) @ u.T
  return cov, jnp.asarray(x.reshape(-1, SIZE, SIZE, 1), jnp.float32)


def _linear_mmse(cov: np.ndarray, mean_fn=None):
  """E[v | v + s z] for v ~ N(mu, cov), vectorised over (B,) noise levels s."""
  eta, v = np.linalg.eigh(cov)
  eta, v = jnp.asarray(eta, jnp.float32), jnp.asarray(v, jnp.float32)

  def denoise(y_flat, mu, sigma):  # (B, n), (B, n), (B,)
    shrink = eta / (eta + sigma[:, None] ** 2)
    return mu + ((y_flat - mu) @ v * shrink) @ v.T
  return denoise


def _flat_denoiser(cov, scale=1.0):
  den = _linear_mmse(cov * scale)
  return lambda y, s: den(y.reshape(y.shape[0], -1), 0.0, s).reshape(y.shape)


def _entropy(cov) -> float:
  return 0.5 * np.linalg.slogdet(2 * np.pi * np.e * cov)[1]


def _mean_se(v) -> tuple[float, float]:
  v = np.asarray(v, np.float64)
  return float(v.mean()), float(v.std(ddof=1) / math.sqrt(v.size))


def _keys(n, seed=1):
  return jax.random.split(jax.random.key(seed), n)


def test_gaussian_bound_equals_entropy(gaussian):
  cov, x = gaussian
  nats, se = jax.jit(lambda k, x: _bound_at_sigma_min(k, _flat_denoiser(cov), x, CFG))(
      _keys(x.shape[0]), x)
  mean, se_mean = _mean_se(nats)
  exact = _entropy(cov)
  assert abs(mean - exact) < 2 * se_mean, (mean, exact, se_mean)
  # Informative: an error in any constant (e.g. d/2 = 8 nats in the reconstruction term) shows.
  assert se_mean < 1.0
  # The per-image standard error is the replicas' spread: about the observed spread of the
  # per-image Monte Carlo errors (one x, many keys).
  one = jnp.repeat(x[:1], 256, axis=0)
  reps, reps_se = _bound_at_sigma_min(_keys(256, 7), _flat_denoiser(cov), one, CFG)
  assert 0.6 < float(np.median(reps_se)) / float(np.std(reps)) < 1.6


def test_better_denoiser_gives_lower_bound_paired(gaussian):
  cov, x = gaussian
  keys = _keys(x.shape[0], 3)
  good, _ = _bound_at_sigma_min(keys, _flat_denoiser(cov), x, CFG)
  bad, _ = _bound_at_sigma_min(keys, _flat_denoiser(cov, scale=4.0), x, CFG)
  diff_mean, diff_se = _mean_se(bad - good)
  assert diff_mean > 5 * diff_se > 0
  # Same keys = same noise: the paired difference is far less noisy than either estimate.
  assert diff_se < 0.5 * _mean_se(good)[1]


def test_an_error_floor_moves_the_best_reconstruction_cut(gaussian):
  """A denoiser that is off by 0.01 everywhere (a 40 dB floor) pays floor / (2 s^2) per pixel
  below the floor: the scan's best cut moves up to about the floor; the oracle's stays at the
  bottom (its bound only loosens as the cut rises)."""
  cov, x = gaussian
  cfg = likelihood.LikelihoodConfig(num_evals=32, replicas=4, sigma_min=1e-3, sigma_max=20.0,
                                    bins=0, prior_mean=0.0, prior_var=0.1, scan=8)
  keys = _keys(x.shape[0], 9)
  oracle = _flat_denoiser(cov)
  good, _ = likelihood.bound_scan(keys, oracle, x, cfg)
  floored, _ = likelihood.bound_scan(keys, lambda y, s: oracle(y, s) + 0.01, x, cfg)
  good, floored = np.asarray(good).mean(0), np.asarray(floored).mean(0)
  assert good[-1] > good[0] + 1.0  # the oracle gains nothing from a coarser cut
  assert 2 <= np.argmin(floored) <= 5, floored  # cuts 1e-3 * 2^k: the floor 0.01 is k = 3.3
  assert floored[0] > good[0] + 0.4 * D * 0.01 ** 2 / (2 * 1e-3 ** 2)


def _multiscale_denoisers(cov):
  """Exact low-pass and conditional MMSE denoisers of the J = 1 Haar pyramid of N(0, cov)."""
  basis = jnp.eye(D, dtype=jnp.float32).reshape(D, SIZE, SIZE, 1)
  lows, dets = wavelets.analysis(basis, 1)
  w = np.concatenate([np.asarray(lows[0]).reshape(D, -1), np.asarray(dets[0]).reshape(D, -1)],
                     1).T  # coefficients = w @ x
  np.testing.assert_allclose(w @ w.T, np.eye(D) / 4, atol=1e-6)  # orthonormal / 2
  c = w @ cov @ w.T
  nl = lows[0][0].size
  cll, cld, cdd = c[:nl, :nl], c[:nl, nl:], c[nl:, nl:]
  a = np.linalg.solve(cll, cld).T  # E[det | low] = a @ low
  s = cdd - cld.T @ np.linalg.solve(cll, cld)
  low_den, cond_den = _linear_mmse(cll), _linear_mmse(s)
  a = jnp.asarray(a, jnp.float32)

  def low(y, sig):
    return low_den(y.reshape(y.shape[0], -1), 0.0, sig).reshape(y.shape)

  def cond(y, lo, sig):
    mu = lo.reshape(lo.shape[0], -1) @ a.T
    return cond_den(y.reshape(y.shape[0], -1), mu, sig).reshape(y.shape)
  return low, cond


def test_multiscale_total_equals_flat_and_entropy(gaussian):
  cov, x = gaussian
  low, cond = _multiscale_denoisers(cov)
  keys = _keys(x.shape[0], 5)
  nats, errs = jax.jit(lambda k, x: likelihood.multiscale_nats(k, low, [cond], x, CFG))(keys, x)
  assert sorted(nats) == ["cond0", "log_det", "low"]
  np.testing.assert_allclose(nats["log_det"], D * math.log(2), rtol=1e-6)
  total = sum(nats.values())[:, 0]  # the bound at sigma_min (columns: the scan's cuts)
  ms_mean, ms_se = _mean_se(total)
  flat, _ = _bound_at_sigma_min(keys, _flat_denoiser(cov), x, CFG)
  flat_mean, flat_se = _mean_se(flat)
  exact = _entropy(cov)
  assert abs(ms_mean - exact) < 2 * ms_se, (ms_mean, exact, ms_se)
  assert abs(ms_mean - flat_mean) < 2 * math.hypot(ms_se, flat_se)
  # Without the log-determinant the total would be off by 16 ln 2 = 11 nats.
  assert abs(ms_mean - D * math.log(2) - exact) > 20 * ms_se


def _tiny_params(levels: int, seed: int = 0):
  spec = (models.multiscale_spec(levels, cond_rf=5, low_rf=5, image_size=(8, 8), num_layers=3,
                                 low_num_layers=3, features=8) if levels else
          models.ModelSpec(low=models.flat_spec(5, num_layers=3, features=8), image_size=(8, 8)))
  return models.init_model(jax.random.key(seed), spec)


@pytest.mark.parametrize("levels", [0, 1])
def test_log_prob_on_models_batch_invariant_and_deterministic(levels):
  params = _tiny_params(levels)
  images = jnp.asarray(np.random.default_rng(0).integers(0, 256, (3, 8, 8, 1)) / 255,
                       jnp.float32)
  cfg = likelihood.LikelihoodConfig(num_evals=4, replicas=2)
  keys = _keys(3, 11)
  out = likelihood.log_prob(keys, params, images, config=cfg)
  again = likelihood.log_prob(keys, params, images, config=cfg)
  np.testing.assert_array_equal(out.bits_per_pixel, again.bits_per_pixel)
  names = ["flat"] if not levels else ["cond0", "log_det", "low"]
  assert sorted(out.scales) == sorted(names + ["dequantization"])
  np.testing.assert_allclose(sum(out.scales.values()), out.bits_per_pixel, rtol=1e-6)
  assert out.scan.shape == (3, cfg.scan) and len(cfg.truncations) == cfg.scan
  np.testing.assert_allclose(sum(out.scales_scan.values()), out.scan, rtol=1e-6)
  # The figure is at cuts of the scan (one per replica): between its lowest and highest values.
  assert out.cuts.shape == (3, cfg.replicas)
  assert np.all(np.isin(np.asarray(out.cuts), np.asarray(cfg.truncations, np.float32)))
  assert np.all(out.bits_per_pixel <= out.scan.max(1) + 3 * out.scan_stderr.max(1))
  assert np.all(out.bits_per_pixel >= out.scan.min(1) - 3 * out.scan_stderr.max(1))
  one_cut = likelihood.log_prob(keys, params, images,
                                config=dataclasses.replace(cfg, scan=1))  # at sigma_min only
  np.testing.assert_allclose(one_cut.bits_per_pixel, out.scan[:, 0], rtol=1e-5)
  np.testing.assert_allclose(out.scales["dequantization"], math.log2(255))
  if levels:
    np.testing.assert_allclose(out.scales["log_det"], 1.0)  # 64 coefficients / 64 pixels
  assert np.all(np.isfinite(out.bits_per_pixel)) and np.all(out.stderr > 0)
  # Image 1's figure depends on its key and pixels only, not on the rest of the batch.
  part = likelihood.log_prob(keys[1:2], params, images[1:2], config=cfg)
  np.testing.assert_allclose(part.bits_per_pixel, out.bits_per_pixel[1:2], rtol=1e-5)
  other = likelihood.log_prob(_keys(3, 12), params, images, config=cfg)
  assert not np.array_equal(other.bits_per_pixel, out.bits_per_pixel)


def test_cross_fitted_cut_is_chosen_by_the_other_replicas():
  """Each replica's cut minimises the mean of the *other* replicas (never its own value), so
  its value there is unbiased; a cut that is best for every replica is everyone's."""
  total = np.array([[[5.0, 1.0, 3.0],    # replica 0 alone would pick cut 1
                     [2.0, 4.0, 3.0],
                     [2.0, 4.0, 3.0]]])  # (B=1, R=3, T=3)
  np.testing.assert_array_equal(likelihood.cross_fitted_cut(jnp.asarray(total)), [[0, 1, 1]])
  flat = np.tile(np.array([3.0, 1.0, 2.0]), (2, 4, 1))
  np.testing.assert_array_equal(likelihood.cross_fitted_cut(jnp.asarray(flat)), np.ones((2, 4)))


def test_default_figure_is_not_the_minimum_over_cuts():
  """With a noisy estimate at every cut and no real difference between cuts, the minimum of
  the scan is biased low; the cross-fitted figure is not (its mean over many draws is the
  common value)."""
  rng = np.random.default_rng(0)
  total = 10.0 + rng.normal(size=(4000, 4, 8))  # (B, R, T): every cut equal in expectation
  cut = likelihood.cross_fitted_cut(jnp.asarray(total))
  chosen = np.take_along_axis(total, np.asarray(cut)[..., None], -1)[..., 0].mean(1)
  assert abs(chosen.mean() - 10.0) < 0.03  # unbiased (s.e. of the mean about 0.008)
  assert total.mean(1).min(-1).mean() < 9.5  # the minimum over cuts: about 0.7 s.e. low


@pytest.mark.parametrize("make, match", [
    (lambda: dict(images=jnp.full((1, 8, 8, 1), 1.5)), r"\[0, 1\]"),
    (lambda: dict(images=jnp.full((1, 8, 8, 1), jnp.nan)), "non-finite"),
    (lambda: dict(images=jnp.zeros((1, 8, 8, 3))), "channels"),
    (lambda: dict(images=jnp.zeros((1, 6, 5, 1))), "divisible"),
    (lambda: dict(key=_keys(2)), r"got 2 keys but len\(images\)=1"),
    (lambda: dict(config="fast"), "LikelihoodConfig"),
])
def test_log_prob_bad_input(make, match):
  args = dict(key=jax.random.key(0), images=jnp.zeros((1, 8, 8, 1)), config=None)
  args.update(make())
  with pytest.raises((ValueError, TypeError), match=match):
    likelihood.log_prob(args["key"], _tiny_params(1), args["images"], config=args["config"])


@pytest.mark.parametrize("kw, match", [
    (dict(num_evals=0), "num_evals"), (dict(num_evals=6, replicas=4), "multiple"),
    (dict(replicas=1), "replicas"), (dict(sigma_min=0.0), "sigma range"),
    (dict(sigma_min=2.0, sigma_max=1.0), "sigma range"), (dict(bins=1), "bins"),
    (dict(prior_var=-1.0), "prior_var"),
])
def test_config_errors(kw, match):
  with pytest.raises(ValueError, match=match):
    likelihood.LikelihoodConfig(**kw)
