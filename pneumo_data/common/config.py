"""Frozen dataclass configs and the absl flags generated from them, one flag per leaf field.

Every pneumo job has one frozen config dataclass. A field is either a *leaf* (an int, float,
bool, str, tuple or optional of those, with its help text and, for enumerations, its choices in
``dataclasses.field(metadata=...)``; see :func:`option`) or a *group*: another config dataclass
nested inside (see :func:`group`), so a job config holds the pipeline's, the network's and the
optimizer's configs rather than repeating their fields.

Flags stay flat: every leaf anywhere in the tree becomes one absl flag named after the field,
and leaf names must be unique across the tree (checked when the flags are defined).
``config_from_flags`` rebuilds the tree from the parsed flags, ``config_to_flagfile`` writes an
absl ``--flagfile`` that reproduces it, so the library API and the command line never drift.

Example::

    @dataclasses.dataclass(frozen=True)
    class OptimizerConfig:
        learning_rate: float = option(1e-3, "Learning rate.")

    @dataclasses.dataclass(frozen=True)
    class JobConfig:
        epochs: int = option(10, "Training epochs.")
        mode: str = option("a", "Mode.", choices=("a", "b"))
        optimizer: OptimizerConfig = group(OptimizerConfig)

    define_flags(JobConfig)            # --epochs, --mode, --learning_rate
    ...
    config = config_from_flags(JobConfig)
    config = with_leaves(JobConfig(), epochs=3, learning_rate=1e-4)   # the same from Python
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from typing import Any, Iterator

from absl import flags


def option(default: Any, help: str, *, choices: tuple[str, ...] | None = None):
    """A leaf field with its flag help text and optional enum choices."""
    metadata = {"help": help}
    if choices is not None:
        metadata["choices"] = tuple(choices)
    if isinstance(default, (list, dict, set)):
        raise TypeError("use tuples (immutable) for sequence defaults")
    return dataclasses.field(default=default, metadata=metadata)


def group(cls, help: str = ""):
    """A nested config field (its leaves become flags of their own)."""
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"group() takes a config dataclass, got {cls!r}")
    return dataclasses.field(default_factory=cls, metadata={"help": help, "group": True})


def _base_type(annotation: Any) -> tuple[type, bool]:
    """Returns (type, optional) for annotations like ``int`` or ``str | None``."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) != 1:
            raise TypeError(f"unsupported union annotation {annotation!r}")
        return _base_type(args[0])[0], True
    if origin is tuple:
        return tuple, False
    return annotation, False


def _fields(cls) -> list[tuple[dataclasses.Field, type, bool]]:
    hints = typing.get_type_hints(cls)
    return [(f, *_base_type(hints[f.name])) for f in dataclasses.fields(cls)]


def _is_group(field: dataclasses.Field) -> bool:
    return bool(field.metadata.get("group"))


def leaf_fields(cls, _seen: dict[str, str] | None = None, _path: str = ""
                ) -> Iterator[tuple[str, dataclasses.Field, type, bool]]:
    """Yields (dotted path, field, type, optional) for every leaf of config class ``cls``.

    Raises TypeError when two leaves of the tree share a name (their flags would clash).
    """
    seen = {} if _seen is None else _seen
    for field, kind, optional in _fields(cls):
        path = f"{_path}{field.name}"
        if _is_group(field):
            yield from leaf_fields(kind, seen, path + ".")
            continue
        if field.name in seen:
            raise TypeError(f"config {cls.__name__}: leaf {path!r} has the same flag name as "
                            f"{seen[field.name]!r}")
        seen[field.name] = path
        yield path, field, kind, optional


def define_flags(cls, flag_values: flags.FlagValues = flags.FLAGS) -> None:
    """Defines one absl flag per leaf of config class ``cls`` (idempotent)."""
    for _, field, kind, optional in leaf_fields(cls):
        if field.name in flag_values:
            continue
        help_text = field.metadata.get("help", field.name)
        default = field.default
        if optional and default is not None:
            raise TypeError(f"field {field.name}: optional fields must default to None")
        choices = field.metadata.get("choices")
        if choices is not None:
            flags.DEFINE_enum(field.name, default, list(choices), help_text,
                              flag_values=flag_values)
        elif kind is bool:
            flags.DEFINE_bool(field.name, default, help_text, flag_values=flag_values)
        elif kind is int:
            flags.DEFINE_integer(field.name, default, help_text, flag_values=flag_values)
        elif kind is float:
            flags.DEFINE_float(field.name, default, help_text, flag_values=flag_values)
        elif kind is tuple:
            flags.DEFINE_list(field.name, None if default is None else list(default),
                              help_text, flag_values=flag_values)
        elif kind is str:
            flags.DEFINE_string(field.name, default, help_text, flag_values=flag_values)
        else:
            raise TypeError(f"field {field.name}: unsupported type {kind!r}")


def _leaf_value(field: dataclasses.Field, kind: type, value: Any) -> Any:
    if kind is tuple and value is not None:
        return tuple(value)
    if kind is str and value == "" and field.default is None:
        return None
    return value


def _build(cls, leaf: typing.Callable[[dataclasses.Field, type], Any]):
    values = {}
    for field, kind, _ in _fields(cls):
        values[field.name] = _build(kind, leaf) if _is_group(field) else leaf(field, kind)
    return cls(**values)


def given_leaves(cls, flag_values: flags.FlagValues = flags.FLAGS) -> set[str]:
    """Names of the leaves of ``cls`` whose flags were given (on the command line or in a
    ``--flagfile``), as opposed to left at their defaults."""
    return {f.name for _, f, _, _ in leaf_fields(cls) if flag_values[f.name].present}


def config_from_flags(cls, flag_values: flags.FlagValues = flags.FLAGS, **overrides):
    """Builds config tree ``cls`` from parsed flags; ``overrides`` are leaf values by name.

    A config class may define ``resolve_given(config, given)`` (a classmethod or static
    method) to fill leaves the user did not give from other leaves, e.g. a recipe's values:
    it is called with the built config and the names of the leaves given as flags or
    overrides, and its result is returned.
    """
    leaves = {name for _, f, _, _ in leaf_fields(cls) for name in [f.name]}
    unknown = sorted(set(overrides) - leaves)
    if unknown:
        raise TypeError(f"{cls.__name__} has no leaf field(s) {unknown}")

    def leaf(field, kind):
        if field.name in overrides:
            return overrides[field.name]
        return _leaf_value(field, kind, flag_values[field.name].value)
    config = _build(cls, leaf)
    resolve = getattr(cls, "resolve_given", None)
    if resolve is not None:
        config = resolve(config, given_leaves(cls, flag_values) | set(overrides))
    return config


def with_leaves(config, **leaves):
    """A copy of ``config`` with leaf fields replaced by name, wherever they sit in the tree.

    ``with_leaves(TrainConfig(), epochs=2, batch_size=8)`` sets ``epochs`` on the job config and
    ``batch_size`` on its pipeline config. Unknown names raise TypeError.
    """
    remaining = dict(leaves)

    def replace(node):
        changes = {}
        for field, kind, _ in _fields(type(node)):
            if _is_group(field):
                changes[field.name] = replace(getattr(node, field.name))
            elif field.name in remaining:
                changes[field.name] = _leaf_value(field, kind, remaining.pop(field.name))
        return dataclasses.replace(node, **changes)

    result = replace(config)
    if remaining:
        raise TypeError(f"{type(config).__name__} has no leaf field(s) {sorted(remaining)}")
    return result


def leaves(config) -> dict[str, Any]:
    """Flat ``{leaf name: value}`` of a config tree."""
    out = {}
    for field, _, _ in _fields(type(config)):
        value = getattr(config, field.name)
        if _is_group(field):
            out.update(leaves(value))
        else:
            out[field.name] = value
    return out


def config_to_dict(config) -> dict[str, Any]:
    """JSON-ready nested dict of a config tree (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(config)))


def config_from_dict(cls, data: dict[str, Any], strict: bool = False):
    """The config tree ``cls`` from :func:`config_to_dict` output (missing keys: defaults,
    or with ``strict`` a ValueError naming them, e.g. for a record written by an older
    version whose defaults were different).

    Raises ValueError for keys the tree does not have.
    """
    if not isinstance(data, dict):
        raise ValueError(f"{cls.__name__}: expected a JSON object, got {type(data).__name__}")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"{cls.__name__} has no field(s) {unknown}")
    missing = sorted(known - set(data))
    if strict and missing:
        raise ValueError(f"{cls.__name__} lacks field(s) {missing}")
    values = {}
    for field, kind, _ in _fields(cls):
        if field.name not in data:
            continue
        value = data[field.name]
        values[field.name] = (config_from_dict(kind, value, strict) if _is_group(field)
                              else _leaf_value(field, kind, value))
    return cls(**values)


def config_to_flagfile(config) -> str:
    """The config tree as an absl ``--flagfile`` text that reproduces it (one line per leaf)."""
    lines = []
    for name, value in leaves(config).items():
        if value is None:
            continue
        if isinstance(value, bool):
            lines.append(f"--{name}" if value else f"--no{name}")
        elif isinstance(value, tuple):
            lines.append(f"--{name}={','.join(str(v) for v in value)}")
        else:
            lines.append(f"--{name}={value}")
    return "\n".join(lines) + "\n"
