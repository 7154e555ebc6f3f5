"""A process pool that an interruption tears down at once: Ctrl-C and SIGTERM reach the parent only,
and on any exception the workers are killed before the pool is shut down, so the interpreter's exit
does not wait on a worker still training (the hang of issue 16)."""

from __future__ import annotations

import contextlib
import multiprocessing
import signal
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor


@contextlib.contextmanager
def sigint_blocked() -> Iterator[None]:
    """Block SIGINT in this thread while worker processes start: a child starts with its parent's
    signal mask, so the workers never see the terminal's Ctrl-C (which goes to the whole process
    group) and the parent alone turns it into one clean exit. A Ctrl-C in the window is delivered to
    the parent when the block ends, not lost."""
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


@contextlib.contextmanager
def spawn_pool(workers: int, initializer: Callable[[], None] | None = None) -> Iterator[ProcessPoolExecutor]:
    """A ``spawn`` ProcessPoolExecutor of ``workers`` processes whose workers ignore Ctrl-C and are
    killed when the block raises (KeyboardInterrupt included); submit its work inside
    :func:`sigint_blocked` so that processes started on demand inherit the blocked SIGINT."""
    context = multiprocessing.get_context("spawn")
    pool = ProcessPoolExecutor(workers, mp_context=context, initializer=initializer)
    try:
        yield pool
    except BaseException:
        # shutdown() alone waits for running tasks; a worker mid-training would hold the exit.
        for process in list((pool._processes or {}).values()):  # noqa: SLF001 - no public handle
            with contextlib.suppress(Exception):
                process.kill()
        pool.shutdown(wait=True, cancel_futures=True)
        raise
    pool.shutdown(wait=True)
