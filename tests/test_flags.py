"""launch/train.py flags: a flagfile round-trip, and clear errors for bad values."""
import os

import pytest

import cli
from conftest import REPO
from wcdm_jax import conv, training

TINY = ["--image_size=16", "--levels=1", "--cond_rf=5", "--low_rf=5", "--num_layers=3",
        "--low_num_layers=3", "--features=4", "--batch_size=4", "--num_steps=2",
        "--log_every=1", "--eval_every=2", "--noise_max=50"]


def _train(*args):
  return cli.run("train.py", *args)


@pytest.mark.slow
def test_flagfile_round_trip(tmp_path):
  wd = tmp_path / "run"
  flagfile = tmp_path / "tiny.flags"
  flagfile.write_text("# python launch/train.py --flagfile=tiny.flags\n" +
                      "\n".join(TINY + [f"--workdir={wd}"]) + "\n")
  res = _train(f"--flagfile={flagfile}")
  assert res.returncode == 0, res.stderr[-3000:]
  assert "per-scale PSNR" in res.stdout
  # The final comparison, with the error of each scale (model / noisy / Gaussian).
  assert res.stdout.count("held-out denoising, sigma") == 4
  assert res.stdout.count("its squared error by scale") == 4 and "cond0 " in res.stdout
  saved = (wd / "train.flags").read_text()
  for flag in TINY:
    assert flag in saved
  assert (wd / "metrics.jsonl").exists() and (wd / "denoising.png").exists()
  # The saved flags reproduce the run: resuming finds everything done and changes nothing.
  res2 = _train(f"--flagfile={wd / 'train.flags'}")
  assert res2.returncode == 0, res2.stderr[-3000:]
  assert "resumed at step 2" in res2.stdout


@pytest.mark.parametrize("args,message", [
    (["--no_such_flag=1"], "Unknown command line flag 'no_such_flag'"),
    (["--batch_size=-3"], "batch_size"),
    (["--conv_impl=cuda"], f"value should be one of <{'|'.join(conv.CONV_IMPLS)}>"),
    (["--loss_weighting=l1"], f"value should be one of <{'|'.join(training.LOSS_WEIGHTINGS)}>"),
    (["--cond_rf=8"], "receptive field 8 is impossible"),
    (["--image_size=18", "--levels=2"], "crop to 16x16 or pad to 20x20"),
    # The model's shape is models.ModelConfig: its own message, naming the flag.
    (["--features=0"], "--features=0: features must be >= 1"),
    (["--levels=-1"], "--levels=-1: levels must be >= 0"),
    (["--wavelet_mode=wrap"], "value should be one of <periodization|symmetric|reflect|zero>"),
])
def test_bad_flags_fail_clearly(tmp_path, args, message):
  res = _train(f"--workdir={tmp_path}", *TINY, *args)
  assert res.returncode != 0
  assert message in res.stderr, res.stderr[-2000:]


@pytest.mark.parametrize("name", sorted(os.listdir(os.path.join(REPO, "launch", "configs"))))
def test_every_flagfile_names_its_command_and_parses(name, tmp_path):
  path = os.path.join(REPO, "launch", "configs", name)
  first = open(path).readline()
  assert first.startswith("# python launch/") and f"--flagfile=launch/configs/{name}" in first
  if first.startswith("# python launch/train.py"):
    res = _train(f"--flagfile={path}", f"--workdir={tmp_path}", "--dry_run")
    assert res.returncode == 0, res.stderr[-2000:]
    assert "cond0: RF" in res.stdout or "low: RF" in res.stdout
  else:  # its command, parsed against the script's own flag definitions (names, types, enums)
    script, *args = first.split()[2:]
    cli.parse(os.path.basename(script), *args)


def test_scaled_flags_are_read_in_their_unit():
  """A setting declared with scale=255 takes its flag in /255 and its field in [0, 1] units."""
  from absl import flags
  from launch import flagdefs
  from wcdm_jax import likelihood
  fv = flags.FlagValues()
  flagdefs.define(likelihood.LikelihoodConfig, prefix="nll_", flag_values=fv, module_name="t")
  assert fv["nll_sigma_min"].default == 0.25 and fv["nll_sigma_max"].default == 255.0
  fv(["prog", "--nll_sigma_min=0.5", "--nll_bins=0", "--nll_evals=8"])
  cls = likelihood.LikelihoodConfig
  cfg = flagdefs.build(cls, flagdefs.overrides(cls, prefix="nll_", flag_values=fv),
                       flagdefs.flag_names(cls, "nll_"))
  assert cfg.sigma_min == pytest.approx(0.5 / 255) and cfg.sigma_max == pytest.approx(1.0)
  assert cfg.bins == 0 and cfg.num_evals == 8 and cfg.replicas == 4
  fv.unparse_flags()
  fv(["prog", "--nll_sigma_min=300"])  # above sigma_max: the config's message, naming the flag
  with pytest.raises(ValueError, match=r"--nll_sigma_min=.*sigma_min < sigma_max"):
    flagdefs.build(cls, flagdefs.overrides(cls, prefix="nll_", flag_values=fv),
                   flagdefs.flag_names(cls, "nll_"))
