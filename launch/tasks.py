"""What the CLIs do, as functions of their settings (no flags), so that one entry point can run
another's work in-process: ``reproduce.py`` evaluates and samples its models with them.

``write_samples``: ``sample.py``'s samples, super-resolution and denoising examples;
``write_psnr``: ``evaluate.py``'s denoising curves.
"""
from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any, Sequence

from launch import common

GAUSSIAN = "best Gaussian filter"  # psnr.json's name of the baseline curve


@dataclasses.dataclass(frozen=True)
class SampleJob:
  """What ``write_samples`` draws (``sample.py``'s flags of the same names)."""
  num_samples: int = 8
  seed: int = 0
  image_size: int = 0                 # 0: the model's training size
  low_config: Any = None              # sampling.AscentConfig; None: the release's
  cond_config: Any = None             # one AscentConfig (or one per level, finest first)
  low_rescale: tuple[float, float] | None | str = None  # 'model': the model's recommendation
  images: str = ""                    # super-resolution and denoising examples ('' = none)
  num_images: int = 4
  crop: str = "none"
  noise_sigmas: Sequence[float] = (0.1, 0.2)
  time_repeats: int = 0


def write_samples(params, out: str, job: SampleJob, mesh=None) -> dict:
  """Sample, super-resolve and denoise with ``params``; writes OUT/*.png, samples.npz and
  samples.json (returned). Raises ValueError for settings the model cannot take."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  import wcdm_jax  # pylint: disable=g-import-not-at-top
  from wcdm_jax import data, evaluation, reporting, sampling  # pylint: disable=g-import-not-at-top
  spec = params.spec
  size = (job.image_size,) * 2 if job.image_size else spec.image_size
  if spec.levels and spec.mode == wcdm_jax.wavelets.PERIODIZATION:
    try:  # before anything is written
      wcdm_jax.wavelets.check_size(*size, spec.levels)
    except ValueError as e:
      raise ValueError(f"--image_size={size[0]}: {e}") from None
  given = [job.low_config] + list(job.cond_config if isinstance(job.cond_config, (list, tuple))
                                  else [job.cond_config])
  if (any(c is not None and c.flip_average for c in given) and spec.levels
      and wcdm_jax.wavelets.mirror_signs(spec.wavelet, spec.channels) is None):
    raise ValueError(f"--flip_average: the conditional scales need a wavelet whose bands "
                     f"mirror with the image (Haar); this model's is {spec.wavelet!r}")
  low_cfg, conds, rescale = sampling.resolve_settings(params, job.low_config, job.cond_config,
                                                      job.low_rescale)
  src = None
  if job.images:  # checked before the (long) sampling
    try:
      src = data.make_source(data.DataConfig(job.images, size[0], spec.channels, job.crop,
                                             flips=False), job.num_images, job.seed, "eval")
    except (ValueError, ImportError) as e:
      raise ValueError(f"--images={job.images}: {e}") from None
  os.makedirs(out, exist_ok=True)

  def save_grid(name, rows):  # rows of (h, w, C) images -> OUT/name
    rows = [[np.asarray(img) for img in row] for row in rows]
    common.log("wrote " + reporting.save_png(os.path.join(out, name),
                                             reporting.image_grid(rows, upscale=2)))

  arrays, summary = {}, {}

  def ascent_report(what, infos, names, caps):  # per-scale convergence: log + samples.json
    scales = []
    for info, name, cap in zip(infos, names, caps):
      steps = np.asarray(info.steps)
      capped = int(np.sum(~np.asarray(info.converged) & ~np.asarray(info.aborted)))
      scales.append(dict(scale=name, max_steps=cap, steps=steps.tolist(), hit_step_cap=capped,
                         aborted=int(np.sum(info.aborted)), converged=int(np.sum(info.converged))))
    summary[what] = scales
    line = "; ".join(f"{s['scale']}: steps {min(s['steps'])}-{max(s['steps'])}" +
                     (f", {s['hit_step_cap']} of {len(s['steps'])} hit the step cap "
                      f"{s['max_steps']} before sigma_L" if s["hit_step_cap"] else "") +
                     (f", {s['aborted']} aborted" if s["aborted"] else "") for s in scales)
    common.log(f"{what} (coarse first): {line}")
    bad = [s["scale"] for s in scales if s["hit_step_cap"] or s["aborted"]]
    if bad:
      common.log(f"warning: {what} did not converge at {', '.join(bad)} for some samples; raise "
                 "--low_max_steps / --cond_max_steps or the step size h0")
    return bool(bad)

  level_names = [f"level {j}" for j in reversed(range(spec.levels))]
  level_caps = [c.max_steps for c in reversed(conds)]
  bar = reporting.ProgressBar((1 if job.num_samples else 0) + (2 if job.images else 0), "sample")
  done = 0
  if job.num_samples:
    t0 = time.time()
    common.log(f"sampling {job.num_samples} images of {size[0]}x{size[1]} "
               f"({spec.levels} levels)")
    run = lambda: sampling.sample(
        jax.random.key(job.seed), params, job.num_samples, image_size=size,
        low_config=low_cfg, cond_config=conds, low_rescale=rescale,
        return_intermediates=True, mesh=mesh)
    images, scales, infos = run()
    images.block_until_ready()
    dt = time.time() - t0
    common.require_finite("the samples", images)
    common.log(f"{job.num_samples} samples in {dt:.1f} s, compilation included "
               f"({60 * job.num_samples / dt:.1f} images/min)")
    ascent_report("sampling", infos, ["low-pass" if spec.levels else "flat"] + level_names,
                  [low_cfg.max_steps] + level_caps)
    if job.time_repeats:
      t0 = time.time()
      for _ in range(job.time_repeats):
        run()[0].block_until_ready()
      dt = (time.time() - t0) / job.time_repeats
      common.log(f"steady state: {dt:.2f} s per batch of {job.num_samples} = "
                 f"{60 * job.num_samples / dt:.1f} images/min")
    arrays.update(samples=np.asarray(images), **{f"scale_{k}": np.asarray(s)
                                                 for k, s in enumerate(scales)})
    save_grid("samples.png", [images])
    save_grid("progression.png", [[s[i] for s in scales] for i in range(min(4, job.num_samples))])
    done += 1
    bar.update(done)
  if job.images:
    clean = jnp.asarray(src.batch(0))
    arrays["clean"] = np.asarray(clean)
    rows = [clean]
    if spec.levels:
      low = wcdm_jax.decompose(clean, spec.levels, spec.wavelet, spec.mode).low
      sr, _, sr_infos = sampling.super_resolve(jax.random.key(job.seed + 1), params, low,
                                               cond_config=conds, return_intermediates=True,
                                               mesh=mesh)
      common.require_finite("the super-resolved images", sr)
      arrays.update(low_res=np.asarray(low), super_resolved=np.asarray(sr))
      rows += [low, sr]
      capped = ascent_report(f"super-resolution x{2 ** spec.levels}", sr_infos, level_names,
                             level_caps)
      sr_psnr = float(evaluation.psnr(sr, clean).mean())
      summary["superres_psnr"] = sr_psnr
      common.log(f"super-resolution x{2 ** spec.levels}: PSNR {sr_psnr:.2f} dB (a sample, not an "
                 "estimate" + ("; NOT converged, see above)" if capped else ")"))
      save_grid("superres.png", rows)
    done += 1
    bar.update(done)
    rows = [clean]
    for i, s in enumerate(job.noise_sigmas):
      noisy = clean + s * jax.random.normal(jax.random.key(100 + i), clean.shape)
      den = wcdm_jax.denoise(params, noisy, mesh=mesh)
      common.require_finite(f"the denoised images (sigma {s})", den)
      arrays[f"noisy_{s}"], arrays[f"denoised_{s}"] = np.asarray(noisy), np.asarray(den)
      rows += [noisy, den]
      p_in, p_out = (float(evaluation.psnr(v, clean).mean()) for v in (noisy, den))
      summary.setdefault("denoising", []).append(dict(sigma=s, noisy_psnr=p_in, psnr=p_out))
      common.log(f"denoising sigma={s}: {p_in:.2f} dB -> {p_out:.2f} dB")
    save_grid("denoising.png", rows)
    done += 1
    bar.update(done)
  bar.close()
  np.savez(os.path.join(out, "samples.npz"), **arrays)
  with open(os.path.join(out, "samples.json"), "w") as f:
    json.dump(summary, f, indent=1)
  common.log(f"wrote {os.path.join(out, 'samples.npz')} and samples.json")
  return summary


def write_psnr(models: dict, images, noise_levels_255: Sequence[float], out: str, *,
               seed: int = 0, batch_size: int = 8, gaussian: bool = True, mesh=None,
               record: dict | None = None) -> dict:
  """Denoising curves of ``models`` ({name: params}) on ``images`` (N, H, W, C) at noise stds
  ``noise_levels_255`` (/255), with the best Gaussian filter's curve if ``gaussian``: OUT/psnr.json
  (``record``'s keys first) and OUT/psnr.png. Returns {name: curve}."""
  from wcdm_jax import evaluation  # pylint: disable=g-import-not-at-top
  from launch import plots  # pylint: disable=g-import-not-at-top
  levels = [float(s) for s in noise_levels_255]
  os.makedirs(out, exist_ok=True)
  results = {}
  for name, params in models.items():
    curve = evaluation.denoising_curve(params, images, [s / 255 for s in levels], seed,
                                       batch_size, mesh=mesh)
    common.require_finite(f"the denoising PSNRs of model {name!r}", curve["psnr_in"],
                          curve["psnr_out"])
    curve["noise_std_255"] = levels
    curve["kind"] = "multi-scale" if params.spec.levels else "flat"
    results[name] = curve
    common.log(f"{name}: " + " ".join(f"{s:g}:{o:.2f}" for s, o in zip(levels, curve["psnr_out"])))
    for k, s in enumerate(levels if "band_mse_out" in curve else ()):
      common.log(f"  {name} at {s:g}/255, squared error by band x 1e-4 (output / input / the band "
                 "set to 0): " + ", ".join(
                     f"{b} {curve['band_mse_out'][b][k] * 1e4:.2f} / "
                     f"{curve['band_mse_in'][b][k] * 1e4:.2f} / {e * 1e4:.2f}"
                     for b, e in curve["band_energy"].items()))
  if gaussian:
    curve = evaluation.gaussian_curve(images, [s / 255 for s in levels], seed, batch_size)
    curve.update(noise_std_255=levels, kind="baseline")
    results[GAUSSIAN] = curve
    common.log(f"{GAUSSIAN}: " + " ".join(f"{s:g}:{o:.2f}" for s, o in zip(levels,
                                                                          curve["psnr_out"])))
  with open(os.path.join(out, "psnr.json"), "w") as f:
    json.dump({**(record or {}), "num_images": len(images), "seed": seed, "models": results},
              f, indent=1)
  common.log("wrote " + plots.psnr_curves(results, os.path.join(out, "psnr.png")))
  common.log(f"wrote {os.path.join(out, 'psnr.json')}")
  return results
