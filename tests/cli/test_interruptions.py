"""What `interruptible` does with signals, run in a real child process with real signals."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

_CHILD = textwrap.dedent(
    """
    import os, signal, sys
    import typer
    from cxrmax.cli.common import interruptible, raise_if_interrupted

    class SwallowsSignal:
        def __del__(self):
            os.kill(os.getpid(), signal.{signame})
            sum(range(1000))  # Python code runs: the handler raises here, and CPython drops it

    def main():
        with interruptible("nothing was committed"):
            SwallowsSignal()  # its __del__ runs at once (refcount 0)
            print("still running", flush=True)
            {commit}
            print("committed", flush=True)

    typer.run(main)
    """
)


@pytest.mark.parametrize(("signame", "code"), [("SIGINT", 130), ("SIGTERM", 143)])
def test_a_signal_lost_in_a_finalizer_still_stops_the_commit(signame, code):
    script = _CHILD.format(signame=signame, commit="raise_if_interrupted()")
    child = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert "still running" in child.stdout, child.stdout + child.stderr  # the exception was lost...
    assert "committed" not in child.stdout  # ...but the commit point saw the signal
    assert child.returncode == code, child.stdout + child.stderr
    assert child.stderr.strip().splitlines()[-1] == "interrupted: nothing was committed"


def test_without_the_check_a_lost_signal_lets_the_block_finish():
    """The control: what raise_if_interrupted guards against is real CPython behaviour."""
    script = _CHILD.format(signame="SIGINT", commit="pass")
    child = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert "committed" in child.stdout and child.returncode == 0, child.stdout + child.stderr
