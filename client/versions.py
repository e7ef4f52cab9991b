"""`--version` for the console scripts: this package's version and its key libraries', read
from the installed distributions' metadata, so nothing heavy (TensorFlow) is imported."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import click

PACKAGE = "digit-recognizer"


def installed(*names: str) -> str | None:
    """`name version` for the first of `names` that is installed (tensorflow-cpu or
    tensorflow), else None."""
    from importlib.metadata import PackageNotFoundError, version

    for name in names:
        try:
            return f"{name} {version(name)}"
        except PackageNotFoundError:
            continue
    return None


def version_line(program: str, *libraries: str) -> str:
    """`digit-client 0.1.0 (grpcio 1.85.4, protobuf 6.31.1, Python 3.11.9)`. A library
    given as "a|b" is whichever of a and b is installed."""
    own = installed(PACKAGE)
    found = []
    for library in libraries:
        names = library.split("|")
        found.append(installed(*names) or f"{names[-1]} not installed")
    python = ".".join(map(str, sys.version_info[:3]))
    version = own.removeprefix(f"{PACKAGE} ") if own else "(not installed)"
    return f"{program} {version} ({', '.join([*found, f'Python {python}'])})"


def version_option(program: str, *libraries: str) -> Callable[[Any], Any]:
    """--version: print `version_line(program, *libraries)` and exit."""

    def show(ctx: click.Context, _param: click.Parameter, value: bool) -> None:
        if not value or ctx.resilient_parsing:
            return
        click.echo(version_line(program, *libraries))
        ctx.exit()

    return click.option(
        "--version",
        is_flag=True,
        expose_value=False,
        is_eager=True,
        allow_from_autoenv=False,  # DIGITS_VERSION is no reason to print this and stop
        callback=show,
        help="Print the versions of this program and its libraries, then exit.",
    )
