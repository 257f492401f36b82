"""Import the authors' released PyTorch denoisers (LCV) without torch and without unpickling.

The ``.pt`` files are zip archives: a pickle describing an OrderedDict of tensors plus one
raw little-endian file per storage. ``read_state_dict`` runs the pickle through an
unpickler that accepts only the handful of globals a state_dict needs (OrderedDict, the
tensor rebuild function and storage types) and refuses everything else, so a malicious
file cannot execute code. torch is not needed; when it is installed, tests check that
``torch.load(..., weights_only=True)`` agrees.

Layout (method.md §3): ``module.conv_layers.K.weight`` (out, in, kh, kw) and
``module.BN_layers.K.{gammas, running_sd}`` (1, 64, 1, 1).
"""
from __future__ import annotations

import collections
import os
import pickle
import re
import zipfile
from zlib import error as zlib_error
from typing import Any

import numpy as np

from wcdm_jax import models, sampling

_DTYPES = {
    "FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
    "LongStorage": np.int64, "IntStorage": np.int32, "ShortStorage": np.int16,
    "CharStorage": np.int8, "ByteStorage": np.uint8, "BoolStorage": np.bool_,
}


# Limits on what an untrusted file may ask for (the released nets are ~1 MB each).
MAX_STORAGE_BYTES = 1 << 30
MAX_TENSOR_ELEMENTS = 1 << 28


class WeightFileError(ValueError):
  """A weight file that is not a well-formed tensor state_dict; the message names the file."""


class _StorageType:
  def __init__(self, name: str):
    self.name, self.dtype = name, np.dtype(_DTYPES[name]).newbyteorder("<")


def _int_tuple(value, what: str) -> tuple[int, ...]:
  if not isinstance(value, (tuple, list)) or not all(
      isinstance(v, int) and not isinstance(v, bool) for v in value):
    raise pickle.UnpicklingError(f"tensor {what} must be a tuple of ints, got {value!r:.80}")
  return tuple(value)


def _rebuild_tensor(storage, offset, size, stride, *unused):
  """A copy of the strided view (offset, size, stride) of ``storage``, every index checked.

  Never builds a raw strided view: the element indices are computed and bounds-checked
  against the storage first, so a crafted header cannot read outside it.
  """
  if not (isinstance(storage, tuple) and len(storage) == 2 and isinstance(storage[1], np.dtype)):
    raise pickle.UnpicklingError("tensor without a storage")
  flat = np.frombuffer(storage[0], dtype=storage[1])
  size, stride = _int_tuple(size, "size"), _int_tuple(stride, "stride")
  if not isinstance(offset, int) or isinstance(offset, bool) or offset < 0:
    raise pickle.UnpicklingError(f"tensor offset must be an int >= 0, got {offset!r:.80}")
  if len(size) != len(stride) or any(n < 0 for n in size) or any(st < 0 for st in stride):
    raise pickle.UnpicklingError(f"bad tensor size {size} / stride {stride}")
  numel = 1
  for n in size:
    numel *= n
  if numel > MAX_TENSOR_ELEMENTS:
    raise pickle.UnpicklingError(f"tensor of {numel} elements is over the limit")
  if numel == 0:
    return np.zeros(size, flat.dtype.newbyteorder("="))
  last = offset + sum((n - 1) * st for n, st in zip(size, stride))
  if last >= flat.size:
    raise pickle.UnpicklingError(
        f"tensor (offset {offset}, size {size}, stride {stride}) reaches element {last} of a "
        f"storage of {flat.size}")
  index = np.full((1,) * len(size), offset, np.int64)
  for axis, (n, st) in enumerate(zip(size, stride)):
    shape = [1] * len(size)
    shape[axis] = n
    index = index + (np.arange(n, dtype=np.int64) * st).reshape(shape)
  return flat[index].astype(flat.dtype.newbyteorder("="))  # own, writable, native order


def _rebuild_parameter(data, requires_grad, backward_hooks, *unused):
  return data


class _SafeUnpickler(pickle.Unpickler):
  """Resolves only the globals of a tensor state_dict; anything else is an error."""

  def __init__(self, file, archive: zipfile.ZipFile, prefix: str):
    super().__init__(file)
    self._archive, self._prefix = archive, prefix

  def find_class(self, module: str, name: str) -> Any:
    if (module, name) == ("collections", "OrderedDict"):
      return collections.OrderedDict
    if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
      return _rebuild_tensor
    if (module, name) == ("torch._utils", "_rebuild_parameter"):
      return _rebuild_parameter
    if module == "torch" and name in _DTYPES:
      return _StorageType(name)
    raise pickle.UnpicklingError(
        f"refusing to load {module}.{name}: only tensor state_dicts are accepted")

  def persistent_load(self, pid):
    if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"
            and isinstance(pid[1], _StorageType) and isinstance(pid[2], str)
            and isinstance(pid[4], int) and not isinstance(pid[4], bool) and pid[4] >= 0):
      raise pickle.UnpicklingError(f"unexpected persistent id {pid!r:.120}")
    _, storage_type, key, _location, numel = pid
    name = f"{self._prefix}/data/{key}"
    try:
      info = self._archive.getinfo(name)
    except KeyError:
      raise pickle.UnpicklingError(f"storage {key!r} is missing from the archive") from None
    if info.file_size > MAX_STORAGE_BYTES:
      raise pickle.UnpicklingError(f"storage {key!r} of {info.file_size} bytes is over the limit")
    data = self._archive.read(name)
    itemsize = storage_type.dtype.itemsize
    if len(data) != numel * itemsize:
      raise pickle.UnpicklingError(f"storage {key!r} holds {len(data)} bytes, not {numel} x "
                                   f"{itemsize}")
    return data, storage_type.dtype


def read_state_dict(path: str) -> dict[str, np.ndarray]:
  """Tensors of a PyTorch zip checkpoint as numpy arrays, never executing pickled code.

  Raises ``WeightFileError`` (naming ``path``) for anything but a well-formed tensor
  state_dict: a truncated or corrupt archive, a foreign global, a tensor header that points
  outside its storage.
  """
  try:
    with zipfile.ZipFile(path) as archive:
      pkls = [n for n in archive.namelist() if n.endswith("/data.pkl")]
      if len(pkls) != 1:
        raise ValueError(f"not a PyTorch zip checkpoint (found {pkls})")
      prefix = pkls[0][: -len("/data.pkl")]
      with archive.open(pkls[0]) as f:
        state = _SafeUnpickler(f, archive, prefix).load()
  except OSError as e:
    if not os.path.exists(path):
      raise FileNotFoundError(f"{path}: no such weight file") from e
    raise WeightFileError(f"{path}: cannot read it as a PyTorch checkpoint: {e}") from e
  except (ValueError, pickle.UnpicklingError, zipfile.BadZipFile, EOFError, KeyError, IndexError,
          TypeError, AttributeError, RecursionError, OverflowError, MemoryError,
          NotImplementedError, UnicodeDecodeError, zlib_error) as e:
    raise WeightFileError(f"{path}: not a valid tensor state_dict: {type(e).__name__}: "
                          f"{str(e)[:300]}") from e
  if not isinstance(state, dict) or not all(
      isinstance(k, str) and isinstance(v, np.ndarray) for k, v in state.items()):
    raise WeightFileError(f"{path}: the pickle holds a {type(state).__name__}, not a "
                          "{name: tensor} state_dict")
  return dict(state)


def net_from_state_dict(state: dict[str, np.ndarray], kind: str, level: int = -1
                        ) -> tuple[models.NetSpec, models.Variables]:
  """Map a BF-CNN state_dict onto (NetSpec, variables); RF and depth come from the shapes."""
  convs, bns = {}, {}
  for key, value in state.items():
    m = re.fullmatch(r"(?:module\.)?conv_layers\.(\d+)\.weight", key)
    if m:
      convs[int(m.group(1))] = np.asarray(value, np.float32)
      continue
    m = re.fullmatch(r"(?:module\.)?BN_layers\.(\d+)\.(gammas|running_sd)", key)
    if m:
      bns.setdefault(int(m.group(1)), {})[m.group(2)] = np.asarray(value, np.float32).reshape(-1)
      continue
    raise ValueError(f"unexpected key {key!r} in a BF-CNN state_dict")
  n = len(convs)
  if sorted(convs) != list(range(n)) or sorted(bns) != list(range(n - 2)):
    raise ValueError(f"incomplete BF-CNN: conv layers {sorted(convs)}, BN layers {sorted(bns)}")
  for l in range(n):
    w = convs[l]
    if w.ndim != 4 or w.shape[2] != w.shape[3] or w.shape[2] % 2 == 0:
      raise ValueError(f"conv layer {l} has shape {w.shape}, not (out, in, k, k) with odd k")
    if l and w.shape[1] != convs[l - 1].shape[0]:
      raise ValueError(f"conv layer {l} takes {w.shape[1]} channels but layer {l - 1} gives "
                       f"{convs[l - 1].shape[0]}")
    if not np.all(np.isfinite(w)):
      raise ValueError(f"conv layer {l} holds non-finite weights")
  for l, bn in bns.items():
    for field in ("gammas", "running_sd"):
      if field not in bn or bn[field].shape != (convs[l + 1].shape[0],):
        raise ValueError(f"BN layer {l}: {field} missing or not of {convs[l + 1].shape[0]} values")
      if not np.all(np.isfinite(bn[field])):
        raise ValueError(f"BN layer {l}: non-finite {field}")
  kernels = [convs[l].shape[2] for l in range(n)]
  spec = models.NetSpec(kind=kind, in_channels=convs[0].shape[1],
                        out_channels=convs[n - 1].shape[0], kernel_sizes=tuple(kernels),
                        features=convs[0].shape[0], level=level)
  to_hwio = lambda w: np.transpose(w, (2, 3, 1, 0))  # (out, in, kh, kw) -> (kh, kw, in, out)
  params = {"conv_0": {"kernel": to_hwio(convs[0])},
            f"conv_{n - 1}": {"kernel": to_hwio(convs[n - 1])}}
  stats = {}
  for l in range(1, n - 1):
    params[f"block_{l}"] = {"kernel": to_hwio(convs[l]), "gammas": bns[l - 1]["gammas"]}
    stats[f"block_{l}"] = {"running_sd": bns[l - 1]["running_sd"]}
  return spec, {"params": params, "batch_stats": stats}


def read_net(path: str, kind: str, level: int = -1):
  """(NetSpec, variables) of one released ``model.pt``; errors name the file."""
  state = read_state_dict(path)
  try:
    return net_from_state_dict(state, kind, level)
  except (ValueError, IndexError, KeyError) as e:
    raise WeightFileError(f"{path}: not a BF-CNN of this release: {e}") from e


_RF_DIR = re.compile(r"RF_(\d+)x\d+(?:_scale_(\d+)|_(low))?$")


def find_release_models(root: str) -> dict[str, dict[str, str]]:
  """Group the release's model.pt files into models.

  Returns {model name: {net name: path}}, e.g. 'flat_celebA_160x160_gray_rf9': {'flat': ...},
  'ms_celebA_160x160_gray_rf13': {'low': ..., 'cond0': ..., 'cond1': ...}. A multi-scale
  model takes the dataset's single low-pass net.
  """
  found: dict[str, dict[str, str]] = {}
  for dirpath, _, files in sorted(os.walk(root)):
    if "model.pt" not in files:
      continue
    m = _RF_DIR.search(os.path.basename(dirpath))
    if not m:
      continue
    dataset = os.path.basename(os.path.dirname(dirpath))
    path = os.path.join(dirpath, "model.pt")
    rf, scale, low = m.group(1), m.group(2), m.group(3)
    if scale is None and low is None:
      found[f"flat_{dataset}_rf{rf}"] = {"flat": path}
    elif scale is not None:
      found.setdefault(f"ms_{dataset}_rf{rf}", {})[f"cond{scale}"] = path
    else:
      found.setdefault(f"_low_{dataset}", {})["low"] = path
  lows = {k[len("_low_"):]: v["low"] for k, v in found.items() if k.startswith("_low_")}
  out = {}
  for name, nets in found.items():
    if name.startswith("_low_"):
      continue
    if name.startswith("ms_"):
      dataset = name[3:].rsplit("_rf", 1)[0]
      if dataset not in lows:
        continue
      nets = dict(nets, low=lows[dataset])
    out[name] = nets
  return out


def _image_size(dataset_dir_name: str) -> tuple[int, int]:
  """The training size in a release folder's name (e.g. celebA_160x160_gray); an error naming
  the argument to pass when the name holds none."""
  m = re.search(r"(\d+)x(\d+)", dataset_dir_name)
  if not m:
    raise ValueError(f"the folder name {dataset_dir_name!r} does not say the images' size (as "
                     "in 'celebA_160x160_gray'); pass image_size=(H, W) to load_release_model")
  return int(m.group(1)), int(m.group(2))


def load_release_model(nets: dict[str, str], image_size: tuple[int, int] | None = None
                       ) -> models.ModelParams:
  """``ModelParams`` from a {net name: model.pt path} group of ``find_release_models``."""
  if image_size is None:
    image_size = _image_size(os.path.basename(os.path.dirname(os.path.dirname(
        next(iter(nets.values()))))))
  if "flat" in nets:
    spec, variables = read_net(nets["flat"], "flat")
    return models.ModelParams(low=variables, conditionals=(),
                              spec=models.ModelSpec(low=spec, image_size=image_size))
  levels = sum(1 for n in nets if n.startswith("cond"))
  if sorted(nets) != sorted(["low"] + [f"cond{j}" for j in range(levels)]):
    raise ValueError(f"incomplete multi-scale model: {sorted(nets)}")
  low_spec, low_vars = read_net(nets["low"], "low", levels)
  conds = [read_net(nets[f"cond{j}"], "cond", j) for j in range(levels)]
  spec = models.ModelSpec(low=low_spec, conditionals=tuple(c[0] for c in conds),
                          image_size=image_size)
  return models.ModelParams(low=low_vars, conditionals=tuple(c[1] for c in conds), spec=spec,
                            sampling=sampling.release_recommended(levels))
