"""Figures of the evaluation and reproduction tools (matplotlib, headless).

matplotlib is not a dependency of the library: ``pip install -e '.[experiments]'`` installs
it (``make setup`` does, with the test extra).
"""
from __future__ import annotations

import os
from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from wcdm_jax import evaluation, models


def _pyplot():
  try:
    import matplotlib  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise SystemExit("error: drawing figures needs matplotlib, which the library does not "
                     "install: pip install -e '.[experiments]' (or pip install matplotlib)"
                     ) from None
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  return plt


def _save(fig, path: str) -> str:
  plt = _pyplot()
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return path


def _finish_axes(ax, xlabel: str, ylabel: str, title: str, fontsize: int = 12) -> None:
  ax.set_xlabel(xlabel)
  ax.set_ylabel(ylabel)
  ax.set_title(title, fontsize=fontsize)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7)


def psnr_curves(results: Mapping[str, dict], path: str) -> str:
  """Output PSNR against input PSNR, one curve per model; flat and multi-scale panels (a
  'baseline' curve, e.g. the best Gaussian filter, in each)."""
  plt = _pyplot()
  kinds = [k for k in ("flat", "multi-scale") if any(r["kind"] == k for r in results.values())]
  fig, axes = plt.subplots(1, len(kinds), figsize=(5.5 * len(kinds), 4.5), squeeze=False)
  for ax, kind in zip(axes[0], kinds):
    finite = []
    for name, r in results.items():
      if r["kind"] not in (kind, "baseline"):
        continue
      pin, pout = np.asarray(r["psnr_in"]), np.asarray(r["psnr_out"])
      ok = np.asarray(r["sigma"]) > 0  # no noise: the input PSNR is infinite
      ax.plot(pin[ok], pout[ok], "o:" if r["kind"] == "baseline" else "o-", ms=3, label=name,
              color="0.4" if r["kind"] == "baseline" else None)
      finite += list(pin[ok])
    if finite:
      lo, hi = min(finite) - 2, max(finite) + 2
      ax.plot([lo, hi], [lo, hi], "k--", lw=0.8, label="identity")
    _finish_axes(ax, "input PSNR (dB)", "output PSNR (dB)", f"{kind} denoisers")
  return _save(fig, path)


def adaptive_filter_figure(params_by_name: Mapping[str, models.ModelParams], image: np.ndarray,
                           sigma: float, path: str, seed: int = 0, half: int = 24) -> str:
  """Rows: models; columns: the noisy image, then the Jacobian row at three pixels (zoomed)."""
  plt = _pyplot()
  h, w = image.shape[:2]
  pixels = [(h // 2, w // 2), (h // 3, w // 3), (2 * h // 3, w // 2)]
  noisy = jnp.asarray(image) + sigma * jax.random.normal(jax.random.key(seed), image.shape)
  fig, axes = plt.subplots(len(params_by_name), 1 + len(pixels),
                           figsize=(2.4 * (1 + len(pixels)), 2.4 * len(params_by_name)),
                           squeeze=False)
  for row, (name, params) in zip(axes, params_by_name.items()):
    rows = np.asarray(evaluation.adaptive_filters(params, noisy, pixels))
    row[0].imshow(np.clip(np.asarray(noisy)[..., 0], 0, 1), cmap="gray", vmin=0, vmax=1)
    row[0].set_ylabel(name, fontsize=7)
    for (py, px), filt, ax in zip(pixels, rows, row[1:]):
      row[0].plot(px, py, "r+", ms=6)
      crop = filt[max(py - half, 0):py + half + 1, max(px - half, 0):px + half + 1]
      m = np.abs(crop).max() or 1.0
      ax.imshow(crop, cmap="RdBu_r", vmin=-m, vmax=m)
    for ax in row:
      ax.set_xticks([])
      ax.set_yticks([])
  fig.suptitle(f"adaptive filters (Jacobian rows), noise std {sigma * 255:g}/255", fontsize=9)
  return _save(fig, path)


def training_curves(metrics: Mapping[str, list[dict]], path: str) -> str:
  """Per-scale denoised PSNR against training step, one panel per model (metrics.jsonl rows)."""
  plt = _pyplot()
  fig, axes = plt.subplots(1, max(len(metrics), 1), figsize=(4.2 * max(len(metrics), 1), 3.6),
                           squeeze=False)
  for ax, (model, rows) in zip(axes[0], metrics.items()):
    nets = sorted({k.split("/")[0] for r in rows for k in r if k.endswith("/psnr_denoised")})
    for net in nets:
      pts = [(r["step"], r[f"{net}/psnr_denoised"]) for r in rows if f"{net}/psnr_denoised" in r]
      steps, vals = zip(*sorted(dict(pts).items()))  # a resumed run may log a step twice
      ax.plot(steps, vals, "-", lw=1.2, label=net)
    _finish_axes(ax, "step", "denoised PSNR (dB)", model, fontsize=9)
  return _save(fig, path)


def likelihood_bars(results: Mapping[str, dict], path: str) -> str:
  """Bits per pixel per model (``likelihood.dataset_log_prob`` results), stacked by term:
  the low-pass (or flat) image, each level's details, the pyramid's log-det; error bars are
  the Monte Carlo standard errors. The dequantisation constant (the same for all) is left out."""
  plt = _pyplot()
  names = list(results)
  terms = sorted({t for r in results.values() for t in r["scales"] if t != "dequantization"},
                 key=lambda t: ({"flat": 0, "low": 1, "log_det": 99}.get(t, 2), t[::-1]))
  fig, ax = plt.subplots(figsize=(1.2 * len(names) + 3, 4.5))
  bottom = np.zeros(len(names))
  for t in terms:
    v = np.array([results[n]["scales"].get(t, 0.0) for n in names])
    ax.bar(names, v, bottom=bottom, label=t)
    bottom += v
  deq = np.array([results[n]["scales"].get("dequantization", 0.0) for n in names])
  err = [results[n]["mc_stderr"] for n in names]
  ax.errorbar(names, bottom, yerr=err, fmt="k.", capsize=3)
  for i, n in enumerate(names):
    ax.annotate(f"{results[n]['bits_per_pixel']:.3f}", (i, bottom[i]), ha="center",
                va="bottom", fontsize=8, xytext=(0, 3), textcoords="offset points")
  ax.axhline(0, color="k", lw=0.6)
  ax.tick_params(axis="x", rotation=30)
  _finish_axes(ax, "model", "bits per pixel (without the dequantisation "
               f"{deq.max():.3f})" if deq.max() else "bits per pixel",
               "negative log-likelihood bound, by term")
  return _save(fig, path)


def claim_budgets(budgets: Mapping[int, dict], path: str) -> str:
  """Each of the paper's claims (``evaluation.multiscale_claims``' 'worst_db') against the
  images seen per net, one panel per claim, with the line the claim must reach."""
  plt = _pyplot()
  images = sorted(budgets)
  claims = budgets[images[0]]["claims"]
  fig, axes = plt.subplots(1, len(claims), figsize=(4.6 * len(claims), 3.8), squeeze=False)
  for i, ax in enumerate(axes[0]):
    worst = [budgets[n]["claims"][i]["worst_db"] for n in images]
    ax.plot(images, worst, "o-", label="measured (worst level)")
    bound = claims[i]["bound_db"]
    if i == 0:  # a band: |difference| <= bound
      ax.axhspan(-bound, bound, color="g", alpha=0.15, label="claim holds")
    else:
      ax.axhline(bound, color="g", ls="--", label="claim's bound")
    ax.set_xscale("log")
    ax.set_xticks(images, [f"{n:,}" for n in images])  # the budgets run, not a log grid
    ax.minorticks_off()
    _finish_axes(ax, "images seen per net", "dB", claims[i]["claim"], fontsize=8)
  return _save(fig, path)
