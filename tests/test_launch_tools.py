"""launch/sample.py, launch/evaluate.py and launch/import_lcv.py end to end on tiny models."""
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import cli
from conftest import REPO, shared_path
import wcdm_jax
from wcdm_jax import data, evaluation, models, trainer, training


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
  """A small J = 1 model trained enough to denoise (60 steps at a constant learning rate: the
  paper's recipe, whose first halving comes later, denoises soonest at such a budget)."""
  wd = str(tmp_path_factory.mktemp("tiny"))
  spec = models.multiscale_spec(1, cond_rf=5, low_rf=5, image_size=(16, 16), num_layers=3,
                                low_num_layers=3, features=8)
  cfg = training.TrainConfig.from_recipe("paper", batch_size=16, num_steps=60,
                                         level_multiplier=1, learning_rate=3e-3, noise_max=128)
  trainer.train(spec, data.DataConfig(image_size=16), cfg,
                trainer.RunConfig(wd, eval_batch_size=4, noise_scale_batches=1, figure=False),
                log=lambda m: None)
  return wd


def _run(script, *args):
  res = cli.run(script, *args)
  assert res.returncode == 0, res.stderr[-3000:]
  return res


def test_sample_tool(tiny_model, tmp_path):
  res = _run("sample.py", f"--model={tiny_model}", f"--out={tmp_path}", "--num_samples=2",
             "--low_max_steps=10", "--cond_max_steps=10", "--images=embedded", "--num_images=2",
             "--low_rescale=0,0.8")
  assert "images/min" in res.stdout
  for f in ("samples.png", "progression.png", "superres.png", "denoising.png", "samples.npz"):
    assert (tmp_path / f).exists(), f
  # 10 steps cannot bring sigma from 1 to sigma_L: every scale of every sample hit the cap,
  # and the log and samples.json say so instead of presenting the results as converged.
  with open(tmp_path / "samples.json") as f:
    summary = json.load(f)
  for what, names in (("sampling", ["low-pass", "level 0"]), ("super-resolution x2", ["level 0"])):
    assert [s["scale"] for s in summary[what]] == names
    for s in summary[what]:
      assert s["steps"] == [10, 10] and s["hit_step_cap"] == 2 and s["converged"] == 0, s
  assert "2 of 2 hit the step cap 10 before sigma_L" in res.stdout
  assert "NOT converged" in res.stdout and res.stdout.count("did not converge") == 2
  assert [d["sigma"] for d in summary["denoising"]] == [0.1, 0.2]
  a = np.load(tmp_path / "samples.npz")
  assert a["samples"].shape == (2, 16, 16, 1)
  assert a["super_resolved"].shape == (2, 16, 16, 1) and a["low_res"].shape == (2, 8, 8, 1)
  # By value: the low-pass given is the clean images' and super-resolution keeps it exactly;
  np.testing.assert_allclose(a["low_res"], wcdm_jax.decompose(a["clean"], 1).low, atol=1e-6)
  np.testing.assert_allclose(wcdm_jax.decompose(a["super_resolved"], 1).low, a["low_res"],
                             atol=1e-5)
  # the sampled low-pass was min-max rescaled to [0, 0.8] before the details;
  low = a["scale_0"].reshape(2, -1)
  np.testing.assert_allclose(low.min(1), 0.0, atol=1e-6)
  np.testing.assert_allclose(low.max(1), 0.8, atol=1e-6)
  # the trained model's denoising improves PSNR.
  for s in ("0.1", "0.2"):
    assert _psnr(a[f"denoised_{s}"], a["clean"]) > _psnr(a[f"noisy_{s}"], a["clean"]) + 1.0


def test_sample_with_the_flow_then_judge_by_swd(tiny_model, tmp_path):
  """--low_sampler/--cond_sampler=flow: every sample takes the schedule's steps; then
  evaluate.py --swd_samples scores the set against real images."""
  res = _run("sample.py", f"--model={tiny_model}", f"--out={tmp_path}", "--num_samples=4",
             "--low_sampler=flow", "--low_flow_num_steps=5", "--cond_sampler=flow",
             "--cond_flow_num_steps=4", "--cond_flow_method=euler")
  with open(tmp_path / "samples.json") as f:
    summary = json.load(f)
  assert [s["steps"] for s in summary["sampling"]] == [[4] * 4, [3] * 4]
  assert all(s["converged"] == 4 for s in summary["sampling"])
  assert "did not converge" not in res.stdout
  out = tmp_path / "eval"
  res = _run("evaluate.py", f"--swd_samples={tmp_path / 'samples.npz'}", "--images=deadleaves",
             "--num_images=8", "--swd_patches=512", "--swd_directions=16", "--swd_bootstrap=4",
             "--layout_components=2", f"--out={out}")
  with open(out / "swd.json") as f:
    swd = json.load(f)["sets"][str(tmp_path / "samples.npz")]
  assert swd["levels"] == [[16, 16]] and swd["swd"] > 0 and len(swd["swd_ci"]) == 2
  assert swd["layout"] > 0 and len(swd["layout_ci"]) == 2 and 0 < swd["layout_residual"] < 1
  assert "SWD x1e3" in res.stdout and "layout x1e3" in res.stdout
  bad = cli.run("evaluate.py", f"--swd_samples={tmp_path / 'samples.npz'}",
                "--images=deadleaves", "--num_images=8", f"--out={out}")
  assert bad.returncode == 1 and "--layout_components=16 needs at least 34" in bad.stderr
  bad = cli.run("evaluate.py", f"--swd_samples={tmp_path / 'samples.json'}")
  assert bad.returncode == 1 and "not a samples.npz" in bad.stderr
  bad = cli.run("sample.py", f"--model={tiny_model}", "--low_sampler=flow",
                "--low_flow_num_steps=1")
  assert bad.returncode != 0 and "--low_flow_num_steps=1: num_steps must be >= 2" in bad.stderr


def test_sample_tool_uses_the_models_recommendation(tiny_model, tmp_path):
  """A model directory with sampling.json samples with it when no sampler flag is given."""
  import shutil
  from wcdm_jax import checkpoints, sampling
  model = tmp_path / "model"
  shutil.copytree(tiny_model, model)
  flow = sampling.FlowConfig(num_steps=4, mean_0=0.5)
  checkpoints.write_sampling(str(model), sampling.Recommended(flow, (flow,), (0.0, 0.5)))
  res = _run("sample.py", f"--model={model}", f"--out={tmp_path / 'a'}", "--num_samples=2")
  assert "recommends its sampling settings" in res.stdout
  with open(tmp_path / "a" / "samples.json") as f:
    assert [s["steps"] for s in json.load(f)["sampling"]] == [[3, 3], [3, 3]]
  low = np.load(tmp_path / "a" / "samples.npz")["scale_0"].reshape(2, -1)
  np.testing.assert_allclose(low.max(1), 0.5, atol=1e-6)
  # A flag of a scale overrides the recommendation for that scale only.
  _run("sample.py", f"--model={model}", f"--out={tmp_path / 'b'}", "--num_samples=2",
       "--low_max_steps=5", "--nolow_ascending", "--low_rescale=0,0.8")
  with open(tmp_path / "b" / "samples.json") as f:
    assert [s["steps"] for s in json.load(f)["sampling"]] == [[5, 5], [3, 3]]


def _psnr(x, ref):
  mse = np.mean((np.asarray(x, np.float64) - ref) ** 2, axis=(1, 2, 3))
  return float(np.mean(10 * np.log10(1.0 / mse)))


@pytest.mark.slow
def test_evaluate_tool(tiny_model, tmp_path):
  _run("evaluate.py", f"--models={tiny_model},{tiny_model}", "--names=a,b", "--images=embedded",
       "--num_images=4", "--noise_levels=10,50", f"--out={tmp_path}", "--filters")
  with open(tmp_path / "psnr.json") as f:
    out = json.load(f)
  a, b = out["models"]["a"], out["models"]["b"]
  assert a["psnr_out"] == b["psnr_out"]  # fixed noise seeds: same model, same numbers
  assert a["psnr_in"][0] == pytest.approx(20 * np.log10(255 / 10), abs=0.3)
  # By value: the tool's numbers are wcdm_jax.denoise's on the documented noise draws.
  params = wcdm_jax.load_params(tiny_model)
  images = data.make_source(data.DataConfig(image_size=16, eval_fraction=0.0, flips=False), 4,
                            0, "eval").batch(0)
  for i, sigma in enumerate((10 / 255, 50 / 255)):
    key = jax.random.fold_in(jax.random.fold_in(jax.random.key(0), i), 0)
    noisy = images + sigma * np.asarray(jax.random.normal(key, images.shape))
    den = np.asarray(wcdm_jax.denoise(params, jnp.asarray(noisy)))
    assert a["psnr_in"][i] == pytest.approx(_psnr(noisy, images), abs=1e-3)
    assert a["psnr_out"][i] == pytest.approx(_psnr(den, images), abs=1e-3)
    # The baseline: the best of the Gaussian widths on the same draws, by value.
    g = out["models"]["best Gaussian filter"]
    best = max(_psnr(np.asarray(evaluation.gaussian_blur(jnp.asarray(noisy), w)), images)
               for w in evaluation.GAUSSIAN_WIDTHS)
    assert g["psnr_out"][i] == pytest.approx(best, abs=1e-3) and g["kind"] == "baseline"
    assert g["width"][i] in evaluation.GAUSSIAN_WIDTHS
  assert a["psnr_out"][1] > a["psnr_in"][1] + 1.0  # a trained model denoises
  assert (tmp_path / "psnr.png").exists() and (tmp_path / "filters.png").exists()
  # --split=train: crops of the training share instead, the same draws otherwise.
  _run("evaluate.py", f"--models={tiny_model}", "--names=a", "--images=embedded",
       "--num_images=4", "--noise_levels=10,50", f"--out={tmp_path / 'train'}", "--split=train",
       "--nogaussian")
  with open(tmp_path / "train" / "psnr.json") as f:
    train = json.load(f)
  assert list(train["models"]) == ["a"] and train["split"] == "train"
  assert train["models"]["a"]["psnr_out"] != a["psnr_out"]


def test_evaluate_nll(tiny_model, tmp_path):
  """--nll: bits per pixel per model with its terms; by value equal to the library's."""
  _run("evaluate.py", f"--models={tiny_model}", "--names=m", "--images=embedded",
       "--num_images=3", "--nll", "--nopsnr", "--nll_evals=4", "--nll_replicas=2",
       "--batch_size=2", f"--out={tmp_path}")
  assert not (tmp_path / "psnr.json").exists() and (tmp_path / "nll.png").exists()
  with open(tmp_path / "nll.json") as f:
    m = json.load(f)["models"]["m"]
  assert sorted(m["scales"]) == ["cond0", "dequantization", "log_det", "low"]
  assert m["num_images"] == 3 and m["mc_stderr"] > 0
  assert m["bits_per_pixel"] == pytest.approx(sum(m["scales"].values()), rel=1e-6)
  sys.path.insert(0, REPO)
  from launch import common  # pylint: disable=g-import-not-at-top
  images = common.load_images("embedded", 16, 1, "none", 3)
  cfg = wcdm_jax.LikelihoodConfig(num_evals=4, replicas=2, sigma_max=1.0)
  ref = wcdm_jax.likelihood.dataset_log_prob(wcdm_jax.load_params(tiny_model), images,
                                             config=cfg, batch_size=3)  # batch size: no effect
  assert m["per_image"] == pytest.approx(ref["per_image"], rel=1e-5)


def test_import_tool(tmp_path):
  src = shared_path("reference", "lcv-denoisers")
  _run("import_lcv.py", f"--src={src}", f"--dst={tmp_path}",
       "--models=flat_celebA_160x160_gray_rf5,ms_celebA_160x160_gray_rf9")
  assert sorted(os.listdir(tmp_path)) == ["flat_celebA_160x160_gray_rf5", "ms_celebA_160x160_gray_rf9"]
  p = wcdm_jax.load_params(str(tmp_path / "ms_celebA_160x160_gray_rf9"))
  assert p.spec.levels == 2 and p.spec.conditionals[0].rf == 9
