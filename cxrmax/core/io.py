"""The one implementation of cxrmax's shared file jobs: atomic writes and Arrow/Parquet reads.

Every file cxrmax publishes is written to a uniquely named temporary file beside its final path,
flushed and fsynced, then moved into place with ``os.replace`` (atomic on POSIX), and the folder is
fsynced so the rename itself survives a power cut. A reader therefore sees the old file or the new
one, never half of one, and a crash or Ctrl-C leaves at most a hidden ``.NAME.*.tmp`` behind.

Arrow IPC data comes in two framings: the random-access *file* format (magic ``ARROW1``) and the
*stream* format (generate's shards). A stream cut exactly between two record batches still parses,
silently short, so streams must end with the end-of-stream marker their writer appends on close."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa

from cxrmax.core.errors import InputError, where

#: The end-of-stream marker every closed Arrow IPC stream writer appends (continuation + length 0).
STREAM_EOS = b"\xff\xff\xff\xff\x00\x00\x00\x00"
ARROW_FILE_MAGIC = b"ARROW1"
PARQUET_MAGIC = b"PAR1"


def fsync_dir(path: str | os.PathLike) -> None:
    """fsync a folder so that renames inside it are durable (a no-op where folders cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def temp_path_for(path: str | os.PathLike, suffix: str = ".tmp") -> Path:
    """A hidden, unique temporary name beside ``path`` (same folder, so ``os.replace`` is atomic)."""
    path = Path(path)
    return path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}{suffix}")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = ".tmp", durable: bool = True) -> Iterator[Path]:
    """Yield a temporary path to write; on a clean exit it replaces ``path`` atomically.

    ``suffix`` keeps an extension for writers that choose the format by name (matplotlib's
    ``savefig``). With ``durable`` the data and the rename are fsynced. On any exception
    (KeyboardInterrupt included) the temporary file is removed and ``path`` is left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path_for(path, suffix)
    try:
        yield tmp
        if durable:
            _fsync_file(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    if durable:
        fsync_dir(path.parent)


def atomic_write_bytes(path: str | os.PathLike, data: bytes, durable: bool = True) -> Path:
    """Write ``data`` to ``path`` atomically (see `atomic_path`)."""
    with atomic_path(path, durable=durable) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def atomic_write_text(path: str | os.PathLike, text: str, durable: bool = True) -> Path:
    """Write UTF-8 ``text`` to ``path`` atomically (see `atomic_path`)."""
    return atomic_write_bytes(path, text.encode("utf-8"), durable=durable)


def atomic_write_json(path: str | os.PathLike, payload: Any, durable: bool = True) -> Path:
    """Write ``payload`` as indented, strict JSON (NaN and infinities are refused) atomically."""
    text = json.dumps(payload, indent=2, default=str, allow_nan=False) + "\n"
    return atomic_write_text(path, text, durable=durable)


def replace_dir(staged: str | os.PathLike, final: str | os.PathLike) -> None:
    """Move the finished folder ``staged`` onto ``final``, replacing what was there.

    The old folder is first renamed aside, so ``final`` is never a mix of old and new files; a crash
    between the two renames leaves the old copy under a hidden name, never a half-written one."""
    staged, final = Path(staged), Path(final)
    old = None
    if final.exists():
        old = temp_path_for(final, ".old")
        os.replace(final, old)
    os.replace(staged, final)
    fsync_dir(final.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink(missing_ok=True)


def _stream_is_complete(source: pa.NativeFile) -> bool:
    size = source.size()
    source.seek(max(0, size - len(STREAM_EOS)))
    return source.read() == STREAM_EOS


def read_arrow(path: str | os.PathLike, columns: Sequence[str] | None = None) -> pa.Table:
    """Read an Arrow IPC file or stream, memory-mapped (texts are not copied).

    Raises InputError naming the file when it is neither, or when a stream lacks its end-of-stream
    marker (truncated by an interrupted write or copy)."""
    path = Path(path)
    try:
        source = pa.memory_map(str(path), "r")
        try:
            table = pa.ipc.open_file(source).read_all()
        except pa.ArrowInvalid:
            source.seek(0)
            table = pa.ipc.open_stream(source).read_all()
            if not _stream_is_complete(source):
                raise InputError(
                    f"{where(path)}: the Arrow stream ends without its end-of-stream marker after "
                    f"{table.num_rows} rows (truncated: an interrupted write or copy?)"
                ) from None
    except FileNotFoundError:
        raise InputError(f"{where(path)}: file not found") from None
    except (pa.ArrowInvalid, OSError) as exc:
        raise InputError(f"{where(path)}: not a readable Arrow file (corrupt or truncated?): {exc}") from None
    return table.select(list(columns)) if columns else table


def iter_arrow_batches(
    path: str | os.PathLike, columns: Sequence[str] | None = None
) -> Iterator[pa.RecordBatch]:
    """Stream the record batches of an Arrow IPC file or stream, or of a Parquet file, one at a time
    (memory stays flat). A truncated stream raises InputError after its last whole batch."""
    path = Path(path)
    names = list(columns) if columns else None
    try:
        if read_magic(path).startswith(PARQUET_MAGIC):
            import pyarrow.parquet as pq

            yield from pq.ParquetFile(path).iter_batches(columns=names)
            return
        with pa.memory_map(str(path), "r") as source:
            try:
                reader: Any = pa.ipc.open_file(source)
                batches: Iterator[pa.RecordBatch] = (
                    reader.get_batch(i) for i in range(reader.num_record_batches)
                )
                stream = False
            except pa.ArrowInvalid:
                source.seek(0)
                reader = pa.ipc.open_stream(source)
                batches, stream = iter(reader), True
            for batch in batches:
                yield batch.select(names) if names else batch
            if stream and not _stream_is_complete(source):
                raise InputError(
                    f"{where(path)}: the Arrow stream ends without its end-of-stream marker "
                    "(truncated: an interrupted write or copy?)"
                )
    except FileNotFoundError:
        raise InputError(f"{where(path)}: file not found") from None
    except (pa.ArrowInvalid, OSError) as exc:
        raise InputError(
            f"{where(path)}: not a readable Arrow/Parquet file (corrupt or truncated?): {exc}"
        ) from None


def read_magic(path: str | os.PathLike, size: int = 8) -> bytes:
    """The first ``size`` bytes of a file (b"" for an empty one)."""
    with open(path, "rb") as fh:
        return fh.read(size)


def read_table(path: str | os.PathLike, columns: Sequence[str] | None = None) -> pa.Table:
    """Read an Arrow IPC file/stream or a Parquet file, chosen by content (not by name)."""
    path = Path(path)
    try:
        magic = read_magic(path)
    except FileNotFoundError:
        raise InputError(f"{where(path)}: file not found") from None
    if magic.startswith(PARQUET_MAGIC):
        import pyarrow.parquet as pq

        try:
            return pq.read_table(path, columns=list(columns) if columns else None)
        except (pa.ArrowInvalid, OSError) as exc:
            raise InputError(
                f"{where(path)}: not a readable Parquet file (corrupt or truncated?): {exc}"
            ) from None
    return read_arrow(path, columns)
