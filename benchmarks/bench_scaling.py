r"""What data-parallel training costs per device, read off the compiled programs on simulated
CPU devices (no accelerator needed): for each net of the celeba160 multi-scale model at the
paper's batch 512, on 1, 2, 4 and 8 devices, the bytes its collectives move per step against
the all-reduce lower bound (the gradients' bytes), the per-device FLOPs
(``compiled.cost_analysis()``) and the per-device peak memory (``compiled.memory_analysis()``).

  python benchmarks/bench_scaling.py                  # celeba160 nets, batch 512, 1/2/4/8 devices
  python benchmarks/bench_scaling.py --tiny           # a small model, seconds (tests run it)
  python benchmarks/bench_scaling.py --devices=4,8 --conv_impl=auto --dtype=bfloat16

Nothing here is timed: simulated devices share this machine's cores. FLOPs are counted with
``--conv_impl=xla`` (the default here): the native CPU kernels are custom calls whose FLOPs
XLA does not see. A data-parallel step should show collective bytes near the lower bound at
every device count and FLOPs and memory falling as about 1/n.
"""
import argparse
import os
import sys

_ARGS = argparse.ArgumentParser(description=__doc__.split("\n")[0])
_ARGS.add_argument("--tiny", action="store_true", help="a small model and batch")
_ARGS.add_argument("--devices", default="1,2,4,8", help="device counts (comma-separated)")
_ARGS.add_argument("--batch", type=int, default=512)
_ARGS.add_argument("--conv_impl", default="xla")
_ARGS.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
_ARGS.add_argument("--remat", action="store_true")


def main():
  args = _ARGS.parse_args()
  counts = [int(c) for c in args.devices.split(",")]
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             f" --xla_force_host_platform_device_count={max(counts)}")
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from wcdm_jax import models, parallel, training  # pylint: disable=g-import-not-at-top

  if args.tiny:
    spec = models.multiscale_spec(2, 5, 7, 1, (32, 32), num_layers=4, low_num_layers=4,
                                  features=16)
    batch = 16
  else:
    spec = models.multiscale_spec(2, 9, 41, 1, (160, 160))
    batch = args.batch
  cfg = training.TrainConfig(batch_size=batch, conv_impl=args.conv_impl, dtype=args.dtype,
                             remat=args.remat)
  print(f"model: J={spec.levels}, {spec.image_size[0]}x{spec.image_size[1]}, batch {batch}, "
        f"conv_impl={args.conv_impl}, dtype={args.dtype}, remat={args.remat}; simulated "
        f"{jax.devices()[0].platform} devices; jax {jax.__version__}")
  print(f"{'net':6s} {'devices':>7s} {'collectives':>24s} {'MiB moved':>10s} "
        f"{'lower bound':>11s} {'ratio':>6s} {'GFLOP/device':>13s} {'x 1 dev':>8s} "
        f"{'peak MiB/dev':>13s} {'x 1 dev':>8s}")
  for name in spec.nets:
    base = None
    for n in counts:
      mesh = parallel.make_mesh(jax.devices()[:n])
      tx = training.make_optimizer(spec, name, cfg)
      state = jax.eval_shape(lambda: training.init_state(jax.random.key(0), spec.nets[name],
                                                         tx, cfg))
      # Every net's step takes the clean images (and decomposes them itself).
      images = jax.ShapeDtypeStruct((batch,) + spec.image_size + (spec.channels,), jnp.float32,
                                    sharding=parallel.batch_sharding(mesh))
      compiled = training.make_train_step(spec, name, tx, cfg, mesh).lower(state, images).compile()
      summary = parallel.collective_summary(compiled.as_text())
      moved = sum(b for _, b in summary.values())
      bound = sum(x.size * 4 for x in jax.tree.leaves(state.params)) if n > 1 else 0
      cost = compiled.cost_analysis()
      cost = cost[0] if isinstance(cost, (list, tuple)) else cost
      flops = float(cost.get("flops", 0.0)) if cost else 0.0
      mem = compiled.memory_analysis()
      peak = ((mem.temp_size_in_bytes + mem.argument_size_in_bytes + mem.output_size_in_bytes
               - mem.alias_size_in_bytes) if mem is not None else 0)
      base = base or (flops, peak)
      kinds = ", ".join(f"{c} {op}" for op, (c, _) in sorted(summary.items())) or "none"
      ratio = f"{moved / bound:.2f}" if bound else "-"
      print(f"{name:6s} {n:7d} {kinds:>24s} {moved / 2**20:10.2f} {bound / 2**20:11.2f} "
            f"{ratio:>6s} {flops / 1e9:13.3f} {flops / max(base[0], 1):8.3f} "
            f"{peak / 2**20:13.1f} {peak / max(base[1], 1):8.3f}")


if __name__ == "__main__":
  main()
