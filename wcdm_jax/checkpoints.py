"""Checkpoints: one orbax ``CheckpointManager`` per net under a model directory.

Layout of a model directory (a training workdir or an imported release model)::

    DIR/spec.json              the ModelSpec (architecture, wavelet, image size)
    DIR/<net>/<step>/model     {'params', 'batch_stats'}: what sampling and denoising need
    DIR/<net>/<step>/state     the full train state (params, batch stats, optimizer, step),
                               absent for imported weights
    DIR/<net>/<step>/meta      JSON: data position, noise scale, configs

with <net> in 'flat' | 'low' | 'cond0' ... Each net has its own manager, so one job per
scale can write into a shared directory. Saves are asynchronous and atomic (orbax writes a
temporary directory and renames it); ``max_to_keep`` old steps are kept.

Integrity: ``save`` refuses non-finite parameters and stores a SHA-256 of every item in the
step's meta; ``restore_intact`` verifies it (and finiteness) and falls back to the newest
intact step, reporting each step it skipped and why, so a truncated, bit-flipped or
half-deleted checkpoint is never used silently.
"""
from __future__ import annotations

import hashlib
import logging
import os
import shutil
from typing import Any, Callable

import jax
import numpy as np
import orbax.checkpoint as ocp

from wcdm_jax import models, parallel, reporting

SPEC_FILE = "spec.json"


class CheckpointError(RuntimeError):
  """No usable checkpoint: every step is missing, corrupt or non-finite (the message says which)."""


class NonFiniteError(FloatingPointError):
  """Non-finite parameters or loss; nothing non-finite is ever saved."""


def _host(leaf: Any) -> np.ndarray:
  """This process's copy of a (replicated) array, as numpy (numpy arrays pass as they are)."""
  if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
    leaf = leaf.addressable_data(0)
  return np.asarray(leaf)


def host_tree(tree: Any) -> Any:
  """The tree with every leaf copied to this host once (for checksums and checks)."""
  return jax.tree.map(_host, tree)


def tree_checksum(tree: Any) -> str:
  """SHA-256 of a pytree's leaves: paths, dtypes, shapes and bytes, in tree order."""
  h = hashlib.sha256()
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    a = np.ascontiguousarray(_host(leaf))
    h.update(f"{jax.tree_util.keystr(path)}|{a.dtype.str}|{a.shape}|".encode())
    h.update(a.tobytes())
  return h.hexdigest()


def all_finite(tree: Any) -> bool:
  """Whether every floating-point leaf of ``tree`` is finite."""
  return all(bool(np.all(np.isfinite(a))) for a in map(_host, jax.tree.leaves(tree))
             if np.issubdtype(a.dtype, np.inexact))


def _reason(e: BaseException) -> str:
  text = str(e).strip().splitlines()
  return f"{type(e).__name__}: {text[0][:200] if text else ''}"


def check_spec(directory: str, spec: models.ModelSpec) -> bool:
  """Whether DIR/spec.json exists; a different existing spec is an error. Writes nothing."""
  path = os.path.join(os.path.abspath(directory), SPEC_FILE)
  if not os.path.exists(path):
    return False
  old = read_spec(directory)
  if old != spec:
    raise ValueError(f"{path} holds a different model spec than this run's; use a new workdir "
                     f"or the same architecture flags.\n  saved: {old}\n  this run: {spec}")
  return True


def write_spec(directory: str, spec: models.ModelSpec) -> None:
  """Write (or check against) DIR/spec.json; a different existing spec is an error."""
  if check_spec(directory, spec):
    return
  directory = os.path.abspath(directory)
  os.makedirs(directory, exist_ok=True)
  path = os.path.join(directory, SPEC_FILE)
  if jax.process_index() == 0:
    reporting.write_text_atomic(path, spec.to_json())


def read_spec(directory: str) -> models.ModelSpec:
  """The ``ModelSpec`` of a model directory (DIR/spec.json); an error naming the file when it is
  missing or not a spec."""
  path = os.path.join(directory, SPEC_FILE)
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} not found: {directory!r} is not a wcdm_jax model directory "
                            "(train one with launch/train.py or import one with "
                            "launch/import_lcv.py)")
  try:
    with open(path, encoding="utf-8") as f:
      return models.ModelSpec.from_json(f.read())
  except (ValueError, UnicodeDecodeError) as e:
    raise ValueError(f"{path}: {e}; it was not written by wcdm_jax (train.py or import_lcv.py) "
                     "or is corrupt") from e


def manager(directory: str, net: str, max_to_keep: int = 3,
            async_save: bool = True) -> ocp.CheckpointManager:
  """The CheckpointManager of one net of the model in ``directory``."""
  options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                         enable_async_checkpointing=async_save)
  return ocp.CheckpointManager(os.path.join(os.path.abspath(directory), net), options=options,
                               item_names=("state", "model", "meta"))


def save(mngr: ocp.CheckpointManager, step: int, state: dict | None, meta: dict,
         model: dict | None = None) -> None:
  """Save a train ``state`` (a dict with 'params' and 'batch_stats') and/or a ``model``.

  The 'model' item (params and batch stats alone) is what ``load_params`` reads, on any
  number of devices; it defaults to the state's.
  """
  if model is None:
    model = {"params": state["params"], "batch_stats": state["batch_stats"]}
  host_model = host_tree(model)  # one device-to-host copy for both checks
  if not all_finite(host_model):
    raise NonFiniteError(f"refusing to save step {step} in {mngr.directory}: the parameters hold "
                         "NaN or inf")
  checksums = {"model": tree_checksum(host_model)}
  items = {"model": ocp.args.StandardSave(model)}
  if state is not None:
    checksums["state"] = tree_checksum(state)
    items["state"] = ocp.args.StandardSave(state)
  items["meta"] = ocp.args.JsonSave(dict(meta, checksums=checksums))
  mngr.save(step, args=ocp.args.Composite(**items))


def restore(mngr: ocp.CheckpointManager, targets: dict[str, Any], step: int | None = None
            ) -> tuple[dict[str, Any], dict]:
  """({item: tree}, meta) at ``step`` (latest by default), unverified.

  ``targets``: {item name: a pytree of arrays (or ShapeDtypeStructs with shardings) with
  that item's structure}; the checkpoint is resharded onto them, whatever the device count
  it was saved on.
  """
  step = mngr.latest_step() if step is None else step
  if step is None:
    raise FileNotFoundError(f"no checkpoint in {mngr.directory}")
  args = {k: ocp.args.StandardRestore(jax.tree.map(ocp.utils.to_shape_dtype_struct, t))
          for k, t in targets.items()}
  out = mngr.restore(step, args=ocp.args.Composite(**args, meta=ocp.args.JsonRestore()))
  return {k: out[k] for k in targets}, out.meta


def newest_meta(mngr: ocp.CheckpointManager) -> dict:
  """The meta of the newest step whose meta reads as a JSON object ({} when none does)."""
  for s in sorted(mngr.all_steps(), reverse=True):
    try:
      meta = mngr.restore(s, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
    except Exception:  # pylint: disable=broad-except  # corrupt files raise anything
      continue
    if isinstance(meta, dict):
      return meta
  return {}


def restore_intact(mngr: ocp.CheckpointManager, targets: dict[str, Any],
                   step: int | None = None
                   ) -> tuple[dict[str, Any], dict, int, list[tuple[int, str]]]:
  """({item: tree}, meta, step, skipped) of the newest intact step (or exactly ``step``).

  A step is intact when all the ``targets``' items restore, its meta is a JSON object, each
  item's checksum (when recorded) matches and its values are finite. ``skipped`` lists
  (step, reason) of newer steps that were not. Raises ``CheckpointError`` naming every step
  and its reason when none is intact.
  """
  steps = [step] if step is not None else sorted(mngr.all_steps(), reverse=True)
  if not steps:
    raise FileNotFoundError(f"no checkpoint in {mngr.directory}")
  skipped = []
  for s in steps:
    try:
      trees, meta = restore(mngr, targets, s)
      if not isinstance(meta, dict):
        raise CheckpointError("its meta is not a JSON object")
      for item, tree in trees.items():
        tree = host_tree(tree)  # one device-to-host copy for both checks
        expected = (meta.get("checksums") or {}).get(item)
        if expected is not None and tree_checksum(tree) != expected:
          raise CheckpointError(f"checksum mismatch in '{item}' (the files were altered after "
                                "saving)")
        if not all_finite(tree):
          raise CheckpointError(f"'{item}' holds NaN or inf")
      return trees, meta, s, skipped
    except Exception as e:  # pylint: disable=broad-except  # corrupt files raise anything
      skipped.append((s, _reason(e)))
  raise CheckpointError(f"no intact checkpoint in {mngr.directory}: " + "; ".join(
      f"step {s}: {r}" for s, r in skipped))


def quarantine(mngr: ocp.CheckpointManager, steps: list[int]) -> list[str]:
  """Move the given steps' directories to DIR/../<net>.corrupt/ (kept for inspection)."""
  src_root = os.fspath(mngr.directory)
  dst_root = src_root.rstrip("/") + ".corrupt"
  moved = []
  for s in steps:
    src = os.path.join(src_root, str(s))
    if os.path.exists(src):
      os.makedirs(dst_root, exist_ok=True)
      dst = os.path.join(dst_root, str(s))
      shutil.rmtree(dst, ignore_errors=True)
      shutil.move(src, dst)
      moved.append(dst)
  return moved


def save_model(directory: str, params: models.ModelParams, step: int = 0,
               meta: dict | None = None) -> None:
  """Write a complete ModelParams (e.g. imported weights) as a model directory.

  Args:
    directory: created if needed; ``load_params(directory)`` reads it back.
    params: every net of the model, and its recommended sampling settings
      (``params.sampling``, written to DIR/sampling.json) if it has them.
    step: the checkpoint step recorded for every net.
    meta: extra JSON-serialisable facts stored with the spec (e.g. the source of the weights).
  """
  write_spec(directory, params.spec)
  if params.sampling is not None:
    write_sampling(directory, params.sampling)
  for name in params.spec.nets:
    _, variables = params.net(name)
    mngr = manager(directory, name, async_save=False)
    save(mngr, step, None, dict(meta or {}, net=name),
         model={"params": variables["params"], "batch_stats": variables["batch_stats"]})
    mngr.wait_until_finished()
    mngr.close()


def load_params(path: str, step: int | None = None,
                warn: Callable[[str], None] = logging.warning, *,
                mesh: jax.sharding.Mesh | None = None) -> models.ModelParams:
  """Everything sampling and denoising need from a model directory, as ``ModelParams``.

  Reads DIR/spec.json and the newest intact (or exactly ``step``) checkpoint of every net; a
  corrupt newer step is skipped with a warning naming it and why.

  Args:
    path: a training workdir (``launch/train.py --workdir``) or an imported model directory.
    step: load exactly this step of every net (default: each net's newest intact one).
    warn: receives the warnings (skipped corrupt steps).
    mesh: replicate the variables over this mesh's devices (default: the default device).

  Returns:
    ``ModelParams``: a pytree of device arrays with the ``ModelSpec`` as static data.

  Raises:
    FileNotFoundError: no model at ``path``.
    ValueError, CheckpointError: a net never trained (e.g. a one-scale job still running), no
      intact step, or a spec that is not a wcdm_jax model; the message names it.
  """
  if not isinstance(path, (str, os.PathLike)):
    raise TypeError(f"path must be a model directory (str), got {type(path).__name__}")
  if step is not None and (isinstance(step, bool) or not isinstance(step, int) or step < 0):
    raise ValueError(f"step must be None (newest) or an int >= 0, got {step!r}")
  path = os.fspath(path)
  spec = read_spec(path)
  variables = {}
  for name, net in spec.nets.items():
    mngr = manager(path, name, async_save=False)
    if mngr.latest_step() is None:
      raise FileNotFoundError(f"{path} has no checkpoint for net {name!r} yet: train it "
                              f"(launch/train.py --nets={name}) before loading the model")
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device),
                          jax.eval_shape(lambda net=net: models.init_net(jax.random.key(0), net)))
    if step is not None and step not in mngr.all_steps():
      mngr.close()
      raise FileNotFoundError(f"net {name!r} in {path} has no step {step}; it has "
                              f"{sorted(mngr.all_steps())}")
    try:
      items, _, used, skipped = restore_intact(mngr, {"model": target}, step)
      model = items["model"]
    except CheckpointError as e:
      raise CheckpointError(f"net {name!r} of {path}: {e}") from e
    finally:
      mngr.close()
    for s, why in skipped:
      warn(f"load_params: net {name!r} of {path}: skipped step {s} ({why}); using step {used}")
    variables[name] = (parallel.replicate(model, parallel.check_mesh(mesh)) if mesh is not None
                       else jax.device_put(model, jax.devices()[0]))
  return models.ModelParams(low=variables[spec.low.name],
                            conditionals=tuple(variables[c.name] for c in spec.conditionals),
                            spec=spec, sampling=read_sampling(path))


SAMPLING_FILE = "sampling.json"


def write_sampling(directory: str, rec: Any) -> None:
  """DIR/sampling.json: a model's recommended sampling settings (``sampling.Recommended``)."""
  os.makedirs(directory, exist_ok=True)
  reporting.write_text_atomic(os.path.join(directory, SAMPLING_FILE), rec.to_json())


def read_sampling(directory: str) -> Any:
  """The ``sampling.Recommended`` of DIR/sampling.json, None without one; ValueError naming
  the file when it does not read."""
  from wcdm_jax import sampling  # pylint: disable=g-import-not-at-top
  path = os.path.join(directory, SAMPLING_FILE)
  if not os.path.exists(path):
    return None
  with open(path, encoding="utf-8") as f:
    text = f.read()
  try:
    return sampling.Recommended.from_json(text)
  except ValueError as e:
    raise ValueError(f"{path}: {e}; delete it to sample with the library's defaults") from e
