"""Streaming submission readers and validation.

Formats (chosen by file suffix unless the content says otherwise, optionally compressed):
- ``.csv`` / ``.tsv``: header row, one row per study.
- ``.jsonl`` / ``.ndjson``: one JSON object per line.
- ``.parquet``: one row per study, read in record batches.
- ``.json``: ReXrank style, an object keyed by study_id whose values are objects with
  ``model_prediction`` (or plain strings), or an array of row objects. Parsed incrementally, so a
  large file never sits in memory whole.

Rows are keyed by ``study_id`` (8 digits, an ``s`` prefix is accepted). A row carries either one value
per observation (1 / 0 / -1 / blank, or a probability in [0, 1]), or free text (``report``,
``model_prediction``, ...), or, for MS-CXR-T, one progression answer per finding. Every problem is a
`cxrmax.core.errors.InputError` naming the file, the row (1-based data row; JSON entries count as rows,
JSONL rows are lines) and the field.

Unusual but unambiguous input is read, and documented here:
- the content decides over the name: gzip, bzip2 and xz data are decompressed with or without their
  suffix (``.gz``/``.bz2``/``.xz``; zstd and ZIP are refused by name), a Parquet file is read as
  Parquet whatever its suffix; text is UTF-8 (a byte-order mark dropped) or UTF-16 with its
  byte-order mark; other encodings are refused naming the line, never guessed; no line is read past
  64 MB;
- CSV: ``;`` or tab as the delimiter when the header holds no comma, or as Excel's ``sep=`` line
  says; blank or whitespace-only lines and rows of empty cells are skipped; unnamed columns (pandas'
  index, a trailing comma) are ignored; a first line of data instead of a header is named;
- Parquet: a pandas index named study_id is the key (also an evenly spaced one pandas keeps only in
  its metadata);
- study ids ``50414267``, ``s50414267``, ``50414267.0`` and MIMIC paths or keys holding exactly one
  ``s<digits>`` part (``p10/p10000032/s50414267``) all name study 50414267;
- label cells ``true``/``false``/``yes``/``no`` (and JSON/Parquet booleans) are 1/0.
With ``lenient``, rows that cannot be read (a broken JSON line, a CSV row with the wrong number of
fields, an unreadable study id, label value or text) are skipped and counted instead of stopping the
run; their studies count as missing.
"""

from __future__ import annotations

import csv
import decimal
import gzip
import json
import lzma
import math
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np

from cxrmax.core.errors import InputError, where
from cxrmax.core.formats import (
    MAX_FIELD_CHARS,
    FileKind,
    decode_error_message,
    detect_format,
    open_text,
    sniff,
)
from cxrmax.core.pathologies import (
    MS_CXR_T_FINDINGS,
    MS_CXR_T_SHORT,
    OBSERVATIONS,
    canonical_name,
    is_observation,
)

BATCH_ROWS = 8192
KEY_COLUMNS = ("study_id", "study", "studyid")
TEXT_COLUMNS = (
    "model_prediction",
    "report",
    "text",
    "prediction",
    "generated_report",
    "generated",
    "answer",
    "rationale",
    "output",
)
MODEL_COLUMNS = ("model", "model_name", "source")
#: Columns a submission may carry that scoring does not use.
PASSTHROUGH_COLUMNS = frozenset(
    {
        "subject_id",
        "dicom_id",
        "sample_id",
        "split",
        "image_path",
        "previous_dicom_id",
        "previous_study_id",
        "view",
        "prompt",
        "prompt_id",
        "id",
        # Input fields a ReXrank-style file carries next to model_prediction (never scored).
        "image_paths",
        "images",
        "context",
        "indication",
        "history",
        "comparison",
        "technique",
        "section_findings",
        "section_impression",
        "reference",
        "reference_report",
        "ground_truth",
    }
)
#: Placeholder names of unnamed columns (pandas' index, a trailing comma), ignored by plan_columns.
UNNAMED_COLUMN = re.compile(r"unnamed: \d+|index|level_0|__index_level_\d+__")


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
            source = _csv_batches(path, batch_rows, "\t" if fmt == "tsv" else ",", kind, lenient, log)
        elif fmt == "jsonl":
            source = _jsonl_batches(path, batch_rows, kind, lenient, log)
        elif fmt == "json":
            source = _json_batches(path, batch_rows, kind)
        else:
            source = _parquet_batches(path, batch_rows)
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
        import pyarrow as pa

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


def _choose_delimiter(header_line: str, default: str) -> str:
    """The default delimiter, unless the header holds none of it but holds ``;`` or a tab (a CSV
    saved by a European-locale Excel, or a TSV named .csv)."""
    if default in header_line:
        return default
    for candidate in (";", "\t", ","):
        if candidate != default and candidate in header_line:
            return candidate
    return default


def _csv_batches(
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
        if header and _PLAIN_ID.fullmatch(header[0]):
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


def _dict_batch(records: list[dict[str, Any]], rows: list[int], seen: list[str]) -> RawBatch:
    for record in records:
        for key in record:
            if key not in seen:
                seen.append(key)
    columns = {key: [record.get(key) for record in records] for key in seen}
    return RawBatch(np.asarray(rows, dtype=np.int64), columns)


def _bounded_lines(fh: IO[str], path: Path, lenient: bool, log: ReadLog) -> Iterator[tuple[int, str]]:
    """Lines with their 1-based numbers, never holding more than MAX_FIELD_CHARS of one line: a
    gigantic line (a whole JSON array on one line, a binary blob) is an error naming it, or with
    ``lenient`` skipped and counted."""
    line_number = 0
    while True:
        line = fh.readline(MAX_FIELD_CHARS)
        if not line:
            return
        line_number += 1
        if len(line) < MAX_FIELD_CHARS or line.endswith(("\n", "\r")):
            yield line_number, line
            continue
        message = f"{where(path, row=line_number)}: a line over {MAX_FIELD_CHARS >> 20} MB (one JSON array on one line? JSON Lines hold one object per line)"
        if not lenient:
            raise InputError(message)
        log.skip(message)
        while line and not line.endswith(("\n", "\r")):  # drop the rest of the line
            line = fh.readline(MAX_FIELD_CHARS)


def _jsonl_batches(
    path: Path, batch_rows: int, kind: FileKind, lenient: bool, log: ReadLog
) -> Iterator[RawBatch]:
    seen: list[str] = []
    records: list[dict[str, Any]] = []
    rows: list[int] = []
    with open_text(path, kind) as fh:
        for row_number, line in _bounded_lines(fh, path, lenient, log):
            if not line.strip():
                continue
            problem = None
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                hint = ""
                if not line.endswith("\n"):
                    hint = " (truncated last line?)"
                if exc.msg == "Extra data":
                    hint = " (several JSON values on one line: put one object per line)"
                elif records == [] and line.lstrip()[:1] == "[":
                    hint = (
                        " (the file looks like one JSON array: name it .json, or write one object per line)"
                    )
                problem = (
                    f"{where(path, row=row_number)}: invalid JSON{hint}: {exc.msg} (character {exc.pos + 1})"
                )
            else:
                if not isinstance(record, dict):
                    problem = f"{where(path, row=row_number)}: each line must be a JSON object, not {type(record).__name__}"
            if problem:
                if lenient:
                    log.skip(problem)
                    continue
                raise InputError(problem)
            records.append(record)
            rows.append(row_number)
            if len(records) >= batch_rows:
                yield _dict_batch(records, rows, seen)
                records, rows = [], []
    yield _dict_batch(records, rows, seen)


class _JsonStream:
    """Incremental reader of a top-level JSON object or array: yields (key, value) pairs (key None for
    arrays) without loading the file. Values larger than `max_value_chars` are refused."""

    def __init__(self, fh: IO[str], path: Path, chunk: int = 1 << 20, max_value_chars: int = MAX_FIELD_CHARS):
        self.fh, self.path, self.chunk, self.max_value_chars = fh, path, chunk, max_value_chars
        self.buf, self.pos, self.eof = "", 0, False
        self.lines_before = 0  # newlines in text already dropped from the buffer
        self.decoder = json.JSONDecoder()

    def _more(self) -> None:
        data = self.fh.read(self.chunk)
        if not data:
            self.eof = True
        self.lines_before += self.buf.count("\n", 0, self.pos)
        self.buf = self.buf[self.pos :] + data
        self.pos = 0

    def line(self, pos: int | None = None) -> int:
        """1-based line of a buffer position (default: the current one), for error messages."""
        pos = self.pos if pos is None else pos
        return self.lines_before + self.buf.count("\n", 0, pos) + 1

    def _at(self, entry: int) -> str:
        """Where the reader is: the entry (row) and, for people with an editor open, the line."""
        return f"{where(self.path, row=entry)}: line {self.line()}"

    def _skip_ws(self) -> bool:
        """Advance past whitespace; False at end of file."""
        while True:
            while self.pos < len(self.buf) and self.buf[self.pos] in " \t\r\n":
                self.pos += 1
            if self.pos < len(self.buf):
                return True
            if self.eof:
                return False
            self._more()

    def _value(self, entry: int) -> Any:
        while True:
            try:
                value, end = self.decoder.raw_decode(self.buf, self.pos)
                if end == len(self.buf) and not self.eof:
                    raise json.JSONDecodeError("value may continue", self.buf, end)
                self.pos = end
                return value
            except json.JSONDecodeError as exc:
                if self.eof:
                    hint = ""
                    if exc.msg.startswith("Expecting property name") and self.buf[
                        : exc.pos
                    ].rstrip().endswith(","):
                        hint = " (a trailing comma before '}'? JSON does not allow one)"
                    raise InputError(
                        f"{where(self.path, row=entry)}: invalid or truncated JSON{hint}: {exc.msg} (line {self.line(exc.pos)})"
                    ) from None
                if len(self.buf) - self.pos > self.max_value_chars:
                    raise InputError(
                        f"{self._at(entry)}, invalid JSON or an entry over {self.max_value_chars >> 20} MB"
                    ) from None
                self._more()

    def _expect(self, char: str, entry: int) -> None:
        if not self._skip_ws():
            raise InputError(f"{self._at(entry)}, truncated JSON (expected {char!r})")
        if self.buf[self.pos] != char:
            raise InputError(
                f"{where(self.path, row=entry)}: invalid JSON: expected {char!r}, found {self.buf[self.pos]!r} (line {self.line()})"
            )
        self.pos += 1

    def items(self) -> Iterator[tuple[str | None, Any]]:
        if not self._skip_ws():
            raise InputError(f"{where(self.path)}: the file is empty")
        opening = self.buf[self.pos]
        if opening not in "{[":
            raise InputError(
                f"{where(self.path)}: expected a JSON object keyed by study_id or an array of rows"
            )
        closing = "}" if opening == "{" else "]"
        self.pos += 1
        entry = 0
        while True:
            if not self._skip_ws():
                raise InputError(
                    f"{where(self.path, row=entry + 1)}: truncated JSON (file ends inside the top-level value)"
                )
            if self.buf[self.pos] == closing:
                self.pos += 1
                break
            if entry:
                self._expect(",", entry + 1)
                if not self._skip_ws():
                    raise InputError(f"{self._at(entry + 1)}, truncated JSON (file ends after a comma)")
                if self.buf[self.pos] == closing:
                    raise InputError(
                        f"{self._at(entry)}, a trailing comma before {closing!r} (JSON does not allow one; remove it)"
                    )
            entry += 1
            key = None
            if opening == "{":
                key = self._value(entry)
                if not isinstance(key, str):
                    raise InputError(f"{where(self.path, row=entry)}: invalid JSON object key")
                self._expect(":", entry)
                self._skip_ws()
            yield key, self._value(entry)
        if self._skip_ws():
            raise InputError(
                f"{where(self.path)}: line {self.line()}, unexpected data after the top-level JSON value "
                "(one JSON object per line is JSON Lines: name the file .jsonl)"
            )


def _json_batches(path: Path, batch_rows: int, kind: FileKind) -> Iterator[RawBatch]:
    seen: list[str] = []
    records: list[dict[str, Any]] = []
    rows: list[int] = []
    with open_text(path, kind) as fh:
        for entry, (key, value) in enumerate(_JsonStream(fh, path).items(), start=1):
            if key is not None:
                low = key.strip().lower()
                if isinstance(value, (dict, list)) and (
                    low in KEY_COLUMNS or low in TEXT_COLUMNS or is_observation(key)
                ):
                    raise InputError(
                        f"{where(path, row=entry, field=key)}: the object is keyed by column names "
                        "(pandas' default to_json() is column-oriented); write rows instead: "
                        "to_json(orient='records'), or orient='records', lines=True for a .jsonl file"
                    )
                if low in ("columns", "data") and isinstance(value, list):
                    raise InputError(
                        f"{where(path, row=entry, field=key)}: this looks like pandas' to_json(orient='split' or 'table'); "
                        "write orient='records' instead"
                    )
                if isinstance(value, str) or value is None:
                    value = {"model_prediction": value}
                if not isinstance(value, dict):
                    if low in KEY_COLUMNS:
                        hint = (
                            "this object is one row, not a mapping keyed by study id: for one object per "
                            "line name the file .jsonl, otherwise wrap the rows in a JSON array"
                        )
                    elif isinstance(value, list) and study_id_from_text(key) is None:
                        hint = (
                            f"{key!r} holds a list: a .json submission is an array of rows or an object "
                            "keyed by study_id, not a wrapper object; write the list itself"
                        )
                    else:
                        hint = f"expected an object with model_prediction, got {type(value).__name__}"
                    raise InputError(f"{where(path, row=entry, field=key)}: {hint}")
                if "study_id" in value and str(value["study_id"]) != key:
                    hint = ""
                    if key.isdigit() and len(key) < 8:
                        hint = (
                            " (keys that number the rows, as pandas' to_json(orient='index') writes, are not "
                            "study ids: write orient='records')"
                        )
                    raise InputError(
                        f"{where(path, row=entry, field='study_id')}: {value['study_id']!r} differs from its key {key!r}{hint}"
                    )
                value = {"study_id": key, **{k: v for k, v in value.items() if k != "study_id"}}
            elif not isinstance(value, dict):
                hint = (
                    " (a list of lists has no column names, as pandas' to_json(orient='values') writes: "
                    "write orient='records')"
                    if isinstance(value, list)
                    else ""
                )
                raise InputError(f"{where(path, row=entry)}: each array element must be an object{hint}")
            records.append(value)
            rows.append(entry)
            if len(records) >= batch_rows:
                yield _dict_batch(records, rows, seen)
                records, rows = [], []
    yield _dict_batch(records, rows, seen)


def _parquet_batches(path: Path, batch_rows: int) -> Iterator[RawBatch]:
    import pyarrow as pa
    import pyarrow.parquet as pq

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


# ---------------------------------------------------------------------------------------------------
# Column roles


@dataclass
class ColumnPlan:
    """What each submission column means."""

    key: str | None = None
    observations: dict[str, str] = field(default_factory=dict)  # source column -> observation
    text: str | None = None
    model: str | None = None
    progression: dict[str, str] = field(default_factory=dict)  # source column -> ms-cxr-t finding prefix
    ignored: list[str] = field(default_factory=list)


def _progression_prefix(name: str) -> str | None:
    low = name.strip().lower().replace(" ", "_")
    for suffix in ("_progression", "_answer"):
        if low.endswith(suffix):
            low = low[: -len(suffix)]
    for prefix, short in MS_CXR_T_SHORT.items():
        if low in (prefix, short.lower()):
            return prefix
    return None


def plan_columns(
    columns: Sequence[str], kind: str, path: Path, row: int | None = None, lenient: bool = False
) -> ColumnPlan:
    """Assign a role to every column for a task kind; unknown columns are an error (ignored and listed
    with ``lenient``)."""
    plan = ColumnPlan()
    for name in columns:
        low = name.strip().lower()
        if re.sub(r"[\s_\-]+", "", low) in ("studyid", "study") and plan.key is None:  # "Study ID", "studyId"
            plan.key = name
        elif low in MODEL_COLUMNS and plan.model is None:
            plan.model = name
        elif low in TEXT_COLUMNS and plan.text is None:
            plan.text = name
        elif kind == "ms-cxr-t" and _progression_prefix(name):
            plan.progression[name] = _progression_prefix(name)  # type: ignore[assignment]
        elif kind == "labels" and is_observation(name):
            obs = canonical_name(name)
            if obs in plan.observations.values():
                raise InputError(
                    f"{where(path, row=row, field=name)}: observation {obs!r} given by two columns"
                )
            plan.observations[name] = obs
        elif low in PASSTHROUGH_COLUMNS or (kind == "report" and low in ("findings", "impression")):
            plan.ignored.append(name)
        elif not low or UNNAMED_COLUMN.fullmatch(low):
            plan.ignored.append(name)  # an unnamed column cannot be a label: pandas' index, a trailing comma
        elif lenient:
            plan.ignored.append(name)
        else:
            raise InputError(
                f"{where(path, row=row, field=name)}: unexpected column for a {kind} submission; {expected_columns(kind)}"
            )
    return plan


def expected_columns(kind: str) -> str:
    """The columns a submission of this task kind needs, as a sentence for error messages."""
    text = "one of " + ", ".join(TEXT_COLUMNS)
    if kind == "labels":
        return f"expected study_id and the 14 observation columns ({', '.join(OBSERVATIONS)}) or a text column ({text})"
    if kind == "ms-cxr-t":
        return f"expected study_id and per-finding columns ({', '.join(MS_CXR_T_FINDINGS)}, optionally with _progression) or a text column ({text})"
    if kind == "rationale":
        return f"expected study_id, model and a text column ({text})"
    return f"expected study_id and a text column ({text})"


# ---------------------------------------------------------------------------------------------------
# Value parsing (vectorised where the input allows)


def _as_list(values: Any) -> list[Any]:
    if hasattr(values, "to_pylist"):
        return values.to_pylist()
    return list(values)


_PLAIN_ID = re.compile(r"[sS]?([0-9]+)(?:\.0*)?")
#: An ``s<digits>`` part inside a longer key: MIMIC paths (p10/p10000032/s50414267), p..._s... keys.
_EMBEDDED_ID = re.compile(r"(?<![A-Za-z0-9])[sS]([0-9]+)(?![0-9])")
_MAX_ID_DIGITS = 18  # int64


def study_id_from_text(text: str) -> int | None:
    """The study number in a key, or None: ``50414267``, ``s50414267``, ``50414267.0`` (a spreadsheet's
    float), or a longer key holding exactly one ``s<digits>`` part (``p10/p10000032/s50414267``,
    ``p10000032_s50414267.txt``)."""
    text = text.strip()
    match = _PLAIN_ID.fullmatch(text)
    if match:
        digits = match.group(1)
    else:
        found = set(_EMBEDDED_ID.findall(text))
        if len(found) != 1:
            return None
        digits = found.pop()
    if len(digits.lstrip("0")) > _MAX_ID_DIGITS:
        return None
    return int(digits)


def _bad_study_id(value: Any, path: Path, row: int, field_name: str) -> InputError:
    text = str(value).strip() if value is not None else ""
    if value is None or text == "":
        shown = "blank"
    else:
        shown = repr(value)
    hint = ""
    if re.fullmatch(r"[0-9.]+[eE][+-]?[0-9]+", text):
        hint = " (scientific notation, as a spreadsheet writes large numbers, loses digits: format the column as a whole number)"
    return InputError(
        f"{where(path, row=row, field=field_name)}: study_id {shown} is not a study number{hint}"
    )


def parse_study_ids(values: Any, rows: np.ndarray, path: Path, field_name: str = "study_id") -> np.ndarray:
    """study_id values -> int64 array. Accepts ints, whole floats and the text forms of
    `study_id_from_text`; anything else is an InputError naming the row."""
    if hasattr(values, "type"):
        import pyarrow as pa

        if pa.types.is_integer(values.type) and values.null_count == 0:
            numbers = values.to_numpy()
            if numbers.dtype == np.uint64 and numbers.size and numbers.max() > np.iinfo(np.int64).max:
                i = int(np.argmax(numbers > np.iinfo(np.int64).max))
                raise _bad_study_id(int(numbers[i]), path, int(rows[i]), field_name)
            return numbers.astype(np.int64)
    items = _as_list(values)
    out = np.empty(len(items), dtype=np.int64)
    limit = 10**_MAX_ID_DIGITS
    for i, value in enumerate(items):
        number: int | None = None
        if isinstance(value, bool):
            number = None  # True is not study 1
        elif isinstance(value, int):
            number = value
        elif isinstance(value, float) and value.is_integer():
            number = int(value)
        elif isinstance(value, str):
            text = value.strip()
            # The common case (plain ASCII digits) without the regular expressions.
            fast = text.isdigit() and text.isascii() and len(text) <= _MAX_ID_DIGITS
            number = int(text) if fast else study_id_from_text(text)
        if number is None or not 0 <= number < limit:
            raise _bad_study_id(value, path, int(rows[i]), field_name)
        out[i] = number
    return out


def parse_text_keys(values: Any, rows: np.ndarray, path: Path, field_name: str) -> np.ndarray:
    """A text key column (dicom_id) as a numpy string array; blanks are an error naming the row."""
    items = _as_list(values)
    out = []
    for i, value in enumerate(items):
        text = str(value).strip() if value is not None else ""
        if not text:
            raise InputError(f"{where(path, row=int(rows[i]), field=field_name)}: blank {field_name}")
        out.append(text)
    return np.asarray(out, dtype=str)


def parse_label_column(values: Any, rows: np.ndarray, path: Path, field_name: str) -> np.ndarray:
    """One observation column -> float32 array: 1 / 0 / -1, probabilities in [0, 1], NaN for blank.

    Blank is an empty cell, null or a missing key. An explicit NaN, a non-number, or a value outside
    {-1} U [0, 1] is an error naming the row."""
    if hasattr(values, "type"):
        import pyarrow as pa
        import pyarrow.compute as pc

        if pa.types.is_boolean(values.type) or pa.types.is_decimal(values.type):
            values = values.cast(pa.float64())  # true/false are 1/0; decimals are plain numbers
        if pa.types.is_floating(values.type) or pa.types.is_integer(values.type):
            nulls = values.is_null().to_numpy(zero_copy_only=False)
            numbers = values.fill_null(0).to_numpy(zero_copy_only=False).astype(np.float64)
            if pa.types.is_floating(values.type):
                bad = np.nonzero(pc.is_nan(values).fill_null(False).to_numpy(zero_copy_only=False))[0]
                if bad.size:
                    raise InputError(
                        f"{where(path, row=int(rows[bad[0]]), field=field_name)}: NaN; leave the cell null for 'not mentioned'"
                    )
            numbers[nulls] = np.nan
            return _check_range(numbers, rows, path, field_name)
    items = _as_list(values)
    out = np.empty(len(items), dtype=np.float64)
    # Submissions repeat a handful of cell values ("1", "0", "", null...): parse each distinct value
    # once. Booleans are excluded from the memo because True == 1 would hit the entry of 1.
    memo: dict[Any, float] = {}
    for i, value in enumerate(items):
        if value is not True and value is not False:
            try:
                out[i] = memo[value]
                continue
            except (KeyError, TypeError):
                pass
        number = _parse_label_cell(value, int(rows[i]), path, field_name)
        out[i] = number
        try:
            memo[value] = number
        except TypeError:
            pass
    return _check_range(out, rows, path, field_name)


#: Words read as labels (case-insensitive): what a boolean column becomes in CSV, and yes/no.
LABEL_WORDS = {"true": 1.0, "false": 0.0, "yes": 1.0, "no": 0.0}


def _parse_label_cell(value: Any, row: int, path: Path, field_name: str) -> float:
    """One cell: a float, NaN for blank; errors name the row and field."""
    if value is None:
        return np.nan
    if isinstance(value, bool):
        return 1.0 if value else 0.0
    if isinstance(value, str) and value.strip().lower() in LABEL_WORDS:
        return LABEL_WORDS[value.strip().lower()]
    if isinstance(value, decimal.Decimal):  # a Parquet decimal column read cell by cell
        value = float(value)
    if not isinstance(value, (int, float, str)):
        raise InputError(
            f"{where(path, row=row, field=field_name)}: {value!r} is not a label (use 1, 0, -1, blank or a probability)"
        )
    if isinstance(value, str):
        text = value.strip()
        if text == "":
            return np.nan
        try:
            number = float(text)
        except ValueError:
            raise InputError(
                f"{where(path, row=row, field=field_name)}: {value!r} is not a label (use 1, 0, -1, blank or a probability)"
            ) from None
    else:
        number = float(value)
    if math.isnan(number):
        raise InputError(
            f"{where(path, row=row, field=field_name)}: NaN; leave the cell blank for 'not mentioned'"
        )
    return number


def _check_range(values: np.ndarray, rows: np.ndarray, path: Path, field_name: str) -> np.ndarray:
    finite = ~np.isnan(values)
    bad = finite & ~((values == -1) | ((values >= 0) & (values <= 1)))
    if bad.any():
        i = int(np.nonzero(bad)[0][0])
        raise InputError(
            f"{where(path, row=int(rows[i]), field=field_name)}: {float(values[i]):.12g} is out of range (labels are 1, 0, -1 or blank; probabilities lie in [0, 1])"
        )
    return values.astype(np.float32)


def text_values(values: Any, rows: np.ndarray, path: Path, field_name: str) -> list[str | None]:
    """A text column as a list of str/None; non-string values are an error naming the row."""
    items = _as_list(values)
    for i, value in enumerate(items):
        if value is not None and not isinstance(value, str):
            if isinstance(value, float) and math.isnan(value):
                raise InputError(
                    f"{where(path, row=int(rows[i]), field=field_name)}: NaN where text is expected"
                )
            raise InputError(
                f"{where(path, row=int(rows[i]), field=field_name)}: expected text, got {type(value).__name__}"
            )
    return items


def parse_or_skip(
    parse: Callable[[Any, np.ndarray, Path, str], Any],
    values: Any,
    rows: np.ndarray,
    path: Path,
    field_name: str,
    lenient: bool,
    fill: Any,
) -> tuple[Any, np.ndarray, dict[int, str]]:
    """Run a column parser; with ``lenient``, a failing column is parsed again cell by cell so that
    only the bad rows are lost: returns (parsed values with ``fill`` in bad rows, bad-row mask, the
    message of each bad row by position). Without ``lenient`` the first error is raised."""
    try:
        return parse(values, rows, path, field_name), np.zeros(len(rows), dtype=bool), {}
    except InputError:
        if not lenient:
            raise
    items = _as_list(values)
    bad = np.zeros(len(items), dtype=bool)
    messages: dict[int, str] = {}
    parsed: list[Any] = []
    for i, item in enumerate(items):
        try:
            parsed.append(parse([item], rows[i : i + 1], path, field_name)[0])
        except InputError as exc:
            bad[i] = True
            messages[i] = str(exc)
            parsed.append(fill)
    if isinstance(fill, float):
        return np.asarray(parsed, dtype=np.float32 if np.isnan(fill) else np.float64), bad, messages
    if isinstance(fill, int):
        return np.asarray(parsed, dtype=np.int64), bad, messages
    return parsed, bad, messages


class StudyIndex:
    """Maps study ids of the references to dense slots and catches unknown and duplicate rows."""

    def __init__(self, study_ids: np.ndarray, source: str = "references"):
        study_ids = np.asarray(study_ids)
        if study_ids.dtype.kind not in "UO":
            study_ids = study_ids.astype(np.int64)
        self.order = np.argsort(study_ids, kind="stable")
        self.sorted = study_ids[self.order]
        if len(self.sorted) > 1 and np.any(self.sorted[1:] == self.sorted[:-1]):
            dup = self.sorted[1:][self.sorted[1:] == self.sorted[:-1]][0]
            raise InputError(f"{source}: reference key {dup} appears twice")
        self.size = len(study_ids)
        self.first_row = np.zeros(self.size, dtype=np.int64)  # 0 = not seen yet

    def lookup(self, ids: np.ndarray) -> np.ndarray:
        """Slots of ``ids`` (-1 where unknown)."""
        pos = np.searchsorted(self.sorted, ids)
        pos = np.minimum(pos, max(self.size - 1, 0))
        found = (self.sorted[pos] == ids) if self.size else np.zeros(len(ids), bool)
        return np.where(found, self.order[pos] if self.size else -1, -1)

    def claim(
        self,
        slots: np.ndarray,
        rows: np.ndarray,
        ids: np.ndarray,
        path: Path,
        field_name: str,
        hint: str = "",
    ) -> None:
        """Mark slots as submitted; a slot submitted twice (in this batch or before) is an error naming
        both rows (``hint`` is appended to the message)."""
        seen_before = self.first_row[slots] > 0
        if seen_before.any():
            i = int(np.nonzero(seen_before)[0][0])
            raise InputError(
                f"{where(path, row=int(rows[i]), field=field_name)}: duplicate {field_name} {ids[i]} (first given in row {int(self.first_row[slots[i]])}){hint}"
            )
        uniq, first, counts = np.unique(slots, return_index=True, return_counts=True)
        if np.any(counts > 1):
            slot = uniq[counts > 1][0]
            where_rows = rows[slots == slot]
            raise InputError(
                f"{where(path, row=int(where_rows[1]), field=field_name)}: duplicate {field_name} {ids[slots == slot][0]} (first given in row {int(where_rows[0])}){hint}"
            )
        self.first_row[slots] = rows

    def release(self, slots: np.ndarray) -> None:
        """Forget that these slots were submitted (their rows were skipped under ``lenient``)."""
        self.first_row[slots] = 0

    @property
    def covered(self) -> np.ndarray:
        """Bool mask of slots that received a row."""
        return self.first_row > 0
