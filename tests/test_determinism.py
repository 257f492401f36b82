"""Results are pure functions of seeds and inputs, on the default (native kernel) path:
repeated native gradients, any thread count, two training runs, and kill -9 + resume
(at random steps and during an asynchronous checkpoint write) are bit-identical.
"""
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import REPO, all_cpus, cli_env, native_variants
from wcdm_jax import conv, data, models, trainer, training

TRAIN = os.path.join(REPO, "launch", "train.py")
STEPS = 12  # a checkpoint every step: a kill lands before, during or after a save, >= 3 steps
# before the end (a run that finishes first would fail the test)
# 16 features: the middle layers take the native kernels (forward, Winograd, kernel gradient).
FLAGS = ["--image_size=16", "--levels=1", "--cond_rf=5", "--low_rf=5", "--num_layers=3",
         "--low_num_layers=3", "--features=16", "--batch_size=8", f"--num_steps={STEPS}",
         "--log_every=1", "--eval_every=5", "--checkpoint_every=1", "--keep_checkpoints=2",
         "--noise_max=100",
         # the run's end-of-training extras, which no test here reads: smaller or off
         "--nofigure", "--noise_scale_batches=1", "--eval_batch_size=4"]


VARIANTS = native_variants()
per_variant = pytest.mark.parametrize("isa", VARIANTS or ["none"])


def _native_grads(x, w, isa):
  g = jax.jit(jax.grad(lambda x, w: jnp.sum(jnp.sin(conv.native_conv(x, w, True, True, isa))),
                       argnums=(0, 1)))
  return [np.asarray(a) for a in g(x, w)]


@per_variant
def test_native_gradients_repeat_bit_identically(isa):
  if not VARIANTS:
    pytest.skip("no C++ compiler: no native kernels")
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((8, 40, 40, 32)), jnp.float32)
  w = jnp.asarray(rng.standard_normal((3, 3, 32, 32)) * 0.1, jnp.float32)
  first = _native_grads(x, w, isa)
  for _ in range(5):
    again = _native_grads(x, w, isa)
    for a, b in zip(first, again):
      np.testing.assert_array_equal(a, b)


_THREADS_SCRIPT = textwrap.dedent("""
    import os, sys
    os.sched_setaffinity(0, {int(c) for c in sys.argv[4].split(",")[:int(sys.argv[1])]})
    import numpy as np, jax, jax.numpy as jnp
    from wcdm_jax import conv
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((8, 24, 24, 32)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((3, 3, 32, 16)) * 0.1, jnp.float32)
    out = {}
    for isa in sys.argv[3].split(","):
      f = lambda x, w: jnp.sum(jnp.sin(conv.native_conv(x, w, True, True, isa)))
      out[isa + "_dx"], out[isa + "_dw"] = jax.jit(jax.grad(f, argnums=(0, 1)))(x, w)
    np.savez(sys.argv[2], **{k: np.asarray(v) for k, v in out.items()})
""")


@pytest.mark.slow
def test_native_gradients_do_not_depend_on_the_thread_count(tmp_path):
  """Every variant, on one core and on all of them (the child widens its affinity: the test
  worker itself may be pinned to a share of the cores)."""
  if not VARIANTS:
    pytest.skip("no C++ compiler: no native kernels")
  cpus = all_cpus()
  env = cli_env()
  outs = []
  for n in sorted({1, len(cpus)}):
    out = tmp_path / f"t{n}.npz"
    res = subprocess.run([sys.executable, "-c", _THREADS_SCRIPT, str(n), str(out),
                          ",".join(VARIANTS), ",".join(map(str, cpus))], env=env, capture_output=True, text=True,
                         timeout=300, cwd=REPO)
    assert res.returncode == 0, res.stderr[-2000:]
    outs.append(np.load(out))
  assert sorted(outs[0].files) == sorted(f"{v}_{g}" for v in VARIANTS for g in ("dx", "dw"))
  for other in outs[1:]:
    for k in outs[0].files:
      np.testing.assert_array_equal(outs[0][k], other[k], err_msg=k)


def test_two_training_runs_are_bit_identical(tmp_path):
  spec = models.multiscale_spec(1, cond_rf=5, low_rf=5, image_size=(16, 16), num_layers=3,
                                low_num_layers=3, features=16)
  cfg = training.TrainConfig(batch_size=8, num_steps=6, level_multiplier=1)
  sums = []
  for run in ("a", "b"):
    wd = str(tmp_path / run)
    trainer.train(spec, data.DataConfig(image_size=16), cfg,
                  trainer.RunConfig(wd, eval_batch_size=4, noise_scale_batches=1, figure=False,
                                    checkpoint_every=6),
                  log=lambda m: None)
    sums.append({n: _meta(wd, n, 6)["checksums"]["state"] for n in spec.nets})
  assert sums[0] == sums[1]


# --- kill -9 and resume ------------------------------------------------------------------

def _meta(workdir, net, step):
  with open(os.path.join(workdir, net, str(step), "meta", "metadata")) as f:
    return json.load(f)


def _final(workdir):
  """Checksums of every net's final train state, and the logged loss steps."""
  rows = [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))]
  steps = [r["step"] for r in rows if "low/loss" in r]
  return {n: _meta(workdir, n, STEPS)["checksums"]["state"] for n in ("low", "cond0")}, steps


def _train(workdir, timeout=300):
  res = subprocess.run([sys.executable, TRAIN, f"--workdir={workdir}", *FLAGS], env=cli_env(),
                       capture_output=True, text=True, timeout=timeout, cwd=REPO)
  assert res.returncode == 0, res.stderr[-3000:]
  return res


def _train_killed_at_step(workdir, kill_step, delay):
  """Start a run, kill -9 it ``delay`` s after it logs step ``kill_step``."""
  proc = subprocess.Popen([sys.executable, TRAIN, f"--workdir={workdir}", *FLAGS], env=cli_env(),
                          stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=REPO)
  timer = None
  for line in proc.stdout:
    if f"step {kill_step}/" in line:
      timer = threading.Timer(delay, proc.send_signal, (signal.SIGKILL,))
      timer.start()
      break
  proc.stdout.close()
  rc = proc.wait(timeout=300)
  assert timer is not None and rc == -signal.SIGKILL, f"run was not killed (exit {rc})"


_KILL_IN_SAVE = textwrap.dedent("""
    import os, runpy, signal, sys
    from wcdm_jax import checkpoints
    kill_at, save = int(os.environ["KILL_AT"]), checkpoints.save
    def save_then_die(mngr, step, *args, **kwargs):
      save(mngr, step, *args, **kwargs)  # asynchronous: the write is still in flight
      if step == kill_at:
        os.kill(os.getpid(), signal.SIGKILL)
    checkpoints.save = save_then_die
    sys.argv = sys.argv[1:]
    runpy.run_path(sys.argv[0], run_name="__main__")
""")


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  wd = str(tmp_path_factory.mktemp("ref") / "run")
  _train(wd)
  return _final(wd)


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1])
def test_kill_at_a_random_point_then_resume_is_bit_identical(seed, reference, tmp_path):
  rng = np.random.default_rng(seed)
  wd = str(tmp_path / "run")
  _train_killed_at_step(wd, int(rng.integers(2, STEPS - 2)), float(rng.uniform(0.0, 0.2)))
  res = _train(wd)
  assert "resumed at step" in res.stdout
  sums, steps = _final(wd)
  assert sums == reference[0]
  assert steps == reference[1]  # metrics.jsonl was trimmed: no step logged twice


@pytest.mark.slow
def test_kill_during_an_async_checkpoint_write_then_resume(reference, tmp_path):
  wd = str(tmp_path / "run")
  res = subprocess.run([sys.executable, "-c", _KILL_IN_SAVE, TRAIN, f"--workdir={wd}", *FLAGS],
                       env=dict(cli_env(), KILL_AT=str(STEPS // 2)), capture_output=True, text=True,
                       timeout=300, cwd=REPO)
  assert res.returncode == -signal.SIGKILL, res.stderr[-2000:]
  _train(wd)
  assert _final(wd) == reference
