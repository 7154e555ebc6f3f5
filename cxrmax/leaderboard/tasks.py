"""Versioned leaderboard task definitions (benchmark/tasks/*.toml) and the published reference rows
(benchmark/published/*.toml).

A task file names its kind (labels | report | ms-cxr-t | rationale), a version (stored with every
board entry, so scores from different task versions are never ranked together silently), the
primary metric used for ranking and the headline metrics shown in tables. Integrity settings:
``min_coverage`` (default 1.0: an entry is ranked only when it covers every scored id of the task),
``missing_answers`` ("wrong": a reference row or cell the submission does not answer counts as a
wrong answer; "skip": it leaves the denominator) and ``reference_sha256`` (the content hash of the
official references, see `cxrmax.leaderboard.fingerprint`).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomllib

from cxrmax.core.errors import CxrmaxError, InputError, where

TASK_KINDS = ("labels", "report", "ms-cxr-t", "rationale")


def benchmark_dir() -> Path:
    """The benchmark/ folder holding tasks/ and published/. `CXRMAX_BENCHMARK_DIR` overrides the
    default (the repository's benchmark/ next to the cxrmax package)."""
    override = os.environ.get("CXRMAX_BENCHMARK_DIR")
    if override:
        return Path(override)
    return Path(__file__).resolve().parents[2] / "benchmark"


@dataclass(frozen=True)
class Task:
    """One leaderboard task, as loaded from its TOML definition."""

    name: str
    version: str
    kind: str
    description: str
    primary_metric: str
    headline: tuple[str, ...]
    higher_is_better: bool = True
    split: str = "test"
    reference_source: str = "chexpert"
    reference_section: str = "findings"
    reference_file: str | None = None
    published: str | None = None
    min_coverage: float = 1.0
    missing_answers: str = "skip"
    reference_sha256: str | None = None
    path: Path | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def key(self) -> str:
        """``name@version`` as stored on the board."""
        return f"{self.name}@{self.version}"


_KNOWN_KEYS = {
    "name",
    "version",
    "kind",
    "description",
    "primary_metric",
    "headline",
    "higher_is_better",
    "split",
    "reference_source",
    "reference_section",
    "reference_file",
    "published",
    "min_coverage",
    "missing_answers",
    "reference_sha256",
}


def load_task_file(path: str | Path) -> Task:
    """Parse one task TOML file. Raises InputError naming the file and field when it is malformed."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"{where(path)}: cannot read task definition: {exc}") from None
    for required in ("name", "version", "kind", "primary_metric"):
        if required not in data:
            raise InputError(f"{where(path, field=required)}: missing in task definition")
    for key in (
        "name",
        "kind",
        "primary_metric",
        "description",
        "split",
        "reference_source",
        "reference_section",
    ):
        if key in data and not isinstance(data[key], str):
            raise InputError(f"{where(path, field=key)}: expected a string, got {data[key]!r}")
    if not isinstance(data["version"], (str, int, float)) or isinstance(data["version"], bool):
        raise InputError(
            f'{where(path, field="version")}: expected a version such as "1.0", got {data["version"]!r}'
        )
    if data["kind"] not in TASK_KINDS:
        raise InputError(
            f"{where(path, field='kind')}: {data['kind']!r} is not one of {', '.join(TASK_KINDS)}"
        )
    headline = data.get("headline", [data["primary_metric"]])
    # A bare string would become a tuple of its characters: require a list of metric names.
    if not isinstance(headline, list) or not all(isinstance(h, str) for h in headline) or not headline:
        raise InputError(
            f"{where(path, field='headline')}: expected a list of metric names, got {headline!r}"
        )
    higher = data.get("higher_is_better", True)
    if not isinstance(higher, bool):  # bool("false") is True
        raise InputError(f"{where(path, field='higher_is_better')}: expected true or false, got {higher!r}")
    min_coverage = data.get("min_coverage", 1.0)
    if (
        isinstance(min_coverage, bool)
        or not isinstance(min_coverage, (int, float))
        or not 0 < min_coverage <= 1
    ):
        raise InputError(
            f"{where(path, field='min_coverage')}: expected a fraction in (0, 1], got {min_coverage!r}"
        )
    missing_answers = data.get("missing_answers", "skip")
    if missing_answers not in ("wrong", "skip"):
        raise InputError(
            f'{where(path, field="missing_answers")}: expected "wrong" or "skip", got {missing_answers!r}'
        )
    for key in ("reference_file", "published", "reference_sha256"):
        if data.get(key) is not None and not isinstance(data[key], str):
            raise InputError(f"{where(path, field=key)}: expected a file name, got {data[key]!r}")
    return Task(
        name=data["name"],
        version=str(data["version"]),
        kind=data["kind"],
        description=data.get("description", ""),
        primary_metric=data["primary_metric"],
        headline=tuple(headline),
        higher_is_better=higher,
        split=str(data.get("split", "test")),
        reference_source=str(data.get("reference_source", "chexpert")),
        reference_section=str(data.get("reference_section", "findings")),
        reference_file=data.get("reference_file"),
        published=data.get("published"),
        min_coverage=float(min_coverage),
        missing_answers=missing_answers,
        reference_sha256=data.get("reference_sha256") or None,
        path=path,
        extra={k: v for k, v in data.items() if k not in _KNOWN_KEYS},
    )


def list_tasks(directory: str | Path | None = None) -> dict[str, Task]:
    """All task definitions by name (benchmark/tasks/*.toml)."""
    directory = Path(directory) if directory else benchmark_dir() / "tasks"
    if not directory.is_dir():
        raise CxrmaxError(f"task definitions not found: {directory} (set CXRMAX_BENCHMARK_DIR)")
    tasks = {}
    for path in sorted(directory.glob("*.toml")):
        task = load_task_file(path)
        tasks[task.name] = task
    return tasks


def get_task(task: str | Task) -> Task:
    """Resolve a task by name (``mimic-cxr-labels``), by ``name@version`` or by TOML path."""
    if isinstance(task, Task):
        return task
    if task.endswith(".toml"):
        if not Path(task).is_file():
            raise InputError(f"{where(task)}: task definition file not found")
        return load_task_file(task)
    name, _, version = task.partition("@")
    tasks = list_tasks()
    if name not in tasks:
        raise CxrmaxError(f"unknown task {name!r}; known: {', '.join(sorted(tasks))}")
    found = tasks[name]
    if version and version != found.version:
        raise CxrmaxError(f"task {name!r} is at version {found.version}, not {version}")
    return found


@dataclass(frozen=True)
class PublishedRow:
    """One published result: shown beside board entries as "published, not re-scored"."""

    name: str
    group: str
    metrics: dict[str, float]
    source: str
    note: str = "published, not re-scored"


def published_rows(task: str | Task) -> list[PublishedRow]:
    """The published reference rows of a task (empty when it has none)."""
    task = get_task(task)
    if not task.published:
        return []
    path = benchmark_dir() / "published" / task.published
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"{where(path)}: cannot read published results: {exc}") from None
    rows = []
    entries = data.get("rows", [])
    if not isinstance(entries, list):
        raise InputError(f"{where(path, field='rows')}: expected [[rows]] tables")
    for index, row in enumerate(entries, start=1):
        metrics = row.get("metrics") if isinstance(row, dict) else None
        if not isinstance(metrics, dict) or "name" not in row:
            raise InputError(f"{where(path, row=index, field='metrics')}: each row needs name and metrics")
        for metric, value in metrics.items():
            # Published numbers are finite numbers; "n/a" or a boolean is a typo, not a score.
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise InputError(
                    f"{where(path, row=index, field=f'metrics.{metric}')}: {value!r} is not a number "
                    "(leave a metric out when the paper does not report it)"
                )
        rows.append(
            PublishedRow(
                name=str(row["name"]),
                group=str(row.get("group", "")),
                metrics={k: float(v) for k, v in metrics.items()},
                source=str(data.get("source", "")),
                note=str(data.get("note", "published, not re-scored")),
            )
        )
    return rows
