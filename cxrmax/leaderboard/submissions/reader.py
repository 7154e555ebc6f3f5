"""`iter_batches`: any submission file as a stream of `RawBatch`es, whatever its format or compression."""

from __future__ import annotations

import gzip
import lzma
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa

from cxrmax.core.errors import InputError, where
from cxrmax.core.formats import decode_error_message, detect_format, sniff
from cxrmax.leaderboard.submissions.batch import BATCH_ROWS, RawBatch, ReadLog, check_file
from cxrmax.leaderboard.submissions.csv import csv_batches
from cxrmax.leaderboard.submissions.json import json_batches, jsonl_batches
from cxrmax.leaderboard.submissions.parquet import parquet_batches


def iter_batches(
    path: str | Path, batch_rows: int = BATCH_ROWS, lenient: bool = False, log: ReadLog | None = None
) -> Iterator[RawBatch]:
    """Stream a submission file as `RawBatch`es. Raises InputError for empty, truncated or malformed
    files; with ``lenient`` unparseable lines are skipped and counted in ``log``."""
    path = Path(path)
    log = log if log is not None else ReadLog()
    check_file(path)
    if path.stat().st_size == 0:
        raise InputError(f"{where(path)}: the file is empty")
    kind = sniff(path)
    if kind.format == "parquet" and detect_format(path) != "parquet":
        log.notes.append(f"{path.name} holds Parquet data: read as Parquet")
    suffix_of = {"gzip": ".gz", "bz2": ".bz2", "xz": ".xz"}
    if kind.compression and path.suffix.lower() != suffix_of[kind.compression]:
        log.notes.append(f"{path.name} is {kind.compression}-compressed: decompressed while reading")
    fmt = kind.format
    produced = False
    try:
        if fmt in ("csv", "tsv"):
            source = csv_batches(path, batch_rows, "\t" if fmt == "tsv" else ",", kind, lenient, log)
        elif fmt == "jsonl":
            source = jsonl_batches(path, batch_rows, kind, lenient, log)
        elif fmt == "json":
            source = json_batches(path, batch_rows, kind)
        else:
            source = parquet_batches(path, batch_rows)
        for batch in source:
            if len(batch):
                produced = True
                yield _expand_label_struct(batch, path)
    except UnicodeDecodeError:
        raise InputError(decode_error_message(path, kind)) from None
    except PermissionError:
        raise InputError(f"{where(path)}: permission denied (cannot read the submission file)") from None
    except (EOFError, gzip.BadGzipFile, OSError, lzma.LZMAError) as exc:
        raise InputError(f"{where(path)}: cannot read the file (truncated or corrupt?): {exc}") from None
    if not produced:
        raise InputError(
            f"{where(path)}: no data rows" + (" (every line was skipped)" if log.skipped else "")
        )


#: A nested column of per-observation values (cxrmax's own tables use ``labels``, shards.LABELS_TYPE).
STRUCT_COLUMNS = ("labels", "predicted_labels", "predictions", "probabilities", "scores")


def _expand_label_struct(batch: RawBatch, path: Path) -> RawBatch:
    """Flatten a ``labels`` struct (Parquet) or object (JSON) column into one column per field, so a
    table with shards.LABELS_TYPE scores like one with 14 observation columns."""
    name = next((c for c in batch.columns if c.strip().lower() in STRUCT_COLUMNS), None)
    if name is None:
        return batch
    values = batch.columns[name]
    if not hasattr(values, "type") and not any(isinstance(item, dict) for item in values):
        return batch  # not nested (e.g. a text column called "predictions"): plan_columns decides
    batch.columns.pop(name)
    expanded: dict[str, Any] = {}
    if hasattr(values, "type"):
        if not pa.types.is_struct(values.type):
            raise InputError(
                f"{where(path, field=name)}: expected a struct of observation values, got {values.type}"
            )
        # flatten() carries a null struct into its fields: every observation of that row is blank.
        for i, field_values in enumerate(values.flatten()):
            expanded[values.type.field(i).name] = field_values
    else:
        keys: list[str] = []
        for i, item in enumerate(values):
            if item is None:
                continue
            if not isinstance(item, dict):
                raise InputError(
                    f"{where(path, row=int(batch.rows[i]), field=name)}: expected an object of observation values"
                )
            keys += [k for k in item if k not in keys]
        for key in keys:
            expanded[key] = [None if item is None else item.get(key) for item in values]
    clash = [k for k in expanded if k in batch.columns]
    if clash:
        raise InputError(f"{where(path, field=clash[0])}: given both as a column and inside {name!r}")
    batch.columns.update(expanded)
    return batch
