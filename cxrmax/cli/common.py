"""Helpers shared by CLI modules: one console, one way to turn library errors into clean exits."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import typer
from rich.markup import escape

from cxrmax.core.errors import CxrmaxError
from cxrmax.core.terminal import make_console

console = make_console()
err_console = make_console(stderr=True)


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Turn CxrmaxError (and its subclasses) into a one-line red message and exit code 2.

    The message is printed literally: it quotes file names, column names and cell values from the
    user's files, and rich markup would swallow ``[v2]`` in ``preds[v2].csv`` or a column ``[bold]``."""
    try:
        yield
    except CxrmaxError as exc:
        err_console.print(f"[bold red]error:[/] {escape(str(exc))}")
        raise typer.Exit(2) from None
