"""Building, caching and dispatching the native kernels: the ISA comes from the CPU, a cached
library is never opened on a CPU without its ISA, damaged cache entries are rebuilt, and every
way of not having the kernels ends on XLA's convolutions (or, when an ISA is forced, in one
line naming the CPU's ISAs)."""
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap

import pytest

from conftest import REPO, cli_env
from wcdm_jax import conv, native_build

HAVE_CXX = shutil.which(os.environ.get("CXX", "g++")) is not None
needs_cxx = pytest.mark.skipif(not HAVE_CXX, reason="no C++ compiler")


def _run(code: str, **env) -> subprocess.CompletedProcess:
  """Python code in a fresh process (fresh caches), with env added; the repo on sys.path."""
  full = cli_env(PYTHONPATH=REPO, **env)
  return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=full, cwd=REPO,
                        capture_output=True, text=True, timeout=600, check=False)


def _cpuinfo_flags() -> set[str]:
  try:
    with open("/proc/cpuinfo", encoding="utf-8") as f:
      for line in f:
        if line.startswith("flags"):
          return set(line.split(":", 1)[1].split())
  except OSError:
    pass
  return set()


@needs_cxx
def test_cpu_isas_agree_with_the_kernel_view_of_the_cpu():
  """cpuid + xgetbv (the probe) and the OS's flag list name the same ISAs."""
  isas = native_build.cpu_isas()
  assert isas[-1] == "generic" and list(isas) == [i for i in native_build.ISAS if i in isas]
  flags = _cpuinfo_flags()
  if not flags or os.uname().machine != "x86_64":
    pytest.skip("no x86-64 /proc/cpuinfo flags to compare with")
  assert ("avx2" in isas) == ({"avx2", "fma"} <= flags)
  assert ("avx512" in isas) == ({"avx512f", "avx2", "fma"} <= flags)


def test_every_variant_is_built_for_an_explicit_target():
  """No -march=native: a library's instructions depend on its variant, never on the builder."""
  seen = set()
  for name, v in native_build.VARIANTS.items():
    assert v.name == name and v.isa in native_build.ISAS
    assert not any("native" in f for f in v.flags + native_build._BASE_FLAGS)
    seen.add((v.flags, v.defines))
  assert len(seen) == len(native_build.VARIANTS)  # distinct builds
  assert "-mavx512f" in native_build.VARIANTS["avx512"].flags
  assert "-mavx512f" not in native_build.VARIANTS["avx2"].flags
  assert native_build.VARIANTS["generic"].flags == ()


@needs_cxx
def test_cache_key_holds_variant_compiler_and_source():
  tags = {native_build.build_tag(v) for v in native_build.VARIANTS.values()}
  assert len(tags) == len(native_build.VARIANTS)
  ident = native_build._compiler_identity(os.environ.get("CXX", "g++"))
  assert ident.strip()  # --version and the target triple are in the key


@needs_cxx
@pytest.mark.slow
def test_every_variant_compiles_on_any_x86_64_host(tmp_path):
  """AVX-512 included: compiling needs no CPU support (loading does), so a change that breaks
  the AVX-512 build is caught on an AVX2 machine too. Into the user's cache: a library there
  was compiled from this source with these flags (its name holds their hash), and the other
  tests load the variants this CPU runs from it."""
  if os.uname().machine != "x86_64":
    pytest.skip("x86-64 variants")
  for name in ("avx512", "avx2", "generic"):
    path = native_build.build(name)
    assert os.path.getsize(path) > 10_000 and native_build._intact(path)
    assert f"_{name}_" in os.path.basename(path)


@pytest.mark.slow
def test_portable_kernels_cross_compile_for_aarch64(tmp_path):
  """The portable path has no x86 in it: it compiles for aarch64 (compile only)."""
  cxx = shutil.which("aarch64-linux-gnu-g++")
  if cxx is None:
    pytest.skip("no aarch64 cross compiler (apt-get install g++-aarch64-linux-gnu)")
  path = native_build.build("generic", str(tmp_path), cxx=cxx)
  with open(path, "rb") as f:
    header = f.read(20)
  assert header[:4] == b"\x7fELF" and int.from_bytes(header[18:20], "little") == 183  # EM_AARCH64


def test_build_without_a_compiler_is_reported(monkeypatch, tmp_path):
  monkeypatch.setenv("CXX", "no-such-compiler-wcdm")
  with pytest.raises(native_build.NativeUnavailable, match="no C..? compiler"):
    native_build.build("generic", str(tmp_path))


@needs_cxx
def test_build_falls_back_to_a_temporary_cache(tmp_path):
  """An unwritable cache directory (here: below a file) does not stop the build."""
  blocker = tmp_path / "not_a_dir"
  blocker.write_text("")
  path = native_build.build("generic", str(blocker / "cache"))
  assert os.path.isfile(path) and path.startswith(tempfile.gettempdir())
  assert not path.startswith(str(tmp_path))


@needs_cxx
def test_damaged_or_foreign_cache_entries_are_rebuilt(tmp_path, monkeypatch):
  """A truncated library, or another variant's library under this one's name, fails its
  checksum and is rebuilt before anything opens it. The intact libraries come from the user's
  cache; the rebuild runs build()'s own steps (compile into a temporary file, move it and its
  checksum into place) with the compiler's output stood in by the cached library's bytes:
  that real builds succeed is test_every_variant_compiles_on_any_x86_64_host's."""
  cached = native_build.build("generic")
  foreign = native_build.build("avx512" if os.uname().machine == "x86_64" else "generic16")
  good = str(tmp_path / os.path.basename(cached))
  for suffix in ("", ".sha256"):
    shutil.copyfile(cached + suffix, good + suffix)
  compiles = []

  def compiler(cmd, **kwargs):  # the build's `cxx ... -o tmp`
    compiles.append(cmd)
    shutil.copyfile(cached, cmd[cmd.index("-o") + 1])
    return subprocess.CompletedProcess(cmd, 0, "", "")

  monkeypatch.setattr(native_build.subprocess, "run", compiler)
  assert native_build.build("generic", str(tmp_path)) == good and not compiles  # intact
  with open(good, "rb") as f:
    original = f.read()
  for n, damage in enumerate(("truncate", "foreign"), 1):
    if damage == "truncate":
      with open(good, "r+b") as f:
        f.truncate(len(original) // 2)
    else:
      shutil.copyfile(foreign, good)
    assert not native_build._intact(good)
    assert native_build.build("generic", str(tmp_path)) == good
    assert len(compiles) == n and "-o" in compiles[-1], damage  # rebuilt, once
    assert native_build._intact(good)
    with open(good, "rb") as f:
      assert f.read() == original


@pytest.mark.slow
@needs_cxx
def test_a_library_is_never_opened_on_a_cpu_without_its_isa(tmp_path):
  """With the CPU reporting only 'generic', loading the AVX2 build is refused before dlopen:
  the library is not mapped into the process."""
  res = _run("""
      from wcdm_jax import native_build
      native_build.cpu_isas = lambda: ("generic",)
      try:
        native_build.load("avx2")
      except native_build.NativeUnavailable as e:
        print("refused:", e)
      maps = open("/proc/self/maps").read()
      print("mapped" if "wcdm_conv_avx2" in maps else "not mapped")
      """, WCDM_JAX_CACHE=str(tmp_path))
  assert res.returncode == 0, res.stderr[-2000:]
  assert "refused: this CPU" in res.stdout and "cannot run the avx2 kernels" in res.stdout
  assert "it runs: generic" in res.stdout and "not mapped" in res.stdout


@needs_cxx
def test_forcing_an_isa_the_cpu_lacks_is_one_line(monkeypatch):
  """WCDM_JAX_NATIVE_ISA names an ISA the CPU lacks: NativeIsaError naming what it has."""
  monkeypatch.setattr(native_build, "cpu_isas", lambda: ("generic",))
  monkeypatch.setenv("WCDM_JAX_NATIVE_ISA", "avx512")
  conv.native_isa.cache_clear()
  try:
    with pytest.raises(conv.NativeIsaError, match=r"avx512, but this CPU .* runs: generic; set"):
      conv.native_isa()
    monkeypatch.setenv("WCDM_JAX_NATIVE_ISA", "sse9")
    with pytest.raises(conv.NativeIsaError, match="use one of auto, avx512, avx2, generic, off"):
      conv.native_isa()
  finally:
    conv.native_isa.cache_clear()


@pytest.mark.slow
def test_forced_isa_errors_end_a_cli_in_one_line(tmp_path):
  res = subprocess.run([sys.executable, os.path.join(REPO, "launch", "train.py"),
                        f"--workdir={tmp_path / 'w'}", "--num_steps=1"],
                       env=dict(os.environ, WCDM_JAX_NATIVE_ISA="sse9", JAX_PLATFORMS="cpu"),
                       capture_output=True, text=True, timeout=300, check=False)
  assert res.returncode == 1 and "Traceback" not in res.stderr
  assert res.stderr.strip().splitlines()[-1].startswith("error: WCDM_JAX_NATIVE_ISA='sse9'")
  assert not (tmp_path / "w").exists()


@pytest.mark.slow
@pytest.mark.parametrize("setting", ["off", "no_compiler", "generic_only_cpu"])
def test_without_native_kernels_auto_is_xla_and_correct(setting, tmp_path):
  """No kernels (switched off, no compiler, a CPU without AVX2): 'auto' is XLA's convolution,
  with a log line saying why, and the same values as lax.conv."""
  env = {"WCDM_JAX_CACHE": str(tmp_path), "WCDM_JAX_NATIVE_ISA": "auto"}  # not the caller's
  patch = ""
  if setting == "off":
    env["WCDM_JAX_NATIVE_ISA"] = "off"
  elif setting == "no_compiler":
    env["CXX"] = "no-such-compiler-wcdm"
  else:
    patch = "native_build.cpu_isas = lambda: ('generic',)"
  res = _run(f"""
      import logging; logging.basicConfig(level=logging.INFO)
      import jax, jax.numpy as jnp, numpy as np
      from wcdm_jax import conv, native_build
      {patch}
      x = jax.random.normal(jax.random.key(0), (2, 9, 9, 16))
      k = jax.random.normal(jax.random.key(1), (3, 3, 16, 32))
      hlo = jax.jit(lambda x, k: conv.conv2d(x, k)).lower(x, k).as_text()
      assert "wcdm_conv" not in hlo, "a native kernel ran"
      np.testing.assert_allclose(conv.conv2d(x, k), conv.lax_conv(x, k), rtol=1e-5, atol=1e-4)
      print("isa:", conv.native_isa())
      """, **env)
  assert res.returncode == 0, res.stderr[-3000:]
  assert "isa: None" in res.stdout
  if setting == "no_compiler":
    assert "no C++ compiler 'no-such-compiler-wcdm'" in res.stderr
  if setting == "generic_only_cpu":
    assert "no AVX2 or AVX-512 on this CPU" in res.stderr


@pytest.mark.slow
@needs_cxx
def test_forced_generic_kernels_run_and_match_xla(tmp_path):
  """WCDM_JAX_NATIVE_ISA=generic makes 'auto' run the portable kernels."""
  res = _run("""
      import jax, numpy as np
      from wcdm_jax import conv, native_build
      x = jax.random.normal(jax.random.key(0), (2, 9, 9, 16))
      k = jax.random.normal(jax.random.key(1), (3, 3, 16, 32))
      hlo = jax.jit(lambda x, k: conv.conv2d(x, k)).lower(x, k).as_text()
      assert native_build.target_name("winograd", "generic") in hlo
      np.testing.assert_allclose(conv.conv2d(x, k), conv.lax_conv(x, k), rtol=1e-4, atol=1e-4)
      print("isa:", conv.native_isa())
      """, WCDM_JAX_NATIVE_ISA="generic")
  assert res.returncode == 0, res.stderr[-3000:]
  assert "isa: generic" in res.stdout
