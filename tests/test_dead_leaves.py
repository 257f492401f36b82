"""The dead-leaves ensemble (wcdm_jax.dead_leaves) and its data source."""
import numpy as np
import pytest

from wcdm_jax import data, dead_leaves, pipeline


def test_radii_follow_the_power_law_within_the_bounds():
  model = dead_leaves.DeadLeaves(r_min=0.05, r_max=0.8, exponent=3.0)
  r = model.radii(np.random.default_rng(0).random(200_000))
  assert model.r_min <= r.min() and r.max() <= model.r_max
  # P(r > t) = (t^-2 - r_max^-2) / (r_min^-2 - r_max^-2) for exponent 3.
  for t in (0.07, 0.1, 0.2, 0.4):
    expected = (t ** -2 - 0.8 ** -2) / (0.05 ** -2 - 0.8 ** -2)
    assert np.mean(r > t) == pytest.approx(expected, abs=0.005)
  assert model.mean_area() == pytest.approx(np.mean(np.pi * r * r), rel=0.02)
  other = dead_leaves.DeadLeaves(r_min=0.05, r_max=0.8, exponent=2.5)
  r2 = other.radii(np.random.default_rng(0).random(200_000))
  assert other.mean_area() == pytest.approx(np.mean(np.pi * r2 * r2), rel=0.02)


def test_render_is_a_covered_deterministic_image_of_discs():
  model = dead_leaves.DeadLeaves(supersample=1)
  a = dead_leaves.render(np.random.default_rng(3), 48, 64, 32, 1, model)
  b = dead_leaves.render(np.random.default_rng(3), 48, 64, 32, 1, model)
  np.testing.assert_array_equal(a, b)
  assert a.shape == (48, 64, 1) and a.dtype == np.float32
  assert not np.array_equal(a, dead_leaves.render(np.random.default_rng(4), 48, 64, 32, 1, model))
  # Without supersampling every pixel is one disc's grey level: flat regions of few values,
  # each disc at least r_min * unit = 2 px in radius, so most pixels equal a neighbour.
  values = np.unique(a)
  assert 10 < values.size < 1000
  same = np.mean(a[1:] == a[:-1])
  assert same > 0.7
  # Colour: the same geometry (the same draws) with three values per disc.
  c = dead_leaves.render(np.random.default_rng(3), 48, 64, 32, 3, model)
  assert c.shape == (48, 64, 3)
  assert np.mean(np.abs(c[..., 0] - c[..., 1])) > 0.1


def test_supersampling_antialiases_edges():
  sharp = dead_leaves.render(np.random.default_rng(0), 64, 64, 64, 1, dead_leaves.DeadLeaves(
      supersample=1))
  smooth = dead_leaves.render(np.random.default_rng(0), 64, 64, 64, 1, dead_leaves.DeadLeaves(
      supersample=4))
  assert smooth.min() >= 0 and smooth.max() <= 1
  assert np.unique(smooth).size > 3 * np.unique(sharp).size  # mixed values along the edges


def test_the_ensemble_is_scale_invariant():
  """Radii are fractions of the unit: one image at unit 32 and a 2x larger one at unit 64
  have the same share of edge pixels (per image side)."""
  def edge_share(size, unit, seed):
    x = dead_leaves.render(np.random.default_rng(seed), size, size, unit, 1,
                           dead_leaves.DeadLeaves(supersample=1))
    return np.mean(x[1:] != x[:-1]) * size
  small = np.mean([edge_share(64, 32, s) for s in range(8)])
  large = np.mean([edge_share(128, 64, s) for s in range(8)])
  assert large == pytest.approx(small, rel=0.15)


def test_bad_ensembles_are_errors():
  for kwargs in (dict(r_min=0.5, r_max=0.5), dict(r_min=0.0), dict(exponent=1.0),
                 dict(supersample=0)):
    with pytest.raises(ValueError):
      dead_leaves.DeadLeaves(**kwargs)


def test_dead_leaves_source_is_a_fixed_data_set_cropped_per_run():
  cfg = data.DataConfig(source="deadleaves", image_size=16)
  src = data.make_source(cfg, 8, seed=1)
  a = src.batch(5)
  np.testing.assert_array_equal(a, data.make_source(cfg, 8, seed=1).batch(5))
  assert a.shape == (8, 16, 16, 1) and a.dtype == np.float32
  assert 0 <= a.min() and a.max() <= 1 and a.std() > 0.1
  assert not np.array_equal(a, src.batch(6))
  other = data.make_source(cfg, 8, seed=2)
  assert not np.array_equal(a, other.batch(5))
  # The canvases are the data set's: the same for every run seed; the split's own.
  for x, y in zip(src.images, other.images):
    np.testing.assert_array_equal(x, y)
  assert len(src.images) == data.DeadLeavesSource.CANVASES["train"]
  assert src.images[0].shape == (64, 64, 1)
  ev = data.make_source(cfg, 8, seed=1, split="eval")
  assert len(ev.images) == data.DeadLeavesSource.CANVASES["eval"]
  assert not any(np.array_equal(e, t) for e in ev.images for t in src.images)
  both = data.make_source(cfg, 8, seed=1, split="all")
  assert len(both.images) == len(src.images) + len(ev.images)
  halves = [data.make_source(cfg, 8, 1, "train", i, 2).batch(5) for i in range(2)]
  np.testing.assert_array_equal(np.concatenate(halves), a)
  colour = data.make_source(data.DataConfig(source="deadleaves", image_size=16, channels=3), 4)
  assert colour.batch(0).shape == (4, 16, 16, 3)
  assert pipeline.default_workers(src) == 1  # in-memory crops: no parallel decoders


@pytest.mark.parametrize("source", data.CROP_SOURCES)
def test_a_crop_for_a_cropping_source_is_an_error(source):
  with pytest.raises(ValueError, match="applies to folder and tfds sources"):
    data.make_source(data.DataConfig(source=source, image_size=16, crop="center"), 4)
