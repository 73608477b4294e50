"""Strict YAML config loading into nested dataclasses, dotted overrides, and saving the resolved config.

Works for any dataclass schema (moevit's is ``moevit.config.schema``; a key missing from the YAML takes
the dataclass default). An unknown key, a wrong type or a missing required key is a ``ConfigError``
naming the dotted key and its source. Annotations understood: bool, int, float, str, Path, Any, Literal,
unions/Optional, list[X], tuple[X, ...], tuple[X, Y], dict[K, X], nested dataclasses. After building,
each dataclass node's ``validate()`` is called, children before parents; its ValueError becomes a
ConfigError naming the node.

Overrides (``model.moe.top_k=2``) are merged into the file's data before one strict build. To blame
the right source, a provenance map records which dotted keys each override set or created; an error
at a key is attributed to the override owning that key or an ancestor of it, else to the file.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import difflib
import functools
import reprlib
import types
import typing
from collections.abc import Sequence
from pathlib import Path, PurePath
from typing import Any, Literal, Union

import yaml

from moevit.config.errors import ConfigError
from moevit.fileio import write_text_atomically


class _Invalid(Exception):
    """Raised while building; turned into a ConfigError once the source of `path` is known."""

    def __init__(self, path: str, message: str, depends_on_subtree: bool = False):
        super().__init__(message)
        # validate() hooks read every field below their node, so overrides anywhere below may be to blame.
        self.path, self.message, self.depends_on_subtree = path, message, depends_on_subtree


def build_config(schema_cls: type, data: dict, source: str = "<dict>") -> Any:
    """Builds and validates an instance of the dataclass `schema_cls` from plain data; errors name `source`."""
    return _build(schema_cls, data, source, provenance={})


def apply_overrides(data: dict, overrides: Sequence[str]) -> dict:
    """Returns a copy of `data` with each 'a.b.c=value' set; the value is parsed as YAML ('2' -> int).

    Quote a value to force a string: YAML 1.1 reads `yes`, `no`, `on`, `off` as booleans.
    """
    return _apply_overrides(data, overrides)[0]


def load_config(path: str | Path, overrides: Sequence[str] = (), schema_cls: type | None = None) -> Any:
    """Reads the YAML file at `path`, applies `overrides` and builds `schema_cls` (default: schema.Config)."""
    if schema_cls is None:
        # Imported lazily: keeps this module schema-agnostic and out of an import cycle with the package.
        from moevit.config.schema import Config

        schema_cls = Config
    data = _read_yaml(Path(path))
    merged, provenance = _apply_overrides(data, overrides)
    return _build(schema_cls, merged, str(path), provenance)


def config_to_dict(cfg: Any) -> Any:
    """Converts a config to YAML-safe plain data (tuples -> lists, Paths -> str), in field order."""
    if dataclasses.is_dataclass(cfg) and not isinstance(cfg, type):
        return {f.name: config_to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg) if f.init}
    if isinstance(cfg, (list, tuple)):
        return [config_to_dict(item) for item in cfg]
    if isinstance(cfg, dict):
        return {key: config_to_dict(value) for key, value in cfg.items()}
    if isinstance(cfg, PurePath):
        return str(cfg)
    return cfg


def save_config(cfg: Any, path: str | Path) -> None:
    """Writes the resolved config as YAML; atomic, so a crash never leaves a partial file at `path`."""
    write_text_atomically(path, yaml.safe_dump(config_to_dict(cfg), sort_keys=False, allow_unicode=True))


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys in a mapping (PyYAML silently keeps the last one)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            # Keys merged in with '<<' may legitimately be overridden, so only plain scalar keys count.
            if isinstance(key_node, yaml.ScalarNode) and key_node.tag != "tag:yaml.org,2002:merge":
                key = self.construct_object(key_node, deep=deep)
                if key in seen:
                    raise yaml.MarkedYAMLError(None, None, f"duplicate key {key!r}", key_node.start_mark)
                seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _read_yaml(path: Path) -> dict:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(
            str(path), f"cannot read config file ({getattr(err, 'strerror', None) or err})"
        ) from None
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        raise ConfigError(where, f"invalid YAML: {getattr(err, 'problem', None) or err}") from None
    if not isinstance(data, dict):
        raise ConfigError(str(path), f"the top level must be a mapping, got {_describe(data)}")
    return data


def _apply_overrides(data: dict, overrides: Sequence[str]) -> tuple[dict, dict[str, str]]:
    """Returns the merged data and the provenance map {dotted key set or created -> override label}."""
    merged = copy.deepcopy(data)
    provenance: dict[str, str] = {}
    for override in overrides:
        label = f"override '{override}'"
        key, equals, raw_value = override.partition("=")
        parts = key.strip().split(".")
        if not equals or not all(parts):
            raise ConfigError(label, "expected KEY=VALUE with a dotted KEY, e.g. 'model.moe.top_k=2'")
        try:
            value = yaml.safe_load(raw_value)
        except yaml.YAMLError as err:
            raise ConfigError(label, f"the value is not valid YAML: {getattr(err, 'problem', err)}") from None
        node = merged
        for depth, part in enumerate(parts[:-1]):
            prefix = ".".join(parts[: depth + 1])
            if node.get(part) is None:  # missing, or an empty YAML section (`moe:` with nothing below)
                node[part] = {}
                provenance[prefix] = label
            elif not isinstance(node[part], dict):
                raise ConfigError(label, f"'{prefix}' is {_describe(node[part])}, not a mapping")
            node = node[part]
        node[parts[-1]] = value
        dotted = ".".join(parts)
        for replaced in [k for k in provenance if k.startswith(dotted + ".")]:
            del provenance[replaced]
        provenance[dotted] = label
    return merged, provenance


def _build(schema_cls: type, data: dict, file_source: str, provenance: dict[str, str]) -> Any:
    if not (dataclasses.is_dataclass(schema_cls) and isinstance(schema_cls, type)):
        raise TypeError(f"schema_cls must be a dataclass type, got {schema_cls!r}")
    try:
        cfg = _convert(schema_cls, data, "")
        _validate_tree(cfg, "")
    except _Invalid as err:
        raise ConfigError(_source_of(err, file_source, provenance), err.message) from None
    return cfg


def _source_of(err: _Invalid, file_source: str, provenance: dict[str, str]) -> str:
    owners = [k for k in provenance if err.path == k or err.path.startswith((k + ".", k + "["))]
    if owners:
        return provenance[max(owners, key=len)]
    if err.depends_on_subtree:
        below = [label for k, label in provenance.items() if not err.path or k.startswith(err.path + ".")]
        if below:
            return f"{file_source} (with {', '.join(dict.fromkeys(below))})"
    return file_source


def _convert(annotation: Any, value: Any, path: str) -> Any:
    """Checks `value` against `annotation` and returns it converted (lists -> tuples, str -> Path)."""
    origin, args = typing.get_origin(annotation) or annotation, typing.get_args(annotation)
    if annotation is Any:
        return value
    if dataclasses.is_dataclass(annotation):
        return _build_dataclass(annotation, value, path)
    if origin in (Union, types.UnionType):
        return _convert_union(annotation, args, value, path)
    if origin is Literal:
        # Compare types too: True == 1, but a bool must not satisfy Literal[1].
        if not any(value == a and type(value) is type(a) for a in args):
            raise _wrong_type(annotation, value, path)
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise _wrong_type(annotation, value, path)
        if origin is tuple and args and args[-1] is not Ellipsis:  # fixed length: tuple[int, int]
            if len(value) != len(args):
                raise _Invalid(path, f"{_quote(path)} must have {len(args)} items, got {len(value)}")
            return tuple(_convert(a, v, f"{path}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
        item_type = args[0] if args else Any
        items = [_convert(item_type, v, f"{path}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise _wrong_type(annotation, value, path)
        key_type, value_type = args or (Any, Any)
        entries = ((k, v, _join(path, str(k))) for k, v in value.items())
        return {_convert(key_type, k, at): _convert(value_type, v, at) for k, v, at in entries}
    if annotation in (bool, int, float, str, Path):
        return _convert_scalar(annotation, value, path)
    raise TypeError(f"config schema: unsupported annotation {annotation!r} at {_quote(path)}")


def _convert_union(annotation: Any, members: tuple, value: Any, path: str) -> Any:
    if value is None and type(None) in members:
        return None
    inner_error = None
    for member in (m for m in members if m is not type(None)):  # in order: the first that accepts wins
        try:
            return _convert(member, value, path)
        except _Invalid as err:
            # An error below `path` means this member accepted the value's shape (e.g. a mapping for a
            # dataclass) and something inside is wrong: that is more useful than "must be A | B".
            if err.path != path and inner_error is None:
                inner_error = err
    raise inner_error or _wrong_type(annotation, value, path)


def _build_dataclass(cls: type, value: Any, path: str) -> Any:
    if not isinstance(value, dict):
        raise _Invalid(path, f"{_quote(path)} must be a {cls.__name__} mapping, got {_describe(value)}")
    annotations, required = _dataclass_fields(cls)
    kwargs = {}
    for key, item in value.items():
        if key not in annotations:
            close = difflib.get_close_matches(str(key), annotations, n=1)
            hint = f"did you mean '{close[0]}'?" if close else f"valid keys: {', '.join(annotations)}"
            raise _Invalid(_join(path, str(key)), f"unknown key {_quote(_join(path, str(key)))} ({hint})")
        kwargs[key] = _convert(annotations[key], item, _join(path, key))
    for name in required:
        if name not in kwargs:
            raise _Invalid(_join(path, name), f"missing required key {_quote(_join(path, name))}")
    return cls(**kwargs)


@functools.cache
def _dataclass_fields(cls: type) -> tuple[dict[str, Any], tuple[str, ...]]:
    """Returns {init field name: resolved annotation} and the names without a default."""
    # get_type_hints resolves string annotations (`from __future__ import annotations` in the schema).
    hints = typing.get_type_hints(cls)
    init_fields = [f for f in dataclasses.fields(cls) if f.init]
    required = tuple(f.name for f in init_fields if f.default is f.default_factory is dataclasses.MISSING)
    return {f.name: hints[f.name] for f in init_fields}, required


def _validate_tree(node: Any, path: str) -> None:
    """Calls validate() on every dataclass in the tree, children first."""
    if dataclasses.is_dataclass(node) and not isinstance(node, type):
        for f in dataclasses.fields(node):
            _validate_tree(getattr(node, f.name), _join(path, f.name))
        validate = getattr(node, "validate", None)
        if callable(validate):
            try:
                validate()
            except ValueError as err:
                raise _Invalid(path, f"{path}: {err}" if path else str(err), depends_on_subtree=True) from err
    elif isinstance(node, (list, tuple)):
        for i, item in enumerate(node):
            _validate_tree(item, f"{path}[{i}]")
    elif isinstance(node, dict):
        for key, item in node.items():
            _validate_tree(item, _join(path, str(key)))


def _convert_scalar(annotation: type, value: Any, path: str) -> Any:
    # Exact type checks on purpose: bool is a subclass of int, and `use_ema: 1` or `steps: true` are mistakes.
    if type(value) is annotation:
        return value
    if annotation is float and type(value) is int:
        return float(value)
    if annotation is float and isinstance(value, str):
        # PyYAML follows YAML 1.1, which reads `1e-3` (no dot) as a string, not a float; accept the
        # numeric strings Python can parse so learning rates can be written the usual way.
        with contextlib.suppress(ValueError):
            return float(value)
    if annotation is Path and isinstance(value, (str, PurePath)):
        return Path(value)
    raise _wrong_type(annotation, value, path)


def _wrong_type(annotation: Any, value: Any, path: str) -> _Invalid:
    return _Invalid(path, f"{_quote(path)} must be {_type_name(annotation)}, got {_describe(value)}")


def _type_name(annotation: Any) -> str:
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if annotation is type(None):
        return "None"
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in args)
    if origin is Literal:
        return f"one of {', '.join(repr(a) for a in args)}"
    if origin is not None:
        inner = ", ".join("..." if a is Ellipsis else _type_name(a) for a in args)
        return f"{origin.__name__}[{inner}]" if args else origin.__name__
    return getattr(annotation, "__name__", repr(annotation))


def _describe(value: Any) -> str:
    return "null" if value is None else f"{type(value).__name__} {reprlib.repr(value)}"


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _quote(path: str) -> str:
    return f"'{path}'" if path else "the top level"
