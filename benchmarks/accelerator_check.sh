#!/bin/bash
# bash benchmarks/accelerator_check.sh [--tiny]
# Accelerator figures for the README in one run, capped at 8 minutes: celeba160 train-step
# images/s and MFU (float32, bfloat16), input pipeline images/s, synthesis images/min.
# Needs JAX for the accelerator (pip install -U "jax[cuda12]" or "jax[tpu]"); --tiny runs a
# CPU-sized smoke test of every part (tests/test_benchmarks.py does).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
exec timeout 480 "$PY" benchmarks/accelerator_check.py "$@"
