"""Command lines from dataclasses: one `--flag` per field, its help from the field's metadata (cleanrl's `Args`)."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import shutil
import types
import typing
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

#: the help of the options every script shares, one spelling each (README's table)
DEVICE_HELP = "auto | cpu | cuda | cuda:N"
THREADS_HELP = "torch CPU threads (0: torch's default)"
WORKERS_HELP = "data loader workers (ImageFolder; default: min(4, CPU cores))"


def device_field(help_: str = DEVICE_HELP):
    """The `--device` option: `auto` (CUDA when there is one), `cpu`, `cuda` or `cuda:N`."""
    return dataclasses.field(default="auto", metadata={"help": help_})


def threads_field():
    """The `--threads` option: torch's CPU threads, 0 for torch's default."""
    return dataclasses.field(default=0, metadata={"help": THREADS_HELP})


def workers_field():
    """The `--workers` option: ImageFolder loader processes, by default min(4, cores) (`vit.data.default_workers`)."""
    return dataclasses.field(default_factory=lambda: min(4, os.cpu_count() or 1), metadata={"help": WORKERS_HELP})


def amp_field(help_: str):
    """An `--amp` option, off by default everywhere."""
    return dataclasses.field(default=False, metadata={"help": help_})


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


@contextlib.contextmanager
def output_folder(path: str | os.PathLike | None) -> Iterator[None]:
    """Around a run that writes into `path` (an `--out` folder): when the run fails, the folder is removed if the
    run created it and wrote no file into it, so a failed start leaves nothing behind; a folder that existed, or one
    holding what the run wrote (checkpoints to resume from), stays."""
    existed = path is None or Path(path).exists()
    try:
        yield
    except BaseException:
        folder = None if existed else Path(path)
        if folder is not None and folder.is_dir() and not any(p.is_file() for p in folder.rglob("*")):
            shutil.rmtree(folder, ignore_errors=True)
        raise


#: failures of what a script was given or can reach (missing files, no network), not of the code: one line, no
#: traceback
ONE_LINE_ERRORS = (FileNotFoundError, ConnectionError)


@contextlib.contextmanager
def one_line_errors() -> Iterator[None]:
    """Around a script's body: `ONE_LINE_ERRORS` end it with their message alone (exit status 1)."""
    try:
        yield
    except ONE_LINE_ERRORS as e:
        raise SystemExit(f"error: {e}") from None


def run(main: Callable, cls, argv: Sequence[str] | None = None):
    """A script's body: `main(config)` of the config `parse_dataclass(cls, argv)` gives, inside `output_folder` of
    its `out` field (if it has one) and `one_line_errors`."""
    cfg = parse_dataclass(cls, argv)
    with output_folder(getattr(cfg, "out", None)), one_line_errors():
        return main(cfg)


__all__ = [
    "DEVICE_HELP",
    "THREADS_HELP",
    "WORKERS_HELP",
    "amp_field",
    "device_field",
    "threads_field",
    "workers_field",
    "ONE_LINE_ERRORS",
    "one_line_errors",
    "output_folder",
    "parse_dataclass",
    "run",
]
