"""Label many texts into one Arrow table, in-process for small batches and across cores for big ones."""

from __future__ import annotations

import contextlib
import functools
import multiprocessing
import multiprocessing.pool
import os
import signal
import threading
import time
from collections.abc import Iterable, Iterator, Sequence

import pyarrow as pa

from cxrmax.core.pathologies import OBSERVATIONS
from cxrmax.labeler.core import UNCERTAIN_POLICIES, label_codes

#: Batches smaller than this are labelled in-process (starting workers costs more than it saves).
PARALLEL_THRESHOLD = 2000
_CHUNK = 500


def laterality_column(name: str) -> str:
    """Name of the laterality column of an observation, e.g. "Pleural Effusion laterality"."""
    return f"{name} laterality"


#: The schema of `label_texts` tables.
LABEL_TABLE_SCHEMA = pa.schema(
    [pa.field(name, pa.int8()) for name in OBSERVATIONS]
    + [pa.field(laterality_column(name), pa.string()) for name in OBSERVATIONS]
    + [
        pa.field("refusal", pa.bool_()),
        pa.field("hedging", pa.bool_()),
        pa.field("n_steps", pa.int32()),
        pa.field("error", pa.string()),
    ]
)


def _label_chunk(texts: Sequence[object], uncertain: str = "keep") -> list[tuple]:
    out = []
    for text in texts:
        try:
            out.append(label_codes(text, uncertain))
        except Exception as exc:  # never lose a batch to one text; the row says what went wrong
            n = len(OBSERVATIONS)
            out.append(
                ([None] * n, [None] * n, False, False, 0, f"labeler error: {type(exc).__name__}: {exc}")
            )
    return out


def pool_worker_signals() -> None:
    """Pool worker initializer: a forked worker inherits the parent's signal handlers (the generate CLI
    turns SIGTERM into KeyboardInterrupt); with them, Pool.terminate() could leave a worker blocked on
    the task queue forever. Workers die on SIGTERM and leave Ctrl-C to the parent."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


#: Seconds terminate_pool waits for Pool.terminate() before it stops the workers itself.
TERMINATE_SECONDS = 5.0


def terminate_pool(pool: multiprocessing.pool.Pool, timeout: float = TERMINATE_SECONDS) -> None:
    """``pool.terminate()`` and ``pool.join()``, bounded: on an interruption Pool.terminate() can hang
    for ever (its task-handler thread blocked writing a big task into the pipe of workers that are
    gone, or a worker killed while holding the task queue's lock), which would leave Ctrl-C with a
    process that never exits. Past ``timeout`` the workers are killed, the pipe is read empty so
    that a blocked writer can finish, and the rest is left to daemon threads that do not hold up
    the exit."""
    stopper = threading.Thread(target=pool.terminate, name="pool-terminate", daemon=True)
    stopper.start()
    stopper.join(timeout)
    if not stopper.is_alive():
        pool.join()
        return
    for process in list(getattr(pool, "_pool", None) or []):
        with contextlib.suppress(Exception):
            process.kill()
    reader = pool._inqueue._reader  # noqa: SLF001 - the pipe the blocked task handler writes to
    deadline = time.monotonic() + timeout
    while stopper.is_alive() and time.monotonic() < deadline:
        with contextlib.suppress(Exception):
            if reader.poll(0.05):
                reader.recv_bytes()
        stopper.join(0.05)


def _label_part(texts: object, uncertain: str = "keep") -> pa.Table:
    """Worker task: label a list (or a compact Arrow array) of texts into a table. Returning Arrow
    keeps the parent's share of the work small: it only concatenates buffers."""
    if isinstance(texts, (pa.Array, pa.ChunkedArray)):
        texts = texts.to_pylist()
    return _rows_to_table(_label_chunk(texts, uncertain))  # type: ignore[arg-type]


def default_processes() -> int:
    """Cores this process may use."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def _rows_to_table(rows: list[tuple]) -> pa.Table:
    n = len(OBSERVATIONS)
    values: list[list] = [[] for _ in range(n)]
    sides: list[list] = [[] for _ in range(n)]
    refusal, hedging, n_steps, errors = [], [], [], []
    for codes, lats, ref, hed, steps, error in rows:
        for k in range(n):
            values[k].append(codes[k])
            sides[k].append(lats[k])
        refusal.append(ref)
        hedging.append(hed)
        n_steps.append(steps)
        errors.append(error)
    arrays = (
        [pa.array(v, pa.int8()) for v in values]
        + [pa.array(s, pa.string()) for s in sides]
        + [pa.array(refusal, pa.bool_()), pa.array(hedging, pa.bool_()), pa.array(n_steps, pa.int32())]
        + [pa.array(errors, pa.string())]
    )
    return pa.Table.from_arrays(arrays, schema=LABEL_TABLE_SCHEMA)


def _as_sequence(texts: Iterable[object]) -> Sequence[object]:
    if isinstance(texts, (pa.Array, pa.ChunkedArray)):
        return texts.to_pylist()
    if isinstance(texts, (str, bytes)):
        return [texts]
    if not isinstance(texts, Sequence):
        return list(texts)
    return texts


def label_texts(texts: Iterable[object], processes: int | None = None, uncertain: str = "keep") -> pa.Table:
    """Label every text; one row per text, in input order, with LABEL_TABLE_SCHEMA columns:
    int8 per observation (1/0/-1/null), "<observation> laterality" strings, `refusal`, `hedging`,
    `n_steps`, `error` (null when fine). None, bytes or junk rows get nulls and an error, never
    an exception. Deterministic regardless of `processes` (None = all usable cores; batches under
    PARALLEL_THRESHOLD texts run in-process). ``uncertain``: how an uncertain observation is written
    (UNCERTAIN_POLICIES: "keep" -1, "positive" 1, "negative" 0, "graded" 1 when probable else 0).
    """
    return next(iter_label_tables([texts], processes=processes, uncertain=uncertain))


def iter_label_tables(
    chunks: Iterable[Iterable[object]], processes: int | None = None, uncertain: str = "keep"
) -> Iterator[pa.Table]:
    """Label a stream of text chunks (lists, Arrow arrays, record-batch columns), yielding one
    LABEL_TABLE_SCHEMA table per chunk, in order. One worker pool serves the whole stream, so memory
    stays flat in the number of chunks and workers start once. ``uncertain``: see label_texts."""
    if uncertain not in UNCERTAIN_POLICIES:
        raise ValueError(f"uncertain={uncertain!r}: expected one of {', '.join(UNCERTAIN_POLICIES)}")
    part = functools.partial(_label_part, uncertain=uncertain)
    workers = default_processes() if processes is None else max(1, int(processes))
    pool = None
    try:
        for chunk in chunks:
            arrow = isinstance(chunk, (pa.Array, pa.ChunkedArray))
            size = len(chunk) if arrow or isinstance(chunk, Sequence) else None
            if size is None:
                chunk = _as_sequence(chunk)
                size = len(chunk)
            if workers == 1 or size < PARALLEL_THRESHOLD:
                yield part(chunk if arrow else _as_sequence(chunk))
                continue
            if pool is None:
                methods = multiprocessing.get_all_start_methods()
                context = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
                pool = context.Pool(workers, initializer=pool_worker_signals)
            if arrow:
                # Compact each slice: a pickled slice would otherwise carry its parent's buffers.
                whole = chunk.combine_chunks() if isinstance(chunk, pa.ChunkedArray) else chunk
                parts: list = [pa.concat_arrays([whole.slice(i, _CHUNK)]) for i in range(0, size, _CHUNK)]
            else:
                texts = _as_sequence(chunk)
                parts = [texts[i : i + _CHUNK] for i in range(0, size, _CHUNK)]
            yield pa.concat_tables(pool.imap(part, parts))
    finally:
        if pool is not None:
            terminate_pool(pool)
