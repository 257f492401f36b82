r"""Training measured against the paper's loop: launch/train.py vs the authors' recipe in PyTorch.

  python benchmarks/bench_training.py                       # 500 steps (16,000 images), 3 seeds
  python benchmarks/bench_training.py --steps=2000 --sides=jax_paper,torch_paper
  python benchmarks/bench_training.py --sides=jax_default --steps=500,2000 --json=out.json

Every side trains a flat BF-CNN (RF 9, 21 layers, 32 channels by default) on celeba-small
(grey, the paper's crop, resized to --size, the project's split: the last 10% of files held
out), batch 32, on exactly the same batches (the train split's batch of step s, flips
included). Sides:
- jax_paper: ``launch/train.py --recipe=paper`` (method.md §4: Adam 1e-3 halved every tenth of
  the run, noise std (U{0..255}/255)^2, sum-of-squares loss / batch, Kaiming-normal weights,
  gains N(0, 1) 2/9/64 clipped to 0.025, batch-norm momentum 0.1);
- torch_paper: that recipe written out in PyTorch: the authors' BF-CNN (benchmarks/common.py)
  and their training loop, with its own initialisation and noise draws;
- jax_default: ``launch/train.py`` with the project's default recipe (training.RECIPES).
A JAX side may carry train.py overrides after slashes, to measure one setting at a time:
``jax_default/ema_decay=0/warmup_steps=0`` or ``jax_paper/clip_factor=2``.
Each side is evaluated on the same held-out images with the same noise draws: PSNR (dB) of the
denoised image at noise std 0, 20, 60, 100, 160 (/255), mean and spread (min..max) over the
seeds. The loss summary: the first step's loss, the largest loss of steps 1-50, the largest
ratio of a loss to the running median of the 50 before it after step 50 (a spike measure),
and the mean loss of the last tenth; wall time is the training process's (compilation included).
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

from common import table, torch_bfcnn, torch_threads

import numpy as np  # pylint: disable=g-import-not-at-top

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(REPO, "..", "shared", "data", "celeba-small")
SIGMAS = (0, 20, 60, 100, 160)
SIDES = ("jax_paper", "torch_paper", "jax_default")


def data_config(args):
  from wcdm_jax import data  # pylint: disable=g-import-not-at-top
  return data.DataConfig(f"folder:{args.data}", args.size, 1, "celeba", 0.1, True)


def eval_set(args):
  """(clean, {sigma: noisy}) held-out images, the same for every side."""
  from wcdm_jax import data  # pylint: disable=g-import-not-at-top
  src = data.make_source(data_config(args), args.eval_images, 0, "eval")
  clean = src.fetch(np.arange(min(args.eval_images, src.num_examples)))
  rng = np.random.default_rng(1234)
  noisy = {s: (clean + s / 255 * rng.standard_normal(clean.shape)).astype(np.float32)
           for s in SIGMAS}
  return clean, noisy


def psnr(x, ref):
  mse = np.mean((x - ref) ** 2, axis=(1, 2, 3))
  return float(np.mean(10 * np.log10(1.0 / np.maximum(mse, 1e-20))))


def loss_summary(losses, steps):
  """First loss, max of steps 1-50, largest loss / running median (50) after step 50, last 10%."""
  losses = np.asarray(losses, np.float64)
  spike = max((losses[i] / np.median(losses[i - 50:i]) for i in range(50, len(losses))),
              default=float("nan"))
  return {"first": float(losses[0]), "max_1_50": float(losses[1:51].max()),
          "spike": float(spike), "last": float(losses[-max(1, steps // 10):].mean())}


def run_jax(args, side, seed, steps, workdir, clean, noisy):
  """launch/train.py in its own process; then the trained model on the held-out set."""
  recipe, *overrides = side.split("_", 1)[1].split("/")
  halving = recipe == "paper" and not any(o.startswith("schedule=") for o in overrides)
  cmd = [sys.executable, os.path.join(REPO, "launch", "train.py"), f"--workdir={workdir}",
         f"--data=folder:{args.data}", f"--image_size={args.size}", "--crop=celeba",
         "--levels=0", f"--flat_rf={args.rf}", f"--features={args.features}", "--batch_size=32",
         f"--num_steps={steps}", f"--recipe={recipe}"] + [f"--{o}" for o in overrides] + (
             [f"--lr_halve_every={max(1, steps // 10)}"] if halving else []) + [
         f"--seed={seed}", "--log_every=1",
         f"--eval_every={steps}", f"--checkpoint_every={steps}", "--data_workers=1"]
  env = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu")
  t0 = time.time()
  res = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
  wall = time.time() - t0
  if res.returncode:
    raise RuntimeError(f"{' '.join(cmd)} failed:\n{res.stderr[-3000:]}")
  import jax  # pylint: disable=g-import-not-at-top
  import wcdm_jax  # pylint: disable=g-import-not-at-top
  from wcdm_jax import reporting  # pylint: disable=g-import-not-at-top
  params = wcdm_jax.load_params(workdir)
  den = jax.jit(lambda y: wcdm_jax.denoise(params, y))
  out = {s: psnr(np.asarray(den(noisy[s])), clean) for s in SIGMAS}
  rows = reporting.read_metrics(os.path.join(workdir, "metrics.jsonl"))
  losses = [r["flat/loss"] for r in rows if "flat/loss" in r]
  return out, loss_summary(losses, steps), wall


def kaiming_normal_(net):
  """method.md §3: Kaiming-normal (fan-in) conv weights, as the authors' training script sets."""
  import torch  # pylint: disable=g-import-not-at-top
  for conv in net.conv_layers:
    torch.nn.init.kaiming_normal_(conv.weight, a=0, mode="fan_in", nonlinearity="relu")
  return net


def run_torch(args, seed, steps, clean, noisy):
  """The paper's training loop in PyTorch on the same batches."""
  import torch  # pylint: disable=g-import-not-at-top
  from wcdm_jax import data, models  # pylint: disable=g-import-not-at-top
  torch.manual_seed(seed)
  gen = torch.Generator().manual_seed(seed)
  net = kaiming_normal_(torch_bfcnn(models.flat_spec(args.rf, features=args.features)))
  opt = torch.optim.Adam(net.parameters(), lr=1e-3)
  sched = torch.optim.lr_scheduler.StepLR(opt, step_size=max(1, steps // 10), gamma=0.5)
  source = data.make_source(data_config(args), 32, seed, "train")
  losses = []
  t0 = time.time()
  net.train()
  for step in range(steps):
    x = torch.from_numpy(np.ascontiguousarray(source.batch(step).transpose(0, 3, 1, 2)))
    std = (torch.randint(0, 256, (x.shape[0], 1, 1, 1), generator=gen).float() / 255) ** 2
    noise = torch.randn(x.shape, generator=gen) * std
    opt.zero_grad()
    loss = ((net(x + noise) - noise) ** 2).sum() / x.shape[0]
    loss.backward()
    opt.step()
    sched.step()
    losses.append(float(loss.detach()))
  wall = time.time() - t0
  net.eval()
  out = {}
  with torch.inference_mode():
    for s in SIGMAS:
      y = torch.from_numpy(noisy[s].transpose(0, 3, 1, 2).copy())
      out[s] = psnr((y - net(y)).numpy().transpose(0, 2, 3, 1), clean)
  return out, loss_summary(losses, steps), wall


def spread(values):
  return f"{statistics.mean(values):.2f} ({min(values):.2f}..{max(values):.2f})"


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--sides", default=",".join(SIDES))
  parser.add_argument("--steps", default="500", help="comma-separated budgets (steps of 32)")
  parser.add_argument("--seeds", default="0,1,2")
  parser.add_argument("--size", type=int, default=40, help="image size after the crop")
  parser.add_argument("--rf", type=int, default=9)
  parser.add_argument("--features", type=int, default=32)
  parser.add_argument("--eval_images", type=int, default=256)
  parser.add_argument("--data", default=DATA, help="celeba-small (or another face folder)")
  parser.add_argument("--json", default="", help="also write every run's figures here")
  args = parser.parse_args()
  if not os.path.isdir(args.data):
    sys.exit(f"error: --data={args.data} is not a folder (needs ../shared/data/celeba-small)")
  sides = args.sides.split(",")
  if "torch_paper" in sides:
    torch_threads()
  from wcdm_jax import native_build  # pylint: disable=g-import-not-at-top
  print(f"CPU: {native_build.cpu_name()} ({', '.join(native_build.cpu_isas())}); "
        f"flat RF {args.rf}, {args.features} channels, {args.size}x{args.size}, batch 32")
  clean, noisy = eval_set(args)
  print(f"held-out images: {len(clean)}; noisy PSNR: "
        + ", ".join(f"{s}: {psnr(noisy[s], clean):.2f}" for s in SIGMAS if s))
  results = []
  for steps in (int(s) for s in args.steps.split(",")):
    for side in sides:
      for seed in (int(s) for s in args.seeds.split(",")):
        with tempfile.TemporaryDirectory() as tmp:
          if side == "torch_paper":
            out, losses, wall = run_torch(args, seed, steps, clean, noisy)
          else:
            out, losses, wall = run_jax(args, side, seed, steps, os.path.join(tmp, "run"),
                                        clean, noisy)
        results.append({"side": side, "steps": steps, "seed": seed, "psnr": out,
                        "loss": losses, "wall_s": wall})
        print(f"{side} {steps} steps seed {seed}: "
              + " ".join(f"{s}:{out[s]:.2f}" for s in SIGMAS)
              + f" | loss first {losses['first']:.0f} max(1-50) {losses['max_1_50']:.0f} "
              f"spike {losses['spike']:.1f}x last {losses['last']:.1f} | {wall:.0f} s", flush=True)
  rows = []
  for steps in sorted({r["steps"] for r in results}):
    for side in sides:
      rs = [r for r in results if r["side"] == side and r["steps"] == steps]
      mean_noisy = [statistics.mean(r["psnr"][s] for s in SIGMAS if s) for r in rs]
      rows.append([f"{side}, {steps * 32:,} images", len(rs)]
                  + [spread([r["psnr"][s] for r in rs]) for s in SIGMAS]
                  + [spread(mean_noisy), spread([r["loss"]["max_1_50"] for r in rs]),
                     spread([r["loss"]["spike"] for r in rs]),
                     f"{statistics.mean(r['wall_s'] for r in rs):.0f}"])
  print()
  print(table("Held-out PSNR (dB), mean (min..max) over seeds",
              ["run", "seeds"] + [f"σ={s}" for s in SIGMAS]
              + ["mean σ=20..160", "max loss, steps 1-50", "spike (x median)", "wall s"], rows))
  if args.json:
    with open(args.json, "w") as f:
      json.dump(results, f, indent=1)


if __name__ == "__main__":
  main()
