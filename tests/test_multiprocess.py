"""A real multi-process run: two processes joined by jax.distributed (CPU collectives, 2
simulated devices each) through launch/train.py's own flags train the same model as one
process with 4 devices, and their checkpoint resumes in one process to the same next step."""
import json
import os
import signal
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from conftest import REPO, cli_env, write_random_images
import wcdm_jax

TINY = ["--image_size=16", "--levels=1", "--cond_rf=5", "--low_rf=5", "--num_layers=3",
        "--low_num_layers=3", "--features=4", "--batch_size=8", "--num_steps=4",
        "--log_every=1", "--eval_every=2", "--checkpoint_every=2", "--noise_max=50",
        "--eval_fraction=0.25", "--data_workers=1", "--level_multiplier=1", "--keep_checkpoints=5",
        "--nofigure", "--eval_batch_size=4"]


_STARTED = []


@pytest.fixture(autouse=True)
def _reap():
  """Every run a test starts ends with it: its process group (the run, its input workers) is
  killed, so a failed or hung run cannot outlive its test or hold its pipes."""
  yield
  while _STARTED:
    proc = _STARTED.pop()
    if proc.poll() is None:
      os.killpg(proc.pid, signal.SIGKILL)
      proc.wait(timeout=30)


def _train(workdir, devices, *extra):
  proc = subprocess.Popen([sys.executable, os.path.join(REPO, "launch", "train.py"), *TINY,
                           f"--workdir={workdir}", *extra], env=cli_env(devices), cwd=REPO,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          start_new_session=True)
  _STARTED.append(proc)
  return proc


def _finish(proc, timeout=240, ok=True):
  try:
    out, _ = proc.communicate(timeout=timeout)
  except subprocess.TimeoutExpired:
    os.killpg(proc.pid, signal.SIGKILL)
    raise
  assert not ok or proc.returncode == 0, out[-3000:]
  return out


def _free_port():
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _max_diff(a, b):
  return max(jax.tree.leaves(jax.tree.map(
      lambda x, y: float(np.max(np.abs(np.asarray(x) - np.asarray(y)))), a, b)))


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
  return write_random_images(tmp_path_factory.mktemp("images"), 24)


@pytest.mark.slow
def test_two_processes_equal_one(folder, tmp_path):
  data = f"--data=folder:{folder}"
  single = _train(tmp_path / "single", 4, data)
  _finish(single)
  port = _free_port()
  multi = tmp_path / "multi"
  procs = [_train(multi, 2, data, f"--coordinator_address=localhost:{port}",
                  "--num_processes=2", f"--process_id={i}", "--stop_after=2") for i in (0, 1)]
  logs = [_finish(p) for p in procs]
  # Each process read only its half of every global batch of 8.
  assert "process 0 reads rows 0:4" in logs[0] and "process 1 reads rows 4:8" in logs[1]
  assert "process 1 of 2" in logs[1] and "4 in all" in logs[0]
  # The two processes' step-2 checkpoint is the single process's.
  two = wcdm_jax.load_params(str(multi), step=2)
  one = wcdm_jax.load_params(str(tmp_path / "single"), step=2)
  assert _max_diff(two, one) < 1e-5
  rows = [json.loads(l) for l in (multi / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in rows if "low/loss" in r] == [1, 2]  # process 0 writes, once
  # Resumed in one process (4 devices), it reaches the single run's step 4.
  out = _finish(_train(multi, 4, data))
  assert "resumed at step 2" in out
  assert _max_diff(wcdm_jax.load_params(str(multi)),
                   wcdm_jax.load_params(str(tmp_path / "single"))) < 1e-5


@pytest.mark.parametrize("args,match", [
    (["--num_processes=2"], "give all of"),
    (["--coordinator_address=localhost:1", "--num_processes=2", "--process_id=2"],
     "must be < --num_processes"),
])
@pytest.mark.slow
def test_bad_distributed_flags(tmp_path, args, match):
  proc = _train(tmp_path / "wd", 1, *args)
  out = _finish(proc, timeout=120, ok=False)
  assert proc.returncode != 0 and match in out and "Traceback" not in out
  assert not (tmp_path / "wd").exists()


def test_cluster_detection():
  sys.path.insert(0, REPO)
  from launch import common  # pylint: disable=g-import-not-at-top
  assert not common.cluster_detected({})
  assert not common.cluster_detected({"SLURM_NTASKS": "1", "OMPI_COMM_WORLD_SIZE": "1"})
  assert common.cluster_detected({"SLURM_NTASKS": "4"})
  assert common.cluster_detected({"OMPI_COMM_WORLD_SIZE": "2"})
  assert common.cluster_detected({"TPU_WORKER_HOSTNAMES": "t0,t1"})
  assert not common.cluster_detected({"TPU_WORKER_HOSTNAMES": "localhost"})
