"""Helpers shared by CLI modules: one console, one way to turn library errors and interruptions into
clean exits."""

from __future__ import annotations

import contextlib
import signal
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


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where Ctrl-C would raise KeyboardInterrupt, so that one ``except
    KeyboardInterrupt`` (and every ``finally``) cleans up after both."""

    signum = signal.SIGTERM


def raise_terminated(signum: int, frame: object) -> None:
    """SIGTERM handler: raise :class:`Terminated` (exit 143 where the command reports it)."""
    raise Terminated


#: Signals that arrived inside the current :func:`interruptible` block.
_received: list[int] = []


def _record_and_raise(signum: int, frame: object) -> None:
    _received.append(signum)
    if signum == signal.SIGTERM:
        raise Terminated
    raise KeyboardInterrupt


def raise_if_interrupted() -> None:
    """Raise the interruption again if a signal arrived inside the :func:`interruptible` block but
    its exception never surfaced: CPython drops an exception raised while a finalizer (``__del__``,
    a weakref callback) runs, so a Ctrl-C that lands in one is lost. Call it before a step that
    cannot be taken back (storing an entry), so that a command told to stop does not commit."""
    if _received:
        raise Terminated if _received[-1] == signal.SIGTERM else KeyboardInterrupt


@contextlib.contextmanager
def interruptible(kept: str) -> Iterator[None]:
    """Turn Ctrl-C (SIGINT) and SIGTERM inside the block into ONE line, ``interrupted: <kept>``, and
    exit code 130 (SIGINT) or 143 (SIGTERM), with no traceback.

    ``kept`` says what the interrupted command leaves behind and how to resume, e.g. "nothing was
    written; run the same command again". An interruption that knows better (train-apo's saved
    checkpoint) raises a KeyboardInterrupt carrying its own ``kept`` text and ``signum``. The library
    code under the block tears its worker pools down and removes its staging in ``finally`` blocks;
    a second signal while this line is printed is ignored, so cleanup is not interrupted twice."""
    _received.clear()
    try:
        previous = signal.signal(signal.SIGTERM, _record_and_raise)
        previous_int = signal.signal(signal.SIGINT, _record_and_raise)
    except ValueError:  # not in the main thread (tests calling the app in a thread): no handler
        previous = previous_int = None
    try:
        yield
    except KeyboardInterrupt as exc:
        with contextlib.suppress(ValueError):
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signum = int(getattr(exc, "signum", None) or signal.SIGINT)
        text = getattr(exc, "kept", None) or kept
        err_console.print(f"[yellow]interrupted:[/] {escape(text)}")
        raise typer.Exit(128 + signum) from None
    finally:
        if previous is not None:
            with contextlib.suppress(ValueError):
                signal.signal(signal.SIGTERM, previous)
                signal.signal(signal.SIGINT, previous_int)
