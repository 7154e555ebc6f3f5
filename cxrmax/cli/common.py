"""Helpers shared by CLI modules: one console, one way to turn library errors into clean exits."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import typer
from rich.console import Console

from cxrmax.errors import CxrmaxError

console = Console()
err_console = Console(stderr=True)


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Turn CxrmaxError (and its subclasses) into a one-line red message and exit code 2."""
    try:
        yield
    except CxrmaxError as exc:
        err_console.print(f"[bold red]error:[/] {exc}")
        raise typer.Exit(2) from None
