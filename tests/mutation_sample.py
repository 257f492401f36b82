r"""Sampled mutation testing of the core modules: does the CPU suite catch plausible bugs?

  python tests/mutation_sample.py --per_module=4 --seed=0          # about 20 minutes
  python tests/mutation_sample.py --modules=wavelets --per_module=3

For each core module, collects every one-token mutation the AST offers (arithmetic and
comparison operators swapped, numeric constants nudged, booleans and/or flipped, `not`
dropped, slices shifted), draws ``--per_module`` of them with ``--seed``, applies each to a
scratch copy of the repository and runs that module's tests there (pytest -x, a time limit).
A mutant is killed when the tests fail. Prints one line per mutant, the score per module and
overall, and the surviving mutants' diffs to judge. Not collected by pytest (no test_ prefix).
"""
from __future__ import annotations

import argparse
import ast
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Module -> the tests that should catch its bugs (a fast subset of the suite).
TESTS = {
    "sampling": ["tests/test_sampling.py", "tests/test_api.py"],
    "training": ["tests/test_training.py"],
    "trainer": ["tests/test_training.py", "tests/test_checkpoint_integrity.py"],
    "evaluation": ["tests/test_evaluation.py", "tests/test_launch_tools.py::test_evaluate_tool",
                   "tests/test_training.py",
                   "tests/test_sampling.py"],
    "data": ["tests/test_data.py",
             "tests/test_robustness.py::test_image_modes_decode_to_their_values",
             "tests/test_robustness.py::test_corrupt_images_are_skipped_and_named",
             "tests/test_robustness.py::test_api_bad_input"],
    "wavelets": ["tests/test_wavelets.py"],
    "denoising": ["tests/test_api.py", "tests/test_sampling.py"],
    "checkpoints": ["tests/test_checkpoint_integrity.py", "tests/test_training.py"],
}

_BINOPS = {ast.Add: ast.Sub, ast.Sub: ast.Add, ast.Mult: ast.Div, ast.Div: ast.Mult,
           ast.FloorDiv: ast.Div, ast.Pow: ast.Mult, ast.Mod: ast.FloorDiv}
_CMPOPS = {ast.Lt: ast.LtE, ast.LtE: ast.Lt, ast.Gt: ast.GtE, ast.GtE: ast.Gt, ast.Eq: ast.NotEq,
           ast.NotEq: ast.Eq, ast.Is: ast.IsNot, ast.IsNot: ast.Is, ast.In: ast.NotIn,
           ast.NotIn: ast.In}


def _docstring_lines(tree: ast.AST) -> set[int]:
  lines = set()
  for node in ast.walk(tree):
    body = getattr(node, "body", None)
    if isinstance(body, list) and body and isinstance(body[0], ast.Expr) and isinstance(
        body[0].value, ast.Constant) and isinstance(body[0].value.value, str):
      lines.update(range(body[0].lineno, body[0].end_lineno + 1))
  return lines


def candidates(source: str) -> list[tuple[int, int, int, str, str]]:
  """(line, col, end_col, old text, new text) of every one-token mutation (single-line nodes)."""
  tree = ast.parse(source)
  lines = source.splitlines()
  skip = _docstring_lines(tree)
  out = []

  def seg(node):
    return lines[node.lineno - 1][node.col_offset:node.end_col_offset]

  for node in ast.walk(tree):
    if getattr(node, "lineno", None) in skip or not hasattr(node, "end_lineno"):
      continue
    if node.lineno != node.end_lineno:
      continue
    if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
      new = ast.BinOp(node.left, _BINOPS[type(node.op)](), node.right)
      out.append((node.lineno, node.col_offset, node.end_col_offset, seg(node), ast.unparse(new)))
    elif isinstance(node, ast.Compare) and len(node.ops) == 1 and type(node.ops[0]) in _CMPOPS:
      new = ast.Compare(node.left, [_CMPOPS[type(node.ops[0])]()], node.comparators)
      out.append((node.lineno, node.col_offset, node.end_col_offset, seg(node), ast.unparse(new)))
    elif isinstance(node, ast.BoolOp):
      new = ast.BoolOp(ast.Or() if isinstance(node.op, ast.And) else ast.And(), node.values)
      out.append((node.lineno, node.col_offset, node.end_col_offset, seg(node), ast.unparse(new)))
    elif isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
      out.append((node.lineno, node.col_offset, node.end_col_offset, seg(node),
                  ast.unparse(node.operand)))
    elif isinstance(node, ast.Constant) and type(node.value) in (int, float):
      v = node.value
      new = {0: 1, 1: 2, 2: 1}.get(v, v + 1 if isinstance(v, int) else v * 1.5)
      out.append((node.lineno, node.col_offset, node.end_col_offset, seg(node), repr(new)))
    elif isinstance(node, ast.Constant) and isinstance(node.value, bool):
      out.append((node.lineno, node.col_offset, node.end_col_offset, seg(node),
                  repr(not node.value)))
  return [c for c in out if c[3] != c[4] and "\n" not in c[3]]


def apply(source: str, mutation) -> str:
  line, col, end, old, new = mutation
  lines = source.splitlines(keepends=True)
  text = lines[line - 1]
  assert text[col:end] == old, (text, old)
  lines[line - 1] = text[:col] + new + text[end:]
  return "".join(lines)


def run_tests(root: str, tests: list[str], timeout: float) -> str:
  env = dict(os.environ, PYTHONPATH=root, PYTHONDONTWRITEBYTECODE="1",
             WCDM_SHARED=os.environ.get("WCDM_SHARED",
                                        os.path.join(os.path.dirname(REPO), "shared")))
  try:
    res = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider",
                          *tests], cwd=root, env=env, capture_output=True, text=True,
                         timeout=timeout)
  except subprocess.TimeoutExpired:
    return "killed (timeout)"
  return "survived" if res.returncode == 0 else "killed"


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--modules", default=",".join(TESTS), help="comma-separated core modules")
  ap.add_argument("--per_module", type=int, default=6, help="mutants drawn per module")
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--timeout", type=float, default=600.0, help="seconds per mutant")
  args = ap.parse_args()
  rng = random.Random(args.seed)
  scratch = tempfile.mkdtemp(prefix="wcdm_mutants_")
  root = os.path.join(scratch, "repo")
  shutil.copytree(REPO, root, ignore=shutil.ignore_patterns(
      ".git", ".venv", "workdirs", "__pycache__", "*.egg-info", "models", "eval", "outputs"))
  results, survivors = {}, []
  try:
    for module in args.modules.split(","):
      path = os.path.join(root, "wcdm_jax", f"{module}.py")
      original = open(path).read()
      muts = candidates(original)
      chosen = rng.sample(muts, min(args.per_module, len(muts)))
      for m in sorted(chosen):
        with open(path, "w") as f:
          f.write(apply(original, m))
        t0 = time.time()
        verdict = run_tests(root, TESTS[module], args.timeout)
        with open(path, "w") as f:
          f.write(original)
        results.setdefault(module, []).append(verdict)
        print(f"{module}:{m[0]} `{m[3]}` -> `{m[4]}`: {verdict} ({time.time() - t0:.0f} s)",
              flush=True)
        if verdict == "survived":
          survivors.append((module, m))
  finally:
    shutil.rmtree(scratch, ignore_errors=True)
  total = sum(len(v) for v in results.values())
  killed = sum(v.startswith("killed") for r in results.values() for v in r)
  print("\nmodule        killed / sampled")
  for module, r in results.items():
    print(f"{module:13s} {sum(v.startswith('killed') for v in r)} / {len(r)}")
  print(f"mutation score: {killed} / {total} = {100 * killed / max(total, 1):.0f}%")
  for module, m in survivors:
    print(f"survivor {module}.py:{m[0]}: `{m[3]}` -> `{m[4]}`")


if __name__ == "__main__":
  main()
