"""launch/reproduce.py end to end at toy size: every stage, the files it writes, sane numbers."""
import json
import os
import subprocess
import sys

import pytest

import numpy as np
from PIL import Image

import cli
from conftest import REPO, cli_env


@pytest.mark.slow
def test_reproduce_toy(tmp_path):
  rng = np.random.default_rng(0)
  images = tmp_path / "images"
  images.mkdir()
  for i in range(40):  # smooth colour images: something to learn in a few steps
    img = np.kron(rng.random((4, 4, 3)), np.ones((5, 5, 1)))
    Image.fromarray((np.clip(img, 0, 1) * 255).astype(np.uint8)).save(images / f"{i:03d}.png")
  wd = tmp_path / "repro"
  env = cli_env()
  res = subprocess.run(
      [sys.executable, os.path.join(REPO, "launch", "reproduce.py"), f"--workdir={wd}",
       f"--data=folder:{images}", "--crop=center", "--image_size=16", "--levels=1",
       "--small_rf=5", "--large_rf=7", "--low_rf=5", "--num_layers=3", "--low_num_layers=3",
       "--features=8", "--batch_size=8", "--num_steps=30",
       "--colour_steps=6", "--colour_num_layers=4", "--colour_low_num_layers=2", "--eval_images=4",
       "--noise_levels=0,20,260,640",
       "--colour_samples=2", "--low_max_steps=10", "--log_every=10", "--eval_every=15",
       "--checkpoint_every=30"], capture_output=True, text=True, timeout=600, env=env, cwd=REPO)
  assert res.returncode == 0, res.stderr[-3000:] + res.stdout[-3000:]
  for f in ("reproduce.flags", "results.md", "eval/psnr.json", "eval/psnr.png",
            "eval_colour/psnr.json", "curves.png", "summary.json", "colour_ms_rf5/samples/samples.png",
            "colour_ms_rf5/samples/denoising.png", "colour_ms_rf5/samples/superres.png",
            "colour_ms_rf5/samples/denoised_samples.png", "ms_rf5/samples/samples.png",
            "ms_rf7/low", "logs/ms_large.log"):
    assert (wd / f).exists(), f
  with open(wd / "eval" / "psnr.json") as f:
    models = json.load(f)["models"]
  assert sorted(models) == ["best Gaussian filter", "flat_rf5", "flat_rf7", "ms_rf5", "ms_rf7"]
  assert models["best Gaussian filter"]["kind"] == "baseline"
  assert "| best Gaussian filter |" in (wd / "results.md").read_text()
  for name, m in models.items():
    out, pin = np.asarray(m["psnr_out"]), np.asarray(m["psnr_in"])
    assert np.all(np.isfinite(out)), name
    # at high noise a toy net returns about its input: not worse than it by more than 0.05 dB
    assert np.all(out[-2:] > pin[-2:] - 0.05), (name, out, pin)
  summary = json.load(open(wd / "summary.json"))
  assert [type(c["held"]) for c in summary["claims"]] == [bool] * 3
  assert summary["budget"]["images_per_net"] == 240
  # The budget comparison: this run and a (relabelled) copy of its summary as a smaller budget.
  small = tmp_path / "repro_small"
  small.mkdir()
  summary["budget"]["images_per_net"] = 120
  (small / "summary.json").write_text(json.dumps(summary))
  res = cli.run("reproduce.py", f"--workdir={wd}", f"--data=folder:{images}",
                "--stages=budgets", f"--budget_runs={small}")
  assert res.returncode == 0, res.stderr[-3000:]
  table = (wd / "budgets.md").read_text().splitlines()
  assert table[2].startswith("| 120 |") and table[3].startswith("| 240 |"), table
  assert (wd / "budgets.png").exists()
  # Bad budget runs: a one-line error naming the file, the table left as it was.
  (small / "summary.json").write_text("{not json")
  missing = tmp_path / "no_such_run"
  for runs, message in [(small, "is not a summary.json"), (missing, "does not exist"),
                        (wd, "two runs with 240 images per net")]:
    res = cli.run("reproduce.py", f"--workdir={wd}", f"--data=folder:{images}",
                  "--stages=budgets", f"--budget_runs={runs}")
    assert res.returncode == 1 and message in res.stderr, res.stderr[-2000:]
    assert "Traceback" not in res.stderr
  assert (wd / "budgets.md").read_text().splitlines() == table
  assert "final cond0" in (wd / "logs" / "ms_large.log").read_text()  # the stage's own log
  assert "--small_rf=5" in (wd / "ms_rf5" / "reproduce.flags").read_text()  # each model's record
  spec = json.loads((wd / "colour_ms_rf5" / "spec.json").read_text())  # --colour_num_layers
  assert [len(c["kernel_sizes"]) for c in spec["conditionals"]] == [4]
  assert spec["low"]["kernel_sizes"] == [3, 3]  # --colour_low_num_layers: all 3x3
  grey_low = json.loads((wd / "ms_rf5" / "spec.json").read_text())["low"]["kernel_sizes"]
  assert len(grey_low) == 3
  assert len(json.loads((wd / "ms_rf5" / "spec.json").read_text())["conditionals"][0][
      "kernel_sizes"]) == 3
  colour = np.load(wd / "colour_ms_rf5" / "samples" / "samples.npz")
  assert colour["samples"].shape == (2, 16, 16, 3)
  # Colour end to end: the channels of the clean images differ, and so do the denoised ones.
  den = colour["denoised_0.1"]
  assert np.abs(den[..., 0] - den[..., 1]).mean() > 0.01
