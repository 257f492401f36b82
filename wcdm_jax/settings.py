"""Settings as data: one definition per setting, read by everything that shows or parses it.

A config dataclass (``TrainConfig``, ``AscentConfig``, ...) declares each field with
``setting(default, help, ...)``; the field's type, default, help text, allowed values and
whether a resumed training run may change it all live there. ``fields(cls)`` lists them, and
``launch/flagdefs.py`` turns them into absl flags (names, types, help, enums), so that a new
option is one field with its help, never a flag restated by hand.
"""
from __future__ import annotations

import dataclasses
import typing
from typing import Any, Sequence


@dataclasses.dataclass(frozen=True)
class Setting:
  """What one config field is: its name, type, default, help and constraints."""
  name: str
  type: Any                 # the annotation, resolved (int, float, bool, str, float | None, ...)
  default: Any
  help: str
  choices: tuple | None = None  # allowed values (an enum flag)
  none_word: str | None = None  # for an optional number: the word that means None
  resumable: bool = False   # a resumed training run may change it (how long, how computed)
  flag: str | None = None   # the command-line name, when it is not the field's
  scale: float = 1.0        # the flag's value is the field's times scale (255: a std in /255)


def setting(default: Any, help: str, *, choices: Sequence | None = None,  # pylint: disable=redefined-builtin
            none_word: str | None = None, resumable: bool = False,
            flag: str | None = None, scale: float = 1.0) -> Any:
  """A dataclass field with its help text and constraints (see ``Setting``)."""
  meta = {"help": help, "choices": tuple(choices) if choices is not None else None,
          "none_word": none_word, "resumable": resumable, "flag": flag, "scale": scale}
  return dataclasses.field(default=default, metadata=meta)


def fields(cls: type) -> list[Setting]:
  """The declared settings of a config dataclass, in field order."""
  hints = typing.get_type_hints(cls)
  out = []
  for f in dataclasses.fields(cls):
    if "help" not in f.metadata:
      continue
    out.append(Setting(f.name, hints[f.name], f.default, f.metadata["help"],
                       f.metadata.get("choices"), f.metadata.get("none_word"),
                       bool(f.metadata.get("resumable")), f.metadata.get("flag"),
                       f.metadata.get("scale", 1.0)))
  return out


def resumable(cls: type) -> tuple[str, ...]:
  """The fields of ``cls`` that a resumed training run may change."""
  return tuple(s.name for s in fields(cls) if s.resumable)


def is_optional(t: Any) -> bool:
  """Whether an annotation admits None (``X | None``)."""
  return type(None) in typing.get_args(t)


def base_type(t: Any) -> Any:
  """``X`` of ``X | None``; ``t`` otherwise."""
  args = [a for a in typing.get_args(t) if a is not type(None)]
  return args[0] if is_optional(t) and len(args) == 1 else t
