"""quality.swd: the multi-scale sliced Wasserstein distance orders degraded sets after real ones."""
import jax.numpy as jnp
import numpy as np
import pytest

from wcdm_jax import dead_leaves, evaluation, quality


def _images(n, seed, size=48):
  rng = np.random.default_rng(seed)
  return np.stack([dead_leaves.render(rng, size, size, size / 2) for _ in range(n)])


@pytest.fixture(scope="module")
def sets():
  return _images(24, 0), _images(24, 1)


def test_laplacian_pyramid_is_invertible():
  x = jnp.asarray(_images(2, 3, size=64))
  levels = quality.laplacian_pyramid(x, min_size=16)
  assert [l.shape[1] for l in levels] == [64, 32, 16]
  g = levels[-1]
  for lap in reversed(levels[:-1]):
    g = lap + quality._upsample(g, lap.shape[1:3])  # pylint: disable=protected-access
  np.testing.assert_allclose(g, x, atol=1e-5)
  # A constant image has no detail: the Laplacian levels vanish, the low-pass keeps it.
  flat = quality.laplacian_pyramid(jnp.full((1, 32, 32, 1), 0.3), min_size=16)
  np.testing.assert_allclose(flat[0], 0, atol=1e-6)
  np.testing.assert_allclose(flat[-1], 0.3, atol=1e-6)


def test_swd_orders_degraded_sets_after_real_ones(sets):
  real, ref = sets
  kw = dict(seed=0, patches=2048, directions=64, bootstrap=0)
  floor = quality.swd(real, ref, **kw).mean
  blurred = np.asarray(evaluation.gaussian_blur(jnp.asarray(real), 1.0))
  dimmer = 0.8 * real + 0.1
  for name, worse in (("blur", blurred), ("contrast", dimmer)):
    d = quality.swd(worse, ref, **kw)
    assert d.mean > 1.5 * floor, (name, d.mean, floor)
  # Noise shows at the finest level (dead leaves are busy: std 0.05 is needed to stand out of
  # 24 images' own spread there; smooth faces show 0.02, benchmarks/bench_sample_quality.py).
  noisy = real + 0.05 * np.random.default_rng(7).standard_normal(real.shape).astype(np.float32)
  d, f = quality.swd(noisy, ref, **kw), quality.swd(real, ref, **kw)
  assert d.per_level[0] > 2 * f.per_level[0], (d.per_level, f.per_level)


def test_swd_is_a_function_of_its_seed_with_an_interval(sets):
  real, ref = sets
  a = quality.swd(real, ref, seed=3, patches=1024, directions=32, bootstrap=6)
  b = quality.swd(real, ref, seed=3, patches=1024, directions=32, bootstrap=6)
  assert a == b
  c = quality.swd(real, ref, seed=4, patches=1024, directions=32, bootstrap=6)
  assert c.mean != a.mean
  assert a.levels == ((48, 48), (24, 24))
  assert len(a.per_level) == 2 and a.mean == pytest.approx(np.mean(a.per_level))
  lo, hi = a.mean_ci
  assert 0 < lo < hi and len(a.per_level_ci) == 2


@pytest.mark.parametrize("args,message", [
    ((np.zeros((4, 16, 16, 1)), np.zeros((4, 32, 32, 1))), "one image shape"),
    ((np.zeros((4, 16, 16, 1)), np.zeros((4, 16, 16, 3))), "one image shape"),
    ((np.zeros((1, 16, 16, 1)), np.zeros((4, 16, 16, 1))), "at least 2 images"),
    ((np.full((2, 16, 16, 1), np.nan), np.zeros((2, 16, 16, 1))), "NaN"),
    ((np.zeros((2, 6, 6, 1)), np.zeros((2, 6, 6, 1))), "smaller than the 7x7 patches"),
])
def test_bad_sets_are_refused(args, message):
  with pytest.raises(ValueError, match=message):
    quality.swd(*args, bootstrap=0)


def test_paired_difference_separates_a_degradation_from_noise(sets):
  real, ref = sets
  other = _images(24, 2)
  kw = dict(seed=0, patches=1024, directions=32, bootstrap=12)
  blurred = np.asarray(evaluation.gaussian_blur(jnp.asarray(other), 1.0))
  d, (lo, hi) = quality.swd_difference(blurred, other, ref, **kw)
  assert 0 < lo <= d <= hi
  d, (lo, hi) = quality.swd_difference(real, other, ref, **kw)  # two real sets: no difference
  assert lo < 0 < hi
  with pytest.raises(ValueError, match="as many images"):
    quality.swd_difference(real[:4], other, ref, **kw)


def _faces(n, seed, size=32, swap=False):
  """Toy images with a layout: a bright disc (a head) near the centre, two dark dots (eyes)
  above a dark bar (a mouth), sizes and positions jittered; ``swap`` puts the eyes below."""
  rng = np.random.default_rng(seed)
  yy, xx = np.mgrid[:size, :size] / size
  out = []
  for _ in range(n):
    cy, cx = 0.5 + 0.05 * rng.standard_normal(2)
    r = 0.3 + 0.03 * rng.standard_normal()
    img = 0.2 + 0.5 * (((yy - cy) ** 2 + (xx - cx) ** 2) < r ** 2)
    eye_y, mouth_y = (cy + 0.12, cy - 0.12) if swap else (cy - 0.1, cy + 0.12)
    for ex in (cx - 0.1, cx + 0.1):
      img = img - 0.4 * (((yy - eye_y) ** 2 + (xx - ex) ** 2) < 0.05 ** 2)
    img = img - 0.3 * ((abs(yy - mouth_y) < 0.03) & (abs(xx - cx) < 0.12))
    out.append(img + 0.02 * rng.standard_normal(img.shape))
  return np.clip(np.stack(out)[..., None], 0, 1).astype(np.float32)


def test_w1_is_exact():
  a = np.array([0.0, 1.0, 2.0])
  assert quality._w1(a, a + 0.5) == pytest.approx(0.5)  # pylint: disable=protected-access
  assert quality._w1(a, np.array([1.0])) == pytest.approx(2 / 3)  # pylint: disable=protected-access


def test_layout_orders_broken_layouts_after_real_ones():
  real, ref = _faces(24, 0), _faces(128, 1)
  kw = dict(size=16, components=8, seed=0, bootstrap=50)
  floor = quality.layout(real, ref, **kw)
  lo, hi = floor.ci
  assert lo <= floor.distance <= hi
  halves = np.concatenate([real[:, 16:], real[:, :16]], axis=1)
  for name, broken in (("halves swapped", halves), ("eyes below", _faces(24, 0, swap=True))):
    d = quality.layout(broken, ref, **kw)
    assert d.distance > 3 * floor.distance and d.residual > floor.reference_residual, name
    diff, (dlo, _) = quality.layout_difference(broken, real, ref, **kw)
    assert dlo > 0 and diff == pytest.approx(d.distance - floor.distance), name
  # A smoother set leaves less outside the principal images: its residual is below the
  # reference's (what Layout.residual tells apart from a broken layout, above it).
  blurred = np.asarray(evaluation.gaussian_blur(jnp.asarray(real), 1.0))
  assert quality.layout(blurred, ref, **kw).residual < floor.reference_residual
  assert quality.layout(real, ref, **kw) == floor  # a function of its inputs and seed
  with pytest.raises(ValueError, match="too few for components=8"):
    quality.layout(real, ref[:10], **kw)
  with pytest.raises(ValueError, match="as many images"):
    quality.layout_difference(real[:4], real, ref, **kw)
