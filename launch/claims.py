"""The paper's three claims about multi-scale denoising (method.md §6), checked on
``wcdm_jax.evaluation.denoising_curve`` results: experiment code of the reproduction
(launch/reproduce.py), not part of the library."""
from __future__ import annotations

import numpy as np


def multiscale_claims(results: dict[str, dict], *, flat_small: str, flat_large: str,
                      ms_small: str, ms_large: str, tolerance_db: float = 0.3,
                      flat_gap_db: float = 2.0) -> dict:
  """The paper's three claims (method.md §6), checked on ``denoising_curve`` results by name.

  1. the multi-scale model with small-RF conditional nets is within ``tolerance_db`` of the
     one with large-RF conditional nets at every noise level > 0 (the paper's figure plots
     output against input PSNR, so it has no noise-free point);
  2. the small-RF flat net is at least ``flat_gap_db`` below the large-RF flat net wherever
     the input PSNR is <= 0 dB;
  3. the small-RF multi-scale model is at or above the large-RF flat net there.
  Returns {'noise_std_255', 'psnr_in', 'claims': [{'claim', 'held', 'detail', 'diff_db',
  'worst_db', 'bound_db'}]}; 'worst_db' is the difference at the level furthest from the claim
  (NaN where no level qualifies), the figure to follow across budgets, and 'bound_db' the
  claim's bound on it (claim 1: on its absolute value).
  """
  out = {k: np.asarray(results[k]["psnr_out"], np.float64)
         for k in (flat_small, flat_large, ms_small, ms_large)}
  pin = np.asarray(results[flat_large]["psnr_in"], np.float64)
  sigma = np.asarray(results[flat_large]["sigma"], np.float64)
  high = pin <= 0.0

  def claim(text, diff, ok, where, worst, bound):
    diff = diff[where]
    held = bool(where.any() and ok(diff).all())
    detail = ("no noise level qualifies" if not where.any() else
              "differences (dB) " + ", ".join(f"{d:+.2f} at {s * 255:g}/255"
                                             for d, s in zip(diff, sigma[where])))
    return {"claim": text, "held": held, "detail": detail, "diff_db": diff.tolist(),
            "worst_db": float(worst(diff)) if where.any() else float("nan"), "bound_db": bound}

  noisy = sigma > 0
  claims = [
      claim(f"{ms_small} within {tolerance_db} dB of {ms_large} at every noise level > 0",
            out[ms_small] - out[ms_large], lambda d: np.abs(d) <= tolerance_db, noisy,
            lambda d: d[np.argmax(np.abs(d))], tolerance_db),
      claim(f"{flat_small} at least {flat_gap_db} dB below {flat_large} at input PSNR <= 0 dB",
            out[flat_small] - out[flat_large], lambda d: d <= -flat_gap_db, high, np.max,
            -flat_gap_db),
      claim(f"{ms_small} at or above {flat_large} at input PSNR <= 0 dB",
            out[ms_small] - out[flat_large], lambda d: d >= 0.0, high, np.min, 0.0),
  ]
  return {"noise_std_255": (sigma * 255).tolist(), "psnr_in": pin.tolist(), "claims": claims}
