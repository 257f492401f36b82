"""The guides' Python examples run (at toy size: a small random model stands in for the
quickstart's), and the docs site builds without warnings when Sphinx is installed."""
import os
import re
import subprocess
import sys

import jax
import pytest

from conftest import REPO
import dataclasses

from wcdm_jax import checkpoints, models, sampling
from wcdm_jax.inverse import solver

# Pages whose ```python blocks run, in order, in one namespace per page (accelerators.md on the
# tests' 4 simulated devices). Exempt (shown, not run): docs/inverse_problems.md's snippet
# (the released 160x160 model; usage.md runs the same calls), the experiment logs, and every
# bash block (multi-host and TPU/GPU commands among them).
RUN = ["README.md", "docs/usage.md", "docs/sampling.md", "docs/accelerators.md"]


@pytest.fixture(scope="module")
def toy_model(tmp_path_factory):
  """A J = 1 model of the quickstart's shapes (64x64) but tiny nets, random weights; it
  recommends short ascents (a random net never meets a stop rule)."""
  spec = models.multiscale_spec(1, cond_rf=5, low_rf=5, image_size=(64, 64), num_layers=3,
                                low_num_layers=3, features=4)
  path = str(tmp_path_factory.mktemp("quickstart"))
  short = dataclasses.replace(sampling.RELEASE_COND, max_steps=20)
  params = models.init_model(jax.random.key(0), spec)
  checkpoints.save_model(path, dataclasses.replace(params, sampling=sampling.Recommended(
      dataclasses.replace(sampling.RELEASE_LOW, max_steps=20), (short,))))
  return path


def _blocks(page):
  with open(os.path.join(REPO, page), encoding="utf-8") as f:
    return re.findall(r"```python\n(.*?)```", f.read(), re.S)


@pytest.mark.parametrize("page", RUN)
def test_examples_run(page, toy_model, monkeypatch):
  # inverse.solve's default step cap, shortened for the random net.
  monkeypatch.setattr(solver, "DEFAULT_ASCENT",
                      dataclasses.replace(solver.DEFAULT_ASCENT, max_steps=20))
  blocks = _blocks(page)
  assert blocks, f"{page} has no Python example"
  ns = {}
  for code in blocks:
    # Toy size: the small model, and step caps a random model reaches quickly.
    code = code.replace('"workdirs/quickstart"', repr(toy_model))
    exec(compile(code, page, "exec"), ns)  # pylint: disable=exec-used


@pytest.mark.slow
def test_docs_site_builds_without_warnings(tmp_path):
  pytest.importorskip("sphinx")
  pytest.importorskip("myst_nb")
  pytest.importorskip("furo")
  res = subprocess.run([sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-E", "-b",
                        "html", os.path.join(REPO, "docs"), str(tmp_path / "html")],
                       capture_output=True, text=True, timeout=600, check=False)
  assert res.returncode == 0, res.stderr[-3000:]
  assert (tmp_path / "html" / "api.html").exists()
  api = (tmp_path / "html" / "api.html").read_text()
  for name in ("wcdm_jax.sample", "wcdm_jax.FlowConfig", "wcdm_jax.inverse.solve"):
    assert name in api
