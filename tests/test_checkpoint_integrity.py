"""Corrupt checkpoints are detected, skipped with a message and never used; NaN is never saved."""
import glob
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

import wcdm_jax
from wcdm_jax import checkpoints, data, models, trainer, training

SPEC = models.multiscale_spec(1, cond_rf=5, low_rf=5, image_size=(16, 16), num_layers=3,
                              low_num_layers=3, features=4)
CFG = training.TrainConfig(batch_size=4, num_steps=6, level_multiplier=1)
DATA = data.DataConfig(image_size=16)


def _run(wd, cfg=CFG, log=None, allow_config_change=False):
  run = trainer.RunConfig(str(wd), eval_batch_size=4, noise_scale_batches=1, figure=False,
                          checkpoint_every=2, keep_checkpoints=3,
                          allow_config_change=allow_config_change)
  return trainer.train(SPEC, DATA, cfg, run, log=log or (lambda m: None))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  wd = tmp_path_factory.mktemp("ckpt") / "run"
  _run(wd)
  return wd


def _data_files(step_dir):
  return sorted((f for f in glob.glob(os.path.join(step_dir, "model", "**", "d", "*"),
                                      recursive=True) if os.path.isfile(f)),
                key=os.path.getsize)


def _corrupt(wd, how):
  step = os.path.join(wd, "low", "6")
  if how == "truncate":
    for f in _data_files(step):
      with open(f, "r+b") as fh:
        fh.truncate(os.path.getsize(f) // 2)
  elif how == "flip":  # a few flipped bytes in the middle of every data file
    for f in _data_files(step):
      b = bytearray(open(f, "rb").read())
      for i in range(len(b) // 2, len(b) // 2 + 4):
        b[i] ^= 0xFF
      open(f, "wb").write(bytes(b))
  elif how == "delete":
    shutil.rmtree(os.path.join(step, "model"))
    shutil.rmtree(os.path.join(step, "state"))
  elif how == "meta":
    with open(os.path.join(step, "meta", "metadata"), "w") as f:
      f.write("{not json")
  elif how == "nan":  # a well-formed step whose values are NaN (no checksum: written by hand)
    shutil.rmtree(step)
    mngr = checkpoints.manager(str(wd), "low", async_save=False)
    good = wcdm_jax.load_params(str(wd), step=4).low
    nan = jax.tree.map(lambda a: np.full_like(a, np.nan), good)
    mngr.save(6, args=ocp.args.Composite(model=ocp.args.StandardSave(nan),
                                         meta=ocp.args.JsonSave({"net": "low"})))
    mngr.wait_until_finished()
    mngr.close()


@pytest.mark.parametrize("how", ["truncate", "flip", "delete", "meta", "nan"])
def test_corrupt_latest_step_falls_back(trained, tmp_path, how):
  wd = tmp_path / "run"
  shutil.copytree(trained, wd)
  want = checkpoints.restore_intact(checkpoints.manager(str(wd), "low"), {"state": _target()})
  assert want[2] == 6
  _corrupt(wd, how)
  warnings = []
  params = wcdm_jax.load_params(str(wd), warn=warnings.append)
  assert len(warnings) == 1 and "net 'low'" in warnings[0] and "skipped step 6" in warnings[0]
  assert "using step 4" in warnings[0]
  step4 = wcdm_jax.load_params(str(wd), step=4)
  jax.tree.map(np.testing.assert_array_equal, params.low, step4.low)
  if how == "truncate":  # step 0 is a valid request; this run has no checkpoint there
    with pytest.raises(FileNotFoundError, match="has no step 0; it has"):
      wcdm_jax.load_params(str(wd), step=0)
  # Resuming skips the bad step, keeps it aside, and ends where the intact run ended.
  logs = []
  _run(wd, log=logs.append)
  assert any("low: skipping checkpoint step 6" in m for m in logs), logs
  assert any("low: resumed at step 4" in m for m in logs), logs
  assert os.path.isdir(os.path.join(wd, "low.corrupt", "6"))
  again = checkpoints.restore_intact(checkpoints.manager(str(wd), "low"), {"state": _target()})
  assert again[2] == 6 and again[1]["checksums"] == want[1]["checksums"]


def _target():
  net = SPEC.nets["low"]
  tx = training.make_optimizer(SPEC, "low", CFG)
  return training.init_state(jax.random.key(0), net, tx, CFG).as_dict()


def test_no_intact_step_is_a_clear_error(trained, tmp_path):
  wd = tmp_path / "run"
  shutil.copytree(trained, wd)
  for step in ("2", "4", "6"):
    with open(os.path.join(wd, "cond0", step, "meta", "metadata"), "w") as f:
      f.write("garbage")
  with pytest.raises(checkpoints.CheckpointError,
                     match=r"net 'cond0' .*no intact checkpoint .*step 6: .*step 4: .*step 2: "):
    wcdm_jax.load_params(str(wd))
  with pytest.raises(checkpoints.CheckpointError, match="Move .*cond0 aside"):
    _run(wd)


def test_non_finite_training_stops_without_saving(trained, tmp_path):
  wd = tmp_path / "run"
  shutil.copytree(trained, wd)
  cfg = training.TrainConfig(batch_size=4, num_steps=10, level_multiplier=1,
                             learning_rate=float("inf"))
  with pytest.raises(checkpoints.NonFiniteError, match=r"net 'low': .*step 6 is saved"):
    _run(wd, cfg, allow_config_change=True)
  mngr = checkpoints.manager(str(wd), "low")
  assert mngr.latest_step() == 6  # nothing after the last good step; the good ones kept


def test_save_refuses_non_finite(tmp_path):
  mngr = checkpoints.manager(str(tmp_path), "low", async_save=False)
  with pytest.raises(checkpoints.NonFiniteError, match="refusing to save step 3"):
    checkpoints.save(mngr, 3, None, {}, model={"w": jnp.array([1.0, jnp.inf])})
  assert mngr.latest_step() is None
