"""The probability-flow sampler (sampling.FlowConfig): exact on a Gaussian prior with a blind
denoiser, batched with one key per sample, and usable at every scale, for super-resolution and
for inverse problems."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import wcdm_jax
from test_sampling import N, POWER, _radial, _toy_residual, gaussian_residual
from wcdm_jax import inverse, models, sampling

HEUN = sampling.FlowConfig(method="heun", num_steps=18, sigma_max=3.0, sigma_min=0.005, churn=0.0)


def _power_ratio(cfg, num=500):
  keys = jax.random.split(jax.random.key(0), num)
  out, info = jax.jit(lambda k: sampling.ascent(k, gaussian_residual, (N, N, 1), cfg))(keys)
  power = jnp.mean(jnp.abs(jnp.fft.fft2(out[..., 0])) ** 2, 0) / N ** 2
  return _radial(power) / _radial(POWER), info


@pytest.mark.parametrize("cfg", [
    HEUN,
    dataclasses.replace(HEUN, method="euler", num_steps=60),
    dataclasses.replace(HEUN, churn=0.2, num_steps=24),
], ids=["heun", "euler", "heun-churn"])
def test_flow_samples_have_the_gaussian_priors_covariance(cfg):
  """The ODE driven by a *blind* denoiser (its noise level estimated from y) and the schedule's
  sigma in the update draws the prior's power spectrum at every frequency."""
  ratio, info = _power_ratio(cfg)
  assert np.all(np.abs(ratio - 1) < 0.12), ratio
  assert np.all(np.asarray(info.steps) == cfg.num_steps - 1)
  assert np.all(np.asarray(info.evals) == cfg.evals(cfg.num_steps - 1))
  assert np.all(np.asarray(info.converged)) and not np.any(np.asarray(info.aborted))
  # The net's own noise estimate tracks the schedule (the prior's largest variance is 0.1).
  sig = np.asarray(info.sigmas).mean(0)
  sched = cfg.schedule()[:-1] * (1 + cfg.churn)  # measured after the churn
  big = sched > 0.5
  np.testing.assert_allclose(sig[big], sched[big], rtol=0.1)


def test_too_few_euler_steps_are_measurably_wrong():
  """The check above can fail: 4 Euler steps leave the samples far from the prior."""
  ratio, _ = _power_ratio(dataclasses.replace(HEUN, method="euler", num_steps=4), num=200)
  assert np.max(np.abs(ratio - 1)) > 0.3, ratio


def test_schedule_and_costs():
  s = sampling.FlowConfig(num_steps=5, sigma_max=1.0, sigma_min=0.01, rho=1.0).schedule()
  np.testing.assert_allclose(s, np.linspace(1.0, 0.01, 5), rtol=1e-6)
  s7 = sampling.FlowConfig(num_steps=5, sigma_max=1.0, sigma_min=0.01).schedule()
  assert s7[0] == pytest.approx(1.0) and s7[-1] == pytest.approx(0.01)
  assert np.all(np.diff(s7) < 0) and s7[2] < s[2]  # rho 7: more steps at small noise
  assert sampling.FlowConfig(num_steps=18).evals(17) == 35
  assert sampling.FlowConfig(method="euler", num_steps=18, flip_average=True).evals(17) == 36


@pytest.mark.parametrize("kw,message", [
    (dict(method="rk4"), "method must be 'heun' or 'euler'"),
    (dict(num_steps=1), "num_steps must be >= 2"),
    (dict(sigma_min=1.0, sigma_max=0.5), "0 < sigma_min < sigma_max"),
    (dict(churn=-0.1), "churn must be >= 0"),
    (dict(rho=0.0), "rho must be > 0"),
    (dict(abort_ratio=-1.0), "abort_ratio must be > 0"),
])
def test_bad_flow_settings_are_refused(kw, message):
  with pytest.raises(ValueError, match=message):
    sampling.FlowConfig(**kw)


def test_flow_batch_equals_single_runs():
  cfg = sampling.FlowConfig(num_steps=8, churn=0.3)  # stochastic: each sample its own key
  keys = jax.random.split(jax.random.key(3), 4)
  run = jax.jit(lambda k: sampling.ascent(k, _toy_residual, (8, 8, 2), cfg))
  out, _ = run(keys)
  for i in range(4):
    np.testing.assert_allclose(run(keys[i:i + 1])[0][0], out[i], rtol=1e-5, atol=1e-6)
  assert not np.allclose(out[0], out[1])


def test_flow_aborts_on_divergence():
  cfg = sampling.FlowConfig(num_steps=12, abort_ratio=1.5)
  # A residual pointing away from the data: the state grows while the schedule shrinks.
  out, info = sampling.ascent(jax.random.split(jax.random.key(0), 2), lambda y: -y,
                              (4, 4, 1), cfg)
  assert np.all(np.asarray(info.aborted)) and not np.any(np.asarray(info.converged))
  assert np.all(np.asarray(info.steps) < cfg.max_steps)
  assert bool(jnp.all(jnp.isfinite(out)))


@pytest.fixture(scope="module")
def ms():
  spec = models.multiscale_spec(2, cond_rf=5, low_rf=5, image_size=(16, 16), num_layers=3,
                                low_num_layers=3, features=4)
  return models.init_model(jax.random.key(2), spec)


def test_sample_and_super_resolve_take_flow_configs(ms):
  flow = sampling.FlowConfig(num_steps=4, mean_0=0.5)
  x, outs, infos = wcdm_jax.sample(jax.random.key(0), ms, 2, low_config=flow, cond_config=flow,
                                   return_intermediates=True)
  assert x.shape == (2, 16, 16, 1) and bool(jnp.all(jnp.isfinite(x)))
  assert [int(i.evals[0]) for i in infos] == [7, 7, 7]
  # Mixed: the flow for the low-pass, the release's ascents for the details.
  y = wcdm_jax.sample(jax.random.key(0), ms, 2, low_config=flow,
                      cond_config=dataclasses.replace(sampling.RELEASE_COND, max_steps=5))
  assert y.shape == x.shape
  low = wcdm_jax.decompose(x, 2).low
  sr, _, sr_infos = wcdm_jax.super_resolve(jax.random.key(1), ms, low, cond_config=flow,
                                           return_intermediates=True)
  assert sr.shape == x.shape and [int(i.steps[0]) for i in sr_infos] == [3, 3]
  with pytest.raises(TypeError, match="AscentConfig or FlowConfig"):
    wcdm_jax.sample(jax.random.key(0), ms, 1, low_config={"num_steps": 4})


@pytest.mark.parametrize("op", [inverse.RandomPixels(0.3, jax.random.key(0), (16, 16, 1)),
                                inverse.Inpainting(inverse.box_mask((16, 16), 6))],
                         ids=["pixels", "inpaint"])
def test_inverse_problems_with_the_constrained_flow(ms, op):
  clean = jnp.asarray(np.random.default_rng(5).uniform(size=(2, 16, 16, 1)), jnp.float32)
  meas = op.forward(clean)
  flow = sampling.FlowConfig(num_steps=6, sigma_max=1.0)
  cfg = inverse.SolverConfig(sampler=flow, project=False, method="plugin")
  x, info = inverse.solve(jax.random.split(jax.random.key(0), 2), ms, op, meas, config=cfg,
                          return_info=True)
  # Without the final projection the flow's last step already reproduces the measurements.
  np.testing.assert_allclose(op.forward(x), meas, atol=1e-5)
  assert np.all(np.asarray(info.evals) == flow.evals(5))
  with pytest.raises(TypeError, match="sampler must be a wcdm_jax.AscentConfig, FlowConfig"):
    inverse.SolverConfig(sampler=wcdm_jax.sample)


def test_coarse_to_fine_solver_uses_the_flow_for_its_details(ms):
  clean = jnp.asarray(np.random.default_rng(5).uniform(size=(2, 16, 16, 1)), jnp.float32)
  op = inverse.BlockAverage(4)
  flow = sampling.FlowConfig(num_steps=5)
  x, infos = inverse.solve(jax.random.key(0), ms, op, op.forward(clean),
                           config=inverse.SolverConfig(sampler=flow), return_info=True)
  assert [int(i.steps[0]) for i in infos] == [4, 4]
  np.testing.assert_allclose(op.forward(x), op.forward(clean), atol=1e-4)


def test_a_model_carries_its_recommended_sampler(ms, tmp_path):
  """sampling.json travels with the model; sample(key, params) uses it, arguments override it."""
  flow = sampling.FlowConfig(num_steps=3, mean_0=0.5)
  rec = sampling.Recommended(low=flow, cond=(flow, flow), low_rescale=(0.1, 0.7))
  assert sampling.Recommended.from_json(rec.to_json()) == rec
  from wcdm_jax import checkpoints
  checkpoints.save_model(str(tmp_path / "m"), dataclasses.replace(ms, sampling=rec))
  params = wcdm_jax.load_params(str(tmp_path / "m"))
  assert params.sampling == rec
  _, scales, infos = wcdm_jax.sample(jax.random.key(0), params, 2, return_intermediates=True)
  assert [int(i.steps[0]) for i in infos] == [2, 2, 2]           # the flow, every scale
  low = np.asarray(scales[0]).reshape(2, -1)
  np.testing.assert_allclose(low.min(1), 0.1, atol=1e-6)          # its rescale
  np.testing.assert_allclose(low.max(1), 0.7, atol=1e-6)
  _, scales, infos = wcdm_jax.sample(jax.random.key(0), params, 2, return_intermediates=True,
                                     low_config=dataclasses.replace(flow, num_steps=5),
                                     low_rescale=None)
  assert int(infos[0].steps[0]) == 4 and float(np.asarray(scales[0]).max()) != 0.7
  _, _, infos = wcdm_jax.super_resolve(jax.random.key(1), params, scales[0],
                                       return_intermediates=True)
  assert [int(i.steps[0]) for i in infos] == [2, 2]
  (tmp_path / "m" / "sampling.json").write_text("{broken")
  with pytest.raises(ValueError, match="sampling.json.*delete it"):
    wcdm_jax.load_params(str(tmp_path / "m"))
  with pytest.raises(ValueError, match="low_rescale must be"):
    wcdm_jax.sample(jax.random.key(0), ms, 1, low_rescale="auto")


def test_defaults_and_the_release_recommendation(ms):
  """Without a recommendation: DEFAULT_LOW and the release's conditional ascents; the released
  models' recommendation: DEFAULT_LOW from 0 with the release's rescale and FAST_COND; the
  release's own settings one call away."""
  low, conds, rescale = sampling.resolve_settings(ms)
  assert low == sampling.DEFAULT_LOW and low.ascending and low.mean_0 == 0.5
  assert conds == (sampling.RELEASE_COND_FINEST, sampling.RELEASE_COND) and rescale is None
  rec = sampling.release_recommended(2)
  assert rec.low == dataclasses.replace(sampling.DEFAULT_LOW, mean_0=0.0)
  assert rec.cond == (sampling.FAST_COND,) * 2 and rec.low_rescale == (0.0, 0.8)
  assert sampling.FAST_COND.evals(sampling.FAST_COND.num_steps - 1) == 16
  old = sampling.release_settings(2)
  assert old.low == sampling.RELEASE_LOW and old.cond == (sampling.RELEASE_COND_FINEST,
                                                          sampling.RELEASE_COND)
  params = dataclasses.replace(ms, sampling=rec)
  assert sampling.resolve_settings(params) == (rec.low, rec.cond, (0.0, 0.8))
  assert sampling.resolve_settings(params, low_config=sampling.RELEASE_LOW)[0] == sampling.RELEASE_LOW
