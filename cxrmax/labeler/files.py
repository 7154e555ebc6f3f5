"""The labeler's files: texts read from plain lines, JSONL, CSV/TSV, Arrow or Parquet in chunks, and
label tables written atomically to Arrow or Parquet (what `cxrmax label` parses, calls and renders).

Formats are decided by `cxrmax.core.formats.sniff` where the name is a table format: the content
decides the compression (a ``.csv.gz`` is read as CSV, gzip data is decompressed whatever the suffix)
and Parquet data is Parquet whatever its name. Any other name (``.txt``, none, stdin) is plain lines,
one text per line, decompressed when the bytes are gzip/bzip2/xz.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import sys
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import pyarrow as pa
import pyarrow.parquet as pq

from cxrmax.core.errors import InputError, where
from cxrmax.core.formats import (
    COMPRESSIONS,
    MAX_FIELD_CHARS,
    PARQUET_MAGIC,
    FileKind,
    detect_format,
    open_binary,
    sniff,
)
from cxrmax.core.io import atomic_path, iter_arrow_batches, read_magic
from cxrmax.labeler.batch import LABEL_TABLE_SCHEMA, iter_label_tables

CHUNK_ROWS = 8192
#: Input formats of `iter_text_chunks` (``--format`` of `cxrmax label`).
INPUT_FORMATS = ("lines", "jsonl", "csv", "tsv", "arrow", "parquet")
#: Output suffixes of `write_labels`.
OUTPUT_SUFFIXES = (".arrow", ".parquet", ".feather", ".ipc")
_ARROW_SUFFIXES = (".arrow", ".feather", ".ipc")


@dataclass
class TextChunk:
    """One chunk of input rows: their texts (None where a row has no usable text) and the ``keep``
    columns of the same rows, as strings (Arrow/Parquet keep their own types)."""

    texts: list[object]
    kept: pa.Table


def input_kind(path: str, given: str | None = None) -> FileKind:
    """The format (one of `INPUT_FORMATS`) and compression of a labeler input; ``given`` forces the
    format (the compression still comes from the bytes)."""
    if given is not None and given not in INPUT_FORMATS:
        raise InputError(f"--format {given!r}: use {', '.join(INPUT_FORMATS)}")
    if path == "-":
        return FileKind(given or "lines", None)
    file = Path(path)
    if not file.exists():
        raise InputError(f"{path}: no such file")
    head = read_magic(file)
    compression = next((name for magic, name in COMPRESSIONS.items() if head.startswith(magic)), None)
    if given is not None:
        return FileKind(given, compression)
    if head.startswith(PARQUET_MAGIC):
        return FileKind("parquet", None)
    if file.suffix.lower() in _ARROW_SUFFIXES:
        return FileKind("arrow", None)
    try:
        detect_format(file)
    except InputError:  # not a table suffix (.txt, none): one text per line
        return FileKind("lines", compression)
    kind = sniff(file)
    return FileKind("jsonl" if kind.format == "json" else kind.format, kind.compression, kind.encoding)


def iter_text_chunks(
    path: str,
    field: str = "text",
    fmt: str | None = None,
    *,
    keep: Sequence[str] = (),
    lenient: bool = False,
    skipped: list[str] | None = None,
    chunk_rows: int = CHUNK_ROWS,
) -> Iterator[TextChunk]:
    """Yield the texts of ``path`` (``-`` for stdin) in chunks, never holding the whole input.

    ``fmt`` forces one of `INPUT_FORMATS` (default: `input_kind` decides). ``field`` is the JSONL field or the CSV/Arrow/Parquet column holding the text; ``keep`` names
    columns copied beside the labels. With ``lenient`` a malformed JSONL row gets no text and its
    message is appended to ``skipped``; without it the row is an InputError naming file, row and
    field."""
    kind = input_kind(path, fmt)
    skipped = skipped if skipped is not None else []
    if kind.format in ("lines", "jsonl"):
        if keep and kind.format == "lines":
            raise InputError("--keep needs JSONL, CSV, Arrow or Parquet input")
        with _open_lines(path, kind) as handle:
            yield from _line_chunks(handle, path, kind.format, field, keep, lenient, skipped, chunk_rows)
        return
    if path == "-":
        raise InputError(f"{kind.format} input must be a file, not stdin")
    if kind.format in ("csv", "tsv"):
        yield from _csv_chunks(Path(path), kind, field, keep, chunk_rows)
    else:
        yield from _table_chunks(Path(path), kind.format, field, keep, chunk_rows)


def _open_lines(path: str, kind: FileKind) -> contextlib.AbstractContextManager[IO[str]]:
    """A text handle on stdin (left open) or on the (decompressed) file. Undecodable bytes become
    U+FFFD, so one bad byte costs one text (the labeler flags it), not the run."""
    if path == "-":
        return contextlib.nullcontext(sys.stdin)
    raw = open_binary(Path(path), kind.compression)
    return io.TextIOWrapper(raw, encoding=kind.encoding, errors="replace")


def _line_chunks(
    handle: IO[str],
    path: str,
    fmt: str,
    field: str,
    keep: Sequence[str],
    lenient: bool,
    skipped: list[str],
    chunk_rows: int,
) -> Iterator[TextChunk]:
    """Chunks of plain lines (``\\n`` inside a line stands for a newline) or JSONL rows."""
    texts: list[object] = []
    extras: dict[str, list[str | None]] = {name: [] for name in keep}

    def flush() -> TextChunk:
        chunk = TextChunk(
            list(texts), pa.table({name: pa.array(values, pa.string()) for name, values in extras.items()})
        )
        texts.clear()
        for values in extras.values():
            values.clear()
        return chunk

    for row, line in enumerate(handle, start=1):
        line = line.rstrip("\n")
        if fmt == "lines":
            texts.append(line.replace("\\n", "\n"))
        else:
            if not line.strip():
                continue
            value, record = _jsonl_text(line, path, row, field, lenient, skipped)
            texts.append(value)
            for name in keep:
                extra = record.get(name)
                extras[name].append(None if extra is None else str(extra))
        if len(texts) >= chunk_rows:
            yield flush()
    if texts:
        yield flush()


def _jsonl_text(
    line: str, path: str, row: int, field: str, lenient: bool, skipped: list[str]
) -> tuple[object, dict]:
    """The text of one JSONL row and the row object ({} when it is not one)."""
    record: object = {}
    try:
        record = json.loads(line)
        if not isinstance(record, dict):
            raise ValueError("not a JSON object")
        if field not in record:
            raise KeyError(field)
        value = record[field]
        if value is not None and not isinstance(value, str):
            raise TypeError(f"{type(value).__name__}, not a string")
    except (ValueError, KeyError, TypeError) as exc:
        problem = f"{where(path, row, field)}: {exc}"
        if not lenient:
            raise InputError(problem + " (use --lenient to skip bad rows)") from None
        skipped.append(problem)
        return None, record if isinstance(record, dict) else {}
    return value, record


def _csv_chunks(
    path: Path, kind: FileKind, column: str, keep: Sequence[str], chunk_rows: int
) -> Iterator[TextChunk]:
    """Chunks of a CSV/TSV file with a header row (an empty cell is an empty text)."""
    # Reports are long: Python's default field limit (128 KiB) is not a file limit.
    csv.field_size_limit(max(csv.field_size_limit(), MAX_FIELD_CHARS))
    delimiter = "\t" if kind.format == "tsv" else ","
    raw = open_binary(path, kind.compression)
    with io.TextIOWrapper(raw, encoding=kind.encoding, newline="") as handle:
        reader = csv.reader(handle, delimiter=delimiter)
        header = [name.strip() for name in next(reader, [])]
        if not header:
            return
        _check_columns(path, header, column, keep)
        positions = {name: header.index(name) for name in (column, *keep)}
        rows: list[list[str]] = []
        try:
            for record in reader:
                if record:
                    rows.append(record)
                if len(rows) >= chunk_rows:
                    yield _csv_chunk(rows, positions, column, keep)
                    rows = []
        except csv.Error as exc:
            raise InputError(f"{where(path, row=reader.line_num)}: cannot parse CSV ({exc})") from None
        if rows:
            yield _csv_chunk(rows, positions, column, keep)


def _csv_chunk(
    rows: list[list[str]], positions: dict[str, int], column: str, keep: Sequence[str]
) -> TextChunk:
    def cells(name: str) -> list[str | None]:
        at = positions[name]
        return [record[at] if at < len(record) else None for record in rows]

    return TextChunk(cells(column), pa.table({name: pa.array(cells(name), pa.string()) for name in keep}))


def _table_chunks(
    path: Path, fmt: str, column: str, keep: Sequence[str], chunk_rows: int
) -> Iterator[TextChunk]:
    """Chunks of an Arrow IPC file/stream or a Parquet file (only the needed columns are read)."""
    names = list(dict.fromkeys([column, *keep]))
    if fmt == "parquet":
        try:
            schema_names = pq.ParquetFile(path).schema_arrow.names
        except Exception as exc:  # pyarrow raises several types for a bad file
            raise InputError(f"{path}: not a Parquet file ({exc})") from None
        _check_columns(path, schema_names, column, keep)
    checked = fmt == "parquet"
    for batch in iter_arrow_batches(path, names if checked else None):
        if not checked:
            _check_columns(path, batch.schema.names, column, keep)
            checked = True
        for start in range(0, batch.num_rows, chunk_rows):
            part = batch.slice(start, chunk_rows)
            kept = pa.table({name: part.column(part.schema.get_field_index(name)) for name in keep})
            yield TextChunk(_strings(part.column(part.schema.get_field_index(column)), path, column), kept)


def _check_columns(path: Path, available: Sequence[str], column: str, keep: Sequence[str]) -> None:
    for name in (column, *keep):
        if name not in available:
            raise InputError(f"{where(path, field=name)}: no such column; columns: {list(available)}")


def _strings(array: pa.Array, path: Path, column: str) -> list[object]:
    if pa.types.is_large_string(array.type) or pa.types.is_string(array.type):
        return array.to_pylist()
    if pa.types.is_binary(array.type) or pa.types.is_large_binary(array.type):
        return array.to_pylist()  # bytes: decoded (or flagged) by the labeler
    raise InputError(f"{where(path, field=column)}: column type {array.type} is not text")


def label_chunks(
    chunks: Iterable[TextChunk], processes: int | None = None, uncertain: str = "keep"
) -> Iterator[tuple[TextChunk, pa.Table]]:
    """Label a stream of chunks with one worker pool: yields each chunk with its LABEL_TABLE_SCHEMA
    table, in order (the pool may read ahead, so chunks wait in a queue until their labels come);
    ``uncertain`` as in label_texts."""
    pending: deque[TextChunk] = deque()

    def texts() -> Iterator[list[object]]:
        for chunk in chunks:
            pending.append(chunk)
            yield chunk.texts

    for table in iter_label_tables(texts(), processes=processes, uncertain=uncertain):
        yield pending.popleft(), table


def output_table(chunk: TextChunk, labels: pa.Table, first_row: int) -> pa.Table:
    """The rows written by `write_labels`: 1-based ``row``, the kept columns, then the labels."""
    rows = pa.array(range(first_row, first_row + labels.num_rows), pa.int64())
    return pa.Table.from_arrays(
        [rows, *chunk.kept.columns, *labels.columns],
        names=["row", *chunk.kept.column_names, *labels.column_names],
    )


def check_output(out: Path) -> None:
    """Refuse an output name `write_labels` cannot write, before any labelling starts."""
    if out.suffix.lower() not in OUTPUT_SUFFIXES:
        raise InputError(f"--out {out}: use a .arrow or .parquet file name")


def write_labels(tables: Iterable[pa.Table], out: Path, keep: Sequence[str] = ()) -> int:
    """Write label tables (`output_table` rows) to ``out`` (.parquet, else Arrow IPC file) atomically:
    a temporary file renamed into place, so an interrupted run never leaves a partial table. No
    tables still writes a valid, empty table (row, the ``keep`` columns, LABEL_TABLE_SCHEMA).
    Returns the rows written."""
    check_output(out)
    parquet = out.suffix.lower() == ".parquet"
    rows = 0
    with atomic_path(out) as tmp:
        writer = None
        try:
            for table in tables:
                if writer is None:
                    schema = table.schema
                    writer = pq.ParquetWriter(tmp, schema) if parquet else pa.ipc.new_file(str(tmp), schema)
                writer.write_table(table.cast(schema))
                rows += table.num_rows
            if writer is None:
                schema = pa.schema(
                    [pa.field("row", pa.int64())]
                    + [pa.field(name, pa.string()) for name in keep]
                    + list(LABEL_TABLE_SCHEMA)
                )
                writer = pq.ParquetWriter(tmp, schema) if parquet else pa.ipc.new_file(str(tmp), schema)
        finally:
            if writer is not None:
                writer.close()
    return rows
