"""Command lines from dataclasses: one `--flag` per field, its help from the field's metadata (cleanrl's `Args`)."""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from collections.abc import Sequence


def _arg_type(annotation) -> tuple[type, bool]:
    """The scalar type of a field annotation, and whether the field is a list."""
    origin = typing.get_origin(annotation)
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if origin in (typing.Union, types.UnionType):
        return _arg_type(args[0])
    if origin in (list, tuple, Sequence):
        return args[0], True
    return annotation, False


class _DefaultsOnce(argparse.HelpFormatter):
    """Help lines with the default appended once: not when the help text already speaks of its default, nor for a
    default of None (the help says what happens then); sequences are shown as they are typed."""

    def _get_help_string(self, action: argparse.Action) -> str:
        help_ = action.help or ""
        default = action.default
        if default is None or default is argparse.SUPPRESS or "default" in help_.lower():
            return help_
        shown = " ".join(map(str, default)) if isinstance(default, (list, tuple)) else str(default)
        return f"{help_} (default: {shown.replace('%', '%%')})"


def parse_dataclass(cls, argv: Sequence[str] | None = None, description: str | None = None):
    """Build an instance of dataclass `cls` from command-line arguments, one `--flag` per field.

    Each field's `metadata["help"]` is its help line, followed in `--help` by the default unless the line already
    says what the default is; `metadata["choices"]`, when given, are the values accepted; booleans become
    `--flag/--no-flag`.
    """
    parser = argparse.ArgumentParser(description=description or cls.__doc__, formatter_class=_DefaultsOnce)
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        flag = "--" + field.name.replace("_", "-")
        default = field.default if field.default is not dataclasses.MISSING else field.default_factory()
        kind, many = _arg_type(hints[field.name])
        help_ = field.metadata.get("help", "")
        if kind is bool:
            action = parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default)
            action.help = help_  # Python < 3.14 appends its own "(default: ...)"; the formatter adds it once
        else:
            parser.add_argument(
                flag,
                type=kind,
                nargs="+" if many else None,
                default=default,
                choices=field.metadata.get("choices"),
                help=help_,
            )
    args = parser.parse_args(argv)
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls)}
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})


__all__ = ["parse_dataclass"]
