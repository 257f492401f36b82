import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import wcdm_jax
from wcdm_jax import checkpoints, data, models, trainer, training, wavelets

TINY = models.multiscale_spec(2, cond_rf=5, low_rf=7, image_size=(16, 16), num_layers=4,
                              low_num_layers=4, features=8)
FLAT = models.ModelSpec(low=models.flat_spec(5, num_layers=3, features=8), image_size=(16, 16))


def _state_and_step(spec, name, cfg, devices):
  mesh = training.make_mesh(devices)
  tx = training.make_optimizer(spec, name, cfg)
  state = training.replicate(training.init_state(jax.random.key(0), spec.nets[name], tx, cfg),
                             mesh)
  return mesh, state, training.make_train_step(spec, name, tx, cfg, mesh, noise_scale=0.5)


def test_train_step_is_made_once_per_settings_and_is_make_train_steps():
  """training.train_step: the same object for equal settings (a mesh made again included),
  another for other settings; its step is make_train_step's with the net's optimiser."""
  cfg = training.TrainConfig(batch_size=8, num_steps=2)
  mesh = training.make_mesh(jax.devices()[:1])
  step = training.train_step(TINY, "cond0", cfg, mesh, 0.5)
  assert training.train_step(TINY, "cond0", cfg, training.make_mesh(jax.devices()[:1]), 0.5) is step
  assert training.train_step(TINY, "cond0", dataclasses.replace(cfg, seed=1), mesh, 0.5) is not step
  with pytest.raises(TypeError, match="mesh must be a jax.sharding.Mesh"):  # not "unhashable"
    training.train_step(TINY, "cond0", cfg, list(mesh.devices.flat), 0.5)
  src = data.make_source(data.DataConfig(image_size=16), 8, seed=3)
  _, state, made = _state_and_step(TINY, "cond0", cfg, jax.devices()[:1])
  images = training.global_batch(src.batch(0), mesh)
  copy = jax.tree.map(jnp.copy, state)  # the steps donate their input state
  a, b = jax.device_get(made(state, images)), jax.device_get(step(copy, images))
  jax.tree.map(np.testing.assert_array_equal, a, b)


@pytest.mark.parametrize("name", ["low", "cond0"])
def test_four_devices_equal_one(name):
  assert len(jax.devices()) >= 4, "conftest sets 4 simulated CPU devices"
  cfg = training.TrainConfig(batch_size=8, num_steps=2)
  src = data.make_source(data.DataConfig(image_size=16), 8, seed=3)
  results = []
  for devices in (jax.devices()[:1], jax.devices()[:4]):
    mesh, state, step = _state_and_step(TINY, name, cfg, devices)
    for s in range(2):
      state, metrics = step(state, training.global_batch(src.batch(s), mesh))
    results.append((jax.device_get(state.as_dict()), float(metrics["loss"])))
  (a, la), (b, lb) = results
  assert la == pytest.approx(lb, rel=1e-5)
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6), a, b)
  # The batch-norm running std moved (the statistics are really global, not per device).
  rs = jax.tree.leaves(a["batch_stats"])[0]
  assert not np.allclose(rs, 1.0)


@pytest.mark.parametrize("weighting, factor", [("none", 0.5), ("snr", 0.6), ("balanced", 0.6)])
def test_loss_decreases(weighting, factor):
  """60 steps remove half the noise: the summed squared error halves, and so does the
  fraction of noise left (the 'snr' loss, which starts near 1) of a net trained with the
  weighted losses."""
  spec = models.ModelSpec(low=models.flat_spec(5, num_layers=4, features=16), image_size=(16, 16))
  cfg = training.TrainConfig(batch_size=16, learning_rate=3e-3, quadratic_noise=False,
                             noise_min=20, noise_max=60, num_steps=60, loss_weighting=weighting)
  mesh, state, step = _state_and_step(spec, "flat", cfg, jax.devices()[:1])
  src = data.make_source(data.DataConfig(image_size=16), 16, seed=0)
  fixed = training.global_batch(src.batch(10_000), mesh)
  ex = training.net_example(spec, "flat", fixed, jax.random.key(7), cfg)
  eval_loss = jax.jit(lambda st: training.loss_fn(
      st.params, st.batch_stats, spec.low, ex.noisy, ex.noise,
      weights=training.loss_weights(ex, dataclasses.replace(cfg, loss_weighting="snr")
                                    if weighting != "none" else cfg))[0])
  before = float(eval_loss(state))
  for s in range(60):
    state, _ = step(state, training.global_batch(src.batch(s), mesh))
  after = float(eval_loss(state))
  assert after < factor * before, (before, after)


CFG = training.TrainConfig(batch_size=8, num_steps=6, lr_halve_every=3, level_multiplier=1)


def _run(workdir, **kw):
  kw = dict(dict(log_every=2, eval_every=3, checkpoint_every=2, eval_batch_size=4,
                 noise_scale_batches=2, figure=False), **kw)
  run = trainer.RunConfig(str(workdir), **kw)
  return trainer.train(TINY, data.DataConfig(image_size=16), CFG, run, log=lambda m: None)


@pytest.mark.slow
def test_resume_is_identical(tmp_path):
  _run(tmp_path / "full")
  _run(tmp_path / "split", stop_after=3)  # pre-empted after 3 steps (checkpoint at step 3)
  partial = wcdm_jax.load_params(str(tmp_path / "split"))
  full = wcdm_jax.load_params(str(tmp_path / "full"))
  with pytest.raises(AssertionError):  # really stopped early
    np.testing.assert_allclose(partial.low["params"]["conv_0"]["kernel"],
                               full.low["params"]["conv_0"]["kernel"])
  _run(tmp_path / "split")  # resumes at step 3
  resumed = wcdm_jax.load_params(str(tmp_path / "split"))
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7),
               (full.low, full.conditionals), (resumed.low, resumed.conditionals))


def test_one_net_per_job_and_load_params(tmp_path):
  _run(tmp_path, nets=("cond1",))
  with pytest.raises(FileNotFoundError, match="no checkpoint for net 'low'"):
    wcdm_jax.load_params(str(tmp_path))
  _run(tmp_path, nets=("low", "cond0"))
  params = wcdm_jax.load_params(str(tmp_path))
  assert params.spec == TINY
  out = wcdm_jax.denoise(params, jnp.zeros((2, 16, 16, 1)))
  assert out.shape == (2, 16, 16, 1)


def test_schedule_and_noise():
  cfg = training.TrainConfig(num_steps=100, lr_halve_every=10, level_multiplier=4.0,
                             intensity_augmentation_nets="low")
  assert training.net_num_steps(TINY, "cond0", cfg) == 100
  assert training.net_num_steps(TINY, "cond1", cfg) == 400
  assert training.net_num_steps(TINY, "low", cfg) == 400
  tx = training.make_optimizer(TINY, "cond0", cfg)
  assert tx is not None
  stds = training.noise_draws(jax.random.key(0), 10_000, cfg)[0]
  assert float(stds.min()) >= 0 and float(stds.max()) <= 1
  # quadratic: the median std is about 0.25 (k/255 ~ U(0, 1), squared).
  assert float(jnp.median(stds)) == pytest.approx(0.25, abs=0.03)
  x = jnp.ones((4, 16, 16, 1)) * 0.5
  noisy, noise, *_ = training.net_example(TINY, "cond0", x, jax.random.key(1), cfg, noise_scale=0.1)
  assert noisy.shape == (4, 8, 8, 4)
  np.testing.assert_allclose(noisy[..., 0], 0.5, atol=1e-6)  # clean conditioning low-pass
  np.testing.assert_allclose(noisy[..., 1:], noise, atol=1e-6)  # details of a flat image are 0
  assert float(jnp.abs(noise).max()) > 0


def test_remat_same_gradients_less_memory():
  spec = models.cond_spec(0, 9, num_layers=6, features=8)
  v = models.init_net(jax.random.key(0), spec)
  x = jax.random.normal(jax.random.key(1), (4, 16, 16, 4))
  n = jax.random.normal(jax.random.key(2), (4, 16, 16, 3))
  grad = lambda remat: jax.jit(jax.grad(lambda p: training.loss_fn(
      p, v["batch_stats"], spec, x, n, remat=remat)[0]))
  g0, g1 = grad(False)(v["params"]), grad(True)(v["params"])
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), g0, g1)
  # The recomputation survives XLA's optimisations: fewer bytes of temporaries (compiled
  # only, at a size where activations dominate).
  big = models.cond_spec(0, 9, num_layers=8, features=32)
  shapes = jax.eval_shape(lambda: models.init_net(jax.random.key(0), big))
  xs = jax.ShapeDtypeStruct((32, 32, 32, 4), jnp.float32)
  ns = jax.ShapeDtypeStruct((32, 32, 32, 3), jnp.float32)
  temp = []
  for remat in (False, True):
    fn = jax.jit(jax.grad(lambda p, s, x, n: training.loss_fn(p, s, big, x, n, remat=remat)[0]))
    compiled = fn.lower(shapes["params"], shapes["batch_stats"], xs, ns).compile()
    temp.append(compiled.memory_analysis().temp_size_in_bytes)
  assert temp[1] < 0.8 * temp[0], temp  # 41% less for the paper's RF 9 net (bench_memory.py)


@pytest.mark.parametrize("name,every", [("cond0", 3), ("cond1", 12), ("low", 12)])
def test_learning_rate_halves_on_schedule(name, every):
  """Adam's update for a constant gradient is the learning rate itself (bias-corrected
  m / sqrt(v) = 1), so the update sizes read the schedule off: lr halves every
  lr_halve_every * multiplier**level steps (cond1 and low are at level 1 of J = 2)."""
  cfg = training.TrainConfig.from_recipe("paper", learning_rate=1e-2, num_steps=30,
                                         lr_halve_every=3, level_multiplier=4.0)
  tx = training.make_optimizer(TINY, name, cfg)
  params = {"w": jnp.zeros(())}
  state = tx.init(params)
  sizes = []
  for _ in range(2 * every + 2):
    updates, state = tx.update({"w": jnp.ones(())}, state, params)
    sizes.append(-float(updates["w"]))
  want = [1e-2 * 0.5 ** (t // every) for t in range(2 * every + 2)]
  np.testing.assert_allclose(sizes, want, rtol=1e-4)


@pytest.mark.slow
def test_nets_at_different_steps_keep_checkpoints_and_stop_after(tmp_path):
  """Nets resumed at different steps catch up in turn and end as one uninterrupted run."""
  _run(tmp_path / "full", checkpoint_every=1)
  wd = tmp_path / "split"
  _run(wd, stop_after=2, checkpoint_every=1)                   # every net at step 2
  _run(wd, nets=("cond0",), stop_after=2, checkpoint_every=1)  # cond0 at 4, others at 2
  steps = {n: checkpoints.manager(str(wd), n).latest_step() for n in TINY.nets}
  assert steps == {"low": 2, "cond0": 4, "cond1": 2}
  _run(wd, checkpoint_every=1, keep_checkpoints=2)
  for n in TINY.nets:
    mngr = checkpoints.manager(str(wd), n)
    assert len(mngr.all_steps()) == 2 and mngr.latest_step() == training.net_num_steps(
        TINY, n, CFG)
    want = checkpoints.manager(str(tmp_path / "full"), n).latest_step()
    with open(wd / n / str(want) / "meta" / "metadata") as a, \
         open(tmp_path / "full" / n / str(want) / "meta" / "metadata") as b:
      assert json.load(a)["checksums"] == json.load(b)["checksums"]


def test_each_net_sees_its_part_of_the_pyramid():
  """flat: the image; low: the coarsest low-pass (times U(0, 1) when augmented); cond j: the
  clean low-pass of level j beside the noisy details of level j."""
  x = jax.random.uniform(jax.random.key(0), (4, 16, 16, 1))
  pyr = wcdm_jax.decompose(x, 2)
  cfg = training.TrainConfig(intensity_augmentation=False)
  noisy, noise, *_ = training.net_example(TINY, "low", x, jax.random.key(1), cfg)
  np.testing.assert_allclose(noisy - noise, pyr.low, atol=1e-6)
  for j in range(2):
    noisy, noise, *_ = training.net_example(TINY, f"cond{j}", x, jax.random.key(1), cfg)
    low_j = pyr.low if j == 1 else wcdm_jax.reconstruct(pyr, 1)
    np.testing.assert_allclose(noisy[..., :1], low_j, atol=1e-6)
    np.testing.assert_allclose(noisy[..., 1:] - noise, pyr.details[j], atol=1e-6)
  aug, noise, *_ = training.net_example(TINY, "low", x, jax.random.key(1),
                                    training.TrainConfig(intensity_augmentation=True))
  ratio = (aug - noise)[..., 0] / pyr.low[..., 0]
  assert float(jnp.std(ratio, (1, 2)).max()) < 1e-4  # one factor per image
  assert 0 < float(ratio.min()) and float(ratio.max()) < 1


def _factors(clean, ref):
  """(B,) one factor per image from clean = factor * ref, checked to be one per image."""
  ratio = (clean / ref)[..., 0]
  assert float(jnp.std(ratio, (1, 2)).max()) < 1e-4
  return np.asarray(ratio.mean((1, 2)))


@pytest.mark.parametrize("nets", ["low", "multiscale", "all"])
def test_intensity_augmentation_reaches_the_nets_it_names(nets):
  """'low' (the paper's): only the low-pass net's images are dimmed; 'multiscale' (the
  default): also a conditional net's details together with its conditioning low-pass, by one
  U(0, 1) factor per image, so the example stays a consistent pyramid; 'all': also flat nets."""
  x = 0.1 + jax.random.uniform(jax.random.key(0), (4, 16, 16, 1))
  pyr = wcdm_jax.decompose(x, 2)
  cfg = training.TrainConfig(intensity_augmentation_nets=nets)
  assert training.TrainConfig().intensity_augmentation_nets == "multiscale"
  noisy, noise, *_ = training.net_example(TINY, "cond1", x, jax.random.key(1), cfg)
  low_f = _factors(noisy[..., :1], pyr.low)
  det_f = _factors(noisy[..., 1:2] - noise[..., :1], pyr.details[1][..., :1])
  np.testing.assert_allclose(low_f, det_f, rtol=1e-4)
  noisy, noise, *_ = training.net_example(FLAT, "flat", x, jax.random.key(1), cfg)
  flat_f = _factors(noisy - noise, x)
  for f, on in ((low_f, nets != "low"), (flat_f, nets == "all")):
    if on:
      assert 0 < f.min() and f.max() < 1 and f.std() > 0.01
    else:
      np.testing.assert_allclose(f, 1.0, rtol=1e-5)
  off = dataclasses.replace(cfg, intensity_augmentation=False)
  noisy, noise, *_ = training.net_example(FLAT, "flat", x, jax.random.key(1), off)
  np.testing.assert_allclose(_factors(noisy - noise, x), 1.0, rtol=1e-5)


def test_trim_metrics_drops_only_rows_after_each_nets_resumed_step(tmp_path):
  path = tmp_path / "metrics.jsonl"
  rows = [{"step": 2, "low/loss": 1.0, "cond0/loss": 2.0, "steps_per_s": 1.0},
          {"step": 4, "low/loss": 3.0, "cond0/loss": 4.0, "steps_per_s": 1.0},
          {"step": 6, "low/loss": 5.0, "other/loss": 9.0}]
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  assert trainer.trim_metrics(str(path), {"low": 2, "cond0": 4}) == 2
  got = [json.loads(l) for l in path.read_text().splitlines()]
  assert got == [rows[0], {"step": 4, "cond0/loss": 4.0, "steps_per_s": 1.0},
                 {"step": 6, "other/loss": 9.0}]
  assert trainer.trim_metrics(str(path), {"low": 2, "cond0": 4}) == 0  # nothing left to do
  assert trainer.trim_metrics(str(tmp_path / "none.jsonl"), {"low": 2}) == 0  # no file yet
  assert trainer.trim_metrics(str(path), {}) == 0 and path.read_text()  # no net resumed


def _update_sizes(tx, steps):
  """Adam's update sizes for a constant unit gradient: the learning-rate schedule itself."""
  params = {"w": jnp.zeros(())}
  state = tx.init(params)
  sizes = []
  for _ in range(steps):
    updates, state = tx.update({"w": jnp.ones(())}, state, params)
    sizes.append(-float(updates["w"]))
  return np.asarray(sizes)


@pytest.mark.parametrize("name,scale", [("cond0", 1), ("low", 4)])
def test_default_recipe_warms_up_then_follows_a_cosine(name, scale):
  """Linear warm-up from 0 over warmup_steps (x 4^level), then cosine decay to 1% at the end."""
  cfg = training.TrainConfig(learning_rate=1e-2, num_steps=20, warmup_steps=4,
                             level_multiplier=4.0)
  total, warm = 20 * scale, 4 * scale
  sizes = _update_sizes(training.make_optimizer(TINY, name, cfg), total)
  t = np.arange(total)
  cosine = 1e-2 * (0.01 + 0.99 * 0.5 * (1 + np.cos(np.pi * (t - warm) / (total - warm))))
  want = np.where(t < warm, 1e-2 * t / warm, cosine)
  np.testing.assert_allclose(sizes, want, rtol=1e-4, atol=1e-9)
  assert training.TrainConfig(num_steps=50).warmup() == 5  # automatic: a tenth, at most 200
  assert training.TrainConfig(num_steps=10_000).warmup() == 200


@pytest.mark.parametrize("bad,match", [
    (dict(warmup_steps=30, num_steps=30), "warmup_steps .30. must be shorter than the run"),
    (dict(ema_decay=1.0), "ema_decay must be in .0, 1."), (dict(ema_decay=-0.5), "ema_decay"),
    (dict(clip_factor=0.0), "clip_factor must be > 0"), (dict(clip_factor=-1.0), "clip_factor"),
    (dict(schedule="linear"), "schedule must be one of"), (dict(bn_momentum=0.0), "bn_momentum"),
    (dict(noise_sampling="sobol"), "noise_sampling must be one of"),
    (dict(intensity_augmentation_nets="cond"), "intensity_augmentation_nets must be one of")])
def test_recipe_settings_that_make_no_sense_are_one_line_errors(bad, match):
  with pytest.raises(ValueError, match=match):
    training.TrainConfig(**bad)


def test_a_recipe_is_applied_wherever_a_config_is_built():
  """TrainConfig() is the default recipe; another recipe is only from_recipe's (a 'recipe'
  argument that would be ignored cannot be written)."""
  with pytest.raises(TypeError, match="recipe"):
    training.TrainConfig(recipe="paper")  # pylint: disable=unexpected-keyword-arg
  with pytest.raises(ValueError, match="recipe must be one of"):
    training.TrainConfig.from_recipe("fast")
  default = training.TrainConfig()
  assert {k: getattr(default, k) for k in training.RECIPE_FIELDS} == training.RECIPES["default"]


def test_recipes_differ_only_in_their_settings():
  paper, default = training.TrainConfig.from_recipe("paper"), training.TrainConfig()
  assert training.TrainConfig.from_recipe("default") == default
  assert (paper.schedule, paper.warmup_steps, paper.ema_decay, paper.clip_factor,
          paper.gain_init, paper.bn_momentum, paper.loss_weighting, paper.noise_sampling,
          paper.intensity_augmentation_nets) == (
              "halving", 0, 0.0, None, None, 0.1, "none", "independent", "low")
  assert (default.noise_sampling, default.intensity_augmentation_nets) == ("stratified", "multiscale")
  assert training.TrainConfig.from_recipe("paper", ema_decay=0.9).ema_decay == 0.9


def test_clip_by_running_norm_caps_spikes_relative_to_the_past():
  tx = training.clip_by_running_norm(2.0, decay=0.5)
  state = tx.init({"w": jnp.zeros(2)})
  out = []
  for g in (3.0, 3.0, 30.0, 3.0):  # a 10x spike at the third step
    upd, state = tx.update({"w": jnp.asarray([g, 0.0])}, state)
    out.append(float(upd["w"][0]))
  assert out[:2] == [3.0, 3.0] and out[2] == pytest.approx(6.0) and out[3] == 3.0
  assert float(state.mean) == pytest.approx(0.5 * (0.5 * 3 + 0.5 * 6) + 0.5 * 3)


def test_ema_follows_the_weights_and_is_the_saved_model(tmp_path):
  """The EMA after each step is d * ema + (1 - d) * weights with d = min(decay, (1+t)/(10+t));
  the checkpoint's 'model' item (what load_params reads) is the EMA, its 'state' holds both."""
  spec = models.ModelSpec(low=models.flat_spec(5, num_layers=3, features=8), image_size=(16, 16))
  cfg = training.TrainConfig(batch_size=8, num_steps=4, ema_decay=0.5, warmup_steps=0)
  mesh, state, step = _state_and_step(spec, "flat", cfg, jax.devices()[:1])
  src = data.make_source(data.DataConfig(image_size=16), 8, seed=0)
  ema = jax.device_get(state.eval_variables())
  for s in range(3):
    state, _ = step(state, training.global_batch(src.batch(s), mesh))
    d = min(0.5, (1 + s) / (10 + s))
    ema = jax.tree.map(lambda e, v: d * e + (1 - d) * v, ema, jax.device_get(state.variables()))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
                 jax.device_get(state.ema), ema)
  assert not np.allclose(state.ema["params"]["conv_0"]["kernel"], state.params["conv_0"]["kernel"])
  run = trainer.RunConfig(str(tmp_path), log_every=2, eval_every=4, checkpoint_every=4,
                          eval_batch_size=4, figure=False)
  trainer.train(spec, data.DataConfig(image_size=16), cfg, run, log=lambda m: None)
  params = wcdm_jax.load_params(str(tmp_path))
  mngr = checkpoints.manager(str(tmp_path), "flat")
  fresh = training.init_state(jax.random.key(0), spec.low, training.make_optimizer(
      spec, "flat", cfg), cfg).as_dict()
  items, _, _, _ = checkpoints.restore_intact(mngr, {"state": fresh})
  mngr.close()
  saved = items["state"]
  jax.tree.map(np.testing.assert_array_equal, params.low, jax.device_get(saved["ema"]))
  # The loss weighting's running errors are saved with the state: 4 steps filled some bands.
  stats = np.asarray(saved["loss_stats"])
  assert stats.shape == (training.LOSS_BINS,) and np.all(np.isfinite(stats))
  assert np.any(stats > 0) and np.all((stats > 0) | (stats == -1))
  with pytest.raises(AssertionError):
    np.testing.assert_array_equal(params.low["params"]["conv_0"]["kernel"],
                                  saved["params"]["conv_0"]["kernel"])


def test_resuming_with_another_recipe_is_refused(tmp_path):
  paper = training.TrainConfig.from_recipe("paper", batch_size=8, num_steps=4,
                                           lr_halve_every=2, level_multiplier=1)
  run = trainer.RunConfig(str(tmp_path), log_every=2, eval_every=4, checkpoint_every=2,
                          eval_batch_size=4, noise_scale_batches=1, figure=False, stop_after=2)
  trainer.train(TINY, data.DataConfig(image_size=16), paper, run, log=lambda m: None)
  default = training.TrainConfig(batch_size=8, num_steps=4, lr_halve_every=2, level_multiplier=1)
  with pytest.raises(ValueError, match="schedule: checkpoint 'halving', this run 'cosine'"):
    trainer.train(TINY, data.DataConfig(image_size=16), default, run, log=lambda m: None)


def test_settings_a_checkpoint_does_not_record_are_not_compared():
  """config_changes names every recorded setting that differs and nothing else (no release
  before this one wrote checkpoints without the recipe settings: no migration)."""
  cfg = training.TrainConfig()
  partial = {f: v for f, v in dataclasses.asdict(training.TrainConfig.from_recipe(
      "paper")).items() if f not in ("noise_sampling", "schedule")}
  changes = trainer.config_changes({"train_config": partial}, cfg, data.DataConfig())
  assert "ema_decay: checkpoint 0.0, this run 0.999" in changes
  assert not any(c.startswith(("noise_sampling", "schedule", "num_steps")) for c in changes)
  assert trainer.config_changes({}, cfg, data.DataConfig()) == []


def test_a_resumed_state_takes_this_runs_loss_weighting():
  net = TINY.nets["low"]
  bal, none = training.TrainConfig(), training.TrainConfig(loss_weighting="none")
  for have, want in ((bal, none), (none, bal), (bal, bal)):
    tx = training.make_optimizer(TINY, "low", want)
    state = training.init_state(jax.random.key(0), net, tx, have)
    if have.loss_weighting == "balanced":
      state = state.replace(loss_stats=state.loss_stats.at[3].set(0.25))
    out = trainer._adapt_state(state, want, tx, lambda m: None)
    if want.loss_weighting != "balanced":
      assert out.loss_stats is None
    elif have.loss_weighting == "balanced":
      assert float(out.loss_stats[3]) == 0.25  # kept
    else:
      assert bool(jnp.all(out.loss_stats == -1))  # starts afresh


def test_zero_init_output_starts_as_the_identity():
  net = TINY.nets["cond0"]
  x = jax.random.uniform(jax.random.key(0), (2, 8, 8, 4))
  for cfg, identity in ((training.TrainConfig(zero_init_output=True), True),
                        (training.TrainConfig(), False),
                        (training.TrainConfig.from_recipe("paper"), False)):
    tx = training.make_optimizer(TINY, "cond0", cfg)
    state = training.init_state(jax.random.key(1), net, tx, cfg)
    residual = models.apply_net(net, state.variables(), x)
    assert bool(jnp.all(residual == 0)) == identity
    assert bool(jnp.all(state.params["conv_3"]["kernel"] == 0)) == identity
    assert not bool(jnp.all(state.params["conv_0"]["kernel"] == 0))


def test_loss_weightings():
  """'none' is the paper's loss exactly; 'snr' weights image i by 1 / (std_i^2 + floor^2) per
  pixel; 'balanced' by 1 / (its band's running error + floor^2), 'snr' where none yet."""
  net = TINY.nets["low"]
  v = models.init_net(jax.random.key(0), net)
  cfg = training.TrainConfig(loss_weighting="snr", loss_weight_floor=2.0, loss_weight_power=1.0)
  x = jax.random.uniform(jax.random.key(1), (6, 4, 4, 1))
  ex = training.net_example(TINY, "low", x, jax.random.key(2), cfg)
  assert ex.std.shape == ex.level.shape == (6,) and float(ex.std.min()) >= 0
  w = training.loss_weights(ex, cfg)
  floor2, px = (2 / 255) ** 2, int(np.prod(ex.noise.shape[1:]))
  np.testing.assert_allclose(w, 1 / (px * (np.square(ex.std) + floor2)), rtol=1e-6)
  assert training.loss_weights(ex, training.TrainConfig.from_recipe("paper")) is None
  pred = models.BFCNN(net).apply(v, ex.noisy, train=True, mutable=["batch_stats"])[0]
  per_image = np.sum(np.square(np.asarray(pred - ex.noise)), axis=(1, 2, 3))
  plain, (_, errors) = training.loss_fn(v["params"], v["batch_stats"], net, ex.noisy, ex.noise,
                                        return_errors=True)
  weighted = training.loss_fn(v["params"], v["batch_stats"], net, ex.noisy, ex.noise,
                              weights=w)[0]
  np.testing.assert_allclose(plain, per_image.sum() / 6, rtol=1e-5)
  np.testing.assert_allclose(errors, per_image / px, rtol=1e-5)
  np.testing.assert_allclose(weighted, (per_image * np.asarray(w)).sum() / 6, rtol=1e-5)
  # Bounded at clean images: 1 / floor^2.
  clean = ex._replace(std=jnp.zeros(6))
  np.testing.assert_allclose(training.loss_weights(clean, cfg), 1 / (px * floor2), rtol=1e-6)
  # The floor is in image units: on a net's coefficients it is scaled like the noise.
  np.testing.assert_allclose(training.loss_weights(clean, cfg, scale=0.25),
                             1 / (px * floor2 / 16), rtol=1e-6)
  # Balanced: the band's running error where there is one.
  bal = dataclasses.replace(cfg, loss_weighting="balanced")
  stats = training.init_loss_stats(bal).at[ex.level[0]].set(0.5)
  wb = np.asarray(training.loss_weights(ex, bal, stats))
  known = np.asarray(ex.level) == int(ex.level[0])
  np.testing.assert_allclose(wb[known], 1 / (px * (0.5 + floor2)), rtol=1e-6)
  np.testing.assert_allclose(wb[~known], np.asarray(w)[~known], rtol=1e-6)
  # The power tempers them: 0.5 is the square root, 0 the unweighted loss.
  half = training.loss_weights(ex, dataclasses.replace(bal, loss_weight_power=0.5), stats)
  np.testing.assert_allclose(half, np.sqrt(wb), rtol=1e-5)
  np.testing.assert_allclose(training.loss_weights(ex, dataclasses.replace(
      bal, loss_weight_power=0.0), stats), np.ones(6), rtol=1e-6)


def test_net_scale_follows_the_pyramid_normalisation():
  """Image noise of std s is s / 2^(j+1) on level j's details and s / 2^J on the low-pass."""
  spec = models.multiscale_spec(levels=3, cond_rf=5, low_rf=5, num_layers=3, low_num_layers=3,
                                features=4, image_size=(16, 16))
  x = jax.random.normal(jax.random.key(0), (8, 64, 64, 1))  # white noise of std 1
  lows, details = wavelets.analysis(x, 3)
  for name, coeffs in [("low", lows[-1])] + [(f"cond{j}", details[j]) for j in range(3)]:
    np.testing.assert_allclose(float(jnp.std(coeffs)), training.net_scale(spec, name),
                               rtol=0.1, err_msg=name)
  flat = models.ModelSpec(low=models.flat_spec(5, num_layers=3, features=4), image_size=(16, 16))
  assert training.net_scale(flat, "flat") == 1.0


def test_noise_bands_and_running_errors():
  cfg = training.TrainConfig(noise_min=0, noise_max=255)
  _, level = training.noise_draws(jax.random.key(0), 5000, cfg)
  counts = np.bincount(np.asarray(level), minlength=training.LOSS_BINS)
  assert len(counts) == training.LOSS_BINS and counts.min() > 200  # every band, evenly
  stats = training.init_loss_stats(cfg)
  assert stats.shape == (training.LOSS_BINS,) and bool(jnp.all(stats < 0))
  stats = training.update_loss_stats(stats, jnp.array([2, 2, 5]), jnp.array([1.0, 3.0, 4.0]))
  assert float(stats[2]) == 2.0 and float(stats[5]) == 4.0 and float(stats[0]) == -1.0
  stats = training.update_loss_stats(stats, jnp.array([2]), jnp.array([12.0]))
  d = training.LOSS_STATS_DECAY
  np.testing.assert_allclose(float(stats[2]), d * 2.0 + (1 - d) * 12.0, rtol=1e-6)
  assert training.init_loss_stats(training.TrainConfig.from_recipe("paper")) is None


def test_stratified_noise_levels_span_the_range_in_every_batch():
  """'stratified': every batch of 32 holds each of the 16 bands exactly twice, in random order,
  and each level is still uniform over the range; 'independent' is the paper's plain draw."""
  cfg = training.TrainConfig(noise_min=0, noise_max=255, noise_sampling="stratified")
  first, ks = [], []
  for s in range(300):
    std, level = training.noise_draws(jax.random.key(s), 32, cfg)
    assert np.all(np.bincount(np.asarray(level), minlength=training.LOSS_BINS) == 2)
    ks.append(np.rint(np.sqrt(np.asarray(std, np.float64)) * 255).astype(int))
    first.append(int(level[0]))
  assert len(set(first)) == training.LOSS_BINS  # the first image's band is not always 0
  counts = np.bincount(np.concatenate(ks), minlength=256)
  assert counts.size == 256 and counts.min() >= 15 and counts.max() <= 60  # mean 37.5
  exact = training.TrainConfig(noise_min=10, noise_max=41, quadratic_noise=False,
                               noise_sampling="stratified")
  std, _ = training.noise_draws(jax.random.key(1), 32, exact)  # one level per stratum
  np.testing.assert_array_equal(np.sort(np.rint(np.asarray(std) * 255)), np.arange(10, 42))
  key, paper = jax.random.key(3), training.TrainConfig.from_recipe("paper")
  k = jax.random.randint(key, (32,), paper.noise_min, paper.noise_max + 1)
  np.testing.assert_array_equal(training.noise_draws(key, 32, paper)[0],
                                training.noise_level(k, paper)[0].astype(jnp.float32))


@pytest.mark.parametrize("bad, match", [(dict(loss_weighting="l1"), "loss_weighting"),
                                        (dict(loss_weight_floor=0.0), "loss_weight_floor"),
                                        (dict(loss_weight_power=2.0), "loss_weight_power")])
def test_bad_loss_weighting_is_a_one_line_error(bad, match):
  with pytest.raises(ValueError, match=match):
    training.TrainConfig(**bad)


def test_identity_gains_compare_the_running_errors_with_the_identity():
  """0 dB where the net's running error equals its input's noise, -10 dB at ten times it,
  NaN where a band saw no image; stds reported in image units (/ net_scale)."""
  cfg = training.TrainConfig(noise_min=0, noise_max=255, quadratic_noise=False)
  k = np.arange(256)
  band = k * training.LOSS_BINS // 256
  ident = np.array([np.mean((k[band == b] / 255.0 * 2.0) ** 2) for b in range(training.LOSS_BINS)])
  stats = ident.copy()
  stats[3] *= 10.0
  stats[5] = -1.0
  rows = training.identity_gains(cfg, stats, noise_scale=2.0, scale=0.25)
  assert len(rows) == training.LOSS_BINS
  gains = np.array([g for _, _, g in rows])
  np.testing.assert_allclose(np.delete(gains, [3, 5]), 0.0, atol=1e-9)
  assert abs(gains[3] + 10.0) < 1e-9 and np.isnan(gains[5])
  lo, hi, _ = rows[1]  # k = 16..31, x noise_scale 2, / scale 0.25
  assert np.isclose(lo, 16 / 255 * 8) and np.isclose(hi, 31 / 255 * 8)
  # a clean band (k = 0 only) the net gets wrong: -inf, not an error
  one = training.TrainConfig(noise_min=0, noise_max=15, quadratic_noise=True)
  assert training.identity_gains(one, np.full(training.LOSS_BINS, 1e-6))[0][2] == -np.inf


def test_final_metrics_report_each_nets_gain_over_the_identity(tmp_path):
  final = _run(tmp_path / "w")
  for name in TINY.nets:
    rows = final[name]["identity_gains"]
    assert len(rows) == training.LOSS_BINS and all(np.isfinite(lo) for lo, _, _ in rows)
    assert any(np.isfinite(g) for _, _, g in rows)
