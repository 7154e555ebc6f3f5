"""A process pool that an interruption tears down at once: Ctrl-C and SIGTERM reach the parent only,
and on any exception the workers are stopped before the pool is shut down, so the interpreter's exit
does not wait on a worker still training (the hang of issue 16)."""

from __future__ import annotations

import contextlib
import heapq
import itertools
import multiprocessing
import multiprocessing.util
import os
import signal
import time
from collections.abc import Callable, Hashable, Iterable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass
from typing import Any

#: Seconds stopped workers get to exit on SIGTERM before they are killed.
STOP_SECONDS = 5.0


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


def _end_worker(signum: int, frame: object) -> None:
    # Release this worker's named semaphores (torch and datasets make some) before exiting: a worker
    # killed outright leaves them to the resource tracker, which then warns on the user's terminal.
    multiprocessing.util._run_finalizers(0)  # noqa: SLF001 - what a normal worker exit runs
    os._exit(128 + signum)


def _start_worker(initializer: Callable[[], None] | None) -> None:
    signal.signal(signal.SIGTERM, _end_worker)
    if initializer is not None:
        initializer()


def _stop_workers(pool: ProcessPoolExecutor) -> None:
    """SIGTERM every worker, wait up to STOP_SECONDS, then kill what is left."""
    processes = list((pool._processes or {}).values())  # noqa: SLF001 - no public handle
    for process in processes:
        with contextlib.suppress(Exception):
            process.terminate()
    deadline = time.monotonic() + STOP_SECONDS
    for process in processes:
        process.join(max(0.0, deadline - time.monotonic()))
        if process.is_alive():
            process.kill()
            process.join()


@contextlib.contextmanager
def spawn_pool(workers: int, initializer: Callable[[], None] | None = None) -> Iterator[ProcessPoolExecutor]:
    """A ``spawn`` ProcessPoolExecutor of ``workers`` processes whose workers are stopped when the
    block raises (KeyboardInterrupt included); give it work with :func:`pool_map`, which starts the
    processes so that they leave Ctrl-C to this one. ``initializer`` must be picklable."""
    context = multiprocessing.get_context("spawn")
    pool = ProcessPoolExecutor(
        workers, mp_context=context, initializer=_start_worker, initargs=(initializer,)
    )
    try:
        yield pool
    except BaseException:
        # shutdown() alone waits for running tasks; a worker mid-training would hold the exit.
        # Not cancel_futures: the pool, broken by the stopped workers, fails every pending future
        # itself (cancelling them first makes Python 3.11's manager thread raise InvalidStateError).
        _stop_workers(pool)
        pool.shutdown(wait=True)
        raise
    pool.shutdown(wait=True)


def submit(pool: ProcessPoolExecutor, fn: Callable[[Any], Any], item: Any) -> Future:
    """``pool.submit(fn, item)`` with SIGINT blocked, for work submitted as earlier work finishes: a
    submit may start a worker process, which must start with the block (see :func:`sigint_blocked`)."""
    with sigint_blocked():
        return pool.submit(fn, item)


def pool_map(pool: ProcessPoolExecutor, fn: Callable[[Any], Any], items: Iterable[Any]) -> Iterator[Any]:
    """``fn`` over ``items`` in ``pool``, results in input order. Unlike Executor.map, an interrupted
    loop does not cancel the futures: Python 3.11's pool, broken by the stopped workers, then raises
    InvalidStateError from its manager thread on every cancelled one. The work is submitted with
    SIGINT blocked: the workers start then, and keep the block (see :func:`sigint_blocked`)."""
    with sigint_blocked():
        futures = [pool.submit(fn, item) for item in items]
    for future in futures:
        yield future.result()


@dataclass(frozen=True)
class Job:
    """One piece of work for :func:`run_jobs`: ``fn(arg)`` in a worker (both picklable), its result
    filed under ``key``. Lower ``priority`` starts first; among equals, the order given."""

    fn: Callable[[Any], Any]
    arg: Any
    key: Hashable
    priority: int = 0


def run_jobs(
    jobs: Sequence[Job],
    follow: Callable[[Hashable, Any], Sequence[Job]] | None = None,
    workers: int = 1,
    initializer: Callable[[], None] | None = None,
) -> dict[Hashable, Any]:
    """Run ``jobs``, and the jobs ``follow(key, result)`` returns as each one finishes, on ``workers``
    :func:`spawn_pool` processes (in this process when 1); returns key -> result.

    At most ``workers`` jobs are in flight, so the next to start is always the most urgent one waiting:
    work that depends on a job waits for it, the rest fills a core that would otherwise idle, and a
    long job given a low priority number is not left to run alone at the end. Each job must be
    deterministic on its own (seeded by its arguments): results never depend on the schedule."""
    counter = itertools.count()
    waiting: list[tuple[int, int, Job]] = []

    def push(more: Iterable[Job]) -> None:
        for job in more:
            heapq.heappush(waiting, (job.priority, next(counter), job))

    def finished(job: Job, result: Any) -> None:
        if job.key in results:
            raise ValueError(f"two jobs share the key {job.key!r}")
        results[job.key] = result
        if follow is not None:
            push(follow(job.key, result))

    results: dict[Hashable, Any] = {}
    push(jobs)
    if workers <= 1:
        while waiting:
            job = heapq.heappop(waiting)[2]
            finished(job, job.fn(job.arg))
        return results
    with spawn_pool(workers, initializer=initializer) as pool:
        running: dict[Future, Job] = {}
        while waiting or running:
            while waiting and len(running) < workers:
                job = heapq.heappop(waiting)[2]
                running[submit(pool, job.fn, job.arg)] = job
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in done:
                finished(running.pop(future), future.result())
    return results
