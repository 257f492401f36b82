"""Executes colabs/pretrained_demo.ipynb top to bottom with a tiny configuration."""
import json
import os

import pytest

from conftest import REPO, shared_path


@pytest.mark.slow
def test_pretrained_demo_runs(monkeypatch):
  release = shared_path("reference", "lcv-denoisers")
  monkeypatch.setenv("WCDM_RELEASE", release)
  monkeypatch.setenv("WCDM_TINY", "1")
  monkeypatch.setenv("MPLBACKEND", "Agg")
  with open(os.path.join(REPO, "colabs", "pretrained_demo.ipynb")) as f:
    nb = json.load(f)
  scope = {"__name__": "__notebook__"}
  for cell in nb["cells"]:
    if cell["cell_type"] != "code":
      continue
    src = "".join(line for line in cell["source"] if not line.lstrip().startswith(("!", "%")))
    exec(compile(src, "pretrained_demo.ipynb", "exec"), scope)  # pylint: disable=exec-used
  assert scope["sr4"].shape == (2, 160, 160, 1)
  assert scope["sr8"].shape == (2, 320, 320, 1)
  assert scope["s160"].shape == (1, 160, 160, 1) and scope["s320"].shape == (1, 320, 320, 1)
  # The denoisers really denoise the demo's images.
  psnr = scope["evaluation"].psnr
  assert float(psnr(scope["d_ms"], scope["x160"]).mean()) > float(psnr(scope["y"], scope["x160"]).mean()) + 3
  # The inverse-problems section solved both tasks with both priors, consistent with the data.
  assert len(scope["rows"]) == 2 and scope["x_ms"].shape == (2, 160, 160, 1)
  op = scope["op"]
  assert float(abs(op.forward(scope["x_ms"]) - op.forward(scope["x160"])).max()) < 1e-4


def test_notebook_is_its_generators_output():
  """The committed notebook holds exactly the generator's cells (outputs aside): edit
  colabs/make_pretrained_demo.py, then run it with --execute."""
  import importlib.util  # pylint: disable=g-import-not-at-top
  spec = importlib.util.spec_from_file_location(
      "make_pretrained_demo", os.path.join(REPO, "colabs", "make_pretrained_demo.py"))
  gen = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(gen)
  with open(os.path.join(REPO, "colabs", "pretrained_demo.ipynb")) as f:
    nb = json.load(f)
  assert [(c["cell_type"], "".join(c["source"])) for c in nb["cells"]] == [
      (kind, text) for kind, text in gen.CELLS]
