"""Command-line options made from a config dataclass, so a command's flags and its config cannot drift.

A protocol's config is a dataclass whose fields carry their help text, as transformers' and TRL's
argument dataclasses do: ``field(default=8, metadata={"help": "samples per forward pass"})``. The
decorator :func:`options_from` gives a typer command one option per field (``batch_size`` becomes
``--batch-size``, with the field's type, default and help); ``metadata["flags"]`` names the flags
instead (``("--output", "-o")``), ``metadata["argument"]`` makes the field positional and
``metadata["cli"] = False`` leaves it out. The command function receives the built config as its
first argument, then its own options. Written here rather than taken from ``HfArgumentParser``
because the toolkit's CLI is typer, whose help pages and errors the other commands already use.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
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


def config_parameters(config_cls: type) -> list[inspect.Parameter]:
    """One keyword-only typer parameter per CLI field of the dataclass ``config_cls``."""
    hints = typing.get_type_hints(config_cls)
    params = []
    for f in dataclasses.fields(config_cls):
        if not f.init or f.metadata.get("cli", True) is False:
            continue
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = inspect.Parameter.empty
        help_text = f.metadata.get("help")
        if f.metadata.get("argument"):
            info = typer.Argument(help=help_text, show_default=default is not inspect.Parameter.empty)
        else:
            info = typer.Option(*f.metadata.get("flags", ()), help=help_text)
        params.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=Annotated[_cli_type(hints[f.name]), info]))
    return params


def options_from(config_cls: type, on_error: Callable[[str], Any]) -> Callable:
    """Decorator: the command's options are ``config_cls``'s fields (module docstring) followed by
    the function's own parameters after the first; the function is called with the config built
    from them. A value the config refuses (its ``__post_init__`` raises ``ValueError``) goes to
    ``on_error`` with the message."""
    field_params = config_parameters(config_cls)
    names = {p.name for p in field_params}

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
            try:
                config = config_cls(**values)
            except ValueError as err:
                return on_error(str(err))
            return fn(config, **kwargs)

        params = field_params + own
        command.__signature__ = inspect.Signature(params)
        command.__annotations__ = {p.name: p.annotation for p in params}
        del command.__wrapped__  # typer must see the signature above, not the function's
        return command

    return decorate
