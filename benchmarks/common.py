"""Shared pieces of the benchmarks: timing, FLOP counts, and the authors' BF-CNN in PyTorch.

The PyTorch network is the authors' architecture written out here (bias-free convolutions,
bias-free batch norm with a running std, ReLU), used only as the speed reference.
"""
from __future__ import annotations

import os
import statistics
import sys
import time
from typing import Callable

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # pylint: disable=g-import-not-at-top


RELEASE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..",
                       "shared", "reference", "lcv-denoisers")


def release_or_random(name: str, spec):
  """(params, 'released' | 'random'): the released model ``name`` (e.g.
  'flat_celebA_160x160_gray_rf43') when ../shared is present, else random weights of ``spec``."""
  import jax  # pylint: disable=g-import-not-at-top
  from wcdm_jax import models, pretrained  # pylint: disable=g-import-not-at-top
  found = pretrained.find_release_models(RELEASE) if os.path.isdir(RELEASE) else {}
  if name in found:
    return pretrained.load_release_model(found[name]), "released"
  return models.init_model(jax.random.key(0), spec), "random"


def add_isa_argument(parser) -> None:
  from wcdm_jax import conv  # pylint: disable=g-import-not-at-top
  parser.add_argument("--isa", default="auto", choices=conv.ISA_CHOICES,
                      help="native kernels to use (WCDM_JAX_NATIVE_ISA): auto = the CPU's best")


# What each forced ISA caps the rest of the process at: XLA's own code generation and
# PyTorch's oneDNN, ATen and MKL dispatch, so that both sides see what a CPU of that ISA offers.
_ISA_CAPS = {
    "avx2": {"xla": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2",
             "MKL_ENABLE_INSTRUCTIONS": "AVX2"},
    "generic": {"xla": "SSE4_2", "ONEDNN_MAX_CPU_ISA": "SSE41", "ATEN_CPU_CAPABILITY": "default",
                "MKL_ENABLE_INSTRUCTIONS": "SSE4_2"},
}


def cap_isa(isa: str) -> str:
  """Cap XLA and PyTorch at ``isa`` when it is below this CPU's best, so that a forced
  ``--isa=avx2`` on an AVX-512 host times both sides as an AVX2-only host would. Must run
  before jax computes anything and before torch is imported; returns a line saying what it did
  ('' when nothing was capped). Variables the user set already are kept."""
  from wcdm_jax import native_build  # pylint: disable=g-import-not-at-top
  best = native_build.cpu_isas()[:1]
  if isa not in _ISA_CAPS or not best or best[0] == isa:
    return ""
  from jax._src import xla_bridge  # pylint: disable=g-import-not-at-top
  if "torch" in sys.modules or xla_bridge.backends_are_initialized():
    raise RuntimeError("cap_isa must run before torch is imported and before jax computes")
  caps = dict(_ISA_CAPS[isa])
  flag = f"--xla_cpu_max_isa={caps.pop('xla')}"
  if "xla_cpu_max_isa" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {flag}".strip()
  for k, v in caps.items():
    os.environ.setdefault(k, v)
  return (f"capped at {isa} on both sides (XLA {flag}, PyTorch ONEDNN_MAX_CPU_ISA="
          f"{os.environ['ONEDNN_MAX_CPU_ISA']}, ATEN_CPU_CAPABILITY="
          f"{os.environ['ATEN_CPU_CAPABILITY']}): the view of a CPU whose best ISA is {isa}")


def use_isa(isa: str) -> str:
  """Make 'auto' convolutions use ``isa`` and cap XLA and PyTorch at it (``cap_isa``); returns
  lines naming the CPU and the ISA in use. Exits with one line when the CPU lacks it."""
  from wcdm_jax import conv, native_build  # pylint: disable=g-import-not-at-top
  capped = cap_isa(isa)
  os.environ["WCDM_JAX_NATIVE_ISA"] = isa
  conv.native_isa.cache_clear()
  conv.native_available.cache_clear()
  try:
    in_use = conv.native_isa()
  except conv.NativeIsaError as e:
    sys.exit(f"error: {e}")
  line = (f"CPU: {native_build.cpu_name()} (runs: {', '.join(native_build.cpu_isas())}); "
          f"convolutions: {'native ' + in_use if in_use else 'XLA'}")
  return f"{line}\n{capped}" if capped else line


def median_time(fn: Callable[[], object], warmup: int = 2, repeats: int = 5) -> float:
  """Median wall time of ``fn()`` in seconds after ``warmup`` calls (fn must block)."""
  for _ in range(warmup):
    fn()
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t)
  return statistics.median(times)


def table(title: str, header: list[str], rows: list[list]) -> str:
  cells = [header] + [[f"{c:.3g}" if isinstance(c, float) else str(c) for c in r] for r in rows]
  widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
  line = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"
  out = [f"### {title}", "", line(cells[0]), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
  out += [line(r) for r in cells[1:]]
  return "\n".join(out)


def torch_threads() -> int:
  import torch  # pylint: disable=g-import-not-at-top
  n = os.cpu_count() or 1
  torch.set_num_threads(n)
  return n


def torch_bfcnn(spec):
  """The authors' BF-CNN for a ``models.NetSpec``, as a torch.nn.Module (NCHW)."""
  import torch  # pylint: disable=g-import-not-at-top
  from torch import nn  # pylint: disable=g-import-not-at-top

  class BFBatchNorm(nn.Module):

    def __init__(self, c):
      super().__init__()
      self.register_buffer("running_sd", torch.ones(1, c, 1, 1))
      self.gammas = nn.Parameter((torch.randn(1, c, 1, 1) * (2.0 / 9.0 / 64.0)).clamp(-0.025, 0.025))

    def forward(self, x):
      if self.training:
        sd = torch.sqrt(x.var(dim=(0, 2, 3), keepdim=True, unbiased=False) + 1e-5)
        with torch.no_grad():
          self.running_sd.copy_(0.9 * self.running_sd + 0.1 * sd)
        return x / sd * self.gammas
      return x / self.running_sd * self.gammas

  class BFCNN(nn.Module):

    def __init__(self):
      super().__init__()
      chans = [spec.in_channels] + [spec.features] * (spec.num_layers - 1) + [spec.out_channels]
      self.conv_layers = nn.ModuleList(
          nn.Conv2d(ci, co, k, padding=k // 2, bias=False)
          for ci, co, k in zip(chans[:-1], chans[1:], spec.kernel_sizes))
      self.BN_layers = nn.ModuleList(BFBatchNorm(spec.features) for _ in range(spec.num_layers - 2))

    def forward(self, x):
      x = self.conv_layers[0](x)
      for conv, bn in zip(self.conv_layers[1:-1], self.BN_layers):
        x = torch.relu(bn(conv(x)))
      return self.conv_layers[-1](x)

  return BFCNN()


def gflops(flops: float, seconds: float) -> float:
  return flops / seconds / 1e9


def rng_images(shape, seed=0) -> np.ndarray:
  return np.random.RandomState(seed).rand(*shape).astype(np.float32)


def jax_train_step(spec, conv_impl: str = "auto", remat: bool = False):
  """(optax tx, jitted step(params, stats, opt_state, noisy, noise)): one Adam train step on
  a given noisy batch, state donated."""
  import functools  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  from wcdm_jax import training  # pylint: disable=g-import-not-at-top
  tx = optax.adam(1e-3)

  @functools.partial(jax.jit, donate_argnums=(0, 1, 2))
  def step(params, stats, opt_state, noisy, noise):
    (loss, stats), grads = jax.value_and_grad(training.loss_fn, has_aux=True)(
        params, stats, spec, noisy, noise, conv_impl=conv_impl, remat=remat)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), stats, opt_state, loss

  return tx, step


def torch_net(spec, variables):
  """The torch BF-CNN holding the same weights and running stds as JAX ``variables``."""
  import torch  # pylint: disable=g-import-not-at-top
  net = torch_bfcnn(spec).eval()
  p, s = variables["params"], variables["batch_stats"]
  with torch.no_grad():
    for l, conv in enumerate(net.conv_layers):
      k = p[f"conv_{l}"]["kernel"] if f"conv_{l}" in p else p[f"block_{l}"]["kernel"]
      conv.weight.copy_(torch.from_numpy(np.asarray(k).transpose(3, 2, 0, 1).copy()))
    for l, bn in enumerate(net.BN_layers, start=1):
      bn.gammas.copy_(torch.from_numpy(np.array(p[f"block_{l}"]["gammas"]).reshape(1, -1, 1, 1)))
      bn.running_sd.copy_(torch.from_numpy(np.array(s[f"block_{l}"]["running_sd"]).reshape(1, -1, 1, 1)))
  return net


def calibrated_variables(spec, x):
  """Random variables for ``spec`` whose running stds equal the batch stds on ``x``.

  Evaluation-mode benchmarks need realistic running stds: with the initial ones (1) and the
  tiny initial gains, activations shrink layer after layer into denormal floats, which
  slow some CPU kernels down by orders of magnitude and would make the comparison meaningless.
  """
  import jax  # pylint: disable=g-import-not-at-top
  from wcdm_jax import models  # pylint: disable=g-import-not-at-top
  v = models.init_net(jax.random.key(0), spec)
  _, upd = models.BFCNN(spec).apply(v, x, train=True, mutable=["batch_stats"])
  sd = jax.tree.map(lambda r: (r - (1 - models.BN_MOMENTUM)) / models.BN_MOMENTUM,
                    upd["batch_stats"])
  return {"params": v["params"], "batch_stats": sd}
