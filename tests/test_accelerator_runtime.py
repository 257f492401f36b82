"""What a multi-device accelerator host runs, checked on this CPU: the compiled programs'
collectives on 4 simulated devices (conftest), exports for GPU and TPU, forward-mode
autodiff, dtypes under x64, inference split over devices, and a loop that never waits."""
import dataclasses
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export

import wcdm_jax
from wcdm_jax import conv, data, inverse, models, parallel, trainer, training
from wcdm_jax.sampling import AscentConfig

TINY = models.multiscale_spec(1, cond_rf=5, low_rf=5, image_size=(16, 16), num_layers=4,
                              low_num_layers=4, features=16)
FLAT = models.ModelSpec(low=models.flat_spec(5, num_layers=4, features=16), image_size=(16, 16))
FAST = AscentConfig(max_steps=6, sigma_L=1e-6)


def _step_program(spec, name, cfg, mesh):
  tx = training.make_optimizer(spec, name, cfg)
  state = jax.eval_shape(lambda: training.init_state(jax.random.key(0), spec.nets[name], tx, cfg))
  step = training.make_train_step(spec, name, tx, cfg, mesh)
  images = jax.ShapeDtypeStruct((cfg.batch_size,) + spec.image_size + (spec.channels,),
                                jnp.float32, sharding=parallel.batch_sharding(mesh))
  return step, state, images


@pytest.mark.parametrize("spec,name,impl,remat,dtype", [
    (FLAT, "flat", "auto", False, "float32"), (FLAT, "flat", "xla", True, "float32"),
    (TINY, "low", "auto", True, "float32"), (TINY, "low", "xla", False, "bfloat16"),
    (TINY, "cond0", "auto", False, "bfloat16"), (TINY, "cond0", "xla", False, "float32")])
def test_train_step_moves_gradients_not_activations(spec, name, impl, remat, dtype):
  """On 4 devices the compiled step has no all-gather, and its collectives move at most twice
  the parameters' bytes plus 1 MiB (gradients, batch-norm statistics, per-image scalars)."""
  cfg = training.TrainConfig(batch_size=16, conv_impl=impl, remat=remat, dtype=dtype)
  step, state, images = _step_program(spec, name, cfg, training.make_mesh(jax.devices()[:4]))
  hlo = step.lower(state, images).compile().as_text()
  summary = parallel.collective_summary(hlo)
  param_bytes = sum(x.size * 4 for x in jax.tree.leaves(state.params))
  assert "all-gather" not in summary and "all-to-all" not in summary, summary
  assert summary.get("all-reduce", (0, 0))[1] >= param_bytes  # the gradients are reduced
  assert sum(b for _, b in summary.values()) <= 2 * param_bytes + (1 << 20), summary


def test_collectives_parser_counts_a_gather():
  """The HLO reader sees an all-gather of activations (what the tests above rule out)."""
  mesh = training.make_mesh(jax.devices()[:4])
  x = jax.ShapeDtypeStruct((8, 4, 4, 16), jnp.float32, sharding=parallel.batch_sharding(mesh))
  f = jax.jit(lambda x: x.sum(0), out_shardings=parallel.replicated(mesh))
  gathered = jax.jit(lambda x: jax.lax.with_sharding_constraint(
      x, parallel.replicated(mesh)) * 2, out_shardings=parallel.replicated(mesh))
  assert "all-reduce" in parallel.collective_summary(f.lower(x).compile().as_text())
  count, size = parallel.collective_summary(gathered.lower(x).compile().as_text())["all-gather"]
  assert count >= 1 and size == 8 * 4 * 4 * 16 * 4


def _fixed_params(spec):
  return models.init_model(jax.random.key(0), spec)


@pytest.mark.parametrize("platform", ["cuda", "tpu"])
def test_programs_export_for_gpu_and_tpu(platform):
  """Every public program lowers for GPU and TPU on this CPU host, with no CPU custom call."""
  params = _fixed_params(TINY)
  y = jax.ShapeDtypeStruct((2, 16, 16, 1), jnp.float32)
  low = jax.ShapeDtypeStruct((2, 8, 8, 1), jnp.float32)
  key = jax.random.key(0)
  op = inverse.RandomPixels(0.5, jax.random.key(9), (16, 16, 1))
  programs = {
      "denoise": (lambda y: wcdm_jax.denoise(params, y), y),
      "sample": (lambda k: wcdm_jax.sample(k, params, 2, low_config=FAST, cond_config=FAST),
                 key),
      "super_resolve": (lambda lo: wcdm_jax.super_resolve(key, params, lo, cond_config=FAST),
                        low),
      "log_prob": (lambda x: wcdm_jax.log_prob(key, params, x).bits_per_pixel, y),
      "inverse.solve": (lambda m: inverse.solve(key, params, op, m, config=inverse.SolverConfig(
          sampler=dataclasses.replace(inverse.DEFAULT_ASCENT, max_steps=4))), jax.ShapeDtypeStruct((2, 128), jnp.float32)),
  }
  mesh = training.make_mesh(jax.devices()[:1])
  for name in ("flat", "low", "cond0"):
    spec = FLAT if name == "flat" else TINY
    for dtype in ("float32", "bfloat16"):
      cfg = training.TrainConfig(batch_size=4, dtype=dtype)
      step, state, images = _step_program(spec, name, cfg, mesh)
      programs[f"train step {name} {dtype}"] = (step, (state, images))
  for what, (fn, args) in programs.items():
    args = args if isinstance(args, tuple) else (args,)
    fn = fn if hasattr(fn, "lower") else jax.jit(fn)
    text = export.export(fn, platforms=(platform,))(*args).mlir_module()
    assert "custom_call" not in text or "wcdm_conv" not in text, what
    assert "wcdm_conv_" not in text.replace("wcdm_conv_wgrad\"", ""), what


@pytest.mark.parametrize("impl", conv.CONV_IMPLS)
def test_forward_mode_matches_xla(impl):
  """jvp, jacfwd and linearize of denoise and of a net's apply, for every conv impl."""
  params = _fixed_params(TINY)
  y = jax.random.uniform(jax.random.key(1), (2, 16, 16, 1))
  t = jax.random.normal(jax.random.key(2), y.shape)
  den = lambda impl: lambda y: wcdm_jax.denoise(params, y, conv_impl=impl)
  ref_out, ref_t = jax.jvp(den("xla_autodiff"), (y,), (t,))
  out, tan = jax.jvp(den(impl), (y,), (t,))
  np.testing.assert_allclose(tan, ref_t, rtol=1e-4, atol=1e-5)
  _, lin = jax.linearize(den(impl), y)
  np.testing.assert_allclose(lin(t), ref_t, rtol=1e-4, atol=1e-5)
  small = y[:1, :8, :8]  # (1, 8, 8, 1): a 64 x 64 Jacobian
  np.testing.assert_allclose(jax.jacfwd(den(impl))(small), jax.jacrev(den("xla_autodiff"))(small),
                             rtol=1e-4, atol=1e-5)
  net, variables = params.net("cond0")
  x = jax.random.uniform(jax.random.key(3), (1, 4, 4, 4))
  app = lambda impl: lambda x: models.apply_net(net, variables, x, conv_impl=impl)
  np.testing.assert_allclose(jax.jacfwd(app(impl))(x), jax.jacfwd(app("xla_autodiff"))(x),
                             rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(jax.jacfwd(app(impl))(x), jax.jacrev(app(impl))(x), rtol=1e-4,
                             atol=1e-5)


def test_public_functions_keep_float32_under_x64():
  params = _fixed_params(TINY)
  op = inverse.RandomPixels(0.5, jax.random.key(9), (16, 16, 1))
  with jax.enable_x64(True):
    y = jnp.asarray(np.random.default_rng(0).random((2, 16, 16, 1)), jnp.float32)
    key = jax.random.key(0)
    outs = {
        "denoise": wcdm_jax.denoise(params, y),
        "sample": wcdm_jax.sample(key, params, 2, low_config=FAST, cond_config=FAST),
        "super_resolve": wcdm_jax.super_resolve(key, params, y[:, ::2, ::2], cond_config=FAST),
        "log_prob": wcdm_jax.log_prob(key, params, y).bits_per_pixel,
        "decompose": wcdm_jax.decompose(y, 1).low,
        "solve": inverse.solve(key, params, op, op.forward(y),
                               config=inverse.SolverConfig(
                                   sampler=dataclasses.replace(inverse.DEFAULT_ASCENT, max_steps=4))),
    }
  for name, out in outs.items():
    assert out.dtype == jnp.float32, (name, out.dtype)


def test_bfloat16_training_stays_close_to_float32():
  """--dtype=bfloat16 keeps its contract (float32 parameters, statistics, Adam) and its loss
  follows float32's over a short run."""
  src = data.make_source(data.DataConfig(image_size=16), 16, seed=0)
  losses = {}
  for dtype in ("float32", "bfloat16"):
    cfg = training.TrainConfig(batch_size=16, learning_rate=3e-3, quadratic_noise=False,
                               noise_min=20, noise_max=60, num_steps=30, loss_weighting="none",
                               dtype=dtype)
    mesh = training.make_mesh(jax.devices()[:2])
    tx = training.make_optimizer(FLAT, "flat", cfg)
    state = training.replicate(training.init_state(jax.random.key(0), FLAT.low, tx, cfg), mesh)
    step = training.make_train_step(FLAT, "flat", tx, cfg, mesh)
    run = []
    for s in range(30):
      state, m = step(state, training.global_batch(src.batch(s), mesh))
      run.append(float(m["loss"]))
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state.as_dict())
               if jnp.issubdtype(x.dtype, jnp.floating))
    losses[dtype] = np.asarray(run)
  assert losses["float32"][-5:].mean() < 0.7 * losses["float32"][:3].mean()  # it learns
  np.testing.assert_allclose(losses["bfloat16"][-5:].mean(), losses["float32"][-5:].mean(),
                             rtol=0.1)


def test_inference_over_devices_equals_one_device():
  """A batch of 6 split over 4 devices (padded to 8) gives one device's results; the
  compiled denoiser on the mesh communicates nothing."""
  params = _fixed_params(TINY)
  mesh = parallel.make_mesh(jax.devices()[:4])
  y = jax.random.uniform(jax.random.key(1), (6, 16, 16, 1))
  key = jax.random.key(4)
  close = lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
  close(wcdm_jax.denoise(params, y, mesh=mesh), wcdm_jax.denoise(params, y))
  sharded = jax.device_put(jnp.concatenate([y, y[:2]]), parallel.batch_sharding(mesh))
  close(wcdm_jax.denoise(params, sharded)[:6], wcdm_jax.denoise(params, y))
  hlo = jax.jit(lambda y: wcdm_jax.denoise(params, y, mesh=mesh)).lower(sharded).compile()
  assert parallel.collective_summary(hlo.as_text()) == {}
  close(wcdm_jax.sample(key, params, 6, low_config=FAST, cond_config=FAST, mesh=mesh),
        wcdm_jax.sample(key, params, 6, low_config=FAST, cond_config=FAST))
  low = y[:, ::2, ::2]
  close(wcdm_jax.super_resolve(key, params, low, cond_config=FAST, mesh=mesh),
        wcdm_jax.super_resolve(key, params, low, cond_config=FAST))
  cfg = wcdm_jax.LikelihoodConfig(num_evals=4, replicas=2)
  close(wcdm_jax.log_prob(key, params, y, config=cfg, mesh=mesh).bits_per_pixel,
        wcdm_jax.log_prob(key, params, y, config=cfg).bits_per_pixel)
  op = inverse.RandomPixels(0.5, jax.random.key(9), (16, 16, 1))
  m = op.forward(y)
  scfg = inverse.SolverConfig(sampler=dataclasses.replace(inverse.DEFAULT_ASCENT, max_steps=4))
  close(inverse.solve(key, params, op, m, config=scfg, mesh=mesh),
        inverse.solve(key, params, op, m, config=scfg))


def test_inputs_committed_to_one_device_join_a_mesh():
  """Params and inputs placed on one device (load_params without a mesh, a key made there)
  are copied onto the mesh instead of failing with 'incompatible devices'."""
  params = jax.device_put(_fixed_params(TINY), jax.devices()[1])
  key = jax.device_put(jax.random.key(4), jax.devices()[2])
  y = jax.device_put(jax.random.uniform(jax.random.key(1), (3, 16, 16, 1)), jax.devices()[3])
  mesh = parallel.make_mesh(jax.devices()[:4])
  close = lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
  close(wcdm_jax.denoise(params, y, mesh=mesh),
        wcdm_jax.denoise(_fixed_params(TINY), np.asarray(y)))
  close(wcdm_jax.sample(key, params, 1, low_config=FAST, cond_config=FAST, mesh=mesh),
        wcdm_jax.sample(jax.random.key(4), _fixed_params(TINY), 1, low_config=FAST,
                        cond_config=FAST))
  assert wcdm_jax.super_resolve(key, params, y[:, ::2, ::2], cond_config=FAST,
                                mesh=mesh).shape == (3, 16, 16, 1)
  cfg = wcdm_jax.LikelihoodConfig(num_evals=4, replicas=2)
  assert np.isfinite(wcdm_jax.log_prob(key, params, y, config=cfg, mesh=mesh).bits_per_pixel).all()


def test_mesh_and_batch_errors():
  with pytest.raises(ValueError, match="no 'data' axis"):
    parallel.check_mesh(jax.sharding.Mesh(np.asarray(jax.devices()[:2]), ("batch",)))
  fake = [types.SimpleNamespace(platform="cpu"), types.SimpleNamespace(platform="gpu")]
  with pytest.raises(ValueError, match=r"mix platforms \['cpu', 'gpu'\]"):
    parallel.make_mesh(fake)
  with pytest.raises(TypeError, match="mesh must be a jax.sharding.Mesh"):
    wcdm_jax.denoise(_fixed_params(FLAT), jnp.zeros((1, 16, 16, 1)), mesh="all")
  cfg = training.TrainConfig(batch_size=6)
  with pytest.raises(ValueError, match=r"batch_size 6 does not divide over the 4 devices .*"
                                       r"multiple of 4, e.g. 4 or 8"):
    training.check_batch(cfg, training.make_mesh(jax.devices()[:4]))


def test_training_loop_never_reads_the_device_between_log_lines(tmp_path, monkeypatch):
  """The steps between log lines run under transfer_guard_device_to_host('disallow'). On CPU
  that guard lets reads through, so any read of a device array's value there fails here."""
  from jax._src import array as jax_array, config as jax_config  # pylint: disable=g-import-not-at-top
  original = jax_array.ArrayImpl._value
  reads = []

  def guarded(self):
    if jax_config.transfer_guard_device_to_host.value == "disallow":
      reads.append(self.shape)
      raise RuntimeError("device-to-host read between log lines")
    return original.fget(self)

  monkeypatch.setattr(jax_array.ArrayImpl, "_value", property(guarded))
  cfg = training.TrainConfig(batch_size=8, num_steps=7, level_multiplier=1)
  run = trainer.RunConfig(str(tmp_path), log_every=3, eval_every=100, checkpoint_every=100,
                          eval_batch_size=4, noise_scale_batches=1, figure=False)
  trainer.train(TINY, data.DataConfig(image_size=16), cfg, run, log=lambda m: None)
  assert not reads

  def syncing(step_fn):  # a loop that read the step counter every step would fail
    return lambda state, images: (int(state.step), step_fn(state, images))[1]

  make = training.train_step
  monkeypatch.setattr(training, "train_step", lambda *a, **k: syncing(make(*a, **k)))
  with pytest.raises(RuntimeError, match="between log lines"):
    trainer.train(TINY, data.DataConfig(image_size=16), cfg,
                  dataclasses.replace(run, workdir=str(tmp_path / "b")), log=lambda m: None)
