"""Writes colabs/pretrained_demo.ipynb from the cells below (keeps the notebook reviewable).

  python colabs/make_pretrained_demo.py            # the cells, without outputs
  python colabs/make_pretrained_demo.py --execute  # run them here (CPU, the reduced settings,
                                                   # ../shared's weights) and store the outputs

With --execute every code cell runs in order in this process; what it prints and the figures
it shows are stored as the cell's outputs (text and PNG), so that the notebook renders with
its results on GitHub and in the docs.
"""
import base64
import contextlib
import io
import json
import os
import sys

CELLS = [
    ("markdown", """# wcdm_jax: the authors' released denoisers in JAX

Imports the PyTorch weights released with *Learning multi-scale local conditional probability
models of images* (Kadkhodaie, Guth, Mallat, Simoncelli, ICLR 2023), then denoises, super-resolves
(4x with J = 2, 8x with J = 3) and samples faces at 160x160 and 320x320.
Runs top to bottom on a CPU runtime with the reduced settings below; set `SMALL = False` on a GPU/TPU
runtime for the release's sampling settings."""),
    ("code", """# On Colab: !pip install -q "wcdm_jax @ git+<this repository's URL>"
import os, subprocess
import jax, jax.numpy as jnp, numpy as np
import matplotlib.pyplot as plt
import wcdm_jax
from wcdm_jax import data, evaluation, pretrained, sampling"""),
    ("markdown", """## Parameters and the weights
`RELEASE_DIR`: a local folder of the release (holding `flat/` and `multi_scale/`), from
`$WCDM_RELEASE` or `../shared/reference/lcv-denoisers`; when there is none (a Colab runtime), the
authors' public repository is cloned, whose `denoisers/` folder holds the same weights."""),
    ("code", """AUTHORS_REPO = "https://github.com/LabForComputationalVision/local-probability-models-of-images"
candidates = [os.environ.get("WCDM_RELEASE", ""), "../shared/reference/lcv-denoisers",
              "../../shared/reference/lcv-denoisers", "/content/lcv/denoisers"]
RELEASE_DIR = next((c for c in candidates if c and os.path.isdir(c)), None)
if RELEASE_DIR is None:
  subprocess.run(["git", "clone", "-q", "--depth", "1", AUTHORS_REPO, "/content/lcv"], check=True)
  RELEASE_DIR = "/content/lcv/denoisers"
  print("weights: cloned from", AUTHORS_REPO)
else:
  print("weights: the local folder", RELEASE_DIR)
IMAGES = os.environ.get("WCDM_IMAGES", "embedded")   # or "folder:/content/celeba" (aligned CelebA)
SMALL = os.environ.get("WCDM_SMALL", "1") == "1"     # reduced settings for a CPU runtime
TINY = os.environ.get("WCDM_TINY", "0") == "1"       # CI: a few steps only, to check the notebook runs
LOW_STEPS = 8 if TINY else (400 if SMALL else 15000)
COND_STEPS = 4 if TINY else 1000
NUM_SAMPLES = 1 if TINY else 2"""),
    ("markdown", "## Import the weights\nA restricted reader that accepts tensors only: no torch needed, no code unpickled."),
    ("code", """found = pretrained.find_release_models(RELEASE_DIR)
print(sorted(found))
ms160 = pretrained.load_release_model(found["ms_celebA_160x160_gray_rf13"])
ms320 = pretrained.load_release_model(found["ms_celebA_320x320_gray_rf13"])
flat = pretrained.load_release_model(found["flat_celebA_160x160_gray_rf43"])
for name, p in [("ms160", ms160), ("ms320", ms320), ("flat", flat)]:
  print(name, {n: s.rf for n, s in p.spec.nets.items()})"""),
    ("markdown", "## Images\nThe paper's preprocessing: grey = mean of RGB, crop [29:-29, 9:-9] of aligned CelebA, 160x160."),
    ("code", """def load(size, n=2):
  crop = "celeba" if IMAGES.startswith("folder:") else "none"
  cfg = data.DataConfig(IMAGES, size, 1, crop if size == 160 else "center", eval_fraction=0.0, flips=False,
                        max_images=n if IMAGES.startswith("folder:") else 0)
  if IMAGES == "embedded":
    cfg = data.DataConfig("embedded", min(size, 128), 1)
  src = data.make_source(cfg, n, 0, "eval" if IMAGES == "embedded" else "all")
  x = jnp.asarray(src.batch(0))
  return jax.image.resize(x, (n, size, size, 1), "bicubic") if x.shape[1] != size else x

def show(rows, titles=None):
  fig, axes = plt.subplots(len(rows), len(rows[0]), figsize=(2.2 * len(rows[0]), 2.2 * len(rows)), squeeze=False)
  for r, row in enumerate(rows):
    for c, img in enumerate(row):
      axes[r][c].imshow(np.clip(np.asarray(img)[..., 0], 0, 1), cmap="gray", vmin=0, vmax=1)
      axes[r][c].axis("off")
      if titles and r == 0: axes[r][c].set_title(titles[c], fontsize=8)
  plt.show()

x160 = load(160)
x320 = load(320)"""),
    ("markdown", "## Denoising: flat RF 43 and multi-scale RF 13"),
    ("code", """sigma = 50 / 255
y = x160 + sigma * jax.random.normal(jax.random.key(0), x160.shape)
d_flat = wcdm_jax.denoise(flat, y)
d_ms = wcdm_jax.denoise(ms160, y)
for name, d in [("noisy", y), ("flat RF43", d_flat), ("multi-scale RF13", d_ms)]:
  print(f"{name}: {float(evaluation.psnr(d, x160).mean()):.2f} dB")
show([[x160[0], y[0], d_flat[0], d_ms[0]]], ["clean", "noisy", "flat RF43", "multi-scale RF13"])"""),
    ("markdown", "## Super-resolution: 4x (J = 2, 160x160) and 8x (J = 3, 320x320)"),
    ("code", """cond = sampling.AscentConfig(h0=0.01, beta=0.5, sigma_L=0.01, max_steps=COND_STEPS)
low4 = wcdm_jax.decompose(x160, 2).low
sr4 = wcdm_jax.super_resolve(jax.random.key(1), ms160, low4, cond_config=cond)
low8 = wcdm_jax.decompose(x320, 3).low
sr8 = wcdm_jax.super_resolve(jax.random.key(2), ms320, low8, cond_config=cond)
print(sr4.shape, sr8.shape)
show([[x160[0], jax.image.resize(low4[0], (160, 160, 1), "nearest"), sr4[0]],
      [x320[0], jax.image.resize(low8[0], (320, 320, 1), "nearest"), sr8[0]]],
     ["original", "low-pass", "super-resolved"])"""),
    ("markdown", """## Sampling faces at 160x160 and 320x320
Release settings: low-pass beta 0.01, fixed h 0.01, sigma_L 0.1 (~8,500 steps), then the min-max rescale
to [0, 0.8]. With `SMALL`, the low-pass ascent uses ascending steps (a few hundred steps)."""),
    ("code", """low_cfg = (sampling.AscentConfig(h0=0.01, beta=0.1, sigma_L=0.1, ascending=True, max_steps=LOW_STEPS) if SMALL
           else sampling.RELEASE_LOW)
s160, scales160, _ = wcdm_jax.sample(jax.random.key(3), ms160, NUM_SAMPLES, low_config=low_cfg,
                                     cond_config=cond, low_rescale=(0.0, 0.8), return_intermediates=True)
s320, scales320, _ = wcdm_jax.sample(jax.random.key(4), ms320, NUM_SAMPLES, low_config=low_cfg,
                                     cond_config=cond, low_rescale=(0.0, 0.8), return_intermediates=True)
print(s160.shape, s320.shape)
show([[s[0] for s in scales160], [s[0] for s in scales320[1:]]])"""),
    ("markdown", """## Linear inverse problems with the flat and the multi-scale prior
`wcdm_jax.inverse`: measurements `x_c = M^T x` with an operator of orthonormal columns, solved by the
stochastic ascent of Kadkhodaie & Simoncelli (2021) with any blind denoiser as the prior: the flat net,
or the multi-scale denoiser (low-pass net, then the conditional nets). A batch runs in one `lax.scan`,
each image stops on its own, and a final projection makes the result match the measurements exactly.
Below: a 40x40 hole and 10% random projections (compressive sensing)."""),
    ("code", """from wcdm_jax import inverse
INV_STEPS = 6 if TINY else (400 if SMALL else 3000)
tasks = {"40x40 hole": inverse.Inpainting(inverse.box_mask((160, 160), 40)),
         "10% projections": inverse.RandomProjection(0.1, jax.random.key(5), (160, 160, 1))}
rows = []
for title, op in tasks.items():
  meas = op.forward(x160)
  cfg = inverse.SolverConfig(sampler=inverse.default_sampler(op, max_steps=INV_STEPS))
  x_flat = inverse.solve(jax.random.key(6), flat, op, meas, config=cfg)
  x_ms = inverse.solve(jax.random.key(6), ms160, op, meas, config=cfg)
  for name, x in [("M M^T x", op.project(x160)), ("flat RF43", x_flat), ("multi-scale RF13", x_ms)]:
    print(f"{title}, {name}: {float(evaluation.psnr(x, x160).mean()):.2f} dB")
  rows.append([x160[0], op.project(x160)[0], x_flat[0], x_ms[0]])
show(rows, ["original", "M M^T x", "flat RF43 prior", "multi-scale RF13 prior"])"""),
]


def _execute(nb: dict) -> None:
  """Run the code cells in order in one namespace; store stdout and shown figures as outputs."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  shown = []

  def show(*args, **kwargs):  # plt.show: keep the figure as PNG
    del args, kwargs
    buf = io.BytesIO()
    plt.gcf().savefig(buf, format="png", dpi=72, bbox_inches="tight")
    plt.close("all")
    shown.append(base64.b64encode(buf.getvalue()).decode())
  plt.show = show
  scope = {"__name__": "__main__"}
  for count, cell in enumerate((c for c in nb["cells"] if c["cell_type"] == "code"), 1):
    out = io.StringIO()
    del shown[:]
    with contextlib.redirect_stdout(out):
      exec(compile("".join(cell["source"]), f"cell {count}", "exec"), scope)  # pylint: disable=exec-used
    outputs = []
    if out.getvalue():
      outputs.append({"output_type": "stream", "name": "stdout",
                      "text": out.getvalue().splitlines(keepends=True)})
    outputs += [{"output_type": "display_data", "metadata": {},
                 "data": {"image/png": png, "text/plain": ["<Figure>"]}} for png in shown]
    cell.update(outputs=outputs, execution_count=count)
    print(f"cell {count}: {len(outputs)} outputs", file=sys.stderr)


def main():
  nb = {"nbformat": 4, "nbformat_minor": 5,
        "metadata": {"kernelspec": {"name": "python3", "display_name": "Python 3"},
                     "language_info": {"name": "python"}},
        "cells": []}
  for i, (kind, text) in enumerate(CELLS):
    cell = {"cell_type": kind, "metadata": {}, "source": text.splitlines(keepends=True), "id": f"c{i}"}
    if kind == "code":
      cell.update(outputs=[], execution_count=None)
    nb["cells"].append(cell)
  if "--execute" in sys.argv[1:]:
    os.chdir(os.path.dirname(os.path.abspath(__file__)))  # ../shared is the repository's sibling
    _execute(nb)
  path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "pretrained_demo.ipynb")
  with open(path, "w") as f:
    json.dump(nb, f, indent=1)
  print("wrote", path)


if __name__ == "__main__":
  main()
