"""The persistent leaderboard: an SQLite file.

- One transaction per submit (BEGIN IMMEDIATE ... COMMIT): an entry and its metric rows land together
  or not at all, so the store never holds a partial entry.
- WAL journal + a busy timeout: several processes submitting at once queue on the write lock and all
  land.
- Duplicates are found on what was scored, not on file bytes: each entry keeps the sha256 of its
  canonical predictions (`cxrmax.leaderboard.predictions`) and the same predictions under the same
  uncertain policy (and report section) are refused with a message naming the earlier entry. The
  same predictions under another policy are another entry.
- The predictions themselves are kept in the board, content-addressed (table ``predictions``, keyed
  by that sha256, Arrow IPC + zstd), so `export-predictions` can write any entry for outside scorers.
- Every entry keeps its fingerprint (`cxrmax.leaderboard.fingerprint`); the task's official reference
  hash is pinned in ``meta`` by the first entry scored from a MIMIC-CXR root with the task's own
  settings, unless the task file pins it.
- The task version, the uncertain policy, a UTC timestamp, model info and the full score JSON are
  stored with every entry.
- Schema 1 boards (before fingerprints) are migrated in place on open, in one transaction: their
  entries keep their scores, have no fingerprint and no predictions, and are shown as "scored
  against other/unknown references", never ranked.
- A file that is not a readable SQLite database (or not a cxrmax board) gives a clear error, never a
  traceback.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import sqlite3
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from cxrmax.core.errors import CxrmaxError
from cxrmax.core.terminal import CONTROL_CHARACTERS
from cxrmax.leaderboard import fingerprint
from cxrmax.leaderboard.predictions import Predictions
from cxrmax.leaderboard.tasks import get_task

STORE_FORMAT = "cxrmax-leaderboard"
SCHEMA_VERSION = "2"
BUSY_TIMEOUT_MS = 60_000

_ENTRIES = """
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
    predictions_sha256 TEXT,
    reference_section TEXT NOT NULL DEFAULT '',
    fingerprint TEXT,
    reference_sha256 TEXT,
    UNIQUE (task, predictions_sha256, uncertain, reference_section)
)"""

_SCHEMA = (
    """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""
    + _ENTRIES
    + """;
CREATE TABLE IF NOT EXISTS predictions (
    sha256 TEXT PRIMARY KEY,
    kind TEXT NOT NULL,
    n_rows INTEGER NOT NULL,
    data BLOB NOT NULL
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
)

#: The columns a schema 1 board has (copied as they are by the migration).
_V1_COLUMNS = (
    "id, task, task_version, name, model_info, submission_sha256, submission_file, uncertain, "
    "primary_metric, primary_value, coverage, n_scored, created_at, result_json"
)


class StoreError(CxrmaxError):
    """The leaderboard store cannot be used (corrupted, not a board, locked for too long)."""


class DuplicateSubmission(CxrmaxError):
    """The same predictions (canonical sha256) under the same policy are already on the board."""


#: The longest entry name: one table cell, not a description (that is what --model-info is for).
MAX_NAME_CHARS = 200


def check_entry_name(name: str) -> None:
    """An entry name is one line of printable text, non-empty and at most `MAX_NAME_CHARS` long: a
    newline would split its row in every table, an escape sequence would drive the terminals that
    show the board. Raises CxrmaxError saying which rule the name breaks."""
    if not name.strip():
        raise CxrmaxError("an entry needs a non-empty --name")
    bad = CONTROL_CHARACTERS.search(name)
    if bad is not None:
        raise CxrmaxError(
            f"--name {name!r}: holds the control character {bad.group()!r} at character {bad.start() + 1}; "
            "an entry name is one line of printable text"
        )
    if len(name) > MAX_NAME_CHARS:
        raise CxrmaxError(
            f"--name: {len(name)} characters, over the {MAX_NAME_CHARS} an entry name may have "
            "(put details in --model-info)"
        )


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
    predictions_sha256: str | None = None
    reference_section: str = ""
    fingerprint: str | None = None
    reference_sha256: str | None = None

    @property
    def fingerprint_parts(self) -> dict[str, Any]:
        """The stored fingerprint's parts ({} for an entry stored before fingerprints)."""
        return self.result.get("fingerprint") or {}


def _section(result: Any) -> str:
    """The report section a result was scored against ('' for other kinds)."""
    return str(result.extra.get("reference_section") or "") if result.kind == "report" else ""


def _pin_key(task: Any) -> str:
    return f"official_references:{task.key}"


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class Board:
    """A leaderboard store at ``path`` (created on first use).

    With ``create=False`` (the commands that only read: show, export, export-predictions) a store
    that does not exist is not created: the board is empty, held in memory, and ``exists`` is False,
    so a mistyped ``--store`` never leaves a new file (or folders) behind."""

    def __init__(self, path: str | Path | None = None, *, create: bool = True):
        self.path = Path(path) if path is not None else default_store_path()
        self.exists = self.path.exists()
        if not create and not self.exists:
            self._conn = sqlite3.connect(":memory:", isolation_level=None)
            self._conn.execute("PRAGMA foreign_keys = ON")
            self._init_schema()
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._conn = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None)
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open leaderboard store {self.path}: {exc}") from None
        try:
            self._open_with_retries()
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

    def _open_with_retries(self) -> None:
        """Settings, WAL mode, integrity check and schema, retried while another process holds a lock.

        Switching a new file to WAL and WAL recovery can answer SQLITE_BUSY at once, without waiting
        on the busy timeout, when two processes open the same new board together; those are retried
        until the busy timeout has passed."""
        deadline = time.monotonic() + BUSY_TIMEOUT_MS / 1000
        while True:
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
                return
            except sqlite3.OperationalError as exc:
                busy = "locked" in str(exc) or "busy" in str(exc)
                if not busy or time.monotonic() > deadline:
                    raise
                time.sleep(random.uniform(0.02, 0.2))

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
            if meta.get("schema_version") == "1":
                self._migrate_from_1()
            elif meta.get("schema_version") != SCHEMA_VERSION:
                raise StoreError(
                    f"{self.path}: store schema version {meta.get('schema_version')} is not supported (expected {SCHEMA_VERSION})"
                )
            return
        with self._transaction():
            self._create_tables()
            self._conn.execute(
                "INSERT OR IGNORE INTO meta VALUES ('format', ?), ('schema_version', ?)",
                (STORE_FORMAT, SCHEMA_VERSION),
            )

    def _create_tables(self) -> None:
        for statement in _SCHEMA.split(";"):
            if statement.strip():
                self._conn.execute(statement)

    def _migrate_from_1(self) -> None:
        """Schema 1 -> 2 in one transaction: rebuild ``entries`` (its UNIQUE key was the file's bytes)
        with the fingerprint and predictions columns, keep every entry, add ``predictions``.

        SQLite's table-rebuild procedure: foreign keys off while the old table is dropped (else the
        drop would cascade to entry_metrics), the new one renamed into place, then checked."""
        self._conn.execute("PRAGMA foreign_keys = OFF")
        try:
            with self._transaction():
                version = self._conn.execute(
                    "SELECT value FROM meta WHERE key = 'schema_version'"
                ).fetchone()[0]
                if version != "1":  # another process migrated it while this one waited for the lock
                    return
                self._conn.execute(_ENTRIES.replace("EXISTS entries (", "EXISTS entries_v2 ("))
                self._conn.execute(
                    f"INSERT INTO entries_v2 ({_V1_COLUMNS}) SELECT {_V1_COLUMNS} FROM entries"
                )
                self._conn.execute("DROP TABLE entries")
                self._conn.execute("ALTER TABLE entries_v2 RENAME TO entries")
                self._create_tables()  # the index and the predictions table
                broken = self._conn.execute("PRAGMA foreign_key_check").fetchall()
                if broken:
                    raise StoreError(
                        f"{self.path}: migration to schema 2 left dangling metric rows: {broken[:3]}"
                    )
                self._conn.execute(
                    "UPDATE meta SET value = ? WHERE key = 'schema_version'", (SCHEMA_VERSION,)
                )
        finally:
            self._conn.execute("PRAGMA foreign_keys = ON")

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[None]:
        """BEGIN IMMEDIATE ... COMMIT, rolled back on any error (the write lock is taken at once)."""
        try:
            self._conn.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as exc:
            raise StoreError(f"leaderboard store {self.path} is busy: {exc}") from None
        try:
            yield
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

    def find(self, task: str, sha256: str, uncertain: str | None = None) -> Entry | None:
        """The first entry scored from a file (or folder) with these bytes, under ``uncertain`` when
        given: a cheap check before scoring, since equal bytes are equal predictions. With a policy,
        entries stored before canonical predictions (schema 1) do not match, so that such a file can
        be submitted again and get a fingerprinted entry."""
        query = "SELECT * FROM entries WHERE task = ? AND submission_sha256 = ?"
        params: tuple[str, ...] = (task, sha256)
        if uncertain is not None:
            query += " AND uncertain = ? AND predictions_sha256 IS NOT NULL"
            params += (uncertain,)
        row = self._conn.execute(query + " ORDER BY id LIMIT 1", params).fetchone()
        return self._entry(row) if row else None

    def find_predictions(
        self, task: str, predictions_sha256: str, uncertain: str, section: str = ""
    ) -> Entry | None:
        """The entry holding these canonical predictions under this policy (and section), if any:
        the board's duplicate rule."""
        row = self._conn.execute(
            "SELECT * FROM entries WHERE task = ? AND predictions_sha256 = ? AND uncertain = ? "
            "AND reference_section = ?",
            (task, predictions_sha256, uncertain, section),
        ).fetchone()
        return self._entry(row) if row else None

    def submit(self, result: Any, name: str, model_info: dict[str, Any] | None = None) -> int:
        """Store a ScoreResult as one entry (atomically, with its canonical predictions) and return its id.

        Raises DuplicateSubmission when the same predictions under the same policy are already on the
        board for the task; refuses a result that scored nothing."""
        check_entry_name(name)
        if not result.n_scored:
            raise CxrmaxError("this result scored no study (no overlap with the references): not stored")
        data = result.to_dict()
        created = datetime.now(timezone.utc).isoformat(timespec="seconds")
        section = _section(result)
        blob = result.predictions.to_bytes() if result.predictions is not None else None
        with self._transaction():
            existing = self.find_predictions(
                result.task, result.predictions_sha256, result.uncertain, section
            )
            if existing is not None:
                raise DuplicateSubmission(
                    f"these predictions (sha256 {result.predictions_sha256[:12]}..., uncertain={result.uncertain}) "
                    f"are already on the {result.task} board as entry {existing.id} {existing.name!r} "
                    f"({existing.created_at})"
                )
            entry_id = self._insert(result, name, model_info, created, section, data)
            if blob is not None:
                self._conn.execute(
                    "INSERT OR IGNORE INTO predictions (sha256, kind, n_rows, data) VALUES (?,?,?,?)",
                    (result.predictions_sha256, result.predictions.kind, len(result.predictions), blob),
                )
            self._pin_if_first(result, entry_id)
            return entry_id

    def _insert(
        self,
        result: Any,
        name: str,
        model_info: dict[str, Any] | None,
        created: str,
        section: str,
        data: dict[str, Any],
    ) -> int:
        fp = result.fingerprint or {}
        cursor = self._conn.execute(
            "INSERT INTO entries (task, task_version, name, model_info, submission_sha256, submission_file, uncertain, "
            "primary_metric, primary_value, coverage, n_scored, created_at, result_json, predictions_sha256, "
            "reference_section, fingerprint, reference_sha256) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
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
                result.predictions_sha256 or None,
                section,
                fp.get("id"),
                fp.get("reference_sha256"),
            ),
        )
        entry_id = int(cursor.lastrowid)
        for metric, value in result.headline.items():
            low, high = result.ci.get(metric, (None, None))
            self._conn.execute(
                "INSERT INTO entry_metrics (entry_id, metric, value, ci_low, ci_high) VALUES (?,?,?,?,?)",
                (entry_id, metric, _finite(value), _finite(low), _finite(high)),
            )
        return entry_id

    def _pin_if_first(self, result: Any, entry_id: int) -> None:
        """Pin the task's official reference hash on the first entry that may pin it."""
        try:
            task = get_task(result.task)
        except CxrmaxError:  # a task no longer defined: nothing to pin
            return
        if task.reference_sha256 or task.version != result.task_version:
            return
        if not fingerprint.pins_official(task, result.fingerprint or {}):
            return
        value = json.dumps({"reference_sha256": result.fingerprint["reference_sha256"], "entry": entry_id})
        self._conn.execute("INSERT OR IGNORE INTO meta (key, value) VALUES (?, ?)", (_pin_key(task), value))

    def official_references(self, task: Any) -> tuple[str | None, str]:
        """The official reference hash of ``task`` (a Task) and where it comes from: the task file,
        the board's pin (naming the entry that set it), or (None, why not)."""
        if task.reference_sha256:
            return task.reference_sha256, f"pinned by the task file {task.name}.toml"
        row = self._conn.execute("SELECT value FROM meta WHERE key = ?", (_pin_key(task),)).fetchone()
        if row is None:
            return None, "no official references yet: the first entry scored from a MIMIC-CXR root pins them"
        pin = json.loads(row[0])
        return pin["reference_sha256"], f"pinned by entry {pin['entry']} (scored from a MIMIC-CXR root)"

    def pin_references(self, task: Any, reference_sha256: str) -> None:
        """Set (or replace) the board's official reference hash of ``task``."""
        value = json.dumps({"reference_sha256": reference_sha256, "entry": None})
        with self._transaction():
            self._conn.execute(
                "INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (_pin_key(task), value)
            )

    def get(self, entry_id: int) -> Entry:
        """One entry by id (CxrmaxError when there is none)."""
        row = self._conn.execute("SELECT * FROM entries WHERE id = ?", (entry_id,)).fetchone()
        if row is None:
            raise CxrmaxError(f"no entry {entry_id} on the board {self.path}")
        return self._entry(row)

    def predictions(self, entry_id: int) -> Predictions:
        """The canonical predictions of an entry (CxrmaxError when the board does not hold them)."""
        entry = self.get(entry_id)
        if not entry.predictions_sha256:
            raise CxrmaxError(
                f"entry {entry_id} {entry.name!r} was stored before the board kept predictions "
                "(schema 1): submit the file again to export it"
            )
        row = self._conn.execute(
            "SELECT data FROM predictions WHERE sha256 = ?", (entry.predictions_sha256,)
        ).fetchone()
        if row is None:
            raise CxrmaxError(
                f"entry {entry_id} {entry.name!r}: its predictions are not stored on this board"
            )
        return Predictions.from_bytes(row[0])

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
            predictions_sha256=data["predictions_sha256"],
            reference_section=data["reference_section"] or "",
            fingerprint=data["fingerprint"],
            reference_sha256=data["reference_sha256"],
        )
