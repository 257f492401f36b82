import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import native_variants
from wcdm_jax import conv, models, native_build


def _random_bn(variables, key):
  """Give the running stds and gains non-trivial values so the test exercises them."""
  leaves, tree = jax.tree.flatten(variables)
  keys = jax.random.split(key, len(leaves))
  leaves = [l * jax.random.uniform(k, l.shape, minval=0.5, maxval=2.0) for l, k in zip(leaves, keys)]
  v = jax.tree.unflatten(tree, leaves)
  v["params"] = jax.tree.map(lambda p: p * 20 if p.ndim == 1 else p, v["params"])  # gains up
  return v


@pytest.mark.parametrize("kind", ["flat", "low", "cond"])
@pytest.mark.parametrize("conv_impl", ["xla", "matmul", "auto"])
def test_positive_homogeneity(kind, conv_impl):
  spec = {"flat": models.flat_spec(9, 1, 6, 8), "low": models.low_spec(2, 13, 3, 6, 8),
          "cond": models.cond_spec(0, 9, 1, 6, 8)}[kind]
  v = _random_bn(models.init_net(jax.random.key(0), spec), jax.random.key(1))
  x = jax.random.normal(jax.random.key(2), (2, 20, 20, spec.in_channels))
  f = lambda x: models.apply_net(spec, v, x, conv_impl=conv_impl)
  fx = f(x)
  assert float(jnp.abs(fx).max()) > 1e-3  # not trivially zero
  for a in (0.1, 3.7):
    np.testing.assert_allclose(f(a * x), a * fx, rtol=2e-4, atol=1e-5 * float(jnp.abs(fx).max()) * a)
  # Not odd-homogeneous (ReLU): f(-x) != -f(x), so the test above has teeth.
  assert float(jnp.abs(f(-x) + fx).max()) > 1e-3


@pytest.mark.parametrize("rf", [5, 9, 13, 23, 43])
def test_receptive_field_is_exact(rf):
  spec = models.flat_spec(rf, features=16)
  _check_rf(spec, rf)


def test_low_pass_receptive_field_41():
  spec = models.low_spec(2, 41, features=16)
  assert spec.num_layers == 20
  _check_rf(spec, 41)


def _check_rf(spec, rf):
  assert spec.rf == rf
  v = _random_bn(models.init_net(jax.random.key(0), spec), jax.random.key(1))
  size = rf + 12
  c = size // 2
  # Sum |gradient| over a few inputs: a ReLU can zero single paths for one input.
  x = jax.random.normal(jax.random.key(3), (4, size, size, spec.in_channels))
  g = jax.vmap(jax.grad(lambda x: models.apply_net(spec, v, x[None])[0, c, c, 0]))(x)
  support = np.argwhere(np.abs(np.asarray(g)).sum((0, -1)) > 0)
  r = rf // 2
  assert support.min(0).tolist() == [c - r, c - r]
  assert support.max(0).tolist() == [c + r, c + r]


def test_released_layouts():
  assert models.kernel_sizes_for_rf(9) == tuple(3 if l in (0, 8, 16, 20) else 1 for l in range(21))
  assert models.kernel_sizes_for_rf(23).count(3) == 11
  assert models.kernel_sizes_for_rf(15, 10).count(3) == 7
  with pytest.raises(ValueError, match="impossible"):
    models.kernel_sizes_for_rf(8)
  with pytest.raises(ValueError, match="impossible"):
    models.kernel_sizes_for_rf(45)


def test_batch_norm_train_and_eval():
  spec = models.flat_spec(5, 1, 3, 4)
  v = models.init_net(jax.random.key(0), spec)
  x = jax.random.normal(jax.random.key(1), (4, 8, 8, 1)) * 3.0
  net = models.BFCNN(spec)
  _, upd = net.apply(v, x, train=True, mutable=["batch_stats"])
  h = jax.lax.conv_general_dilated(x, v["params"]["conv_0"]["kernel"], (1, 1), "SAME",
                                   dimension_numbers=("NHWC", "HWIO", "NHWC"))
  h = jnp.einsum("bhwc,cd->bhwd", h, v["params"]["block_1"]["kernel"][0, 0])  # 1x1
  sd = jnp.sqrt(jnp.var(h, axis=(0, 1, 2)) + 1e-5)
  np.testing.assert_allclose(upd["batch_stats"]["block_1"]["running_sd"], 0.9 + 0.1 * sd,
                             rtol=1e-5)


def test_two_layer_net_has_empty_batch_stats_and_trains():
  """conv -> conv has no batch norm: its variables carry an empty 'batch_stats' (a 2-layer
  low-pass net crashed the trainer with a KeyError), and the training loss runs on it."""
  from wcdm_jax import training  # pylint: disable=g-import-not-at-top
  spec = models.low_spec(1, rf=5, num_layers=2, features=4)
  v = models.init_net(jax.random.key(0), spec)
  assert v["batch_stats"] == {} and set(v["params"]) == {"conv_0", "conv_1"}
  x = jax.random.normal(jax.random.key(1), (2, 8, 8, 1))
  out = models.apply_net(spec, v, x)
  assert out.shape == x.shape
  loss, stats = training.loss_fn(v["params"], v["batch_stats"], spec, x, 0.1 * x)
  assert stats == {} and np.isfinite(float(loss))
  grads = jax.grad(lambda p: training.loss_fn(p, {}, spec, x, 0.1 * x)[0])(v["params"])
  assert float(jnp.abs(grads["conv_0"]["kernel"]).max()) > 0


def test_spec_json_round_trip_and_colour():
  spec = models.multiscale_spec(3, 13, 41, channels=3, image_size=(320, 320))
  assert models.ModelSpec.from_json(spec.to_json()) == spec
  assert spec.conditionals[0].in_channels == 12 and spec.conditionals[0].out_channels == 9
  assert spec.net_size("low") == (40, 40) and spec.net_size("cond0") == (160, 160)
  with pytest.raises(ValueError, match="divisible"):
    models.multiscale_spec(3, image_size=(100, 100))


def test_wrong_channels_message():
  spec = models.cond_spec(0, 9, 1, 4, 4)
  v = models.init_net(jax.random.key(0), spec)
  with pytest.raises(ValueError, match="expects 4 input channels"):
    models.apply_net(spec, v, jnp.zeros((1, 8, 8, 1)))


def _impls():
  return ("xla", "matmul", "auto") + (("native",) if conv.native_available() else ())


# Shapes reach each native path: XLA fallback (Cout 7), direct 3x3 (Cin 8), Winograd 3x3 with
# odd image sizes (partial tiles), direct 5x5 and 1x1.
@pytest.mark.parametrize("batch,cin,cout,k", [(1, 5, 7, 3), (4, 8, 32, 3), (2, 32, 16, 3),
                                               (2, 32, 16, 5), (2, 16, 48, 1)])
@pytest.mark.parametrize("relu", [False, True])
def test_conv_impls_agree_in_value_and_gradients(batch, cin, cout, k, relu):
  """Every conv impl (the native kernels included) is the same function, gradients too."""
  x = jax.random.normal(jax.random.key(0), (batch, 11, 9, cin))
  kern = jax.random.normal(jax.random.key(1), (k, k, cin, cout)) / (k * np.sqrt(cin))
  loss = lambda impl: lambda x, kern: jnp.sum(jnp.sin(3 * conv.conv2d(x, kern, impl, relu)))
  ref = jax.jit(jax.value_and_grad(loss("xla_autodiff"), argnums=(0, 1)))(x, kern)
  assert float(jnp.abs(ref[1][1]).max()) > 0.1  # a gradient that can show a difference
  for impl in _impls():
    out = jax.jit(jax.value_and_grad(loss(impl), argnums=(0, 1)))(x, kern)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4), out, ref)
  with pytest.raises(ValueError, match="conv impl must be one of"):
    conv.conv2d(x, kern, "cuda")


def test_native_kernels_are_used_where_they_can_be():
  """On an x86-64 CPU with AVX2 or AVX-512 and a C++ compiler, 'auto' runs the fastest one
  (or the one WCDM_JAX_NATIVE_ISA forces, e.g. the AVX2-only path run on an AVX-512 host)."""
  isas = native_build.cpu_isas()
  requested = conv._requested_isa()  # pylint: disable=protected-access
  if requested == "off":
    pytest.skip("native kernels switched off (WCDM_JAX_NATIVE_ISA=off): XLA is used")
  best = requested if requested != "auto" else next((i for i in conv.AUTO_ISAS if i in isas), None)
  if best is None:
    pytest.skip(f"no AVX2 / AVX-512 or no C++ compiler (CPU runs {isas}): XLA is used")
  assert conv.native_isa() == best and conv.native_available()
  x, kern = jnp.ones((1, 8, 8, 8)), jnp.ones((3, 3, 8, 16))
  assert conv.native_supports(x, kern) and conv.uses_native("auto", x, kern)
  assert not conv.native_supports(x, kern[..., :3])  # Cout % 16 != 0 -> XLA
  assert not conv.native_supports(x[..., :4], kern[:, :, :4])  # Cin < 8 -> XLA
  assert not conv.native_supports(x.astype(jnp.bfloat16), kern)
  # The fused kernel of that ISA is really what runs: the compiled program calls its target.
  hlo = jax.jit(lambda x, k: conv.conv2d(x, k, "auto")).lower(x, kern).as_text()
  assert native_build.target_name("fwd", best) in hlo


@pytest.mark.parametrize("isa", native_variants() or ["none"])
@pytest.mark.parametrize("size", [(1, 1), (2, 7), (8, 8), (13, 6)])
def test_native_winograd_matches_direct(isa, size):
  """Winograd F(2x2, 3x3) and the direct kernel agree to float32 round-off, any image size."""
  if isa == "none":
    pytest.skip("no C++ compiler: no native kernels")
  x = jax.random.normal(jax.random.key(0), (3, *size, 32))
  kern = jax.random.normal(jax.random.key(1), (3, 3, 32, 64)) / 17.0
  assert conv.uses_winograd(kern)
  direct = jax.jit(lambda x, k: conv.native_conv(x, k, False, False, isa))(x, kern)
  wino = jax.jit(lambda x, k: conv.native_conv(x, k, False, True, isa))(x, kern)
  np.testing.assert_allclose(wino, direct, rtol=1e-5, atol=1e-5 * float(jnp.abs(direct).max()))
  hlo = jax.jit(lambda x, k: conv.native_conv(x, k, isa=isa)).lower(x, kern).as_text()
  assert native_build.target_name("winograd", isa) in hlo
