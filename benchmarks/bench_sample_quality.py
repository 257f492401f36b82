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
Samples are cached in OUT/cache/ by model, sampler, count and seed: a rerun only computes
what is new (the release sampler's set takes about an hour on a 2-core CPU). Prints a table,
writes OUT/sample_quality.json and OUT/sample_quality.png (SWD against evaluations, one curve
per sampler family, the release setting marked).
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
  quickstart's ascending ascent, and the probability flow at several budgets."""
  from wcdm_jax import sampling  # pylint: disable=g-import-not-at-top
  out = {"release": (sampling.RELEASE_LOW, None, "release ascent"),
         "ascending": (dataclasses.replace(sampling.RELEASE_LOW, ascending=True, beta=0.1,
                                           sigma_L=0.05, max_steps=3000),
                       None, "ascending ascent")}
  # The flow's low-pass starts at mid-grey; the details' at 0, their mean. sigma_max 1 is the
  # nets' training range; 3 with a little churn measured best on this model's low-pass.
  for n, smax, churn in ((18, 1.0, 0.0), (6, 3.0, 0.1), (11, 3.0, 0.1), (18, 3.0, 0.1),
                         (32, 3.0, 0.1), (64, 3.0, 0.1), (18, 3.0, 0.0)):
    flow = sampling.FlowConfig(num_steps=n, mean_0=0.5, sigma_max=smax, churn=churn)
    name = f"heun{n}" + (f"_smax{smax:g}" if smax != 3.0 else "") + ("_nochurn" if not churn else "")
    out[name] = (flow, dataclasses.replace(flow, mean_0=0.0), "flow (Heun)" if churn
                 else "flow (Heun, deterministic)")
  for n in (20, 50):
    flow = sampling.FlowConfig(method="euler", num_steps=n, mean_0=0.5, sigma_max=3.0, churn=0.1)
    out[f"euler{n}"] = (flow, dataclasses.replace(flow, mean_0=0.0), "flow (Euler)")
  return out


def _key(*parts) -> str:
  return hashlib.sha256(repr(parts).encode()).hexdigest()[:16]


def _cached(path: str, make):
  """make() -> dict of arrays, stored at ``path`` (npz) and read back on a rerun."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  if os.path.exists(path):
    with np.load(path) as z:
      return {k: z[k] for k in z.files}
  arrays = make()
  os.makedirs(os.path.dirname(path), exist_ok=True)
  np.savez(path + ".tmp.npz", **arrays)
  os.replace(path + ".tmp.npz", path)
  return arrays


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--out", default="/tmp/wcdm_sample_quality")
  p.add_argument("--parts", default="low,full,sr", help="comma-separated: low, full, sr")
  p.add_argument("--samplers", default="", help="comma-separated subset (default: all)")
  p.add_argument("--num_samples", type=int, default=24)
  p.add_argument("--reference_images", type=int, default=256)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--patches", type=int, default=16384, help="SWD descriptors per level")
  p.add_argument("--directions", type=int, default=512)
  p.add_argument("--bootstrap", type=int, default=50)
  p.add_argument("--chunk", type=int, default=4, help="samples per cached batch")
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
  params = pretrained.load_release_model(pretrained.find_release_models(bench.RELEASE)[MODEL])
  levels = params.spec.levels
  n = args.num_samples
  images = common.load_images(f"folder:{DATA}", 160, 1, "celeba",
                              2 * n + args.reference_images, "eval", 0.1)
  real, real2, ref = images[:n], images[n:2 * n], images[2 * n:]
  real_low, real2_low, ref_low = (np.asarray(wcdm_jax.decompose(x, levels).low)
                                  for x in (real, real2, ref))
  print(f"model {MODEL}; 2 x {len(real)} real and {len(ref)} reference images "
        f"(eval split of {os.path.normpath(DATA)}); CPU: {native_build.cpu_name()} ({native_build.cpu_isas()[0]})")
  swd = lambda x, r: quality.swd(x, r, seed=args.seed, patches=args.patches,
                                 directions=args.directions, bootstrap=args.bootstrap)
  # Sample i's key depends on i only: a larger --num_samples extends a set, chunks are reusable.
  keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(args.seed), i))(jax.numpy.arange(n))
  cache = os.path.join(args.out, "cache")
  results = {"model": MODEL, "num_samples": n, "reference_images": len(ref), "rows": []}

  def row(part, name, d, evals=None, seconds=None, **extra):
    r = {"part": part, "sampler": name, "swd": d.mean, "swd_ci": d.mean_ci,
         "swd_per_level": d.per_level, "levels": d.levels, "evals": evals, "seconds": seconds,
         **extra}
    results["rows"].append(r)
    ci = f"[{d.mean_ci[0] * 1e3:6.2f}, {d.mean_ci[1] * 1e3:6.2f}]" if d.mean_ci else ""
    ev = "" if evals is None else f"{evals:8.0f}"
    sec = "" if seconds is None else f"{seconds:8.0f}"
    print(f"{part:5s} {name:24s} {ev:>8s} {sec:>8s}  SWD x1e3 {d.mean * 1e3:7.2f} {ci}  "
          f"per level " + " ".join(f"{v * 1e3:.2f}" for v in d.per_level), flush=True)

  def chunked(kind, name, cfgs, make):
    """make(keys, start) -> dict of arrays for samples start.. of one chunk; the chunks cached
    (resumable: an interrupted run keeps its finished chunks) and concatenated."""
    parts_ = []
    for start in range(0, n, args.chunk):
      stop = min(n, start + args.chunk)
      path = os.path.join(cache, f"{kind}_{name}_{_key(MODEL, cfgs, args.seed)}_{start}-{stop}.npz")

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
  diff = lambda x, base, r: quality.swd_difference(
      x, base, r, seed=args.seed, patches=args.patches, directions=args.directions,
      bootstrap=args.bootstrap)

  def compare(part, sets, reference, real_a, real_b):
    """Each sampler's paired SWD difference to the release's; the tolerance is the upper end
    of the same difference between two disjoint real sets of the same size."""
    _, (_, tol) = diff(real_b, real_a, reference)
    print(f"{part}: tolerance (two real sets of {n}: upper 95% end of their paired SWD "
          f"difference) {tol * 1e3:.2f} x1e-3")
    results.setdefault("tolerance", {})[part] = tol
    if "release" not in sets:
      return
    for name, x in sets.items():
      if name == "release":
        continue
      d, (lo, hi) = diff(x, sets["release"], reference)
      meets = d <= tol
      r = next(r for r in results["rows"] if r["part"] == part and r["sampler"] == name)
      r.update(delta_vs_release=d, delta_ci=(lo, hi), meets=bool(meets))
      print(f"{part:5s} {name:24s} SWD - release's x1e3 {d * 1e3:+7.2f} [{lo * 1e3:+.2f}, "
            f"{hi * 1e3:+.2f}]: {'meets' if meets else 'misses'} the tolerance"
            + ("" if meets else f" by {(d - tol) * 1e3:.2f}"), flush=True)

  if "low" in parts:
    row("low", "real (floor)", swd(real_low, ref_low))
    sets = {}
    for name in chosen:
      s = low_samples(name)
      sets[name] = rescaled(name, s["low"])
      row("low", name, swd(sets[name], ref_low), float(np.mean(s["evals"])),
          float(s["seconds"]), steps_max=int(np.max(s["steps"])))
      if name == "release":  # the metric's validation: degraded release samples score worse
        rel = sets[name]
        tenth = dataclasses.replace(table[name][0],
                                    max_steps=max(1, int(np.median(s["steps"])) // 10))
        t = low_samples("release_tenth", tenth)
        row("low", "release, 1/10 steps", swd(rescaled(name, t["low"]), ref_low),
            float(np.mean(t["evals"])))
        row("low", "release, blurred 1 px", swd(np.asarray(evaluation.gaussian_blur(
            rel, 1.0)), ref_low))
        noise = np.random.default_rng(args.seed).standard_normal(rel.shape).astype(np.float32)
        row("low", "release, noise 0.02", swd(rel + 0.02 * noise, ref_low))
    compare("low", sets, ref_low, real_low, real2_low)
  if "full" in parts:
    row("full", "real (floor)", swd(real, ref))
    sets = {}
    for name in chosen:
      low_cfg, cond_cfg, _ = table[name]
      low = low_samples(name)

      def make(k, start, name=name, cond_cfg=cond_cfg, low=low):
        conds = sampling._cond_configs(params.spec, cond_cfg)  # pylint: disable=protected-access
        first = rescaled(name, low["low"][start:start + len(k)])
        outs, infos = sampling._refine(  # pylint: disable=protected-access
            k, params, jax.numpy.asarray(first), conds)
        return {"x": outs[-1], "evals": sum(i.evals for i in infos)}
      f = chunked("full", name, (low_cfg, cond_cfg), make)
      sets[name] = f["x"]
      row("full", name, swd(f["x"], ref), float(np.mean(f["evals"] + low["evals"])),
          float(f["seconds"] + low["seconds"]), cond_evals=float(np.mean(f["evals"])))
    compare("full", sets, ref, real, real2)
  if "sr" in parts:
    seen, base = set(), None
    for name in ["release"] + [c for c in chosen if c != "release"]:
      cond_cfg = table[name][1]
      if repr(cond_cfg) in seen:
        continue
      seen.add(repr(cond_cfg))
      t0 = time.time()
      sr, _, infos = wcdm_jax.super_resolve(jax.random.key(args.seed + 1), params, real_low,
                                            cond_config=cond_cfg, return_intermediates=True)
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
  os.makedirs(args.out, exist_ok=True)
  with open(os.path.join(args.out, "sample_quality.json"), "w") as fh:
    json.dump(results, fh, indent=1)
  print(f"wrote {os.path.join(args.out, 'sample_quality.json')}")
  _figure(results, table, os.path.join(args.out, "sample_quality.png"))


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
  fig, axes = plt.subplots(1, len(parts), figsize=(6 * len(parts), 4.5), squeeze=False)
  for ax, part in zip(axes[0], parts):
    rows = [r for r in results["rows"] if r["part"] == part]
    families = {}
    for r in rows:
      if r["sampler"] in table and r["evals"]:
        families.setdefault(table[r["sampler"]][2], []).append(r)
    for fam, rs in families.items():
      rs.sort(key=lambda r: r["evals"])
      ax.errorbar([r["evals"] for r in rs], [r["swd"] * 1e3 for r in rs],
                  yerr=[[(r["swd"] - r["swd_ci"][0]) * 1e3 for r in rs],
                        [(r["swd_ci"][1] - r["swd"]) * 1e3 for r in rs]],
                  marker="*" if fam == "release ascent" else "o", ms=12 if fam == "release ascent"
                  else 5, capsize=3, label=fam)
    for r in rows:
      if r["sampler"] == "real (floor)":
        ax.axhline(r["swd"] * 1e3, color="k", ls=":", label="real images (floor)")
    ax.set_xscale("log")
    ax.set_xlabel("network evaluations per sample")
    ax.set_ylabel("SWD x 1e3 (lower is better)")
    ax.set_title({"low": "40x40 low-pass samples", "full": "160x160 samples"}[part])
    ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  print(f"wrote {path}")


if __name__ == "__main__":
  main()
