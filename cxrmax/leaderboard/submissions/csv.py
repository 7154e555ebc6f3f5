"""The CSV / TSV submission reader: streamed in batches, delimiter and header problems named."""

from __future__ import annotations

import csv
import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from cxrmax.core.errors import InputError, where
from cxrmax.core.formats import MAX_FIELD_CHARS, FileKind, open_text
from cxrmax.core.pathologies import OBSERVATIONS
from cxrmax.leaderboard.submissions.batch import RawBatch, ReadLog
from cxrmax.leaderboard.submissions.values import PLAIN_STUDY_ID


def _choose_delimiter(header_line: str, default: str) -> str:
    """The default delimiter, unless the header holds none of it but holds ``;`` or a tab (a CSV
    saved by a European-locale Excel, or a TSV named .csv)."""
    if default in header_line:
        return default
    for candidate in (";", "\t", ","):
        if candidate != default and candidate in header_line:
            return candidate
    return default


def csv_batches(
    path: Path, batch_rows: int, delimiter: str, kind: FileKind, lenient: bool, log: ReadLog
) -> Iterator[RawBatch]:
    # Long free-text reports are legitimate; Python's default limit (128 KiB) is not a file limit.
    csv.field_size_limit(max(csv.field_size_limit(), MAX_FIELD_CHARS))
    with open_text(path, kind) as fh:
        header_line = fh.readline(MAX_FIELD_CHARS)
        while header_line and not header_line.strip():  # blank lines before the header
            header_line = fh.readline(MAX_FIELD_CHARS)
        if not header_line:
            raise InputError(f"{where(path)}: the file is empty")
        excel_sep = re.fullmatch(r"sep=(.)\r?\n?", header_line)
        if excel_sep:  # Excel's first line naming the delimiter
            chosen = excel_sep.group(1)
            header_line = fh.readline(MAX_FIELD_CHARS)
        else:
            chosen = _choose_delimiter(header_line, delimiter)
        if chosen != delimiter:
            log.notes.append(f"CSV delimiter {chosen!r} detected")
        while (
            header_line.count('"') % 2 and len(header_line) < MAX_FIELD_CHARS
        ):  # a quoted name spanning lines
            more = fh.readline(MAX_FIELD_CHARS)
            if not more:
                break
            header_line += more
        try:
            header = next(csv.reader([header_line], delimiter=chosen, strict=True))
        except (csv.Error, StopIteration) as exc:
            raise InputError(f"{where(path)}: cannot parse the header: {exc}") from None
        header = [h.strip().lstrip("\ufeff") for h in header]
        if header and PLAIN_STUDY_ID.fullmatch(header[0]):
            raise InputError(
                f"{where(path)} line 1: starts with {header[0]!r}, data rather than column names; the first "
                f"line must be a header such as study_id,{OBSERVATIONS[0]},... or study_id,report"
            )
        named = [h for h in header if h]
        if len(set(named)) != len(named):
            dup = next(h for h in named if named.count(h) > 1)
            raise InputError(f"{where(path, field=dup)}: column appears twice in the header")
        # Unnamed columns (pandas' index written without index=False, a trailing comma) get
        # placeholder names that plan_columns ignores.
        header = [h or f"Unnamed: {i}" for i, h in enumerate(header)]
        reader = csv.reader(fh, delimiter=chosen, strict=True)
        width = len(header)
        records: list[list[str]] = []
        rows: list[int] = []
        row_number = 0
        while True:
            try:
                record = next(reader)
            except StopIteration:
                break
            except csv.Error as exc:
                text = str(exc)
                if "field larger than field limit" in text:
                    text = f"a field over {MAX_FIELD_CHARS >> 20} MB (an unbalanced quote?)"
                elif "NUL" in text:
                    text = "NUL bytes (a binary file?)"
                else:
                    text = f"truncated file or unbalanced quote? {text}"
                raise InputError(f"{where(path, row=row_number + 1)}: cannot parse CSV ({text})") from None
            row_number += 1
            if all(not cell.strip() for cell in record):
                continue  # a blank line, or a row of empty cells as spreadsheets write them
            if len(record) > width and not any(cell.strip() for cell in record[width:]):
                record = record[:width]  # trailing delimiters with nothing after them
            if len(record) != width:
                message = (
                    f"{where(path, row=row_number)}: {len(record)} fields where the header has {width} "
                    "(truncated file or stray delimiter?)"
                )
                if lenient:
                    log.skip(message)
                    continue
                raise InputError(message)
            records.append(record)
            rows.append(row_number)
            if len(records) >= batch_rows:
                yield _columns_batch(header, records, rows)
                records, rows = [], []
        yield _columns_batch(header, records, rows)


def _columns_batch(header: list[str], records: list[list[str]], rows: list[int]) -> RawBatch:
    columns = list(zip(*records, strict=True)) if records else [() for _ in header]
    return RawBatch(np.asarray(rows, dtype=np.int64), dict(zip(header, columns, strict=True)))
