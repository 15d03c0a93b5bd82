"""Typed records read from YAML or JSON mappings: every problem found at once, never a coercion.

A record is a frozen dataclass whose field types say what a value may be (str, int, float, bool, None, a Literal,
a list of these, or a union of them) and whose `rule(...)` metadata says what range it must fall in. `build`
checks a mapping against it and returns the record with every problem it found, one line each, in the form
`<key>: <what is wrong> (got X). <what to do>.` Unknown keys name the nearest valid one.
"""

import dataclasses
import difflib
import types
import typing
from dataclasses import field
from typing import Any, Literal, Union


def rule(**checks: Any) -> Any:
    """Attach range checks to a field: at_least, above, at_most, multiple_of, non_empty, each_at_least."""
    return field(metadata=checks)


def build(cls: type, raw: Any, section: str) -> tuple[Any, list[str]]:
    """The record `cls` made from the mapping `raw`, and the problems found; (None, problems) if any.
    `section` prefixes each key in the messages (`train.rank`); "" for none. A record's own `problems()` method,
    if it has one, adds cross-field checks once every field is valid."""
    prefix = f"{section}." if section else ""
    if not isinstance(raw, dict):
        return None, [f"{section or 'file'}: expected a mapping of keys (got {kind(raw)})."]
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    problems = unknown_keys(raw, list(fields), prefix)
    values = {}
    for name, f in fields.items():
        key = f"{prefix}{name}"
        if name not in raw:
            problems.append(f"{key}: missing. Add it (expected {describe(hints[name])}).")
            continue
        value = raw[name]
        if not matches(value, hints[name]):
            problems.append(f"{key}: expected {describe(hints[name])} (got {value!r}).{_nearest(value, hints[name])}")
            continue
        problems += [f"{key}: {p}" for p in _check_rules(value, f.metadata)]
        values[name] = float(value) if hints[name] is float and isinstance(value, int) else value
    if problems:
        return None, problems
    instance = cls(**values)
    return instance, instance.problems() if hasattr(instance, "problems") else []


def unknown_keys(raw: dict, valid: list[str], prefix: str) -> list[str]:
    found = []
    for key in raw:
        if key not in valid:
            near = difflib.get_close_matches(str(key), valid, n=1)
            hint = f" Did you mean '{prefix}{near[0]}'?" if near else f" Valid keys: {', '.join(valid)}."
            found.append(f"{prefix}{key}: unknown key.{hint}")
    return found


def matches(value: Any, tp: Any) -> bool:
    """Whether `value` is of type `tp`, strictly: a bool is not an int, an int is a float, "1" is no number."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        return any(matches(value, arg) for arg in typing.get_args(tp))
    if origin is Literal:
        return any(value == option and type(value) is type(option) for option in typing.get_args(tp))
    if origin is list:
        (item,) = typing.get_args(tp)
        return isinstance(value, list) and all(matches(v, item) for v in value)
    if tp is type(None):
        return value is None
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, tp)


def describe(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        return " or ".join(describe(arg) for arg in typing.get_args(tp))
    if origin is Literal:
        return " or ".join(repr(option) for option in typing.get_args(tp))
    if origin is list:
        return f"a list of ({describe(typing.get_args(tp)[0])})"
    names = {str: "a string", int: "an integer", float: "a number", bool: "true or false", type(None): "null"}
    return names.get(tp, getattr(tp, "__name__", str(tp)))


def kind(value: Any) -> str:
    return "nothing" if value is None else f"a {type(value).__name__}"


def _nearest(value: Any, tp: Any) -> str:
    literals = [arg for arg in (*typing.get_args(tp), tp) if typing.get_origin(arg) is Literal]
    options = [option for literal in literals for option in typing.get_args(literal)]
    near = difflib.get_close_matches(value, [str(o) for o in options], n=1) if isinstance(value, str) else []
    return f" Did you mean '{near[0]}'?" if near else ""


def _check_rules(value: Any, checks: typing.Mapping[str, Any]) -> list[str]:
    if value is None or isinstance(value, str) and value == "auto":
        return []
    found = []
    if "each_at_least" in checks and any(v < checks["each_at_least"] for v in value):
        found.append(f"every value must be at least {checks['each_at_least']} (got {value}).")
    if checks.get("non_empty") and len(value) == 0:
        found.append("must not be empty. Give at least one value.")
    if "at_least" in checks and value < checks["at_least"]:
        found.append(f"must be at least {checks['at_least']} (got {value}).")
    if "above" in checks and value <= checks["above"]:
        found.append(f"must be greater than {checks['above']} (got {value}).")
    if "at_most" in checks and value > checks["at_most"]:
        found.append(f"must be at most {checks['at_most']} (got {value}).")
    step = checks.get("multiple_of")
    if step and value % step:
        low, high = value // step * step, (value // step + 1) * step
        found.append(f"must be a multiple of {step} (latent ×8, patch ×2) (got {value}). "
                     f"Use {low or high} or {high}.")
    return found
