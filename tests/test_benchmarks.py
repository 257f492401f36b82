"""Smoke tests of the benchmark scripts at tiny sizes (figures themselves come from the scripts)."""
import os
import subprocess
import sys

import pytest

from conftest import REPO, cli_env


def _run(script, *args):
  env = cli_env()
  res = subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", script), *args],
                       capture_output=True, text=True, timeout=600, env=env, cwd=REPO)
  assert res.returncode == 0, res.stderr[-3000:]
  return res.stdout


@pytest.mark.slow
def test_memory_benchmark_runs_and_remat_saves():
  out = _run("bench_memory.py", "--batch=8", "--size=32")
  assert "remat" in out and "less" in out


@pytest.mark.slow
def test_net_benchmark_runs():
  pytest.importorskip("torch")
  out = _run("bench_nets.py", "--cases=cond9", "--repeats=1", "--tiny")
  assert "pytorch" in out and "jax/xla" in out and "jax/auto" in out


@pytest.mark.slow
def test_sampling_benchmark_runs():
  pytest.importorskip("torch")
  out = _run("bench_sampling.py", "--batch=2", "--low_steps=3", "--cond_steps=2", "--repeats=1")
  assert "PyTorch, one image at a time" in out and "GFLOP/s" in out


@pytest.mark.slow
def test_likelihood_benchmark_runs():
  out = _run("bench_likelihood.py", "--tiny", "--num_evals=4", "--batch=2", "--repeats=1")
  assert "images/min" in out and "ms_celebA_160x160_gray_rf13 (random)" in out


@pytest.mark.slow
def test_accelerator_check_tiny():
  env = cli_env(PYTHON=sys.executable)
  res = subprocess.run(["bash", os.path.join(REPO, "benchmarks", "accelerator_check.sh"),
                        "--tiny", "--folder=/nonexistent"], capture_output=True, text=True,
                       timeout=300, env=env, cwd=REPO)
  assert res.returncode == 0, res.stderr[-3000:]
  for what in ("train step, float32", "train step, bfloat16", "MFU", "input pipeline",
               "synthesis", "scaling, float32: 1 devices", "MiB communicated per step"):
    assert what in res.stdout, what


@pytest.mark.slow
def test_scaling_benchmark_reads_the_compiled_steps():
  """bench_scaling's table: every net's step on 2 and 4 simulated devices moves about the
  gradients' bytes (ratio to the lower bound <= 2) with all-reduces only, and its FLOPs per
  device fall with the device count."""
  out = _run("bench_scaling.py", "--tiny", "--devices=1,2,4")
  rows = [l.split() for l in out.splitlines() if l.split()[:1] in (["low"], ["cond0"], ["cond1"])]
  assert len(rows) == 9, out
  for row in rows:
    assert "all-gather" not in " ".join(row)
    if row[1] != "1":
      assert float(row[-6]) <= 2.0, row  # moved / lower bound
      assert float(row[-3]) < 0.8, row  # FLOPs per device against one device


@pytest.mark.slow
def test_input_benchmark_runs(tmp_path):
  from PIL import Image  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  for i in range(12):  # CelebA-sized files, so the paper's crop applies
    Image.fromarray((rng.random((218, 178, 3)) * 255).astype(np.uint8)).save(
        tmp_path / f"{i:06d}.jpg")
  out = _run("bench_input.py", f"--folder={tmp_path}", "--batch_size=4", "--batches=2",
             "--warmup=1", "--workers=1", "--no-colour", "--step_batch=1", "--step_repeats=1")
  assert "pipeline, 1 worker threads" in out and "pipeline, 1 worker processes" in out
  assert "images/s consumed" in out


@pytest.mark.slow
def test_inverse_benchmark_runs():
  pytest.importorskip("torch")
  for task in ("inpaint", "cs", "deblur", "sr"):
    out = _run("bench_inverse.py", f"--task={task}", "--size=32", "--batch=2", "--steps=3",
               "--torch_images=1")
    assert "original loop" in out and "inverse.solve" in out
    diff = float(out.split("max |JAX - torch| = ")[1].split()[0])
    assert diff < 1e-3, (task, diff)  # the torch loop is the same algorithm


_CAP_PROBE = """
import json, os, sys
sys.path.insert(0, os.path.join({repo!r}, 'benchmarks'))
import common
from wcdm_jax import native_build
native_build.cpu_isas = lambda: {isas!r}
for k in ('ONEDNN_MAX_CPU_ISA', 'ATEN_CPU_CAPABILITY', 'MKL_ENABLE_INSTRUCTIONS'):
  os.environ.pop(k, None)
line = common.cap_isa({isa!r})
import jax.numpy as jnp
jnp.ones(2).block_until_ready()
try:
  common.cap_isa({isa!r})
  late = 'allowed'
except RuntimeError:
  late = 'refused'
print(json.dumps(dict(line=line, late=late, xla=os.environ.get('XLA_FLAGS', ''),
                      onednn=os.environ.get('ONEDNN_MAX_CPU_ISA'),
                      aten=os.environ.get('ATEN_CPU_CAPABILITY'))))
"""


@pytest.mark.parametrize("isas,isa,capped", [
    (("avx512", "avx2", "generic"), "avx2", "AVX2"),
    (("avx512", "avx2", "generic"), "generic", "SSE4_2"),
    (("avx2", "generic"), "avx2", None),        # already the CPU's best: nothing to cap
    (("avx512", "avx2", "generic"), "avx512", None),
])
@pytest.mark.slow
def test_forced_isa_caps_xla_and_torch(isas, isa, capped):
  """--isa below the CPU's best caps XLA and PyTorch at it (an AVX2-only host's view on an
  AVX-512 one), only before jax computes; the CPU's own best leaves both alone."""
  import json  # pylint: disable=g-import-not-at-top
  code = _CAP_PROBE.format(repo=REPO, isas=isas, isa=isa)
  env = {k: v for k, v in cli_env().items() if k != "XLA_FLAGS"}
  res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       timeout=300, env=env, cwd=REPO)
  assert res.returncode == 0, res.stderr[-3000:]
  out = json.loads(res.stdout.strip().splitlines()[-1])
  if capped is None:
    assert out["line"] == "" and "xla_cpu_max_isa" not in out["xla"] and out["onednn"] is None
    assert out["late"] == "allowed"
  else:
    assert f"--xla_cpu_max_isa={capped}" in out["xla"] and isa in out["line"]
    assert out["onednn"] in ("AVX2", "SSE41") and out["aten"] in ("avx2", "default")
    assert out["late"] == "refused"


@pytest.mark.slow
def test_baselines_benchmark_scores_the_trainers_own_comparison(tmp_path):
  """bench_baselines.py denoises exactly the held-out crops and noise of the trainer's final
  comparison: its model and Gaussian rows equal the training log's last lines."""
  import re  # pylint: disable=g-import-not-at-top
  wd = str(tmp_path / "wd")
  res = subprocess.run(
      [sys.executable, os.path.join(REPO, "launch", "train.py"), f"--workdir={wd}",
       "--data=deadleaves", "--image_size=16", "--levels=1", "--cond_rf=5", "--low_rf=5",
       "--num_layers=3", "--low_num_layers=3", "--features=8", "--batch_size=8",
       "--num_steps=6", "--log_every=3", "--eval_every=6", "--checkpoint_every=6", "--seed=2"],
      capture_output=True, text=True, timeout=600, env=cli_env(), cwd=REPO)
  assert res.returncode == 0, res.stderr[-3000:]
  logged = re.findall(r"held-out denoising, sigma ([\d.]+): model ([\d.-]+) dB, noisy [\d.-]+ dB, "
                      r"best Gaussian filter ([\d.-]+) dB", res.stdout + res.stderr)
  assert len(logged) == 4
  out = _run("bench_baselines.py", "--image_size=16", "--seed=2", f"--models={wd}")
  rows = {line.split("|")[1].strip(): re.findall(r"([\d.-]+) \(", line)
          for line in out.splitlines() if line.startswith("| ") and "σ=" not in line}
  assert [float(v) for v in rows[wd]] == pytest.approx([float(m) for _, m, _ in logged], abs=0.011)
  assert [float(v) for v in rows["best Gaussian filter"]] == pytest.approx(
      [float(g) for _, _, g in logged], abs=0.011)
