"""absl flags derived from the library's config dataclasses (``wcdm_jax.settings``).

``define(cls)`` defines one flag per declared field: its name (with a prefix), type, default,
help and allowed values come from the field, so a new option is one field with its help.
``overrides(cls)`` reads back the fields the flags set, and ``build`` makes the config,
turning the dataclass's own error into one that names the flag.
"""
from __future__ import annotations

import sys
from typing import Any, Callable, Sequence

from absl import flags

from launch import common
from wcdm_jax import settings

FLAGS = flags.FLAGS


def _parse_optional(text: str | None, word: str, flag: str) -> Any:
  if text is None or text.strip().lower() == word:
    return None
  try:
    return float(text)
  except ValueError:
    raise ValueError(f"--{flag}={text!r}: give a number or '{word}'") from None


def define(cls: type, *, prefix: str = "", skip: Sequence[str] = (),
           unset: Sequence[str] = (), unset_help: str = "", defaults: Any = None,
           help_prefix: str = "", flag_values: flags.FlagValues = FLAGS,
           module_name: str | None = None) -> None:
  """One flag per declared field of ``cls`` (but ``skip``), named prefix + field.

  ``unset``: fields whose flag defaults to None (not given: the config's own value, e.g. the
  recipe's); ``unset_help`` is appended to their help. ``defaults``: an instance of ``cls``
  whose values are the flags' defaults (default: the fields'); ``help_prefix`` starts every
  help text (e.g. 'Low-pass ascent: '). The flags belong to the calling module
  (absl's ``get_flags_for_module`` lists them with the entry point's own), unless
  ``module_name`` names another.
  """
  if module_name is None:
    module_name = common.entry_point(
        sys._getframe(1).f_globals.get("__name__", ""))  # pylint: disable=protected-access
  for s in settings.fields(cls):
    if s.name in skip:
      continue
    name, helptext = prefix + (s.flag or s.name), help_prefix + s.help
    default = (None if s.name in unset else
               getattr(defaults, s.name) if defaults is not None else s.default)
    if s.name in unset and unset_help:
      helptext = f"{helptext} {unset_help}"
    if s.scale != 1:
      helptext = f"{helptext} (/{s.scale:g})"
      default = None if default is None else float(f"{default * s.scale:.12g}")
    kw = dict(flag_values=flag_values, module_name=module_name)
    t = settings.base_type(s.type)
    if s.choices is not None:
      flags.DEFINE_enum(name, default, [str(c) for c in s.choices], helptext, **kw)
    elif settings.is_optional(s.type) and t in (float, int):
      word = s.none_word or "none"
      shown = None if default is None and s.name in unset else (
          word if default is None else str(default))
      flags.DEFINE_string(name, shown, f"{helptext} ('{word}' for None)", **kw)
    elif t is bool:
      flags.DEFINE_bool(name, default, helptext, **kw)
    elif t is int:
      flags.DEFINE_integer(name, default, helptext, **kw)
    elif t is float:
      flags.DEFINE_float(name, default, helptext, **kw)
    elif t is str:
      flags.DEFINE_string(name, default, helptext, **kw)
    elif getattr(t, "__origin__", None) is tuple or t is tuple:
      item = (getattr(t, "__args__", None) or (str,))[0]
      flags.DEFINE_list(name, [str(v) for v in (default or ())], helptext, **kw)
      _LIST_ITEM[(id(flag_values), name)] = item
    else:
      raise TypeError(f"{cls.__name__}.{s.name}: no flag type for {s.type!r}")


_LIST_ITEM: dict = {}


def overrides(cls: type, *, prefix: str = "", skip: Sequence[str] = (),
              flag_values: flags.FlagValues = FLAGS) -> dict[str, Any]:
  """{field: value} of the flags ``define(cls, prefix=...)`` made, except those left None."""
  out = {}
  for s in settings.fields(cls):
    name = prefix + (s.flag or s.name)
    if s.name in skip or name not in flag_values:
      continue
    value = flag_values[name].value
    if value is None:
      continue
    t = settings.base_type(s.type)
    if settings.is_optional(s.type) and t in (float, int):
      value = _parse_optional(value, s.none_word or "none", name)
    elif s.scale != 1:
      value = value / s.scale
    elif isinstance(value, list):
      item = _LIST_ITEM.get((id(flag_values), name), str)
      try:
        value = tuple(item(v) for v in value)
      except ValueError:
        raise ValueError(f"--{name}={','.join(value)}: items must be "
                         f"{item.__name__}s") from None
    out[s.name] = value
  return out


def flag_names(cls: type, prefix: str = "") -> dict[str, str]:
  """{field: its flag's name} of ``cls``'s declared settings."""
  return {s.name: prefix + (s.flag or s.name) for s in settings.fields(cls)}


def build(make: Callable[..., Any], values: dict[str, Any], names: dict[str, str] | None = None
          ) -> Any:
  """``make(**values)``; a ValueError it raises comes back naming the flag(s) it is about
  (``names``: field -> flag name, default the field's)."""
  try:
    return make(**values)
  except ValueError as e:
    text = str(e)
    named = [k for k in values if text.startswith(k + " ") or f" {k} " in f" {text} "
             or f"({k})" in text or text.startswith(k + ":")]
    named.sort(key=lambda k: text.find(k))  # in the order the message names them
    if named and not text.startswith("--"):
      shown = " ".join(f"--{(names or {}).get(k, k)}={_show(values[k])}" for k in named[:2])
      raise ValueError(f"{shown}: {text}") from e
    raise


def _show(v: Any) -> str:
  if isinstance(v, (tuple, list)):
    return ",".join(map(str, v))
  return str(v)
