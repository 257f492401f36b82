"""launch/sample.py, launch/evaluate.py and launch/import_lcv.py end to end on tiny models."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO, shared_path
from wcdm_jax import data, models, trainer, training


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
  wd = str(tmp_path_factory.mktemp("tiny"))
  spec = models.multiscale_spec(1, cond_rf=5, low_rf=5, image_size=(16, 16), num_layers=3,
                                low_num_layers=3, features=4)
  cfg = training.TrainConfig(batch_size=4, num_steps=2, level_multiplier=1)
  trainer.train(spec, data.DataConfig(image_size=16), cfg,
                trainer.RunConfig(wd, eval_batch_size=4, noise_scale_batches=1, figure=False),
                log=lambda m: None)
  return wd


def _run(script, *args, timeout=300):
  env = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu")
  res = subprocess.run([sys.executable, os.path.join(REPO, "launch", script), *args],
                       capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO)
  assert res.returncode == 0, res.stderr[-3000:]
  return res


def test_sample_tool(tiny_model, tmp_path):
  res = _run("sample.py", f"--model={tiny_model}", f"--out={tmp_path}", "--num_samples=2",
             "--low_max_steps=10", "--cond_max_steps=10", "--images=embedded", "--num_images=2",
             "--low_rescale=0,0.8")
  assert "images/min" in res.stdout
  for f in ("samples.png", "progression.png", "superres.png", "denoising.png", "samples.npz"):
    assert (tmp_path / f).exists(), f
  arrays = np.load(tmp_path / "samples.npz")
  assert arrays["samples"].shape == (2, 16, 16, 1)
  assert arrays["super_resolved"].shape == (2, 16, 16, 1) and arrays["low_res"].shape == (2, 8, 8, 1)


def test_evaluate_tool(tiny_model, tmp_path):
  _run("evaluate.py", f"--models={tiny_model},{tiny_model}", "--names=a,b", "--images=embedded",
       "--num_images=4", "--noise_levels=10,50", f"--out={tmp_path}", "--filters")
  with open(tmp_path / "psnr.json") as f:
    out = json.load(f)
  a, b = out["models"]["a"], out["models"]["b"]
  assert a["psnr_out"] == b["psnr_out"]  # fixed noise seeds: same model, same numbers
  assert a["psnr_in"][0] == pytest.approx(20 * np.log10(255 / 10), abs=0.3)
  assert (tmp_path / "psnr.png").exists() and (tmp_path / "filters.png").exists()


def test_import_tool(tmp_path):
  src = shared_path("reference", "lcv-denoisers")
  _run("import_lcv.py", f"--src={src}", f"--dst={tmp_path}",
       "--models=flat_celebA_160x160_gray_rf5,ms_celebA_160x160_gray_rf9")
  assert sorted(os.listdir(tmp_path)) == ["flat_celebA_160x160_gray_rf5", "ms_celebA_160x160_gray_rf9"]
  import wcdm_jax  # pylint: disable=g-import-not-at-top
  p = wcdm_jax.load_params(str(tmp_path / "ms_celebA_160x160_gray_rf9"))
  assert p.spec.levels == 2 and p.spec.conditionals[0].rf == 9
