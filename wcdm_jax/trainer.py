"""The training run: nets of one model, checkpoints, resume, logging and a final figure.

``train(...)`` trains the chosen nets of a ``ModelSpec`` (all by default, or a subset: one
job per scale as the authors ran it) with batches from a ``data.Source``. The loop is
resumable at the exact step: each net's optimizer and batch-norm state come back from its
checkpoint, and the RNG and the data position are pure functions of the step.
"""
from __future__ import annotations

import collections
import dataclasses
import json
import logging
import os
import time
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from wcdm_jax import (checkpoints, data, denoising, evaluation, models, pipeline, reporting,
                      settings, training)
from wcdm_jax.settings import setting


@dataclasses.dataclass(frozen=True)
class RunConfig:
  """Bookkeeping of a run (not of the optimisation)."""
  workdir: str = setting(None, "Directory for checkpoints, metrics.jsonl and figures.")
  nets: tuple[str, ...] = setting((), "Nets to train (default all): flat | low,cond0,cond1,...")
  log_every: int = setting(50, "Steps between log lines.")
  eval_every: int = setting(200, "Steps between per-scale PSNR evaluations.")
  eval_sigma: float = setting(0.1, "Noise std of the per-scale PSNR.")
  eval_batch_size: int = setting(16, "Held-out images of the per-scale PSNR and the final "
                                 "comparison.")
  checkpoint_every: int = setting(500, "Steps between checkpoints.")
  keep_checkpoints: int = setting(3, "Checkpoints kept per net.")
  noise_scale_batches: int = setting(20, "Batches scanned for the conditional nets' detail "
                                     "noise scale.")
  stop_after: int = setting(0, "Stop (as if pre-empted) after this many steps of this run "
                            "(0 = never).")
  figure: bool = setting(True, "Write denoising.png and the final comparison at the end.")
  allow_config_change: bool = setting(False, "Resume checkpoints made with other training "
                                      "settings (batch, seed, learning rate, noise, data); by "
                                      "default that is an error.")
  data_workers: int = setting(-1, "Parallel input decoders (-1 = one per core up to 16, one for "
                              "the embedded data).")
  data_processes: int = -1         # 1: decoders are processes, 0: threads, -1: by core count
  # (file name, text) pairs written into the workdir once everything is validated, e.g. the
  # entry point's flags; an existing different file is kept as NAME.1, NAME.2, ...
  record: tuple[tuple[str, str], ...] = ()
  compare_sigmas: tuple[float, ...] = setting(
      (0.02, 0.05, 0.1, 0.2), "Noise stds of the final comparison of the whole model with the "
      "noisy input and the best Gaussian filter on the held-out images.")

  def __post_init__(self):
    if not self.workdir:
      raise ValueError("workdir must name a directory")
    for name in ("log_every", "eval_every", "eval_batch_size", "checkpoint_every",
                 "keep_checkpoints", "noise_scale_batches"):
      if getattr(self, name) < 1:
        raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
    if self.stop_after < 0:
      raise ValueError(f"stop_after must be >= 0, got {self.stop_after}")
    if self.data_workers == 0 or self.data_workers < -1:
      raise ValueError(f"data_workers must be -1 (automatic) or >= 1, got {self.data_workers}")
    if not (np.isfinite(self.eval_sigma) and self.eval_sigma >= 0):
      raise ValueError(f"eval_sigma must be a finite number >= 0, got {self.eval_sigma}")
    object.__setattr__(self, "nets", tuple(self.nets))
    object.__setattr__(self, "compare_sigmas", tuple(float(s) for s in self.compare_sigmas))


# What a resumed run may change without ``allow_config_change`` (the settings declared
# resumable): how long it trains, how the convolutions are computed (and in which precision),
# how many unreadable files are tolerated. Anything else (batch, seed, learning rate, noise,
# data) would silently continue another experiment.
DENOISING = "denoising"  # train()'s key of the final comparison (not a net name)
RESUMABLE_CHANGES = settings.resumable(training.TrainConfig) + settings.resumable(data.DataConfig)


def _net_names(spec: models.ModelSpec, nets: Sequence[str]) -> list[str]:
  names = list(spec.nets)
  chosen = list(nets) or names
  bad = [n for n in chosen if n not in names]
  if bad:
    raise ValueError(f"unknown nets {bad}; this model has {names}")
  return [n for n in names if n in chosen]


def held_out_images(data_cfg: data.DataConfig, n: int, seed: int) -> jax.Array:
  """(n, S, S, C) held-out images a run of ``seed`` evaluates on: its per-scale PSNR and its
  final comparison with the Gaussian filter (``comparison_key`` draws that one's noise)."""
  return jnp.asarray(data.make_source(data_cfg, n, seed + 1, "eval").batch(0))


def comparison_key(seed: int) -> jax.Array:
  """The key of the final comparison's noise (``evaluation.compare_with_gaussian``)."""
  return jax.random.key(seed + 7)


def config_changes(meta: dict, cfg: training.TrainConfig, data_cfg: data.DataConfig) -> list[str]:
  """'field: checkpoint X, this run Y' for every setting that differs from the checkpoint's
  (a setting the checkpoint's meta does not hold is not compared)."""
  out = []
  for key, current in (("train_config", dataclasses.asdict(cfg)),
                       ("data_config", dataclasses.asdict(data_cfg))):
    saved = meta.get(key) or {}
    for field, value in current.items():
      if field in RESUMABLE_CHANGES:
        continue
      if field in saved and saved[field] != value:
        out.append(f"{field}: checkpoint {saved[field]!r}, this run {value!r}")
  return out


def saved_train_config(meta: dict, cfg: training.TrainConfig) -> training.TrainConfig:
  """The TrainConfig a checkpoint was made with (``cfg`` for what its meta does not say)."""
  if not meta.get("train_config"):
    return cfg
  fields = {f.name for f in dataclasses.fields(training.TrainConfig)}
  saved = {**dataclasses.asdict(cfg), **meta["train_config"]}
  try:
    return training.TrainConfig(**{k: v for k, v in saved.items() if k in fields})
  except (TypeError, ValueError):
    return cfg


def _adapt_state(state: training.TrainState, cfg: training.TrainConfig,
                 tx, log) -> training.TrainState:
  """A resumed state in the layout of this run's recipe (only differs with
  --allow_config_change): an EMA starts at the resumed weights or is dropped, the loss
  weighting's running errors start afresh or are dropped, and an optimiser of another
  structure starts afresh."""
  ema = state.ema
  if cfg.ema_decay and ema is None:
    log("the weights' moving average starts at the resumed weights")
    ema = jax.tree.map(jnp.copy, state.variables())
  elif not cfg.ema_decay:
    ema = None
  opt_state = state.opt_state
  fresh = tx.init(state.params)
  if jax.tree.structure(fresh) != jax.tree.structure(opt_state):
    log("the optimiser changed structure: its state starts afresh")
    opt_state = fresh
  loss_stats = state.loss_stats
  if (loss_stats is None) == (cfg.loss_weighting == "balanced"):  # kept only when both have it
    loss_stats = training.init_loss_stats(cfg)
  return state.replace(ema=ema, opt_state=opt_state, loss_stats=loss_stats)


def _write_record(workdir: str, name: str, text: str) -> None:
  """Write WORKDIR/name atomically; a different existing file is kept as name.1, name.2, ..."""
  path = os.path.join(workdir, name)
  if os.path.exists(path):
    with open(path, encoding="utf-8", errors="replace") as f:
      if f.read() == text:
        return
    k = 1
    while os.path.exists(f"{path}.{k}"):
      k += 1
    os.replace(path, f"{path}.{k}")
  reporting.write_text_atomic(path, text)


def trim_metrics(path: str, steps: dict[str, int]) -> int:
  """Drop metrics logged after each net's resumed step (they are about to be logged again).

  steps: {net: step it resumes from}. Keys of other nets (another job's) are kept. Returns
  the number of rows changed; the file is rewritten atomically, and only when needed.
  """
  if not os.path.exists(path) or not steps:
    return 0
  rows, changed = [], 0
  for row in reporting.read_metrics(path):
    drop = [k for k in row if "/" in k and k.split("/")[0] in steps
            and row["step"] > steps[k.split("/")[0]]]
    if not drop:
      rows.append(row)
      continue
    changed += 1
    kept = {k: v for k, v in row.items() if k not in drop}
    if any("/" in k for k in kept):
      rows.append(kept)
  if changed:
    reporting.write_text_atomic(path, "".join(json.dumps(r) + "\n" for r in rows))
  return changed


def train(spec: models.ModelSpec, data_cfg: data.DataConfig, cfg: training.TrainConfig,
          run: RunConfig, log=logging.info) -> dict[str, dict]:
  """Train (or resume) the run's nets; returns each net's final metrics.

  Everything is validated (spec vs the workdir's, data source, each checkpoint's integrity
  and settings) before anything is written. Raises ``checkpoints.NonFiniteError`` when a
  loss or the parameters turn non-finite; nothing non-finite is saved, so rerunning resumes
  from the last good checkpoint.
  """
  mesh = training.make_mesh()
  n_dev = mesh.devices.size
  training.check_batch(cfg, mesh)
  names = _net_names(spec, run.nets)
  checkpoints.check_spec(run.workdir, spec)
  pi, pc = jax.process_index(), jax.process_count()
  source = data.make_source(data_cfg, cfg.batch_size, cfg.seed, "train", pi, pc)
  eval_images = held_out_images(data_cfg, run.eval_batch_size, cfg.seed)
  rows = source.host_slice
  log(f"devices: {n_dev} ({jax.devices()[0].platform}); hosts: {pc}; nets: {names}; "
      f"global batch {cfg.batch_size}, of which process {pi} reads rows {rows.start}:{rows.stop}")

  scales = None  # noise scale of each conditional net: largest detail magnitude in the data
  nets, resumed, corrupt = {}, {}, {}
  for idx, name in enumerate(names):
    net = spec.nets[name]
    tx = training.make_optimizer(spec, name, cfg)
    mngr = checkpoints.manager(run.workdir, name, run.keep_checkpoints)
    key = jax.random.fold_in(jax.random.key(cfg.seed), 1000 + idx)
    state = training.init_state(key, net, tx, cfg)
    if mngr.all_steps():
      changes = config_changes(checkpoints.newest_meta(mngr), cfg, data_cfg)
      if changes and not run.allow_config_change:
        raise ValueError(
            f"{run.workdir}: the checkpoints of net {name!r} were made with other settings ("
            + "; ".join(changes) + "). Rerun with the same settings (see train.flags there), use "
            "a new workdir, or allow the change explicitly (--allow_config_change)")
      # The restore target has the checkpoint's own layout (its optimiser, EMA or not).
      saved_cfg = saved_train_config(checkpoints.newest_meta(mngr), cfg)
      saved_tx = training.make_optimizer(spec, name, saved_cfg)
      try:
        target = training.replicate(
            training.init_state(key, net, saved_tx, saved_cfg).as_dict(), mesh)
        items, meta, step, skipped = checkpoints.restore_intact(mngr, {
            "state": target, "model": {k: target[k] for k in ("params", "batch_stats")}})
        state_dict = items["state"]
      except checkpoints.CheckpointError as e:
        raise checkpoints.CheckpointError(
            f"net {name!r}: {e}. Move {mngr.directory} aside to train this net afresh") from e
      changes = config_changes(meta, cfg, data_cfg)
      for s, why in skipped:
        log(f"{name}: skipping checkpoint step {s} ({why})")
      if changes:
        log(f"{name}: continuing with changed settings: " + "; ".join(changes))
      state = _adapt_state(training.TrainState(**state_dict), cfg, tx, lambda m: log(f"{name}: {m}"))
      corrupt[name] = [s for s, _ in skipped]
      resumed[name] = step
      meta = dict(meta, train_config=dataclasses.asdict(cfg),
                  data_config=dataclasses.asdict(data_cfg))
    else:
      if scales is None:
        scales = training.detail_noise_scales(
            spec, [source.batch(i) for i in range(run.noise_scale_batches)]) if spec.levels else {}
      meta = {"net": name, "noise_scale": scales.get(name, 1.0),
              "train_config": dataclasses.asdict(cfg), "data_config": dataclasses.asdict(data_cfg)}
    nets[name] = dict(idx=list(spec.nets).index(name), state=state, mngr=mngr, meta=meta,
                      total=training.net_num_steps(spec, name, cfg))

  # Validated: now write.
  checkpoints.write_spec(run.workdir, spec)
  metrics_path = os.path.join(run.workdir, "metrics.jsonl")
  if pi == 0:
    for fname, text in run.record:
      _write_record(run.workdir, fname, text)
    for name, steps in corrupt.items():
      for path in checkpoints.quarantine(nets[name]["mngr"], steps):
        log(f"{name}: moved the corrupt checkpoint to {path}")
    if trim_metrics(metrics_path, resumed):
      log(f"metrics.jsonl: dropped rows after the resumed steps {resumed}")
  for name, n in nets.items():
    if corrupt.get(name):  # the manager cached the moved steps
      n["mngr"].close()
      n["mngr"] = checkpoints.manager(run.workdir, name, run.keep_checkpoints)
    if name in resumed:
      log(f"{name}: resumed at step {resumed[name]} from {n['mngr'].directory}")
    n["state"] = training.replicate(n["state"], mesh)
    n["step_fn"] = training.train_step(spec, name, cfg, mesh, n["meta"]["noise_scale"], n["idx"])
  try:
    final = _loop(spec, cfg, run, nets, names, source, eval_images, mesh, metrics_path, log)
    for name in names:
      state = nets[name]["state"]
      if state.loss_stats is not None and name in final:
        final[name]["identity_gains"] = training.identity_gains(
            cfg, jax.device_get(state.loss_stats), nets[name]["meta"]["noise_scale"],
            training.net_scale(spec, name))
  finally:
    for n in nets.values():
      n["mngr"].wait_until_finished()
      n["mngr"].close()
  if run.figure and pi == 0 and all(name in nets for name in spec.nets):
    variables = {k: nets[k]["state"].eval_variables() for k in nets}
    path = save_denoising_figure(spec, variables, eval_images,
                                 os.path.join(run.workdir, "denoising.png"), log=log)
    log(f"wrote {path}")
    final[DENOISING] = evaluation.compare_with_gaussian(
        _params(spec, variables), eval_images, run.compare_sigmas, comparison_key(cfg.seed))
  return final


# Compiled once per process for a (spec, net, sigma, conv_impl): runs in one process share it.
_scale_psnr = jax.jit(evaluation.scale_psnr, static_argnames=("spec", "name", "sigma", "conv_impl"))


def _loop(spec, cfg, run, nets, names, source, eval_images, mesh, metrics_path, log):
  """The training loop over global steps (nets at different steps catch up in turn)."""
  writer = reporting.MetricsWriter(metrics_path, enabled=jax.process_index() == 0)
  eval_fns = {name: lambda v, k, name=name: _scale_psnr(
      spec, name, v, eval_images, run.eval_sigma, k, cfg.conv_impl) for name in names}
  saved = {name: int(n["state"].step) for name, n in nets.items()}  # once, before the loop
  start = min(saved.values())
  end = max(n["total"] for n in nets.values())
  bar = reporting.ProgressBar(end, "train")
  bar.update(start)
  final: dict[str, dict] = {}
  workers = pipeline.default_workers(source) if run.data_workers < 0 else run.data_workers
  procs = pipeline.default_processes() if run.data_processes < 0 else bool(run.data_processes)
  with pipeline.Batches(source, start, end, workers, procs) as batches:
    log(f"input: {workers} decoding {'processes' if procs else 'threads'}")
    return _steps(cfg, run, nets, names, batches, eval_fns, mesh, writer, saved, bar, final, log)


PREFETCH = 2  # global batches placed on the devices ahead of the step that uses them


def _steps(cfg, run, nets, names, batches, eval_fns, mesh, writer, saved, bar, final, log):
  """The steps, with host-side step counters: between two log, eval or checkpoint lines the
  host only dispatches (under ``jax.transfer_guard_device_to_host('disallow')``), the next
  ``PREFETCH`` global batches already on their way to the devices."""
  start, end = batches.start, batches.stop
  t0, steps_done = time.time(), 0
  counters = {n: saved[n] for n in names}  # each net's step, as its state holds it
  ahead: collections.deque = collections.deque()

  def non_finite(name, what, step):
    return checkpoints.NonFiniteError(
        f"net {name!r}: {what} at step {step}. Nothing after step {saved[name]} is saved and the "
        f"checkpoint there is intact: rerunning resumes from it. Lower the learning rate "
        f"(--learning_rate) or check the data for non-finite pixels")

  def fill():
    # Consumed every step (the iterator stays at the loop's step); placed asynchronously.
    while len(ahead) < PREFETCH and batches.step < end:
      ahead.append(training.global_batch(next(batches), mesh))

  for step in range(start, end):
    fill()
    images = ahead.popleft()
    active = [n for n in names if counters[n] == step < nets[n]["total"]]
    if not active:
      continue
    metrics = {}
    with jax.transfer_guard_device_to_host("disallow"):
      for name in active:
        n = nets[name]
        n["state"], metrics[name] = n["step_fn"](n["state"], images)
        counters[name] += 1
      fill()
    steps_done += 1
    done = step + 1
    last = done == end or (run.stop_after and steps_done >= run.stop_after)
    if done % run.log_every == 0 or last:
      elapsed = time.time() - t0
      rate, wait = steps_done / elapsed, batches.wait_s / elapsed
      row = {f"{k}/loss": float(m["loss"]) for k, m in metrics.items()}
      for k, v in row.items():
        if not np.isfinite(v):
          raise non_finite(k.split("/")[0], f"the loss is {v}", done)
      norms = {f"{k}/grad_norm": float(m["grad_norm"]) for k, m in metrics.items()}
      writer.write(done, steps_per_s=rate, input_wait=wait, **row, **norms)
      msg = " ".join(f"{k}={v:.4g}" for k, v in row.items())
      log(f"step {done}/{end} {rate:.2f} steps/s, input wait {100 * wait:.1f}% {msg}")
      bar.update(done, msg)
    if done % run.eval_every == 0 or last:
      row = {}
      for name in active:
        noisy, den = eval_fns[name](nets[name]["state"].eval_variables(), jax.random.key(step))
        row[f"{name}/psnr_noisy"], row[f"{name}/psnr_denoised"] = float(noisy), float(den)
        final[name] = {"psnr_noisy": float(noisy), "psnr_denoised": float(den)}
      writer.write(done, **row)
      log(f"step {done}: per-scale PSNR (sigma={run.eval_sigma}) " + " ".join(
          f"{n}: {row[f'{n}/psnr_noisy']:.2f}->{row[f'{n}/psnr_denoised']:.2f} dB" for n in active))
    for name in active:
      n = nets[name]
      if done % run.checkpoint_every == 0 or last or done == n["total"]:
        try:
          checkpoints.save(n["mngr"], done, n["state"].as_dict(),
                           dict(n["meta"], data_position=done),
                           model=n["state"].eval_variables())
        except checkpoints.NonFiniteError as e:
          raise non_finite(name, "the parameters hold NaN or inf", done) from e
        saved[name] = done
    if last and done != end:
      log(f"stopping after {steps_done} steps at step {done} (stop_after)")
      break
  bar.close()
  return final


def _params(spec: models.ModelSpec, variables: dict[str, models.Variables]) -> models.ModelParams:
  return models.ModelParams(low=variables[spec.low.name],
                            conditionals=tuple(variables[c.name] for c in spec.conditionals),
                            spec=spec)


def save_denoising_figure(spec: models.ModelSpec, variables: dict[str, models.Variables],
                          images: jax.Array, path: str, sigmas=(0.1, 0.2),
                          log=logging.info) -> str:
  """PNG rows: clean, then (noisy, denoised) per noise level, with PSNRs in the log."""
  params = _params(spec, variables)
  x = images[:6]
  rows = [list(np.asarray(x))]
  for i, s in enumerate(sigmas):
    y = x + s * jax.random.normal(jax.random.key(i), x.shape)
    d = denoising.denoise(params, y)
    log(f"figure, sigma {s:.2f}: noisy {float(evaluation.psnr(y, x).mean()):.2f} dB -> denoised "
        f"{float(evaluation.psnr(d, x).mean()):.2f} dB")
    rows += [list(np.asarray(y)), list(np.asarray(d))]
  return reporting.save_png(path, reporting.image_grid(rows, upscale=2))
