"""Messages off a terminal are never wrapped, whatever the width rich believes it has."""

import io

from cxrmax.core.terminal import make_console

LONG = "error: " + "/tmp/pytest-of-root/pytest-12/test_x0/data/annotations/samples.arrow is corrupt " * 3


def test_off_a_terminal_a_long_message_stays_one_line():
    out = io.StringIO()
    console = make_console(file=out, width=20)
    console.print(LONG)
    assert out.getvalue() == LONG + "\n"


def test_on_a_terminal_rich_wraps_as_usual():
    out = io.StringIO()
    console = make_console(file=out, width=20, force_terminal=True, color_system=None)
    console.print(LONG)
    assert out.getvalue().count("\n") > 3


def test_an_explicit_soft_wrap_choice_is_kept():
    out = io.StringIO()
    console = make_console(file=out, width=20)
    console.print(LONG, soft_wrap=False)
    assert out.getvalue().count("\n") > 3
