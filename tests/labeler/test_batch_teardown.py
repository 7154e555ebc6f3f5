"""terminate_pool: a pool torn down on Ctrl-C never hangs the process. Pool.terminate() alone can
wait for ever, e.g. on the task queue's lock when a worker was killed while holding it (SIGTERM sent
to the whole process group), or on a task handler blocked writing a big task to workers that are gone."""

from __future__ import annotations

import multiprocessing
import os
import signal
import threading
import time

import pytest

from cxrmax.labeler.batch import pool_worker_signals, terminate_pool

pytestmark = pytest.mark.skipif("fork" not in multiprocessing.get_all_start_methods(), reason="needs fork")


def _held_lock_pool():
    """A pool whose idle workers were killed (as by a SIGTERM to the process group): the one that
    was waiting for a task held the task queue's lock, and nobody will release it."""
    pool = multiprocessing.get_context("fork").Pool(2, initializer=pool_worker_signals)
    time.sleep(0.5)
    for process in pool._pool:
        os.kill(process.pid, signal.SIGKILL)
    time.sleep(0.3)
    return pool


def test_plain_terminate_hangs_on_a_lock_left_by_a_dead_worker():
    pool = _held_lock_pool()
    stopper = threading.Thread(target=pool.terminate, daemon=True)
    stopper.start()
    stopper.join(2)
    assert stopper.is_alive()  # the hang terminate_pool exists for
    for process in pool._pool:
        process.kill()


def test_terminate_pool_returns_and_leaves_no_worker():
    pool = _held_lock_pool()
    started = time.monotonic()
    terminate_pool(pool, timeout=1.0)
    assert time.monotonic() - started < 5
    time.sleep(0.2)
    assert not any(process.is_alive() for process in pool._pool)
