"""Command-line options made from a config dataclass, so a command's flags and its config cannot drift.

A protocol's config is a dataclass whose fields carry their help text, as transformers' and TRL's
argument dataclasses do: ``field(default=8, metadata={"help": "samples per forward pass"})``. The
decorator :func:`options_from` gives a typer command one option per field (``batch_size`` becomes
``--batch-size``, with the field's type, default and help); ``metadata["flags"]`` names the flags
instead (``("--output", "-o")``), ``metadata["argument"]`` makes the field positional and
``metadata["cli"] = False`` leaves it out, and ``metadata["deprecated_flags"]`` keeps old spellings
working, hidden from ``--help``, with a warning. The command function receives the built config as
its first argument, then its own options. A value the config refuses is reported with the flags'
names, not the Python fields'. Written here rather than taken from ``HfArgumentParser``
because the toolkit's CLI is typer, whose help pages and errors the other commands already use.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import re
import types
import typing
from typing import Annotated, Any, Callable, Optional, Union

import typer


def _cli_type(tp: Any) -> Any:
    """``X | None`` as ``Optional[X]``, which typer understands; other types unchanged."""
    if typing.get_origin(tp) in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(tp)) == 2:
            return Optional[_cli_type(args[0])]
    return tp


def _cli_fields(config_cls: type) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(config_cls) if f.init and f.metadata.get("cli", True) is not False]


def flag_of(f: dataclasses.Field) -> str:
    """How the command line names a config field: its first flag, or the field as ``--kebab-case``."""
    if f.metadata.get("argument"):
        return f.name.upper()
    return f.metadata.get("flags", (f"--{f.name.replace('_', '-')}",))[0]


def warn_deprecated(old: str, new: str) -> None:
    typer.secho(f"warning: {old} is deprecated and will be removed in the next release; use {new}", fg=typer.colors.YELLOW, err=True)


def config_parameters(config_cls: type) -> list[inspect.Parameter]:
    """One keyword-only typer parameter per CLI field of the dataclass ``config_cls``, plus a
    hidden one per deprecated flag (named ``<field>__<n>``)."""
    hints = typing.get_type_hints(config_cls)
    params = []
    for f in _cli_fields(config_cls):
        if not _required(f):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        elif f.metadata.get("deprecated_flags"):
            default = None  # required, but an old spelling may give it: checked when the config is built
        else:
            default = inspect.Parameter.empty
        help_text = f.metadata.get("help")
        if default is None and _required(f):  # typer sees a default: say it all the same
            help_text = f"{help_text}  [required]"
        if f.metadata.get("argument"):
            info = typer.Argument(help=help_text, show_default=default is not inspect.Parameter.empty)
        else:
            info = typer.Option(*f.metadata.get("flags", ()), help=help_text)
        params.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=Annotated[_cli_type(hints[f.name]), info]))
        for n, old in enumerate(f.metadata.get("deprecated_flags", ())):
            hidden = typer.Option(old, hidden=True, help=f"deprecated: use {flag_of(f)}")
            params.append(inspect.Parameter(f"{f.name}__{n}", inspect.Parameter.KEYWORD_ONLY, default=None,
                                            annotation=Annotated[Optional[_cli_type(hints[f.name])], hidden]))  # fmt: skip
    return params


def _required(f: dataclasses.Field) -> bool:
    return f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING


def _in_flags(message: str, fields: list[dataclasses.Field]) -> str:
    """``message`` with each whole-word field name replaced by its flag."""
    for f in sorted(fields, key=lambda f: -len(f.name)):
        message = re.sub(rf"(?<![\w.-]){re.escape(f.name)}(?![\w-])", flag_of(f), message)
    return message


def options_from(config_cls: type, on_error: Callable[[str], Any]) -> Callable:
    """Decorator: the command's options are ``config_cls``'s fields (module docstring) followed by
    the function's own parameters after the first; the function is called with the config built
    from them. A value the config refuses (its ``__post_init__`` raises ``ValueError``) goes to
    ``on_error`` with the message."""
    field_params = config_parameters(config_cls)
    fields = _cli_fields(config_cls)
    names = {p.name for p in field_params}
    by_name = {f.name: f for f in fields}

    def decorate(fn: Callable) -> Callable:
        hints = typing.get_type_hints(fn, include_extras=True)
        own = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY, annotation=hints.get(p.name, p.annotation))
               for p in list(inspect.signature(fn).parameters.values())[1:]]  # fmt: skip
        clash = names & {p.name for p in own}
        if clash:
            raise TypeError(f"{fn.__name__}: parameter(s) {sorted(clash)} are also fields of {config_cls.__name__}")

        @functools.wraps(fn)
        def command(**kwargs: Any) -> Any:
            values = {name: kwargs.pop(name) for name in list(kwargs) if name in names}
            for key in [k for k in values if "__" in k]:
                value, name = values.pop(key), key.split("__")[0]
                if value is None:
                    continue
                f = by_name[name]
                old = f.metadata["deprecated_flags"][int(key.split("__")[1])]
                warn_deprecated(old, flag_of(f))
                values[name] = value
            missing = [flag_of(by_name[n]) for n, v in values.items() if v is None and _required(by_name[n])]
            if missing:
                return on_error(f"missing option {', '.join(missing)}")
            try:
                config = config_cls(**values)
            except ValueError as err:
                return on_error(_in_flags(str(err), fields))
            return fn(config, **kwargs)

        params = field_params + own
        command.__signature__ = inspect.Signature(params)
        command.__annotations__ = {p.name: p.annotation for p in params}
        del command.__wrapped__  # typer must see the signature above, not the function's
        return command

    return decorate
