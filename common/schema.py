"""The generic half of config handling: raw YAML mappings -> frozen dataclasses, every problem at once.

Both the experiment config (:mod:`common.config`) and a hospital's policy
(:mod:`common.policy`) are frozen dataclasses whose fields carry a doc
string and optional range limits (:func:`documented`). :func:`build_dataclass`
converts a raw mapping into such a dataclass and appends one line per
problem (unknown key with a did-you-mean, wrong type, out-of-range value),
naming the dotted key, so that callers can raise a single error listing
them all. :func:`reference_rows` turns the same metadata into the README
reference tables, so that docs and checks cannot drift apart.
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import types
import typing
from dataclasses import field
from typing import Any

import yaml

from common.errors import ConfigError

__all__ = ["documented", "build_dataclass", "to_plain", "reference_rows", "all_keys", "parse_overrides",
           "apply_overrides"]


def documented(default: Any, *, doc: str, gt: float | None = None, ge: float | None = None,
               lt: float | None = None, le: float | None = None) -> Any:
    """A dataclass field with a documented default and optional range limits."""
    meta = {"doc": doc, "gt": gt, "ge": ge, "lt": lt, "le": le}
    if isinstance(default, (dict, list)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


def all_keys(cls: type, prefix: str = "") -> list[str]:
    """Every dotted key of dataclass ``cls`` (nested sections included)."""
    keys = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        keys.append(key)
        if dataclasses.is_dataclass(hints[f.name]):
            keys += all_keys(hints[f.name], key + ".")
    return keys


def _describe(tp: Any) -> str:
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return "one of " + ", ".join(repr(m.value) for m in tp)
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(tp, str(tp))


def _convert(value: Any, tp: Any, key: str, problems: list[str]) -> Any:
    """Convert ``value`` to type ``tp``; append a problem and return None on failure."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return build_dataclass(tp, value, problems=problems, prefix=key + ".")
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _convert(value, args[0], key, problems)
    if origin is dict:
        _, val_tp = typing.get_args(tp)
        if value is None:
            return {}
        if not isinstance(value, dict):
            problems.append(f"{key}: expected a mapping, got {value!r}")
            return None
        return {str(k): _convert(v, val_tp, f"{key}.{k}", problems) for k, v in value.items()}
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, list):
            problems.append(f"{key}: expected a list, got {value!r}")
            return None
        return [_convert(v, item_tp, f"{key}[{i}]", problems) for i, v in enumerate(value)]
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        try:
            return tp(value)
        except ValueError:
            hint = difflib.get_close_matches(str(value), [m.value for m in tp], n=1)
            extra = f"; did you mean {hint[0]!r}?" if hint else ""
            problems.append(f"{key}: expected {_describe(tp)}, got {value!r}{extra}")
            return None
    if tp is bool:
        if isinstance(value, bool):
            return value
        problems.append(f"{key}: expected true or false, got {value!r}")
        return None
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        problems.append(f"{key}: expected an integer, got {value!r}")
        return None
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)  # YAML 1.1 reads '1e-3' as a string
            except ValueError:
                pass
        problems.append(f"{key}: expected a number, got {value!r}")
        return None
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        problems.append(f"{key}: expected a string, got {value!r}")
        return None
    raise TypeError(f"unsupported config field type {tp!r} at {key}")  # a bug in the schema


def _check_range(value: Any, meta: dict[str, Any], key: str, problems: list[str]) -> None:
    if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
        return
    checks = (("gt", lambda v, b: v > b, ">"), ("ge", lambda v, b: v >= b, ">="),
              ("lt", lambda v, b: v < b, "<"), ("le", lambda v, b: v <= b, "<="))
    for name, ok, sym in checks:
        bound = meta.get(name)
        if bound is not None and not ok(value, bound):
            problems.append(f"{key}: must be {sym} {bound}, got {value!r}")


def build_dataclass(cls: type, raw: Any, *, problems: list[str], root: type | None = None, prefix: str = "") -> Any:
    """Build dataclass ``cls`` from the mapping ``raw``; append every problem to ``problems``.

    ``root`` is the top-level dataclass (for did-you-mean over all dotted
    keys); ``prefix`` the dotted path of ``cls`` within it. Returns None when
    the dataclass cannot be built.
    """
    root = root or cls
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        problems.append(f"{prefix.rstrip('.') or '<top>'}: expected a mapping, got {raw!r}")
        return None
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in names:
            full = f"{prefix}{key}"
            hint = difflib.get_close_matches(full, all_keys(root), n=1, cutoff=0.6)
            if not hint:
                hint = [f"{prefix}{m}" for m in difflib.get_close_matches(str(key), sorted(names), n=1)]
            extra = f"; did you mean {hint[0]!r}?" if hint else f"; valid keys here: {', '.join(sorted(names))}"
            problems.append(f"{full}: unknown key{extra}")
    kwargs: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if f.name not in raw:
            continue
        key = f"{prefix}{f.name}"
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            sub = build_dataclass(tp, raw[f.name], problems=problems, root=root, prefix=key + ".")
            if sub is not None:
                kwargs[f.name] = sub
            continue
        before = len(problems)
        value = _convert(raw[f.name], tp, key, problems)
        if len(problems) == before:
            _check_range(value, dict(f.metadata), key, problems)
            kwargs[f.name] = value
    try:
        return cls(**kwargs)
    except TypeError:
        return None


def to_plain(obj: Any) -> dict[str, Any]:
    """Plain-Python (YAML-safe) view of a config dataclass."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(obj):
        out[f.name] = _plain_value(getattr(obj, f.name))
    return out


def _plain_value(value: Any) -> Any:
    if dataclasses.is_dataclass(value):
        return to_plain(value)
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, dict):
        return {k: _plain_value(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain_value(v) for v in value]
    return value


def reference_rows(cls: type, prefix: str = "") -> list[tuple[str, str, str]]:
    """(dotted key, default, description) for every key of ``cls``; used to write the README reference."""
    rows: list[tuple[str, str, str]] = []
    hints = typing.get_type_hints(cls)
    defaults = cls()
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            rows += reference_rows(hints[f.name], f"{prefix}{f.name}.")
            continue
        shown = _plain_value(getattr(defaults, f.name))
        shown = "null" if shown is None else ("{}" if shown == {} else repr(shown))
        rows.append((f"{prefix}{f.name}", shown, f.metadata.get("doc", "")))
    return rows


# --------------------------------------------------------------------------- overrides


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """Turn ``["a.b=1", "c=x"]`` into ``{"a.b": 1, "c": "x"}``; values are YAML scalars.

    Raises
    ------
    ConfigError
        Listing every item that is not ``key=value``.
    """
    out: dict[str, Any] = {}
    problems = []
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            problems.append(f"--set {item!r}: expected key=value")
            continue
        try:
            out[key] = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            out[key] = raw
    if problems:
        raise ConfigError("--set", problems)
    return out


def apply_overrides(raw: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    merged = _deep_copy(raw)
    for dotted, value in overrides.items():
        node = merged
        parts = dotted.split(".")
        for part in parts[:-1]:
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]
        node[parts[-1]] = value
    return merged


def _deep_copy(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _deep_copy(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_deep_copy(v) for v in obj]
    return obj
