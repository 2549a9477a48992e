"""Config as data: dataclasses <-> plain dicts <-> YAML, with dotted ``key=value`` overrides.

Unknown keys are errors that name the key and the keys that exist, so a typo in a YAML file or on
the command line never silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
import os
import re
import tempfile
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")


class _Loader(yaml.SafeLoader):
    """YAML 1.1 reads 1e-6 as a string; a config author means a float."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                  |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
                  |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
                  |[-+]?\.(?:inf|Inf|INF)
                  |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."),
)


def _mapping_without_duplicates(loader, node, deep=False):
    """PyYAML keeps the last of two equal keys; a config author who wrote both meant one of them."""
    seen = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise ConfigError(f"duplicate key {key!r} at lines {seen[key] + 1} and "
                              f"{key_node.start_mark.line + 1}: keep one of them")
        seen[key] = key_node.start_mark.line
    return yaml.SafeLoader.construct_mapping(loader, node, deep=deep)


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping_without_duplicates)


def yaml_load(text: str):
    return yaml.load(text, Loader=_Loader)


class ConfigError(ValueError):
    """A config that cannot be used as written; the message says what to change."""


def to_dict(obj) -> dict:
    """A dataclass as nested plain Python values (YAML- and JSON-safe)."""
    return dataclasses.asdict(obj)


def _field_types(cls) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _unwrap_optional(tp):
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def from_dict(cls: type[T], data: dict, where: str = "") -> T:
    """Build dataclass ``cls`` from ``data``; nested dataclasses are built recursively."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where or cls.__name__}: expected a mapping, got {type(data).__name__}")
    types_ = _field_types(cls)
    unknown = sorted(set(data) - set(types_))
    if unknown:
        prefix = f"{where}." if where else ""
        raise ConfigError(
            f"unknown config key {prefix}{unknown[0]!s}; known keys"
            f"{' under ' + where if where else ''}: {', '.join(sorted(types_))}"
        )
    kwargs = {}
    for name, value in data.items():
        tp = _unwrap_optional(types_[name])
        key = f"{where}.{name}" if where else name
        if value is None and tp is types_[name] and tp is not Any:  # null where it may not be
            if dataclasses.is_dataclass(tp):
                value = {}  # an empty section (every key commented out): its defaults
            else:
                default = next(f.default for f in dataclasses.fields(cls) if f.name == name)
                hint = "" if default is dataclasses.MISSING else f" (its default is {default!r})"
                raise ConfigError(f"{key} is null: give it a value{hint}, or remove the key")
        if dataclasses.is_dataclass(tp) and isinstance(value, dict):
            kwargs[name] = from_dict(tp, value, key)
        else:
            kwargs[name] = _check_scalar(key, value, tp)
    return cls(**kwargs)


def _check_scalar(key: str, value, tp):
    if value is None or tp not in (int, float, bool, str):
        return value
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, tp) and not (tp is int and isinstance(value, bool)):
        return value
    raise ConfigError(f"{key} must be {tp.__name__}, got {value!r}")


def _parse_scalar(text: str):
    # YAML's scalar rules: 1 -> int, 1e-4 -> float, true -> bool, null -> None, [1, 2] -> list.
    try:
        return yaml_load(text)
    except yaml.YAMLError:
        return text


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply ``a.b=value`` overrides to a nested dict (in place) and return it."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not key=value (for example train.lr=1e-6)")
        key, text = item.split("=", 1)
        node = data
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {part} is not a section")
        node[parts[-1]] = _parse_scalar(text)
    return data


def load_yaml(path: str | os.PathLike) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = yaml_load(path.read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{path} is not valid YAML{at}: fix the syntax there") from None
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping of config keys, not {type(data).__name__}")
    return data


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` via a temporary file and a rename: readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the usual permissions
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def save_yaml(obj, path: str | os.PathLike) -> None:
    data = to_dict(obj) if dataclasses.is_dataclass(obj) else obj
    atomic_write_text(path, yaml.safe_dump(data, sort_keys=False))
