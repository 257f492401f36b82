"""Smoke tests of the benchmark scripts at tiny sizes (figures themselves come from the scripts)."""
import os
import subprocess
import sys

import pytest

from conftest import REPO


def _run(script, *args):
  env = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu")
  res = subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", script), *args],
                       capture_output=True, text=True, timeout=600, env=env, cwd=REPO)
  assert res.returncode == 0, res.stderr[-3000:]
  return res.stdout


def test_memory_benchmark_runs_and_remat_saves():
  out = _run("bench_memory.py", "--batch=8", "--size=32")
  assert "remat" in out and "less" in out


def test_net_benchmark_runs():
  pytest.importorskip("torch")
  out = _run("bench_nets.py", "--cases=cond9", "--repeats=1", "--tiny")
  assert "pytorch" in out and "jax/xla" in out and "jax/auto" in out


def test_sampling_benchmark_runs():
  pytest.importorskip("torch")
  out = _run("bench_sampling.py", "--batch=2", "--low_steps=3", "--cond_steps=2", "--repeats=1")
  assert "PyTorch, one image at a time" in out and "GFLOP/s" in out
