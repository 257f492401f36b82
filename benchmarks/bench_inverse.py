r"""Linear inverse problems: ``wcdm_jax.inverse.solve`` on a batch vs the original algorithm's
one-image loop written out in PyTorch, same net and same number of denoiser evaluations.

  python benchmarks/bench_inverse.py                 # 40x40 hole, 160x160, 40 steps, batch 8
  python benchmarks/bench_inverse.py --task=cs --steps=100

The net is the released flat RF 43 CelebA denoiser when ../shared is present (else random
weights of the same shapes). Both sides run exactly --steps updates per image (the stop rule
is evaluated but disabled) plus the final denoiser call; torch runs one image at a time, as
the original code does. Time per image; JAX times exclude compilation (it is reported apart).
"""
import argparse
import dataclasses
import time

from common import release_or_random, table, torch_net, torch_threads

import jax  # pylint: disable=g-import-not-at-top
import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
import numpy as np  # pylint: disable=g-import-not-at-top

from wcdm_jax import inverse, models  # pylint: disable=g-import-not-at-top
from wcdm_jax.inverse import solver  # pylint: disable=g-import-not-at-top

def load_flat43():
  return release_or_random("flat_celebA_160x160_gray_rf43",
                           models.ModelSpec(low=models.flat_spec(43), image_size=(160, 160)))


def make_op(task, size):
  shape = (size, size, 1)
  if task == "inpaint":
    return inverse.Inpainting(inverse.box_mask((size, size), size // 4))
  if task == "pixels":
    return inverse.RandomPixels(0.1, jax.random.key(0), shape)
  if task == "sr":
    return inverse.BlockAverage(4, shape)
  if task == "deblur":
    return inverse.SpectralLowpass(0.1, shape=shape)
  return inverse.RandomProjection(0.1, jax.random.key(0), shape)


def torch_solve(net, op, size, steps, beta, seed, y0=None):
  """The original loop for one image (1, 1, H, W) with the task's operator in torch."""
  import torch  # pylint: disable=g-import-not-at-top
  g = torch.Generator().manual_seed(seed)
  project = op["project"]
  mxc = op["m_xc"]
  n = size * size
  e = torch.ones(1, 1, size, size)
  y = (e - project(e)) * 0.5 + mxc + torch.randn(1, 1, size, size, generator=g) if y0 is None \
      else y0
  with torch.inference_mode():
    sigma = torch.norm(net(y)) / np.sqrt(n)
    for t in range(1, steps + 1):
      _ = bool(sigma > 1e-9)  # the while-condition of the original (a sync per step)
      h = 0.01 * t / (1 + 0.01 * (t - 1))
      f = net(y)
      d = f - project(f) + project(y) - mxc
      sigma = torch.norm(d) / np.sqrt(n)
      gamma = sigma * np.sqrt((1 - beta * h) ** 2 - (1 - h) ** 2)
      y = y - h * d + gamma * torch.randn(1, 1, size, size, generator=g)
    return y - net(y)


def torch_operator(task, op, size, meas):
  """M M^T and M x_c in torch for the task (the original's operators)."""
  import torch  # pylint: disable=g-import-not-at-top
  m_xc = torch.from_numpy(np.asarray(op.adjoint(meas)).transpose(0, 3, 1, 2).copy())
  if task in ("inpaint", "pixels"):
    mask = torch.from_numpy(np.asarray(op.mask)[..., 0].copy())
    return {"project": lambda x: x * mask, "m_xc": m_xc}
  if task == "sr":
    pool = torch.nn.functional.avg_pool2d
    return {"project": lambda x: torch.repeat_interleave(torch.repeat_interleave(
        pool(x, 4), 4, 2), 4, 3), "m_xc": m_xc}
  if task == "deblur":
    band = torch.from_numpy(op.band_mask(size, size).astype(np.float32))
    return {"project": lambda x: torch.fft.ifft2(torch.fft.fft2(x, norm="ortho") * band,
                                                  norm="ortho").real, "m_xc": m_xc}
  basis = np.asarray(op.forward(jnp.eye(size * size).reshape(-1, size, size, 1)))[:, :, 0]
  u = torch.from_numpy(basis.copy())  # (N, m): the original's dense matrix
  return {"project": lambda x: (u @ (u.T @ x.reshape(-1))).reshape(x.shape), "m_xc": m_xc}


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--task", default="inpaint", choices=["inpaint", "pixels", "sr", "deblur", "cs"])
  p.add_argument("--size", type=int, default=160)
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--steps", type=int, default=40)
  p.add_argument("--torch_images", type=int, default=2)
  p.add_argument("--beta", type=float, default=0.1)
  args = p.parse_args()
  threads = torch_threads()
  params, which = load_flat43()
  op = make_op(args.task, args.size)
  rng = np.random.default_rng(0)
  clean = jnp.asarray(rng.random((args.batch, args.size, args.size, 1), np.float32))
  meas = op.forward(clean)
  cfg = inverse.SolverConfig(
      sampler=dataclasses.replace(inverse.DEFAULT_ASCENT, beta=args.beta, sigma_L=1e-9,
                                  max_steps=args.steps, abort_sigma=float("inf")),
      method="plugin")
  keys = jax.random.split(jax.random.key(0), args.batch)
  run = lambda: inverse.solve(keys, params, op, meas, config=cfg, return_info=True)
  t0 = time.perf_counter()
  x, info = run()
  x.block_until_ready()
  compile_s = time.perf_counter() - t0
  assert int(np.min(info.steps)) == args.steps
  t0 = time.perf_counter()
  run()[0].block_until_ready()
  jax_s = (time.perf_counter() - t0) / args.batch
  net = torch_net(params.spec.low, params.low)
  tops = torch_operator(args.task, op, args.size, meas[:1])
  t0 = time.perf_counter()
  for i in range(args.torch_images):
    torch_solve(net, tops, args.size, args.steps, args.beta, i)
  torch_s = (time.perf_counter() - t0) / args.torch_images
  # Same algorithm: from the same start without injected noise, both give the same image.
  import torch  # pylint: disable=g-import-not-at-top
  y0 = np.random.default_rng(1).normal(size=(1, args.size, args.size, 1)).astype(np.float32)
  ref = torch_solve(net, tops, args.size, 5, 1.0, 0,
                    torch.from_numpy(y0.transpose(0, 3, 1, 2).copy())).numpy()
  det = dataclasses.replace(cfg.sampler, beta=1.0, max_steps=5)
  out, _ = solver.constrained_ascent(keys[:1], solver.residual(params), op, meas[:1],
                                     jnp.asarray(y0), det)
  diff = float(np.abs(np.asarray(out).transpose(0, 3, 1, 2) - ref).max())
  print(f"{which} flat RF 43 net; task {args.task} at {args.size}x{args.size}; {args.steps} "
        f"updates + 1 final call per image; {threads} torch threads; JAX first call "
        f"(compilation included) {compile_s:.1f} s for {args.batch} images; same start, no "
        f"noise, 5 steps: max |JAX - torch| = {diff:.1e}")
  print(table("time per image (s)", ["implementation", "s / image", "x torch loop"], [
      ["PyTorch, one image at a time (original loop)", torch_s, 1.0],
      [f"wcdm_jax.inverse.solve, batch {args.batch}", jax_s, jax_s / torch_s]]))


if __name__ == "__main__":
  main()
