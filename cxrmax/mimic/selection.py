"""Selection manifests: the output of `cxrmax mimic select` and the input of `generate`.

A manifest is a Parquet file or an Arrow IPC file/stream (``.arrow`` / ``.feather``) with the columns
of `SELECTION_SCHEMA`. There is one reader, `iter_selection`, which streams record batches (memory
stays flat on a 377,110-row manifest) and reads only the columns asked for; `read_selection` is the
whole table built from it. The format is recognised by content, not by name, and a truncated Arrow
stream is an error rather than a silently short selection."""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import pyarrow as pa
import pyarrow.feather as feather
import pyarrow.parquet as pq

from cxrmax.core.errors import InputError, where
from cxrmax.core.io import PARQUET_MAGIC, atomic_path, iter_arrow_batches, read_magic
from cxrmax.core.schemas import SELECTION_SCHEMA

__all__ = ["SELECTION_SUFFIXES", "iter_selection", "read_selection", "selection_columns", "write_selection"]

#: File name endings of a manifest; the ending chooses the format `write_selection` writes.
SELECTION_SUFFIXES = (".parquet", ".arrow", ".feather")


def write_selection(table: pa.Table, path: str | os.PathLike) -> Path:
    """Write a selection manifest atomically: Parquet for ``.parquet``, Arrow IPC for ``.arrow`` /
    ``.feather``. The table is cast to `SELECTION_SCHEMA` first."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in SELECTION_SUFFIXES:
        raise InputError(f"{where(path)}: selection manifests end in .parquet, .arrow or .feather")
    table = _conform(table, path)
    with atomic_path(path) as tmp:
        if suffix == ".parquet":
            pq.write_table(table, tmp)
        else:
            feather.write_feather(table, tmp, compression="zstd")
    return path


def selection_columns(path: str | os.PathLike) -> list[str]:
    """The column names of a manifest, read from its schema alone (no data is read)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{where(path)}: selection manifest not found (make one with `cxrmax mimic select`)")
    try:
        if read_magic(path).startswith(PARQUET_MAGIC):
            return list(pq.read_schema(path).names)
        with pa.memory_map(str(path), "r") as source:
            try:
                return list(pa.ipc.open_file(source).schema.names)
            except pa.ArrowInvalid:
                source.seek(0)
                return list(pa.ipc.open_stream(source).schema.names)
    except (pa.ArrowInvalid, OSError) as exc:
        raise InputError(f"{where(path)}: not a readable Parquet/Arrow selection: {exc}") from None


def iter_selection(
    path: str | os.PathLike, columns: Sequence[str] | None = None, batch_rows: int = 1024
) -> Iterator[pa.RecordBatch]:
    """Stream `columns` (default: all of `SELECTION_SCHEMA`) of a manifest in record batches of at
    most `batch_rows` rows, in file order. A missing column is an InputError naming it, raised before
    the first batch; so is a file that is neither Parquet nor Arrow, or a truncated Arrow stream."""
    path = Path(path)
    wanted = list(columns) if columns is not None else SELECTION_SCHEMA.names
    names = selection_columns(path)
    _check_columns(path, names, wanted)
    for batch in iter_arrow_batches(path, wanted):
        for offset in range(0, batch.num_rows, batch_rows):
            yield batch.slice(offset, batch_rows)


def read_selection(path: str | os.PathLike) -> pa.Table:
    """Read a selection manifest written by `write_selection` (or any Parquet/Arrow file or stream
    with the SELECTION_SCHEMA columns) as a table with exactly SELECTION_SCHEMA."""
    path = Path(path)
    names = selection_columns(path)
    _check_columns(path, names, SELECTION_SCHEMA.names)
    batches = list(iter_arrow_batches(path, SELECTION_SCHEMA.names))
    if batches:
        table = pa.Table.from_batches(batches)
    else:  # an empty manifest: no batch to take the schema from
        table = SELECTION_SCHEMA.empty_table()
    return _conform(table, path)


def _check_columns(path: Path, names: Sequence[str], wanted: Sequence[str]) -> None:
    missing = [name for name in wanted if name not in names]
    if missing:
        raise InputError(
            f"{where(path, field=missing[0])}: selection is missing columns {', '.join(missing)}"
        )


def _conform(table: pa.Table, path: Path) -> pa.Table:
    """`table` with exactly the columns and types of SELECTION_SCHEMA (extra columns dropped)."""
    _check_columns(path, table.column_names, SELECTION_SCHEMA.names)
    table = table.select(SELECTION_SCHEMA.names)
    try:
        return table.cast(SELECTION_SCHEMA)
    except (pa.ArrowInvalid, pa.ArrowTypeError, ValueError) as exc:
        raise InputError(f"{where(path)}: selection does not match SELECTION_SCHEMA: {exc}") from None
