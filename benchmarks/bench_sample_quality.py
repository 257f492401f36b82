r"""Sample quality against cost (network evaluations) for each sampler, with the released model.

  python benchmarks/bench_sample_quality.py --out=/tmp/sample_quality            # everything
  python benchmarks/bench_sample_quality.py --parts=low --num_samples=8          # smaller

Model: the authors' multi-scale CelebA 160 model (RF 13, ../shared/reference/lcv-denoisers).
Reference images: the eval split of ../shared/data/celeba-aligned (the last 10% by name), the
celeba crop at 160x160, grey; the first --num_samples of them are the 'real' set (the floor:
real against real), the next --reference_images the reference set every SWD is computed
against. Comparisons are between samplers of one model, so the reference set's possible
overlap with the model's training images biases none of them.

Parts (--parts):
  low   the 40x40 low-pass samples of each sampler: multi-scale SWD (wcdm_jax.quality) against
        the reference images' low-pass, with the network evaluations per sample. The metric's
        validation rows: the real set (floor), and the release sampler's samples (a) stopped at
        a tenth of their steps, (b) blurred by a 1-pixel Gaussian, (c) with noise of std 0.02.
  full  160x160 samples: each low-pass sampler's samples refined by the conditional scales with
        the matching conditional sampler; SWD against the reference images.
  sr    4x super-resolution of the real set's low-pass: PSNR of each conditional sampler.
  time  wall time per full-size sample of the release's settings and of the model's
        recommended ones (sample(key, params)), one after the other in this run, on
        --time_samples fresh samples each (nothing cached; compilation included, its time
        measured apart).
  inverse  inverse.solve on the first --inverse_images real images with the flat RF 43 and the
        multi-scale prior: a centred 40x40 hole, 90% missing pixels, 4x block averages; PSNR of
        each solver setting (inverse_samplers()) against today's default, paired by image.
Every SWD row also gives the layout distance (quality.layout: the whole 20x20 coarse image's
energy outside the reference's first 16 principal images), which sees what patches miss (a
face with misplaced parts); a sampler meets the synthesis target when both its paired
differences to the release's are within the real-vs-real tolerance.
Samples are cached in OUT/cache/ by model, sampler, chunk and seed: a rerun only computes
what is new. The release sampler's sets (about an hour per 16 samples on a 2-core CPU) are
kept in benchmarks/sample_cache/ (16 samples of the J = 2 model, 8 of the J = 3 model, with
their command and keys) and read from there. Prints a table,
writes OUT/sample_quality.json, OUT/sample_quality.png (SWD against evaluations, one curve
per sampler family, the release setting marked) and OUT/samples_low.png / samples_full.png
(each sampler's first 8 samples, one row each).
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import common as bench  # pylint: disable=g-import-not-at-top

DATA = os.path.join(os.path.dirname(bench.RELEASE), "..", "data", "celeba-aligned")
MODEL = "ms_celebA_160x160_gray_rf13"


def samplers():
  """{name: (low-pass sampler, conditional sampler, family)}: the release's ascent, the
  ascending ascent (the default), and the probability flow at several budgets. A conditional
  sampler None stands for the release's conditional ascents (sampling.release_settings)."""
  from wcdm_jax import sampling  # pylint: disable=g-import-not-at-top
  out = {"release": (sampling.RELEASE_LOW, None, "release ascent"),
         "ascending": (dataclasses.replace(sampling.RELEASE_LOW, ascending=True, beta=0.1,
                                           sigma_L=0.05, max_steps=3000),
                       None, "ascending ascent")}
  for beta, sigma_l in ((0.05, 0.05), (0.03, 0.05), (0.1, 0.02), (0.03, 0.1)):  # less noise
    out[f"ascending_b{beta:g}_s{sigma_l:g}"] = (dataclasses.replace(
        out["ascending"][0], beta=beta, sigma_L=sigma_l), None, "ascending ascent")
  for h0 in (0.03, 0.1):  # a larger first step: fewer steps
    out[f"ascending_h{h0:g}"] = (dataclasses.replace(out["ascending"][0], h0=h0), None,
                                  "ascending ascent")
  out["ascending_euler16"] = (out["ascending"][0], sampling.FAST_COND,
                              "ascending ascent, Euler details")
  rec = sampling.release_recommended(1)  # what an imported release model carries
  out["default"] = (rec.low, rec.cond[0], "default (the released models' recommendation)")
  # The flow's low-pass starts at mid-grey; the details' at 0, their mean. sigma_max 1 is the
  # nets' training range; 3 with a little churn measured best on this model's low-pass.
  for n, smax, churn in ((18, 1.0, 0.0), (6, 3.0, 0.1), (11, 3.0, 0.1), (18, 3.0, 0.1),
                         (32, 3.0, 0.1), (64, 3.0, 0.1), (18, 3.0, 0.0)):
    flow = sampling.FlowConfig(num_steps=n, mean_0=0.5, sigma_max=smax, churn=churn)
    name = f"heun{n}" + (f"_smax{smax:g}" if smax != 3.0 else "") + ("_nochurn" if not churn else "")
    out[name] = (flow, dataclasses.replace(flow, mean_0=0.0), "flow (Heun)" if churn
                 else "flow (Heun, deterministic)")
  for n in (16, 20, 50):
    flow = sampling.FlowConfig(method="euler", num_steps=n, mean_0=0.5, sigma_max=3.0, churn=0.1)
    out[f"euler{n}"] = (flow, dataclasses.replace(flow, mean_0=0.0), "flow (Euler)")
  return out


def inverse_samplers():
  """{name: operator -> SolverConfig}: today's default and the constrained flow at about 20
  network calls."""
  from wcdm_jax import inverse, sampling  # pylint: disable=g-import-not-at-top
  flow = lambda **kw: lambda op: inverse.SolverConfig(
      sampler=sampling.FlowConfig(mean_0=0.5, **kw))
  # (A larger first step, h0 0.05, saves only 1.7x on the hole with flat RF 43: 74 evals.)
  return {"default": lambda op: inverse.SolverConfig(),
          "euler20_smax1": flow(method="euler", num_steps=20, sigma_max=1.0, churn=0.0),
          "euler20": flow(method="euler", num_steps=20, sigma_max=3.0, churn=0.1),
          "heun11_smax1": flow(num_steps=11, sigma_max=1.0, churn=0.0)}


def _key(*parts) -> str:
  return hashlib.sha256(repr(parts).encode()).hexdigest()[:16]


# The release sampler's sample sets (about an hour per 16 here), made once by this script and
# kept in the repository (compressed npz, each with its command, config and keys): a run reads
# a chunk from here before computing it.
STORED = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sample_cache")


def _cached(path: str, make):
  """make() -> dict of arrays, stored at ``path`` (npz) and read back on a rerun (or read from
  STORED, where the release's sets are kept)."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  for p in (path, os.path.join(STORED, os.path.basename(path))):
    if os.path.exists(p):
      with np.load(p) as z:
        return {k: z[k] for k in z.files}
  arrays = make()
  os.makedirs(os.path.dirname(path), exist_ok=True)
  np.savez(path + ".tmp.npz", **arrays)
  os.replace(path + ".tmp.npz", path)
  return arrays


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--out", default="/tmp/wcdm_sample_quality")
  p.add_argument("--model", default=MODEL, help="a released multi-scale model (its name in "
                 "../shared/reference/lcv-denoisers), e.g. ms_celebA_320x320_gray_rf13")
  p.add_argument("--parts", default="low,full,sr,inverse",
                 help="comma-separated: low, full, sr, inverse")
  p.add_argument("--samplers", default="", help="comma-separated subset (default: all)")
  p.add_argument("--num_samples", type=int, default=24)
  p.add_argument("--reference_images", type=int, default=256)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--patches", type=int, default=16384, help="SWD descriptors per level")
  p.add_argument("--directions", type=int, default=512)
  p.add_argument("--bootstrap", type=int, default=50)
  p.add_argument("--chunk", type=int, default=4, help="samples per cached batch")
  p.add_argument("--inverse_images", type=int, default=8)
  p.add_argument("--time_samples", type=int, default=2)
  args = p.parse_args(argv)
  if not os.path.isdir(bench.RELEASE) or not os.path.isdir(DATA):
    sys.exit(f"error: needs the released models ({bench.RELEASE}) and CelebA ({DATA})")
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  import wcdm_jax  # pylint: disable=g-import-not-at-top
  from launch import common  # pylint: disable=g-import-not-at-top
  from wcdm_jax import evaluation, native_build, pretrained, quality, sampling  # pylint: disable=g-import-not-at-top

  parts = set(args.parts.split(","))
  table = samplers()
  chosen = args.samplers.split(",") if args.samplers else list(table)
  unknown = [s for s in chosen if s not in table]
  if unknown:
    sys.exit(f"error: --samplers: unknown {unknown}; choose from {','.join(table)}")
  released = pretrained.find_release_models(bench.RELEASE)
  if args.model not in released or not args.model.startswith("ms_"):
    sys.exit(f"error: --model={args.model}: choose a multi-scale model of "
             f"{[m for m in released if m.startswith('ms_')]}")
  params = pretrained.load_release_model(released[args.model])
  levels, size = params.spec.levels, params.spec.image_size[0]
  release_cond = sampling.release_settings(levels).cond  # what a None in samplers() stands for
  n = args.num_samples
  images = common.load_images(f"folder:{DATA}", size, 1, "celeba",
                              2 * n + args.reference_images, "eval", 0.1)
  real, real2, ref = images[:n], images[n:2 * n], images[2 * n:]
  real_low, real2_low, ref_low = (np.asarray(wcdm_jax.decompose(x, levels).low)
                                  for x in (real, real2, ref))
  print(f"model {args.model}; 2 x {len(real)} real and {len(ref)} reference images "
        f"(eval split of {os.path.normpath(DATA)}); CPU: {native_build.cpu_name()} ({native_build.cpu_isas()[0]})")
  swd = lambda x, r: quality.swd(x, r, seed=args.seed, patches=args.patches,
                                 directions=args.directions, bootstrap=args.bootstrap)
  lay = lambda x, r: quality.layout(x, r, seed=args.seed, bootstrap=4 * args.bootstrap)
  # Sample i's key depends on i only: a larger --num_samples extends a set, chunks are reusable.
  keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(args.seed), i))(jax.numpy.arange(n))
  cache = os.path.join(args.out, "cache")
  results = {"model": args.model, "num_samples": n, "reference_images": len(ref), "rows": []}

  def row(part, name, x, reference, evals=None, seconds=None, **extra):
    d, l = swd(x, reference), lay(x, reference)
    r = {"part": part, "sampler": name, "swd": d.mean, "swd_ci": d.mean_ci,
         "swd_per_level": d.per_level, "levels": d.levels, "layout": l.distance,
         "layout_ci": l.ci, "layout_residual": l.residual, "evals": evals, "seconds": seconds,
         **extra}
    results["rows"].append(r)
    ci = f"[{d.mean_ci[0] * 1e3:6.2f}, {d.mean_ci[1] * 1e3:6.2f}]" if d.mean_ci else ""
    ev = "" if evals is None else f"{evals:8.0f}"
    sec = "" if seconds is None else f"{seconds:8.0f}"
    print(f"{part:5s} {name:24s} {ev:>8s} {sec:>8s}  SWD x1e3 {d.mean * 1e3:7.2f} {ci}  "
          f"layout x1e3 {l.distance * 1e3:6.1f} [{l.ci[0] * 1e3:.1f}, {l.ci[1] * 1e3:.1f}] "
          f"(residual {l.residual:.3f} vs {l.reference_residual:.3f})  per level "
          + " ".join(f"{v * 1e3:.2f}" for v in d.per_level), flush=True)

  def chunked(kind, name, cfgs, make):
    """make(keys, start) -> dict of arrays for samples start.. of one chunk; the chunks cached
    (resumable: an interrupted run keeps its finished chunks) and concatenated."""
    parts_ = []
    for start in range(0, n, args.chunk):
      stop = min(n, start + args.chunk)
      path = os.path.join(cache, f"{kind}_{name}_{_key(args.model, cfgs, args.seed)}_{start}-{stop}.npz")

      def run(start=start, stop=stop):
        t0 = time.time()
        out = make(keys[start:stop], start)
        jax.block_until_ready(out)
        out = {k: np.asarray(v) for k, v in out.items()}
        out.update(seconds=np.float64(time.time() - t0), config=np.array(repr(cfgs)),
                   command=np.array(" ".join(sys.argv)), keys=np.array(
                       f"jax.random.fold_in(jax.random.key({args.seed}), i), i in "
                       f"[{start}, {stop})"))
        print(f"  {kind} {name}: samples {start}-{stop - 1} in {out['seconds']:.0f} s",
              flush=True)
        return out
      parts_.append(_cached(path, run))
    out = {k: np.concatenate([c[k] for c in parts_]) for k in parts_[0]
           if k not in ("seconds", "config", "command", "keys")}
    out["seconds"] = float(sum(float(c["seconds"]) for c in parts_))
    return out

  def low_samples(name, cfg=None):
    cfg = cfg or table[name][0]

    def make(k, start):
      low, info = sampling._global_ascent(  # pylint: disable=protected-access
          k, params, tuple(real_low.shape[1:]), cfg)
      return {"low": low, "evals": info.evals, "steps": info.steps}
    return chunked("low", name, cfg, make)

  def rescaled(name, low):  # the release's per-image min-max rescale of a low-pass from 0
    cfg = table[name][0]
    return np.asarray(sampling.rescale_min_max(low, 0.0, 0.8)) if cfg.mean_0 == 0 else low

  print(f"{'part':5s} {'sampler':24s} {'evals':>8s} {'seconds':>8s}  (evals: network calls per "
        "sample; seconds: the whole set)")
  diffs = {"SWD": lambda x, base, r: quality.swd_difference(
      x, base, r, seed=args.seed, patches=args.patches, directions=args.directions,
      bootstrap=args.bootstrap),
           "layout": lambda x, base, r: quality.layout_difference(
               x, base, r, seed=args.seed, bootstrap=4 * args.bootstrap)}

  def compare(part, sets, reference, real_a, real_b):
    """Each sampler's paired SWD and layout differences to the release's; each tolerance is
    the upper end of the same difference between two disjoint real sets of the same size; a
    sampler meets the target when both differences are within theirs."""
    tols = {m: f(real_b, real_a, reference)[1][1] for m, f in diffs.items()}
    print(f"{part}: tolerances (two real sets of {n}: upper 95% end of their paired "
          "difference) " + ", ".join(f"{m} {t * 1e3:.2f} x1e-3" for m, t in tols.items()))
    results.setdefault("tolerance", {})[part] = tols
    if "release" not in sets:
      return
    for name, x in sets.items():
      if name == "release":
        continue
      r = next(r for r in results["rows"] if r["part"] == part and r["sampler"] == name)
      verdicts = []
      for m, f in diffs.items():
        d, (lo, hi) = f(x, sets["release"], reference)
        ok = d <= tols[m]
        r[f"{m.lower()}_vs_release"] = {"delta": d, "delta_ci": (lo, hi), "meets": bool(ok)}
        verdicts.append(f"{m} {d * 1e3:+7.2f} [{lo * 1e3:+.2f}, {hi * 1e3:+.2f}] "
                        + ("ok" if ok else f"misses by {(d - tols[m]) * 1e3:.2f}"))
      r["meets"] = all(r[f"{m.lower()}_vs_release"]["meets"] for m in diffs)
      print(f"{part:5s} {name:24s} minus the release's, x1e3: " + "; ".join(verdicts)
            + f": {'meets' if r['meets'] else 'misses'} the target", flush=True)

  def degraded(part, x, reference, scale):
    """The metrics' validation rows: the release's samples blurred by a 1-pixel Gaussian,
    with noise of std 0.02 (of the image range ``scale``), and with their top and bottom
    halves swapped (a broken layout)."""
    row(part, "release, blurred 1 px", np.asarray(evaluation.gaussian_blur(x, 1.0)), reference)
    noise = np.random.default_rng(args.seed).standard_normal(x.shape).astype(np.float32)
    row(part, "release, noise 0.02", x + 0.02 * scale * noise, reference)
    h = x.shape[1] // 2
    row(part, "release, halves swapped", np.concatenate([x[:, h:], x[:, :h]], 1), reference)

  if "low" in parts:
    row("low", "real (floor)", real_low, ref_low)
    sets = {}
    for name in chosen:
      s = low_samples(name)
      sets[name] = rescaled(name, s["low"])
      row("low", name, sets[name], ref_low, float(np.mean(s["evals"])),
          float(s["seconds"]), steps_max=int(np.max(s["steps"])))
      if name == "release":  # the metric's validation: degraded release samples score worse
        rel = sets[name]
        tenth = dataclasses.replace(table[name][0],
                                    max_steps=max(1, int(np.median(s["steps"])) // 10))
        t = low_samples("release_tenth", tenth)
        row("low", "release, 1/10 steps", rescaled(name, t["low"]), ref_low,
            float(np.mean(t["evals"])))
        # The low-pass of images in [0, 1] spans [0, 2^J]: noise 0.02 of that range.
        degraded("low", rel, ref_low, 2.0 ** levels)
    compare("low", sets, ref_low, real_low, real2_low)
    _sample_grid(sets, os.path.join(args.out, "samples_low.png"))
  if "full" in parts:
    row("full", "real (floor)", real, ref)
    sets = {}
    for name in chosen:
      low_cfg, cond_cfg, _ = table[name]
      low = low_samples(name)

      def make(k, start, name=name, cond_cfg=cond_cfg, low=low):
        conds = sampling._cond_configs(params.spec, release_cond if cond_cfg is None  # pylint: disable=protected-access
                                       else cond_cfg)
        first = rescaled(name, low["low"][start:start + len(k)])
        outs, infos = sampling._refine(  # pylint: disable=protected-access
            k, params, jax.numpy.asarray(first), conds)
        return {"x": outs[-1], "evals": sum(i.evals for i in infos)}
      f = chunked("full", name, (low_cfg, cond_cfg), make)
      sets[name] = f["x"]
      row("full", name, f["x"], ref, float(np.mean(f["evals"] + low["evals"])),
          float(f["seconds"] + low["seconds"]), cond_evals=float(np.mean(f["evals"])))
      if name == "release":
        degraded("full", f["x"], ref, 1.0)
    compare("full", sets, ref, real, real2)
    _sample_grid(sets, os.path.join(args.out, "samples_full.png"))
  if "sr" in parts:
    seen, base = set(), None
    for name in ["release"] + [c for c in chosen if c != "release"]:
      cond_cfg = table[name][1]
      if repr(cond_cfg) in seen:
        continue
      seen.add(repr(cond_cfg))
      t0 = time.time()
      sr, _, infos = wcdm_jax.super_resolve(jax.random.key(args.seed + 1), params, real_low,
                                            cond_config=release_cond if cond_cfg is None
                                            else cond_cfg, return_intermediates=True)
      psnr = np.asarray(evaluation.psnr(sr, real))
      dt = time.time() - t0
      ev = float(np.mean(sum(np.asarray(i.evals) for i in infos)))
      label = "release ascent" if cond_cfg is None else name
      r = {"part": "sr", "sampler": label, "psnr": float(psnr.mean()),
           "psnr_stderr": float(psnr.std(ddof=1) / np.sqrt(len(psnr))), "evals": ev,
           "seconds": dt}
      line = f"sr    {label:24s} {ev:8.0f} {dt:8.0f}  PSNR {psnr.mean():.2f} dB"
      if base is None:
        base = psnr
      else:
        dp = psnr - base  # paired: the same images
        se = float(dp.std(ddof=1) / np.sqrt(len(dp)))
        r.update(delta_vs_release=float(dp.mean()), delta_stderr=se,
                 meets=bool(dp.mean() >= -max(2 * se, 0.2)))
        line += (f", minus the release's {dp.mean():+.2f} dB (paired s.e. {se:.2f}): "
                 f"{'meets' if r['meets'] else 'misses'} the target")
      results["rows"].append(r)
      print(line, flush=True)
  if "time" in parts:
    _time_part(args, params, keys, results)
  if "inverse" in parts and size != 160:
    print(f"inverse: skipped (the flat RF 43 prior is a 160x160 model; --model is {size}x{size})")
  elif "inverse" in parts:
    _inverse_part(args, params, real[:args.inverse_images], cache, results)
  os.makedirs(args.out, exist_ok=True)
  with open(os.path.join(args.out, "sample_quality.json"), "w") as fh:
    json.dump(results, fh, indent=1)
  print(f"wrote {os.path.join(args.out, 'sample_quality.json')}")
  _figure(results, table, os.path.join(args.out, "sample_quality.png"))


def _sample_grid(sets: dict, path: str, count: int = 8) -> None:
  """One row per sampler (in --samplers order): its first ``count`` samples."""
  from wcdm_jax import reporting  # pylint: disable=g-import-not-at-top
  reporting.save_png(path, reporting.image_grid([list(x[:count]) for x in sets.values()]))
  print(f"wrote {path} (rows: {', '.join(sets)})")


def _time_part(args, params, keys, results: dict) -> None:
  """Seconds per sample of the release's settings and of the recommended ones, side by side."""
  import jax  # pylint: disable=g-import-not-at-top
  import wcdm_jax  # pylint: disable=g-import-not-at-top
  from wcdm_jax import sampling  # pylint: disable=g-import-not-at-top
  spec = params.spec
  k = keys[:args.time_samples]
  shape = (spec.image_size[0] // 2 ** spec.levels, spec.image_size[1] // 2 ** spec.levels,
           spec.channels)
  rec = params.sampling or sampling.release_recommended(spec.levels)
  seconds = {}
  for name, s in (("release settings", sampling.release_settings(spec.levels)),
                  ("recommended (the default)", rec)):
    t0 = time.time()  # compilation alone: the low-pass and the details' programs
    sampling._global_ascent.lower(k, params, shape, s.low).compile()  # pylint: disable=protected-access
    sampling._refine.lower(k, params, jax.ShapeDtypeStruct((len(k),) + shape, jax.numpy.float32),  # pylint: disable=protected-access
                           s.cond).compile()
    compile_s = time.time() - t0
    t0 = time.time()
    x, _, infos = wcdm_jax.sample(k, params, low_config=s.low, cond_config=s.cond,
                                  low_rescale=s.low_rescale, return_intermediates=True)
    jax.block_until_ready(x)
    dt = time.time() - t0
    evals = float(sum(float(i.evals.mean()) for i in infos))
    seconds[name] = dt / len(k)
    results["rows"].append({"part": "time", "sampler": name, "seconds_per_sample": dt / len(k),
                            "compile_seconds": compile_s, "evals": evals})
    print(f"time  {name:26s} {evals:8.0f} evals  {dt / len(k):8.1f} s per sample "
          f"(a batch of {len(k)}, compilation included; compiling alone took {compile_s:.0f} s)",
          flush=True)
  ratio = seconds["release settings"] / seconds["recommended (the default)"]
  print(f"time  the recommended settings are {ratio:.1f}x faster per sample than the release's",
        flush=True)


def _inverse_part(args, ms_params, images, cache: str, results: dict) -> None:
  """PSNR and network evaluations of each inverse_samplers() setting on three problems and
  two priors, paired by image with today's default (the same measurements and keys)."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from wcdm_jax import evaluation, inverse, pretrained  # pylint: disable=g-import-not-at-top
  flat = pretrained.load_release_model(
      pretrained.find_release_models(bench.RELEASE)["flat_celebA_160x160_gray_rf43"])
  shape = images.shape[1:]
  problems = {"hole 40x40": inverse.Inpainting(inverse.box_mask(shape[:2], 40)),
              "90% pixels missing": inverse.RandomPixels(0.1, jax.random.key(args.seed), shape),
              "4x block average": inverse.BlockAverage(4, shape)}
  keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(args.seed + 2), i))(
      jax.numpy.arange(len(images)))
  table = inverse_samplers()
  print(f"inverse: {len(images)} images; PSNR dB (paired difference to the default's, its s.e.)")
  for prob, op in problems.items():
    y = op.forward(jax.numpy.asarray(images))
    for prior, params in (("flat RF 43", flat), ("multi-scale RF 13", ms_params)):
      base = None
      for name, make_cfg in table.items():
        cfg = inverse.solver.resolve(make_cfg(op), op)
        path = os.path.join(cache, f"inverse_{_key(prob, prior, repr(cfg), args.seed, len(images))}.npz")

        def run(cfg=cfg, params=params, y=y, op=op):
          t0 = time.time()
          x, info = inverse.solve(keys, params, op, y, config=cfg, return_info=True)
          infos = info if isinstance(info, list) else [info]
          return {"x": np.asarray(x), "evals": sum(np.asarray(i.evals) for i in infos),
                  "seconds": np.float64(time.time() - t0)}
        out = _cached(path, run)
        psnr = np.asarray(evaluation.psnr(out["x"], images))
        ev = float(np.mean(out["evals"]))
        r = {"part": "inverse", "problem": prob, "prior": prior, "sampler": name,
             "psnr": float(psnr.mean()), "evals": ev, "seconds": float(out["seconds"])}
        line = f"inv   {prob:19s} {prior:18s} {name:14s} {ev:7.0f} evals  PSNR {psnr.mean():.2f}"
        if base is None:
          base = (psnr, ev)
        else:
          dp = psnr - base[0]
          se = float(dp.std(ddof=1) / np.sqrt(len(dp)))
          r.update(delta_vs_default=float(dp.mean()), delta_stderr=se,
                   meets=bool(dp.mean() >= -max(2 * se, 0.2) and ev <= base[1] / 5))
          line += (f" ({dp.mean():+.2f}, s.e. {se:.2f}; {base[1] / ev:.1f}x fewer evals): "
                   f"{'meets' if r['meets'] else 'misses'} the target")
        results["rows"].append(r)
        print(line, flush=True)


def _figure(results: dict, table: dict, path: str) -> None:
  try:
    import matplotlib  # pylint: disable=g-import-not-at-top
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  except ImportError:
    print("no figure: pip install matplotlib (the 'experiments' extra)")
    return
  parts = [p for p in ("low", "full") if any(r["part"] == p for r in results["rows"])]
  if not parts:
    return
  metrics = (("swd", "SWD x 1e3"), ("layout", "layout distance x 1e3"))
  fig, axes = plt.subplots(len(metrics), len(parts), figsize=(6 * len(parts), 9),
                           squeeze=False)
  for col, part in enumerate(parts):
    rows = [r for r in results["rows"] if r["part"] == part]
    families = {}
    for r in rows:
      if r["sampler"] in table and r["evals"]:
        families.setdefault(table[r["sampler"]][2], []).append(r)
    for (key, label), ax in zip(metrics, axes[:, col]):
      for fam, rs in families.items():
        rs = sorted(rs, key=lambda r: r["evals"])
        ax.errorbar([r["evals"] for r in rs], [r[key] * 1e3 for r in rs],
                    yerr=[[(r[key] - r[key + "_ci"][0]) * 1e3 for r in rs],
                          [(r[key + "_ci"][1] - r[key]) * 1e3 for r in rs]],
                    marker="*" if fam == "release ascent" else "o",
                    ms=12 if fam == "release ascent" else 5, capsize=3, label=fam)
        for r in rs:  # a missed target, and by how much
          miss = r.get(f"{key}_vs_release")
          if miss and not miss["meets"]:
            over = miss["delta"] - results["tolerance"][part][{"swd": "SWD"}.get(key, key)]
            ax.annotate(f"misses by {over * 1e3:.0f}", (r["evals"], r[key] * 1e3),
                        textcoords="offset points", xytext=(4, 4), fontsize=7, color="red")
      for r in rows:
        if r["sampler"] == "real (floor)":
          ax.axhline(r[key] * 1e3, color="k", ls=":", label="real images (floor)")
      ax.set_xscale("log")
      ax.set_xlabel("network evaluations per sample")
      ax.set_ylabel(f"{label} (lower is better)")
      ax.set_title({"low": "low-pass samples", "full": "full-size samples"}[part])
      ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  print(f"wrote {path}")


if __name__ == "__main__":
  main()
