"""The one way cxrmax makes a rich console.

Rich lays text out at the terminal's width, and at 80 columns when the stream is not a terminal (a
log file, a CI job, a pipe). Folding there breaks one-line errors and paths mid-word
("sa\\nmples.arrow"), which defeats grep and anyone reading the log. So text is never wrapped when the
stream is not a terminal; on a terminal rich wraps as usual. Tables and progress bars still lay out
to the console width either way."""

from __future__ import annotations

import re
from typing import Any

from rich.console import Console
from rich.markup import escape

#: Characters a terminal obeys rather than shows (newlines, ESC sequences, bells, line separators).
CONTROL_CHARACTERS = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def visible(text: Any) -> str:
    """User text (a file name, an entry or model name, a note quoting a cell) as it is shown: each
    control character written as its escape (``\\n``, ``\\x1b``), so that it can neither break a
    table row nor drive the terminal."""
    return CONTROL_CHARACTERS.sub(lambda m: repr(m.group())[1:-1], str(text))


def markup_safe(text: Any) -> str:
    """User text for a rich console: :func:`visible`, with markup escaped (``preds[v2].csv`` or an
    entry named ``[bold]x`` is printed as written, not styled)."""
    return escape(visible(text))


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
