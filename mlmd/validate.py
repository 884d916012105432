"""Config values checked by type, up front, with messages that name the key and the fix.

YAML reads ``false`` as a bool but ``"false"`` as a string (truthy), and YAML 1.1 (PyYAML)
reads ``1e-3`` as a string; both used to pass into a run and fail late or silently.
"""
from __future__ import annotations

import dataclasses
import typing
from typing import Any

from .errors import InputError

_NONE = type(None)


def check_field_types(config, source: str = "config", prefix: str = "") -> None:
    """Raise InputError for the first dataclass field of ``config`` whose value does not match its
    annotation (bool, int, float, str, Optional[...], List[...], Dict[str, ...], Any)."""
    hints = typing.get_type_hints(type(config))
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        want = hints.get(f.name, Any)
        if not matches(value, want):
            raise InputError(f"{source + ': ' if source else ''}{prefix}{f.name}: must be {describe(want)}, got {value!r}"
                             f"{fix_hint(value, want)}")


def matches(value, want) -> bool:
    if want is Any:
        return True
    origin = typing.get_origin(want)
    args = typing.get_args(want)
    if origin is typing.Union:
        return any(matches(value, arg) for arg in args)
    if want is _NONE:
        return value is None
    if want is bool:
        return isinstance(value, bool)
    if want is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if want is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if want is str:
        return isinstance(value, str)
    if origin in (list, typing.List):
        return isinstance(value, list) and all(matches(v, args[0] if args else Any) for v in value)
    if origin in (dict, typing.Dict):
        return isinstance(value, dict) and all(matches(k, args[0]) and matches(v, args[1])
                                               for k, v in value.items()) if args else isinstance(value, dict)
    return isinstance(value, want) if isinstance(want, type) else True


def describe(want) -> str:
    origin = typing.get_origin(want)
    args = typing.get_args(want)
    if origin is typing.Union:
        parts = [describe(a) for a in args if a is not _NONE]
        text = " or ".join(parts)
        return text + (" (or left out)" if _NONE in args else "")
    names = {bool: "true or false", int: "a whole number", float: "a number", str: "a string", Any: "any value"}
    if want in names:
        return names[want]
    if origin in (list, typing.List):
        return f"a list of {describe(args[0])}s" if args else "a list"
    if origin in (dict, typing.Dict):
        return "a mapping of keys to values"
    return getattr(want, "__name__", str(want))


def fix_hint(value, want) -> str:
    """How to write what was probably meant, for the two YAML traps."""
    if not isinstance(value, str):
        return ""
    wants = set(typing.get_args(want)) | {want}
    if bool in wants and value.lower() in ("true", "false", "yes", "no", "on", "off", "1", "0"):
        return " (a quoted string, which Python reads as True whatever it says); write true or false without quotes"
    if wants & {int, float}:
        try:
            float(value)
        except ValueError:
            return ""
        return (" (text: YAML 1.1 reads 1e-3 as a string); write it with a decimal point, e.g. 1.0e-3, "
                "and without quotes")
    return ""
