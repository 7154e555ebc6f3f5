"""The persistent leaderboard: an SQLite file.

- One transaction per submit (BEGIN IMMEDIATE ... COMMIT): an entry and its metric rows land together
  or not at all, so the store never holds a partial entry.
- WAL journal + a busy timeout: several processes submitting at once queue on the write lock and all
  land.
- Each entry keeps the submission's sha256: the same file submitted twice to a task is refused with a
  message naming the earlier entry.
- The task version, the uncertain policy, a UTC timestamp, model info and the full score JSON are
  stored with every entry.
- A file that is not a readable SQLite database (or not a cxrmax board) gives a clear error, never a
  traceback.
"""

from __future__ import annotations

import json
import math
import os
import sqlite3
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from cxrmax.core.errors import CxrmaxError

STORE_FORMAT = "cxrmax-leaderboard"
SCHEMA_VERSION = "1"
BUSY_TIMEOUT_MS = 60_000

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS entries (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    task TEXT NOT NULL,
    task_version TEXT NOT NULL,
    name TEXT NOT NULL,
    model_info TEXT,
    submission_sha256 TEXT NOT NULL,
    submission_file TEXT,
    uncertain TEXT NOT NULL,
    primary_metric TEXT NOT NULL,
    primary_value REAL,
    coverage REAL,
    n_scored INTEGER,
    created_at TEXT NOT NULL,
    result_json TEXT NOT NULL,
    UNIQUE (task, submission_sha256)
);
CREATE TABLE IF NOT EXISTS entry_metrics (
    entry_id INTEGER NOT NULL REFERENCES entries(id) ON DELETE CASCADE,
    metric TEXT NOT NULL,
    value REAL CHECK (value IS NULL OR typeof(value) IN ('real', 'integer')),
    ci_low REAL,
    ci_high REAL,
    PRIMARY KEY (entry_id, metric)
);
CREATE INDEX IF NOT EXISTS entries_task ON entries(task);
"""


class StoreError(CxrmaxError):
    """The leaderboard store cannot be used (corrupted, not a board, locked for too long)."""


class DuplicateSubmission(CxrmaxError):
    """The same submission file (same sha256) is already on the board for this task."""


def default_store_path() -> Path:
    """`CXRMAX_LEADERBOARD` or ~/.cxrmax/leaderboard.sqlite."""
    return Path(os.environ.get("CXRMAX_LEADERBOARD", "~/.cxrmax/leaderboard.sqlite")).expanduser()


@dataclass
class Entry:
    """One scored submission on the board."""

    id: int
    task: str
    task_version: str
    name: str
    model_info: dict[str, Any]
    sha256: str
    submission_file: str | None
    uncertain: str
    primary_metric: str
    primary_value: float | None
    coverage: float | None
    n_scored: int | None
    created_at: str
    metrics: dict[str, float | None]
    ci: dict[str, tuple[float, float]]
    result: dict[str, Any]


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class Board:
    """A leaderboard store at ``path`` (created on first use)."""

    def __init__(self, path: str | Path | None = None):
        self.path = Path(path) if path is not None else default_store_path()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._conn = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None)
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open leaderboard store {self.path}: {exc}") from None
        try:
            self._conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            self._conn.execute("PRAGMA foreign_keys = ON")
            mode = self._conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise StoreError(f"leaderboard store {self.path}: cannot switch to WAL mode (got {mode})")
            check = self._conn.execute("PRAGMA quick_check").fetchone()[0]
            if check != "ok":
                raise sqlite3.DatabaseError(f"integrity check failed: {check}")
            self._init_schema()
        except sqlite3.DatabaseError as exc:
            self._conn.close()
            if isinstance(exc, sqlite3.OperationalError) and "locked" in str(exc):
                raise StoreError(
                    f"leaderboard store {self.path} stayed locked for {BUSY_TIMEOUT_MS // 1000} s: {exc}"
                ) from None
            raise StoreError(
                f"leaderboard store {self.path} is corrupted or not an SQLite database ({exc}); "
                "move it aside (or restore a backup) and submit again"
            ) from None

    def _init_schema(self) -> None:
        tables = {row[0] for row in self._conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        if tables and "meta" not in tables:
            raise StoreError(
                f"{self.path} is an SQLite file but not a cxrmax leaderboard store (tables: {', '.join(sorted(tables))})"
            )
        if "meta" in tables:
            meta = dict(self._conn.execute("SELECT key, value FROM meta"))
            if meta.get("format") != STORE_FORMAT:
                raise StoreError(
                    f"{self.path} is not a cxrmax leaderboard store (format {meta.get('format')!r})"
                )
            if meta.get("schema_version") != SCHEMA_VERSION:
                raise StoreError(
                    f"{self.path}: store schema version {meta.get('schema_version')} is not supported (expected {SCHEMA_VERSION})"
                )
            return
        self._conn.execute("BEGIN IMMEDIATE")
        try:
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    self._conn.execute(statement)
            self._conn.execute(
                "INSERT OR IGNORE INTO meta VALUES ('format', ?), ('schema_version', ?)",
                (STORE_FORMAT, SCHEMA_VERSION),
            )
            self._conn.execute("COMMIT")
        except BaseException:
            self._conn.execute("ROLLBACK")
            raise

    def close(self) -> None:
        """Close the connection."""
        self._conn.close()

    def __enter__(self) -> Board:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def find(self, task: str, sha256: str) -> Entry | None:
        """The entry holding this submission for this task, if any."""
        row = self._conn.execute(
            "SELECT * FROM entries WHERE task = ? AND submission_sha256 = ?", (task, sha256)
        ).fetchone()
        return self._entry(row) if row else None

    def submit(self, result: Any, name: str, model_info: dict[str, Any] | None = None) -> int:
        """Store a ScoreResult as one entry (atomically) and return its id.

        Raises DuplicateSubmission when the same file (sha256) is already on the board for the task."""
        if not name.strip():
            raise CxrmaxError("an entry needs a non-empty --name")
        data = result.to_dict()
        created = datetime.now(timezone.utc).isoformat(timespec="seconds")
        try:
            self._conn.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as exc:
            raise StoreError(f"leaderboard store {self.path} is busy: {exc}") from None
        try:
            existing = self.find(result.task, result.sha256)
            if existing is not None:
                raise DuplicateSubmission(
                    f"this submission (sha256 {result.sha256[:12]}...) is already on the {result.task} board as "
                    f"entry {existing.id} {existing.name!r} ({existing.created_at})"
                )
            cursor = self._conn.execute(
                "INSERT INTO entries (task, task_version, name, model_info, submission_sha256, submission_file, uncertain, "
                "primary_metric, primary_value, coverage, n_scored, created_at, result_json) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",
                (
                    result.task,
                    result.task_version,
                    name,
                    json.dumps(model_info or {}),
                    result.sha256,
                    Path(result.submission).name,
                    result.uncertain,
                    result.primary_metric,
                    _finite(result.primary_value),
                    result.coverage,
                    result.n_scored,
                    created,
                    json.dumps(data),
                ),
            )
            entry_id = int(cursor.lastrowid)
            for metric, value in result.headline.items():
                low, high = result.ci.get(metric, (None, None))
                self._conn.execute(
                    "INSERT INTO entry_metrics (entry_id, metric, value, ci_low, ci_high) VALUES (?,?,?,?,?)",
                    (entry_id, metric, _finite(value), _finite(low), _finite(high)),
                )
            self._conn.execute("COMMIT")
            return entry_id
        except BaseException:
            self._conn.execute("ROLLBACK")
            raise

    def entries(self, task: str | None = None) -> list[Entry]:
        """All entries (of one task), oldest first."""
        if task is None:
            rows = self._conn.execute("SELECT * FROM entries ORDER BY id").fetchall()
        else:
            rows = self._conn.execute("SELECT * FROM entries WHERE task = ? ORDER BY id", (task,)).fetchall()
        return [self._entry(row) for row in rows]

    def ranked(self, task: str, higher_is_better: bool = True) -> list[Entry]:
        """Entries of a task, best first by its primary metric (entries without a value last)."""
        entries = self.entries(task)
        sign = -1 if higher_is_better else 1
        return sorted(entries, key=lambda e: (e.primary_value is None, sign * (e.primary_value or 0.0), e.id))

    def count(self) -> int:
        """Number of entries."""
        return int(self._conn.execute("SELECT COUNT(*) FROM entries").fetchone()[0])

    def _entry(self, row: tuple) -> Entry:
        cols = [d[0] for d in self._conn.execute("SELECT * FROM entries LIMIT 0").description]
        data = dict(zip(cols, row, strict=True))
        metric_rows = self._conn.execute(
            "SELECT metric, value, ci_low, ci_high FROM entry_metrics WHERE entry_id = ?", (data["id"],)
        ).fetchall()
        return Entry(
            id=data["id"],
            task=data["task"],
            task_version=data["task_version"],
            name=data["name"],
            model_info=json.loads(data["model_info"] or "{}"),
            sha256=data["submission_sha256"],
            submission_file=data["submission_file"],
            uncertain=data["uncertain"],
            primary_metric=data["primary_metric"],
            primary_value=data["primary_value"],
            coverage=data["coverage"],
            n_scored=data["n_scored"],
            created_at=data["created_at"],
            metrics={m: v for m, v, _, _ in metric_rows},
            ci={m: (lo, hi) for m, _, lo, hi in metric_rows if lo is not None and hi is not None},
            result=json.loads(data["result_json"]),
        )
