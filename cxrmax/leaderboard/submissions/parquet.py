"""The Parquet submission reader: record batches, with pandas' index kept as the key."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from cxrmax.core.errors import InputError, where
from cxrmax.leaderboard.submissions.batch import RawBatch


def parquet_batches(path: Path, batch_rows: int) -> Iterator[RawBatch]:
    try:
        parquet = pq.ParquetFile(path)
    except (pa.ArrowInvalid, OSError) as exc:
        raise InputError(f"{where(path)}: not a readable Parquet file (truncated?): {exc}") from None
    # pandas stores an evenly spaced index (a RangeIndex) in its metadata only, not as a column: a
    # DataFrame indexed by study_id must not lose its key because the ids happen to be evenly spaced.
    ranges = []
    try:
        metadata = parquet.schema_arrow.pandas_metadata or {}
    except (ValueError, TypeError):  # foreign or broken pandas metadata: plain columns only
        metadata = {}
    for index in metadata.get("index_columns", []):
        if isinstance(index, dict) and index.get("kind") == "range" and index.get("name"):
            if index["name"] not in parquet.schema_arrow.names:
                ranges.append((str(index["name"]), int(index["start"]), int(index["step"])))
    start = 1
    try:
        # use_pandas_metadata: a DataFrame saved with study_id as its index keeps it as a column.
        for batch in parquet.iter_batches(batch_size=batch_rows, use_pandas_metadata=bool(metadata)):
            rows = np.arange(start, start + batch.num_rows, dtype=np.int64)
            columns = {name: batch.column(i) for i, name in enumerate(batch.schema.names)}
            for name, first, step in ranges:
                columns[name] = pa.array(first + step * (rows - 1))
            start += batch.num_rows
            yield RawBatch(rows, columns)
    except (pa.ArrowInvalid, OSError) as exc:
        raise InputError(f"{where(path, row=start)}: cannot read Parquet data (truncated?): {exc}") from None
