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
"""
from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from wcdm_jax import models

SPEC_FILE = "spec.json"


def write_spec(directory: str, spec: models.ModelSpec) -> None:
  """Write (or check against) DIR/spec.json; a different existing spec is an error."""
  directory = os.path.abspath(directory)
  os.makedirs(directory, exist_ok=True)
  path = os.path.join(directory, SPEC_FILE)
  if os.path.exists(path):
    with open(path) as f:
      old = models.ModelSpec.from_json(f.read())
    if old != spec:
      raise ValueError(f"{path} holds a different model spec than this run's; use a new workdir "
                       f"or the same architecture flags.\n  saved: {old}\n  this run: {spec}")
    return
  if jax.process_index() == 0:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
      f.write(spec.to_json())
    os.replace(tmp, path)


def read_spec(directory: str) -> models.ModelSpec:
  path = os.path.join(directory, SPEC_FILE)
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} not found: {directory!r} is not a wcdm_jax model directory "
                            "(train one with launch/train.py or import one with "
                            "launch/import_lcv.py)")
  with open(path) as f:
    return models.ModelSpec.from_json(f.read())


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
  items = {"model": ocp.args.StandardSave(model), "meta": ocp.args.JsonSave(meta)}
  if state is not None:
    items["state"] = ocp.args.StandardSave(state)
  mngr.save(step, args=ocp.args.Composite(**items))


def restore(mngr: ocp.CheckpointManager, target: Any, step: int | None = None,
            item: str = "state") -> tuple[Any, dict]:
  """(item, meta) at ``step`` (latest by default).

  ``target``: a pytree of arrays (or ShapeDtypeStructs with shardings) with the item's
  structure; the checkpoint is resharded onto it, whatever the device count it was saved on.
  """
  step = mngr.latest_step() if step is None else step
  if step is None:
    raise FileNotFoundError(f"no checkpoint in {mngr.directory}")
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
  out = mngr.restore(step, args=ocp.args.Composite(
      **{item: ocp.args.StandardRestore(abstract), "meta": ocp.args.JsonRestore()}))
  return out[item], out.meta


def save_model(directory: str, params: models.ModelParams, step: int = 0,
               meta: dict | None = None) -> None:
  """Write a complete ModelParams (e.g. imported weights) as a model directory."""
  write_spec(directory, params.spec)
  for name in params.spec.nets:
    _, variables = params.net(name)
    mngr = manager(directory, name, async_save=False)
    save(mngr, step, None, dict(meta or {}, net=name),
         model={"params": variables["params"], "batch_stats": variables["batch_stats"]})
    mngr.wait_until_finished()
    mngr.close()


def load_params(path: str, step: int | None = None) -> models.ModelParams:
  """Everything sampling and denoising need from a model directory, as ``ModelParams``.

  Reads DIR/spec.json and the latest (or ``step``) checkpoint of every net. A net that was
  never trained (e.g. a one-scale job still running) is an error naming it.
  """
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
    try:
      model, _ = restore(mngr, target, step, item="model")
    except ValueError as e:
      raise ValueError(f"checkpoint of net {name!r} in {path} does not match spec.json's "
                       f"architecture {net}: {e}") from e
    finally:
      mngr.close()
    variables[name] = jax.tree.map(np.asarray, model)
  return models.ModelParams(low=variables[spec.low.name],
                            conditionals=tuple(variables[c.name] for c in spec.conditionals),
                            spec=spec)
