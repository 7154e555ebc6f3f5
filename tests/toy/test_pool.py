"""cxrmax.toy.pool.run_jobs: priorities, follow-up jobs, worker processes, failures."""

from __future__ import annotations

import os

import pytest

from cxrmax.toy.pool import Job, run_jobs


def _square(value: int) -> tuple[int, int]:
    return value * value, os.getpid()


def _fail(value: int) -> None:
    raise RuntimeError(f"job {value} failed")


def _graph(log: list) -> tuple[list[Job], object]:
    """Three roots (one urgent), each of whose results gets a low-priority follow-up."""
    roots = [
        Job(_square, 2, "a", priority=1),
        Job(_square, 3, "b", priority=0),
        Job(_square, 4, "c", priority=1),
    ]

    def follow(key, result):
        log.append(key)
        return [Job(_square, result[0], f"{key}2", priority=5)] if len(key) == 1 else []

    return roots, follow


def test_in_process_jobs_run_by_priority_then_order_and_follow_ups_wait_their_turn():
    log: list = []
    roots, follow = _graph(log)
    results = run_jobs(roots, follow, workers=1)
    assert log == ["b", "a", "c", "b2", "a2", "c2"]
    assert {k: v[0] for k, v in results.items()} == {"a": 4, "b": 9, "c": 16, "a2": 16, "b2": 81, "c2": 256}
    assert {v[1] for v in results.values()} == {os.getpid()}


def test_worker_processes_give_the_same_results():
    log: list = []
    roots, follow = _graph(log)
    results = run_jobs(roots, follow, workers=2)
    assert {k: v[0] for k, v in results.items()} == {"a": 4, "b": 9, "c": 16, "a2": 16, "b2": 81, "c2": 256}
    pids = {v[1] for v in results.values()}
    assert os.getpid() not in pids and 1 <= len(pids) <= 2
    assert sorted(log) == ["a", "a2", "b", "b2", "c", "c2"]


@pytest.mark.parametrize("workers", [1, 2])
def test_a_failing_job_raises_its_error_and_a_repeated_key_is_refused(workers):
    with pytest.raises(RuntimeError, match="job 7 failed"):
        run_jobs([Job(_square, 1, "ok"), Job(_fail, 7, "bad")], workers=workers)
    with pytest.raises(ValueError, match="share the key 'x'"):
        run_jobs([Job(_square, 1, "x"), Job(_square, 2, "x")], workers=workers)
