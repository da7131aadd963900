"""Config values as people write them: one YAML loader for config files and `key=value` overrides, and one type
check that every config dataclass runs on its number and true/false fields before comparing them.

PyYAML reads YAML 1.1, where `3e-4` and `1E5` are strings (it wants `3.0e-4`), `010` is octal and `1:30` is 90.
Here a plain scalar is a number exactly when Python's int() / float() reads it the same way:

- integers: `-2`, `+7`, `010` (= 10), `1_000` (underscores between digits, as in Python), and the prefixed
  `0x10`, `0o17`, `0b101` (as `int(s, 0)`);
- floats: a point and/or an exponent, `3e-4`, `1E5`, `.5`, `5.`, `+1.5e+3`, plus YAML's `.inf`, `-.inf`, `.nan`.

Anything else (`1:30`, `1__0`, `inf`, `nan`, `0x`) is a string, and so is anything quoted (`'3e-4'`).
"""
from __future__ import annotations

import dataclasses
import functools
import math
import numbers
import re
import typing
from typing import Any

import yaml

from moegrok.errors import MoegrokError

INT_TAG, FLOAT_TAG = "tag:yaml.org,2002:int", "tag:yaml.org,2002:float"
_D = r"[0-9](?:_?[0-9])*"  # digits, an underscore only between two of them (Python's rule)
_PREFIXED = r"0(?:[xX](?:_?[0-9a-fA-F])+|[oO](?:_?[0-7])+|[bB](?:_?[01])+)"
INT_RE = re.compile(rf"^[-+]?(?:{_PREFIXED}|{_D})$")
FLOAT_RE = re.compile(rf"^(?:[-+]?(?:(?:{_D}\.(?:{_D})?|\.{_D})(?:[eE][-+]?{_D})?|{_D}[eE][-+]?{_D})"
                      r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$")
_FIRST = list("-+0123456789.")


def _parse_int(text: str) -> int:
    return int(text, 0) if re.match(r"[-+]?0[xXoObB]", text) else int(text)


def _parse_float(text: str) -> float:
    if text.lower().lstrip("+-") in (".inf", ".nan"):
        return float(text.replace(".", "", 1))  # YAML's `.inf` is Python's `inf`
    return float(text)


def _construct(parse):
    def construct(loader, node):
        text = loader.construct_scalar(node)
        try:
            return parse(text)
        except ValueError:
            raise yaml.constructor.ConstructorError(None, None, f"{text!r} is not a number", node.start_mark) from None
    return construct


def _resolvers() -> dict:
    """SafeLoader's implicit resolvers with its YAML 1.1 int and float rules swapped for ours."""
    out = {ch: [(tag, rx) for tag, rx in rules if tag not in (INT_TAG, FLOAT_TAG)]
           for ch, rules in yaml.SafeLoader.yaml_implicit_resolvers.items()}
    for ch in _FIRST:
        out.setdefault(ch, []).extend([(INT_TAG, INT_RE), (FLOAT_TAG, FLOAT_RE)])
    return out


class ConfigLoader(yaml.SafeLoader):
    """yaml.SafeLoader that reads numbers as described in this module's docstring."""

    yaml_implicit_resolvers = _resolvers()


ConfigLoader.add_constructor(INT_TAG, _construct(_parse_int))
ConfigLoader.add_constructor(FLOAT_TAG, _construct(_parse_float))


class ConfigDumper(yaml.SafeDumper):
    """yaml.SafeDumper that quotes the strings ConfigLoader would read as numbers, so a dump reads back equal."""

    yaml_implicit_resolvers = ConfigLoader.yaml_implicit_resolvers


def load_yaml(text: str) -> Any:
    return yaml.load(text, Loader=ConfigLoader)  # noqa: S506 (a SafeLoader)


def dump_yaml(data: Any, **kw: Any) -> str:
    return yaml.dump(data, Dumper=ConfigDumper, **kw)


# ---------------------------------------------------------------------------------------------------- type check
_EXPECTED = {int: "an integer", float: "a number", bool: "true or false"}


def check_fields(obj: Any, section: str, error: type[Exception] = MoegrokError) -> None:
    """Refuse a wrong type in any int / float / bool field of the dataclass `obj` (optional ones may be None) with
    `error("<section>.<field>: expected <type>, got <value>")`, and store each number as its field's type (an int
    field takes 1e4 as 10000, a float field 3 as 3.0). Run first in `__post_init__`, so later rules compare
    numbers."""
    for name, kind, optional in _typed_fields(type(obj)):
        value = getattr(obj, name)
        if value is None and optional:
            continue
        got = _as_type(value, kind)
        if got is None:
            what = _EXPECTED[kind] + (" or null" if optional else "")
            if kind is float and _is_number(value):
                what = "a finite number" + (" or null" if optional else "")
            raise error(f"{section}.{name}: expected {what}, got {value!r}")
        if got is not value:
            object.__setattr__(obj, name, got)


def _is_number(v: Any) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def _as_type(v: Any, kind: type) -> Any:
    """`v` as a value of `kind`, or None if it is not one. Numbers must be finite."""
    if kind is bool:
        return v if isinstance(v, bool) else None
    if not _is_number(v) or not math.isfinite(v):
        return None
    if kind is float:
        return v if type(v) is float else float(v)
    if isinstance(v, numbers.Integral):
        return v if type(v) is int else int(v)
    return int(v) if float(v).is_integer() else None


@functools.cache
def _typed_fields(cls) -> tuple[tuple[str, type, bool], ...]:
    """(name, int | float | bool, may be None) of each field annotated `T` or `T | None`."""
    out = []
    for f in dataclasses.fields(cls):
        parts = _union_names(f.type)
        optional = "None" in parts
        kinds = [k for k in (int, float, bool) if k.__name__ in parts]
        if len(kinds) == 1 and parts <= {kinds[0].__name__, "None"}:
            out.append((f.name, kinds[0], optional))
    return tuple(out)


def _union_names(tp: Any) -> set[str]:
    if isinstance(tp, str):  # `from __future__ import annotations`: the annotation as written
        return {p.strip() for p in tp.split("|")}
    args = typing.get_args(tp) or (tp,)
    return {"None" if a is type(None) else getattr(a, "__name__", str(a)) for a in args}
