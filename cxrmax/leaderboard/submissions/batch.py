"""What every submission reader yields: `RawBatch`es of raw rows, and a `ReadLog` of what it noticed."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cxrmax.core.errors import InputError, where

BATCH_ROWS = 8192


@dataclass
class RawBatch:
    """One batch of raw rows: ``rows`` are 1-based data row numbers, ``columns`` map a column name to
    its values (Python values, or a pyarrow array for Parquet)."""

    rows: np.ndarray
    columns: dict[str, Any]

    def __len__(self) -> int:
        return len(self.rows)


def check_file(path: Path) -> None:
    """A submission must be an existing regular file: say plainly when it is missing or a folder."""
    if path.is_dir():
        raise InputError(
            f"{where(path)}: is a folder; a submission is a file (.csv, .tsv, .jsonl, .json, .parquet)"
        )
    if not path.exists():
        raise InputError(f"{where(path)}: submission file not found")
    if not path.is_file():
        raise InputError(f"{where(path)}: not a regular file")


@dataclass
class ReadLog:
    """What a reader noticed on the way: notes for the result, rows skipped with ``lenient``."""

    notes: list[str] = field(default_factory=list)
    skipped: int = 0
    skipped_examples: list[str] = field(default_factory=list)

    def skip(self, message: str) -> None:
        """Count one unreadable row skipped under ``lenient`` (the first few messages are kept)."""
        self.skipped += 1
        if len(self.skipped_examples) < 3:
            self.skipped_examples.append(message)

    def summary(self) -> list[str]:
        """Notes plus one line on the skipped rows, if any."""
        notes = list(self.notes)
        if self.skipped:
            notes.append(
                f"--lenient: {self.skipped} unreadable rows skipped, their studies count as missing "
                f"(e.g. {'; '.join(self.skipped_examples)})"
            )
        return notes


def dict_batch(records: list[dict[str, Any]], rows: list[int], seen: list[str]) -> RawBatch:
    """A batch from row objects (JSON, JSONL): one column per key seen so far, in first-seen order;
    a key a row leaves out is blank (None) in that row."""
    for record in records:
        for key in record:
            if key not in seen:
                seen.append(key)
    columns = {key: [record.get(key) for record in records] for key in seen}
    return RawBatch(np.asarray(rows, dtype=np.int64), columns)
