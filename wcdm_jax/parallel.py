"""Data parallelism: the device mesh, placing batches on it, and running per-device programs.

Every program of the library is data-parallel over one mesh axis, ``DATA_AXIS``: a batch is
split along its first dimension, parameters are replicated. Training (``training``) and
inference (``denoise``, ``sample``, ``super_resolve``, ``log_prob``, ``inverse.solve``) run
their per-image work inside ``jax.shard_map``, so each device convolves its own images only
(the native CPU kernels included) and the only cross-device traffic is what the method
needs: the gradient's all-reduce and the batch-norm statistics while training, nothing while
sampling.

Inference takes its mesh from ``mesh=`` or from a batch already sharded along its first axis
(``resolve_mesh``); a batch that does not divide over the devices is padded with copies of its
last image and the padding dropped from the results. Training refuses such a batch.
"""
from __future__ import annotations

import re
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"


def make_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
  """1-D mesh, axis ``DATA_AXIS``, over ``devices`` (default: every device of every host).

  Raises ValueError naming them when the devices are of mixed platforms.
  """
  devs = list(devices) if devices is not None else jax.devices()
  if not devs:
    raise ValueError("make_mesh needs at least one device")
  platforms = sorted({d.platform for d in devs})
  if len(platforms) > 1:
    raise ValueError(f"the devices mix platforms {platforms} ({devs}); pass devices of one "
                     f"platform, e.g. jax.devices('{platforms[0]}')")
  return Mesh(np.asarray(devs), (DATA_AXIS,))


def check_mesh(mesh: Mesh) -> Mesh:
  """The mesh, after checking it has the ``DATA_AXIS`` axis and devices of one platform."""
  if not isinstance(mesh, Mesh):
    raise TypeError(f"mesh must be a jax.sharding.Mesh (e.g. wcdm_jax.parallel.make_mesh()), "
                    f"got {type(mesh).__name__}")
  if DATA_AXIS not in mesh.axis_names:
    raise ValueError(f"the mesh has axes {tuple(mesh.axis_names)} but no {DATA_AXIS!r} axis to "
                     f"split the batch on; build it with wcdm_jax.parallel.make_mesh(devices)")
  platforms = sorted({d.platform for d in mesh.devices.flat})
  if len(platforms) > 1:
    raise ValueError(f"the mesh mixes platforms {platforms}; use devices of one platform")
  return mesh


def data_size(mesh: Mesh) -> int:
  """How many shards a batch is split into on ``mesh``."""
  return int(mesh.shape[DATA_AXIS])


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """A ``NamedSharding`` splitting an array's first (batch) axis over the mesh's 'data' axis."""
  return NamedSharding(mesh, P(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
  """A ``NamedSharding`` placing a whole array on every device of the mesh."""
  return NamedSharding(mesh, P())


def replicate(tree: Any, mesh: Mesh) -> Any:
  """Every leaf on every device of ``mesh``."""
  return jax.device_put(tree, replicated(mesh))


def onto(mesh: Mesh | None, *trees: Any) -> tuple:
  """``trees`` ready for a program over ``mesh``: arrays committed to other devices (e.g.
  params loaded without a mesh live on one device) are copied to every device of the mesh;
  arrays already on it, uncommitted arrays, host arrays and tracers pass unchanged."""
  if mesh is None:
    return trees
  devices = set(mesh.devices.flat)

  def move(a):
    if (isinstance(a, jax.Array) and not isinstance(a, jax.core.Tracer) and a.committed
        and a.sharding.device_set != devices):
      return jax.device_put(a, replicated(mesh))
    return a
  return jax.tree.map(move, trees)


def global_batch(host_batch: np.ndarray, mesh: Mesh) -> jax.Array:
  """This host's share of a training batch -> the global array sharded along ``DATA_AXIS``.

  Raises ValueError (before any transfer) when the share does not divide over this host's
  devices of the mesh.
  """
  local = len([d for d in mesh.devices.flat if d.process_index == jax.process_index()])
  if host_batch.shape[0] % max(local, 1):
    raise ValueError(f"a batch of {host_batch.shape[0]} images per host does not divide over "
                     f"this host's {local} devices: use a batch size that is a multiple of "
                     f"{local * jax.process_count()}")
  return jax.make_array_from_process_local_data(batch_sharding(mesh), host_batch)


def mesh_of(x: Any) -> Mesh | None:
  """The mesh a concrete array is split on along its first axis (``DATA_AXIS`` only), or None."""
  sharding = getattr(x, "sharding", None)
  if isinstance(x, jax.core.Tracer) or not isinstance(sharding, NamedSharding):
    return None
  spec = tuple(sharding.spec)
  if (not spec or spec[0] != DATA_AXIS or any(s is not None for s in spec[1:])
      or sharding.mesh.size < 2):
    return None
  return sharding.mesh


def resolve_mesh(mesh: Mesh | None, *arrays: Any) -> Mesh | None:
  """``mesh`` when given (checked), else the mesh a batch argument is sharded on, else None."""
  if mesh is not None:
    return check_mesh(mesh)
  for a in arrays:
    m = mesh_of(a)
    if m is not None:
      return m
  return None


def pad_to(x: jax.Array, n: int) -> jax.Array:
  """(B, ...) -> (B', ...) with B' the next multiple of n: copies of the last row appended."""
  b = x.shape[0]
  extra = -b % n
  if not extra:
    return x
  return jnp.concatenate([x, jnp.repeat(x[-1:], extra, axis=0)], 0)


def map_batch(fn: Callable, mesh: Mesh | None, batched: Sequence[Any], shared: Any = ()) -> Any:
  """``fn(*batched, *shared)`` with ``batched`` split over ``mesh``'s ``DATA_AXIS`` (each device
  running ``fn`` on its rows) and ``shared`` (a tuple of pytrees, e.g. the params) replicated.

  ``fn`` must be per-row: row i of every output depends on row i of the batched inputs only,
  and every output leaf has the batch as its first axis. Batches that do not divide over the
  devices are padded and the padding dropped. With ``mesh=None`` (or one device) this is
  ``fn`` itself.
  """
  if mesh is None or data_size(mesh) == 1:
    return fn(*batched, *shared)
  n = data_size(mesh)
  b = jax.tree.leaves(batched)[0].shape[0]
  padded = jax.tree.map(lambda a: pad_to(a, n), tuple(batched))
  spec_b = jax.tree.map(lambda _: P(DATA_AXIS), padded)
  spec_s = jax.tree.map(lambda _: P(), tuple(shared))
  # No collectives inside (per-row work), so no need to type values as varying or not.
  body = jax.shard_map(lambda bt, sh: fn(*bt, *sh), mesh=mesh, in_specs=(spec_b, spec_s),
                       out_specs=P(DATA_AXIS), check_vma=False)
  out = body(padded, tuple(shared))
  return jax.tree.map(lambda a: a[:b], out)


# --- what a compiled program communicates ----------------------------------------------------

COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4,
                "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16}
_COLLECTIVE_RE = re.compile(r"=\s*(.*?)\s(" + "|".join(COLLECTIVES) + r")(?:-start)?\(")
_ARRAY_RE = re.compile(r"\b(" + "|".join(_DTYPE_BYTES) + r")\[([0-9,]*)\]")


def collectives(hlo_text: str) -> list[tuple[str, int, str]]:
  """(op, result bytes, result type) of every collective in a compiled program's HLO text
  (``jax.jit(f).lower(...).compile().as_text()``); async pairs count once (their start)."""
  out = []
  for line in hlo_text.splitlines():
    m = _COLLECTIVE_RE.search(line)
    if not m or "-done(" in line:
      continue
    types = m.group(1)
    size = sum(_DTYPE_BYTES[d] * int(np.prod([int(s) for s in dims.split(",") if s] or [1]))
               for d, dims in _ARRAY_RE.findall(types))
    out.append((m.group(2), size, types))
  return out


def collective_summary(hlo_text: str) -> dict[str, tuple[int, int]]:
  """{op: (count, summed result bytes)} of ``collectives(hlo_text)``."""
  summary: dict[str, tuple[int, int]] = {}
  for op, size, _ in collectives(hlo_text):
    count, total = summary.get(op, (0, 0))
    summary[op] = (count + 1, total + size)
  return summary
