"""Test setup: 4 simulated CPU devices, and paths to ../shared (tests using it skip cleanly)."""
import os

if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             " --xla_force_host_platform_device_count=4").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest  # pylint: disable=g-import-not-at-top

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.environ.get("WCDM_SHARED", os.path.join(os.path.dirname(REPO), "shared"))
FIXTURES = os.path.join(SHARED, "reference", "fixtures")
RELEASE = os.path.join(SHARED, "reference", "lcv-denoisers")
DATA = os.path.join(SHARED, "data")


def shared_path(*parts: str) -> str:
  """Path inside ../shared, or skip the test when it is absent."""
  path = os.path.join(SHARED, *parts)
  if not os.path.exists(path):
    pytest.skip(f"{path} not available (../shared is absent)")
  return path


def write_random_images(folder, count: int, shape=(20, 20, 3), seed: int = 0) -> str:
  """``count`` random RGB PNGs im00.png, im01.png, ... of ``shape`` in ``folder``."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  from PIL import Image  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(seed)
  for i in range(count):
    Image.fromarray((rng.random(shape) * 255).astype(np.uint8)).save(
        os.path.join(str(folder), f"im{i:02d}.png"))
  return str(folder)
