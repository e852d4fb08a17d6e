"""Reading a study file: TOML in, command-line overrides (`--set section.key=value`) applied, every key and type
checked against the schema in `config.py`, one validated `StudyConfig` out. Errors name the file, the key and
the fix.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from pathlib import Path
from typing import Any, get_type_hints

from kdsearch import KdsearchError
from kdsearch.config import (
    KD_METHODS,
    RESERVED_KNOBS,
    STUDENT_FAMILIES,
    AutoBool,
    AutoFloat,
    Bounds,
    Families,
    IntOrRange,
    IntRange,
    Knobs,
    Methods,
    Range,
    StudyConfig,
    check_values,
)

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib


def load_study(path: str | Path, overrides: list[str] | None = None) -> StudyConfig:
    """Read, override (`section.key=value` strings) and validate a study file."""
    path = Path(path)
    if not path.is_file():
        raise KdsearchError(f"study file {path} not found: pass an existing .toml file (see studies/)")
    try:
        table = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise KdsearchError(f"{path} is not valid TOML ({e}): fix the syntax") from None
    for item in overrides or []:
        _apply_override(table, item)
    config = build(StudyConfig, table, str(path))
    check_values(config, str(path))
    return config


def _apply_override(table: dict, item: str) -> None:
    key, sep, text = item.partition("=")
    if not sep or not key.strip():
        raise KdsearchError(f"--set {item!r}: write it as section.key=value, e.g. --set distill.epochs=5")
    try:
        value = tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        value = text  # a bare word is taken as a string
    *sections, last = key.strip().split(".")
    for name in sections:
        table = table.setdefault(name, {})
        if not isinstance(table, dict):
            raise KdsearchError(f"--set {item!r}: {name} is not a section")
    table[last] = value


def build(cls: type, table: Any, where: str, prefix: str = "") -> Any:
    """Build dataclass `cls` from a TOML table, checking keys and types; `where` names the file."""
    if not isinstance(table, dict):
        raise KdsearchError(f"{where}: {prefix.rstrip('.')} = {table!r}: expected a table [{prefix.rstrip('.')}]")
    hints = get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in table:
        if key not in names:
            near = difflib.get_close_matches(key, names, n=1)
            hint = f"did you mean '{prefix}{near[0]}'?" if near else f"valid keys: {', '.join(names)}"
            raise KdsearchError(f"{where}: unknown key '{prefix}{key}': {hint}")
    values = {}
    for name in names:
        if name in table:
            values[name] = _convert(hints[name], table[name], where, f"{prefix}{name}")
    return cls(**values)


def _convert(kind: type, value: Any, where: str, key: str) -> Any:
    if dataclasses.is_dataclass(kind):
        return build(kind, value, where, f"{key}.")
    if kind in (AutoFloat, AutoBool):
        return "auto" if value == "auto" else _scalar(float if kind is AutoFloat else bool, value, where, key)
    if kind is Families:
        return _families(value, where, key)
    if kind is Bounds:
        if not (isinstance(value, list) and all(type(v) in (int, float) and v > 0 for v in value)):
            raise KdsearchError(f"{where}: {key} = {value!r}: expected a list of numbers above 0, e.g. [2000, 8000]")
        return tuple(value)
    if kind is Methods:
        return _methods(value, where, key)
    if kind is Knobs:
        return _knobs(value, where, key)
    if kind is IntOrRange:
        if isinstance(value, list) and len(value) == 2 and all(type(v) is int for v in value):
            return _convert(IntRange, value, where, key)
        if type(value) is not int:
            raise KdsearchError(f"{where}: {key} = {value!r}: expected an integer or an integer range [low, high], "
                                "e.g. 2 or [1, 3]")
        return value
    if kind in (Range, IntRange):
        scalar = float if kind is Range else int
        if not (isinstance(value, list) and len(value) == 2):
            raise KdsearchError(f"{where}: {key} = {value!r}: expected a range [low, high]")
        low, high = (_scalar(scalar, v, where, key) for v in value)
        if low > high:
            raise KdsearchError(f"{where}: {key} = {value!r}: low is above high; write [{high}, {low}]")
        return kind((low, high))
    return _scalar(kind, value, where, key)


def _families(value: Any, where: str, key: str) -> str | tuple[str, ...]:
    if isinstance(value, str):
        return value
    if not (isinstance(value, list) and value and all(v in STUDENT_FAMILIES for v in value)
            and len(set(value)) == len(value)):
        raise KdsearchError(f"{where}: {key} = {value!r}: expected a family name, a list of distinct families from "
                            f"{', '.join(STUDENT_FAMILIES)}, or a builder 'package.module:function'")
    return tuple(value) if len(value) > 1 else value[0]


def _methods(value: Any, where: str, key: str) -> str | tuple[str, ...]:
    values = [value] if isinstance(value, str) else value
    if not (isinstance(values, list) and values and all(v in KD_METHODS for v in values)
            and len(set(values)) == len(values)):
        raise KdsearchError(f"{where}: {key} = {value!r}: expected a KD method from {', '.join(KD_METHODS)}, or a "
                            "list of distinct ones to search over")
    return tuple(values) if len(values) > 1 else values[0]


def _knobs(table: Any, where: str, key: str) -> dict:
    if not isinstance(table, dict):
        raise KdsearchError(f"{where}: {key} = {table!r}: expected a table [{key}] of knob = value or [low, high]")
    knobs = {}
    for name, value in table.items():
        if name in RESERVED_KNOBS or "." in name:
            raise KdsearchError(f"{where}: {key}.{name}: this name is taken by kdsearch's own parameters "
                                f"({', '.join(RESERVED_KNOBS)}) or has a dot: rename the builder's knob")
        if isinstance(value, list) and len(value) == 2 and all(type(v) in (int, float) for v in value):
            kind = IntRange if all(type(v) is int for v in value) else Range
            knobs[name] = _convert(kind, value, where, f"{key}.{name}")
        elif isinstance(value, list) and value and all(isinstance(v, str) for v in value):
            knobs[name] = list(value)
        elif type(value) in (int, float, str, bool):
            knobs[name] = value
        else:
            raise KdsearchError(f"{where}: {key}.{name} = {value!r}: use a number, a string, true/false, a range "
                                "[low, high] or a list of strings to choose from")
    return Knobs(knobs)


def _scalar(kind: type, value: Any, where: str, key: str) -> Any:
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if type(value) is not kind or (kind is float and not math.isfinite(value)):
        expected = {float: "a number", int: "an integer", str: "a string", bool: "true or false"}[kind]
        raise KdsearchError(f"{where}: {key} = {value!r}: expected {expected}")
    return value
