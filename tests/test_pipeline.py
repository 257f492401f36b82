"""The grain input pipeline: the batches are the source's, whatever the workers; resume; no
dataset copy in memory; unreadable files mid-run; dead workers end the run instead of hanging."""
import os
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import REPO, write_random_images
from wcdm_jax import data, pipeline


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
  d = tmp_path_factory.mktemp("imgs")
  write_random_images(d, 40, (24, 20, 3))
  return d


def _source(folder, batch=8, **kw):
  cfg = data.DataConfig(source=f"folder:{folder}", image_size=16, crop="center", **kw)
  return data.make_source(cfg, batch, seed=3)


@pytest.mark.parametrize("workers,processes", [
    (1, False), (3, False), pytest.param(2, True, marks=pytest.mark.slow)])  # slow: processes
def test_batches_are_the_sources_and_resume_exactly(folder, workers, processes):
  src = _source(folder)
  with pipeline.Batches(src, 0, 12, workers, processes) as it:
    got = list(it)
  assert len(got) == 12
  for s, b in enumerate(got):
    np.testing.assert_array_equal(b, src.batch(s))
  with pipeline.Batches(src, 7, 12, workers, processes) as it:  # resumed at step 7
    for s, b in zip(range(7, 12), it):
      np.testing.assert_array_equal(b, got[s])
  assert it.wait_s >= 0


def test_epochs_are_permutations_and_hosts_split_the_global_batch(folder):
  src = _source(folder, eval_fraction=0.0)
  n = src.num_examples
  assert n == 40
  per_epoch = n // src.batch_size
  for epoch in range(2):
    idx = np.concatenate([src.indices(epoch * per_epoch + s) for s in range(per_epoch)])
    assert sorted(idx.tolist()) == list(range(n))  # every image once per epoch
  assert not np.array_equal(src.indices(0), src.indices(per_epoch))  # reshuffled
  halves = [data.make_source(src.cfg, 8, 3, "train", h, 2).batch(4) for h in range(2)]
  np.testing.assert_array_equal(np.concatenate(halves), src.batch(4))


def test_folder_source_holds_no_decoded_images(folder):
  src = _source(folder)
  arrays = [v for v in vars(src).values() if isinstance(v, np.ndarray)]
  arrays += [v for v in vars(src.fetch).values() if isinstance(v, np.ndarray)]
  assert sum(a.nbytes for a in arrays) < 1000  # file names only; images decoded per batch
  assert isinstance(src.fetch, data.FolderReader) and len(src.fetch.files) == 36


def test_fast_decode_matches_the_reference_decode(folder):
  for f in sorted(os.listdir(folder))[:5]:
    path = os.path.join(folder, f)
    for channels in (1, 3):
      np.testing.assert_array_equal(
          data.load_preprocessed(path, 16, channels, "center"),
          data.preprocess(data.read_image(path), 16, channels, "center"))


def _truncate(path):
  with open(path, "rb") as f:
    head = f.read(100)
  with open(path, "wb") as f:
    f.write(head)


def _copy(folder, dst):
  """The images of ``folder`` copied into ``dst`` (a test may damage them there)."""
  for f in os.listdir(folder):
    (dst / f).write_bytes((folder / f).read_bytes())


def test_unreadable_file_mid_run_is_replaced_and_named(tmp_path, folder, caplog):
  _copy(folder, tmp_path)
  src = _source(tmp_path, max_bad_fraction=0.05, flips=False)
  before = [src.batch(s) for s in range(5)]
  i = int(src.indices(2)[0])
  bad = src.fetch.files[i]
  _truncate(bad)  # after the source was made (its header scan passed): fails mid-run
  with caplog.at_level("WARNING"):
    with pipeline.Batches(src, 0, 5, 2) as it:
      after = list(it)
  assert any(os.path.basename(bad) in r.getMessage() and "replaced by the next" in r.getMessage()
             for r in caplog.records)
  for s in (0, 1, 3, 4):  # other steps unchanged, unless they held the bad file too
    if i not in src.indices(s):
      np.testing.assert_array_equal(after[s], before[s])
  np.testing.assert_array_equal(after[2][0], src.fetch.read(i + 1))  # the next file
  np.testing.assert_array_equal(after[2][1:], before[2][1:])


@pytest.mark.slow  # worker processes
def test_too_many_unreadable_files_end_the_run_naming_one(tmp_path, folder):
  """More unreadable files than max_bad_fraction (2 of 40): the run fails, naming a file."""
  _copy(folder, tmp_path)
  src = _source(tmp_path, max_bad_fraction=0.05)
  for f in src.fetch.files[:4]:
    _truncate(f)
  with pytest.raises(pipeline.InputError, match=r"cannot be used .*im0\d.png"):
    with pipeline.Batches(src, 0, 10, 2, processes=True) as it:
      list(it)


_KILL_SCRIPT = r"""
import os, signal, sys, time
from wcdm_jax import data, pipeline

def children():
  me, out = str(os.getpid()), []
  for pid in os.listdir('/proc'):
    try:
      if pid.isdigit() and open(f'/proc/{pid}/stat').read().rsplit(')', 1)[1].split()[1] == me:
        if 'spawn_main' in open(f'/proc/{pid}/cmdline').read():
          out.append(int(pid))
    except OSError:
      pass
  return out

if __name__ == '__main__':
  src = data.make_source(data.DataConfig(source='folder:' + sys.argv[1], image_size=16,
                                         crop='center'), 8, 0)
  it = pipeline.Batches(src, 0, 100000, workers=2, processes=True)
  next(it)
  os.kill(children()[0], signal.SIGKILL)
  try:
    for _ in range(100000):
      next(it)
  except pipeline.InputError as e:
    print('FAILED LOUDLY:', e)
  it.close()
"""


@pytest.mark.slow
def test_a_killed_worker_ends_the_run_instead_of_hanging(folder, tmp_path):
  script = tmp_path / "kill.py"
  script.write_text(_KILL_SCRIPT)
  t0 = time.time()
  res = subprocess.run([sys.executable, str(script), str(folder)], capture_output=True, text=True,
                       timeout=120, cwd=REPO, env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert "FAILED LOUDLY" in res.stdout and "terminated" in res.stdout, res.stderr[-2000:]
  assert time.time() - t0 < 120


def test_bad_arguments(folder):
  src = _source(folder)
  with pytest.raises(ValueError, match="workers"):
    pipeline.Batches(src, 0, 4, 0)
  with pytest.raises(ValueError, match="start"):
    pipeline.Batches(src, 5, 4)
  with pipeline.Batches(src, 0, 1, 1) as it:
    next(it)
    with pytest.raises(StopIteration):
      next(it)


def test_default_workers(folder):
  assert pipeline.default_workers(data.make_source(data.DataConfig(image_size=16), 4)) == 1
  assert 1 <= pipeline.default_workers(_source(folder)) <= 16
