import dataclasses
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import wcdm_jax
from launch import claims
from wcdm_jax import evaluation, models, sampling, wavelets

# --- A Gaussian prior with a known stationary covariance ---------------------------------------
# x ~ N(0, S) on 16x16 periodic images, S diagonal in the unitary DFT basis with power
# p(f) = 0.1 * 0.02 / (|f|^2 + 0.02) (a 1/f^2-like spectrum). For a known noise variance s
# the MMSE denoiser is linear: residual = s (S + s I)^-1 y. The sampler's denoiser is blind,
# so s is estimated per image by maximum likelihood (grid search) from y's spectrum.
N = 16
_F = np.sqrt(np.fft.fftfreq(N)[:, None] ** 2 + np.fft.fftfreq(N)[None, :] ** 2)
POWER = jnp.asarray(0.1 * 0.02 / (_F ** 2 + 0.02), jnp.float32)
_GRID = jnp.logspace(-8, 1, 300)
_RADIUS = np.round(_F * N).astype(int)


def gaussian_residual(y):  # (B, N, N, 1) -> (B, N, N, 1)
  spec = jnp.fft.fft2(y[..., 0])
  pw = jnp.abs(spec) ** 2 / N ** 2
  cand = POWER[None] + _GRID[:, None, None]  # (G, N, N)
  nll = jnp.sum(pw[:, None] / cand[None] + jnp.log(cand)[None], (2, 3))  # (B, G)
  s = _GRID[jnp.argmin(nll, 1)][:, None, None]
  return jnp.fft.ifft2(s / (POWER + s) * spec).real[..., None]


def _radial(q):
  q = np.asarray(q)
  return np.array([q[_RADIUS == r].mean() for r in range(_RADIUS.max() + 1)])


def gaussian_check(cfg, num=1000):
  """(per-radius sample power / prior power, measured sigma_t / predicted for t <= 15)."""
  keys = jax.random.split(jax.random.key(0), num)
  out, info = jax.jit(lambda k: sampling.ascent(k, gaussian_residual, (N, N, 1), cfg))(keys)
  power = jnp.mean(jnp.abs(jnp.fft.fft2(out[..., 0])) ** 2, 0) / N ** 2
  ratio = _radial(power) / _radial(POWER)
  # The effective noise shrinks by (1 - beta h_t) per step; early on (noise >> signal)
  # sigma_t measures it.
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", RuntimeWarning)  # all NaN once every sample stopped
    sig = np.nanmean(np.asarray(info.sigmas[:, :16]), 0)
  t = np.arange(1, 16)
  h = cfg.h0 * t / (1 + cfg.h0 * (t - 1))  # method.md §5, written out independently
  predicted = sig[0] * np.concatenate([[1.0], np.cumprod(1 - cfg.beta * h)])
  return ratio, sig / predicted, info


GAUSS_CFG = sampling.AscentConfig(h0=0.01, beta=0.5, sigma_L=0.01, max_steps=400)


def _passes(ratio, traj):
  return bool(np.all(np.abs(ratio - 1) < 0.12) and np.all(np.abs(traj - 1) < 0.05))


def test_gaussian_prior_samples_have_its_covariance():
  ratio, traj, info = gaussian_check(GAUSS_CFG)
  assert np.all(np.asarray(info.converged)), "every sample should meet the stop rule"
  assert np.all(np.abs(ratio - 1) < 0.12), ratio
  assert np.all(np.abs(traj - 1) < 0.05), traj


def test_gaussian_check_has_power(monkeypatch):
  """The check above fails when the algorithm is broken in the usual ways."""
  orig_gamma, orig_z = sampling.noise_amplitude, sampling._per_sample_normal
  broken = {
      "no noise term": ("_per_sample_normal",
                        lambda k, t, s: orig_z(k, t, s) * jnp.where(t == 0, 1.0, 0.0)),
      "gamma too large": ("noise_amplitude", lambda s, h, b: 2.0 * orig_gamma(s, h, b)),
      "gamma without sqrt": ("noise_amplitude", lambda s, h, b: s * ((1 - b * h) ** 2 - (1 - h) ** 2)),
      "h without denominator": ("step_size", lambda t, c: jnp.minimum(c.h0 * jnp.asarray(t, jnp.float32), 1.0)),
  }
  for what, (name, fn) in broken.items():
    with monkeypatch.context() as m:
      m.setattr(sampling, name, fn)
      ratio, traj, _ = gaussian_check(GAUSS_CFG, num=500)
    assert not _passes(ratio, traj), f"the Gaussian check misses: {what}"


def _toy_residual(y):
  """A fixed, bias-free, nonlinear 'denoiser' for determinism tests."""
  return 0.5 * y + 0.1 * jnp.tanh(y) - 0.05 * jnp.roll(y, 1, axis=1)


def test_batch_equals_single_runs_and_jit():
  cfg = sampling.AscentConfig(h0=0.05, beta=0.5, sigma_L=0.05, max_steps=200)
  keys = jax.random.split(jax.random.key(3), 4)
  run = lambda k: sampling.ascent(k, _toy_residual, (8, 8, 2), cfg)
  out, info = jax.jit(run)(keys)
  for i in range(4):
    o, inf = jax.jit(run)(keys[i:i + 1])
    np.testing.assert_allclose(o[0], out[i], rtol=1e-5, atol=1e-6)
    assert int(inf.steps[0]) == int(info.steps[i])
  out2, _ = jax.jit(run)(keys)
  np.testing.assert_array_equal(out, out2)  # same key, same output
  out3, _ = run(keys)  # not jitted (the scan itself is still compiled by lax)
  np.testing.assert_allclose(out3, out, rtol=1e-5, atol=1e-6)


def test_each_sample_stops_on_its_own_rule():
  cfg = sampling.AscentConfig(h0=0.01, beta=0.5, sigma_L=0.01, max_steps=400)
  keys = jax.random.split(jax.random.key(0), 32)
  _, info = jax.jit(lambda k: sampling.ascent(k, gaussian_residual, (N, N, 1), cfg))(keys)
  steps = np.asarray(info.steps)
  assert len(set(steps.tolist())) > 1, "samples should stop at different steps"
  sig = np.asarray(info.sigmas)
  for i, s in enumerate(steps):
    assert np.all(np.isfinite(sig[i, :s])) and np.all(np.isnan(sig[i, s:]))
  # Each matches its own single-sample run.
  for i in (int(np.argmin(steps)), int(np.argmax(steps))):
    _, one = jax.jit(lambda k: sampling.ascent(k, gaussian_residual, (N, N, 1), cfg))(keys[i:i + 1])
    assert int(one.steps[0]) == steps[i]


def test_abort_when_sigma_explodes():
  cfg = sampling.AscentConfig(max_steps=20)
  keys = jax.random.split(jax.random.key(0), 2)
  out, info = sampling.ascent(keys, lambda y: 3.0 * y, (4, 4, 1), cfg)
  assert np.all(np.asarray(info.aborted)) and not np.any(np.asarray(info.converged))
  assert np.all(np.asarray(info.steps) == 0)


def test_initial_mean_shifts_the_default_initial_state():
  """mean_0 starts the ascent at mean_0 + sigma_0 N(0, I): with beta = 1 and a linear
  residual the whole trajectory is that start scaled, so the output is the default run's
  plus the mean scaled the same way."""
  keys = jax.random.split(jax.random.key(1), 3)
  cfg = sampling.AscentConfig(max_steps=5, beta=1.0, sigma_L=1e-6)
  shifted = dataclasses.replace(cfg, mean_0=0.5)
  run = lambda c: sampling.ascent(keys, lambda y: 0.5 * y, (4, 4, 1), c)[0]
  h = np.asarray(sampling.step_size(jnp.arange(1, 6), cfg))
  gain = 0.5 * np.prod(1 - 0.5 * h)
  np.testing.assert_allclose(run(shifted), run(cfg) + 0.5 * gain, rtol=1e-5, atol=1e-6)
  assert abs(float(jnp.mean(run(cfg)))) < 0.1 * gain


def test_flip_averaged_residuals_commute_with_the_mirror():
  """A random (so asymmetric) net: its flip average commutes with the left-right mirror, for
  the low-pass residual and for a conditional one (conditioning mirrored, Haar band signs);
  the plain residual does not, and the average of a symmetric residual is itself."""
  from wcdm_jax import models, wavelets  # pylint: disable=g-import-not-at-top
  spec = models.multiscale_spec(1, cond_rf=5, low_rf=5, image_size=(16, 16), num_layers=3,
                                low_num_layers=3, features=8)
  params = models.init_model(jax.random.key(4), spec)
  mirror = lambda a: a[:, :, ::-1]
  y = jax.random.normal(jax.random.key(5), (2, 8, 8, 1))
  f = params.residual_fn("low")
  fs = sampling.mirrored_residual(f)
  np.testing.assert_allclose(fs(mirror(y)), mirror(fs(y)), atol=1e-5)
  assert float(jnp.abs(f(mirror(y)) - mirror(f(y))).max()) > 1e-2
  sym = lambda a: 0.5 * (a + mirror(a))
  np.testing.assert_allclose(sampling.mirrored_residual(sym)(y), sym(y), atol=1e-6)
  signs = wavelets.mirror_signs("haar", 1)
  net, v = params.net("cond0")
  cond = jax.random.uniform(jax.random.key(6), (2, 8, 8, 1))
  det = jax.random.normal(jax.random.key(7), (2, 8, 8, 3))
  h = lambda c, d: models.apply_net(net, v, jnp.concatenate([c, d], -1))
  g = sampling.mirrored_residual(h, signs, cond)
  g_mirrored = sampling.mirrored_residual(h, signs, mirror(cond))
  np.testing.assert_allclose(g_mirrored(mirror(det) * signs), mirror(g(det)) * signs, atol=1e-5)
  assert float(jnp.abs(h(mirror(cond), mirror(det) * signs) - mirror(h(cond, det)) * signs).max()) > 1e-2
  # Through super_resolve(): started (almost) at 0 without injected noise, the flip-averaged
  # conditional ascent of a mirrored low-pass is the mirrored result; the plain one's is not.
  low = jax.random.uniform(jax.random.key(8), (2, 8, 8, 1))
  quiet = sampling.AscentConfig(h0=0.2, beta=1.0, sigma_0=1e-7, sigma_L=1e-3, max_steps=8)
  for flip, close in ((True, True), (False, False)):
    c = dataclasses.replace(quiet, flip_average=flip)
    a = sampling.super_resolve(jax.random.key(0), params, low, cond_config=c)
    b = sampling.super_resolve(jax.random.key(0), params, mirror(low), cond_config=c)
    assert np.allclose(b, mirror(a), atol=1e-4) == close
  # Through sample(): the flip-averaged ascent gives other samples than the plain one.
  fast = sampling.AscentConfig(h0=0.05, beta=0.5, sigma_L=0.1, max_steps=20)
  flip = dataclasses.replace(fast, flip_average=True)
  a = sampling.sample(jax.random.key(0), params, 2, low_config=fast, cond_config=fast)
  b = sampling.sample(jax.random.key(0), params, 2, low_config=flip, cond_config=flip)
  assert a.shape == b.shape and bool(jnp.all(jnp.isfinite(b)))
  assert float(jnp.abs(a - b).max()) > 1e-3


def test_explicit_initial_state_and_shapes():
  cfg = sampling.AscentConfig(max_steps=5, beta=1.0)
  y0 = jnp.ones((2, 4, 4, 1))
  out, info = sampling.ascent(jax.random.split(jax.random.key(0), 2), lambda y: 0.5 * y,
                              (4, 4, 1), cfg, y0)
  # Deterministic (beta = 1): y_t = y_0 prod (1 - h_t / 2), then y - f(y) halves it.
  h = np.asarray(sampling.step_size(jnp.arange(1, 6), cfg))
  np.testing.assert_allclose(out, 0.5 * np.prod(1 - 0.5 * h) * np.ones((2, 4, 4, 1)), rtol=1e-5)
  with pytest.raises(ValueError, match="y0 must have shape"):
    sampling.ascent(jax.random.split(jax.random.key(0), 2), lambda y: y, (4, 4, 1), cfg,
                    jnp.ones((3, 4, 4, 1)))


# --- the coarse-to-fine chain, with conditional nets whose answer is known -----------------

A = {0: (0.5, -0.25, 0.125), 1: (-1.0, 0.75, 0.3)}  # per level: detail = A[j][band] * low


def _linear_cond_net(level):
  """A 2-layer linear conditional net with f([c, yH, yV, yD]) = y - A[level] * c, so its
  denoised details, y - f(y), are exactly A[level] * c whatever y is."""
  spec = models.NetSpec("cond", 4, 3, (1, 1), features=4, level=level)
  k1 = np.zeros((1, 1, 4, 3), np.float32)
  for b in range(3):
    k1[0, 0, 1 + b, b], k1[0, 0, 0, b] = 1.0, -A[level][b]
  return spec, {"params": {"conv_0": {"kernel": np.eye(4, dtype=np.float32)[None, None]},
                           "conv_1": {"kernel": k1}}, "batch_stats": {}}


def _known_model():
  low = models.low_spec(2, rf=5, num_layers=3, features=4)
  (c0, v0), (c1, v1) = _linear_cond_net(0), _linear_cond_net(1)
  spec = models.ModelSpec(low=low, conditionals=(c0, c1), image_size=(16, 16))
  return models.ModelParams(low=models.init_net(jax.random.key(0), low), conditionals=(v0, v1),
                            spec=spec)


def _expected_chain(low):
  """x_{j} = idwt(x_{j+1}, A[j] * x_{j+1}), coarse to fine, written out independently."""
  x = low
  for j in (1, 0):
    details = jnp.concatenate([a * x for a in A[j]], -1)
    x = wavelets.idwt_level(x, details)
  return x


def test_super_resolve_uses_each_levels_conditioning():
  params = _known_model()
  low = jax.random.uniform(jax.random.key(1), (2, 4, 4, 1))
  cfg = sampling.AscentConfig(h0=0.5, beta=1.0, sigma_L=0.001, ascending=False, max_steps=50)
  out, scales, _ = sampling.super_resolve(jax.random.key(0), params, low, cond_config=cfg,
                                          return_intermediates=True)
  np.testing.assert_allclose(out, _expected_chain(low), rtol=1e-5, atol=1e-6)
  # Each level's details are its multiples of the current (not the original) low-pass.
  pyr = wcdm_jax.decompose(out, 2)
  np.testing.assert_allclose(pyr.details[0][..., 1:2], A[0][1] * scales[1], rtol=1e-5, atol=1e-6)


def test_multiscale_denoise_conditions_on_the_denoised_low_pass():
  params = _known_model()
  noisy = jax.random.uniform(jax.random.key(2), (2, 16, 16, 1))
  out, scales = wcdm_jax.denoise(params, noisy, return_scales=True)
  np.testing.assert_allclose(out, _expected_chain(scales[0]), rtol=1e-5, atol=1e-6)


def _checkerboard(n=8):
  board = (-1.0) ** np.add.outer(np.arange(n), np.arange(n))
  return jnp.asarray(board, jnp.float32)[None, ..., None]


def test_stop_rule_analytically():
  """f(y) = rms(y) y, beta = 1, fixed h: the stop step follows from the recurrence alone."""
  cfg = sampling.AscentConfig(h0=0.5, beta=1.0, sigma_L=0.1, ascending=False, max_steps=1000)
  f = lambda y: jnp.sqrt(jnp.mean(jnp.square(y), (1, 2, 3), keepdims=True)) * y
  y0 = _checkerboard()
  out, info = sampling.ascent(jax.random.split(jax.random.key(0), 1), f, (8, 8, 1), cfg, y0)
  n, r, t = 64, 1.0, 0
  while True:  # rms r_t of the zero-mean checkerboard; sigma_t = r_{t-1}^2
    t += 1
    sigma, r = r * r, r * (1 - 0.5 * r)  # d = r y, y <- y - h d
    std = r * np.sqrt(n / (n - 1))
    if 20 * np.log10(std / sigma) >= 20 * np.log10(1 / 0.1):
      break
  assert int(info.steps[0]) == t and bool(info.converged[0]) and not bool(info.aborted[0])
  np.testing.assert_allclose(out, y0 * r * (1 - r), rtol=1e-4)  # y - f(y) = (1 - r) y


def test_abort_rule_analytically():
  """f(y) = -y with h = 0.5 grows y by 1.5 per step: sigma_t = 1.5^(t-1) passes 1.5 at t = 3."""
  cfg = sampling.AscentConfig(h0=0.5, beta=1.0, sigma_L=0.01, ascending=False, max_steps=50)
  out, info = sampling.ascent(jax.random.split(jax.random.key(0), 1), lambda y: -y, (8, 8, 1),
                              cfg, _checkerboard())
  assert bool(info.aborted[0]) and int(info.steps[0]) == 2  # step 3 aborted, not taken
  np.testing.assert_allclose(np.asarray(info.sigmas[0, :3]), [1.0, 1.5, 2.25], rtol=1e-5)
  np.testing.assert_allclose(out, 2 * 2.25 * _checkerboard(), rtol=1e-5)




def _linear_flat(scale=0.25):
  spec = models.NetSpec("flat", 1, 1, (1, 1), features=2)
  k0 = np.array([[[[1.0, 0.0]]]], np.float32)
  k1 = np.array([[[[scale], [0.0]]]], np.float32)
  return models.ModelParams(
      low={"params": {"conv_0": {"kernel": k0}, "conv_1": {"kernel": k1}}, "batch_stats": {}},
      conditionals=(), spec=models.ModelSpec(low=spec, image_size=(8, 8)))


def test_flat_denoise_subtracts_the_residual():
  """A linear flat net with f(y) = 0.25 y: denoise gives y - f(y) = 0.75 y exactly."""
  y = jax.random.uniform(jax.random.key(0), (2, 8, 8, 1))
  np.testing.assert_allclose(wcdm_jax.denoise(_linear_flat(), y), 0.75 * y, rtol=1e-6)


def test_adaptive_filters_of_a_known_denoiser():
  """denoise = 0.75 y: each Jacobian row is 0.75 at its own pixel and 0 elsewhere."""
  noisy = jax.random.uniform(jax.random.key(0), (8, 8, 1))
  rows = evaluation.adaptive_filters(_linear_flat(), noisy, [(2, 3), (5, 1)])
  want = np.zeros((2, 8, 8))
  want[0, 2, 3] = want[1, 5, 1] = 0.75
  np.testing.assert_allclose(rows, want, atol=1e-6)


def test_claims_thresholds():
  def curve(out, pin=(20.0, -1.0, -5.0)):
    return {"sigma": [0.1, 1.0, 2.0], "psnr_in": list(pin), "psnr_out": list(out)}
  res = {"fs": curve([25, 10.0, 6.0]), "fl": curve([26, 12.0, 8.0]),
         "ms": curve([25.5, 12.0, 8.0]), "ml": curve([25.79, 12.29, 7.71])}
  got = claims.multiscale_claims(res, flat_small="fs", flat_large="fl", ms_small="ms",
                                     ms_large="ml")
  assert [c["held"] for c in got["claims"]] == [True, True, True]
  # The worst level of each: the largest |difference|, the smallest gap, the lowest margin.
  np.testing.assert_allclose([c["worst_db"] for c in got["claims"]], [0.29, -2.0, 0.0],
                             atol=1e-9)
  assert [c["bound_db"] for c in got["claims"]] == [0.3, -2.0, 0.0]
  res["ml"] = curve([25.81, 12.0, 8.0])  # 0.31 dB apart at one level
  res["fs"] = curve([25, 10.01, 6.0])    # 1.99 dB below at one high-noise level
  res["ms"] = curve([25.5, 12.0, 7.99])  # below flat RF 43 at one high-noise level
  got = claims.multiscale_claims(res, flat_small="fs", flat_large="fl", ms_small="ms",
                                     ms_large="ml")
  assert [c["held"] for c in got["claims"]] == [False, False, False]


def test_band_mse_adds_up_and_names_the_band():
  """An error put in one band shows under that band's net only; the bands sum to the MSE."""
  spec = _known_model().spec
  clean = jax.random.uniform(jax.random.key(0), (3, 16, 16, 1))
  pyr = wavelets.decompose(clean, 2)
  bump = jax.random.normal(jax.random.key(1), pyr.details[1].shape)
  x = wavelets.reconstruct(pyr.replace(details=(pyr.details[0], pyr.details[1] + bump)))
  got = evaluation.band_mse(x, clean, spec)
  assert list(got) == ["low", "cond1", "cond0"]
  np.testing.assert_allclose(got["cond1"], np.mean(np.square(np.asarray(x - clean)), (1, 2, 3)),
                             rtol=1e-4)
  assert float(jnp.max(got["low"])) < 1e-10 and float(jnp.max(got["cond0"])) < 1e-10
  y = clean + 0.1 * jax.random.normal(jax.random.key(2), clean.shape)
  parts = evaluation.band_mse(y, clean, spec)
  np.testing.assert_allclose(sum(parts.values()), np.mean(np.square(np.asarray(y - clean)),
                                                          (1, 2, 3)), rtol=1e-4)
  # White noise: 1/16 of it on the 4x4 low-pass, 3/16 on level 1's details, 3/4 on level 0's.
  np.testing.assert_allclose([float(parts[b].mean()) / 0.01 for b in ("low", "cond1", "cond0")],
                             [1 / 16, 3 / 16, 3 / 4], rtol=0.3)


def test_denoising_curve_splits_the_error_by_band():
  """A multi-scale model's curve carries each band's error of its output and of its input,
  and the clean bands' energy: the input's bands add up to sigma^2 (white noise), the energy
  to the images' mean square, the output's to its MSE; a flat model's carries none."""
  params = _known_model()
  images = np.asarray(jax.random.uniform(jax.random.key(3), (6, 16, 16, 1)))
  sigmas = [0.05, 0.3]
  curve = evaluation.denoising_curve(params, images, sigmas, seed=2, batch_size=4)
  assert list(curve["band_mse_out"]) == ["low", "cond1", "cond0"]
  for k, s in enumerate(sigmas):
    np.testing.assert_allclose(sum(curve["band_mse_in"][b][k] for b in curve["band_mse_in"]),
                               s * s, rtol=0.1)
    assert all(curve["band_mse_out"][b][k] > 0 for b in curve["band_mse_out"])
  np.testing.assert_allclose(sum(curve["band_energy"].values()), np.mean(images ** 2), rtol=1e-4)
  # The output's bands are the errors of its own output: their sum matches the PSNR's MSE
  # for one image.
  one = evaluation.denoising_curve(params, images[:1], sigmas[:1], seed=2)
  mse = sum(one["band_mse_out"][b][0] for b in one["band_mse_out"])
  np.testing.assert_allclose(one["psnr_out"][0], -10 * np.log10(mse), rtol=1e-4)
  assert "band_mse_out" not in evaluation.denoising_curve(_linear_flat(), images, sigmas)


def test_compare_with_gaussian_by_value():
  """The linear flat denoiser 0.75 y: its PSNR and MSE by value, a Gaussian filter tuned on
  the very images at least as good as any fixed width, and the noisy input's MSE sigma^2."""
  params = _linear_flat()
  clean = 0.5 + 0.1 * jax.random.normal(jax.random.key(0), (4, 8, 8, 1))
  rows = evaluation.compare_with_gaussian(params, clean, (0.05, 0.2), jax.random.key(1))
  for i, r in enumerate(rows):
    y = clean + r["sigma"] * jax.random.normal(jax.random.fold_in(jax.random.key(1), i),
                                               clean.shape)
    np.testing.assert_allclose(r["model"], float(evaluation.psnr(0.75 * y, clean).mean()),
                               rtol=1e-5)
    np.testing.assert_allclose(r["noisy"], float(evaluation.psnr(y, clean).mean()), rtol=1e-5)
    assert r["gaussian"] >= float(evaluation.psnr(evaluation.gaussian_blur(y, 1.0), clean).mean())
    assert r["gaussian_width"] in evaluation.GAUSSIAN_WIDTHS
    assert list(r["bands"]) == ["flat"]
    np.testing.assert_allclose(r["bands"]["flat"]["model"],
                               float(jnp.mean(jnp.square(0.75 * y - clean))), rtol=1e-4)
    np.testing.assert_allclose(r["bands"]["flat"]["noisy"], r["sigma"] ** 2, rtol=0.3)
