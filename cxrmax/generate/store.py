"""Exactly-once storage of trajectories: request keys, a per-answer journal, atomic Arrow shards, and a
SQLite ledger of failures.

Layout of one model's folder ``OUT/trajectories/<model>/``::

    part-<tag>-<run>-<seq>.arrow   committed shards (Arrow IPC stream, shards.TRAJECTORY_SCHEMA)
    wal-<tag>-<run>-<seq>.jsonl    journal of answers not yet in a shard (one JSON line per answer)
    failures.sqlite                ledger of failed requests (kind, status, message, attempts)
    .lock-<tag>                    held (flock) by the process writing shards with this tag
    .lock-recovery                 held while a run recovers the journals of another (killed) tag

``<tag>`` is ``all`` or ``<i>of<N>`` for ``--shard i/N``; ``<run>`` is unique per process.

Why a journal: every answer is written (and flushed to the OS) to the journal the moment it arrives,
so a kill -9 loses nothing already answered; at most a torn last line, which is ignored (that request
is simply done again). Every ``rows_per_shard`` answers (and at exit) the buffered rows become a shard:
written to a temporary file, fsynced, moved into place with os.replace (atomic), and only then is the
journal deleted. A shard is therefore either absent or complete. On start, journals of the same tag
left by a killed process are turned into shards; a journal whose shard already exists (killed between
the replace and the delete) is dropped, so nothing is counted twice.

Writers: one per tag, and none beside a live writer whose requests overlap (an unsharded run overlaps
every --shard run; --shard i/N and j/M overlap unless N == M and i != j): the later one is refused.
A run also recovers the journals of any other tag no live writer holds (a killed unsharded run's
answers count as done for a --shard rerun instead of being asked again).

Exactly once: a request is done when its key is in a committed shard; the set of done keys is read from
the ``request_key`` column of all shards (any tag) when the store opens and kept as a sorted array of
16-byte digests (16 bytes per answer, no Python object per key).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import hashlib
import json
import os
import secrets
import sqlite3
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from cxrmax.core.errors import CxrmaxError
from cxrmax.core.io import atomic_path, read_arrow
from cxrmax.core.schemas import TRAJECTORY_SCHEMA

KEY_VERSION = 1


def request_key(
    sample_id: str, model: str, prompt_hash: str, sampling: dict[str, Any], sample_index: int
) -> str:
    """The exactly-once key of one request: sha256 (hex) of the canonical JSON of
    ``{"v": 1, "sample_id", "model", "prompt_hash", "sampling", "sample_index"}``.

    ``sampling`` holds temperature, top_p, max_tokens and the run's base seed; anything that changes the
    answer distribution changes the key, so a rerun with other settings never mixes with old answers."""
    payload = {
        "v": KEY_VERSION,
        "sample_id": sample_id,
        "model": model,
        "prompt_hash": prompt_hash,
        "sampling": sampling,
        "sample_index": sample_index,
    }
    canonical = json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def request_seed(base_seed: int, sample_id: str, sample_index: int) -> int:
    """The seed sent with one request: distinct per sample and sample index, reproducible per base seed."""
    digest = hashlib.sha256(f"{base_seed}|{sample_id}|{sample_index}".encode()).digest()
    return int.from_bytes(digest[:4], "big") & 0x7FFFFFFF


def key_digest(key_hex: str) -> bytes:
    """The 16-byte digest kept in memory for a hex key."""
    return bytes.fromhex(key_hex[:32])


class KeySet:
    """An immutable set of 16-byte key digests backed by a sorted numpy array (16 bytes per key)."""

    def __init__(self, digests: Iterable[bytes] | np.ndarray = ()):
        array = digests if isinstance(digests, np.ndarray) else np.array(list(digests), dtype="S16")
        self._sorted = np.unique(array.astype("S16")) if len(array) else np.empty(0, dtype="S16")

    def __len__(self) -> int:
        return len(self._sorted)

    @property
    def array(self) -> np.ndarray:
        """The sorted S16 digests (for vectorised membership with np.isin)."""
        return self._sorted

    def __contains__(self, digest: bytes) -> bool:
        # numpy returns S16 items without trailing NUL bytes; compare in that form.
        digest = bytes(digest).rstrip(b"\0")
        array = self._sorted
        i = int(np.searchsorted(array, digest))
        return i < len(array) and bytes(array[i]) == digest

    def union(self, other: np.ndarray) -> KeySet:
        return KeySet(np.concatenate([self._sorted, other.astype("S16")]))


def shard_tag(shard: tuple[int, int] | None) -> str:
    return "all" if shard is None else f"{shard[0]}of{shard[1]}"


def rows_to_table(rows: list[dict[str, Any]]) -> pa.Table:
    """Journal rows (created_at as epoch ms) -> a table with TRAJECTORY_SCHEMA."""
    columns = {}
    for field in TRAJECTORY_SCHEMA:
        values = [row.get(field.name) for row in rows]
        if field.name == "created_at":
            values = [
                None if v is None else dt.datetime.fromtimestamp(v / 1000, dt.timezone.utc) for v in values
            ]
        columns[field.name] = pa.array(values, type=field.type)
    return pa.table(columns, schema=TRAJECTORY_SCHEMA)


def write_shard_atomic(table: pa.Table, path: Path) -> None:
    """Write ``table`` as an Arrow IPC stream to ``path`` atomically (temporary file, fsync,
    os.replace, folder fsync: `cxrmax.core.io.atomic_path`)."""
    with atomic_path(path) as tmp, pa.OSFile(str(tmp), "wb") as sink:
        with pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table, max_chunksize=10_000)


def read_shard(path: Path, columns: list[str] | None = None) -> pa.Table:
    """Read one committed shard (memory-mapped). A damaged one (a stream cut short by a copy, say)
    raises InputError naming it rather than reading as fewer rows."""
    return read_arrow(path, columns)


def shard_paths(model_dir: Path) -> list[Path]:
    return sorted(model_dir.glob("part-*.arrow"))


@dataclass
class FailureRecord:
    request_key: str
    sample_id: str
    sample_index: int
    kind: str
    status: int | None
    message: str
    attempts: int
    retryable: bool


class FailureLedger:
    """SQLite table of failed requests. A success deletes its key; reruns skip non-retryable failures
    unless asked to retry them (--retry-failed)."""

    def __init__(self, path: Path):
        self.path = path
        self._conn = sqlite3.connect(str(path), timeout=30.0, isolation_level=None)
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=NORMAL")
        self._conn.execute(
            "CREATE TABLE IF NOT EXISTS failures ("
            " request_key TEXT PRIMARY KEY, sample_id TEXT, sample_index INTEGER, kind TEXT, status INTEGER,"
            " message TEXT, attempts INTEGER, retryable INTEGER, runs INTEGER DEFAULT 1,"
            " first_failed_at TEXT, last_failed_at TEXT)"
        )

    def record(self, failure: FailureRecord) -> None:
        now = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
        self._conn.execute(
            "INSERT INTO failures (request_key, sample_id, sample_index, kind, status, message, attempts,"
            " retryable, runs, first_failed_at, last_failed_at) VALUES (?,?,?,?,?,?,?,?,1,?,?)"
            " ON CONFLICT(request_key) DO UPDATE SET kind=excluded.kind, status=excluded.status,"
            " message=excluded.message, attempts=failures.attempts+excluded.attempts,"
            " retryable=excluded.retryable, runs=failures.runs+1, last_failed_at=excluded.last_failed_at",
            (
                failure.request_key,
                failure.sample_id,
                failure.sample_index,
                failure.kind,
                failure.status,
                failure.message[:2000],
                failure.attempts,
                int(failure.retryable),
                now,
                now,
            ),
        )

    def delete(self, keys: Iterable[str]) -> None:
        self._conn.executemany("DELETE FROM failures WHERE request_key = ?", [(k,) for k in keys])

    def keys(self, retryable: bool | None = None) -> list[str]:
        query = "SELECT request_key FROM failures"
        if retryable is not None:
            query += f" WHERE retryable = {int(retryable)}"
        return [row[0] for row in self._conn.execute(query)]

    def rows(self) -> list[dict[str, Any]]:
        cursor = self._conn.execute("SELECT * FROM failures ORDER BY last_failed_at")
        names = [d[0] for d in cursor.description]
        return [dict(zip(names, row, strict=True)) for row in cursor]

    def counts_by_kind(self) -> dict[str, int]:
        return dict(self._conn.execute("SELECT kind, COUNT(*) FROM failures GROUP BY kind").fetchall())

    def close(self) -> None:
        self._conn.close()


class StoreLockedError(CxrmaxError):
    pass


class TrajectoryStore:
    """Append-only, crash-safe store of one model's trajectories (see the module docstring)."""

    def __init__(
        self,
        model_dir: str | Path,
        shard: tuple[int, int] | None = None,
        rows_per_shard: int = 2000,
        commit_seconds: float = 60.0,
    ):
        self.dir = Path(model_dir)
        self.tag = shard_tag(shard)
        self.rows_per_shard = rows_per_shard
        self.commit_seconds = commit_seconds
        self.run_id = f"{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}-{secrets.token_hex(3)}"
        self._seq = 0
        self._buffer: list[dict[str, Any]] = []
        self._journal = None
        self._journal_path: Path | None = None
        self._last_commit = time.monotonic()
        self._lock_fd: int | None = None
        self.done = KeySet()
        self.failed_permanent = KeySet()
        self._failed_all: set[str] = set()
        self.ledger: FailureLedger | None = None
        self.recovered_rows = 0
        self.rejected_rows = 0  # journal rows that no longer fit the schema (redone)
        self.committed_rows = 0

    # ----------------------------------------------------------------- lifecycle
    def open(self) -> TrajectoryStore:
        """Lock this tag (refusing while a writer whose requests overlap this one's is live), recover
        journals of killed runs, load done keys and the failure ledger."""
        self.dir.mkdir(parents=True, exist_ok=True)
        self._lock_fd = self._lock_own_tag()
        probes: dict[str, int] = {}
        try:
            journal_tags = {p.name[len("wal-") :].split("-", 1)[0] for p in self.dir.glob("wal-*.jsonl")}
            probes = self._check_other_writers(journal_tags - {self.tag})
            self.ledger = FailureLedger(self.dir / "failures.sqlite")
            self._remove_stale_tmp(self.tag)
            self.done = KeySet(self._load_done_digests())
            self._recover_journals(self.tag)
            # Journals a killed run of another tag left: answers received, not yet in a shard. No live
            # writer holds that tag (probed above), so they are turned into shards here rather than
            # asked again. One process at a time (a mutex) so that two starting runs do not both.
            others = sorted(probes)
            if others:
                with _flocked(self.dir / ".lock-recovery"):
                    for tag in others:
                        self._remove_stale_tmp(tag)
                        self._recover_journals(tag)
            self._failed_all = set(self.ledger.keys())
            self.failed_permanent = KeySet(key_digest(k) for k in self.ledger.keys(retryable=False))
        except BaseException:
            self.close()
            raise
        finally:
            for fd in probes.values():
                os.close(fd)  # closing the descriptor drops its shared lock
        return self

    def _lock_own_tag(self) -> int:
        """flock this tag's lock file (exclusive) and write who holds it. Another starting run may hold
        it for a moment (a shared lock while it checks for overlapping writers): retried briefly."""
        lock_path = self.dir / f".lock-{self.tag}"
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        deadline = time.monotonic() + _LOCK_WAIT_S
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() < deadline:
                    time.sleep(0.05)
                    continue
                os.close(fd)
                raise StoreLockedError(
                    f"{self.dir} is being written by {_holder(lock_path)} ({_describe_tag(self.tag)}); "
                    "wait for it to finish or stop it first (two writers would duplicate requests)"
                ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()}\n".encode())
        return fd

    def _check_other_writers(self, keep: set[str]) -> dict[str, int]:
        """Refuse to run beside a live writer of another tag whose requests overlap this run's (an
        unsharded run overlaps every --shard run; --shard i/N and j/M overlap unless N == M and i != j).
        Returns the tags of ``keep`` (those with journals) found free, each with a shared lock held on
        its file (the caller closes them): no writer can start on those tags while this run recovers
        their journals. Other free tags' locks are let go at once.

        Each run takes its own lock before it probes the others', so of two runs that start together
        the later one always sees the earlier."""
        probes: dict[str, int] = {}
        try:
            for path in sorted(self.dir.glob(".lock-*")):
                tag = path.name[len(".lock-") :]
                if tag in (self.tag, "recovery"):
                    continue
                try:
                    fd = os.open(path, os.O_RDWR)
                except FileNotFoundError:
                    continue
                try:
                    fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
                except BlockingIOError:
                    os.close(fd)
                    if _tags_overlap(self.tag, tag):
                        raise StoreLockedError(
                            f"{self.dir} is being written by {_holder(path)} ({_describe_tag(tag)}), whose "
                            f"requests overlap this run's ({_describe_tag(self.tag)}); wait for it to finish "
                            "or stop it first (two writers would duplicate requests)"
                        ) from None
                    continue
                if tag in keep:
                    probes[tag] = fd
                else:
                    os.close(fd)
        except BaseException:
            for fd in probes.values():
                os.close(fd)
            raise
        return probes

    def __enter__(self) -> TrajectoryStore:
        return self.open()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Commit buffered rows and release the lock (also on Ctrl-C / errors)."""
        try:
            self.commit()
        finally:
            if self.ledger is not None:
                self.ledger.close()
                self.ledger = None
            if self._lock_fd is not None:
                fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
                os.close(self._lock_fd)
                self._lock_fd = None

    # ----------------------------------------------------------------- reading
    def _load_done_digests(self) -> np.ndarray:
        parts = []
        for path in shard_paths(self.dir):
            keys = read_shard(path, ["request_key"]).column(0)
            # hex -> 16-byte digests, vectorised through numpy.
            hexes = np.array(pc.utf8_slice_codeunits(keys, 0, 32).to_pylist(), dtype="S32")
            parts.append(np.frombuffer(bytes.fromhex(hexes.tobytes().decode()), dtype="S16"))
        return np.concatenate(parts) if parts else np.empty(0, dtype="S16")

    def is_done(self, digest: bytes) -> bool:
        return digest in self.done

    # ----------------------------------------------------------------- writing
    def _new_journal(self) -> None:
        self._seq += 1
        name = f"{self.tag}-{self.run_id}-{self._seq:05d}"
        self._journal_path = self.dir / f"wal-{name}.jsonl"
        self._journal = open(self._journal_path, "a", encoding="utf-8")  # noqa: SIM115 - closed in commit()

    def append(self, row: dict[str, Any]) -> None:
        """Journal one answer (flushed to the OS immediately) and buffer it for the next shard.
        ``row`` has TRAJECTORY_SCHEMA fields; ``created_at`` in epoch milliseconds."""
        if self._journal is None:
            self._new_journal()
        self._journal.write(json.dumps(row, ensure_ascii=False, separators=(",", ":")) + "\n")
        self._journal.flush()
        self._buffer.append(row)
        if self.ledger is not None and row["request_key"] in self._failed_all:
            self.ledger.delete([row["request_key"]])
            self._failed_all.discard(row["request_key"])
        if (
            len(self._buffer) >= self.rows_per_shard
            or time.monotonic() - self._last_commit > self.commit_seconds
        ):
            self.commit()

    def commit(self) -> None:
        """Turn the buffered rows into a committed shard and delete their journal."""
        self._last_commit = time.monotonic()
        if self._journal is None:
            return
        journal_path = self._journal_path
        self._journal.close()
        self._journal = None
        if self._buffer:
            write_shard_atomic(rows_to_table(self._buffer), _shard_for(journal_path))
            self.committed_rows += len(self._buffer)
            self._buffer = []
        journal_path.unlink(missing_ok=True)

    def record_failure(self, failure: FailureRecord) -> None:
        assert self.ledger is not None
        self.ledger.record(failure)
        self._failed_all.add(failure.request_key)

    # ----------------------------------------------------------------- recovery
    def _remove_stale_tmp(self, tag: str) -> None:
        for tmp in self.dir.glob(f".part-{tag}-*.tmp"):
            tmp.unlink(missing_ok=True)

    def _recover_journals(self, tag: str) -> None:
        """Turn journals left by killed runs of ``tag`` into shards (skipping keys already committed)."""
        new_digests = []
        for journal in sorted(self.dir.glob(f"wal-{tag}-*.jsonl")):
            shard = _shard_for(journal)
            if shard.exists():  # killed between the shard's os.replace and the journal's unlink
                journal.unlink()
                continue
            rows, seen = [], set()
            for row in _read_journal(journal):
                digest = key_digest(row["request_key"])
                if digest in self.done or digest in seen:
                    continue
                seen.add(digest)
                rows.append(row)
            table, rejected = _recoverable_table(rows)
            if rejected:
                # A row that no longer fits the schema (written by an older, buggy version) must not
                # block every later run: it is left out, so its request is simply made again.
                self.rejected_rows += len(rejected)
                seen.difference_update(key_digest(row["request_key"]) for row in rejected)
                warnings.warn(
                    f"{journal}: {len(rejected)} journal row(s) do not fit the trajectory schema and were "
                    "dropped; their requests will be made again",
                    stacklevel=2,
                )
            if table.num_rows:
                write_shard_atomic(table, shard)
                self.recovered_rows += table.num_rows
                new_digests.extend(seen)
            journal.unlink()
        if new_digests:
            self.done = self.done.union(np.array(new_digests, dtype="S16"))
        if self.ledger is not None and new_digests:
            failed = set(self.ledger.keys())
            recovered_keys = [k for k in failed if key_digest(k) in self.done]
            self.ledger.delete(recovered_keys)

    def remove_rows(self, predicate: Callable[[pa.Table], pa.Array]) -> list[dict[str, Any]]:
        """Remove committed rows where ``predicate(table)`` is true (rewriting each affected shard
        atomically) and return them. Used by --retry-length to redo truncated answers."""
        removed: list[dict[str, Any]] = []
        for path in shard_paths(self.dir):
            table = read_shard(path)
            mask = predicate(table)
            n = pc.sum(mask).as_py() or 0
            if not n:
                continue
            removed.extend(
                table.filter(mask).select(["request_key", "sample_id", "sample_index"]).to_pylist()
            )
            write_shard_atomic(table.filter(pc.invert(mask)), path)
        if removed:
            self.done = KeySet(self._load_done_digests())
        return removed


#: How long a starting run waits for its tag's lock when another process holds it (a starting run
#: probing it for a moment); a live writer holds it for its whole run, so the wait then ends in an error.
_LOCK_WAIT_S = 2.0


def _holder(lock_path: Path) -> str:
    try:
        return lock_path.read_text().strip() or "another process"
    except OSError:
        return "another process"


def _parse_tag(tag: str) -> tuple[int, int] | None:
    index, sep, count = tag.partition("of")
    if sep and index.isdigit() and count.isdigit():
        return int(index), int(count)
    return None


def _describe_tag(tag: str) -> str:
    shard = _parse_tag(tag)
    return (
        f"--shard {shard[0]}/{shard[1]}"
        if shard
        else ("no --shard" if tag == "all" else f"shard tag {tag!r}")
    )


def _tags_overlap(a: str, b: str) -> bool:
    """Whether runs with shard tags ``a`` and ``b`` can plan the same request."""
    first, second = _parse_tag(a), _parse_tag(b)
    if first is None or second is None:  # "all" (or a tag this version does not know)
        return True
    return first[1] != second[1] or first[0] == second[0]


@contextlib.contextmanager
def _flocked(path: Path) -> Iterator[None]:
    """Hold an exclusive flock on ``path`` (blocking) for the block."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


_CONVERSION_ERRORS = (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, ValueError, OverflowError)


def _recoverable_table(rows: list[dict[str, Any]]) -> tuple[pa.Table, list[dict[str, Any]]]:
    """Journal rows as a TRAJECTORY_SCHEMA table, plus the rows that do not convert (checked one by
    one only when the whole batch fails, which a healthy journal never does)."""
    try:
        return rows_to_table(rows), []
    except _CONVERSION_ERRORS:
        pass
    good, bad = [], []
    for row in rows:
        try:
            rows_to_table([row])
            good.append(row)
        except _CONVERSION_ERRORS:
            bad.append(row)
    return rows_to_table(good), bad


def _shard_for(journal: Path) -> Path:
    return journal.with_name("part-" + journal.name[len("wal-") : -len(".jsonl")] + ".arrow")


def _read_journal(path: Path) -> Iterator[dict[str, Any]]:
    """Complete lines of a journal; a torn or corrupt line ends the readable part (kill -9 mid-write)."""
    with open(path, encoding="utf-8", errors="replace") as handle:
        for line in handle:
            if not line.endswith("\n"):
                return
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                return
            if not isinstance(row, dict) or "request_key" not in row:
                return
            yield row
