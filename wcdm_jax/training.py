"""Training the per-scale denoisers (method.md §4), data-parallel over every device.

One jitted step per net. Batches are global ``jax.Array``s sharded along the batch axis of
a 1-D device mesh (``"data"``) spanning all devices of all hosts; params are replicated.
Batch-norm statistics and gradients are means over the *global* batch, so one step gives
the same result on any number of devices.

Each net sees its part of the wavelet pyramid of the clean batch:
- flat: the image; low: the coarsest low-pass x_J times U(0, 1) (intensity augmentation);
- cond j: input [clean low-pass at level j, noisy details of level j]; noise only on the
  details, its range scaled by the largest detail magnitude of the training data.
Noise: per image std = (k / 255), k ~ U{lo..hi}, squared when ``quadratic``; the loss is the
summed squared error between the net's output and the noise, divided by the batch size.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from wcdm_jax import models, wavelets


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """Optimisation settings shared by all nets of a run (method.md §4 defaults)."""
  batch_size: int = 512
  learning_rate: float = 1e-3
  num_steps: int = 10_000          # steps of the finest net; coarser nets get more (below)
  lr_halve_every: int = 1_000      # steps of the finest net between learning-rate halvings
  level_multiplier: float = 4.0    # net at pyramid level j trains multiplier**j x longer
  noise_min: int = 0               # noise std range in /255 units
  noise_max: int = 255
  quadratic_noise: bool = True
  intensity_augmentation: bool = True  # low-pass net only
  seed: int = 0
  conv_impl: str = "auto"
  remat: bool = False
  dtype: str = "float32"           # compute dtype of the convolutions: float32 | bfloat16
  # (parameters, batch-norm statistics, the loss and Adam stay float32)

  def __post_init__(self):
    if self.dtype not in ("float32", "bfloat16"):
      raise ValueError(f"dtype must be 'float32' or 'bfloat16', got {self.dtype!r}")


def net_level(spec: models.ModelSpec, name: str) -> int:
  """Pyramid level of a net for the schedule: cond j -> j, low -> J - 1, flat -> 0."""
  net = spec.nets[name]
  return {"flat": 0, "low": max(spec.levels - 1, 0)}.get(net.kind, net.level)


def net_num_steps(spec: models.ModelSpec, name: str, cfg: TrainConfig) -> int:
  return int(round(cfg.num_steps * cfg.level_multiplier ** net_level(spec, name)))


def make_optimizer(spec: models.ModelSpec, name: str, cfg: TrainConfig) -> optax.GradientTransformation:
  """Adam whose learning rate halves every ``lr_halve_every * multiplier**level`` steps."""
  every = max(1, int(round(cfg.lr_halve_every * cfg.level_multiplier ** net_level(spec, name))))
  schedule = optax.exponential_decay(cfg.learning_rate, every, 0.5, staircase=True)
  return optax.adam(schedule)


@struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any

  def variables(self) -> models.Variables:
    return {"params": self.params, "batch_stats": self.batch_stats}

  def as_dict(self) -> dict[str, Any]:
    return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


def init_state(key: jax.Array, net: models.NetSpec, tx: optax.GradientTransformation) -> TrainState:
  v = models.init_net(key, net)
  return TrainState(step=jnp.zeros((), jnp.int32), params=v["params"],
                    batch_stats=v["batch_stats"], opt_state=tx.init(v["params"]))


def noise_stds(key: jax.Array, n: int, cfg: TrainConfig) -> jax.Array:
  """(n,) per-image noise std, in units of the clean signal's range."""
  k = jax.random.randint(key, (n,), cfg.noise_min, cfg.noise_max + 1)
  std = k.astype(jnp.float32) / 255.0
  return jnp.square(std) if cfg.quadratic_noise else std


def net_example(spec: models.ModelSpec, name: str, images: jax.Array, key: jax.Array,
                cfg: TrainConfig, noise_scale: float = 1.0) -> tuple[jax.Array, jax.Array]:
  """(noisy input, target noise) of the named net for a clean batch (B, H, W, C)."""
  net = spec.nets[name]
  k_std, k_noise, k_int = jax.random.split(key, 3)
  b = images.shape[0]
  std = noise_stds(k_std, b, cfg) * noise_scale
  if net.kind == "flat":
    clean, cond = images, None
  else:
    lows, details = wavelets.analysis(images, spec.levels, spec.wavelet, spec.mode)
    if net.kind == "low":
      clean, cond = lows[-1], None
      if cfg.intensity_augmentation:
        clean = clean * jax.random.uniform(k_int, (b, 1, 1, 1))
    else:
      clean, cond = details[net.level], lows[net.level]
  noise = jax.random.normal(k_noise, clean.shape, clean.dtype) * std[:, None, None, None]
  noisy = clean + noise
  return (noisy if cond is None else jnp.concatenate([cond, noisy], -1)), noise


def detail_noise_scales(spec: models.ModelSpec, batches: list[np.ndarray]) -> dict[str, float]:
  """Largest |detail coefficient| per level over some training batches: cond nets' noise scale."""
  scales = {c.name: 0.0 for c in spec.conditionals}
  analyse = jax.jit(functools.partial(wavelets.analysis, levels=spec.levels,
                                      wavelet=spec.wavelet, mode=spec.mode))
  for batch in batches:
    _, details = analyse(jnp.asarray(batch))
    for c in spec.conditionals:
      scales[c.name] = max(scales[c.name], float(jnp.max(jnp.abs(details[c.level]))))
  return scales


def loss_fn(params, batch_stats, net: models.NetSpec, noisy, noise, *, conv_impl="auto",
            remat=False, dtype="float32"):
  model = models.BFCNN(net, conv_impl=conv_impl, remat=remat, dtype=jnp.dtype(dtype))
  pred, updates = model.apply({"params": params, "batch_stats": batch_stats}, noisy, train=True,
                              mutable=["batch_stats"])
  loss = jnp.sum(jnp.square(pred - noise)) / noisy.shape[0]
  return loss, updates["batch_stats"]


def make_mesh(devices=None) -> Mesh:
  """1-D mesh over all devices of all hosts (or ``devices``), axis 'data'."""
  return Mesh(np.asarray(devices if devices is not None else jax.devices()), ("data",))


def make_train_step(spec: models.ModelSpec, name: str, tx: optax.GradientTransformation,
                    cfg: TrainConfig, mesh: Mesh, noise_scale: float = 1.0) -> Callable:
  """Jitted ``step(state, images, key) -> (state, metrics)`` for one net.

  images: global (B, H, W, C) array sharded on the mesh's 'data' axis; state replicated
  and donated.
  """
  net = spec.nets[name]

  def step(state: TrainState, images: jax.Array, key: jax.Array):
    noisy, noise = net_example(spec, name, images, key, cfg, noise_scale)
    noisy = jax.lax.with_sharding_constraint(noisy, NamedSharding(mesh, P("data")))
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    (loss, batch_stats), grads = grad_fn(state.params, state.batch_stats, net, noisy, noise,
                                         conv_impl=cfg.conv_impl, remat=cfg.remat,
                                         dtype=cfg.dtype)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    new = TrainState(step=state.step + 1, params=params, batch_stats=batch_stats,
                     opt_state=opt_state)
    return new, {"loss": loss, "grad_norm": optax.tree.norm(grads)}

  replicated = NamedSharding(mesh, P())
  return jax.jit(step, in_shardings=(replicated, NamedSharding(mesh, P("data")), replicated),
                 out_shardings=(replicated, replicated), donate_argnums=(0,))


def global_batch(host_batch: np.ndarray, mesh: Mesh) -> jax.Array:
  """This host's share of the batch -> the global array sharded along 'data'."""
  return jax.make_array_from_process_local_data(NamedSharding(mesh, P("data")), host_batch)


def replicate(tree: Any, mesh: Mesh) -> Any:
  return jax.device_put(tree, NamedSharding(mesh, P()))


def step_key(seed: int, step: int, net_index: int) -> jax.Array:
  """The RNG key of one net's step: a pure function of (seed, step, net), so resumable."""
  return jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), step), net_index)
