"""Writes PyTorch-format zip checkpoints without torch, for tests of the safe reader.

The pickle names torch's globals (torch._utils._rebuild_tensor_v2, torch.FloatStorage, ...)
exactly as torch.save does; stand-in modules are put in sys.modules only while pickling.
Every tensor header (offset, size, stride) and storage can be set freely, so tests can
write well-formed files and crafted ones.
"""
from __future__ import annotations

import collections
import contextlib
import io
import pickle
import sys
import types
import zipfile

import numpy as np

_STORAGES = {np.dtype(np.float32): "FloatStorage", np.dtype(np.float64): "DoubleStorage",
             np.dtype(np.int64): "LongStorage", np.dtype(np.uint8): "ByteStorage"}


class Storage:
  """A storage: raw little-endian bytes of ``dtype`` under archive key ``key``."""

  def __init__(self, key: str, data: bytes, dtype, numel: int | None = None):
    self.key, self.data, self.dtype = key, data, np.dtype(dtype)
    self.numel = len(data) // self.dtype.itemsize if numel is None else numel


class Tensor:
  """_rebuild_tensor_v2(storage, offset, size, stride, requires_grad, hooks) when pickled."""

  def __init__(self, storage: Storage, offset, size, stride):
    self.storage, self.offset, self.size, self.stride = storage, offset, size, stride

  def __reduce__(self):
    rebuild = sys.modules["torch._utils"]._rebuild_tensor_v2  # pylint: disable=protected-access
    return rebuild, (self.storage, self.offset, self.size, self.stride, False,
                     collections.OrderedDict())


def tensor(key: str, array: np.ndarray) -> Tensor:
  """A well-formed contiguous tensor holding ``array``."""
  a = np.ascontiguousarray(array)
  stride = tuple(s // a.itemsize for s in a.strides)
  return Tensor(Storage(key, a.astype(a.dtype.newbyteorder("<")).tobytes(), a.dtype), 0,
                a.shape, stride)


@contextlib.contextmanager
def _fake_torch():
  torch, utils = types.ModuleType("torch"), types.ModuleType("torch._utils")

  def _rebuild_tensor_v2(*args):
    raise AssertionError("only for pickling")

  _rebuild_tensor_v2.__module__ = "torch._utils"
  _rebuild_tensor_v2.__qualname__ = "_rebuild_tensor_v2"
  utils._rebuild_tensor_v2 = _rebuild_tensor_v2  # pylint: disable=protected-access
  for name in set(_STORAGES.values()):
    setattr(torch, name, type(name, (), {"__module__": "torch"}))
  torch._utils = utils  # pylint: disable=protected-access
  saved = {k: sys.modules.get(k) for k in ("torch", "torch._utils")}
  sys.modules.update({"torch": torch, "torch._utils": utils})
  try:
    yield torch
  finally:
    for k, v in saved.items():
      if v is None:
        sys.modules.pop(k, None)
      else:
        sys.modules[k] = v


def dumps(state: dict, prefix: str = "archive") -> bytes:
  """The bytes of a torch.save-style zip holding ``state`` ({name: Tensor})."""
  storages = {}
  with _fake_torch() as torch:

    class _Pickler(pickle.Pickler):

      def persistent_id(self, obj):
        if isinstance(obj, Storage):
          storages[obj.key] = obj
          return ("storage", getattr(torch, _STORAGES[obj.dtype]), obj.key, "cpu", obj.numel)
        return None

    buf = io.BytesIO()
    _Pickler(buf, protocol=2).dump(collections.OrderedDict(state))
  out = io.BytesIO()
  with zipfile.ZipFile(out, "w") as z:
    z.writestr(f"{prefix}/data.pkl", buf.getvalue())
    for key, s in storages.items():
      z.writestr(f"{prefix}/data/{key}", s.data)
    z.writestr(f"{prefix}/version", "3\n")
  return out.getvalue()


def bfcnn_state(rng: np.random.Generator, kernel_sizes=(3, 3, 3), channels: int = 1,
                features: int = 16) -> dict:
  """A well-formed BF-CNN state_dict in the release's layout (DataParallel 'module.' keys)."""
  chans = [channels] + [features] * (len(kernel_sizes) - 1) + [channels]
  state, key = {}, 0
  for l, k in enumerate(kernel_sizes):
    w = rng.standard_normal((chans[l + 1], chans[l], k, k)).astype(np.float32) * 0.1
    state[f"module.conv_layers.{l}.weight"] = tensor(str(key), w)
    key += 1
  for l in range(len(kernel_sizes) - 2):
    state[f"module.BN_layers.{l}.gammas"] = tensor(
        str(key), rng.uniform(0.5, 1.5, (1, features, 1, 1)).astype(np.float32))
    state[f"module.BN_layers.{l}.running_sd"] = tensor(
        str(key + 1), rng.uniform(0.5, 1.5, (1, features, 1, 1)).astype(np.float32))
    key += 2
  return state
