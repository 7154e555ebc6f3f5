"""The one way cxrmax makes a rich console.

Rich lays text out at the terminal's width, and at 80 columns when the stream is not a terminal (a
log file, a CI job, a pipe). Folding there breaks one-line errors and paths mid-word
("sa\\nmples.arrow"), which defeats grep and anyone reading the log. So text is never wrapped when the
stream is not a terminal; on a terminal rich wraps as usual. Tables and progress bars still lay out
to the console width either way."""

from __future__ import annotations

from typing import Any

from rich.console import Console


class CxrmaxConsole(Console):
    """A rich Console whose ``print`` soft-wraps (never inserts line breaks) off a terminal."""

    def print(self, *objects: Any, soft_wrap: bool | None = None, **kwargs: Any) -> None:  # type: ignore[override]
        if soft_wrap is None:
            soft_wrap = True if not self.is_terminal else None
        super().print(*objects, soft_wrap=soft_wrap, **kwargs)


def make_console(*, stderr: bool = False, **kwargs: Any) -> Console:
    """A console on stdout (or stderr) that resolves the stream at print time (so test runners that
    swap ``sys.stdout`` see the output) and never wraps text when the stream is not a terminal."""
    return CxrmaxConsole(stderr=stderr, **kwargs)
