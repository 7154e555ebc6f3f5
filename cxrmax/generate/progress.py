"""Progress of a generation run: a rich live display, or plain log lines with --quiet."""

from __future__ import annotations

import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Protocol


@dataclass
class RunStats:
    """Counters of one run, updated by the orchestrator."""

    total: int = 0  # requests this run has to do
    already_done: int = 0  # keys found in committed shards at start
    skipped_failed: int = 0  # permanent failures skipped (use --retry-failed)
    done: int = 0
    failed: int = 0
    length: int = 0  # answers cut at max_tokens (finish_reason "length")
    retries: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    recovered: int = 0  # answers recovered from a killed run's journal
    errors: Counter[str] = field(default_factory=Counter)
    started: float = field(default_factory=time.monotonic)
    finished: float | None = None

    @property
    def elapsed(self) -> float:
        return (self.finished or time.monotonic()) - self.started

    @property
    def requests_per_s(self) -> float:
        return self.done / self.elapsed if self.elapsed > 0 else 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.completion_tokens / self.elapsed if self.elapsed > 0 else 0.0

    @property
    def remaining(self) -> int:
        return max(0, self.total - self.done - self.failed)

    def eta_s(self) -> float | None:
        rate = (self.done + self.failed) / self.elapsed if self.elapsed > 0 else 0
        return self.remaining / rate if rate > 0 else None

    def as_dict(self) -> dict[str, Any]:
        return {
            "total": self.total,
            "already_done": self.already_done,
            "skipped_failed": self.skipped_failed,
            "done": self.done,
            "failed": self.failed,
            "length": self.length,
            "retries": self.retries,
            "recovered": self.recovered,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "errors": dict(self.errors),
            "elapsed_s": round(self.elapsed, 3),
            "requests_per_s": round(self.requests_per_s, 2),
        }


def _format_eta(seconds: float | None) -> str:
    if seconds is None:
        return "--:--"
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60:02d}:{rest % 60:02d}"


def status_line(stats: RunStats) -> str:
    errors = ", ".join(f"{k} {v}" for k, v in stats.errors.most_common(3))
    return (
        f"{stats.done + stats.failed}/{stats.total} done={stats.done} failed={stats.failed} length={stats.length} "
        f"retries={stats.retries} {stats.requests_per_s:.1f} req/s {stats.tokens_per_s:.0f} tok/s "
        f"ETA {_format_eta(stats.eta_s())}" + (f" errors: {errors}" if errors else "")
    )


class ProgressReporter(Protocol):
    def start(self, stats: RunStats, title: str) -> None: ...
    def update(self, stats: RunStats) -> None: ...
    def stop(self, stats: RunStats) -> None: ...


class NullProgress:
    """No output (library use)."""

    def start(self, stats: RunStats, title: str) -> None:
        pass

    def update(self, stats: RunStats) -> None:
        pass

    def stop(self, stats: RunStats) -> None:
        pass


class PlainProgress:
    """A log line to stderr every ``interval`` seconds (--quiet, or output that is not a terminal)."""

    def __init__(self, interval: float = 10.0, stream: Any = None):
        self.interval = interval
        self.stream = stream or sys.stderr
        self._last = 0.0
        self._title = ""

    def start(self, stats: RunStats, title: str) -> None:
        self._title = title
        self._last = time.monotonic()
        print(
            f"{title}: {stats.total} requests to do, {stats.already_done} already done"
            + (
                f", {stats.skipped_failed} failed before (skipped; --retry-failed retries them)"
                if stats.skipped_failed
                else ""
            ),
            file=self.stream,
            flush=True,
        )

    def update(self, stats: RunStats) -> None:
        now = time.monotonic()
        if now - self._last >= self.interval:
            self._last = now
            print(f"{self._title}: {status_line(stats)}", file=self.stream, flush=True)

    def stop(self, stats: RunStats) -> None:
        pass


class RichProgress:
    """A rich live bar: done/total, requests/s, tokens/s, failures, ETA."""

    def __init__(self, console: Any = None):
        from cxrmax.core.terminal import make_console

        self.console = console or make_console(stderr=True)
        self._progress: Any = None
        self._task: Any = None

    def start(self, stats: RunStats, title: str) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self._progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[rate]}"),
            TextColumn("[red]{task.fields[failures]}"),
            TimeElapsedColumn(),
            TextColumn("ETA {task.fields[eta]}"),
            console=self.console,
            refresh_per_second=4,
        )
        self._progress.start()
        if stats.already_done or stats.skipped_failed:
            self.console.print(
                f"{title}: {stats.already_done} already done"
                + (
                    f", {stats.skipped_failed} failed before (skipped; --retry-failed retries them)"
                    if stats.skipped_failed
                    else ""
                )
            )
        self._task = self._progress.add_task(title, total=stats.total, rate="", failures="", eta="--:--")

    def update(self, stats: RunStats) -> None:
        if self._progress is None:
            return
        self._progress.update(
            self._task,
            completed=stats.done + stats.failed,
            rate=f"{stats.requests_per_s:.1f} req/s {stats.tokens_per_s:.0f} tok/s",
            failures=f"{stats.failed} failed" if stats.failed else "",
            eta=_format_eta(stats.eta_s()),
        )

    def stop(self, stats: RunStats) -> None:
        if self._progress is not None:
            self.update(stats)
            self._progress.stop()
            self._progress = None
