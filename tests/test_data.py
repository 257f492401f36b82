import dataclasses
import os

import numpy as np
import pytest
from PIL import Image

from conftest import shared_path
from wcdm_jax import data, pipeline


def test_embedded_is_deterministic_and_sharded():
  cfg = data.DataConfig(image_size=32)
  a = data.make_source(cfg, 8, seed=1).batch(5)
  b = data.make_source(cfg, 8, seed=1).batch(5)
  np.testing.assert_array_equal(a, b)
  assert a.shape == (8, 32, 32, 1) and a.dtype == np.float32
  assert 0 <= a.min() and a.max() <= 1 and a.std() > 0.05
  assert not np.array_equal(a, data.make_source(cfg, 8, seed=1).batch(6))
  assert not np.array_equal(a, data.make_source(cfg, 8, seed=2).batch(5))
  halves = [data.make_source(cfg, 8, 1, "train", i, 2).batch(5) for i in range(2)]
  np.testing.assert_array_equal(np.concatenate(halves), a)
  ev = data.make_source(cfg, 8, seed=1, split="eval").batch(5)
  assert not np.array_equal(ev, a)


def test_embedded_colour_is_an_error():
  with pytest.raises(ValueError, match="grey"):
    data.make_source(data.DataConfig(channels=3), 4)


def _write_images(folder, n=6, size=(40, 30)):
  os.makedirs(folder, exist_ok=True)
  rng = np.random.RandomState(0)
  for i in range(n):
    img = (rng.rand(size[0], size[1], 3) * 255).astype(np.uint8)
    Image.fromarray(img).save(os.path.join(folder, f"im{i}.png"))


def test_folder_epochs_splits_and_preprocessing(tmp_path):
  _write_images(str(tmp_path))
  cfg = data.DataConfig(source=f"folder:{tmp_path}", image_size=16, crop="center",
                        eval_fraction=0.34, flips=False)
  train = data.make_source(cfg, 2, seed=0)
  assert train.num_examples == 4
  seen = np.concatenate([train.indices(s) for s in range(2)])
  assert sorted(seen.tolist()) == [0, 1, 2, 3]  # one epoch = a permutation
  batch = train.batch(0)
  assert batch.shape == (2, 16, 16, 1)
  ev = data.make_source(cfg, 2, seed=0, split="eval")
  assert ev.num_examples == 2
  # grey = mean of RGB, before the crop and resize.
  img = np.asarray(Image.open(os.path.join(str(tmp_path), "im0.png")))
  x = data.preprocess(img, 30, 1, "center")
  np.testing.assert_allclose(x[..., 0], img[5:35].astype(np.float32).mean(-1) / 255, atol=1e-6)
  col = data.preprocess(img, 30, 3, "center")
  assert col.shape == (30, 30, 3)


def test_celeba_crop():
  img = np.zeros((218, 178, 3), np.uint8)
  img[29:-29, 9:-9] = 255
  x = data.preprocess(img, 160, 1, "celeba")
  assert x.shape == (160, 160, 1) and x.min() == 1.0
  half = np.zeros((109, 89, 3), np.uint8)
  assert data.preprocess(half, 80, 1, "celeba").shape == (80, 80, 1)
  with pytest.raises(ValueError, match="218x178"):
    data.preprocess(np.zeros((100, 100), np.uint8), 64, 1, "celeba")


def test_real_celeba_folder():
  folder = shared_path("data", "celeba-aligned")
  cfg = data.DataConfig(source=f"folder:{folder}", image_size=160, crop="celeba", max_images=4,
                        eval_fraction=0.0)
  batch = data.make_source(cfg, 4, split="all").batch(0)
  assert batch.shape == (4, 160, 160, 1) and 0.1 < batch.mean() < 0.9


def test_tfds_source_with_mock_data():
  tfds = pytest.importorskip("tensorflow_datasets")
  with tfds.testing.mock_data(num_examples=6, policy=tfds.testing.MockPolicy.USE_CODE):
    cfg = data.DataConfig(source="tfds:celeb_a", image_size=32, crop="celeba")
    src = data.make_source(cfg, 4, seed=0)
    assert src.num_examples == 6
    a, b = src.batch(1), data.make_source(cfg, 4, seed=0).batch(1)
    assert a.shape == (4, 32, 32, 1)
    np.testing.assert_array_equal(a, b)
    with pipeline.Batches(src, 0, 3, 2) as it:  # the input pipeline's threads: the same batches
      np.testing.assert_array_equal(list(it)[1], a)


def test_unknown_source():
  with pytest.raises(ValueError, match="unknown data source"):
    data.make_source(data.DataConfig(source="s3://x"), 4)


def _host_shares_equal_global(make, steps=range(4), hosts=2):
  """Each host's share of step s, concatenated over hosts, is the single-host batch."""
  for step in steps:
    whole = make(0, 1).batch(step)
    shares = [make(i, hosts).batch(step) for i in range(hosts)]
    np.testing.assert_array_equal(np.concatenate(shares), whole)


def test_every_source_shards_hosts_exactly(tmp_path):
  _write_images(str(tmp_path), n=12, size=(20, 20))
  for cfg in (data.DataConfig(image_size=16, flips=True),
              data.DataConfig(source=f"folder:{tmp_path}", image_size=16, flips=True,
                              eval_fraction=0.0)):
    _host_shares_equal_global(lambda i, n, cfg=cfg: data.make_source(cfg, 8, 3, "train", i, n))
  # The flips really happen (else the check above would be vacuous for them).
  cfg = data.DataConfig(source=f"folder:{tmp_path}", image_size=16, eval_fraction=0.0)
  flipped = data.make_source(cfg, 8, 3).batch(0)
  plain = data.make_source(dataclasses.replace(cfg, flips=False), 8, 3).batch(0)
  assert not np.array_equal(flipped, plain)
  tfds = pytest.importorskip("tensorflow_datasets")
  with tfds.testing.mock_data(num_examples=12, policy=tfds.testing.MockPolicy.USE_CODE):
    cfg = data.DataConfig(source="tfds:celeb_a", image_size=16, crop="celeba", flips=True)
    _host_shares_equal_global(lambda i, n: data.make_source(cfg, 4, 3, "train", i, n))


def test_colour_decoding_keeps_channel_values(tmp_path):
  img = np.zeros((20, 20, 3), np.uint8)
  img[..., 0], img[..., 1], img[..., 2] = 200, 100, 50
  Image.fromarray(img).save(tmp_path / "c.png")
  cfg = data.DataConfig(source=f"folder:{tmp_path}", image_size=20, channels=3,
                        eval_fraction=0.0, flips=False)
  batch = data.make_source(cfg, 1, split="all").batch(0)
  np.testing.assert_allclose(batch[0, 5, 5], [200 / 255, 100 / 255, 50 / 255], atol=1e-6)
  grey = data.make_source(dataclasses.replace(cfg, channels=1), 1, split="all").batch(0)
  np.testing.assert_allclose(grey[0, 5, 5, 0], 350 / 3 / 255, atol=1e-6)


def test_random_crops_reach_every_offset_and_the_half_scale_is_block_means():
  """CropSource draws each crop offset in [0, H - S] (the last row and column included), and
  the embedded data's half-scale images are the 2 x 2 block means of the full ones."""
  tiny = data.CropSource(data.DataConfig(image_size=2, flips=False), 16, 0, "train")
  tiny.images = [np.arange(9, dtype=np.float32).reshape(3, 3, 1)]  # crops 2 x 2 of 3 x 3
  corners = {float(c[0, 0, 0]) for step in range(20) for c in tiny.batch(step)}
  assert corners == {0.0, 1.0, 3.0, 4.0}  # offsets 0 and 1 in both directions
  src = data.make_source(data.DataConfig(image_size=16), 4, 0, "train")
  full = [im for im in src.images if im.shape[0] == 384]
  half = [im for im in src.images if im.shape[0] == 192]
  assert len(full) == len(half) == 3
  for f, h in zip(full, half):
    np.testing.assert_allclose(h, f.reshape(192, 2, 256, 2, 1).mean((1, 3)), rtol=1e-6)
