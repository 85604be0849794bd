"""How a config dataclass declares, checks and parses its fields: one mechanism for every section.

A field's type hint says what it accepts: `Literal[...]` lists its choices, `Annotated[int, ">= 1"]`
(or `"> 0"`, `"[0, 1)"`, `"(0, 1]"`, each optionally followed by a note in parentheses) gives its
range, `X | None` lets it be unset; `Annotated[X, "(note)"]` only explains it. `Section.check()`
validates every field from those hints, then the section's own `rules()` (relations between
fields); `parse()` turns a `--set` string into the field's type. Errors name `section.field`, the
value and what is accepted. This module holds no settings; candorlm/config.py does.
"""

import dataclasses
import functools
import json
import math
import numbers
import re
import types
import typing
from dataclasses import dataclass
from typing import Annotated, ClassVar, Iterable, Literal

from candorlm.errors import CandorError

_NUM = r"[-+]?(?:\d+\.?\d*|\.\d+)(?:e[-+]?\d+)?"
_LOWER = re.compile(rf"^(>=|>)\s*({_NUM})(?:\s+\((.+)\))?$")
_RANGE = re.compile(rf"^([\[(])\s*({_NUM})\s*,\s*({_NUM})\s*([\])])(?:\s+\((.+)\))?$")
_NOTE = re.compile(r"^\((.+)\)$")


@dataclass(frozen=True)
class Field:
    """What one field accepts, read from its type hint."""

    name: str
    kind: type  # bool, int, float, str, list or dict
    choices: tuple = ()  # from Literal[...]
    optional: bool = False  # `X | None`
    bound: str = ""  # the range as written, e.g. ">= 1" or "[0, 1)"
    note: str = ""  # the parenthesized note, e.g. "0: off"

    def accepts(self) -> str:
        """What the field accepts, in words, for help texts and errors."""
        text = {bool: "true or false", int: "an integer", float: "a number", str: "text",
                list: "a list (comma-separated)", dict: "a JSON object"}[self.kind]
        if self.choices:
            text = "one of " + ", ".join(map(str, self.choices))
        elif _LOWER.match(self.bound):
            text += " " + self.bound.split(" (")[0]
        elif _RANGE.match(self.bound):
            text += " in " + self.bound.split(" (")[0]
        if self.optional:
            text += " or none"
        return text + (f" ({self.note})" if self.note else "")

    def problem(self, v) -> str | None:
        """Why `v` is not acceptable (None when it is)."""
        if v is None:
            return None if self.optional else "is not set"
        if self.choices:
            return None if v in self.choices else f"is not one of {', '.join(map(str, self.choices))}"
        if self.kind is bool:
            return None if isinstance(v, bool) else "must be true or false"
        if self.kind is int and not (isinstance(v, numbers.Integral) and not isinstance(v, bool)):
            return "must be an integer"
        if self.kind is float and not (isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)):
            return "must be a finite number"
        if self.kind in (str, list, dict) and not isinstance(v, self.kind):
            return f"must be {self.accepts()}"
        return self._out_of_range(v)

    def _out_of_range(self, v) -> str | None:
        if not (_LOWER.match(self.bound) or _RANGE.match(self.bound)):
            return None
        note = f" ({self.note})" if self.note else ""
        if m := _LOWER.match(self.bound):
            op, lo = m.group(1), float(m.group(2))
            ok = v >= lo if op == ">=" else v > lo
            return None if ok else f"must be {op} {m.group(2)}{note}"
        m = _RANGE.match(self.bound)
        left, lo, hi, right = m.group(1), float(m.group(2)), float(m.group(3)), m.group(4)
        ok = (v >= lo if left == "[" else v > lo) and (v <= hi if right == "]" else v < hi)
        return None if ok else f"must be in {left}{m.group(2)}, {m.group(3)}{right}{note}"


def _show(v) -> str:
    return repr(v) if isinstance(v, str) else json.dumps(v) if isinstance(v, (bool, type(None))) else str(v)


@functools.cache
def hints(cls) -> dict[str, Field]:
    """name -> Field for every dataclass field of cls. A malformed hint is the code's error
    (an AssertionError at first use), never the user's."""
    out, all_hints = {}, typing.get_type_hints(cls, include_extras=True)
    for f in dataclasses.fields(cls):
        h = all_hints[f.name]
        bound = note = ""
        if typing.get_origin(h) is Annotated:
            h, spec = typing.get_args(h)[0], typing.get_args(h)[1]
            m = _LOWER.match(spec) or _RANGE.match(spec) or _NOTE.match(spec)
            assert m, f"{cls.__name__}.{f.name}: bad bound {spec!r}"
            bound, note = spec, m.groups()[-1] or ""
        optional = False
        if isinstance(h, types.UnionType) or typing.get_origin(h) is typing.Union:
            args = [a for a in typing.get_args(h) if a is not type(None)]
            assert len(args) == 1, f"{cls.__name__}.{f.name}: only `X | None` unions are supported"
            h, optional = args[0], True
        options = ()
        if typing.get_origin(h) is Literal:
            options = typing.get_args(h)
            h = type(options[0])
        kind = typing.get_origin(h) or h
        assert kind in (bool, int, float, str, list, dict), f"{cls.__name__}.{f.name}: unsupported type {h}"
        out[f.name] = Field(f.name, kind, options, optional, bound, note)
    return out


def choices(cls, name: str) -> tuple:
    return hints(cls)[name].choices


class Section:
    """Base of the config dataclasses: `section` names it in messages (`model.d_model=...`)."""

    section: ClassVar[str] = ""

    def rules(self) -> Iterable[tuple[bool, str]]:
        """(holds, message) for each relation between fields; the fields themselves are
        already checked when these run."""
        return ()

    def check_fields(self):
        """Raise a CandorError naming the first field outside what its hint accepts; returns self."""
        for name, f in hints(type(self)).items():
            v = getattr(self, name)
            if (why := f.problem(v)) is not None:
                accepted = "" if why.startswith(("must be", "is not one")) else f" (accepted: {f.accepts()})"
                raise CandorError(f"{self.section}.{name}={_show(v)} {why}{accepted}")
        return self

    def check(self):
        """check_fields(), then the section's rules; returns self."""
        self.check_fields()
        for ok, msg in self.rules():
            if not ok:
                raise CandorError(msg)
        return self


def parse(cls, name: str, text: str, key: str, current=None):
    """The value `--set key=text` means for field `name` of cls. A dict field takes a JSON object
    whose keys update `current` (each must be one of its keys); a list field takes JSON or a
    comma-separated list; choices are refused here, with the list, before anything is set."""
    f = hints(cls)[name]
    bad = f"{key}={text}: expected {f.accepts()}"
    if f.optional and text.lower() in ("none", "null"):
        return None
    if f.choices:
        if text not in f.choices:
            raise CandorError(f"{key}={text}: choose one of {', '.join(map(str, f.choices))}")
        return text
    try:
        if f.kind is bool:
            low = text.lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if f.kind is int:
            v = float(text)  # accepts 1e4
            if v != int(v):
                raise ValueError
            return int(v)
        if f.kind is float:
            return float(text)
        if f.kind is list:
            if text.startswith("["):
                v = json.loads(text)
                if not isinstance(v, list):
                    raise ValueError
                return v
            return [s.strip() for s in text.split(",") if s.strip()]
        if f.kind is dict:
            v = json.loads(text)
            if not isinstance(v, dict):
                raise ValueError
            unknown = sorted(set(v) - set(current or {}))
            if current is not None and unknown:
                raise CandorError(f"{key}: unknown keys {unknown}; it has {', '.join(sorted(current))}")
            return {**(current or {}), **v}
    except (ValueError, OverflowError):
        raise CandorError(bad) from None
    return text
