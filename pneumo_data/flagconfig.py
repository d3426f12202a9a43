"""absl flags generated from a frozen dataclass, one flag per field.

Every job in pneumo has one frozen config dataclass. Its fields carry their help
text (and, for enumerations, their choices) in ``dataclasses.field(metadata=...)``.
``define_flags`` turns each field into an absl flag with the same name, type and
default, and ``config_from_flags`` builds the dataclass back from the parsed
flags, so the library API and the command line can never drift apart.

Example::

    @dataclasses.dataclass(frozen=True)
    class JobConfig:
        epochs: int = option(10, "Training epochs.")
        mode: str = option("a", "Mode.", choices=("a", "b"))

    define_flags(JobConfig)
    ...
    config = config_from_flags(JobConfig)
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from typing import Any

from absl import flags


def option(default: Any, help: str, *, choices: tuple[str, ...] | None = None):
    """A dataclass field with its flag help text and optional enum choices."""
    metadata = {"help": help}
    if choices is not None:
        metadata["choices"] = tuple(choices)
    if isinstance(default, (list, dict, set)):
        raise TypeError("use tuples (immutable) for sequence defaults")
    return dataclasses.field(default=default, metadata=metadata)


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


def _resolved_fields(cls) -> list[tuple[dataclasses.Field, type, bool]]:
    hints = typing.get_type_hints(cls)
    return [(f, *_base_type(hints[f.name])) for f in dataclasses.fields(cls)]


def define_flags(cls, flag_values: flags.FlagValues = flags.FLAGS) -> None:
    """Defines one absl flag per field of dataclass ``cls`` (idempotent)."""
    for field, kind, optional in _resolved_fields(cls):
        if field.name in flag_values:
            continue
        help_text = field.metadata.get("help", field.name)
        default = field.default
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
        if optional and default is not None:
            raise TypeError(f"field {field.name}: optional fields must default to None")


def config_from_flags(cls, flag_values: flags.FlagValues = flags.FLAGS, **overrides):
    """Builds dataclass ``cls`` from parsed flags (plus explicit overrides)."""
    values = {}
    for field, kind, _ in _resolved_fields(cls):
        value = flag_values[field.name].value
        if kind is tuple and value is not None:
            value = tuple(value)
        if kind is str and value == "" and field.default is None:
            value = None
        values[field.name] = value
    values.update(overrides)
    return cls(**values)


def config_to_dict(config) -> dict[str, Any]:
    """JSON-ready dict of a config dataclass (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(config)))


def config_to_flagfile(config) -> str:
    """The config as an absl ``--flagfile`` text that reproduces it."""
    lines = []
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        if value is None:
            continue
        if isinstance(value, bool):
            lines.append(f"--{field.name}" if value else f"--no{field.name}")
        elif isinstance(value, tuple):
            lines.append(f"--{field.name}={','.join(str(v) for v in value)}")
        else:
            lines.append(f"--{field.name}={value}")
    return "\n".join(lines) + "\n"


def run_job(name: str, config_cls, job, errors: tuple[type[BaseException], ...] = (ValueError,)):
    """The ``__main__`` of a job: flags from ``config_cls``, then ``job(config)``.

    An exception of one of ``errors`` ends the process with ``NAME: error: message``
    (exit status 1, no traceback); anything else is a bug and keeps its traceback.
    """
    import logging

    from absl import app

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    define_flags(config_cls)

    def main(argv):
        if len(argv) > 1:
            raise SystemExit(f"{name}: error: unexpected arguments {argv[1:]}")
        try:
            job(config_from_flags(config_cls))
        except errors as error:
            raise SystemExit(f"{name}: error: {error}") from None

    app.run(main)
