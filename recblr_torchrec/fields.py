"""What every config dataclass of the project shares: choices as string enums, and one
``__post_init__`` step that turns YAML values into the annotated types or names the bad one.

Each dataclass calls :func:`typed_fields` first in its ``__post_init__`` and then checks its own
values with :func:`require`, so a config is valid once it exists, whether it came from YAML, from
``--set`` or from Python.
"""

import dataclasses
import typing
from enum import Enum
from typing import Any, Dict, Type

from .errors import ConfigError

_OPTIONAL = type(None)


class Choice(str, Enum):
    """A field with a fixed set of values. YAML gives the string, the dataclass holds the member;
    members compare equal to their strings (``Protocol.PREFIXES == "prefixes"``)."""

    def __str__(self) -> str:
        return self.value

    def __hash__(self) -> int:  # as its string's (Enum hashes the name), so dicts keyed by strings find it
        return str.__hash__(self)

    @classmethod
    def parse(cls, value: Any, key: str) -> "Choice":
        if isinstance(value, cls):
            return value
        try:
            return cls(str(value).lower())
        except ValueError:
            raise ConfigError(f"{key}={value!r}; {choose(cls)}") from None


def choose(choices: Any) -> str:
    """``choose a or b`` / ``choose one of a, b, c``, from an Enum class or a sequence of strings."""
    names = [str(c.value) if isinstance(c, Enum) else str(c) for c in choices]
    return f"choose {names[0]} or {names[1]}" if len(names) == 2 else f"choose one of {', '.join(names)}"


def require(condition: bool, message: str) -> None:
    """Raises ``ConfigError(message)`` unless ``condition``: a config check naming the key and the fix."""
    if not condition:
        raise ConfigError(message)


def plain(value: Any) -> Any:
    """A config (or part of one) as plain Python: dicts, lists, strings and numbers, enums as their
    strings, so it pickles and serialises without this package's classes."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, dict):
        return {key: plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(item) for item in value]
    return value


def typed_fields(obj: Any, section: str) -> None:
    """Converts every field of dataclass ``obj`` to its annotated type in place.

    Strings become :class:`Choice` members, ints and numeric strings (YAML reads ``3e-4`` as a
    string) become floats, mappings become nested dataclasses; anything else of the wrong type is a
    ``ConfigError`` naming ``section.field`` and the type it must have.
    """
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        key = f"{section}.{f.name}" if section else f.name
        value = getattr(obj, f.name)
        if isinstance(value, bool) and "booleans" in f.metadata:  # YAML reads off/no/false as False
            value = f.metadata["booleans"][value]
        setattr(obj, f.name, _typed(value, hints[f.name], key))


def _typed(value: Any, hint: Any, key: str) -> Any:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Union and _OPTIONAL in args:  # Optional[X]
        return None if value is None else _typed(value, next(a for a in args if a is not _OPTIONAL), key)
    if origin in (list, typing.List):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}={value!r} must be a list")
        return [_typed(item, args[0], f"{key}[{i}]") for i, item in enumerate(value)]
    if origin in (dict, typing.Dict):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}={value!r} must be a mapping")
        return {_typed(k, args[0], key): _typed(v, args[1], f"{key}.{k}") for k, v in value.items()}
    if isinstance(hint, type) and issubclass(hint, Enum):
        if isinstance(value, hint):
            return value
        if issubclass(hint, Choice):
            return hint.parse(value, key)
        try:
            return hint(str(value).lower())
        except ValueError:
            raise ConfigError(f"{key}={value!r}; {choose(hint)}") from None
    if dataclasses.is_dataclass(hint):
        if isinstance(value, dict):
            return hint(**value)
        if not isinstance(value, hint):
            raise ConfigError(f"{key} must be a mapping of {hint.__name__} fields, got {value!r}")
        return value
    return _scalar(value, hint, key)


def _scalar(value: Any, hint: Type, key: str) -> Any:
    if hint is float and isinstance(value, (int, str)) and not isinstance(value, bool):
        try:
            return float(value)
        except ValueError:
            raise ConfigError(f"{key}={value!r} must be a float") from None
    if hint is bool or isinstance(value, bool):  # a bool is an int in Python: keep them apart
        if not (hint is bool and isinstance(value, bool)):
            raise ConfigError(f"{key}={value!r} must be a {hint.__name__}")
        return value
    if not isinstance(value, hint):
        raise ConfigError(f"{key}={value!r} must be a {hint.__name__}")
    return value


def fill(cls: Type, values: Dict[str, Any], where: str) -> Any:
    """``cls`` from a mapping (YAML), nested sections included; an unknown key is a ``ConfigError``
    that lists the known ones."""
    if not isinstance(values, dict):
        raise ConfigError(f"{where or 'a config'} must be a mapping, got {values!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in values.items():
        name = f"{where}.{key}" if where else key
        if key not in fields:
            known = ", ".join(sorted(fields))
            raise ConfigError(f"unknown config key {name}; known keys{' of ' + where if where else ''}: {known}")
        sub = hints[key]
        kwargs[key] = fill(sub, value, name) if dataclasses.is_dataclass(sub) else value
    return cls(**kwargs)
