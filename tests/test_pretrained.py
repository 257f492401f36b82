"""Parity with the authors' released weights and the fixtures produced by their code."""
import io
import os
import pickle
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import wcdm_jax
from conftest import shared_path
from wcdm_jax import models, pretrained, sampling

ATOL = 1e-4  # the fixtures' README: a few 1e-5 at most for the nets


def nhwc(a):
  return jnp.asarray(np.asarray(a).transpose(0, 2, 3, 1))


def nchw(a):
  return np.asarray(a).transpose(0, 3, 1, 2)


@pytest.fixture(scope="module")
def release():
  return pretrained.find_release_models(shared_path("reference", "lcv-denoisers"))


def fixture(name):
  return np.load(shared_path("reference", "fixtures", name))


def test_release_is_complete(release):
  assert sorted(release) == sorted(
      [f"flat_celebA_160x160_gray_rf{r}" for r in (5, 9, 13, 23, 43)] +
      [f"ms_celebA_160x160_gray_rf{r}" for r in (5, 9, 13, 23, 43)] +
      ["ms_celebA_320x320_gray_rf13"])


@pytest.mark.parametrize("rf", [5, 9, 13, 23, 43])
def test_flat_parity(release, rf):
  params = pretrained.load_release_model(release[f"flat_celebA_160x160_gray_rf{rf}"])
  assert params.spec.low.rf == rf and params.spec.levels == 0
  d = fixture(f"flat_rf{rf}.npz")
  out = params.residual_fn("flat")(nhwc(d["input"]))
  np.testing.assert_allclose(nchw(out), d["output"], atol=ATOL)
  # The same entry point denoises: input - output.
  den = wcdm_jax.denoise(params, nhwc(d["input"]))
  np.testing.assert_allclose(nchw(den), d["input"] - d["output"], atol=ATOL)


def _check_ms(params, d, levels):
  if "low_input" in d:
    out = params.residual_fn("low")(nhwc(d["low_input"]))
    np.testing.assert_allclose(nchw(out), d["low_output"], atol=ATOL)
  for j in range(levels):
    out = params.residual_fn(f"cond{j}")(nhwc(d[f"scale{j}_input"]))
    np.testing.assert_allclose(nchw(out), d[f"scale{j}_output"], atol=ATOL)
  den, scales = wcdm_jax.denoise(params, nhwc(d["noisy"]), return_scales=True)
  assert len(scales) == levels + 1
  for k, s in enumerate(scales):
    np.testing.assert_allclose(nchw(s), d[f"pipeline_{k}"], atol=ATOL)
  np.testing.assert_allclose(nchw(den), d[f"pipeline_{levels}"], atol=ATOL)


@pytest.mark.parametrize("rf", [5, 9, 13, 23, 43])
def test_multiscale_160_parity(release, rf):
  params = pretrained.load_release_model(release[f"ms_celebA_160x160_gray_rf{rf}"])
  assert params.spec.levels == 2 and params.spec.low.rf == 41
  assert all(c.rf == rf for c in params.spec.conditionals)
  _check_ms(params, fixture(f"ms160_rf{rf}.npz"), 2)


def test_multiscale_320_parity(release):
  params = pretrained.load_release_model(release["ms_celebA_320x320_gray_rf13"])
  assert params.spec.levels == 3 and params.spec.image_size == (320, 320)
  # The release's sampler travels with the imported model: sample(key, params) rescales.
  assert params.sampling == sampling.release_recommended(3)
  assert params.sampling.low_rescale == (0.0, 0.8) and len(params.sampling.cond) == 3
  _check_ms(params, fixture("ms320_rf13.npz"), 3)


def test_deterministic_ascent_parity(release):
  params = pretrained.load_release_model(release["ms_celebA_160x160_gray_rf13"])
  d = fixture("ascent_ms160_rf13_scale1.npz")
  low = jnp.asarray(d["low"].transpose(1, 2, 0))[None]
  y0 = jnp.asarray(d["y0"].transpose(1, 2, 0))[None]
  net, variables = params.net("cond1")
  f = lambda y: models.apply_net(net, variables, jnp.concatenate([low, y], -1))
  cfg = sampling.AscentConfig(h0=0.01, beta=1.0, sigma_L=0.01, max_steps=int(d["num_iterations"]))
  out, info = jax.jit(lambda k, y: sampling.ascent(k, f, y.shape[1:], cfg, y))(
      jax.random.split(jax.random.key(0), 1), y0)
  assert int(info.steps[0]) == int(d["num_iterations"])
  np.testing.assert_allclose(np.asarray(info.sigmas[0]), d["sigmas"], atol=1e-3)
  np.testing.assert_allclose(np.asarray(out[0]).transpose(2, 0, 1), d["output"], atol=1e-3)


def test_import_tool_round_trip(release, tmp_path):
  """launch/import_lcv.py's writer and load_params give back the same nets."""
  params = pretrained.load_release_model(release["ms_celebA_160x160_gray_rf9"])
  wcdm_jax.save_model(str(tmp_path / "m"), params)
  loaded = wcdm_jax.load_params(str(tmp_path / "m"))
  assert loaded.spec == params.spec
  jax.tree.map(np.testing.assert_array_equal, (loaded.low, loaded.conditionals),
               (params.low, params.conditionals))


def test_reader_matches_torch(release):
  torch = pytest.importorskip("torch")
  path = release["ms_celebA_160x160_gray_rf13"]["cond0"]
  ours = pretrained.read_state_dict(path)
  theirs = torch.load(path, map_location="cpu", weights_only=True)
  assert list(ours) == list(theirs)
  for k, v in theirs.items():
    np.testing.assert_array_equal(ours[k], v.numpy())


class _Evil:
  def __reduce__(self):
    return (os.system, ("echo pwned",))


def test_reader_refuses_code(tmp_path):
  buf = io.BytesIO()
  pickle.dump({"x": _Evil()}, buf, protocol=2)
  path = tmp_path / "evil.pt"
  with zipfile.ZipFile(path, "w") as z:
    z.writestr("archive/data.pkl", buf.getvalue())
  with pytest.raises(pretrained.WeightFileError, match="refusing to load"):
    pretrained.read_state_dict(str(path))


def test_a_release_folder_without_a_size_asks_for_one():
  """The image size comes from the folder name ('celebA_160x160_gray') or from the caller,
  never from a guess."""
  from wcdm_jax import pretrained  # pylint: disable=g-import-not-at-top
  assert pretrained._image_size("celebA_320x160_gray") == (320, 160)  # pylint: disable=protected-access
  with pytest.raises(ValueError, match=r"pass image_size=\(H, W\)"):
    pretrained._image_size("my_faces_gray")  # pylint: disable=protected-access
