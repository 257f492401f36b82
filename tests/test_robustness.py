"""A corpus of bad inputs across the public API and the CLIs, plus crafted weight files.

Each case asserts the exception type (API) or a non-zero exit without a traceback (CLI), and
that the message names the problem. ``test_corpus_size`` keeps the corpus at >= 60 cases.
"""
import json
import os
import subprocess
import sys
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

import cli
import torchfile
from conftest import REPO, cli_env
import wcdm_jax
from wcdm_jax import checkpoints, data, models, pretrained, sampling

SPEC = models.multiscale_spec(2, cond_rf=5, low_rf=5, image_size=(16, 16), num_layers=3,
                              low_num_layers=3, features=4)
PARAMS = models.init_model(jax.random.key(0), SPEC)
FLAT = models.init_model(jax.random.key(0), models.ModelSpec(low=models.flat_spec(5, 1, 3, 4)))
KEY = jax.random.key(0)
X = jnp.zeros((1, 16, 16, 1))
FAST = sampling.AscentConfig(max_steps=2)
DB2 = models.init_model(jax.random.key(0), models.multiscale_spec(
    1, cond_rf=5, low_rf=5, image_size=(16, 16), wavelet="db2", num_layers=3, low_num_layers=3,
    features=4))


def _model_dir(tmp, kind):
  """Model directories with something wrong in them."""
  d = tmp / kind
  d.mkdir()
  if kind == "foreign_spec":
    (d / "spec.json").write_text(json.dumps({"foo": 1}))
  elif kind == "garbage_spec":
    (d / "spec.json").write_bytes(b"\x00\xff garbage")
  elif kind == "untrained":
    checkpoints.write_spec(str(d), SPEC)
  elif kind == "db2":
    checkpoints.save_model(str(d), DB2)
  return str(d)


def _folder(tmp, kind):
  d = tmp / kind
  d.mkdir()
  if kind == "corrupt_images":
    for i in range(3):
      (d / f"{i}.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
  elif kind == "no_images":
    (d / "notes.txt").write_text("no images here")
  return str(d)


def _pt(tmp, kind):
  path = tmp / f"{kind}.pt"
  rng = np.random.default_rng(0)
  if kind == "not_zip":
    path.write_bytes(b"definitely not a zip file")
  elif kind == "truncated":
    path.write_bytes(torchfile.dumps(torchfile.bfcnn_state(rng))[:300])
  elif kind == "out_of_bounds":
    s = torchfile.Storage("0", np.zeros(4, np.float32).tobytes(), np.float32)
    path.write_bytes(torchfile.dumps({"w": torchfile.Tensor(s, 2, (4,), (1,))}))
  elif kind == "code":
    class Evil:
      def __reduce__(self):
        return (os.system, ("echo pwned",))
    import pickle  # pylint: disable=g-import-not-at-top
    with zipfile.ZipFile(path, "w") as z:
      z.writestr("archive/data.pkl", pickle.dumps({"x": Evil()}, protocol=2))
  elif kind == "not_bfcnn":
    fc = torchfile.tensor("0", np.ones((2, 2), np.float32))
    path.write_bytes(torchfile.dumps({"fc.weight": fc}))
  return str(path)


def _keys3():
  return jax.random.split(KEY, 3)


# (id, callable(tmp_path), exception type, regex the message must match)
API_CASES = [
    # denoise
    ("denoise-list", lambda t: wcdm_jax.denoise(PARAMS, [[0.0]]), TypeError,
     "noisy must be a .* float array, got list"),
    ("denoise-uint8", lambda t: wcdm_jax.denoise(PARAMS, np.zeros((1, 16, 16, 1), np.uint8)),
     TypeError, "noisy must hold floats .* got dtype uint8"),
    ("denoise-3d", lambda t: wcdm_jax.denoise(PARAMS, jnp.zeros((16, 16, 1))), ValueError,
     r"noisy must be \(B, H, W, C\), got shape \(16, 16, 1\)"),
    ("denoise-channels", lambda t: wcdm_jax.denoise(PARAMS, jnp.zeros((1, 16, 16, 3))),
     ValueError, "noisy has 3 channels but the model takes 1"),
    ("denoise-size", lambda t: wcdm_jax.denoise(PARAMS, jnp.zeros((1, 18, 18, 1))), ValueError,
     "18x18 is not divisible by 2\\*\\*2"),
    ("denoise-empty", lambda t: wcdm_jax.denoise(PARAMS, jnp.zeros((0, 16, 16, 1))), ValueError,
     "noisy is empty"),
    ("denoise-params-dict", lambda t: wcdm_jax.denoise({"low": 1}, X), TypeError,
     "params must be wcdm_jax.ModelParams"),
    # sample
    ("sample-int-key", lambda t: wcdm_jax.sample(0, PARAMS), TypeError,
     "key must be a JAX random key, got int 0"),
    ("sample-str-key", lambda t: wcdm_jax.sample("seed", PARAMS), TypeError,
     "key must be a JAX random key, got str"),
    ("sample-float-n", lambda t: wcdm_jax.sample(KEY, PARAMS, 2.5), TypeError,
     "num_samples must be an int >= 1, got float 2.5"),
    ("sample-zero-n", lambda t: wcdm_jax.sample(KEY, PARAMS, 0), ValueError,
     "num_samples must be an int >= 1, got 0"),
    ("sample-negative-n", lambda t: wcdm_jax.sample(KEY, PARAMS, -2), ValueError,
     "num_samples must be an int >= 1, got -2"),
    ("sample-bool-n", lambda t: wcdm_jax.sample(KEY, PARAMS, True), TypeError,
     "num_samples must be an int"),
    ("sample-size-zero", lambda t: wcdm_jax.sample(KEY, PARAMS, image_size=(0, 0)), ValueError,
     r"image_size\[0\] must be an int >= 1, got 0"),
    ("sample-size-3tuple", lambda t: wcdm_jax.sample(KEY, PARAMS, image_size=(16, 16, 1)),
     ValueError, r"image_size must be \(height, width\) or one int, got \(16, 16, 1\)"),
    ("sample-size-negative", lambda t: wcdm_jax.sample(KEY, PARAMS, image_size=(-16, 16)),
     ValueError, r"image_size\[0\] must be an int >= 1, got -16"),
    ("sample-size-str", lambda t: wcdm_jax.sample(KEY, PARAMS, image_size="16"), ValueError,
     "image_size must be"),
    ("sample-size-float", lambda t: wcdm_jax.sample(KEY, PARAMS, image_size=(16.0, 16)),
     TypeError, r"image_size\[0\] must be an int"),
    ("sample-size-odd", lambda t: wcdm_jax.sample(KEY, PARAMS, image_size=(18, 18)), ValueError,
     "crop to 16x16 or pad to 20x20"),
    ("sample-rescale-1", lambda t: wcdm_jax.sample(KEY, PARAMS, low_rescale=(0.5,)), ValueError,
     r"low_rescale must be a pair \(lo, hi\)"),
    ("sample-rescale-order", lambda t: wcdm_jax.sample(KEY, PARAMS, low_rescale=(0.8, 0.0)),
     ValueError, "low_rescale must have lo < hi"),
    ("sample-rescale-str", lambda t: wcdm_jax.sample(KEY, PARAMS, low_rescale=("a", "b")),
     TypeError, "low_rescale must hold two finite numbers"),
    ("sample-rescale-nan", lambda t: wcdm_jax.sample(KEY, PARAMS, low_rescale=(0, np.nan)),
     TypeError, "low_rescale must hold two finite numbers"),
    ("sample-low-config", lambda t: wcdm_jax.sample(KEY, PARAMS, low_config="fast"), TypeError,
     "low_config must be a wcdm_jax.AscentConfig"),
    ("sample-cond-count", lambda t: wcdm_jax.sample(KEY, PARAMS, low_config=FAST,
                                                    cond_config=[FAST]), ValueError,
     r"need 2 conditional configs"),
    ("sample-cond-type", lambda t: wcdm_jax.sample(KEY, PARAMS, low_config=FAST,
                                                   cond_config=[FAST, "x"]), TypeError,
     r"cond_config\[1\] must be a wcdm_jax.AscentConfig"),
    ("sample-keys-vs-n", lambda t: wcdm_jax.sample(_keys3(), PARAMS, 2), ValueError,
     "got 3 keys but num_samples=2"),
    ("sample-params", lambda t: wcdm_jax.sample(KEY, None), TypeError,
     "params must be wcdm_jax.ModelParams"),
    # AscentConfig
    ("ascent-beta", lambda t: sampling.AscentConfig(beta=0.0), ValueError,
     r"beta must be in \(0, 1\]"),
    ("ascent-h0", lambda t: sampling.AscentConfig(h0=2.0), ValueError, r"h0 must be in \(0, 1\]"),
    ("ascent-steps", lambda t: sampling.AscentConfig(max_steps=2.5), TypeError,
     "max_steps must be an int"),
    ("ascent-sigma-L", lambda t: sampling.AscentConfig(sigma_L=0.0), ValueError,
     "sigma_L must be > 0"),
    ("ascent-abort", lambda t: sampling.AscentConfig(abort_sigma=-1.0), ValueError,
     "abort_sigma must be > 0"),
    ("ascent-mean", lambda t: sampling.AscentConfig(mean_0=float("nan")), ValueError,
     "mean_0 must be a finite number"),
    ("ascent-flip-type", lambda t: sampling.AscentConfig(flip_average="yes"), TypeError,
     "flip_average must be True or False"),
    ("sample-flip-db2", lambda t: wcdm_jax.sample(
        KEY, DB2, 1, low_config=FAST,
        cond_config=sampling.AscentConfig(max_steps=2, flip_average=True)), ValueError,
     r"needs a wavelet whose bands mirror with the image \(Haar\); this model's is 'db2'"),
    # super_resolve
    ("sr-flat", lambda t: wcdm_jax.super_resolve(KEY, FLAT, jnp.zeros((1, 4, 4, 1))), ValueError,
     "needs a multi-scale model"),
    ("sr-full-size", lambda t: wcdm_jax.super_resolve(KEY, PARAMS, X), ValueError,
     r"pass its 2-level low-pass \(4x4\)"),
    ("sr-3d", lambda t: wcdm_jax.super_resolve(KEY, PARAMS, jnp.zeros((1, 4, 4))), ValueError,
     r"low_res must be \(B, H, W, C\)"),
    ("sr-list", lambda t: wcdm_jax.super_resolve(KEY, PARAMS, [[1.0]]), TypeError,
     "low_res must be a .* float array, got list"),
    ("sr-channels", lambda t: wcdm_jax.super_resolve(KEY, PARAMS, jnp.zeros((1, 4, 4, 3))),
     ValueError, "low_res has 3 channels but the model takes 1"),
    ("sr-int-key", lambda t: wcdm_jax.super_resolve(7, PARAMS, jnp.zeros((1, 4, 4, 1))),
     TypeError, "key must be a JAX random key, got int 7"),
    # wavelets
    ("decompose-float-levels", lambda t: wcdm_jax.decompose(X, 1.5), TypeError,
     "levels must be an int >= 1, got float 1.5"),
    ("decompose-zero-levels", lambda t: wcdm_jax.decompose(X, 0), ValueError,
     "levels must be an int >= 1, got 0"),
    ("decompose-wavelet", lambda t: wcdm_jax.decompose(X, 1, "nope"), ValueError,
     "unknown wavelet 'nope'"),
    ("decompose-biorthogonal", lambda t: wcdm_jax.decompose(X, 1, "bior2.2"), ValueError,
     "wavelet 'bior2.2' is not orthogonal"),
    ("decompose-mode", lambda t: wcdm_jax.decompose(X, 1, "haar", "wrap"), ValueError,
     "mode must be 'periodization' or one of"),
    ("decompose-3d", lambda t: wcdm_jax.decompose(jnp.zeros((16, 16, 1)), 1), ValueError,
     r"images must be \(B, H, W, C\)"),
    ("decompose-list", lambda t: wcdm_jax.decompose([1.0], 1), TypeError,
     "images must be a .* float array, got list"),
    ("decompose-size", lambda t: wcdm_jax.decompose(jnp.zeros((1, 6, 6, 1)), 2), ValueError,
     "not divisible"),
    # specs
    ("spec-wavelet", lambda t: models.multiscale_spec(2, image_size=(16, 16), wavelet="nope"),
     ValueError, "unknown wavelet 'nope'"),
    ("spec-rf", lambda t: models.multiscale_spec(2, cond_rf=8, image_size=(16, 16)), ValueError,
     "receptive field 8 is impossible"),
    # load_params
    ("load-missing", lambda t: wcdm_jax.load_params(str(t / "nowhere")), FileNotFoundError,
     "spec.json not found"),
    ("load-foreign-spec", lambda t: wcdm_jax.load_params(_model_dir(t, "foreign_spec")),
     ValueError, "not a wcdm_jax model spec \\(missing key 'low'\\)"),
    ("load-garbage-spec", lambda t: wcdm_jax.load_params(_model_dir(t, "garbage_spec")),
     ValueError, "spec.json: .*not written by wcdm_jax"),
    ("load-untrained", lambda t: wcdm_jax.load_params(_model_dir(t, "untrained")),
     FileNotFoundError, "has no checkpoint for net 'low'"),
    ("load-path-int", lambda t: wcdm_jax.load_params(3), TypeError,
     "path must be a model directory"),
    ("load-step-negative", lambda t: wcdm_jax.load_params(str(t), step=-1), ValueError,
     "step must be None"),
    # data
    ("data-channels", lambda t: data.DataConfig(channels=2), ValueError,
     "channels must be 1 \\(grey\\) or 3"),
    ("data-eval-fraction", lambda t: data.DataConfig(eval_fraction=1.5), ValueError,
     "eval_fraction must be in"),
    ("data-unknown-source", lambda t: data.make_source(data.DataConfig(source="s3://x"), 4),
     ValueError, "unknown data source 's3://x'"),
    ("data-missing-folder", lambda t: data.make_source(
        data.DataConfig(source=f"folder:{t}/nowhere"), 4), ValueError, "does not exist"),
    ("data-no-images", lambda t: data.make_source(
        data.DataConfig(source="folder:" + _folder(t, "no_images")), 4), ValueError,
     "no PNG/JPEG images found"),
    ("data-all-corrupt", lambda t: data.make_source(
        data.DataConfig(source="folder:" + _folder(t, "corrupt_images")), 4), ValueError,
     r"3 of 3 images .* cannot be used .*0.png: cannot decode"),
    ("data-embedded-colour", lambda t: data.make_source(data.DataConfig(channels=3), 4),
     ValueError, "the embedded photographs are grey"),
    ("data-tfds-unknown", lambda t: data.make_source(
        data.DataConfig(source="tfds:no_such_dataset_xyz"), 4), ValueError,
     "unknown tfds dataset 'no_such_dataset_xyz'"),
    # weight files
    ("pt-not-zip", lambda t: pretrained.read_state_dict(_pt(t, "not_zip")),
     pretrained.WeightFileError, "not_zip.pt: not a valid tensor state_dict"),
    ("pt-truncated", lambda t: pretrained.read_state_dict(_pt(t, "truncated")),
     pretrained.WeightFileError, "truncated.pt: "),
    ("pt-out-of-bounds", lambda t: pretrained.read_state_dict(_pt(t, "out_of_bounds")),
     pretrained.WeightFileError, "out_of_bounds.pt: .*reaches element 5 of a storage of 4"),
    ("pt-code", lambda t: pretrained.read_state_dict(_pt(t, "code")),
     pretrained.WeightFileError, "code.pt: .*refusing to load posix.system"),
    ("pt-missing", lambda t: pretrained.read_state_dict(str(t / "none.pt")), FileNotFoundError,
     "none.pt: no such weight file"),
    ("pt-not-bfcnn", lambda t: pretrained.read_net(_pt(t, "not_bfcnn"), "flat"),
     pretrained.WeightFileError, "not_bfcnn.pt: not a BF-CNN .*unexpected key 'fc.weight'"),
]


@pytest.mark.parametrize("case", API_CASES, ids=[c[0] for c in API_CASES])
def test_api_bad_input(case, tmp_path):
  _, fn, exc, pattern = case
  with pytest.raises(exc, match=pattern):
    fn(tmp_path)


def test_api_good_inputs_still_work():
  """The same entry points accept what the errors suggest."""
  assert wcdm_jax.sample(KEY, PARAMS, 1, image_size=16, low_config=FAST,
                         cond_config=FAST).shape == (1, 16, 16, 1)
  assert wcdm_jax.sample(jax.random.PRNGKey(0), PARAMS, low_config=FAST,
                         cond_config=FAST).shape == (1, 16, 16, 1)  # legacy uint32 key
  assert wcdm_jax.denoise(PARAMS, np.zeros((1, 16, 16, 1), np.float32)).shape == (1, 16, 16, 1)


def test_nan_weights_are_flagged_as_aborted():
  nan = jax.tree.map(lambda a: jnp.full_like(a, jnp.nan), PARAMS)
  _, _, infos = wcdm_jax.sample(KEY, nan, 2, low_config=FAST, cond_config=FAST,
                                return_intermediates=True)
  assert bool(infos[0].aborted.all()) and not bool(infos[0].converged.any())


# --- the CLIs ----------------------------------------------------------------------------

TINY = ["--image_size=16", "--levels=1", "--cond_rf=5", "--low_rf=5", "--num_layers=3",
        "--low_num_layers=3", "--features=4", "--batch_size=4", "--num_steps=2",
        "--log_every=1", "--eval_every=2", "--noise_max=50"]


def _process(script, *args, timeout=180):
  """A real ``python launch/<script>`` process (exit code, traceback, output streams)."""
  return subprocess.run([sys.executable, os.path.join(REPO, "launch", script), *args],
                        capture_output=True, text=True, timeout=timeout, env=cli_env(), cwd=REPO)


_cli = cli.run  # the entry point's main, in this process


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """A run of train.py (its main, in this process; real processes train in
  test_determinism.py and test_multiprocess.py)."""
  wd = tmp_path_factory.mktemp("trained") / "run"
  res = _cli("train.py", f"--workdir={wd}", *TINY)
  assert res.returncode == 0, res.stderr[-2000:]
  return wd


@pytest.fixture(scope="module")
def huge(tmp_path_factory):
  """A finite model whose outputs overflow (weights of 1e38): outputs become inf / NaN."""
  d = str(tmp_path_factory.mktemp("huge") / "model")
  spec = models.multiscale_spec(1, cond_rf=5, low_rf=5, image_size=(16, 16), num_layers=3,
                                low_num_layers=3, features=4)
  p = models.init_model(jax.random.key(0), spec)
  wcdm_jax.save_model(d, jax.tree.map(lambda a: jnp.full_like(a, 1e38), p))
  return d


@pytest.fixture(scope="module")
def release(tmp_path_factory):
  """A release-like tree with one valid tiny flat net and one truncated file."""
  root = tmp_path_factory.mktemp("release")
  good = root / "good" / "faces_16x16_gray" / "RF_7x7"
  good.mkdir(parents=True)
  (good / "model.pt").write_bytes(torchfile.dumps(torchfile.bfcnn_state(np.random.default_rng(0))))
  bad = root / "bad" / "faces_16x16_gray" / "RF_7x7"
  bad.mkdir(parents=True)
  (bad / "model.pt").write_bytes((good / "model.pt").read_bytes()[:500])
  return root


def _no_write(path):
  return not os.path.exists(path) or not os.listdir(path)


CLI_CASES = [
    # (id, script, fixtures needed, args(tmp, fixtures) -> list, message in stderr,
    #  extra check(tmp, fixtures) or None)
    ("train-wavelet", "train.py", (), lambda t, f: [f"--workdir={t}/w", *TINY, "--wavelet=nope"],
     "unknown wavelet 'nope'", lambda t, f: _no_write(f"{t}/w")),
    ("train-biorthogonal", "train.py", (),
     lambda t, f: [f"--workdir={t}/w", *TINY, "--wavelet=bior2.2"], "is not orthogonal",
     lambda t, f: _no_write(f"{t}/w")),
    ("train-missing-folder", "train.py", (),
     lambda t, f: [f"--workdir={t}/w", *TINY, f"--data=folder:{t}/none"], "does not exist",
     lambda t, f: _no_write(f"{t}/w")),
    ("train-tfds-unknown", "train.py", (),
     lambda t, f: [f"--workdir={t}/w", *TINY, "--data=tfds:no_such_dataset_xyz"],
     "unknown tfds dataset", lambda t, f: _no_write(f"{t}/w")),
    ("train-noise-range", "train.py", (),
     lambda t, f: [f"--workdir={t}/w", *TINY, "--noise_min=60"],
     "--noise_max=50 --noise_min=60: noise_max (50) must be >= noise_min (60)", None),
    ("train-weight-unweighted", "train.py", (),
     lambda t, f: [f"--workdir={t}/w", *TINY, "--recipe=paper", "--loss_weight_power=1"],
     "--loss_weight_power applies to a weighted loss", lambda t, f: _no_write(f"{t}/w")),
    ("train-unknown-net", "train.py", (), lambda t, f: [f"--workdir={t}/w", *TINY, "--nets=cond7"],
     "unknown nets ['cond7']", lambda t, f: _no_write(f"{t}/w")),
    ("train-crop-deadleaves", "train.py", (),
     lambda t, f: [f"--workdir={t}/w", *TINY, "--data=deadleaves", "--crop=center"],
     "applies to folder and tfds sources", lambda t, f: _no_write(f"{t}/w")),
    ("train-positional", "train.py", (), lambda t, f: [f"--workdir={t}/w", "extra"],
     "unexpected arguments ['extra']", None),
    ("train-changed-seed", "train.py", ("trained",),
     lambda t, f: [f"--workdir={f['trained']}", *TINY, "--seed=1"],
     "other settings (seed: checkpoint 0, this run 1)", None),
    ("train-changed-batch", "train.py", ("trained",),
     lambda t, f: [f"--workdir={f['trained']}", *TINY, "--batch_size=8"],
     "batch_size: checkpoint 4, this run 8", None),
    ("train-changed-lr", "train.py", ("trained",),
     lambda t, f: [f"--workdir={f['trained']}", *TINY, "--learning_rate=0.01"],
     "learning_rate: checkpoint 0.001, this run 0.01", None),
    ("train-changed-arch", "train.py", ("trained",),
     lambda t, f: [f"--workdir={f['trained']}", *TINY, "--features=8"],
     "holds a different model spec", None),
    ("sample-missing-model", "sample.py", (), lambda t, f: [f"--model={t}/none"],
     "spec.json not found", None),
    ("sample-foreign-spec", "sample.py", (),
     lambda t, f: [f"--model={_model_dir(t, 'foreign_spec')}"],
     "not a wcdm_jax model spec", None),
    ("sample-rescale", "sample.py", ("trained",),
     lambda t, f: [f"--model={f['trained']}", "--low_rescale=0.5"],
     "--low_rescale takes two numbers", None),
    ("sample-mean-nan", "sample.py", ("trained",),
     lambda t, f: [f"--model={f['trained']}", f"--out={t}/o", "--low_mean_0=nan"],
     "mean_0 must be a finite number", lambda t, f: _no_write(f"{t}/o")),
    ("sample-flip-average-db2", "sample.py", (),
     lambda t, f: [f"--model={_model_dir(t, 'db2')}", f"--out={t}/o", "--flip_average"],
     "--flip_average: the conditional scales need a wavelet whose bands mirror",
     lambda t, f: _no_write(f"{t}/o")),
    ("sample-sigmas", "sample.py", ("trained",),
     lambda t, f: [f"--model={f['trained']}", "--noise_sigmas=x"],
     "could not convert string to float", None),
    ("sample-images", "sample.py", ("trained",),
     lambda t, f: [f"--model={f['trained']}", f"--out={t}/o", f"--images=folder:{t}/none"],
     "does not exist", lambda t, f: _no_write(f"{t}/o")),
    ("sample-image-size", "sample.py", ("trained",),
     lambda t, f: [f"--model={f['trained']}", f"--out={t}/o", "--image_size=15"],
     "--image_size=15: image size 15x15 is not divisible", lambda t, f: _no_write(f"{t}/o")),
    ("sample-overflow", "sample.py", ("huge",),
     lambda t, f: [f"--model={f['huge']}", f"--out={t}/o", "--num_samples=1",
                   "--low_max_steps=3", "--cond_max_steps=3"],
     "the samples holds NaN or inf", lambda t, f: not os.path.exists(f"{t}/o/samples.npz")),
    ("evaluate-no-models", "evaluate.py", (), lambda t, f: [], "--models", None),
    ("evaluate-names", "evaluate.py", ("trained",),
     lambda t, f: [f"--models={f['trained']}", "--names=a,b"], "one label per --models", None),
    ("evaluate-levels", "evaluate.py", ("trained",),
     lambda t, f: [f"--models={f['trained']}", "--noise_levels=x"], "--noise_levels", None),
    ("evaluate-overflow", "evaluate.py", ("huge",),
     lambda t, f: [f"--models={f['huge']}", "--num_images=2", "--noise_levels=10",
                   f"--out={t}/e"],
     "PSNRs of model 'model' holds NaN or inf", lambda t, f: _no_write(f"{t}/e")),
    ("import-nothing", "import_lcv.py", (), lambda t, f: [f"--src={t}", f"--dst={t}/d"],
     "no released models", None),
    ("import-truncated", "import_lcv.py", ("release",),
     lambda t, f: [f"--src={f['release']}/bad", f"--dst={t}/d"],
     "bad/faces_16x16_gray/RF_7x7/model.pt: not a valid tensor state_dict",
     lambda t, f: _no_write(f"{t}/d")),
    ("import-unknown-model", "import_lcv.py", ("release",),
     lambda t, f: [f"--src={f['release']}/good", f"--dst={t}/d", "--models=nope"],
     "unknown models ['nope']", None),
]


@pytest.mark.parametrize("case", CLI_CASES, ids=[c[0] for c in CLI_CASES])
def test_cli_bad_input(case, tmp_path, request):
  _, script, needs, args, message, check = case
  fixtures = {name: request.getfixturevalue(name) for name in needs}
  flags_before = None
  if "trained" in fixtures:
    flags_before = (fixtures["trained"] / "train.flags").read_text()
  res = _cli(script, *args(tmp_path, fixtures))
  assert res.returncode != 0, res.stdout[-2000:]
  assert message in res.stderr, res.stderr[-3000:]
  assert "Traceback" not in res.stderr, res.stderr[-3000:]
  if check is not None:
    assert check(tmp_path, fixtures)
  if flags_before is not None:  # a rejected rerun keeps the record of the run
    assert (fixtures["trained"] / "train.flags").read_text() == flags_before


@pytest.mark.slow
@pytest.mark.parametrize("case", [c for c in CLI_CASES if c[0] in (
    "train-wavelet", "train-changed-seed", "sample-missing-model", "import-truncated")],
                         ids=lambda c: c[0])
def test_cli_bad_input_in_a_real_process(case, tmp_path, request):
  """The same refusals from a real process: exit code 1, one line, no traceback."""
  _, script, needs, args, message, _ = case
  fixtures = {name: request.getfixturevalue(name) for name in needs}
  res = _process(script, *args(tmp_path, fixtures))
  assert res.returncode == 1 and message in res.stderr, res.stderr[-3000:]
  assert "Traceback" not in res.stderr, res.stderr[-3000:]


@pytest.mark.slow
def test_cli_changed_settings_with_override(trained, tmp_path):
  """--allow_config_change continues; the new flags are recorded, the old ones kept."""
  import shutil  # pylint: disable=g-import-not-at-top
  wd = tmp_path / "copy"
  shutil.copytree(trained, wd)
  res = _cli("train.py", f"--workdir={wd}", *TINY, "--num_steps=3", "--learning_rate=0.002",
             "--allow_config_change")
  assert res.returncode == 0, res.stderr[-2000:]
  assert "continuing with changed settings: learning_rate" in res.stdout
  assert "--learning_rate=0.002" in (wd / "train.flags").read_text()
  assert "--learning_rate=0.002" not in (wd / "train.flags.1").read_text()


@pytest.mark.slow
def test_cli_reimport_is_atomic_or_refused(release, tmp_path):
  src, dst = f"--src={release}/good", f"--dst={tmp_path}"
  assert _cli("import_lcv.py", src, dst).returncode == 0
  name = os.listdir(tmp_path)[0]
  before = wcdm_jax.load_params(str(tmp_path / name))
  res = _cli("import_lcv.py", src, dst)
  assert res.returncode != 0 and "already exist" in res.stderr and "--overwrite" in res.stderr
  # New weights in the source: --overwrite replaces the model, whole.
  path = release / "good" / "faces_16x16_gray" / "RF_7x7" / "model.pt"
  old = path.read_bytes()
  path.write_bytes(torchfile.dumps(torchfile.bfcnn_state(np.random.default_rng(1))))
  try:
    res = _cli("import_lcv.py", src, dst, "--overwrite")
  finally:
    path.write_bytes(old)
  assert res.returncode == 0, res.stderr[-2000:]
  after = wcdm_jax.load_params(str(tmp_path / name))
  assert not np.array_equal(before.low["params"]["conv_0"]["kernel"],
                            after.low["params"]["conv_0"]["kernel"])
  assert sorted(os.listdir(tmp_path)) == [name]  # no temporary directories left


def test_corpus_size():
  assert len(API_CASES) + len(CLI_CASES) >= 60


# --- images ------------------------------------------------------------------------------

def test_image_modes_decode_to_their_values(tmp_path):
  rgb = np.array([[[255, 0, 0], [0, 128, 255]]], np.uint8)  # (1, 2, 3)
  cases = {}
  Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE).save(tmp_path / "palette.png")
  cases["palette.png"] = rgb / 255.0
  Image.fromarray(np.array([[0, 65535]], np.uint16)).save(tmp_path / "grey16.png")
  cases["grey16.png"] = np.array([[[0.0], [1.0]]])
  Image.fromarray(np.array([[1000, 30000]], np.uint16)).save(tmp_path / "grey16b.png")
  cases["grey16b.png"] = np.array([[[1000 / 65535], [30000 / 65535]]])
  la = Image.fromarray(np.array([[[10, 0], [200, 255]]], np.uint8), "LA")
  la.save(tmp_path / "la.png")
  cases["la.png"] = np.array([[[10 / 255], [200 / 255]]])  # alpha dropped, not averaged in
  rgba = np.concatenate([rgb, np.array([[[0], [77]]], np.uint8)], -1)
  Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
  cases["rgba.png"] = rgb / 255.0
  Image.fromarray(rgb).convert("CMYK").save(tmp_path / "cmyk.tiff")
  cases["cmyk.tiff"] = np.asarray(Image.fromarray(rgb).convert("CMYK").convert("RGB")) / 255.0
  for name, want in cases.items():
    got = data.read_image(str(tmp_path / name))
    np.testing.assert_allclose(got, want, atol=1e-6, err_msg=name)
    # The input pipeline's fast path (8-bit RGB / grey cropped before conversion) gives the
    # same values, and every other mode takes the full decoding.
    for channels in (1, 3):
      fast = data.load_preprocessed(str(tmp_path / name), 2, channels, "none")
      np.testing.assert_allclose(fast, data.preprocess(got, 2, channels, "none"), atol=1e-6,
                                 err_msg=(name, channels))


def test_exif_orientation_is_applied(tmp_path):
  img = np.zeros((2, 3), np.uint8)
  img[0, 0] = 255
  exif = Image.Exif()
  exif[0x0112] = 6  # rotate 90 degrees clockwise to display
  Image.fromarray(img).save(tmp_path / "rot.jpg", exif=exif, quality=100)
  got = data.read_image(str(tmp_path / "rot.jpg"))
  assert got.shape == (3, 2, 1)  # displayed upright: width and height swapped
  assert got[0, -1, 0] > 0.8 and got[0, 0, 0] < 0.2


def test_corrupt_images_are_skipped_and_named(tmp_path):
  rng = np.random.default_rng(0)
  for i in range(200):
    Image.fromarray(rng.integers(0, 255, (20, 20), np.uint8)).save(tmp_path / f"{i:03d}.jpg")
  good = (tmp_path / "000.jpg").read_bytes()
  (tmp_path / "050.jpg").write_bytes(good[: len(good) // 2])  # truncated
  (tmp_path / "150.jpg").write_bytes(b"garbage")
  warnings = []
  images = data.load_folder(str(tmp_path), data.DataConfig(image_size=16, max_bad_fraction=0.02),
                            warn=warnings.append)
  assert images.shape == (198, 16, 16, 1)
  assert len(warnings) == 1 and "skipped 2 of 200" in warnings[0]
  assert "050.jpg" in warnings[0] and "150.jpg" in warnings[0]
  with pytest.raises(ValueError, match="2 of 200 images .* cannot be used"):
    data.load_folder(str(tmp_path), data.DataConfig(image_size=16, max_bad_fraction=0.005))


# --- crafted weight files: the reader never crashes and never reads outside a storage -----

def _reference(flat, offset, size, stride):
  """What a correct reader returns for an in-bounds header (element by element)."""
  out = np.empty(size, flat.dtype)
  if out.size == 0:
    return out
  for idx in np.ndindex(*size):
    out[idx] = flat[offset + sum(i * s for i, s in zip(idx, stride))]
  return out


def test_weight_reader_fuzz(tmp_path):
  rng = np.random.default_rng(0)
  flat = np.arange(24, dtype=np.float32)
  path = tmp_path / "fuzz.pt"
  outcomes = {"ok": 0, "refused": 0}
  for trial in range(300):
    ndim = int(rng.integers(0, 4))
    size = tuple(int(v) for v in rng.integers(-1, 6, ndim))
    stride = tuple(int(v) for v in rng.integers(-2, 9, ndim))
    offset = int(rng.integers(-3, 30))
    if trial % 10 == 0:
      offset = int(rng.choice([2 ** 62, -(2 ** 40)]))
    if trial % 13 == 0:
      stride = stride + (1,)  # length mismatch
    if trial % 17 == 0:
      size = (2 ** 40,) + size[1:] if size else (2 ** 40,)
    numel = 24 if trial % 7 else int(rng.integers(0, 30))  # declared storage length lies
    storage = torchfile.Storage("0", flat.tobytes(), np.float32, numel)
    blob = torchfile.dumps({"w": torchfile.Tensor(storage, offset, size, stride)})
    if trial % 5 == 0:  # byte damage anywhere in the archive
      b = bytearray(blob)
      for _ in range(int(rng.integers(1, 8))):
        b[int(rng.integers(len(b)))] = int(rng.integers(256))
      blob = bytes(b[: int(rng.integers(len(b) // 2, len(b) + 1))])
    path.write_bytes(blob)
    try:
      out = pretrained.read_state_dict(str(path))
    except pretrained.WeightFileError as e:
      assert str(path) in str(e)
      outcomes["refused"] += 1
      continue
    outcomes["ok"] += 1
    assert set(out) <= {"w"}
    if out and trial % 5:  # undamaged archive: exactly the reference values
      np.testing.assert_array_equal(out["w"], _reference(flat, offset, size, stride))
  assert outcomes["ok"] > 20 and outcomes["refused"] > 100, outcomes
