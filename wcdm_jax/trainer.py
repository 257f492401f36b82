"""The training run: nets of one model, checkpoints, resume, logging and a final figure.

``train(...)`` trains the chosen nets of a ``ModelSpec`` (all by default, or a subset: one
job per scale as the authors ran it) with batches from a ``data.Source``. The loop is
resumable at the exact step: each net's optimizer and batch-norm state come back from its
checkpoint, and the RNG and the data position are pure functions of the step.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import time
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from wcdm_jax import checkpoints, data, denoising, evaluation, models, reporting, training


@dataclasses.dataclass(frozen=True)
class RunConfig:
  """Bookkeeping of a run (not of the optimisation)."""
  workdir: str
  nets: tuple[str, ...] = ()       # empty = every net of the model
  log_every: int = 50
  eval_every: int = 200
  eval_sigma: float = 0.1          # noise std of the per-scale PSNR
  eval_batch_size: int = 16
  checkpoint_every: int = 500
  keep_checkpoints: int = 3
  noise_scale_batches: int = 20    # batches scanned for the cond nets' detail noise scale
  stop_after: int = 0              # stop (as if pre-empted) after this many steps; 0 = never
  figure: bool = True


def _net_names(spec: models.ModelSpec, nets: Sequence[str]) -> list[str]:
  names = list(spec.nets)
  chosen = list(nets) or names
  bad = [n for n in chosen if n not in names]
  if bad:
    raise ValueError(f"unknown nets {bad}; this model has {names}")
  return [n for n in names if n in chosen]


def train(spec: models.ModelSpec, data_cfg: data.DataConfig, cfg: training.TrainConfig,
          run: RunConfig, log=logging.info) -> dict[str, dict]:
  """Train (or resume) the run's nets; returns each net's final metrics."""
  mesh = training.make_mesh()
  n_dev = mesh.devices.size
  if cfg.batch_size % n_dev:
    raise ValueError(f"batch_size {cfg.batch_size} must be divisible by the {n_dev} devices")
  names = _net_names(spec, run.nets)
  checkpoints.write_spec(run.workdir, spec)
  pi, pc = jax.process_index(), jax.process_count()
  source = data.make_source(data_cfg, cfg.batch_size, cfg.seed, "train", pi, pc)
  eval_images = jnp.asarray(data.make_source(data_cfg, run.eval_batch_size, cfg.seed + 1,
                                             "eval").batch(0))
  log(f"devices: {n_dev} ({jax.devices()[0].platform}); hosts: {pc}; nets: {names}; "
      f"global batch {cfg.batch_size}")

  # Noise scale of each conditional net: largest detail magnitude in the training data.
  scales = training.detail_noise_scales(
      spec, [source.batch(i) for i in range(run.noise_scale_batches)]) if spec.levels else {}

  nets = {}
  for idx, name in enumerate(names):
    net = spec.nets[name]
    tx = training.make_optimizer(spec, name, cfg)
    mngr = checkpoints.manager(run.workdir, name, run.keep_checkpoints)
    state = training.init_state(jax.random.fold_in(jax.random.key(cfg.seed), 1000 + idx), net, tx)
    meta = {"net": name, "noise_scale": scales.get(name, 1.0),
            "train_config": dataclasses.asdict(cfg), "data_config": dataclasses.asdict(data_cfg)}
    if mngr.latest_step() is not None:
      state_dict, meta = checkpoints.restore(mngr, training.replicate(state.as_dict(), mesh))
      state = training.TrainState(**state_dict)
      log(f"{name}: resumed at step {int(state.step)} from {mngr.directory}")
    state = training.replicate(state, mesh)
    step_fn = training.make_train_step(spec, name, tx, cfg, mesh, meta["noise_scale"])
    nets[name] = dict(idx=list(spec.nets).index(name), state=state, mngr=mngr, meta=meta,
                      step_fn=step_fn, total=training.net_num_steps(spec, name, cfg))

  writer = reporting.MetricsWriter(os.path.join(run.workdir, "metrics.jsonl"))
  eval_fns = {name: jax.jit(lambda v, k, name=name: evaluation.scale_psnr(
      spec, name, v, eval_images, run.eval_sigma, k, cfg.conv_impl)) for name in names}
  start = min(int(n["state"].step) for n in nets.values())
  end = max(n["total"] for n in nets.values())
  bar = reporting.ProgressBar(end, "train")
  bar.update(start)
  final: dict[str, dict] = {}
  t0, steps_done = time.time(), 0
  for step in range(start, end):
    active = [n for n in names if int(nets[n]["state"].step) == step < nets[n]["total"]]
    if not active:
      continue
    images = training.global_batch(source.batch(step), mesh)
    metrics = {}
    for name in active:
      n = nets[name]
      n["state"], m = n["step_fn"](n["state"], images, training.step_key(cfg.seed, step, n["idx"]))
      metrics[name] = m
    steps_done += 1
    done = step + 1
    last = done == end or (run.stop_after and steps_done >= run.stop_after)
    if done % run.log_every == 0 or last:
      rate = steps_done / (time.time() - t0)
      row = {f"{k}/loss": float(m["loss"]) for k, m in metrics.items()}
      writer.write(done, steps_per_s=rate, **row)
      msg = " ".join(f"{k}={v:.4g}" for k, v in row.items())
      log(f"step {done}/{end} {rate:.2f} steps/s {msg}")
      bar.update(done, msg)
    if done % run.eval_every == 0 or last:
      row = {}
      for name in active:
        noisy, den = eval_fns[name](nets[name]["state"].variables(), jax.random.key(step))
        row[f"{name}/psnr_noisy"], row[f"{name}/psnr_denoised"] = float(noisy), float(den)
        final[name] = {"psnr_noisy": float(noisy), "psnr_denoised": float(den)}
      writer.write(done, **row)
      log(f"step {done}: per-scale PSNR (sigma={run.eval_sigma}) " + " ".join(
          f"{n}: {row[f'{n}/psnr_noisy']:.2f}->{row[f'{n}/psnr_denoised']:.2f} dB" for n in active))
    for name in active:
      n = nets[name]
      if done % run.checkpoint_every == 0 or last or done == n["total"]:
        meta = dict(n["meta"], data_position=done)
        checkpoints.save(n["mngr"], done, n["state"].as_dict(), meta)
    if last and done != end:
      log(f"stopping after {steps_done} steps at step {done} (stop_after)")
      break
  bar.close()
  for n in nets.values():
    n["mngr"].wait_until_finished()
    n["mngr"].close()
  if run.figure and all(name in nets for name in spec.nets):
    path = save_denoising_figure(spec, {k: nets[k]["state"].variables() for k in nets},
                                 eval_images, os.path.join(run.workdir, "denoising.png"), log=log)
    log(f"wrote {path}")
  return final


def save_denoising_figure(spec: models.ModelSpec, variables: dict[str, models.Variables],
                          images: jax.Array, path: str, sigmas=(0.1, 0.2),
                          log=logging.info) -> str:
  """PNG rows: clean, then (noisy, denoised) per noise level, with PSNRs in the log."""
  params = models.ModelParams(low=variables[spec.low.name],
                              conditionals=tuple(variables[c.name] for c in spec.conditionals),
                              spec=spec)
  x = images[:6]
  rows = [list(np.asarray(x))]
  for i, s in enumerate(sigmas):
    y = x + s * jax.random.normal(jax.random.key(i), x.shape)
    d = denoising.denoise(params, y)
    log(f"figure, sigma {s:.2f}: noisy {float(evaluation.psnr(y, x).mean()):.2f} dB -> denoised "
        f"{float(evaluation.psnr(d, x).mean()):.2f} dB")
    rows += [list(np.asarray(y)), list(np.asarray(d))]
  return reporting.save_png(path, reporting.image_grid(rows, upscale=2))
