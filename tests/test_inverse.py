"""Linear inverse problems: operators, the solver, parity with the original code's fixtures,
determinism, batch = singles, bad inputs and the CLI."""
import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import cli
from conftest import shared_path
import wcdm_jax
from wcdm_jax import evaluation, inverse, models, pretrained, sampling
from wcdm_jax.inverse import solver

KEY = jax.random.key(0)
GREY, COLOUR = (16, 16, 1), (16, 16, 3)


def _ops(shape):
  h, w, c = shape
  return {
      "inpaint": inverse.Inpainting(inverse.box_mask((h, w), 6), channels=c),
      "pixels": inverse.RandomPixels(0.3, KEY, shape),
      "sr": inverse.BlockAverage(4, shape),
      "deblur": inverse.SpectralLowpass(0.2, shape=shape),
      "cs_dense": inverse.RandomProjection(0.2, KEY, shape, kind="dense"),
      "cs_fast": inverse.RandomProjection(0.2, KEY, shape, kind="fast"),
  }


CASES = [(name, shape) for shape in (GREY, COLOUR) for name in _ops(shape)]


def _rand(shape, seed):
  return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


@pytest.mark.parametrize("name,shape", CASES)
def test_operator_is_orthonormal(name, shape):
  op = _ops(shape)[name]
  x = _rand((3,) + shape, 1)
  mshape = op.measurement_shape(shape)
  assert op.forward(x).shape == (3,) + tuple(mshape)
  c = _rand((3,) + tuple(mshape), 2)
  mc = op.adjoint(c)
  assert mc.shape == (3,) + shape
  np.testing.assert_allclose(op.forward(mc), c, atol=2e-5)  # M^T M = I
  lhs = jnp.sum(op.forward(x) * c)  # <M^T x, c> = <x, M c>
  np.testing.assert_allclose(lhs, jnp.sum(x * mc), rtol=1e-4, atol=1e-4)
  p = op.project(x)
  np.testing.assert_allclose(op.project(p), p, atol=2e-5)  # idempotent
  np.testing.assert_allclose(jnp.sum(p * x), jnp.sum(p * p), rtol=1e-4)  # orthogonal
  assert 0 < float(jnp.sum(p * p)) < float(jnp.sum(x * x))  # measures something, not all


@pytest.mark.parametrize("name", ["inpaint", "pixels", "sr", "deblur", "cs_fast"])
def test_operators_are_jittable_pytrees(name):
  op = _ops(GREY)[name]
  x = _rand((2,) + GREY, 3)
  np.testing.assert_allclose(jax.jit(lambda o, x: o.project(x))(op, x), op.project(x), atol=1e-6)
  leaves, tree = jax.tree.flatten(op)
  assert jax.tree.unflatten(tree, leaves).measurement_shape(GREY) == op.measurement_shape(GREY)


def test_operator_values():
  x = _rand((1,) + GREY, 4)
  # Block average: s x the block mean; and it is the Haar low-pass of 2 levels.
  sr = inverse.BlockAverage(4)
  np.testing.assert_allclose(sr.forward(x)[0, 1, 2, 0], 4 * x[0, 4:8, 8:12, 0].mean(), rtol=1e-5)
  np.testing.assert_allclose(sr.forward(x) / 4, wcdm_jax.decompose(x, 2).low, atol=1e-5)
  # The hole is zero in M M^T x and the rest is kept.
  mask = inverse.box_mask((16, 16), 6)
  assert mask[5:11, 5:11].sum() == 0 and mask.sum() == 256 - 36
  np.testing.assert_allclose(inverse.Inpainting(mask).project(x)[0, ..., 0], x[0, ..., 0] * mask)
  # The original's 40x40 hole in a 160x160 image: rows and columns 60:100.
  big = inverse.box_mask((160, 160), 40)
  assert big[60:100, 60:100].sum() == 0 and big.sum() == 160 * 160 - 1600
  # Random pixels: the fraction, the same pixels in every channel, a function of the key.
  op = inverse.RandomPixels(0.25, KEY, COLOUR)
  m = np.asarray(op.mask)
  assert m.sum() == 3 * 64 and (m[..., 0] == m[..., 2]).all()
  assert (np.asarray(inverse.RandomPixels(0.25, KEY, COLOUR).mask) == m).all()
  assert not (np.asarray(inverse.RandomPixels(0.25, jax.random.key(1), COLOUR).mask) == m).all()
  # Hermitian low-pass: M M^T x = real(ifft2(band * fft2(x))) for a symmetric band.
  op = inverse.SpectralLowpass(0.2, shape=GREY)
  band = op.band_mask(16, 16)
  assert (band == band[(-np.arange(16)) % 16][:, (-np.arange(16)) % 16]).all()
  ref = np.real(np.fft.ifft2(band * np.fft.fft2(np.asarray(x[0, ..., 0]))))
  np.testing.assert_allclose(op.project(x)[0, ..., 0], ref, atol=1e-5)
  # The fast projection matches its dense matrix.
  fast = inverse.RandomProjection(0.2, KEY, GREY, kind="fast")
  basis = jnp.eye(256).reshape(256, 16, 16, 1)
  u = np.asarray(fast.forward(basis))[:, :, 0]  # (N, m) = M
  np.testing.assert_allclose(u.T @ u, np.eye(u.shape[1]), atol=1e-5)
  dense = inverse.RandomProjection.from_matrix(u, GREY)
  np.testing.assert_allclose(dense.forward(x), fast.forward(x), atol=1e-5)
  assert inverse.RandomProjection(0.2, KEY, (160, 160)).kind == "fast"
  assert inverse.RandomProjection(0.2, KEY, (48, 48)).kind == "dense"


@pytest.mark.parametrize("make,match", [
    (lambda: inverse.RandomPixels(0.0, KEY, GREY), "fraction"),
    (lambda: inverse.RandomPixels(1.5, KEY, GREY), "fraction"),
    (lambda: inverse.RandomProjection(-0.1, KEY, GREY), "fraction"),
    (lambda: inverse.SpectralLowpass(2.0), "fraction"),
    (lambda: inverse.Inpainting(np.ones((16, 16))), "measures everything"),
    (lambda: inverse.Inpainting(np.zeros((16, 16))), "measures nothing"),
    (lambda: inverse.Inpainting(np.full((16, 16), 0.5)), "only 0"),
    (lambda: inverse.Inpainting(np.ones(16)), r"\(H, W\)"),
    (lambda: inverse.BlockAverage(1), "factor"),
    (lambda: inverse.BlockAverage(3, (16, 16)), "does not divide"),
    (lambda: inverse.box_mask((16, 16), 20), "fit"),
    (lambda: inverse.RandomProjection(0.1, KEY, GREY, kind="sparse"), "kind"),
    (lambda: inverse.RandomProjection.from_matrix(np.ones((256, 4)), GREY), "orthonormal"),
    (lambda: inverse.RandomProjection.from_matrix(np.eye(10), GREY), r"\(H\*W, m\)"),
    (lambda: inverse.SpectralLowpass(0.1, band="square"), "band"),
    (lambda: inverse.SpectralLowpass(1.0).check((8, 8, 1)), "every frequency"),
    (lambda: _ascent(beta=0), "beta"),
    (lambda: _ascent(flip_average=True), "flip_average does not apply"),
    (lambda: inverse.SolverConfig(method="magic"), "method"),
])
def test_bad_operator_arguments(make, match):
  with pytest.raises(ValueError, match=match):
    make()


# --- the solver --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def flat():
  spec = models.ModelSpec(low=models.flat_spec(rf=5, num_layers=3, features=4),
                          image_size=(16, 16))
  return models.init_model(jax.random.key(1), spec)


@pytest.fixture(scope="module")
def ms():
  spec = models.multiscale_spec(2, cond_rf=5, low_rf=5, image_size=(16, 16), num_layers=3,
                                low_num_layers=3, features=4)
  return models.init_model(jax.random.key(2), spec)


def _ascent(project=True, method="auto", **kw):
  """A SolverConfig whose ascent is the default one but for ``kw``."""
  return inverse.SolverConfig(sampler=dataclasses.replace(inverse.DEFAULT_ASCENT, **kw),
                              project=project, method=method)


FAST = _ascent(beta=0.5, h0=0.1, sigma_L=0.05, max_steps=40)


def _clean(n=3, shape=GREY):
  return jnp.asarray(np.random.default_rng(5).uniform(size=(n,) + shape), jnp.float32)


@pytest.mark.parametrize("prior", ["flat", "ms"])
@pytest.mark.parametrize("task", ["inpaint", "pixels", "deblur", "cs_fast"])
def test_solution_is_consistent_and_batch_equals_singles(prior, task, flat, ms, request):
  params = flat if prior == "flat" else ms
  op = _ops(GREY)[task]
  clean = _clean()
  meas = op.forward(clean)
  keys = jax.random.split(KEY, 3)
  x, info = inverse.solve(keys, params, op, meas, config=FAST, return_info=True)
  assert x.shape == clean.shape and bool(jnp.all(jnp.isfinite(x)))
  np.testing.assert_allclose(op.forward(x), meas, atol=1e-4)  # exact final projection
  again = inverse.solve(keys, params, op, meas, config=FAST)
  assert np.array_equal(np.asarray(x), np.asarray(again))  # deterministic
  for b in range(3):
    one = inverse.solve(keys[b:b + 1], params, op, meas[b:b + 1], config=FAST)
    np.testing.assert_allclose(one[0], x[b], atol=1e-5)
  other = inverse.solve(jax.random.split(jax.random.key(9), 3), params, op, meas, config=FAST)
  assert not np.allclose(np.asarray(other), np.asarray(x))  # keys matter (beta < 1)
  assert info.steps.shape == (3,) and info.sigmas.shape == (3, FAST.sampler.max_steps)


def test_no_projection_leaves_the_ascent_output(flat):
  op = _ops(GREY)["pixels"]
  meas = op.forward(_clean())
  cfg = dataclasses.replace(FAST, project=False)
  x = inverse.solve(KEY, flat, op, meas, config=cfg)
  assert not np.allclose(op.forward(x), meas, atol=1e-3)


def test_constant_prior_recovers_a_constant_image():
  """f(y) = y - mean(y) (the prior of constant images): from 10% of the pixels of a constant
  image the ascent must return that constant everywhere (wrong signs in d_t diverge)."""
  op = inverse.RandomPixels(0.1, KEY, (32, 32, 1))
  clean = jnp.full((2, 32, 32, 1), 0.3).at[1].set(0.7)
  meas = op.forward(clean)
  f = lambda y: y - y.mean((1, 2, 3), keepdims=True)
  cfg = dataclasses.replace(inverse.DEFAULT_ASCENT, beta=1.0, h0=0.05, sigma_L=1e-5, max_steps=2000)
  keys = jax.random.split(KEY, 2)
  y0 = solver.initial_state(keys, op, meas, (32, 32, 1), 1.0)
  x, info = solver.constrained_ascent(keys, f, op, meas, y0, cfg)
  assert bool(info.converged.all())
  np.testing.assert_allclose(x, clean, atol=2e-3)
  # The start: grey where unmeasured, the measurements where measured, plus noise.
  y0 = solver.initial_state(keys, op, meas, (32, 32, 1), 0.0)
  mask = np.asarray(op.mask)[None]
  np.testing.assert_allclose(np.asarray(y0), np.where(mask > 0, np.asarray(clean), 0.5))


def test_step_cap_and_abort():
  op = inverse.RandomPixels(0.5, KEY, GREY)
  meas = op.forward(_clean(2))
  keys = jax.random.split(KEY, 2)
  y0 = solver.initial_state(keys, op, meas, GREY, 1.0)
  cfg = dataclasses.replace(inverse.DEFAULT_ASCENT, beta=1.0, h0=0.01, sigma_L=1e-6, max_steps=5)
  _, info = solver.constrained_ascent(keys, lambda y: y - y.mean(), op, meas, y0, cfg)
  assert np.asarray(info.steps).tolist() == [5, 5] and not bool(info.converged.any())
  grow = lambda y: -10.0 * y  # the "denoiser" pushes away: sigma grows past abort_sigma
  _, info = solver.constrained_ascent(keys, grow, op, meas, y0, cfg)
  assert bool(info.aborted.all()) and not bool(info.converged.any())
  nan = lambda y: y * jnp.nan
  x, info = solver.constrained_ascent(keys, nan, op, meas, y0, cfg)
  assert bool(info.aborted.all()) and np.asarray(info.steps).tolist() == [0, 0]


def test_coarse_to_fine_is_super_resolve(ms, flat):
  op = inverse.BlockAverage(4)
  clean = _clean()
  meas = op.forward(clean)
  keys = jax.random.split(KEY, 3)
  cond = sampling.AscentConfig(h0=0.1, beta=0.5, sigma_L=0.05, max_steps=20)
  cfg = inverse.SolverConfig(cond_config=cond)
  x = inverse.solve(keys, ms, op, meas, config=cfg)
  ref = wcdm_jax.super_resolve(keys, ms, wcdm_jax.decompose(clean, 2).low, cond_config=cond)
  np.testing.assert_allclose(x, ref, atol=1e-5)
  np.testing.assert_allclose(op.forward(x), meas, atol=1e-4)  # Haar: exactly consistent
  # plug-in on the same problem runs the ascent instead
  plug = inverse.solve(keys, ms, op, meas, config=dataclasses.replace(FAST, method="plugin"))
  assert not np.allclose(np.asarray(plug), np.asarray(x))
  with pytest.raises(ValueError, match="flat denoiser"):
    inverse.solve(keys, flat, op, meas, config=inverse.SolverConfig(method="coarse_to_fine"))
  with pytest.raises(ValueError, match="factor 4 needed"):
    inverse.solve(keys, ms, inverse.BlockAverage(2), inverse.BlockAverage(2).forward(clean),
                  config=inverse.SolverConfig(method="coarse_to_fine"))


def test_colour(flat):
  spec = models.ModelSpec(low=models.flat_spec(rf=5, num_layers=3, features=4, channels=3),
                          image_size=(16, 16))
  params = models.init_model(KEY, spec)
  for op in _ops(COLOUR).values():
    meas = op.forward(_clean(2, COLOUR))
    x = inverse.solve(KEY, params, op, meas, config=FAST)
    assert x.shape == (2,) + COLOUR
    np.testing.assert_allclose(op.forward(x), meas, atol=1e-4)


@pytest.mark.parametrize("call,exc,match", [
    (lambda p, m: inverse.solve(KEY, p, _ops(GREY)["pixels"], m[:, :10]), ValueError,
     r"shape \(B, 77\)"),
    (lambda p, m: inverse.solve(KEY, p, _ops(COLOUR)["pixels"], m), ValueError, "3-channel"),
    (lambda p, m: inverse.solve(jax.random.split(KEY, 5), p, _ops(GREY)["pixels"], m),
     ValueError, "5 keys"),
    (lambda p, m: inverse.solve(KEY, p, "mask", m), TypeError, "operator"),
    (lambda p, m: inverse.solve(KEY, p, _ops(GREY)["pixels"], m.tolist()), TypeError,
     "measurements"),
    (lambda p, m: inverse.solve(KEY, {"w": 1}, _ops(GREY)["pixels"], m), TypeError,
     "ModelParams"),
    (lambda p, m: inverse.solve(KEY, p, _ops(GREY)["pixels"], m, config={"beta": 1}), TypeError,
     "SolverConfig"),
    (lambda p, m: inverse.solve(KEY, p, inverse.BlockAverage(4, (16, 16)),
                                jnp.zeros((3, 5, 5, 1))), ValueError, r"shape \(B, 4, 4, 1\)"),
    (lambda p, m: inverse.solve(KEY, p, inverse.Inpainting(np.eye(16)), m), ValueError,
     r"shape \(B, 16\)"),
])
def test_bad_problem_fails_before_compute(flat, call, exc, match):
  meas = _ops(GREY)["pixels"].forward(_clean())
  with pytest.raises(exc, match=match):
    call(flat, meas)


def test_multiscale_prior_needs_a_size_its_levels_divide(ms):
  op = inverse.RandomPixels(0.3, KEY, (18, 18, 1))
  with pytest.raises(ValueError, match="18"):
    inverse.solve(KEY, ms, op, op.forward(jnp.zeros((1, 18, 18, 1))))


# --- parity with the original code's fixtures ---------------------------------------------------

def _fixture_problem(task, d):
  img = d["image"].transpose(0, 2, 3, 1)
  shape = img.shape[1:]
  if task in ("inpaint", "randpix"):
    op = inverse.Inpainting(d["mask"])
    return op, op.forward(jnp.asarray(d["x_c"])[..., None])
  if task == "sr4x":
    return inverse.BlockAverage(4, shape), jnp.asarray(d["x_c"])[..., None]
  if task == "spectral":
    op = inverse.SpectralLowpass(0.1, band="original", shape=shape)
    assert (op.band_mask(160, 160) == d["mask"].astype(bool)).all()
    return op, jnp.asarray(d["x_c_real"] + 1j * d["x_c_imag"])[..., None]
  op = inverse.RandomProjection.from_matrix(d["U"], shape)
  return op, jnp.asarray(d["x_c"])[None, :, None]


@pytest.fixture(scope="module")
def flat43():
  rel = pretrained.find_release_models(shared_path("reference", "lcv-denoisers"))
  return pretrained.load_release_model(rel["flat_celebA_160x160_gray_rf43"])


@pytest.mark.slow
@pytest.mark.parametrize("task", ["inpaint", "randpix", "sr4x", "spectral", "cs"])
def test_parity_with_original(task, flat43):
  d = np.load(shared_path("reference", "fixtures", f"uip_{task}_rf43.npz"))
  op, meas = _fixture_problem(task, d)
  # The measurements of the image are the fixture's.
  img = jnp.asarray(d["image"].transpose(0, 2, 3, 1))
  np.testing.assert_allclose(op.forward(img), meas, atol=1e-4)
  cfg = dataclasses.replace(inverse.DEFAULT_ASCENT, beta=1.0, abort_sigma=np.inf, max_steps=200)
  y0 = jnp.asarray(d["y0"].transpose(0, 2, 3, 1))
  keys = jax.random.split(KEY, 1)
  out, info = jax.jit(lambda y0, m: solver.constrained_ascent(
      keys, solver.residual(flat43), op, m, y0, cfg))(y0, meas)
  n = int(d["steps"])
  assert int(info.steps[0]) == n and bool(info.converged[0])
  np.testing.assert_allclose(np.asarray(info.sigmas[0, :n]), d["sigmas"], atol=1e-4)
  np.testing.assert_allclose(np.asarray(out).transpose(0, 3, 1, 2), d["output"], atol=1e-4)


# --- the CLI ------------------------------------------------------------------------------------

def _cli(*args):
  return cli.run("solve.py", *args)


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory, flat, ms):
  root = tmp_path_factory.mktemp("priors")
  wcdm_jax.save_model(str(root / "flat"), flat)
  wcdm_jax.save_model(str(root / "ms"), ms)
  return str(root / "flat"), str(root / "ms")


def test_solve_tool(model_dirs, tmp_path):
  f, m = model_dirs
  res = _cli("--task=sr", "--factor=4", f"--models={f},{m},{m}", "--names=flat,ms_c2f,ms_plug",
             "--methods=auto,auto,plugin", "--images=embedded", "--num_images=3",
             "--batch_size=2", "--image_size=16", "--max_steps=5", "--abort_sigma=1e30", "--sigma_L=1e-9",
             f"--out={tmp_path}")
  assert res.returncode == 0, res.stderr[-3000:]
  out = json.loads((tmp_path / "results.json").read_text())
  assert set(out["priors"]) == {"flat", "ms_c2f", "ms_plug"} and out["num_images"] == 3
  for name, r in out["priors"].items():
    assert len(r["psnr"]) == 3 and len(r["ssim"]) == 3 and len(r["steps"]) == 3
    assert r["psnr_mean"] == pytest.approx(np.mean(r["psnr"]))
    assert r["consistency"] < 1e-4, name  # exact projection / Haar low-pass kept
  assert out["priors"]["ms_plug"]["steps"] == [5, 5, 5]
  assert out["priors"]["ms_c2f"]["solver"].startswith("coarse_to_fine")
  assert out["priors"]["ms_plug"]["solver"] == "plugin" and out["task_args"] == {"factor": 4}
  assert len(out["baseline"]["psnr"]) == 3
  assert sorted(os.listdir(tmp_path)) == ["grid_000.png", "grid_001.png", "grid_002.png",
                                          "results.json"]


@pytest.mark.parametrize("args,match", [
    (["--task=sr", "--factor=3"], "does not divide"),
    (["--task=pixels", "--fraction=0"], "fraction"),
    (["--task=inpaint", "--box=40"], "fit"),
    (["--task=sr", "--factor=8", "--methods=coarse_to_fine,auto"], "flat denoiser"),
    (["--task=cs", "--names=a"], "one distinct label"),
    # the solver's flags are its sampler's fields: their checks, naming the flag
    (["--task=pixels", "--beta=2"], r"--beta=2.0: beta"),
    (["--task=pixels", "--max_steps=0"], r"--max_steps=0: max_steps"),
    (["--task=pixels", "--sigma_0=-1"], r"--sigma_0=-1.0: sigma_0"),
])
def test_solve_tool_bad_input(model_dirs, tmp_path, args, match):
  f, m = model_dirs
  out = tmp_path / "out"
  res = _cli(f"--models={f},{m}", "--images=embedded", "--image_size=16", f"--out={out}", *args)
  assert res.returncode != 0 and "Traceback" not in res.stderr
  assert __import__("re").search(match, res.stderr), res.stderr[-2000:]
  assert not out.exists()


@pytest.mark.slow
def test_solve_tool_on_model_samples(model_dirs, tmp_path):
  """--images=npz: solves images given as an array (e.g. sample.py's samples.npz)."""
  f, _ = model_dirs
  x = np.asarray(_clean(2))
  np.savez(tmp_path / "samples.npz", samples=x)
  out = tmp_path / "out"
  res = _cli("--task=pixels", "--fraction=0.5", f"--models={f}",
             f"--images=npz:{tmp_path / 'samples.npz'}", "--image_size=16", "--max_steps=2",
             f"--out={out}")
  assert res.returncode == 0, res.stderr[-3000:]
  r = json.loads((out / "results.json").read_text())
  op = inverse.RandomPixels(0.5, jax.random.key(0), GREY)  # --seed=0
  base = np.asarray(evaluation.psnr(op.project(jnp.asarray(x)), jnp.asarray(x)))
  np.testing.assert_allclose(r["baseline"]["psnr"], base, rtol=1e-5)
  bad = _cli("--task=pixels", f"--models={f}", f"--images=npz:{tmp_path / 'samples.npz'}",
             "--image_size=32", f"--out={tmp_path / 'bad'}")
  assert bad.returncode != 0 and "need (N, 32, 32, 1)" in bad.stderr
