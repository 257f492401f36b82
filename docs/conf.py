"""Sphinx configuration of the wcdm_jax docs: `make docs` builds docs/_build/html."""
import os
import sys

sys.path.insert(0, os.path.abspath(".."))

project = "wcdm_jax"
author = "the wcdm_jax authors"
copyright = "2026, the wcdm_jax authors"  # pylint: disable=redefined-builtin
release = "0.1.0"

# myst_nb: MyST Markdown pages and the Colab notebook, shown with its stored outputs (the build
# never executes it: it needs the released weights).
extensions = ["myst_nb", "sphinx.ext.autodoc", "sphinx.ext.napoleon", "sphinx.ext.viewcode"]
nb_execution_mode = "off"
myst_enable_extensions = ["dollarmath"]
myst_heading_anchors = 3
exclude_patterns = ["_build", "figures/*.md", "jupyter_execute", "_generated/*.md"]
html_theme = "furo"
html_title = "wcdm_jax"
autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_default_options = {"members": False}
napoleon_google_docstring = True
napoleon_numpy_docstring = False
nitpicky = False


def _check_public_names(app):
  """A warning (an error under -W) for every public name that the API page leaves out or
  that has no docstring; public functions need Args and Returns sections."""
  import inspect  # pylint: disable=g-import-not-at-top
  import types  # pylint: disable=g-import-not-at-top
  from sphinx.util import logging  # pylint: disable=g-import-not-at-top
  import wcdm_jax  # pylint: disable=g-import-not-at-top
  from wcdm_jax import inverse  # pylint: disable=g-import-not-at-top
  log = logging.getLogger(__name__)
  with open(os.path.join(app.srcdir, "api.md"), encoding="utf-8") as f:
    api = f.read()
  for module in (wcdm_jax, inverse):
    for name in module.__all__:
      obj = getattr(module, name)
      if isinstance(obj, types.ModuleType):
        continue
      full = f"{module.__name__}.{name}"
      doc = inspect.getdoc(obj) or ""
      if f"{full}\n" not in api and f"{full} " not in api:
        log.warning(f"public name {full} is not in docs/api.md: add an autodoc entry for it")
      if not doc and not name.isupper():
        log.warning(f"public name {full} has no docstring")
      elif inspect.isfunction(obj):
        returns = inspect.signature(obj).return_annotation not in (None, "None")
        if "Args:" not in doc or (returns and "Returns:" not in doc):
          log.warning(f"public function {full}: its docstring needs Args: and Returns: "
                      "sections")


def _copy_notebook(app):
  """The Colab (colabs/, outside the docs' source) as docs/_generated/pretrained_demo.ipynb."""
  import shutil  # pylint: disable=g-import-not-at-top
  os.makedirs(os.path.join(app.srcdir, "_generated"), exist_ok=True)
  shutil.copyfile(os.path.join(app.srcdir, "..", "colabs", "pretrained_demo.ipynb"),
                  os.path.join(app.srcdir, "_generated", "pretrained_demo.ipynb"))


_FLAGS_SCRIPT = r"""
import importlib, json, sys
sys.path.insert(0, sys.argv[1])
from absl import flags
name = sys.argv[2]
module = importlib.import_module("launch." + name)
rows = []
for f in sorted(flags.FLAGS.get_flags_for_module(module.__name__), key=lambda f: f.name):
  d = f.default
  d = "" if d is None else ",".join(map(str, d)) if isinstance(d, (list, tuple)) else str(d)
  rows.append([f.name, d, f.help])
print(json.dumps(rows))
"""


def _flag_tables(app):
  """docs/_generated/flags_<script>.md: each entry point's flags, from their own help text."""
  import json  # pylint: disable=g-import-not-at-top
  import subprocess  # pylint: disable=g-import-not-at-top
  repo = os.path.abspath(os.path.join(app.srcdir, ".."))
  for script in ("train", "sample", "evaluate", "solve", "reproduce", "import_lcv"):
    res = subprocess.run([sys.executable, "-c", _FLAGS_SCRIPT, repo, script],
                         capture_output=True, text=True, check=True,
                         env=dict(os.environ, JAX_PLATFORMS="cpu"))
    rows = json.loads(res.stdout.strip().splitlines()[-1])
    cell = lambda t: t.replace("|", "\\|").replace("\n", " ")
    text = (f"## `launch/{script}.py`\n\n| flag | default | help |\n|---|---|---|\n" +
            "".join(f"| `--{cell(n)}` | " + (f"`{cell(d)}`" if d else "–") + f" | {cell(h)} |\n"
                    for n, d, h in rows))
    with open(os.path.join(app.srcdir, "_generated", f"flags_{script}.md"), "w",
              encoding="utf-8") as f:
      f.write(text)


def _settings_docs(app, what, name, obj, options, lines):  # pylint: disable=unused-argument
  """A config dataclass's fields, documented from their one definition (``settings.setting``:
  the same help the CLIs' flags show)."""
  import dataclasses  # pylint: disable=g-import-not-at-top
  from wcdm_jax import settings  # pylint: disable=g-import-not-at-top
  if what != "class" or not dataclasses.is_dataclass(obj):
    return
  fields = settings.fields(obj)
  if not fields:
    return
  lines += ["", "**Settings** (each also a flag of the CLIs that take this config):", ""]
  for f in fields:
    default = "None" if f.default is None else repr(f.default)
    choices = f" One of {', '.join(map(repr, f.choices))}." if f.choices else ""
    lines.append(f"- ``{f.name}`` (default ``{default}``): {f.help}{choices}")
  lines.append("")


def setup(app):
  app.connect("autodoc-process-docstring", _settings_docs)
  app.connect("builder-inited", _copy_notebook)
  app.connect("builder-inited", _flag_tables)
  app.connect("builder-inited", _check_public_names)
